"""Streaming Paraformer (first pass): decode options and the serving engine, which advances
all streams of a Triton execute call in one batched forward pass over FunASR's
ParaformerStreaming weights (twopass_asr.batched_paraformer; output identical to FunASR's
per-stream generate)."""

from __future__ import annotations

from dataclasses import dataclass

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
