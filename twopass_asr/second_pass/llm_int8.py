"""The Nano's LLM in int8 for torch generation (the fallback engine, on a CPU).

Where vLLM's int8 kernels are slow (a CPU without VNNI: perf/RESULTS.md, 2026-12-03), fbgemm's
int8 product is fast (twopass_asr.kernels.tokenwise_int8: int8 weights per output channel as in
vLLM's int8 export, but on 63 levels where AVX2 needs them, activations quantized per token as
vLLM's W8A8 does). It takes the same decoder
projections as that export (INT8_LINEARS), plus the output head, whose 151,936 rows are a
quarter of the LLM's weights and, in float32, half of a decode step's memory traffic.
Everything else runs in float32.
"""

from __future__ import annotations

import torch

from twopass_asr.kernels.tokenwise_int8 import replace_linear_layers
from twopass_asr.second_pass.llm_export import INT8_LINEARS

OUTPUT_HEAD = "lm_head"


def quantize_llm_for_torch(llm: torch.nn.Module) -> int:
    """Replace, in place, the decoder projections and the output head of a float32 Qwen3
    causal LM by int8 layers (TokenwiseInt8Linear); the input embeddings (tied to the head in
    Qwen3) stay float32 for building prompts. Returns how many layers were replaced."""
    return replace_linear_layers(llm, lambda name: name.rpartition(".")[2] in INT8_LINEARS or name == OUTPUT_HEAD)


__all__ = ["OUTPUT_HEAD", "quantize_llm_for_torch"]
