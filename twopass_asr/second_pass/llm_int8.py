"""The Nano's LLM in int8 for torch generation (the fallback engine, on a CPU).

Where vLLM's int8 kernels are slow (a CPU without VNNI: perf/RESULTS.md, 2026-12-03), torch's
own dynamic int8 linear layers (fbgemm) are fast: each layer keeps int8 weights and quantizes
its input at every call. The weights follow the rule of vLLM's int8 export
(llm_export.int8_per_output_channel: per output channel, symmetric, the row's largest
magnitude / 127), for the same decoder projections (INT8_LINEARS), plus the output head,
whose 151,936 rows are a quarter of the LLM's weights and, in float32, half of a decode
step's memory traffic. Activations are quantized per call, to 7-bit uint8 (torch's layer
reduces the range so that AVX2's 16-bit pairwise products cannot saturate), so rows decoded
together share one scale; everything else runs in float32.

torch marks its quantized tensors deprecated (2.13, the pinned version, still has them, and
no other int8 matrix product in torch is fast on a CPU); the tests load this path, so a torch
without it fails them rather than the service.
"""

from __future__ import annotations

import warnings

import torch

from twopass_asr.second_pass.llm_export import INT8_LINEARS, int8_per_output_channel

OUTPUT_HEAD = "lm_head"


def dynamic_int8_linear(linear: torch.nn.Linear) -> torch.nn.Module:
    """`linear` as torch's dynamic int8 layer with int8_per_output_channel's weights."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    weights, scales = int8_per_output_channel(linear.weight)
    rows = weights.shape[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        quantized = torch._make_per_channel_quantized_tensor(weights, scales.reshape(rows).double(),
                                                             torch.zeros(rows, dtype=torch.long), 0)
    layer = DynamicInt8Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None,
                              dtype=torch.qint8)
    layer.set_weight_bias(quantized, None if linear.bias is None else linear.bias.detach().float())
    return layer


def quantize_llm_for_torch(llm: torch.nn.Module) -> int:
    """Replace, in place, the decoder projections and the output head of a float32 Qwen3
    causal LM by dynamic int8 layers; the input embeddings (tied to the head in Qwen3) stay
    float32 for building prompts. Returns how many layers were replaced."""
    replaced = 0
    for name, module in list(llm.named_modules()):
        if type(module) is not torch.nn.Linear or not (name.rpartition(".")[2] in INT8_LINEARS or name == OUTPUT_HEAD):
            continue
        if module.weight.dtype != torch.float32:
            raise ValueError(f"int8 generation quantizes a float32 LLM; {name} is {module.weight.dtype}")
        parent, _, attribute = name.rpartition(".")
        setattr(llm.get_submodule(parent) if parent else llm, attribute, dynamic_int8_linear(module))
        replaced += 1
    return replaced


__all__ = ["OUTPUT_HEAD", "dynamic_int8_linear", "quantize_llm_for_torch"]
