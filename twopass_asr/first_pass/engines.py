"""The first pass's engines, by the name the Triton model's `engine` parameter gives: the
batched engine (twopass_asr.first_pass.batched), and FunASR's own per-stream generate, kept
so that benchmarks can compare the two."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from twopass_asr.audio import pcm16_to_float
from twopass_asr.first_pass.batched import BatchedStreamingParaformer
from twopass_asr.first_pass.options import DecodeOptions


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


ENGINES = {"batched": BatchedStreamingParaformer, "funasr": ReferenceStreamingParaformer}
