// What the page shows: committed second-pass segments plus the live first-pass partial.
//
// First-pass messages carry no times, and with a second pass that runs alongside the
// first one, partial text of the NEXT segment can arrive before the second-pass result
// of the current one. So each partial piece is stamped with how much audio had been sent
// when it arrived (an upper bound on the audio it describes). A second-pass result for
// [start, end] replaces the pieces stamped up to end + the VAD end silence + a margin:
// the server flushes a segment's first-pass text when the VAD has heard that silence, and
// the next segment's first text needs at least one more decode chunk (600 ms) after that.
// The margin (< 600 ms) absorbs server and network delay on the flushed text.

export const SECOND_PASS_MODES = new Set(['2pass-offline', 'offline']);
export const FIRST_PASS_MODES = new Set(['2pass-online', 'online']);

const DEFAULT_END_SILENCE_MS = 800;
const ARRIVAL_MARGIN_MS = 400;

export class Transcript {
  constructor({ sessionMode = '2pass', endSilenceMs = DEFAULT_END_SILENCE_MS } = {}) {
    this.sessionMode = sessionMode;
    this.endSilenceMs = endSilenceMs;
    this.pieces = [];           // {text, heardUntilMs}
    this.segments = [];         // {text, startMs, endMs}
    this.replacedUntilMs = -Infinity;
    this.finished = false;
  }

  // Applies one server message; heardUntilMs = ms of audio sent when it arrived.
  apply(message, heardUntilMs) {
    const text = typeof message.text === 'string' ? message.text : '';
    if (FIRST_PASS_MODES.has(message.mode)) {
      this.addPartial(text, heardUntilMs);
    } else if (SECOND_PASS_MODES.has(message.mode) && hasSegmentTimes(message)) {
      this.commitSegment(text, message.start_time, message.end_time);
    } else if (SECOND_PASS_MODES.has(message.mode) && text !== '') {
      // A second-pass text without times (older servers): still a result, keep it.
      this.commitSegment(text, null, null);
    }
    // After an error the live text is all the user gets: keep it.
    if (message.is_final) this.finish({ keepPartial: Boolean(message.error) });
  }

  addPartial(text, heardUntilMs) {
    if (text === '') return;
    // Arrived after its segment was already committed: the segment text supersedes it.
    if (heardUntilMs <= this.replacedUntilMs) return;
    this.pieces.push({ text, heardUntilMs });
  }

  commitSegment(text, startMs, endMs) {
    this.segments.push({ text, startMs, endMs });
    if (endMs === null) {
      this.pieces = [];
      return;
    }
    const cutoff = endMs + this.endSilenceMs + ARRIVAL_MARGIN_MS;
    this.replacedUntilMs = Math.max(this.replacedUntilMs, cutoff);
    this.pieces = this.pieces.filter((piece) => piece.heardUntilMs > cutoff);
  }

  finish({ keepPartial = false } = {}) {
    this.finished = true;
    // With a second pass every segment has been committed by now; a first-pass-only
    // stream keeps its partial text as the result.
    if (this.sessionMode !== 'online' && !keepPartial) this.pieces = [];
  }

  get partialText() {
    return this.pieces.map((piece) => piece.text).join('');
  }
}

function hasSegmentTimes(message) {
  return Number.isFinite(message.start_time) && Number.isFinite(message.end_time);
}

// 83456 -> "01:23.46"
export function formatTime(ms) {
  const totalCentiseconds = Math.round(ms / 10);
  const minutes = Math.floor(totalCentiseconds / 6000);
  const seconds = Math.floor((totalCentiseconds % 6000) / 100);
  const centiseconds = totalCentiseconds % 100;
  const pad = (value) => String(value).padStart(2, '0');
  return `${pad(minutes)}:${pad(seconds)}.${pad(centiseconds)}`;
}
