"""Linear layers whose float32 weights are reordered once for oneDNN, for CPU inference.

torch's `nn.Linear` on CPU calls MKL's sgemm, which packs the weight anew on every call.
With the few rows a streaming step has (tens of frames, a handful of streams) that packing
is a large part of the product: on our 2-core AVX2 machine the full-size first pass ran
1.04-1.19x faster on one thread (1.15-1.38x on two) with the weights reordered once at load
(perf/README.md). Results differ from nn.Linear only by float32 summation order, as between
any two GEMM kernels.
"""

from __future__ import annotations

import torch

# oneDNN picks the reordered layout for a typical row count; any other count still works.
DEFAULT_ROWS_HINT = 32


def prepacking_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PrepackedLinear(torch.nn.Module):
    """nn.Linear's forward over a weight held in oneDNN's blocked layout."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int = DEFAULT_ROWS_HINT):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linear_layers(module: torch.nn.Module, rows_hint: int = DEFAULT_ROWS_HINT) -> int:
    """Replace, in place, every float32 CPU nn.Linear under `module` whose weight is not
    shared with another module (a tied embedding must stay one tensor) by a PrepackedLinear.
    For inference only (no gradients). Returns how many were replaced; 0 where oneDNN is
    unavailable."""
    if not prepacking_available():
        return 0
    weight_users: dict[int, int] = {}
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            weight_users[id(param)] = weight_users.get(id(param), 0) + 1

    def replaceable(child: torch.nn.Module) -> bool:
        return (type(child) is torch.nn.Linear and child.weight.device.type == "cpu"
                and child.weight.dtype == torch.float32 and weight_users[id(child.weight)] == 1)

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if replaceable(child):
                setattr(parent, name, PrepackedLinear(child, rows_hint))
                replaced += 1
    return replaced
