"""FunASR's int8 recipe, stated once: how its export quantizes a model and where the project
runs a model that way (torch-free, so the settings' checks import nothing heavy).

FunASR's export (funasr/utils/export_utils.py) quantizes with onnxruntime's dynamic
quantization: every MatMul with a constant weight, weights per output channel as QUInt8,
reduce_range off, activations quantized per call; MatMuls whose node name contains
"output", "bias_encoder" or "bias_decoder" stay in float.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from twopass_asr.kernels.cpu_features import cpu_has_int8_dot_products

# Layers whose name contains one of these stay in float.
FLOAT_LAYER_MARKS = ("output", "bias_encoder", "bias_decoder")
# A model on the recipe computes in float32, in int8, or auto (resolve_int8_recipe_precision).
INT8_RECIPE_PRECISIONS = ("auto", "fp32", "int8")


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


def resolve_int8_recipe_precision(configured: str, device: str, int8_dot_products: bool | None = None) -> str:
    """fp32 or int8 for `configured` (one of INT8_RECIPE_PRECISIONS). auto: int8 on a CPU with
    AVX-512 VNNI or AMX int8 dot products (int8_dot_products None: read from this CPU), where the
    first pass ran 1.6-1.95x its float32 engine and the Nano's audio encoder 2.4x; fp32 elsewhere:
    on AVX2 alone the int8 layers lose as soon as work is batched (first pass 0.69-0.86x float32
    at 4-16 streams, audio encoder 0.69-0.84x at 4-8 segments; perf/RESULTS.md, 2026-12-02).
    int8 asked for on a GPU is refused: those kernels are CPU ones."""
    if configured not in INT8_RECIPE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(INT8_RECIPE_PRECISIONS)}, got {configured!r}")
    if device != "cpu":
        if configured == "int8":
            raise ValueError(f"precision int8 runs on onnxruntime's CPU kernels, not on {device}; use fp32 or auto")
        return "fp32"
    if configured != "auto":
        return configured
    return "int8" if (cpu_has_int8_dot_products() if int8_dot_products is None else int8_dot_products) else "fp32"


__all__ = ["FLOAT_LAYER_MARKS", "INT8_RECIPE_PRECISIONS", "quantize_dynamic_arguments", "quiet_quantizer",
           "resolve_int8_recipe_precision", "stays_float"]
