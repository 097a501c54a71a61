"""Linear layers in int8, activations quantized per token, on one of three kernels
(TOKENWISE_KERNELS): torch's fbgemm, the fast one on AVX2 without VNNI (perf/RESULTS.md,
2026-12-03); torch's oneDNN, which uses AMX (perf/RESULTS.md, 2026-12-04, session 13; held to
AVX-512 VNNI, oneDNN took its reference kernel for these products, session 30, so it runs on AMX
only); and "compiled", the project's own product in C
(twopass_asr.kernels.decode_step), fbgemm's recipe and bits, which the torch int8 LLM runs on so
that its decode steps can run in C as a whole (twopass_asr.second_pass.native_decode), and the
first pass so that its encoder's and decoder's layers can (twopass_asr.first_pass.native_layers).

Activations: torch's dynamic int8 layer takes one range for all the rows of a call, so one row
with large activations (LLMs put some at a prompt's first token and at delimiters) would
coarsen every other row of the call, another segment's or stream's included.
TokenwiseInt8Linear divides each row by its own largest magnitude and quantizes the call on the
fixed range [-1, 1] (on fbgemm as uint8 around 128, 2/255 a step; on oneDNN as int8 on
-127..127), so a row's integers depend on that row alone; the product is scaled back row by
row. A row therefore gives the same output alone or with others. On oneDNN that per-row work
runs in C (row_kernels: one pass per row, 1.2-1.3x a first-pass round on AMX) where a C
compiler is at hand, else as torch's operations, with the same bits either way.

Bits: AVX2 multiplies uint8 activations by int8 weights and adds each pair of products in 16
bits, saturating, and 255 x 127 x 2 does not fit. fbgemm's own remedy (reduce_range) takes the
activations' eighth bit; here the weights give up theirs instead (int8_per_output_channel on
63 levels: 255 x 63 x 2 fits), because activations are the side that quantizes worse (a row's
scale is set by its largest channel). On one layer that halves the error where a channel is
20-100x the others and takes a third off it where none is (perf/RESULTS.md, 2026-12-03, session
9). oneDNN is only chosen where AMX adds the products in 32 bits, so its weights keep 127
levels.

torch marks its quantized tensors (fbgemm's path) and TorchScript deprecated (2.13, the pinned
version, still has both, and no other int8 matrix product in torch is fast on AVX2); the tests
load this path, so a torch without it fails them rather than the service.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Optional

import torch

from twopass_asr.kernels import layer_replacement
from twopass_asr.kernels.decode_step import CompiledInt8Weights
from twopass_asr.kernels.row_kernels import row_kernels


def int8_per_output_channel(weight: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear weight [rows, columns] as int8 per output channel, symmetric on -levels..levels
    (127: the rule of the project's W8A8 export for vLLM): (int8 weights, scales [rows, 1] in
    float32, each the row's largest magnitude / levels)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / levels
    return torch.round(weight / scale).clamp(-levels, levels).to(torch.int8), scale


# The kernels (torch's int8 libraries), and the levels their int8 weights keep (module
# docstring).
TOKENWISE_KERNELS = {"fbgemm": 63, "onednn": 127, "compiled": 63}


def _levels_of(kernel: str) -> int:
    if kernel not in TOKENWISE_KERNELS:
        raise ValueError(f"the int8 kernel must be one of {', '.join(TOKENWISE_KERNELS)}, got {kernel!r}")
    return TOKENWISE_KERNELS[kernel]


@contextlib.contextmanager
def _fbgemm_packing():
    """Within: torch's quantized engine is fbgemm, so linear_prepack lays weights out for it (a
    packed weight then runs on fbgemm whatever the engine)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class TokenwiseInt8Linear(torch.nn.Module):
    """A float32 linear layer as int8 weights (int8_per_output_channel on the kernel's levels)
    and an int8 product on `kernel` (TOKENWISE_KERNELS), each input row quantized on its own
    range to 8 bits."""

    def __init__(self, linear: torch.nn.Linear, kernel: str = "fbgemm"):
        super().__init__()
        weights, scales = int8_per_output_channel(linear.weight, _levels_of(kernel))
        rows = weights.shape[0]
        self.kernel = kernel
        self.weight_scales = scales.reshape(rows)
        self.weight_zero_points = torch.zeros(rows, dtype=torch.long)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if kernel == "compiled":
            self.packed = CompiledInt8Weights(weights, self.weight_scales)
            return
        if kernel == "onednn":
            row_kernels()  # compiled at load, not in a first request
            # oneDNN's own packing: torch's linear_prepack on its oneDNN engine keeps the int8
            # weights a second time beside the packed ones (for unpack).
            self.packed = torch.ops.onednn.qlinear_prepack(weights, None)
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            quantized = torch._make_per_channel_quantized_tensor(weights, self.weight_scales.double(),
                                                                 self.weight_zero_points, 0)
        with _fbgemm_packing():
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def weight(self) -> torch.Tensor:
        """The int8 weights (a per-channel quantized tensor)."""
        if self.kernel == "fbgemm":
            return torch.ops.quantized.linear_unpack(self.packed)[0]
        weights = self.packed.weights if self.kernel == "compiled" else self.packed.to_dense().t()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            return torch._make_per_channel_quantized_tensor(weights, self.weight_scales.double(),
                                                            self.weight_zero_points, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "compiled":
            y = self.packed.product(x.reshape(-1, self.in_features).float())
            y = y if self.bias is None else y.add_(self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if self.kernel == "fbgemm":
            return _scripted(_fbgemm_product)(x, self.packed, self.bias, self.in_features, self.out_features)
        kernels = row_kernels()
        if kernels is None or x.dtype != torch.float32:
            return _scripted(_onednn_product)(x, self.packed, self.weight_scales, self.weight_zero_points, self.bias,
                                              self.in_features, self.out_features)
        return self.product_with_row_kernels(x.reshape(-1, self.in_features).contiguous(), kernels).view(
            *x.shape[:-1], self.out_features)

    def product_with_row_kernels(self, rows: torch.Tensor, kernels) -> torch.Tensor:
        """The layer over contiguous float32 rows [rows, in_features], its per-row work done by
        `kernels` (row_kernels' RowKernels), on either kernel: what forward does on oneDNN, and
        what the first pass's fused encoder asks of fbgemm too, whose forward keeps torch's
        operations for the torch int8 LLM's few rows."""
        product_input, scales = kernels.quantize_rows(rows, self.input_form)
        y = self.unscaled_product(product_input)
        kernels.scale_rows_(y, scales, self.bias, self.scale_divisor)
        return y

    # The product split in three, for callers that do the per-row work themselves in C
    # (row_kernels, whose quantize_rows makes the input and scale_rows_ the output): the input's
    # form, the product of an input in that form, and the divisor of its scaling back.

    @property
    def input_form(self) -> str:
        """The form (row_kernels.INPUT_FORMS) of unscaled_product's input: oneDNN takes int8
        steps, fbgemm float quotients it quantizes itself."""
        return "steps" if self.kernel == "onednn" else "quotients"

    @property
    def scale_divisor(self) -> float:
        return 127.0 if self.kernel == "onednn" else 1.0

    def unscaled_product(self, product_input: torch.Tensor) -> torch.Tensor:
        """The product of rows already divided by their magnitudes (in input_form), before those
        are multiplied back in; [rows, out_features]."""
        if self.kernel == "compiled":
            raise ValueError("the compiled kernel scales its products itself: it has no unscaled product")
        if self.kernel == "onednn":
            return _onednn_kernel(product_input, self.packed, self.weight_scales, self.weight_zero_points)
        return _fbgemm_quotients_product(product_input, self.packed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}")


def _row_scales(rows: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude, at least float32's smallest normal number: an all-zero row
    (left padding) stays zero, not 0/0."""
    return rows.abs().amax(1, keepdim=True).clamp_(min=1.1754943508222875e-38)


def _onednn_kernel(steps: torch.Tensor, packed: torch.Tensor, weight_scales: torch.Tensor,
                   weight_zero_points: torch.Tensor) -> torch.Tensor:
    """oneDNN's product of int8 steps on -127..127 (zero point 0: oneDNN adds no correction for
    one). It scales its integer sums by the weights' scales alone, one multiplication whatever
    the batch; with a row's scale in it too, oneDNN rounded the outputs of 1-4 rows differently
    from many, and a row must give the same bits in any batch."""
    return torch.ops.onednn.qlinear_pointwise(steps, 1.0, 0, packed, weight_scales, weight_zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def _fbgemm_quotients_product(quotients: torch.Tensor,
                              packed: torch.classes.quantized.LinearPackedParamsBase) -> torch.Tensor:
    """fbgemm's product of rows on [-1, 1], quantized by fbgemm to 8 bits on that fixed range (no
    reduce_range: the weights' 63 levels make the room, module docstring)."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(quotients, 2.0 / 255.0, 128, packed)


def _fbgemm_product(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase,
                    bias: Optional[torch.Tensor], in_features: int, out_features: int) -> torch.Tensor:
    rows = x.reshape(-1, in_features)
    scale = _row_scales(rows)
    y = _fbgemm_quotients_product(rows / scale, packed)
    y = y.mul_(scale) if bias is None else torch.addcmul(bias, y, scale)
    return y.view(x.shape[:-1] + [out_features])


def _onednn_product(x: torch.Tensor, packed: torch.Tensor, weight_scales: torch.Tensor,
                    weight_zero_points: torch.Tensor, bias: Optional[torch.Tensor], in_features: int,
                    out_features: int) -> torch.Tensor:
    rows = x.reshape(-1, in_features)
    scale = _row_scales(rows)
    y = _onednn_kernel((rows / scale).mul_(127.0).round_().to(torch.int8), packed, weight_scales, weight_zero_points)
    scale = scale / 127.0
    y = y.mul_(scale) if bias is None else torch.addcmul(bias, y, scale)
    return y.view(x.shape[:-1] + [out_features])


@functools.cache
def _scripted(product):
    """A product in torch's operations (fbgemm's; oneDNN's where row_kernels cannot be had)
    compiled by TorchScript (deprecated, as the quantized tensors): its ten small operations per
    layer cost a decode step 15-20 % more from Python."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
        return torch.jit.script(product)


def replace_linear_layers(module: torch.nn.Module, chosen: Callable[[str], bool], kernel: str = "fbgemm") -> int:
    """Replace, in place, each float32 torch.nn.Linear of `module` whose name `chosen` accepts
    by a TokenwiseInt8Linear on `kernel` (one of TOKENWISE_KERNELS). Returns how many were
    replaced."""
    _levels_of(kernel)
    return layer_replacement.replace_linear_layers(module, chosen, lambda linear: TokenwiseInt8Linear(linear, kernel))


__all__ = ["TOKENWISE_KERNELS", "TokenwiseInt8Linear", "int8_per_output_channel", "replace_linear_layers"]
