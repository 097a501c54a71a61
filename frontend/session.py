"""One stream of one WebSocket connection: audio in, protocol messages out.

The pipeline follows FunASR's own 2pass server: every piece of audio goes to the streaming
VAD (one sequence for the whole stream, so its times count from the stream start) and to
the streaming Paraformer (first pass, decoded every chunk_size[1]*60 ms). In 2pass mode the
first pass is restarted per VAD segment (a segment end ends its sequence, flushing the
tail; the next audio starts a new one), as FunASR resets its online cache there. Each
finished segment is cut from the recent audio and sent to Fun-ASR-Nano while the first
pass carries on; the results go out in segment order. The models are reached through a
backend (backend.py): Triton for the service, FunASR in-process for the baseline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable

import numpy as np

from frontend.audio import AudioHistory, AudioInput
from frontend.backend import StreamModels
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
# Audio/config items queued for the worker before the connection stops reading (so a fast
# sender is slowed down by TCP instead of filling memory).
INBOX_LIMIT = 64


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
        self._received_samples = 0  # 16 kHz samples given to the models so far
        self._uses_vad = config.mode != "online"
        self._uses_first_pass = config.mode != "offline"
        self._history = AudioHistory() if self._uses_vad else None
        self._open_segment_start: int | None = None
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
        """One piece of audio through VAD and the first pass; segment ends found by the VAD
        in this piece close the first-pass sequence after the piece was decoded."""
        self._received_samples += len(pcm)
        events = []
        if self._uses_vad:
            self._history.append(pcm)
            events = await self._models.vad.step(pcm, self.config, end=final)
        if self._uses_first_pass:
            self._first_pass_buffer.push(pcm)
            await self._decode_first_pass(end=False)
        for start_ms, end_ms in events:
            if start_ms >= 0:
                self._open_segment_start = start_ms
            if end_ms >= 0:
                if self._open_segment_start is None:
                    log.warning("VAD reported a segment end (%d ms) without a start; ignored", end_ms)
                    continue
                await self._close_segment(self._open_segment_start, end_ms)
                self._open_segment_start = None
        if self._uses_vad:
            now_ms = self._received_samples * 1000 // SAMPLE_RATE
            keep_from = now_ms - HISTORY_KEEP_MS
            if self._open_segment_start is not None:
                keep_from = min(keep_from, self._open_segment_start)
            self._history.discard_before_ms(keep_from)

    async def _finish(self) -> None:
        self._finishing = True
        tail = self._pending.take(self._pending.size)
        if self._models.vad.is_open or self._models.first_pass.is_open or len(tail):
            await self._step(tail, final=True)
        final_result = None
        if self._uses_first_pass:
            text = await self._decode_first_pass(end=True, emit=self.config.mode != "online")
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

    # -- segments ------------------------------------------------------------------------

    async def _close_segment(self, start_ms: int, end_ms: int) -> None:
        if self.config.mode == "2pass":
            await self._decode_first_pass(end=True)
        pcm = self._history.slice_ms(start_ms, end_ms)
        # Started here, not in the job, so the backend has the segment before the stream's
        # next audio (the baseline runs it first, as FunASR's servers do).
        recognition = self._models.start_recognition(pcm, self.config) if len(pcm) else None
        job = asyncio.create_task(self._segment_result(self.config, start_ms, end_ms, recognition, time.monotonic()))
        if recognition is not None:
            # A job cancelled before it ran must still cancel its request.
            job.add_done_callback(lambda _: recognition.cancel())
        if self._finishing:
            self._flush_jobs.append(job)
        else:
            self._delivery.submit(job)

    @staticmethod
    async def _segment_result(config: StreamConfig, start_ms: int, end_ms: int,
                              recognition: asyncio.Future[str] | None, reported_at: float
                              ) -> tuple[dict[str, Any], float]:
        """The segment's message, and when the VAD reported its end."""
        text = await recognition if recognition is not None else ""
        return segment_message(config, text, start_ms, end_ms), reported_at

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
        chunk = self._first_pass_chunk if self._models.first_pass.is_open else self.config.first_pass_chunk_samples
        while self._first_pass_buffer.size >= chunk:
            texts.append(await self._first_pass(self._first_pass_buffer.take(chunk), end=False, emit=emit))
            chunk = self._first_pass_chunk
        if end and (self._models.first_pass.is_open or self._first_pass_buffer.size):
            rest = self._first_pass_buffer.take(self._first_pass_buffer.size)
            texts.append(await self._first_pass(rest, end=True, emit=emit))
        return "".join(texts)

    async def _first_pass(self, pcm: np.ndarray, end: bool, emit: bool) -> str:
        if not self._models.first_pass.is_open:
            self._first_pass_chunk = self.config.first_pass_chunk_samples
        text = await self._models.first_pass.step(pcm, self.config, end=end)
        completed_at = self._arrival_of(self._received_samples - self._first_pass_buffer.size)
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
