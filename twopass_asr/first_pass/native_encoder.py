"""The first pass's encoder layers in int8 on the compiled kernel, all of them in one C call per
batched step (twopass_asr/kernels/sanm_encoder.c).

On a CPU without int8 dot products (AVX2 alone) the int8 products run no faster than float32's,
and a one-stream round of the fused fbgemm layers (fused_encoder) spent about a third of its
time outside them: the layer norms, attention and per-row passes as some thirty torch and C calls
a layer from Python, fifty layers a round (perf/RESULTS.md, 2026-12-05, sessions 20 and 24).
Here a round's encoder is one call that releases the GIL, its products those of tokenwise_int8's
compiled kernel (fbgemm's recipe and bits).

A stream's rows depend on its own rows alone, so it gets the same bits alone or batched; the
float work (norms, attention) is summed in another order than torch's, so it agrees with the
fused layers to float rounding (the tests bound it).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from twopass_asr.first_pass.fused_encoder import fsmn_taps, sanm_layer_kernel
from twopass_asr.kernels.decode_step import INPUT_STEP, Int8LayerStruct, decode_step_library
from twopass_asr.kernels.row_kernels import FLAGS as ROW_SCALING_FLAGS
from twopass_asr.kernels.row_kernels import compiled_library_or_none

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
SOURCES = tuple(KERNELS / name for name in ("sanm_encoder.c", "row_scaling.c", "int8_product.h"))
LIBRARY = "sanm_encoder.so"
# row_scaling.c's flags (its FSMN memory keeps torch's bits), and the sums over a row in SIMD lanes.
FLAGS = (*ROW_SCALING_FLAGS, "-fopenmp-simd")

_pointer, _size, _real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class SanmLayerStruct(ctypes.Structure):
    """sanm_encoder.c's sanm_layer."""
    _fields_ = [("norm1_weight", _pointer), ("norm1_bias", _pointer), ("norm2_weight", _pointer),
                ("norm2_bias", _pointer), ("qkv", Int8LayerStruct), ("out", Int8LayerStruct), ("w1", Int8LayerStruct),
                ("w2", Int8LayerStruct), ("qkv_bias", _pointer), ("out_bias", _pointer), ("w1_bias", _pointer),
                ("w2_bias", _pointer), ("fsmn_taps", _pointer), ("fsmn_width", _size), ("fsmn_left", _size),
                ("in_size", _size)]


class SanmEncoderStruct(ctypes.Structure):
    """sanm_encoder.c's sanm_encoder."""
    _fields_ = [("layers", _size), ("size", _size), ("heads", _size), ("head_dim", _size), ("hidden", _size),
                ("norm_eps", _real), ("input_step", _real), ("layer", ctypes.POINTER(SanmLayerStruct))]


@functools.cache
def sanm_encoder_library() -> ctypes.CDLL | None:
    """sanm_encoder.c compiled for this CPU (row_kernels.compiled_library_or_none), once per
    process; None, with one warning, where it cannot be."""
    library = compiled_library_or_none(SOURCES, LIBRARY, FLAGS,
                                       "the first pass's int8 takes fbgemm under auto, its encoder layers as torch "
                                       "calls on the compiled kernel (slower)")
    if library is None:
        return None
    model = ctypes.POINTER(SanmEncoderStruct)
    library.sanm_encode.argtypes = [model, _size, _size, _pointer, _pointer, _pointer, _pointer, _pointer, _pointer,
                                    _size, _pointer]
    library.sanm_encode.restype = None
    library.encode_scratch_floats.argtypes = [model, _size, _size]
    library.encode_scratch_floats.restype = _size
    return library


def auto_kernel_without_dot_products() -> str:
    """The first pass's int8 kernel under auto on a CPU without int8 dot products: the compiled
    one, which runs the encoder's layers natively here, where its C code compiles; else fbgemm
    (the failed compile has warned)."""
    return "compiled" if sanm_encoder_library() is not None and decode_step_library() is not None else "fbgemm"


def _vector(values: torch.Tensor) -> torch.Tensor:
    return values.detach().float().contiguous()


class NativeInt8Encoder:
    """The SANM encoder layers `layers` (FunASR's EncoderLayerSANM, their linear layers
    TokenwiseInt8Linear on the compiled kernel) in sanm_encoder.c; build with `for_layers`."""

    def __init__(self, layers: list[torch.nn.Module], library: ctypes.CDLL):
        self.library = library
        first, attention = layers[0], layers[0].self_attn
        self.size, self.in_size = first.size, first.in_size
        self._kept: list[torch.Tensor] = []  # what the structures point into
        structs = [self._layer_struct(layer) for layer in layers]
        self._layers = (SanmLayerStruct * len(structs))(*structs)
        norm = first.norm1
        self.struct = SanmEncoderStruct(len(layers), self.size, attention.h, attention.d_k,
                                        first.feed_forward.w_1.out_features, norm.eps, INPUT_STEP, self._layers)

    def _keep(self, tensor: torch.Tensor) -> int:
        self._kept.append(tensor)
        return tensor.data_ptr()

    def _layer_struct(self, layer: torch.nn.Module) -> SanmLayerStruct:
        attention, feed_forward = layer.self_attn, layer.feed_forward
        linears = (attention.linear_q_k_v, attention.linear_out, feed_forward.w_1, feed_forward.w_2)
        taps = fsmn_taps(layer)
        return SanmLayerStruct(
            self._keep(_vector(layer.norm1.weight)), self._keep(_vector(layer.norm1.bias)),
            self._keep(_vector(layer.norm2.weight)), self._keep(_vector(layer.norm2.bias)),
            *(linear.packed.struct for linear in linears),
            *(self._keep(_vector(linear.bias)) for linear in linears),
            self._keep(taps), taps.shape[0], attention.pad_fn.padding[0], layer.in_size)

    @classmethod
    def for_layers(cls, layers: list[torch.nn.Module]) -> NativeInt8Encoder | None:
        """The native layers, or None where they do not apply: a layer not the fused encoder's
        configuration on the compiled kernel, with biases and affine norms, a width change after
        the first layer, or no compiled library (sanm_encoder_library has warned)."""
        if not layers or not all(sanm_layer_kernel(layer) == "compiled" and _native(layer) for layer in layers):
            return None
        size = layers[0].size
        if any(layer.size != size or layer.in_size != size for layer in layers[1:]):
            return None
        library = sanm_encoder_library()
        return None if library is None else cls(layers, library)

    def encode(self, x: torch.Tensor, lengths: torch.Tensor, look_back) -> torch.Tensor:
        """Every layer over frames x [batch, time, in_size] (each stream's first lengths[i] its
        own; int64); look_back: the batch's _LookBackBuffer, whose keys and values get each
        layer's current frames. Returns the last layer's output [batch, time, size]."""
        batch, time, features = x.shape
        if features != self.in_size or x.dtype != torch.float32:
            raise ValueError(f"expected float32 frames of {self.in_size} features, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        lengths = lengths.to(torch.int64).contiguous()
        history_lengths = torch.tensor(look_back.history_lengths, dtype=torch.int64)
        keys, values = look_back.keys, look_back.values
        if not (keys.is_contiguous() and values.is_contiguous() and keys.shape[3] == look_back.history + time):
            raise ValueError("the look-back buffer must be contiguous with room for this step's frames")
        out = torch.empty((batch, time, self.size))
        scratch = torch.empty(self.library.encode_scratch_floats(ctypes.byref(self.struct), batch * time,
                                                                 look_back.history + time))
        self.library.sanm_encode(ctypes.byref(self.struct), batch, time, x.data_ptr(), out.data_ptr(),
                                 lengths.data_ptr(), keys.data_ptr(), values.data_ptr(), history_lengths.data_ptr(),
                                 look_back.history, scratch.data_ptr())
        return out


def _native(layer: torch.nn.Module) -> bool:
    """What sanm_encoder.c assumes beyond the fused encoder's checks: biases on the four linear
    layers, affine layer norms over the last dimension, heads that split the width."""
    attention, feed_forward = layer.self_attn, layer.feed_forward
    linears = (attention.linear_q_k_v, attention.linear_out, feed_forward.w_1, feed_forward.w_2)
    norms = (layer.norm1, layer.norm2)
    return (all(linear.bias is not None for linear in linears)
            and all(isinstance(norm, torch.nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None
                    and getattr(norm, "dim", -1) == -1 for norm in norms)
            and attention.h * attention.d_k == layer.size
            and attention.linear_q_k_v.out_features == 3 * layer.size)


__all__ = ["NativeInt8Encoder", "auto_kernel_without_dot_products", "sanm_encoder_library"]
