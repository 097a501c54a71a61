"""Reference server for capacity comparisons: the frontend's server (frontend/server.py,
its connection handling and stream pipeline) with the models run the way FunASR's original
single-process websocket servers run them: FunASR AutoModels loaded in-process (a
streaming FSMN-VAD, an online Paraformer, an offline Fun-ASR-Nano) and every model call,
for every stream and segment, made one at a time with AutoModel.generate on one thread.
No batching, no Triton.

    python -m perf.baseline_server --store .model_store-full --port 10096 [--first-pass-precision int8]

--first-pass-precision int8 runs the online Paraformer as FunASR's CPU runtime does by default:
its ONNX runtime (funasr-onnx) on its own int8 export (made at the first start and cached).
That runtime has no encoder or decoder look-back, so a client's look-back is not applied.
No FunASR runtime quantizes the VAD or Fun-ASR-Nano; they stay as above.

Only the backend differs from the service (FunasrBackend here, TritonBackend there), so
the load tool's decode-grid accounting holds for both servers by construction. As in
FunASR's servers, a segment's second pass runs before the stream's next audio.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from frontend.backend import Backend, InferenceError, Result, StreamingModel, StreamModels
from frontend.protocol import StreamConfig
from frontend.server import ServerSettings, run
from twopass_asr.audio import pcm16_to_float
from twopass_asr.first_pass.options import DecodeOptions
from twopass_asr.hotwords import parse_hotwords
from twopass_asr.second_pass.recognizer import generation_cap
from twopass_asr.vad.batched import DEFAULT_VAD_STEP_MS, VadOptions, stream_vad_opts

log = logging.getLogger("perf.baseline_server")

# Fun-ASR-Nano needs at least one 25 ms fbank frame.
MIN_SEGMENT_SAMPLES = 400


class Models:
    """The three FunASR AutoModels and the single thread every call runs on."""

    def __init__(self, store: Path, threads: int, max_new_tokens: int, tokens_per_second: float | None = None,
                 first_pass_precision: str = "fp32"):
        import torch
        from funasr import AutoModel

        from twopass_asr.store.model_store import validate_paraformer_dir, validate_vad_dir
        from twopass_asr.store.nano_dir import validate_nano_dir

        torch.set_num_threads(threads)
        dirs = {name: store / name for name in ("vad", "paraformer_streaming", "funasr_nano")}
        validate_vad_dir(dirs["vad"])
        validate_paraformer_dir(dirs["paraformer_streaming"])
        validate_nano_dir(dirs["funasr_nano"])
        common = {"disable_update": True, "disable_pbar": True, "disable_log": True, "device": "cpu",
                  "ncpu": threads}
        self.vad = AutoModel(model=str(dirs["vad"]), **common)
        # The online Paraformer on one of FunASR's runtimes: its torch AutoModel, or its ONNX runtime.
        self.online = self.online_onnx = None
        if first_pass_precision == "int8":
            from twopass_asr.first_pass.engines import FunasrOnnxStreamingParaformer

            self.online_onnx = FunasrOnnxStreamingParaformer.for_model_dir(dirs["paraformer_streaming"],
                                                                           precision="int8")
        else:
            self.online = AutoModel(model=str(dirs["paraformer_streaming"]), **common)
        self.offline = AutoModel(model=str(dirs["funasr_nano"]), **common)
        # FunASR keeps VAD options on the model object; each call installs its stream's.
        self._vad_defaults = self.vad.model.vad_opts
        # As the service's recognizer: the directory's own cap (config.yaml max_length) still applies.
        self.max_new_tokens = min(max_new_tokens, int(self.offline.kwargs.get("max_length", 512)))
        self.tokens_per_second = tokens_per_second
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="funasr")

    def submit(self, function: Callable[..., Result], *args: Any) -> asyncio.Future[Result]:
        """Queue a model call on the one model thread, behind every call queued before it."""
        return asyncio.get_running_loop().run_in_executor(self.executor, _inference, function, *args)

    def vad_step(self, cache: dict, pcm: np.ndarray, final: bool, config: StreamConfig) -> list[tuple[int, int]]:
        options = VadOptions(config.vad_tail_sil, config.vad_max_len, config.vad_energy)
        self.vad.model.vad_opts = stream_vad_opts(self._vad_defaults, options)
        result = self.vad.generate(input=pcm16_to_float(pcm), cache=cache, is_final=final,
                                   chunk_size=DEFAULT_VAD_STEP_MS, max_end_silence_time=config.vad_tail_sil)
        return [(int(start), int(end)) for start, end in result[0]["value"]] if result else []

    def online_step(self, cache: dict, pcm: np.ndarray, final: bool, config: StreamConfig) -> str:
        if self.online_onnx is not None:
            if "onnx_stream" not in cache:  # a new stream: FunASR's ONNX runtime keeps it in its own object
                options = DecodeOptions(chunk_size=tuple(config.chunk_size), encoder_look_back=0, decoder_look_back=0)
                cache["onnx_stream"] = self.online_onnx.new_stream(options)
            return self.online_onnx.process_batch([cache["onnx_stream"]], [pcm], [final])[0]
        result = self.online.generate(input=pcm16_to_float(pcm), cache=cache, is_final=final,
                                      chunk_size=list(config.chunk_size),
                                      encoder_chunk_look_back=config.encoder_chunk_look_back,
                                      decoder_chunk_look_back=config.decoder_chunk_look_back)
        return result[0]["text"] if result else ""

    def recognize(self, pcm: np.ndarray, config: StreamConfig) -> str:
        if len(pcm) < MIN_SEGMENT_SAMPLES:
            return ""
        language = None if config.svs_lang in ("", "auto") else config.svs_lang
        result = self.offline.generate(input=[pcm16_to_float(pcm)], cache={}, batch_size=1,
                                       hotwords=parse_hotwords(config.hotwords), language=language, itn=config.itn,
                                       max_length=generation_cap(len(pcm), self.max_new_tokens, self.tokens_per_second))
        return result[0]["text"] if result else ""


def _inference(function: Callable[..., Result], *args: Any) -> Result:
    try:
        return function(*args)
    except Exception as exc:  # reported to the client as the service reports a failed model call
        raise InferenceError(f"{function.__name__}: {exc!r}") from exc


class FunasrStreamingModel(StreamingModel[Result]):
    """A FunASR model's cache stands for a Triton sequence: a new one at each start."""

    def __init__(self, stream: FunasrStreamModels, call: Callable[[dict, np.ndarray, bool, StreamConfig], Result]):
        super().__init__()
        self._stream = stream
        self._call = call
        self._cache: dict = {}

    async def _run(self, pcm: np.ndarray, sequence_config: StreamConfig, start: bool, end: bool) -> Result:
        if start:
            self._cache = {}
        return await self._stream.call(self._call, self._cache, pcm, end, sequence_config)


class FunasrStreamModels(StreamModels):
    def __init__(self, models: Models):
        self._models = models
        self._recognition: asyncio.Future[str] | None = None
        self.vad = FunasrStreamingModel(self, models.vad_step)
        self.first_pass = FunasrStreamingModel(self, models.online_step)

    async def call(self, function: Callable[..., Result], *args: Any) -> Result:
        # As in FunASR's servers, the stream's next audio waits for its latest segment's second
        # pass (earlier segments ran before that one on the one model thread).
        if self._recognition is not None:
            await asyncio.wait([self._recognition])
        return await self._models.submit(function, *args)

    def start_recognition(self, pcm: np.ndarray, config: StreamConfig, draft: str = "") -> asyncio.Future[str]:
        # FunASR's runtime has no drafts: it is the baseline as FunASR runs it.
        self._recognition = self._models.submit(self._models.recognize, pcm, config)
        return self._recognition


class FunasrBackend(Backend):
    def __init__(self, models: Models, store: Path):
        self._models = models
        first_pass = ", first pass on FunASR's ONNX runtime in int8" if models.online_onnx is not None else ""
        self.description = f"FunASR in-process, models from {store}{first_pass}"

    def open_stream(self) -> FunasrStreamModels:
        return FunasrStreamModels(self._models)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="model store with vad/, paraformer_streaming/, funasr_nano/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10096)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the model calls")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="cap on second-pass tokens per segment (FunASR's max_length; the service's "
                             "funasr_nano_vllm caps at its max_new_tokens parameter, 256)")
    parser.add_argument("--max-new-tokens-per-second", type=float, default=None,
                        help="also cap each segment at this many tokens per second of its audio, as the "
                             "service's max_new_tokens_per_second does (default: no cap by length)")
    parser.add_argument("--first-pass-precision", choices=("fp32", "int8"), default="fp32",
                        help="fp32: FunASR's torch AutoModel; int8: FunASR's ONNX runtime on its int8 export")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads < 1 or args.max_new_tokens < 1:
        parser.error("--threads and --max-new-tokens must be at least 1")
    if args.max_new_tokens_per_second is not None and not args.max_new_tokens_per_second > 0:
        parser.error("--max-new-tokens-per-second must be positive")
    try:
        models = Models(args.store, args.threads, args.max_new_tokens, args.max_new_tokens_per_second,
                        args.first_pass_precision)
    except Exception as exc:
        log.error("cannot load the models from %s: %s", args.store, exc)
        return 1
    return run(lambda: FunasrBackend(models, args.store), ServerSettings(), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
