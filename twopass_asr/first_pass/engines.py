"""The first pass's engines: the batched engine (twopass_asr.first_pass.batched) and, so that
benchmarks and tests can compare with them, FunASR's own per-stream runtimes: its torch
generate and its ONNX runtime (float32 or int8). ENGINES names those the Triton model's
`engine` parameter takes; each engine's `default_options` are what a stream gets when its
START request names none."""

from __future__ import annotations

import contextlib
import copy
import io
import queue
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from twopass_asr.audio import pcm16_to_float
from twopass_asr.first_pass.batched import BatchedStreamingParaformer
from twopass_asr.first_pass.options import DecodeOptions
from twopass_asr.funasr_classes import funasr_automodel
from twopass_asr.kernels.int8_recipe import describe_int8, resolve_int8_precision
from twopass_asr.store.funasr_onnx_export import cached_paraformer_export, require_export


@dataclass
class ReferenceStream:
    options: DecodeOptions
    cache: dict = field(default_factory=dict)


class ReferenceStreamingParaformer:
    """FunASR's own AutoModel.generate, one stream at a time: the per-stream approach the
    batched engine replaces, served only so benchmarks can compare the two (engine
    parameter `funasr` of the paraformer_streaming model). generate keeps each call's
    options in its AutoModel, so `copies` AutoModels serve that many calls at once."""

    default_options = DecodeOptions()

    def __init__(self, model_dir: str | Path, device: str = "cpu", copies: int = 1):
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(copies):
            self._idle.put(funasr_automodel(model_dir, device=device, disable_update=True, disable_pbar=True,
                                            disable_log=True))

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


@dataclass
class OnnxReferenceStream:
    options: DecodeOptions
    runtime: object  # this stream's funasr_onnx Paraformer: its frontend keeps the stream's audio state
    cache: dict = field(default_factory=dict)


class FunasrOnnxStreamingParaformer:
    """FunASR's ONNX runtime (funasr-onnx's online Paraformer), one stream at a time, on
    FunASR's own export (twopass_asr.store.funasr_onnx_export): the reference for the int8
    first pass (`quantized`) and its float32 twin. That runtime has no encoder or decoder
    look-back, so its streams take both as 0. Streams share the ONNX sessions, so calls for
    different streams may run on several threads at once."""

    default_options = DecodeOptions(encoder_look_back=0, decoder_look_back=0)

    def __init__(self, export_dir: str | Path, quantized: bool, threads: int = 1):
        from funasr_onnx.paraformer_online_bin import Paraformer
        from funasr_onnx.utils.frontend import WavFrontendOnline
        from funasr_onnx.utils.utils import read_yaml

        export_dir = require_export(export_dir, quantized)
        self._quantized = quantized
        with contextlib.redirect_stdout(io.StringIO()):  # funasr-onnx prints its setup
            self._template = Paraformer(str(export_dir), quantize=quantized, intra_op_num_threads=threads)
        frontend_conf = read_yaml(str(export_dir / "config.yaml"))["frontend_conf"]
        # The audio frontend holds a stream's samples: each stream gets its own.
        self._new_frontend = lambda: WavFrontendOnline(cmvn_file=str(export_dir / "am.mvn"), **frontend_conf)

    @classmethod
    def for_model_dir(cls, model_dir: str | Path, device: str = "cpu", precision: str = "int8"
                      ) -> "FunasrOnnxStreamingParaformer":
        """The runtime on FunASR's export of a model directory (made at the first use and
        cached, as for the batched int8 engine), in `precision` (int8, fp32 or auto, as
        resolve_int8_precision decides: int8, FunASR's own CPU default) with torch's thread count
        per call: the Triton model's `funasr_onnx` engine."""
        if device != "cpu":
            raise ValueError(f"FunASR's ONNX runtime runs on the CPU only, got device {device!r}")
        quantized = resolve_int8_precision(precision, device) == "int8"
        return cls(cached_paraformer_export(model_dir), quantized=quantized, threads=torch.get_num_threads())

    @property
    def precision(self) -> str:
        return "int8" if self._quantized else "fp32"

    @property
    def precision_description(self) -> str:
        return describe_int8(self.precision, "onnxruntime" if self._quantized else None)

    def new_stream(self, options: DecodeOptions = default_options) -> OnnxReferenceStream:
        if options.encoder_look_back or options.decoder_look_back:
            raise ValueError("FunASR's ONNX runtime has no encoder or decoder look-back: both must be 0, got "
                             f"{options.encoder_look_back} and {options.decoder_look_back}")
        runtime = copy.copy(self._template)  # shares the ONNX sessions
        runtime.chunk_size = list(options.chunk_size)
        runtime.frontend = self._new_frontend()
        return OnnxReferenceStream(options, runtime)

    def process_batch(self, streams: list[OnnxReferenceStream], chunks: list[np.ndarray],
                      finals: list[bool]) -> list[str]:
        texts = []
        for stream, chunk, is_final in zip(streams, chunks, finals):
            results = stream.runtime(pcm16_to_float(chunk).numpy(),
                                     param_dict={"cache": stream.cache, "is_final": is_final})
            texts.append("".join(result["preds"][0] for result in results))
        return texts


ENGINES = {"batched": BatchedStreamingParaformer, "funasr": ReferenceStreamingParaformer,
           "funasr_onnx": FunasrOnnxStreamingParaformer.for_model_dir}
