"""One stream of one WebSocket connection: audio in, protocol messages out.

The pipeline follows FunASR's own 2pass server: every piece of audio goes to the streaming
VAD (one sequence for the whole stream, so its times count from the stream start) and to
the streaming Paraformer (first pass, decoded every chunk_size[1]*60 ms). In 2pass mode the
first pass is restarted per VAD segment (a segment end ends its sequence, flushing the
tail; the next audio starts a new one), as FunASR resets its online cache there. Each
finished segment is cut from the recent audio and sent to Fun-ASR-Nano while the first
pass carries on (on Triton even before the first pass has decoded that audio and flushed
the segment's tail: StreamModels.second_pass_beside_first_pass); the results go out in
segment order. The models are reached through a backend (backend.py): Triton for the
service, FunASR in-process for the baseline.

When the server under a stream is lost, the stream moves to another one (StreamModels.move)
and replays what the fresh sequences need from the audio it keeps: the VAD from a little
before the open segment (no earlier than the last segment's end; its times are shifted back
to the stream's), the first pass from a few chunks before the audio it had not decoded yet,
whose earlier texts are not sent again; unanswered second-pass requests are asked again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np

from frontend.audio import AudioHistory, AudioInput, ms_to_samples
from frontend.backend import BackendLost, StreamModels
from frontend.delivery import OrderedDelivery
from frontend.metrics import FrontendMetrics
from frontend.protocol import (
    SAMPLE_RATE,
    StreamConfig,
    final_message,
    partial_message,
    segment_message,
)

log = logging.getLogger("frontend.session")

# Audio reaches the models in pieces of 60 ms or more (FunASR's server feeds its VAD per
# 60 ms client frame); a client's big frames are split so segment ends are noticed promptly.
MIN_STEP_SAMPLES = SAMPLE_RATE * 60 // 1000
MAX_STEP_SAMPLES = SAMPLE_RATE * 600 // 1000
# While no segment is open, keep this much audio: the VAD dates a segment's start back to
# before the moment it reports it.
HISTORY_KEEP_MS = 10_000
# After a move to another server, a fresh VAD sequence starts this long before the open
# segment (or now, with none open): past the FSMN's memory (~0.8 s) and its decision windows,
# in audio the old sequence heard as silence, so it takes the same decisions from there.
VAD_REPLAY_LEAD_MS = 2_000
# ... and a fresh first-pass sequence this many chunks before the audio not yet decoded: the
# encoder's default look-back, so the chunks after it see the context they had.
FIRST_PASS_REPLAY_CHUNKS = 4
# Audio/config items queued for the worker before the connection stops reading (so a fast
# sender is slowed down by TCP instead of filling memory).
INBOX_LIMIT = 64
# The VAD's frame shift: a fresh VAD sequence starts on this grid, so its frames are the old one's.
VAD_FRAME_SAMPLES = SAMPLE_RATE // 100

T = TypeVar("T")


class _StreamMoved(Exception):
    """The stream moved to another server while a step was under way: replay, then go on."""


class _Samples:
    """A growing int16 buffer consumed from the front."""

    def __init__(self):
        self._parts: list[np.ndarray] = []
        self.size = 0

    def push(self, pcm: np.ndarray) -> None:
        if len(pcm):
            self._parts.append(pcm)
            self.size += len(pcm)

    def take(self, count: int) -> np.ndarray:
        if not self._parts:
            return np.zeros(0, dtype=np.int16)
        joined = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        head, rest = joined[:count], joined[count:]
        self._parts = [rest] if len(rest) else []
        self.size = len(rest)
        return head


class StreamSession:
    def __init__(
        self,
        config: StreamConfig,
        models: StreamModels,
        emit: Callable[[dict[str, Any]], Awaitable[None]],
        on_failure: Callable[[BaseException], None],
        metrics: FrontendMetrics | None = None,
    ):
        """`metrics`: where the stream is counted and its latencies observed (None: nowhere)."""
        self.config = config
        self._models = models
        self._emit = emit
        self._on_failure = on_failure
        self._audio = AudioInput(config.audio_fs, config.wav_format)
        self._inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(INBOX_LIMIT)
        self._pending = _Samples()
        self._received_samples = 0  # 16 kHz samples taken from the inbox so far (and kept in _history)
        self._fed_samples = 0  # of those, how many the models have had (a replay rewinds it)
        self._uses_vad = config.mode != "online"
        self._uses_first_pass = config.mode != "offline"
        self._history = AudioHistory()
        self._open_segment_start: int | None = None
        self._last_segment_end_ms = 0
        # Stream samples where the models' current sequences take their audio from: 0 until a
        # replay (VAD times count from _vad_from).
        self._vad_from = 0
        self._first_pass_from = 0
        self._vad_heard_to = 0  # stream sample up to which a VAD sequence judged the audio
        self._vad_ended = False  # the final step ended the VAD sequence
        self._first_pass_sequence_from = 0  # where the open (or next) first-pass sequence began
        self._first_pass_decoded_to = 0
        self._partials_sent_to = 0  # stream sample up to which first-pass texts went out
        # The texts of the open (or last) first-pass sequence: in 2pass one segment's, its
        # second pass's draft.
        self._sequence_texts: list[str] = []
        self._moves = 0  # moves to another server so far
        self._moved: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # set at the next move
        self._move_lock = asyncio.Lock()
        self._replay_due = False
        self._first_pass_chunk = config.first_pass_chunk_samples
        self._first_pass_buffer = _Samples()
        self._finishing = False
        self._flush_jobs: list[asyncio.Task] = []
        self._delivery = OrderedDelivery(self._emit_segment, self._fail)
        self.completed = False  # the final message went out
        self._failed = False
        self._metrics = metrics
        # (16 kHz samples received so far, when) per audio frame, until the first pass has
        # decoded past it: when the audio that completes a chunk arrived, for the partial lag.
        self._arrivals: deque[tuple[int, float]] = deque()
        self._arrived_samples = 0
        self._worker = asyncio.create_task(self._run())
        if metrics is not None:
            metrics.streams.labels(config.mode).inc()
            metrics.streams_open.inc()
            # A callback, not the worker's own code: it runs even when the worker is cancelled
            # before it ever started.
            self._worker.add_done_callback(lambda _: metrics.streams_open.dec())

    # -- called by the connection, in frame order --------------------------------------

    async def push_audio(self, data: bytes) -> None:
        """Raises ProtocolError for audio that cannot be decoded (e.g. a bad WAV header)."""
        pcm = self._audio.feed(data)
        if len(pcm):
            self._note_arrival(len(pcm))
            await self._inbox.put(("audio", pcm))

    async def push_config(self, config: StreamConfig) -> None:
        await self._inbox.put(("config", config))

    async def end(self) -> None:
        """No more audio: flush every pass; returns once the final message went out."""
        tail = self._audio.finish()
        self._note_arrival(len(tail))
        await self._inbox.put(("audio", tail))
        await self._inbox.put(("end", None))
        await asyncio.shield(self._worker)

    async def abort(self) -> None:
        """The connection is going away: stop work, cancel second-pass requests and end
        the open sequences so the models free their state."""
        self._worker.cancel()
        self._delivery.cancel()
        for task in self._flush_jobs:
            task.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        await self._models.abort()

    # -- worker --------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                kind, item = await self._inbox.get()
                if kind == "audio":
                    await self._process(item)
                elif kind == "config":
                    self.config = item
                else:
                    break
            await self._finish()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported to the connection, which closes with an error
            self._fail(exc)

    async def _process(self, pcm: np.ndarray) -> None:
        self._pending.push(pcm)
        while self._pending.size >= MIN_STEP_SAMPLES:
            await self._step(self._pending.take(MAX_STEP_SAMPLES), final=False)

    async def _step(self, pcm: np.ndarray, final: bool) -> None:
        """One piece of audio through VAD and the first pass (or, after a move, the replay
        that covers it)."""
        self._history.append(pcm)
        self._received_samples += len(pcm)
        await self._with_failover(lambda: self._feed(self._unfed(pcm), final))
        now_ms = self._received_samples * 1000 // SAMPLE_RATE
        keep_from = now_ms - HISTORY_KEEP_MS
        if self._open_segment_start is not None:
            keep_from = min(keep_from, self._open_segment_start - VAD_REPLAY_LEAD_MS)
        self._history.discard_before_ms(keep_from)

    def _unfed(self, pcm: np.ndarray) -> np.ndarray:
        """The audio received that the models have not had: `pcm`, or nothing after a replay."""
        if self._received_samples - self._fed_samples == len(pcm):
            return pcm
        return self._history.slice_samples(self._fed_samples, self._received_samples)

    async def _feed(self, pcm: np.ndarray, final: bool) -> None:
        """Audio through VAD and the first pass; segment ends found by the VAD in it close
        the first-pass sequence after the audio was decoded. `final` ends the VAD sequence."""
        start = self._fed_samples
        self._fed_samples += len(pcm)
        events = []
        if self._uses_vad:
            vad_audio = pcm[max(self._vad_from - start, 0):]
            if len(vad_audio) or (final and self._current_models().vad.is_open):
                events = await self._current_models().vad.step(vad_audio, self.config, end=final)
                self._vad_heard_to = max(self._vad_heard_to, self._fed_samples)
                self._vad_ended = final
        reported_at = time.monotonic()
        closed, left_open = self._segments_closed_by(events)
        # Where the passes run side by side, the closed segments' second passes start before
        # this audio's first-pass decode (and the flush after it), which would hold them back.
        early = [self._start_recognition_beside_first_pass(start_ms, end_ms) for start_ms, end_ms in closed]
        try:
            if self._uses_first_pass:
                self._first_pass_buffer.push(pcm[max(self._first_pass_from - start, 0):])
                await self._decode_first_pass(end=False)
            for index, (start_ms, end_ms) in enumerate(closed):
                self._open_segment_start = start_ms
                await self._close_segment(start_ms, end_ms, reported_at, early[index])
                early[index] = None
        except BaseException:
            for recognition in early:
                if recognition is not None:
                    # The stream moves (the VAD closes these segments again after the replay) or ends.
                    recognition.cancel()
            raise
        self._open_segment_start = left_open

    def _segments_closed_by(self, events: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int | None]:
        """The segments (start_ms, end_ms) the VAD's events close, and the start of the one
        they leave open (None when none is)."""
        offset_ms = self._vad_from * 1000 // SAMPLE_RATE
        open_start, closed = self._open_segment_start, []
        for start_ms, end_ms in events:
            if start_ms >= 0:
                open_start = start_ms + offset_ms
            if end_ms >= 0:
                if open_start is None:
                    log.warning("VAD reported a segment end (%d ms) without a start; ignored", end_ms + offset_ms)
                    continue
                closed.append((open_start, end_ms + offset_ms))
                open_start = None
        return closed, open_start

    async def _finish(self) -> None:
        self._finishing = True
        tail = self._pending.take(self._pending.size)
        if self._models.vad.is_open or self._models.first_pass.is_open or len(tail) or self._replay_due:
            await self._step(tail, final=True)
        final_result = None
        if self._uses_first_pass:
            emit = self.config.mode != "online"
            text = await self._with_failover(lambda: self._decode_first_pass(end=True, emit=emit))
            if self.config.mode == "online":
                final_result = partial_message(self.config, text)
        # The last segment closed by the flush becomes the final message; earlier ones are
        # delivered in order before it.
        for task in self._flush_jobs[:-1]:
            self._delivery.submit(task)
        await self._delivery.drain()
        reported_at = None
        if self._flush_jobs:
            final_result, reported_at = await self._flush_jobs[-1]
        await self._emit(final_message(self.config, final_result))
        self._observe_second_pass(reported_at)
        self.completed = True
        await self._models.close()

    # -- moving to another server ---------------------------------------------------------

    async def _with_failover(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call` (model steps); when the server under the stream is lost, the stream moves,
        the fresh sequences get the replay, and `call` runs again (it feeds what is left)."""
        while True:
            moves = self._moves
            try:
                if self._replay_due:
                    await self._replay()
                return await call()
            except _StreamMoved:
                continue
            except BackendLost as lost:
                await self._move(moves, lost)

    async def _move(self, moves: int, lost: BackendLost) -> None:
        """Move the stream after `lost` (of a call made after `moves` moves) unless it moved
        since; raises `lost` when no server is left."""
        async with self._move_lock:
            if moves != self._moves:
                return
            log.warning("stream %r: %s; moving it to another server", self.config.wav_name, lost)
            if not await self._models.move():
                raise lost
            self._moves += 1
            self._replay_due = True
            self._moved.set_result(None)
            self._moved = asyncio.get_running_loop().create_future()
            if self._metrics is not None:
                self._metrics.failovers.inc()

    def _current_models(self) -> StreamModels:
        """The models to call now; raises _StreamMoved when their sequences await a replay."""
        if self._replay_due:
            raise _StreamMoved()
        return self._models

    async def _replay(self) -> None:
        """Feed the fresh sequences of a new server the audio they need again (module doc)."""
        self._replay_due = False
        held_from = self._history.first_sample
        replay_from = self._received_samples
        if self._uses_vad:
            anchor_ms = self._open_segment_start
            if anchor_ms is None:
                anchor_ms = self._vad_heard_to * 1000 // SAMPLE_RATE
            vad_from = max(ms_to_samples(max(self._last_segment_end_ms, anchor_ms - VAD_REPLAY_LEAD_MS)), held_from)
            self._vad_from = -(-vad_from // VAD_FRAME_SAMPLES) * VAD_FRAME_SAMPLES
            replay_from = min(replay_from, self._vad_from)
        if self._uses_first_pass:
            # Whole chunks before the audio not decoded yet, so the replayed chunks end where the
            # sent ones did.
            chunk = self._first_pass_chunk
            lead = min(self._first_pass_decoded_to - max(self._first_pass_sequence_from, held_from),
                       FIRST_PASS_REPLAY_CHUNKS * chunk)
            self._first_pass_from = self._first_pass_decoded_to - max(lead, 0) // chunk * chunk
            self._first_pass_sequence_from = self._first_pass_from
            self._first_pass_buffer = _Samples()
            replay_from = min(replay_from, self._first_pass_from)
        self._fed_samples = replay_from
        audio = self._history.slice_samples(replay_from, self._received_samples)
        pieces = [audio[offset:offset + MAX_STEP_SAMPLES] for offset in range(0, len(audio), MAX_STEP_SAMPLES)]
        log.info("stream %r: replaying %.2f s on the new server", self.config.wav_name, len(audio) / SAMPLE_RATE)
        for index, piece in enumerate(pieces):
            await self._feed(piece, final=self._vad_ended and index == len(pieces) - 1)

    # -- segments ------------------------------------------------------------------------

    def _start_recognition_beside_first_pass(self, start_ms: int, end_ms: int) -> asyncio.Future[str] | None:
        """The segment's second pass, started now where the backend runs it beside the first
        pass (StreamModels.second_pass_beside_first_pass); else None."""
        if not self._models.second_pass_beside_first_pass:
            return None
        pcm = self._history.slice_ms(start_ms, end_ms)
        return self._models.start_recognition(pcm, self.config, self._draft()) if len(pcm) else None

    def _draft(self) -> str:
        """The first pass's text of the segment closing now, for its second pass (2pass only:
        there the first pass's sequences are the segments)."""
        return "".join(self._sequence_texts) if self.config.mode == "2pass" else ""

    async def _close_segment(self, start_ms: int, end_ms: int, reported_at: float,
                             recognition: asyncio.Future[str] | None) -> None:
        """Flush the first pass (2pass) and queue the segment's result. `recognition`: its
        second pass if already started; else it starts after the flush, so the backend has
        it before the stream's next audio (the baseline runs it first, as FunASR's servers do)."""
        pcm = self._history.slice_ms(start_ms, end_ms)
        if self.config.mode == "2pass":
            await self._decode_first_pass(end=True)
        draft = self._draft()
        if len(pcm) and recognition is None:
            recognition = self._models.start_recognition(pcm, self.config, draft)
        self._last_segment_end_ms = end_ms
        job = asyncio.create_task(self._segment_result(self.config, start_ms, end_ms, pcm, draft, recognition,
                                                       self._moves, reported_at))
        if recognition is not None:
            # A job cancelled before it ran must still cancel its request.
            job.add_done_callback(lambda _: recognition.cancel())
        if self._finishing:
            self._flush_jobs.append(job)
        else:
            self._delivery.submit(job)

    async def _segment_result(self, config: StreamConfig, start_ms: int, end_ms: int, pcm: np.ndarray, draft: str,
                              recognition: asyncio.Future[str] | None, moves: int, reported_at: float
                              ) -> tuple[dict[str, Any], float]:
        """The segment's message, and when the VAD reported its end."""
        text = await self._recognize(pcm, config, draft, recognition, moves) if recognition is not None else ""
        return segment_message(config, text, start_ms, end_ms), reported_at

    async def _recognize(self, pcm: np.ndarray, config: StreamConfig, draft: str, recognition: asyncio.Future[str],
                         moves: int) -> str:
        """The text of `recognition` (asked after `moves` moves); asked again on the stream's
        new server when the stream moves while it waits, or when its server was lost."""
        try:
            while True:
                if moves == self._moves:
                    await asyncio.wait((recognition, self._moved), return_when=asyncio.FIRST_COMPLETED)
                if recognition.done():
                    try:
                        return recognition.result()
                    except BackendLost as lost:
                        await self._move(moves, lost)
                else:
                    recognition.cancel()  # asked of a server the stream has left
                moves = self._moves
                recognition = self._models.start_recognition(pcm, config, draft)
        finally:
            recognition.cancel()

    async def _emit_segment(self, result: tuple[dict[str, Any], float]) -> None:
        message, reported_at = result
        await self._emit(message)
        self._observe_second_pass(reported_at)

    def _observe_second_pass(self, reported_at: float | None) -> None:
        if self._metrics is not None and reported_at is not None:
            self._metrics.second_pass_latency.observe(time.monotonic() - reported_at)

    # -- first pass ----------------------------------------------------------------------

    async def _decode_first_pass(self, end: bool, emit: bool = True) -> str:
        """Decode every whole chunk buffered; with `end`, also the rest, ending the
        sequence. Returns the text recognised by this call."""
        texts = []
        chunk = self._first_pass_chunk if self._current_models().first_pass.is_open \
            else self.config.first_pass_chunk_samples
        while self._first_pass_buffer.size >= chunk:
            texts.append(await self._first_pass(self._first_pass_buffer.take(chunk), end=False, emit=emit))
            chunk = self._first_pass_chunk
        if end and (self._current_models().first_pass.is_open or self._first_pass_buffer.size):
            rest = self._first_pass_buffer.take(self._first_pass_buffer.size)
            texts.append(await self._first_pass(rest, end=True, emit=emit))
        return "".join(texts)

    async def _first_pass(self, pcm: np.ndarray, end: bool, emit: bool) -> str:
        """The text of one step; "" for a replayed chunk whose text went out before the move."""
        models = self._current_models()
        if not models.first_pass.is_open:
            self._first_pass_chunk = self.config.first_pass_chunk_samples
            self._sequence_texts = []
        text = await models.first_pass.step(pcm, self.config, end=end)
        self._sequence_texts.append(text)
        decoded_to = self._fed_samples - self._first_pass_buffer.size
        self._first_pass_decoded_to = decoded_to
        if end:
            self._first_pass_sequence_from = decoded_to
        # A sequence's end flushes text of audio it had before: never sent.
        replayed = not end and decoded_to <= self._partials_sent_to
        self._partials_sent_to = max(self._partials_sent_to, decoded_to)
        if replayed:
            return ""
        completed_at = self._arrival_of(decoded_to)
        if text and emit:
            await self._emit(partial_message(self.config, text))
            if self._metrics is not None and completed_at is not None:
                self._metrics.partial_lag.observe(time.monotonic() - completed_at)
        return text

    def _note_arrival(self, samples: int) -> None:
        self._arrived_samples += samples
        if self._metrics is not None and self._uses_first_pass and samples:
            self._arrivals.append((self._arrived_samples, time.monotonic()))

    def _arrival_of(self, position: int) -> float | None:
        """When the audio up to sample `position` had arrived; forgets the frames before it
        (the first pass decodes forward only)."""
        while self._arrivals and self._arrivals[0][0] < position:
            self._arrivals.popleft()
        return self._arrivals[0][1] if self._arrivals else None

    # -- teardown ------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if not self._failed:
            self._failed = True
            self._on_failure(exc)
