"""Latency accounting for the WebSocket load tool, pure (no I/O, no models) so it can be
checked on scripted timelines.

Times are seconds on one monotonic clock. The client sends the stream as frames
(frame 0, 1, ... n-1), then the end-of-stream message; `frame_sent[f]` is when frame f was
handed to the socket, and "frame n" stands for the end-of-stream message.

How the server turns frames into work (frontend/session.py; perf/baseline_server.py does
the same): received audio is cut into pieces of at least `min_step` and at most `max_step`
samples, each going through the VAD and then into the first-pass buffer; the first pass
decodes every whole chunk in the buffer; in 2pass mode a segment end reported by the VAD
for a piece flushes the first pass (a decode of whatever is buffered) after that piece,
and the next audio starts a new first-pass sequence, i.e. a new chunk grid. The
end-of-stream message makes a last (possibly empty) piece and a final flush.

A partial is sent only when a decode yields text, so which decode a partial comes from
cannot be read off the partial itself. The load tool learns it once per audio file with a
probe stream (see perf/ws_load.py): frames go out one by one and, after each frame that
triggers a decode (known from `first_pass_decodes`), the probe waits for the server; the
partials arriving during that wait belong to that frame. The first-pass text depends only
on the audio and its frame grid, not on load, so in every later stream of the same audio
the i-th partial comes from the same frame as the probe's i-th partial: partial lag is its
arrival minus the time that frame (the last byte of the chunk it covers) was sent.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(values: Iterable[float]) -> dict:
    """count, mean, p50/p90/p95/p99 and max of a list of latencies; None when empty."""
    values = list(values)
    if not values:
        return {"count": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        **{f"p{q}": percentile(values, q) for q in PERCENTILES},
        "max": max(values),
    }


@dataclass(frozen=True)
class Piece:
    """A piece of audio the server processes: `frame` is the frame whose arrival completed
    it (n for the end-of-stream piece), `samples` its length."""

    frame: int
    samples: int
    final: bool = False


def server_pieces(frame_lengths: Sequence[int], min_step: int, max_step: int) -> list[Piece]:
    """The pieces the server cuts the frames into, ending with the end-of-stream piece."""
    if min_step < 1 or max_step < min_step:
        raise ValueError(f"need 1 <= min_step <= max_step, got {min_step}, {max_step}")
    pieces, pending = [], 0
    for frame, length in enumerate(frame_lengths):
        pending += length
        while pending >= min_step:
            take = min(pending, max_step)
            pieces.append(Piece(frame, take))
            pending -= take
    pieces.append(Piece(len(frame_lengths), pending, final=True))
    return pieces


def segment_ends(events_per_piece: Sequence[Sequence[Sequence[int]]]) -> list[tuple[int, int, int]]:
    """VAD events per piece ([start_ms, end_ms] rows, -1 = not known yet) -> the closed
    segments as (piece index, start_ms, end_ms), with the server's rule that an end without
    an open start is ignored."""
    closed, open_start = [], None
    for index, events in enumerate(events_per_piece):
        for start_ms, end_ms in events:
            if start_ms >= 0:
                open_start = start_ms
            if end_ms >= 0 and open_start is not None:
                closed.append((index, open_start, end_ms))
                open_start = None
    return closed


def first_pass_decodes(pieces: Sequence[Piece], chunk_samples: int, flush_pieces: Iterable[int] = (),
                       final_flush_is_partial: bool = True) -> list[int]:
    """The frame that triggers each first-pass decode, in decode order (a frame can trigger
    several). `flush_pieces`: indices of pieces after which a segment end flushes the first
    pass (2pass mode). The end-of-stream flush yields a partial in 2pass mode; in online
    mode its text goes into the final message instead (final_flush_is_partial=False)."""
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be positive, got {chunk_samples}")
    flush_pieces = set(flush_pieces)
    triggers, buffered, sequence_open = [], 0, False
    for index, piece in enumerate(pieces):
        buffered += piece.samples
        while buffered >= chunk_samples:
            triggers.append(piece.frame)
            buffered -= chunk_samples
            sequence_open = True
        if index in flush_pieces and (sequence_open or buffered):
            triggers.append(piece.frame)
            buffered, sequence_open = 0, False
    if final_flush_is_partial and (sequence_open or buffered):
        triggers.append(pieces[-1].frame if pieces else 0)
    return triggers


def sent_time(frame: int, frame_sent: Sequence[float], end_sent: float | None) -> float | None:
    """Send time of a frame; frame len(frame_sent) is the end-of-stream message."""
    if frame < len(frame_sent):
        return frame_sent[frame]
    return end_sent


def partial_lags(partial_arrivals: Sequence[float], partial_frames: Sequence[int], frame_sent: Sequence[float],
                 end_sent: float | None) -> list[float] | None:
    """Lag of each partial: arrival minus the send time of the frame that completed the
    chunk it covers (the probe's attribution, matched by order). None when the stream's
    partials cannot be matched: a different count than the probe saw, or a partial
    arriving before its frame was sent (a grid that does not fit this stream)."""
    if len(partial_arrivals) != len(partial_frames):
        return None
    lags = []
    for arrival, frame in zip(partial_arrivals, partial_frames):
        sent = sent_time(frame, frame_sent, end_sent)
        if sent is None or arrival < sent:
            return None
        lags.append(arrival - sent)
    return lags


def frame_containing(sample: int, frame_lengths: Sequence[int]) -> int:
    """Index of the frame holding this sample; len(frame_lengths) past the end."""
    offsets, total = [], 0
    for length in frame_lengths:
        total += length
        offsets.append(total)
    return bisect.bisect_right(offsets, sample)


def segment_reference_frame(end_ms: int, frame_lengths: Sequence[int], sample_rate: int = 16000) -> int:
    """The frame carrying the audio at a segment's end_time (its last sample before end_ms):
    second-pass latency counts from sending it."""
    last_sample = max(0, end_ms * sample_rate // 1000 - 1)
    return min(frame_containing(last_sample, frame_lengths), max(0, len(frame_lengths) - 1))


def second_pass_latencies(segments: Sequence[tuple[int, float]], frame_lengths: Sequence[int],
                          frame_sent: Sequence[float], sample_rate: int = 16000) -> list[float]:
    """(end_ms, arrival) of each second-pass message -> arrival minus the send time of the
    frame carrying the audio at end_ms."""
    return [arrival - frame_sent[segment_reference_frame(end_ms, frame_lengths, sample_rate)]
            for end_ms, arrival in segments]


def detection_latencies(segments: Sequence[tuple[int, float]], detection_frames: dict[int, int],
                        frame_sent: Sequence[float], end_sent: float | None) -> list[float]:
    """(end_ms, arrival) -> arrival minus the send time of the frame at which the VAD
    reported that segment end (so without the VAD's own end-silence wait). Segments the
    replayed VAD did not produce are skipped."""
    latencies = []
    for end_ms, arrival in segments:
        frame = detection_frames.get(end_ms)
        sent = None if frame is None else sent_time(frame, frame_sent, end_sent)
        if sent is not None:
            latencies.append(arrival - sent)
    return latencies


def largest_passing(passes: Callable[[int], bool], max_n: int) -> tuple[int, bool]:
    """The largest n in 1..max_n for which passes(n) holds, assuming it holds up to some n
    and fails beyond: doubling from 1 (capped at max_n), then bisection between the last
    pass and the first failure. Returns (n, bounded), bounded when max_n itself passed."""
    best, failed, n = 0, None, 1
    while n <= max_n:
        if not passes(n):
            failed = n
            break
        best = n
        n = min(n * 2, max_n) if n < max_n else max_n + 1
    if failed is None:
        return best, True
    while failed - best > 1:
        middle = (best + failed) // 2
        if passes(middle):
            best = middle
        else:
            failed = middle
    return best, False


# Where the served second pass spends a segment's time, from the servers' own counters
# (Prometheus samples by name and model, scraped before and after a run by perf.ws_load).
# The torch stages of the second pass, by their metric names' stage and segment words.
SERVED_NANO_STAGES = {"encoder": "encoded_segments", "torch_generate": "torch_generated_segments"}
FIRST_PASS_MODELS = ("vad", "paraformer_streaming")
# Sample name as exposed -> {model label ("" without one): value} (triton_launcher.metric_samples).
Samples = Mapping[str, Mapping[str, float]]


def served_breakdown(before: Samples, after: Samples) -> dict[str, float | None]:
    """Means over a run (None where a server does not count it):
    - frontend_second_pass_s: per segment, from the VAD's report of its end reaching the
      frontend to its text going out;
    - <stage>_wait_s: per segment, from its arrival at the Nano model's stage to its pass;
      <stage>_pass_s: per pass; <stage>_batch: segments per pass;
    - <model>_pass_s per batched pass and <model>_batch (chunks per pass) of the first-pass
      models, the VAD and the streaming Paraformer;
    - draft_tokens_per_segment: the first pass's draft tokens torch generation kept, per
      segment it generated (each a decode pass saved)."""

    def delta(name: str, model: str | None = None) -> float | None:
        if name not in after:
            return None
        values_after, values_before = after[name], before.get(name, {})
        models = [model] if model is not None else list(values_after)
        if model is not None and model not in values_after:
            return None
        return sum(values_after[m] - values_before.get(m, 0.0) for m in models)

    def ratio(numerator: float | None, denominator: float | None, scale: float = 1.0) -> float | None:
        if numerator is None or not denominator:
            return None
        return numerator / denominator * scale

    out: dict[str, float | None] = {
        "frontend_segments": delta("twopass_frontend_second_pass_seconds_count"),
        "frontend_second_pass_s": ratio(delta("twopass_frontend_second_pass_seconds_sum"),
                                        delta("twopass_frontend_second_pass_seconds_count")),
    }
    for stage, segments_name in SERVED_NANO_STAGES.items():
        segments = delta(f"twopass_asr_nano_{segments_name}_total")
        passes = delta(f"twopass_asr_nano_{stage}_passes_total")
        out[f"{stage}_wait_s"] = ratio(delta(f"twopass_asr_nano_{stage}_wait_seconds_total"), segments)
        out[f"{stage}_pass_s"] = ratio(delta(f"twopass_asr_nano_{stage}_pass_seconds_total"), passes)
        out[f"{stage}_batch"] = ratio(segments, passes)
    out["draft_tokens_per_segment"] = ratio(delta("twopass_asr_nano_draft_tokens_accepted_total"),
                                            delta("twopass_asr_nano_torch_generated_segments_total"))
    for model in FIRST_PASS_MODELS:
        passes = delta("twopass_asr_sequence_passes_total", model)
        out[f"{model}_pass_s"] = ratio(delta("twopass_asr_sequence_pass_seconds_total", model), passes)
        out[f"{model}_batch"] = ratio(delta("twopass_asr_sequence_pass_chunks_total", model), passes)
    return out
