"""SANM encoder layers in int8 with the elementwise work between their products in C
(twopass_asr.kernels.row_kernels): the first pass's encoder, and the Nano's audio encoder
(twopass_asr.second_pass.fused_audio_encoder).

In torch's operations an encoder layer makes about thirty passes over its frames besides its
four int8 products: each product's per-row quantization and scaling, the FSMN memory's masking,
padding, transposes, convolution and sum, the ReLU, the residual additions, each into a new
tensor. Here the work after each product is one C pass per row while the row is in cache: the
feed-forward's hidden rows are scaled, through ReLU and quantized for the next product in one
pass; the residual connections add the scaled product (and the FSMN memory) into the frames in
place; the FSMN memory is one pass per stream. Layer norms and attention stay torch's.

Every operation is the one torch's path makes (BatchedStreamingParaformer's encoder layer), in
the same order, so a stream gets the same bits either way (the tests compare them); it is only
faster (perf/RESULTS.md, 2026-12-04, session 16).
"""

from __future__ import annotations

import torch

from twopass_asr.kernels.row_kernels import RowKernels, row_kernels
from twopass_asr.kernels.tokenwise_int8 import TokenwiseInt8Linear


class FusedInt8EncoderLayers:
    """The SANM encoder layers `layers` (FunASR's EncoderLayerSANM, their linear layers made
    TokenwiseInt8Linear) run with `kernels`; build with `for_layers`."""

    def __init__(self, layers: list[torch.nn.Module], kernels: RowKernels):
        self.layers = layers
        self.kernels = kernels
        self.fsmn_taps = [fsmn_taps(layer) for layer in layers]
        self.fsmn_left = [layer.self_attn.pad_fn.padding[0] for layer in layers]

    @classmethod
    def for_layers(cls, layers: list[torch.nn.Module]) -> FusedInt8EncoderLayers | None:
        """The fused layers, or None where they do not apply: a layer not in per-token int8 on
        fbgemm or oneDNN (the compiled kernel has no unscaled product: native_layers runs those),
        a configuration the C passes do not cover, or no compiled kernels (row_kernels has warned)."""
        if not layers or not all(sanm_layer_kernel(layer) in ("fbgemm", "onednn") for layer in layers):
            return None
        kernels = row_kernels()
        return None if kernels is None else cls(layers, kernels)

    def forward(self, index: int, x: torch.Tensor, lengths: torch.Tensor, look_back) -> torch.Tensor:
        """Encoder layer `index` over frames x [batch, time, features] (each stream's first
        lengths[i] frames its own; int64); look_back: the layers' attention (write, then attend:
        the first pass's _LookBackBuffer, or the Nano's whole-segment attention). Returns the
        layer's output frames (x itself, updated in place, where the layer has a residual
        connection)."""
        layer, kernels = self.layers[index], self.kernels
        attention, feed_forward = layer.self_attn, layer.feed_forward
        batch, time, _ = x.shape
        rows, width = batch * time, attention.h * attention.d_k

        qkv = attention.linear_q_k_v.product_with_row_kernels(layer.norm1(x).reshape(rows, -1), kernels)
        qkv = qkv.view(batch, time, 3 * width)
        values, memory = kernels.fsmn_memory(qkv[..., 2 * width:], lengths, self.fsmn_taps[index],
                                             self.fsmn_left[index])
        q_h, k_h, v_h = (t.reshape(batch, time, attention.h, attention.d_k).transpose(1, 2)
                         for t in (qkv[..., :width], qkv[..., width:2 * width], values))
        look_back.write(index, k_h, v_h)
        attended = look_back.attend(index, q_h, attention.d_k).reshape(rows, width)

        out = attention.linear_out
        product_input, scales = kernels.quantize_rows(attended, out.input_form)
        product = out.unscaled_product(product_input)
        if layer.in_size == layer.size:
            kernels.add_scaled_rows_(x.view(rows, width), product, scales, out.bias, out.scale_divisor,
                                     memory.view(rows, width))
        else:  # the first layer changes the width: no residual connection
            kernels.scale_rows_(product, scales, out.bias, out.scale_divisor)
            x = product.add_(memory.view(rows, width)).view(batch, time, width)

        w_1, w_2 = feed_forward.w_1, feed_forward.w_2
        product_input, scales = kernels.quantize_rows(layer.norm2(x).reshape(rows, width), w_1.input_form)
        hidden = w_1.unscaled_product(product_input)
        product_input, scales = kernels.scale_relu_quantize_rows(hidden, scales, w_1.bias, w_1.scale_divisor,
                                                                 w_2.input_form)
        kernels.add_scaled_rows_(x.view(rows, width), w_2.unscaled_product(product_input), scales, w_2.bias,
                                 w_2.scale_divisor)
        return x


def fsmn_taps(layer: torch.nn.Module) -> torch.Tensor:
    """The FSMN memory's depthwise convolution taps of a SANM layer as row_scaling.c's
    fsmn_memory takes them: [width, channels], one row per frame of the window."""
    return layer.self_attn.fsmn_block.weight.detach()[:, 0, :].t().contiguous()


def sanm_layer_kernel(layer: torch.nn.Module) -> str | None:
    """The int8 kernel of `layer` if it is the encoder layer forward() computes (pre-norm SANM,
    its four linear layers per-token int8 on that one kernel, its FSMN a depthwise convolution
    padded with zeros to keep the length, its feed-forward activation ReLU); else None."""
    attention, feed_forward = getattr(layer, "self_attn", None), getattr(layer, "feed_forward", None)
    if attention is None or feed_forward is None or not getattr(layer, "normalize_before", False):
        return None
    linears = [getattr(attention, "linear_q_k_v", None), getattr(attention, "linear_out", None),
               getattr(feed_forward, "w_1", None), getattr(feed_forward, "w_2", None)]
    if not all(isinstance(linear, TokenwiseInt8Linear) for linear in linears):
        return None
    kernels = {linear.kernel for linear in linears}
    if len(kernels) != 1:
        return None
    conv, pad = getattr(attention, "fsmn_block", None), getattr(attention, "pad_fn", None)
    if not isinstance(conv, torch.nn.Conv1d) or not isinstance(pad, torch.nn.ConstantPad1d):
        return None
    channels, width = conv.in_channels, conv.kernel_size[0]
    left, right = pad.padding
    fusable = (conv.groups == channels == conv.out_channels and conv.bias is None and conv.stride == (1,)
               and conv.dilation == (1,) and conv.padding == (0,) and pad.value == 0.0 and left + right == width - 1
               and 0 <= left < width and isinstance(feed_forward.activation, torch.nn.ReLU))
    return kernels.pop() if fusable else None


__all__ = ["FusedInt8EncoderLayers", "fsmn_taps", "sanm_layer_kernel"]
