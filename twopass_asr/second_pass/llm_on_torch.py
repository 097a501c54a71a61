"""The Nano's LLM for generation on torch on a CPU, its decoder projections and output head in
int8 or bf16 (the INT8_LINEARS of the vLLM export, and the head, whose 151,936 rows are a
quarter of the LLM's weights), everything else in float32.

int8: engine auto generates it here wherever its steps run in C, and on a CPU without VNNI,
where vLLM's int8 kernels are slow (second_pass.precision.torch_generation_is_faster). The
layers are tokenwise_int8's: int8 weights per output channel as in vLLM's int8 export, but on 63
levels where AVX2 needs them, activations quantized per token as vLLM's W8A8 does. They run on
the project's compiled kernel (fbgemm's recipe and bits, in C) where it compiles, on fbgemm
otherwise.

bf16: the weights rounded to bf16 (the checkpoint's own precision), each product's input rows
rounded to bf16 and the products summed in float (bf16_linear, in C). The norms, the attention
and the residual stream stay float32, where HF's and vLLM's bf16 models round every activation
to bf16. Where the C does not compile, the LLM runs in torch's bf16 instead (the recognizer's
use_dtype).

On either, native_decode runs whole prefills and decode steps in C over the same weights. The
projections that take one same input run as one product (SHARED_INPUT_LAYERS), as vLLM fuses
them: a decode step multiplies one row per segment, so each call's fixed cost weighs on it as
much as the weights do.
"""

from __future__ import annotations

import torch

from twopass_asr.kernels.bf16_linear import CompiledBf16Linear
from twopass_asr.kernels.decode_step import decode_step_library, require_decode_step_library
from twopass_asr.kernels.layer_replacement import MakeLayer, fuse_shared_input_layers, replace_linear_layers
from twopass_asr.kernels.tokenwise_int8 import TokenwiseInt8Linear
from twopass_asr.second_pass.llm_export import INT8_LINEARS

OUTPUT_HEAD = "lm_head"
# Per Qwen3 decoder layer: the sub-module, and its projections that its forward applies to one input.
SHARED_INPUT_LAYERS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def steps_run_in_c() -> bool:
    """Whether the torch LLM's layers (int8 and bf16) are on the compiled products, its
    prefill and decode steps in C: where decode_step.c compiles."""
    return decode_step_library() is not None


def llm_int8_kernel() -> str:
    """The kernel of the torch int8 LLM's layers: compiled where decode_step.c compiles, else
    fbgemm."""
    return "compiled" if steps_run_in_c() else "fbgemm"


def quantize_llm_for_torch(llm: torch.nn.Module, kernel: str | None = None) -> None:
    """Replace, in place, the decoder projections and the output head of a float32 Qwen3
    causal LM by int8 layers (TokenwiseInt8Linear, SharedInputSlices where they share an input)
    on `kernel` (fbgemm or compiled; None: llm_int8_kernel()); the input embeddings (tied to the
    head in Qwen3) stay float32 for building prompts."""
    kernel = llm_int8_kernel() if kernel is None else kernel
    # Its fused products: oneDNN's dynamic product rounded stacked shapes differently (session 13).
    if kernel not in ("fbgemm", "compiled"):
        raise ValueError(f"the torch int8 LLM runs on fbgemm or the compiled kernel, not {kernel!r}")
    _replace_product_layers(llm, lambda linear: TokenwiseInt8Linear(linear, kernel))


def bf16_llm_for_torch(llm: torch.nn.Module) -> None:
    """Replace, in place, the same layers of a float32 Qwen3 causal LM by CompiledBf16Linear
    ones (SharedInputSlices where they share an input). RuntimeError where decode_step.c does
    not compile."""
    require_decode_step_library()
    _replace_product_layers(llm, CompiledBf16Linear)


def _replace_product_layers(llm: torch.nn.Module, make_layer: MakeLayer) -> None:
    for layer in llm.model.layers:
        for module_name, names in SHARED_INPUT_LAYERS.items():
            fuse_shared_input_layers(getattr(layer, module_name), names, make_layer)
    replace_linear_layers(llm, is_product_layer, make_layer)


def is_product_layer(name: str) -> bool:
    """Whether the LLM's linear layer of this name runs in int8 or bf16 on torch."""
    return name.rpartition(".")[2] in INT8_LINEARS or name == OUTPUT_HEAD


__all__ = ["OUTPUT_HEAD", "SHARED_INPUT_LAYERS", "bf16_llm_for_torch", "is_product_layer", "llm_int8_kernel",
           "quantize_llm_for_torch", "steps_run_in_c"]
