"""Linear layers with bf16 weights on the project's compiled bf16 product (decode_step.c's
bf16_product.h): float32 in and out, each input row rounded to bf16 and its products with the
weights summed in float, on AVX-512 BF16's dot products or AMX's tiles where the CPU has them
(widened to float elsewhere). The torch bf16 LLM runs on them (second_pass.llm_on_torch), so
that its prefill and decode steps can run in C as a whole over the same weights
(second_pass.native_decode), as the int8 LLM does on tokenwise_int8's compiled kernel.
"""

from __future__ import annotations

import torch

from twopass_asr.kernels.decode_step import CompiledBf16Weights


class CompiledBf16Linear(torch.nn.Module):
    """A float32 linear layer with its weights rounded to bf16, on the compiled bf16 product."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.packed = CompiledBf16Weights(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def weight(self) -> torch.Tensor:
        """The bf16 weights [out_features, in_features]."""
        return self.packed.weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed.product(x.reshape(-1, self.in_features).float())
        y = y if self.bias is None else y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


__all__ = ["CompiledBf16Linear"]
