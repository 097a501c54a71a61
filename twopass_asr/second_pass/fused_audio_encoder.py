"""The Nano's audio encoder (FunASR's SenseVoiceEncoderSmall) with its int8 SANM layers fused:
on the compiled kernel, each of its two stacks of layers is one native call
(first_pass.native_layers' sanm_encoder.c, its rows shared among torch's threads); on fbgemm or
oneDNN, the first pass's FusedInt8EncoderLayers runs the per-row work around each product
(quantizing, scaling, ReLU, residual additions, the FSMN memory) in C passes instead of some
thirty torch operations a layer.

Each segment attends over its own frames, padding masked as FunASR's attention masks it. On
fbgemm and oneDNN every operation is the one FunASR's layers make, in the same order: the prompts
are the same bits either way (the tests compare them). The native layers sum their float work in
another order, so they agree with FunASR's layers around the same products to float rounding.
"""

from __future__ import annotations

import torch

from twopass_asr.first_pass.fused_encoder import FusedInt8EncoderLayers
from twopass_asr.first_pass.native_layers import NativeInt8Encoder


class _SegmentAttention:
    """What FusedInt8EncoderLayers asks of its attention (write a layer's keys and values, then
    attend), over whole segments: each query attends every frame of its own segment."""

    def __init__(self, lengths: torch.Tensor, frames: int):
        self.key_padding = (torch.arange(frames)[None, :] >= lengths[:, None])[:, None, None, :]
        self.padded = bool(self.key_padding.any())
        self.keys = self.values = None

    def write(self, layer: int, k_h: torch.Tensor, v_h: torch.Tensor) -> None:
        self.keys, self.values = k_h, v_h

    def attend(self, layer: int, q_h: torch.Tensor, d_k: int) -> torch.Tensor:
        """(batch, frames, heads * d_k), as FunASR's MultiHeadedAttentionSANM computes it."""
        scores = torch.matmul(q_h * d_k ** (-0.5), self.keys.transpose(-2, -1))
        if self.padded:
            scores = scores.masked_fill(self.key_padding, -float("inf"))
            weights = torch.softmax(scores, dim=-1).masked_fill(self.key_padding, 0.0)
        else:  # FunASR's masking of no key is the identity
            weights = torch.softmax(scores, dim=-1)
        attended = torch.matmul(weights, self.values)
        batch, heads, frames, width = attended.shape
        return attended.transpose(1, 2).reshape(batch, frames, heads * width)


class _FusedStack:
    """Layers of FusedInt8EncoderLayers (`indices` of them) over whole segments."""

    def __init__(self, layers: FusedInt8EncoderLayers, indices: range):
        self.layers, self.indices = layers, indices

    def __call__(self, x: torch.Tensor, frame_counts: torch.Tensor) -> torch.Tensor:
        attention = _SegmentAttention(frame_counts, x.shape[1])
        for index in self.indices:
            x = self.layers.forward(index, x, frame_counts, attention)
        return x


class _NativeStack:
    """Layers in one native call (NativeInt8Encoder.encode_segments) on torch's threads."""

    def __init__(self, layers: NativeInt8Encoder):
        self.layers = layers

    def __call__(self, x: torch.Tensor, frame_counts: torch.Tensor) -> torch.Tensor:
        return self.layers.encode_segments(x, frame_counts, torch.get_num_threads())


class FusedAudioEncoder:
    """`encoder`'s forward (fbank frames [batch, frames, features], lengths) with its layers
    fused; build with `for_encoder`. Its two stacks of layers (encoders0 and encoders, then
    tp_encoders) are each one native call on the compiled kernel (first_pass.native_layers), or
    FusedInt8EncoderLayers' per-layer passes on fbgemm or oneDNN."""

    def __init__(self, encoder: torch.nn.Module, stacks: tuple[_FusedStack | _NativeStack, _FusedStack | _NativeStack]):
        self.encoder = encoder
        self.stacks = stacks

    @classmethod
    def for_encoder(cls, encoder: torch.nn.Module) -> FusedAudioEncoder | None:
        """The fused encoder, or None where it does not apply: not SenseVoiceEncoderSmall's
        layout, layers neither native_layers nor FusedInt8EncoderLayers covers (not per-token
        int8, or no C compiler), or a layer that concatenates instead of adding."""
        stacks = [getattr(encoder, name, None) for name in ("encoders0", "encoders", "tp_encoders")]
        if any(stack is None for stack in stacks) or not all(hasattr(encoder, name) for name in
                                                              ("embed", "after_norm", "tp_norm")):
            return None
        first, tp = [*stacks[0], *stacks[1]], list(stacks[2])
        if any(getattr(layer, "concat_after", True) for layer in first + tp):
            return None
        native = [NativeInt8Encoder.for_layers(stack) for stack in (first, tp)]
        if all(native):
            return cls(encoder, (_NativeStack(native[0]), _NativeStack(native[1])))
        fused = FusedInt8EncoderLayers.for_layers(first + tp)
        if fused is None:
            return None
        split = len(first)
        return cls(encoder, (_FusedStack(fused, range(split)), _FusedStack(fused, range(split, split + len(tp)))))

    @torch.no_grad()
    def __call__(self, fbank: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded frames [batch, frames, width], lengths as int32), as the encoder's forward."""
        encoder = self.encoder
        x = encoder.embed(fbank * encoder.output_size() ** 0.5).contiguous()
        frame_counts = lengths.to(torch.int64).contiguous()
        x = encoder.after_norm(self.stacks[0](x, frame_counts))
        return encoder.tp_norm(self.stacks[1](x, frame_counts)), lengths.int()


__all__ = ["FusedAudioEncoder"]
