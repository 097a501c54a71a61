"""The Nano's LLM in int8 for torch generation (engine torch, on a CPU).

Engine auto generates int8 here wherever its steps run in C, and on a CPU without VNNI, where
vLLM's int8 kernels are slow (second_pass.precision.torch_generation_is_faster). The layers are
tokenwise_int8's: int8 weights per output channel as in vLLM's int8 export, but on 63 levels
where AVX2 needs them, activations quantized per token as vLLM's W8A8 does. It takes the same
decoder projections as that export (INT8_LINEARS), plus the output head, whose 151,936 rows are
a quarter of the LLM's weights and, in float32, half of a decode step's memory traffic.
Everything else runs in float32.

The projections that take one same input run as one product (SHARED_INPUT_LAYERS), as vLLM
fuses them: a decode step multiplies one row per segment, so each call's fixed cost (the
per-token quantization's small operations) weighs on it as much as the weights do.

The layers run on the project's compiled kernel (fbgemm's recipe and bits, in C) where it
compiles, so that native_decode can run whole decode steps in C over the same weights; on
fbgemm otherwise.
"""

from __future__ import annotations

import torch

from twopass_asr.kernels.decode_step import decode_step_library
from twopass_asr.kernels.tokenwise_int8 import fuse_shared_input_layers, replace_linear_layers
from twopass_asr.second_pass.llm_export import INT8_LINEARS

OUTPUT_HEAD = "lm_head"
# Per Qwen3 decoder layer: the sub-module, and its projections that its forward applies to one input.
SHARED_INPUT_LAYERS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def llm_int8_kernel() -> str:
    """The kernel of the torch int8 LLM's layers: compiled where decode_step.c compiles, else
    fbgemm."""
    return "fbgemm" if decode_step_library() is None else "compiled"


def quantize_llm_for_torch(llm: torch.nn.Module, kernel: str | None = None) -> None:
    """Replace, in place, the decoder projections and the output head of a float32 Qwen3
    causal LM by int8 layers (TokenwiseInt8Linear, TokenwiseInt8Slice where they share an
    input) on `kernel` (fbgemm or compiled; None: llm_int8_kernel()); the input embeddings
    (tied to the head in Qwen3) stay float32 for building prompts."""
    kernel = llm_int8_kernel() if kernel is None else kernel
    for layer in llm.model.layers:
        for module_name, names in SHARED_INPUT_LAYERS.items():
            fuse_shared_input_layers(getattr(layer, module_name), names, kernel)
    replace_linear_layers(llm, is_int8_layer, kernel)


def is_int8_layer(name: str) -> bool:
    """Whether the LLM's linear layer of this name runs in int8 on torch."""
    return name.rpartition(".")[2] in INT8_LINEARS or name == OUTPUT_HEAD


__all__ = ["OUTPUT_HEAD", "SHARED_INPUT_LAYERS", "is_int8_layer", "llm_int8_kernel", "quantize_llm_for_torch"]
