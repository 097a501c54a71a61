"""The streaming FSMN-VAD's encoder in one C call per batched step (twopass_asr/kernels/fsmn_vad.c).

As torch calls, a 60 ms step of one stream spent about 4 ms in a dozen small products and four
convolutions called from Python, for well under a millisecond of arithmetic; the VAD steps every
stream 16 times a second. The C encoder computes the same model in float32 with its sums in
another order, so its scores agree with torch's (and FunASR's) to float rounding; the tests
compare them and the segment events with FunASR's.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from twopass_asr.kernels.row_kernels import C_POINTER, C_SIZE, SIMD_FLAGS, PinnedTensors, compiled_library_or_none

SOURCES = tuple(Path(__file__).resolve().parent.parent / "kernels" / name for name in ("fsmn_vad.c", "vector_lanes.h"))


class DenseLayerStruct(ctypes.Structure):
    """fsmn_vad.c's dense_layer."""
    _fields_ = [("weight_t", C_POINTER), ("bias", C_POINTER), ("outputs", C_SIZE), ("inputs", C_SIZE)]


class FsmnBlockStruct(ctypes.Structure):
    """fsmn_vad.c's fsmn_block."""
    _fields_ = [("linear", DenseLayerStruct), ("affine", DenseLayerStruct), ("taps", C_POINTER), ("lorder", C_SIZE),
                ("lstride", C_SIZE)]


class FsmnVadStruct(ctypes.Structure):
    """fsmn_vad.c's fsmn_vad."""
    _fields_ = [("in1", DenseLayerStruct), ("in2", DenseLayerStruct), ("out1", DenseLayerStruct),
                ("out2", DenseLayerStruct), ("blocks", C_SIZE), ("widest", C_SIZE), ("softmax", C_SIZE),
                ("block", ctypes.POINTER(FsmnBlockStruct))]


SIGNATURES = {
    "fsmn_vad_encode": ([ctypes.POINTER(FsmnVadStruct), C_SIZE, C_SIZE, C_POINTER, C_POINTER, C_POINTER, C_POINTER,
                         C_POINTER], None),
    "fsmn_vad_scratch_floats": ([ctypes.POINTER(FsmnVadStruct), C_SIZE], C_SIZE),
    "fsmn_vad_dense_padding": ([], C_SIZE),
}


@functools.cache
def fsmn_vad_library() -> ctypes.CDLL | None:
    """fsmn_vad.c compiled for this CPU (row_kernels.compiled_library_or_none), once per process;
    None, with one warning, where it cannot be."""
    return compiled_library_or_none(SOURCES, "fsmn_vad.so", SIMD_FLAGS,
                                    "the VAD's encoder runs as torch calls (slower)", SIGNATURES)


class NativeFsmnEncoder:
    """FunASR's FSMN VAD encoder `encoder` in fsmn_vad.c; build with `for_encoder`."""

    def __init__(self, encoder: torch.nn.Module, library: ctypes.CDLL):
        self.library = library
        self._pin = PinnedTensors()
        blocks = [self._block(block) for block in encoder.fsmn]
        self._blocks = (FsmnBlockStruct * len(blocks))(*blocks)
        dense = [self._dense(layer.linear) for layer in (encoder.in_linear1, encoder.in_linear2, encoder.out_linear1,
                                                          encoder.out_linear2)]
        widest = max(layer.outputs for layer in dense + [part for block in blocks
                                                         for part in (block.linear, block.affine)])
        self.spans = [(block.fsmn_block.lorder - 1) * block.fsmn_block.lstride for block in encoder.fsmn]
        self.projections = [block.linear.linear.out_features for block in encoder.fsmn]
        self.output_dim = encoder.out_linear2.linear.out_features
        self.struct = FsmnVadStruct(*dense, len(blocks), widest, int(encoder.use_softmax), self._blocks)

    def _dense(self, linear: torch.nn.Linear) -> DenseLayerStruct:
        # Transposed, each input's row padded with zeros to the library's multiple of outputs.
        padding = -linear.out_features % self.library.fsmn_vad_dense_padding()
        weight_t = torch.nn.functional.pad(linear.weight.detach().t(), (0, padding))
        return DenseLayerStruct(self._pin(weight_t), None if linear.bias is None else self._pin(linear.bias),
                                linear.out_features, linear.in_features)

    def _block(self, block: torch.nn.Module) -> FsmnBlockStruct:
        fsmn = block.fsmn_block
        taps = fsmn.conv_left.weight[:, 0, :, 0].t()  # [lorder, projection]
        return FsmnBlockStruct(self._dense(block.linear.linear), self._dense(block.affine.linear), self._pin(taps),
                               fsmn.lorder, fsmn.lstride)

    @classmethod
    def for_encoder(cls, encoder: torch.nn.Module, device: torch.device) -> NativeFsmnEncoder | None:
        """The native encoder, or None where it does not apply: not on a CPU, a layer
        configuration fsmn_vad.c does not compute, or no compiled library (fsmn_vad_library has
        warned)."""
        blocks = list(encoder.fsmn)
        if device.type != "cpu" or not blocks or not all(_native_block(block, blocks[0]) for block in blocks):
            return None
        layers = [encoder.in_linear1, encoder.in_linear2, encoder.out_linear1, encoder.out_linear2]
        if not all(isinstance(getattr(layer, "linear", None), torch.nn.Linear) for layer in layers):
            return None
        library = fsmn_vad_library()
        return None if library is None else cls(encoder, library)

    def encode(self, feats: list[torch.Tensor], caches: list[dict]) -> list[torch.Tensor]:
        """BatchedStreamingVad._encode's contract: each stream's new frames feats[i] (frames,
        features) and its encoder cache (FunASR's "cache_layer_{n}" entries, (1, projection,
        memory, 1), created at the first step); returns (1, frames_i, pdfs) per stream."""
        lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
        x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).float().contiguous()
        batch, time, _ = x.shape
        names = [f"cache_layer_{index}" for index in range(len(self.spans))]
        memory = torch.stack([
            torch.stack([cache[name].reshape(projection, span) if name in cache else torch.zeros(projection, span)
                         for cache in caches])
            for name, projection, span in zip(names, self.projections, self.spans)])
        out = torch.empty((batch, time, self.output_dim))
        scratch = torch.empty(self.library.fsmn_vad_scratch_floats(ctypes.byref(self.struct), batch * time))
        self.library.fsmn_vad_encode(ctypes.byref(self.struct), batch, time, x.data_ptr(), lengths.data_ptr(),
                                     memory.data_ptr(), out.data_ptr(), scratch.data_ptr())
        for layer, name in enumerate(names):
            for index, cache in enumerate(caches):
                cache[name] = memory[layer, index].reshape(1, self.projections[layer], self.spans[layer], 1)
        return [out[i:i + 1, :length] for i, length in enumerate(lengths.tolist())]


def _native_block(block: torch.nn.Module, first: torch.nn.Module) -> bool:
    """What fsmn_vad.c computes of a block: a linear projection without bias, a left-only
    depthwise memory without bias, an affine layer, ReLU; the projection's width and the memory's
    span those of the first block."""
    fsmn = getattr(block, "fsmn_block", None)
    conv = getattr(fsmn, "conv_left", None)
    linear, affine = getattr(block, "linear", None), getattr(block, "affine", None)
    return (isinstance(conv, torch.nn.Conv2d) and fsmn.conv_right is None and conv.bias is None
            and conv.groups == conv.in_channels == conv.out_channels
            and tuple(conv.weight.shape[1:]) == (1, fsmn.lorder, 1) and conv.padding == (0, 0)
            and conv.stride == (1, 1) and conv.dilation == (fsmn.lstride, 1)
            and isinstance(getattr(linear, "linear", None), torch.nn.Linear) and linear.linear.bias is None
            and isinstance(getattr(affine, "linear", None), torch.nn.Linear)
            and linear.linear.out_features == conv.in_channels == affine.linear.in_features
            and isinstance(getattr(block.relu, "relu", None), torch.nn.ReLU)
            and conv.in_channels == first.fsmn_block.conv_left.in_channels
            and (fsmn.lorder - 1) * fsmn.lstride == (first.fsmn_block.lorder - 1) * first.fsmn_block.lstride)


__all__ = ["NativeFsmnEncoder", "fsmn_vad_library"]
