"""The second pass's precision: one setting for the LLM whichever engine runs it (vLLM, or
the torch fallback) and for the prompt embeddings fed to it.

fp32 is FunASR's own runtime default and what the equivalence tests pin. auto is what a user
wants by default: bf16 where it is fast, the Nano checkpoint's own llm_dtype and what
FunASR's vLLM path decodes in (a GPU, or a CPU with native bf16); on other CPUs int8, the one
precision there that keeps up with speech (float32 serves no real-time 2pass stream on 2 such
cores). int8 gives the LLM's decoder projections int8 weights per output channel (one rule,
kernels.tokenwise_int8.int8_per_output_channel: 127 levels for vLLM, 63 on fbgemm) and quantizes
their inputs at run time. On vLLM it is W8A8 (the project's own export, activations per token,
everything else in bf16); on torch, CPU only, the compiled int8 kernel with activations per
token, the output head too, each prefill and decode step one call into C (llm_on_torch,
native_decode; fbgemm's product and HF's steps where the C does not compile). bf16 on torch on
a CPU is the same with bf16 weights on the compiled bf16 product (torch's own bf16 model where
the C does not compile). Engine auto generates int8 and bf16 on torch wherever those C steps
run, and int8 also where the CPU has no int8 dot products (vLLM's W8A8 is then slower than its
float32): served, vLLM's engine processes cost CPU of their own beside the same products.

The audio encoder and adaptor have a setting of their own, as the first pass: fp32 as FunASR
runs them, int8, or auto (int8 on every CPU, fp32 on a GPU), with int8 on the kernel the CPU is
fast with, chosen as the first pass's (first_pass.native_layers.native_auto_kernel: the compiled
kernel, its layers native, its products on AMX tiles, AVX-512 VNNI, AVX-VNNI or AVX2). bf16
is not offered: it ran them 1.08x float32 where int8 ran 2.4x (perf/RESULTS.md, 2026-12-02,
session 4, and 2026-12-03, session 8).
"""

from __future__ import annotations

import torch

from twopass_asr.kernels.cpu_features import cpu_has_int8_dot_products, cpu_has_native_bf16
from twopass_asr.second_pass.llm_on_torch import steps_run_in_c

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
PRECISION_ENV = "TWOPASS_ASR_SECOND_PASS_PRECISION"
ENCODER_PRECISION_ENV = "TWOPASS_ASR_NANO_ENCODER_PRECISION"
ENCODER_INT8_KERNEL_ENV = "TWOPASS_ASR_NANO_ENCODER_INT8_KERNEL"
# The dtype of the LLM's activations and of the prompt embeddings (int8 on vLLM: of all but
# its linear layers' products; int8 on torch runs in float32 around them, llm_on_torch).
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16}


def resolve_precision(configured: str, device: str, native_bf16: bool | None = None) -> str:
    """fp32, bf16, fp16 or int8 for `configured` (one of PRECISIONS) on `device`. auto: bf16
    on a GPU and on a CPU with native bf16 (native_bf16 None: read from this CPU), int8 on
    other CPUs, where bf16 is emulated (slower than float32) and float32 too slow for real
    time. fp16 is refused on a CPU, where neither engine has fast half-precision kernels."""
    if configured not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {configured!r}")
    on_cpu = device == "cpu"
    if configured == "auto":
        fast_bf16 = not on_cpu or (cpu_has_native_bf16() if native_bf16 is None else native_bf16)
        return "bf16" if fast_bf16 else "int8"
    if configured == "fp16" and on_cpu:
        raise ValueError("precision fp16 runs on a GPU only; on a CPU use bf16 or fp32")
    return configured


def torch_generation_runs(precision: str, device: str) -> bool:
    """Whether the torch fallback decodes in `precision` (resolved) on `device`: int8 on a CPU
    only (its kernels are fbgemm's)."""
    return precision != "int8" or device == "cpu"


def torch_generation_is_faster(precision: str, device: str, int8_dot_products: bool | None = None,
                               c_steps: bool | None = None) -> bool:
    """Whether engine auto should generate on torch rather than vLLM: int8 or bf16 on a CPU
    where torch's prefill and decode steps run in C (c_steps None: where decode_step.c compiles
    here, llm_on_torch.steps_run_in_c), and int8 without int8 dot products (int8_dot_products
    None: read from this CPU), where vLLM's W8A8 kernels are slower than its float32."""
    if precision not in ("int8", "bf16") or device != "cpu":
        return False
    if c_steps is None:
        c_steps = steps_run_in_c()
    if c_steps:
        return True
    return precision == "int8" and not (cpu_has_int8_dot_products() if int8_dot_products is None
                                        else int8_dot_products)


def vllm_dtype(precision: str) -> str:
    """vLLM's name for a resolved precision (its `dtype` engine argument)."""
    return str(TORCH_DTYPES[precision]).removeprefix("torch.")


__all__ = ["ENCODER_INT8_KERNEL_ENV", "ENCODER_PRECISION_ENV", "PRECISIONS", "PRECISION_ENV", "TORCH_DTYPES",
           "resolve_precision", "torch_generation_is_faster", "torch_generation_runs", "vllm_dtype"]
