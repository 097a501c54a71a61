"""Fun-ASR-Nano's LLM on vLLM's async engine, fed with the prompt embeddings NanoRecognizer
builds (FunASR's own prompt and audio splice), and the choice between vLLM and torch.

Greedy decoding on the same weights in float32 gives the torch path's tokens; vLLM's
incremental detokenizer gives the text in deltas, cleaned as FunASRNano.inference_llm
cleans the whole response (see ResponseTextStream).
"""

from __future__ import annotations

import asyncio
import json
import locale
import logging
import os
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Mapping

import torch

from twopass_asr.kernels.cpu_features import amx_tiles_refused
from twopass_asr.second_pass.llm_export import CONFIG_FILE, export_llm_dir
from twopass_asr.second_pass.precision import (TORCH_DTYPES, torch_generation_is_faster, torch_generation_runs,
                                                vllm_dtype)
from twopass_asr.second_pass.recognizer import SILENCE_MARK, NanoRecognizer, clean_response
from twopass_asr.serving.placement import physical_gpu

ENGINES = ("vllm", "auto", "torch")
ENGINE_ENV = "TWOPASS_ASR_LLM_ENGINE"
# Logged by the Triton model when a client's cancellation stops a request mid-generation.
CANCELLED_IN_ENGINE = "request cancelled by its client while generating: aborted in vLLM"
log = logging.getLogger(__name__)

# Engine settings per device, overridable by `vllm_<name>` model parameters (like the
# model.json of Triton's vllm_backend). On CPU an empty kv_cache_gib sizes the KV cache for
# max_model_len tokens in the engine's dtype (EngineSettings.kv_cache_size): one sequence that
# long, or 5 of a 60 s segment generating the full 256-token cap (~410 tokens each), or ~25 of
# a 10 s segment of real speech (~80); more wait for room. On a GPU vLLM sizes it from a memory
# share. Both compile the model (torch.compile; CUDA graphs on a GPU), which generates faster
# for a slower engine start (vllm_enforce_eager=true starts fast; perf/RESULTS.md, 2026-11-29
# later). The precision is the model's own setting (precision.py).
PRESETS: dict[str, dict[str, str]] = {
    "cpu": {"max_num_seqs": "16", "max_model_len": "2048", "kv_cache_gib": "",
            "gpu_memory_utilization": "", "enforce_eager": "false"},
    "cuda": {"max_num_seqs": "64", "max_model_len": "4096", "kv_cache_gib": "",
             "gpu_memory_utilization": "0.35", "enforce_eager": "false"},
}


class EngineUnavailable(RuntimeError):
    """vLLM cannot serve this model here; the message says why."""


def engine_mode(configured: str | None) -> str:
    """vllm / auto / torch, from TWOPASS_ASR_LLM_ENGINE or the `engine` parameter."""
    mode = (os.environ.get(ENGINE_ENV) or configured or "auto").strip().lower()
    if mode not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)} (parameter `engine` or "
                         f"${ENGINE_ENV}), got {mode!r}")
    return mode


@dataclass(frozen=True)
class EngineSettings:
    max_num_seqs: int
    max_model_len: int
    kv_cache_bytes: int | None
    gpu_memory_utilization: float | None
    enforce_eager: bool
    precision: str  # resolved: fp32, bf16, fp16 or int8
    on_cpu: bool

    @classmethod
    def from_parameters(cls, device: str, params: Mapping[str, str], precision: str) -> "EngineSettings":
        """Each setting from its `vllm_<name>` parameter, else the device's preset."""
        preset = PRESETS["cpu" if device == "cpu" else "cuda"]
        value = {name: (params.get(f"vllm_{name}") or default) for name, default in preset.items()}
        try:
            settings = cls(
                max_num_seqs=int(value["max_num_seqs"]),
                max_model_len=int(value["max_model_len"]),
                kv_cache_bytes=int(float(value["kv_cache_gib"]) * 2**30) if value["kv_cache_gib"] else None,
                gpu_memory_utilization=(float(value["gpu_memory_utilization"])
                                        if value["gpu_memory_utilization"] else None),
                enforce_eager=value["enforce_eager"].lower() in ("1", "true", "yes"),
                precision=precision,
                on_cpu=device == "cpu",
            )
        except ValueError as exc:
            raise ValueError(f"invalid vllm_* model parameter: {exc}") from exc
        if settings.max_num_seqs < 1 or settings.max_model_len < 1:
            raise ValueError("vllm_max_num_seqs and vllm_max_model_len must be positive")
        return settings

    def kv_cache_size(self, llm_config: Mapping) -> int | None:
        """Bytes of vLLM's KV cache for the LLM of this Hugging Face config: kv_cache_gib if
        set; else on a CPU room for max_model_len tokens (keys and values of every layer in the
        engine's dtype) and an eighth more, as vLLM's blocks take a little more per token than
        that and it refuses to start without room for one max_model_len sequence; else None,
        vLLM's own choice."""
        if self.kv_cache_bytes is not None or not self.on_cpu:
            return self.kv_cache_bytes
        head_dim = llm_config.get("head_dim") or llm_config["hidden_size"] // llm_config["num_attention_heads"]
        per_token = (2 * llm_config["num_hidden_layers"] * llm_config["num_key_value_heads"] * head_dim
                     * TORCH_DTYPES[self.precision].itemsize)
        return self.max_model_len * per_token * 9 // 8


def prepare_process_for_vllm() -> None:
    """What vLLM needs from the hosting process before it is imported."""
    # Triton's Python stub runs with the ASCII C locale; torch._inductor (imported by vLLM)
    # then fails to read its UTF-8 sources.
    try:
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    except locale.Error:
        pass
    # Bind vLLM's threads to every core instead of keeping one back for its own bookkeeping.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def use_gpu_in_engine_processes(device: str) -> None:
    """vLLM computes on the first GPU its processes see: make that `device` (cuda:N of this
    process, e.g. the GPU Triton placed the instance on) for the processes it starts. CUDA
    starts here first, so this process keeps seeing the GPUs it saw."""
    torch.cuda.init()
    os.environ["CUDA_VISIBLE_DEVICES"] = physical_gpu(device, os.environ.get("CUDA_VISIBLE_DEVICES"))


class ResponseTextStream:
    """Cleans streamed response text exactly as clean_response cleans the whole of it.

    Text that a later delta could still change (a trailing partial silence mark) is held
    back; everything emitted is a prefix of clean_response(whole response)."""

    def __init__(self):
        self._raw = ""
        self._sent = 0

    def feed(self, delta: str) -> str:
        self._raw += delta
        stable = self._raw
        for keep in range(len(SILENCE_MARK) - 1, 0, -1):
            if stable.endswith(SILENCE_MARK[:keep]):
                stable = stable[:-keep]
                break
        return self._emit(clean_response(stable))

    def finish(self) -> str:
        return self._emit(clean_response(self._raw))

    def _emit(self, cleaned: str) -> str:
        new = cleaned[self._sent:]
        self._sent = len(cleaned)
        return new


class VllmNanoEngine:
    """An AsyncLLM on the Nano's LLM (exported once into a vLLM directory). Its output
    handler starts on the event loop of the first `stream` call; later calls must come from
    that same loop (tritonserver's stub runs every async execute on one loop)."""

    def __init__(self, recognizer: NanoRecognizer, settings: EngineSettings):
        prepare_process_for_vllm()
        if settings.on_cpu and TORCH_DTYPES[settings.precision] == torch.bfloat16 and amx_tiles_refused():
            # vLLM takes its AMX attention in bf16 by the CPU's flags alone; its worker then dies at
            # the first request (perf/RESULTS.md, 2026-12-06, session 32).
            raise EngineUnavailable(f"vLLM's CPU attention in {settings.precision} would use AMX tiles, which "
                                    "this CPU lists but Linux refuses this process (an old kernel, or a "
                                    "container or seccomp filter withholding them)")
        if recognizer.kwargs.get("llm_kwargs"):
            raise EngineUnavailable("the model's llm_kwargs (extra generation arguments) have no vLLM "
                                    f"equivalent here: {recognizer.kwargs['llm_kwargs']!r}")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import RequestOutputKind, SamplingParams
            from vllm.v1.engine.async_llm import AsyncLLM
        except Exception as exc:  # ImportError, or a broken install failing inside its imports
            raise EngineUnavailable(f"vLLM cannot be imported: {type(exc).__name__}: {exc}") from exc
        self.settings = settings
        self.max_new_tokens = recognizer.max_new_tokens
        try:
            self.llm_dir = export_llm_dir(recognizer.model_dir, recognizer.llm_dir, int8=settings.precision == "int8")
        except OSError as exc:
            raise EngineUnavailable(f"cannot export the LLM into a vLLM directory: {exc}") from exc
        kv_cache_bytes = settings.kv_cache_size(json.loads((self.llm_dir / CONFIG_FILE).read_text(encoding="utf-8")))
        args = AsyncEngineArgs(
            model=str(self.llm_dir),
            tokenizer=str(self.llm_dir),
            dtype=vllm_dtype(settings.precision),
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            enable_prompt_embeds=True,
            seed=0,
            **({"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes else {}),
            **({"gpu_memory_utilization": settings.gpu_memory_utilization}
               if settings.gpu_memory_utilization else {}),
        )
        try:
            self.engine = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise EngineUnavailable(f"vLLM engine failed to start: {type(exc).__name__}: {exc}") from exc
        self._sampling = SamplingParams(
            temperature=0.0, max_tokens=self.max_new_tokens, skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
        )
        self._dtype = TORCH_DTYPES[settings.precision]

    async def stream(self, embeds: torch.Tensor, request_id: str | None = None,
                     max_tokens: int | None = None) -> AsyncIterator[tuple[str, bool]]:
        """(cleaned text delta, is_last) for one prompt ([tokens, hidden]), at most max_tokens
        (default: the recognizer's max_new_tokens); the last delta may be empty. Closing the
        iterator before the last delta aborts the request in the engine."""
        request_id = request_id or uuid.uuid4().hex
        sampling = self._sampling
        if max_tokens is not None and max_tokens != sampling.max_tokens:
            sampling = sampling.clone()
            sampling.max_tokens = max_tokens
        cleaner = ResponseTextStream()
        prompt = self._prompt(embeds)
        finished = False
        try:
            async for output in self.engine.generate(prompt, sampling, request_id):
                finished = output.finished
                delta = cleaner.feed(output.outputs[0].text if output.outputs else "")
                if finished:
                    yield delta + cleaner.finish(), True
                elif delta:
                    yield delta, False
        finally:
            if not finished:
                await self.engine.abort(request_id)

    def _prompt(self, embeds: torch.Tensor) -> dict:
        """vLLM's prompt for prompt embeddings [tokens, hidden], in the engine's dtype."""
        return {"prompt_embeds": embeds.detach().to("cpu", self._dtype).contiguous()}

    async def next_tokens(self, prompts: list[torch.Tensor]) -> list[int]:
        """The greedy next token of each prompt, all in flight together: teacher forcing, to
        compare a precision's choices with another's at every position."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        sampling = SamplingParams(temperature=0.0, max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(embeds: torch.Tensor) -> int:
            async for output in self.engine.generate(self._prompt(embeds), sampling, uuid.uuid4().hex):
                if output.finished:
                    return output.outputs[0].token_ids[0]
            raise RuntimeError("vLLM finished no request")

        return list(await asyncio.gather(*(one(embeds) for embeds in prompts)))

    def shutdown(self) -> None:
        # Cancel the output handler first: shutting the core down under it logs EngineDeadError.
        from vllm.utils.async_utils import cancel_task_threadsafe

        handler = getattr(self.engine, "output_handler", None)
        if handler is not None:
            cancel_task_threadsafe(handler)
            self.engine.output_handler = None
        self.engine.shutdown()
        # Dropped now: collected at interpreter exit, AsyncLLM.__del__ shuts down again with
        # its module globals already gone and prints a TypeError.
        del self.engine


def start_engine(mode: str, recognizer: NanoRecognizer, device: str, params: Mapping[str, str], precision: str,
                 warn: Callable[[str], None] = log.warning) -> VllmNanoEngine | None:
    """The vLLM engine, in `precision` (resolved), for mode vllm (EngineUnavailable if it
    cannot start) or auto (None after one warning if it cannot start); None for torch, and for
    auto where torch generates faster in `precision`. A precision only vLLM decodes in on
    `device` needs it: ValueError with mode torch, EngineUnavailable when it cannot start."""
    if mode == "torch":
        if not torch_generation_runs(precision, device):
            raise ValueError(f"precision {precision} on {device} runs on vLLM only: set engine vllm or auto")
        return None
    if mode == "auto" and torch_generation_is_faster(precision, device):
        return None
    settings = EngineSettings.from_parameters(device, params, precision)
    if device != "cpu":
        use_gpu_in_engine_processes(device)
    try:
        return VllmNanoEngine(recognizer, settings)
    except EngineUnavailable as exc:
        if mode == "vllm" or not torch_generation_runs(precision, device):
            raise
        warn(f"vLLM unavailable, falling back to torch generation: {exc}")
        return None


__all__ = ["CANCELLED_IN_ENGINE", "ENGINES", "ENGINE_ENV", "EngineSettings", "EngineUnavailable",
           "ResponseTextStream", "VllmNanoEngine", "engine_mode", "prepare_process_for_vllm", "start_engine"]
