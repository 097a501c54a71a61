"""Streaming FSMN-VAD, one state per stream, over FunASR's FsmnVADStreaming."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twopass_asr.audio import pcm16_to_float

# FunASR's websocket server feeds its VAD in 60 ms steps; segment times are this granular.
DEFAULT_VAD_STEP_MS = 60


@dataclass(frozen=True)
class VadOptions:
    """Per-stream knobs; None keeps the model's default (for end silence that is FunASR's
    dynamic end-silence schedule)."""

    max_end_silence_ms: int | None = None
    max_segment_ms: int | None = None
    energy_db: float | None = None

    def __post_init__(self):
        for name in ("max_end_silence_ms", "max_segment_ms"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 3_600_000:
                raise ValueError(f"{name} must be between 1 and 3600000 ms, got {value}")
        if self.energy_db is not None and not -200.0 <= self.energy_db <= 100.0:
            raise ValueError(f"energy_db must be between -200 and 100 dB, got {self.energy_db}")


@dataclass
class VadStream:
    options: VadOptions
    vad_opts: Any  # FunASR VADXOptions copy, so knobs never leak between streams
    cache: dict = field(default_factory=dict)


class StreamingVad:
    def __init__(self, model_dir: str | Path, device: str = "cpu", step_ms: int = DEFAULT_VAD_STEP_MS):
        from funasr import AutoModel

        self.automodel = AutoModel(model=str(model_dir), device=device, disable_update=True, disable_pbar=True,
                                   disable_log=True)
        self.step_ms = step_ms
        self._default_opts = copy.deepcopy(self.automodel.model.vad_opts)

    def new_stream(self, options: VadOptions = VadOptions()) -> VadStream:
        opts = copy.deepcopy(self._default_opts)
        if options.max_end_silence_ms is not None:
            opts.max_end_silence_time = options.max_end_silence_ms
        if options.max_segment_ms is not None:
            opts.max_single_segment_time = options.max_segment_ms
        if options.energy_db is not None:
            opts.decibel_thres = options.energy_db
        return VadStream(options=options, vad_opts=opts)

    def process(self, stream: VadStream, pcm: np.ndarray, is_final: bool) -> list[list[int]]:
        """Feed one chunk; returns segment events [[start_ms, end_ms]] with -1 for unknown."""
        # FunASR keeps the options on the model object; give it this stream's copy.
        self.automodel.model.vad_opts = stream.vad_opts
        kwargs = {}
        if stream.options.max_end_silence_ms is not None:
            kwargs["max_end_silence_time"] = stream.options.max_end_silence_ms
        result = self.automodel.generate(
            input=pcm16_to_float(pcm), cache=stream.cache, is_final=is_final, chunk_size=self.step_ms, **kwargs
        )
        return [list(map(int, seg)) for seg in result[0]["value"]]

    def process_batch(self, streams: list[VadStream], chunks: list[np.ndarray], finals: list[bool]) -> list[list[list[int]]]:
        return [self.process(s, c, f) for s, c, f in zip(streams, chunks, finals)]
