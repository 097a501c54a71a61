"""Where a stream's model calls go: the interface the stream pipeline (session.py) drives.

The service implements it with Triton over gRPC (triton_client.TritonBackend) and the
capacity baseline with FunASR models in-process (perf/baseline_server.FunasrBackend), so
that both run the same pipeline and the same connection handling and differ only in where
the compute happens.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import numpy as np

from frontend.protocol import StreamConfig

Result = TypeVar("Result")


class InferenceError(Exception):
    """A model call failed (the models answered with an error, or could not be asked)."""


class BackendLost(InferenceError):
    """The inference server under a stream is gone: unreachable, shutting down, or silent for
    longer than a step may take. Another server may take the stream over (StreamModels.move)."""


class StreamingModel(ABC, Generic[Result]):
    """One streaming model (VAD, first pass) as one stream uses it: successive sequences,
    one open at a time, each keeping the model's state from one step to the next."""

    def __init__(self):
        self._sequence_config: StreamConfig | None = None

    @property
    def is_open(self) -> bool:
        """A sequence was started and not ended yet."""
        return self._sequence_config is not None

    async def step(self, pcm: np.ndarray, config: StreamConfig, end: bool) -> Result:
        """Feed 16 kHz audio. With no sequence open this starts one, whose options are taken
        from `config` now and kept until it ends; `end` ends it after this audio."""
        start = self._sequence_config is None
        if start:
            self._sequence_config = config
        result = await self._run(pcm, self._sequence_config, start, end)
        if end:
            self._sequence_config = None
        return result

    @abstractmethod
    async def _run(self, pcm: np.ndarray, sequence_config: StreamConfig, start: bool, end: bool) -> Result:
        """One step on the model; `start` begins a new sequence, `end` finishes it."""

    async def close(self) -> None:
        """The stream is done (its final message went out)."""

    async def abort(self) -> None:
        """The client vanished: end an open sequence so the model frees its state."""


class StreamModels(ABC):
    """The three models as one stream uses them."""

    vad: StreamingModel[list[tuple[int, int]]]  # VAD events (start_ms, end_ms), -1 where not known yet
    first_pass: StreamingModel[str]  # the text recognised for the audio of the step
    # Whether a segment's second pass may start before the first pass has decoded the audio
    # that closed the segment and flushed its tail: so where the two passes run side by side
    # (separate models), not where they take turns on one model thread (FunASR's own servers
    # decode and flush, then recognise the segment).
    second_pass_beside_first_pass = False

    @abstractmethod
    def start_recognition(self, pcm: np.ndarray, config: StreamConfig, draft: str = "") -> asyncio.Future[str]:
        """Start the second pass of one segment now; cancelling the future cancels it. draft:
        the first pass's text of the segment, which may speed up the second pass where it
        takes drafts (twopass_asr/second_pass/drafts.py); the text it gives stays the same."""

    async def move(self) -> bool:
        """After BackendLost: go on on another inference server. Later calls go there, and
        every sequence starts afresh (none is open). False when no other server is ready."""
        return False

    async def close(self) -> None:
        await self.vad.close()
        await self.first_pass.close()

    async def abort(self) -> None:
        await asyncio.gather(self.vad.abort(), self.first_pass.abort())


class Backend(ABC):
    """What the server shares between its connections to reach the models."""

    description: str  # where the compute happens, for the log

    @abstractmethod
    def open_stream(self) -> StreamModels:
        """The models for one new stream; nothing is asked of them before its first audio."""

    async def readiness(self) -> dict[str, bool]:
        """Whether each inference server behind this backend is ready to serve all the
        models, by name. In-process models are ready once loaded."""
        return {"in-process": True}

    async def close(self) -> None:
        """The server stopped: release what reaches the models."""
