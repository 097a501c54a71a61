"""The Nano's audio encoder (FunASR's SenseVoiceEncoderSmall) with its int8 SANM layers run by
the first pass's FusedInt8EncoderLayers: the per-row work around each product (quantizing,
scaling, ReLU, residual additions, the FSMN memory) in C passes instead of some thirty torch
operations a layer.

Each segment attends over its own frames, padding masked as FunASR's attention masks it, and
every operation is the one FunASR's layers make, in the same order: the prompts are the same
bits either way (the tests compare them).
"""

from __future__ import annotations

import torch

from twopass_asr.first_pass.fused_encoder import FusedInt8EncoderLayers


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


class FusedAudioEncoder:
    """`encoder`'s forward (fbank frames [batch, frames, features], lengths) with its layers
    fused; build with `for_encoder`."""

    def __init__(self, encoder: torch.nn.Module, layers: FusedInt8EncoderLayers):
        self.encoder = encoder
        self.layers = layers
        self.first_stack = len(encoder.encoders0) + len(encoder.encoders)

    @classmethod
    def for_encoder(cls, encoder: torch.nn.Module) -> FusedAudioEncoder | None:
        """The fused encoder, or None where it does not apply: not SenseVoiceEncoderSmall's
        layout, layers FusedInt8EncoderLayers does not cover (not per-token int8 on fbgemm or
        oneDNN, or no C compiler), or a layer that concatenates instead of adding."""
        stacks = [getattr(encoder, name, None) for name in ("encoders0", "encoders", "tp_encoders")]
        if any(stack is None for stack in stacks) or not all(hasattr(encoder, name) for name in
                                                              ("embed", "after_norm", "tp_norm")):
            return None
        layers = [layer for stack in stacks for layer in stack]
        if any(getattr(layer, "concat_after", True) for layer in layers):
            return None
        fused = FusedInt8EncoderLayers.for_layers(layers)
        return None if fused is None else cls(encoder, fused)

    @torch.no_grad()
    def __call__(self, fbank: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded frames [batch, frames, width], lengths as int32), as the encoder's forward."""
        encoder = self.encoder
        x = encoder.embed(fbank * encoder.output_size() ** 0.5).contiguous()
        frame_counts = lengths.to(torch.int64).contiguous()
        attention = _SegmentAttention(frame_counts, x.shape[1])
        for index in range(self.first_stack):
            x = self.layers.forward(index, x, frame_counts, attention)
        x = encoder.after_norm(x)
        for index in range(self.first_stack, len(self.layers.layers)):
            x = self.layers.forward(index, x, frame_counts, attention)
        return encoder.tp_norm(x), lengths.int()


__all__ = ["FusedAudioEncoder"]
