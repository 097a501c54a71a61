"""The first pass's encoder layers and decoder layers in int8 on the compiled kernel, each stack
in one C call per batched step (twopass_asr/kernels/sanm_encoder.c, sanm_decoder.c).

On a CPU without int8 dot products (AVX2 alone) the int8 products run no faster than float32's,
and a one-stream round of the fused fbgemm layers (fused_encoder) spent about a third of its
time outside them: the layer norms, attention and per-row passes as some thirty torch and C calls
a layer from Python, fifty layers a round (perf/RESULTS.md, 2026-12-05, sessions 20 and 24).
Here a round's encoder is one call that releases the GIL, its products those of tokenwise_int8's
compiled kernel (fbgemm's recipe and bits), and its decoder another (the decoder's sixteen
layers of a few token rows each took a sixth of a one-stream round as torch calls).

A stream's rows depend on its own rows alone, so it gets the same bits alone or batched; the
float work (norms, attention, the decoder's FSMN) is summed in another order than torch's, so it
agrees with torch's layers around the same products to float rounding (the tests bound it).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from twopass_asr.first_pass.fused_encoder import fsmn_taps, sanm_layer_kernel
from twopass_asr.kernels.decode_step import (
    INPUT_STEP,
    Int8LayerStruct,
    decode_step_library,
    products_use_avx512_vnni,
)
from twopass_asr.kernels.int8_recipe import default_auto_kernel
from twopass_asr.kernels.row_kernels import (
    C_POINTER,
    C_REAL,
    C_SIZE,
    FLAGS,
    SIMD_FLAGS,
    PinnedTensors,
    compiled_library_or_none,
)
from twopass_asr.kernels.tokenwise_int8 import TokenwiseInt8Linear

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
ENCODER_SOURCES = tuple(KERNELS / name for name in ("sanm_encoder.c", "row_scaling.c", "sanm_rows.h",
                                                     "int8_product.h", "amx_tiles.h", "row_magnitude.h",
                                                     "vector_lanes.h", "exp_nonpositive.h"))
DECODER_SOURCES = tuple(KERNELS / name for name in ("sanm_decoder.c", "sanm_rows.h", "int8_product.h",
                                                     "amx_tiles.h", "row_magnitude.h", "vector_lanes.h",
                                                     "exp_nonpositive.h"))
# The encoder's layers share a call's rows among threads where asked (the Nano's audio encoder).
ENCODER_FLAGS = (*FLAGS, "-fopenmp")


class SanmLayerStruct(ctypes.Structure):
    """sanm_encoder.c's sanm_layer."""
    _fields_ = [("norm1_weight", C_POINTER), ("norm1_bias", C_POINTER), ("norm2_weight", C_POINTER),
                ("norm2_bias", C_POINTER), ("qkv", Int8LayerStruct), ("out", Int8LayerStruct), ("w1", Int8LayerStruct),
                ("w2", Int8LayerStruct), ("qkv_bias", C_POINTER), ("out_bias", C_POINTER), ("w1_bias", C_POINTER),
                ("w2_bias", C_POINTER), ("fsmn_taps", C_POINTER), ("fsmn_width", C_SIZE), ("fsmn_left", C_SIZE),
                ("in_size", C_SIZE)]


class SanmEncoderStruct(ctypes.Structure):
    """sanm_encoder.c's sanm_encoder."""
    _fields_ = [("layers", C_SIZE), ("size", C_SIZE), ("heads", C_SIZE), ("head_dim", C_SIZE), ("hidden", C_SIZE),
                ("norm_eps", C_REAL), ("input_step", C_REAL), ("layer", ctypes.POINTER(SanmLayerStruct))]


class StreamLookBackStruct(ctypes.Structure):
    """sanm_rows.h's stream_look_back."""
    _fields_ = [("keys", C_POINTER), ("values", C_POINTER), ("room", C_SIZE), ("history", C_SIZE), ("fresh", C_SIZE),
                ("kept", C_SIZE)]


@dataclass
class StreamLookBack:
    """One stream's look-back in a batched step of NativeInt8Encoder.encode (self-attention) or
    NativeInt8Decoder.decode (cross-attention): keys and values (layers, heads, room, head_dim),
    contiguous, the first `history` frames of each head its history. The step leaves in them the
    last `kept` frames of that history followed by the step's first `fresh` frames."""

    keys: torch.Tensor
    values: torch.Tensor
    history: int
    fresh: int
    kept: int


class SanmDecoderLayerStruct(ctypes.Structure):
    """sanm_decoder.c's sanm_decoder_layer."""
    _fields_ = [("norm1_weight", C_POINTER), ("norm1_bias", C_POINTER), ("ffn_norm_weight", C_POINTER),
                ("ffn_norm_bias", C_POINTER), ("norm2_weight", C_POINTER), ("norm2_bias", C_POINTER),
                ("norm3_weight", C_POINTER), ("norm3_bias", C_POINTER), ("w1", Int8LayerStruct),
                ("w2", Int8LayerStruct), ("q", Int8LayerStruct), ("kv", Int8LayerStruct), ("out", Int8LayerStruct),
                ("w1_bias", C_POINTER), ("q_bias", C_POINTER), ("kv_bias", C_POINTER), ("out_bias", C_POINTER),
                ("fsmn_taps", C_POINTER), ("attends", C_SIZE)]


class SanmDecoderStruct(ctypes.Structure):
    """sanm_decoder.c's sanm_decoder."""
    _fields_ = [("layers", C_SIZE), ("size", C_SIZE), ("heads", C_SIZE), ("head_dim", C_SIZE), ("hidden", C_SIZE),
                ("fsmn_memory", C_SIZE), ("norm_eps", C_REAL), ("input_step", C_REAL),
                ("layer", ctypes.POINTER(SanmDecoderLayerStruct))]


ENCODER_SIGNATURES = {
    "sanm_encode": ([ctypes.POINTER(SanmEncoderStruct), C_SIZE, C_SIZE, C_POINTER, C_POINTER, C_POINTER,
                     ctypes.POINTER(StreamLookBackStruct), C_SIZE, ctypes.c_int, C_POINTER], None),
    "sanm_encode_segments": ([ctypes.POINTER(SanmEncoderStruct), C_SIZE, C_SIZE, C_POINTER, C_POINTER, C_POINTER,
                              ctypes.c_int, C_POINTER], None),
    "encode_scratch_floats": ([ctypes.POINTER(SanmEncoderStruct), C_SIZE, C_SIZE, ctypes.c_int], C_SIZE),
}
DECODER_SIGNATURES = {
    "sanm_decode": ([ctypes.POINTER(SanmDecoderStruct), C_SIZE, C_SIZE, C_POINTER, C_POINTER, C_SIZE, C_POINTER,
                     C_POINTER, C_POINTER, ctypes.POINTER(StreamLookBackStruct), C_SIZE, C_POINTER], None),
    "decode_scratch_floats": ([ctypes.POINTER(SanmDecoderStruct), C_SIZE, C_SIZE, C_SIZE], C_SIZE),
}


@functools.cache
def sanm_encoder_library() -> ctypes.CDLL | None:
    """sanm_encoder.c compiled for this CPU (row_kernels.compiled_library_or_none), once per
    process; None, with one warning, where it cannot be."""
    return compiled_library_or_none(ENCODER_SOURCES, "sanm_encoder.so", ENCODER_FLAGS,
                                    "int8 takes oneDNN or fbgemm under auto, and SANM encoder layers on the "
                                    "compiled kernel run as torch calls (slower)", ENCODER_SIGNATURES)


@functools.cache
def sanm_decoder_library() -> ctypes.CDLL | None:
    """sanm_decoder.c compiled for this CPU, once per process; None, with one warning, where it
    cannot be."""
    return compiled_library_or_none(DECODER_SOURCES, "sanm_decoder.so", SIMD_FLAGS,
                                    "the first pass's int8 decoder layers run as torch calls (slower)",
                                    DECODER_SIGNATURES)


def native_auto_kernel(int8_dot_products: bool) -> str:
    """The int8 kernel under auto of the models whose SANM layers run natively on the compiled
    kernel (the first pass's encoder and decoder, the Nano's audio encoder): the compiled one where
    its C code compiles and either the CPU has no int8 dot products or the build's products use
    them (AVX-512 VNNI, AMX tiles); else int8_recipe's default (a failed compile has warned)."""
    native = sanm_encoder_library() is not None and sanm_decoder_library() is not None \
        and decode_step_library() is not None
    if native and (not int8_dot_products or products_use_avx512_vnni()):
        return "compiled"
    return default_auto_kernel(int8_dot_products)


def look_back_struct(look_back: StreamLookBack, frames: int, layers: int, heads: int,
                     head_dim: int) -> StreamLookBackStruct:
    """The C side of one stream's look-back over `layers` layers of `heads` heads, checked first:
    the step writes into its buffers."""
    keys, values = look_back.keys, look_back.values
    room = keys.shape[2] if keys.dim() == 4 else -1
    if not (keys.shape == values.shape == (layers, heads, room, head_dim) and keys.dtype == values.dtype
            == torch.float32 and keys.is_contiguous() and values.is_contiguous()):
        raise ValueError(f"look-back buffers must be contiguous float32 ({layers}, {heads}, room, {head_dim}), "
                         f"got {keys.dtype} {tuple(keys.shape)} and {values.dtype} {tuple(values.shape)}")
    if not (0 <= look_back.history <= room and 0 <= look_back.fresh <= frames
            and 0 <= look_back.kept <= min(room, look_back.history + look_back.fresh)):
        raise ValueError(f"a look-back of {look_back.history} frames keeping {look_back.kept} with "
                         f"{look_back.fresh} of the step's {frames} does not fit its room of {room}")
    return StreamLookBackStruct(keys.data_ptr(), values.data_ptr(), room, look_back.history, look_back.fresh,
                                look_back.kept)


def look_back_structs(look_back: list[StreamLookBack | None] | None, frames: list[int], layers: int, heads: int,
                      head_dim: int) -> tuple[ctypes.Array | None, int]:
    """Each stream's look_back_struct (zeros where it keeps none), and the largest history; (None,
    0) where look_back is None."""
    if look_back is None:
        return None, 0
    if len(look_back) != len(frames):
        raise ValueError(f"{len(look_back)} look-backs for {len(frames)} streams")
    streams, history = (StreamLookBackStruct * len(frames))(), 0
    for i, (kept, count) in enumerate(zip(look_back, frames)):
        if kept is not None:
            streams[i] = look_back_struct(kept, count, layers, heads, head_dim)
            history = max(history, kept.history)
    return streams, history


class NativeInt8Encoder:
    """The SANM encoder layers `layers` (FunASR's EncoderLayerSANM, their linear layers
    TokenwiseInt8Linear on the compiled kernel) in sanm_encoder.c: the first pass's batched step
    (`encode`) or whole segments (`encode_segments`, the Nano's audio encoder); build with
    `for_layers`."""

    def __init__(self, layers: list[torch.nn.Module], library: ctypes.CDLL):
        self.library = library
        first, attention = layers[0], layers[0].self_attn
        self.size, self.in_size = first.size, first.in_size
        self._pinned = PinnedTensors()
        structs = [self._layer_struct(layer) for layer in layers]
        self._layers = (SanmLayerStruct * len(structs))(*structs)
        norm = first.norm1
        self.struct = SanmEncoderStruct(len(layers), self.size, attention.h, attention.d_k,
                                        first.feed_forward.w_1.out_features, norm.eps, INPUT_STEP, self._layers)

    def _layer_struct(self, layer: torch.nn.Module) -> SanmLayerStruct:
        attention, feed_forward = layer.self_attn, layer.feed_forward
        linears = (attention.linear_q_k_v, attention.linear_out, feed_forward.w_1, feed_forward.w_2)
        taps, pin = fsmn_taps(layer), self._pinned
        return SanmLayerStruct(
            pin(layer.norm1.weight), pin(layer.norm1.bias), pin(layer.norm2.weight), pin(layer.norm2.bias),
            *(linear.packed.struct for linear in linears), *(pin(linear.bias) for linear in linears),
            pin(taps), taps.shape[0], attention.pad_fn.padding[0], layer.in_size)

    @classmethod
    def for_layers(cls, layers: list[torch.nn.Module]) -> NativeInt8Encoder | None:
        """The native layers, or None where they do not apply: a layer not the fused encoder's
        configuration on the compiled kernel, with biases and affine norms, a width change after
        the first layer, or no compiled library (sanm_encoder_library has warned)."""
        if not layers or not all(sanm_layer_kernel(layer) == "compiled" and _native(layer, layers[0].norm1.eps)
                                 for layer in layers):
            return None
        size = layers[0].size
        if any(layer.size != size or layer.in_size != size for layer in layers[1:]):
            return None
        library = sanm_encoder_library()
        return None if library is None else cls(layers, library)

    def encode(self, x: torch.Tensor, lengths: torch.Tensor, look_back: list[StreamLookBack | None] | None
               ) -> torch.Tensor:
        """Every layer over frames x [batch, time, in_size] (each stream's first lengths[i] its
        own; int64); look_back: each stream's (None where it keeps none), whose buffers the step
        updates in place, or None where no stream has a look-back or keeps one. Returns the last
        layer's output [batch, time, size]."""
        batch, time, features = x.shape
        if features != self.in_size or x.dtype != torch.float32:
            raise ValueError(f"expected float32 frames of {self.in_size} features, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        lengths = lengths.to(torch.int64).contiguous()
        streams, history = look_back_structs(look_back, lengths.tolist(), self.struct.layers, self.struct.heads,
                                             self.struct.head_dim)
        out = torch.empty((batch, time, self.size))
        scratch = torch.empty(self.library.encode_scratch_floats(ctypes.byref(self.struct), batch * time,
                                                                 history + time, 1))
        self.library.sanm_encode(ctypes.byref(self.struct), batch, time, x.data_ptr(), out.data_ptr(),
                                 lengths.data_ptr(), streams, history, 1, scratch.data_ptr())
        return out

    def encode_segments(self, x: torch.Tensor, lengths: torch.Tensor, threads: int) -> torch.Tensor:
        """Every layer over whole segments x [batch, time, in_size] (segment i's first
        lengths[i] frames its own), each frame attending over its segment's frames, on `threads`
        threads. Returns the last layer's output [batch, time, size]; rows past a segment's
        frames are not the model's (nothing of theirs reaches its own rows)."""
        batch, time, features = x.shape
        if features != self.in_size or x.dtype != torch.float32:
            raise ValueError(f"expected float32 frames of {self.in_size} features, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        lengths = lengths.to(torch.int64).contiguous()
        out = torch.empty((batch, time, self.size))
        scratch = torch.empty(self.library.encode_scratch_floats(ctypes.byref(self.struct), batch * time, time,
                                                                 threads))
        self.library.sanm_encode_segments(ctypes.byref(self.struct), batch, time, x.data_ptr(), out.data_ptr(),
                                          lengths.data_ptr(), threads, scratch.data_ptr())
        return out


class NativeInt8Decoder:
    """The streaming Paraformer decoder's layers (FunASR's ParaformerSANMDecoder: its decoders,
    then decoders3; their linear layers TokenwiseInt8Linear on the compiled kernel) in
    sanm_decoder.c, up to the output norm; build with `for_decoder`."""

    def __init__(self, decoder: torch.nn.Module, library: ctypes.CDLL):
        self.library = library
        attending, tail = list(decoder.decoders), list(decoder.decoders3)
        first = attending[0]
        self.size = first.size
        self.fsmn_memory = first.self_attn.kernel_size - 1
        self.attending_layers = len(attending)
        self._pinned = PinnedTensors()
        structs = [self._layer_struct(layer) for layer in attending + tail]
        self._layers = (SanmDecoderLayerStruct * len(structs))(*structs)
        self.struct = SanmDecoderStruct(len(structs), self.size, first.src_attn.h, first.src_attn.d_k,
                                        first.feed_forward.w_1.out_features, self.fsmn_memory, first.norm1.eps,
                                        INPUT_STEP, self._layers)

    def _layer_struct(self, layer: torch.nn.Module) -> SanmDecoderLayerStruct:
        pin, feed_forward = self._pinned, layer.feed_forward
        fields = [pin(layer.norm1.weight), pin(layer.norm1.bias), pin(feed_forward.norm.weight),
                  pin(feed_forward.norm.bias)]
        if layer.src_attn is None:
            return SanmDecoderLayerStruct(*fields, None, None, None, None, feed_forward.w_1.packed.struct,
                                          feed_forward.w_2.packed.struct, Int8LayerStruct(), Int8LayerStruct(),
                                          Int8LayerStruct(), pin(feed_forward.w_1.bias), None, None, None, None, 0)
        cross = layer.src_attn
        taps = layer.self_attn.fsmn_block.weight[:, 0, :]  # [size, fsmn_memory + 1]
        return SanmDecoderLayerStruct(
            *fields, pin(layer.norm2.weight), pin(layer.norm2.bias), pin(layer.norm3.weight), pin(layer.norm3.bias),
            *(linear.packed.struct for linear in (feed_forward.w_1, feed_forward.w_2, cross.linear_q,
                                                  cross.linear_k_v, cross.linear_out)),
            *(pin(linear.bias) for linear in (feed_forward.w_1, cross.linear_q, cross.linear_k_v, cross.linear_out)),
            pin(taps), 1)

    @classmethod
    def for_decoder(cls, decoder: torch.nn.Module) -> NativeInt8Decoder | None:
        """The native layers, or None where they do not apply: a linear layer not per-token int8
        on the compiled kernel, a configuration sanm_decoder.c does not cover, or no compiled
        library (sanm_decoder_library has warned)."""
        attending, tail = list(decoder.decoders), list(decoder.decoders3)
        if not attending or not all(_native_decoder_layer(layer, attending[0]) for layer in attending + tail):
            return None
        library = sanm_decoder_library()
        return None if library is None else cls(decoder, library)

    def decode(self, x: torch.Tensor, frames: torch.Tensor, lengths: torch.Tensor, token_counts: list[int],
               fsmn_states: list[torch.Tensor], look_back: list[StreamLookBack | None] | None) -> torch.Tensor:
        """Every layer over token rows x [batch, tokens, size] (stream i's first token_counts[i]
        its own) attending over the encoder's frames [batch, time, size] (its first lengths[i]);
        fsmn_states[i]: stream i's last FSMN inputs [attending layers, size, fsmn_memory], updated
        in place; look_back: each stream's cross-attention look-back over the attending layers
        (None where it keeps none), whose buffers the step updates in place, or None where no
        stream has one or keeps one. Returns the last layer's output."""
        batch, tokens, size = x.shape
        time = frames.shape[1]
        if size != self.size or x.dtype != torch.float32 or frames.shape != (batch, time, size):
            raise ValueError(f"expected float32 rows of {self.size} features, got {x.dtype} {tuple(x.shape)} "
                             f"and frames {tuple(frames.shape)}")
        state_shape = (self.attending_layers, size, self.fsmn_memory)
        if len(fsmn_states) != batch or not all(
                s.shape == state_shape and s.dtype == torch.float32 and s.is_contiguous() for s in fsmn_states):
            raise ValueError(f"expected {batch} contiguous float32 FSMN states of {state_shape}")
        out = x.contiguous().clone()
        frames = frames.contiguous()
        counts = torch.tensor(token_counts, dtype=torch.int64)
        lengths = lengths.to(torch.int64).contiguous()
        states = (ctypes.c_void_p * batch)(*(s.data_ptr() for s in fsmn_states))
        streams, history = look_back_structs(look_back, lengths.tolist(), self.attending_layers,
                                             self.struct.heads, self.struct.head_dim)
        scratch = torch.empty(self.library.decode_scratch_floats(ctypes.byref(self.struct), batch * tokens,
                                                                 batch * time, history + time))
        self.library.sanm_decode(ctypes.byref(self.struct), batch, tokens, out.data_ptr(), counts.data_ptr(), time,
                                 frames.data_ptr(), lengths.data_ptr(), states, streams, history, scratch.data_ptr())
        return out


def _native(layer: torch.nn.Module, eps: float) -> bool:
    """What sanm_encoder.c assumes beyond the fused encoder's checks: biases on the four linear
    layers, affine layer norms over the last dimension with the first layer's eps, heads that
    split the width."""
    attention, feed_forward = layer.self_attn, layer.feed_forward
    linears = (attention.linear_q_k_v, attention.linear_out, feed_forward.w_1, feed_forward.w_2)
    return (all(linear.bias is not None for linear in linears)
            and all(_affine_norm(norm, eps) for norm in (layer.norm1, layer.norm2))
            and attention.h * attention.d_k == layer.size
            and attention.linear_q_k_v.out_features == 3 * layer.size)


def _compiled_int8(linear: torch.nn.Module, bias: bool) -> bool:
    return (isinstance(linear, TokenwiseInt8Linear) and linear.kernel == "compiled"
            and (linear.bias is not None) == bias)


def _affine_norm(norm: torch.nn.Module, eps: float) -> bool:
    return (isinstance(norm, torch.nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None
            and getattr(norm, "dim", -1) == -1 and norm.eps == eps)


def _native_decoder_layer(layer: torch.nn.Module, first: torch.nn.Module) -> bool:
    """What sanm_decoder.c computes: `layer` a pre-norm SANM decoder layer shaped as the first one
    (or a feed-forward-only one), its feed-forward w1 (with bias) and w2 (without), its
    cross-attention's projections (with biases) per-token int8 on the compiled kernel, its FSMN a
    depthwise convolution over its last kernel_size - 1 inputs, its norms affine with one eps."""
    size, eps, feed_forward = first.size, first.norm1.eps, getattr(layer, "feed_forward", None)
    if (feed_forward is None or layer.size != size or not _affine_norm(layer.norm1, eps)
            or not _affine_norm(getattr(feed_forward, "norm", None), eps)
            or not _compiled_int8(feed_forward.w_1, bias=True) or not _compiled_int8(feed_forward.w_2, bias=False)
            or feed_forward.w_1.out_features != first.feed_forward.w_1.out_features
            or not isinstance(feed_forward.activation, torch.nn.ReLU)):
        return False
    if layer.src_attn is None:
        return layer.self_attn is None
    cross, fsmn = layer.src_attn, layer.self_attn
    if fsmn is None or first.src_attn is None:
        return False
    conv = fsmn.fsmn_block
    return (all(_affine_norm(norm, eps) for norm in (layer.norm2, layer.norm3))
            and all(_compiled_int8(linear, bias=True) for linear in (cross.linear_q, cross.linear_k_v,
                                                                     cross.linear_out))
            and cross.h == first.src_attn.h and cross.h * cross.d_k == size
            and cross.linear_k_v.out_features == 2 * size
            and conv.bias is None and tuple(conv.weight.shape) == (size, 1, first.self_attn.kernel_size)
            and conv.padding == (0,) and conv.stride == (1,) and conv.dilation == (1,))


__all__ = ["NativeInt8Decoder", "NativeInt8Encoder", "native_auto_kernel", "sanm_decoder_library",
           "sanm_encoder_library"]
