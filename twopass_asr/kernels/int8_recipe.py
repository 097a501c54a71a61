"""FunASR's int8 recipe, stated once: how its export quantizes a model, and where and on which
kernel the project runs a model in int8 (torch-free, so the settings' checks import nothing
heavy).

FunASR's export (funasr/utils/export_utils.py) quantizes with onnxruntime's dynamic
quantization: every MatMul with a constant weight, weights per output channel as QUInt8,
reduce_range off, activations quantized per call; MatMuls whose node name contains
"output", "bias_encoder" or "bias_decoder" stay in float.

The project's int8 models (the first pass, the Nano's audio encoder) run on one of four
kernels: onnxruntime, the recipe itself (twopass_asr.kernels.int8_linear); or an int8 product
with activations per token (twopass_asr.kernels.tokenwise_int8): torch's on oneDNN, torch's on
fbgemm, or the project's own in C ("compiled", fbgemm's recipe and bits, on AMX tiles, AVX-512
VNNI, AVX-VNNI or AVX2, whichever the CPU has first). auto takes a per-token one: the compiled
kernel for a model that runs its layers natively on it (the first pass's encoder and decoder,
the Nano's audio encoder: twopass_asr.first_pass.native_layers) where its build uses the CPU's
int8 dot products or the CPU has none; otherwise oneDNN on AMX and fbgemm elsewhere (held to
AVX-512 VNNI, oneDNN took its reference kernel for these products: 2026-12-06, session 30).
Without dot products onnxruntime's int8 layers ran 0.7-1.2x float32 and fbgemm's 1.3-1.8x
(perf/RESULTS.md, 2026-12-03, sessions 7 to 9); with AMX the first pass on oneDNN served 42
real-time streams through tritonserver against onnxruntime's 17 (which holds the GIL around each
call) and the audio encoder ran 1.0-1.2x onnxruntime's (2026-12-04, session 13); the first pass's
native encoder layers on AVX2 alone: 2026-12-05, session 24; on AMX tiles: 2026-12-06, session
28; in tile order on AVX2 and AVX-VNNI: 2026-12-06, session 31.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

from twopass_asr.kernels.cpu_features import cpu_has_amx_int8, cpu_has_int8_dot_products

# Layers whose name contains one of these stay in float.
FLOAT_LAYER_MARKS = ("output", "bias_encoder", "bias_decoder")
# An int8-capable model computes in float32, in int8, or auto (resolve_int8_precision).
INT8_PRECISIONS = ("auto", "fp32", "int8")
# Where int8 runs (choose_int8_kernel); auto: the one this CPU is fast with.
INT8_KERNELS = ("onnxruntime", "fbgemm", "onednn", "compiled")
INT8_KERNEL_CHOICES = ("auto", *INT8_KERNELS)


def quantize_dynamic_arguments() -> dict:
    """onnxruntime's quantize_dynamic keyword arguments for the recipe (bar the excluded nodes)."""
    from onnxruntime.quantization import QuantType

    return {"op_types_to_quantize": ["MatMul"], "per_channel": True, "reduce_range": False,
            "weight_type": QuantType.QUInt8}


@contextlib.contextmanager
def quiet_quantizer(level: int = logging.ERROR) -> Iterator[None]:
    """Within: the root logger at `level` at least. onnxruntime's quantizer logs lines per node
    on it (advice to pre-process, the parameters it derives); the result is checked instead."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(level, previous))
    try:
        yield
    finally:
        root.setLevel(previous)


def stays_float(layer_name: str) -> bool:
    return any(mark in layer_name for mark in FLOAT_LAYER_MARKS)


def resolve_int8_precision(configured: str, device: str) -> str:
    """fp32 or int8 for `configured` (one of INT8_PRECISIONS). auto: int8 on a CPU (on the
    kernel choose_int8_kernel picks, faster than float32 on every CPU measured), fp32 on a GPU.
    int8 asked for on a GPU is refused: both kernels are CPU ones."""
    if configured not in INT8_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(INT8_PRECISIONS)}, got {configured!r}")
    if device != "cpu":
        if configured == "int8":
            raise ValueError(f"precision int8 runs on CPU kernels ({', '.join(INT8_KERNELS)}), not on {device}; "
                             "use fp32 or auto")
        return "fp32"
    return "int8" if configured == "auto" else configured


def _runs_with(kernel: str, amx_int8: bool) -> bool:
    """Whether `kernel` may run on a CPU with (or without) AMX int8: onednn needs it."""
    return kernel != "onednn" or amx_int8


def default_auto_kernel(int8_dot_products: bool) -> str:
    """auto's kernel for a model with no choice of its own: onednn on AMX int8 (which has int8 dot
    products), else fbgemm (with VNNI kernels of its own)."""
    return "onednn" if int8_dot_products and cpu_has_amx_int8() else "fbgemm"


def choose_int8_kernel(requested: str, setting: str = "int8_kernel", int8_dot_products: bool | None = None,
                       auto_kernel: Callable[[bool], str] = default_auto_kernel) -> str:
    """The int8 kernel for `requested` (one of INT8_KERNEL_CHOICES; `setting` names it in the
    error). auto: what `auto_kernel` says for a CPU with or without int8 dot products (AVX-512
    VNNI or AMX) (int8_dot_products None: read from this CPU); a model faster on another kernel than
    default_auto_kernel's passes its own. onednn asked for on a CPU without AMX int8 is refused."""
    if requested not in INT8_KERNEL_CHOICES:
        raise ValueError(f"{setting} must be one of {', '.join(INT8_KERNEL_CHOICES)}, got {requested!r}")
    if not _runs_with(requested, cpu_has_amx_int8()):
        # Without VNNI oneDNN adds pairs of products in 16 bits, which its 127 weight levels overflow;
        # with VNNI alone it ran these layers on its reference kernel.
        raise ValueError(f"{setting} onednn needs AMX int8 tiles (a CPU with them, which Linux grants this process); "
                         "without them oneDNN's int8 product of these layers overflows (AVX2) or takes its reference "
                         "kernel, over 100x slower (AVX-512 VNNI): use compiled, fbgemm or auto")
    dot_products = cpu_has_int8_dot_products() if int8_dot_products is None else int8_dot_products
    return auto_kernel(dot_products) if requested == "auto" else requested


def int8_kernels_on_this_cpu() -> tuple[str, ...]:
    """The INT8_KERNELS this CPU runs (onednn needs AMX int8)."""
    amx_int8 = cpu_has_amx_int8()
    return tuple(kernel for kernel in INT8_KERNELS if _runs_with(kernel, amx_int8))


def resolve_int8_setting(precision: str, kernel: str, device: str, kernel_setting: str = "int8_kernel",
                         auto_kernel: Callable[[bool], str] = default_auto_kernel) -> tuple[str, str | None]:
    """A model's precision and int8 kernel settings, resolved on `device`: (fp32 or int8, the
    kernel in int8 or None in fp32). The kernel is checked either way (choose_int8_kernel; a
    model's own auto_kernel, which may compile code, is only asked in int8)."""
    resolved = resolve_int8_precision(precision, device)
    chosen = choose_int8_kernel(kernel, kernel_setting,
                                auto_kernel=auto_kernel if resolved == "int8" else default_auto_kernel)
    return resolved, chosen if resolved == "int8" else None


def describe_int8(precision: str, kernel: str | None) -> str:
    """What a load logs: "fp32", "int8 on fbgemm"."""
    return precision + (f" on {kernel}" if kernel else "")


__all__ = ["FLOAT_LAYER_MARKS", "INT8_KERNELS", "INT8_KERNEL_CHOICES", "INT8_PRECISIONS", "choose_int8_kernel",
           "default_auto_kernel", "describe_int8", "int8_kernels_on_this_cpu", "quantize_dynamic_arguments",
           "quiet_quantizer", "resolve_int8_precision", "resolve_int8_setting", "stays_float"]
