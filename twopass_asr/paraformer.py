"""Streaming Paraformer (first pass): decode options and the serving engine, which advances
the chunks of many streams (one worker's pass) in one batched forward pass over FunASR's
ParaformerStreaming weights (twopass_asr.batched_paraformer; output identical to FunASR's
per-stream generate)."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from twopass_asr.audio import pcm16_to_float
from twopass_asr.batched_paraformer import BatchedParaformerStream as ParaformerStream
from twopass_asr.batched_paraformer import BatchedStreamingParaformer


@dataclass(frozen=True)
class DecodeOptions:
    chunk_size: tuple[int, int, int] = (0, 10, 5)
    encoder_look_back: int = 4
    decoder_look_back: int = 1

    def __post_init__(self):
        if len(self.chunk_size) != 3 or any(int(v) != v for v in self.chunk_size):
            raise ValueError(f"chunk_size must be three integers, got {list(self.chunk_size)}")
        if self.chunk_size[0] < 0 or not 1 <= self.chunk_size[1] <= 100 or not 0 <= self.chunk_size[2] <= 100:
            raise ValueError(
                f"chunk_size {list(self.chunk_size)} out of range: expected [>=0, 1..100, 0..100] (units of 60 ms)"
            )
        for name in ("encoder_look_back", "decoder_look_back"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be between 0 and 100 chunks, got {getattr(self, name)}")


class StreamingParaformer(BatchedStreamingParaformer):
    def new_stream(self, options: DecodeOptions = DecodeOptions()) -> ParaformerStream:
        return super().new_stream(options)


@dataclass
class ReferenceStream:
    options: DecodeOptions
    cache: dict = field(default_factory=dict)


class ReferenceStreamingParaformer:
    """FunASR's own AutoModel.generate, one stream at a time: the per-stream approach the
    batched engine replaces, served only so benchmarks can compare the two (engine
    parameter `funasr` of the paraformer_streaming model). generate keeps each call's
    options in its AutoModel, so `copies` AutoModels serve that many calls at once."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", copies: int = 1):
        from funasr import AutoModel

        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(copies):
            self._idle.put(AutoModel(model=str(model_dir), device=device, disable_update=True, disable_pbar=True,
                                     disable_log=True, ncpu=torch.get_num_threads()))

    def new_stream(self, options: DecodeOptions = DecodeOptions()) -> ReferenceStream:
        return ReferenceStream(options)

    def process_batch(self, streams: list[ReferenceStream], chunks: list[np.ndarray], finals: list[bool]) -> list[str]:
        automodel = self._idle.get()
        try:
            texts = []
            for stream, chunk, is_final in zip(streams, chunks, finals):
                opts = stream.options
                result = automodel.generate(
                    input=pcm16_to_float(chunk), cache=stream.cache, is_final=is_final,
                    chunk_size=list(opts.chunk_size), encoder_chunk_look_back=opts.encoder_look_back,
                    decoder_chunk_look_back=opts.decoder_look_back,
                )
                texts.append(result[0]["text"] if result else "")
            return texts
        finally:
            self._idle.put(automodel)


ENGINES = {"batched": StreamingParaformer, "funasr": ReferenceStreamingParaformer}
