"""decode_step.c on torch tensors: the project's own int8 product (int8_product.h, the
"compiled" kernel of tokenwise_int8) and bf16 product (bf16_product.h), and the C structures of
the Qwen3 forward pass built on them (twopass_asr.second_pass.native_decode runs it for the
prefill and each decode step).

The product takes tokenwise_int8's fbgemm recipe (weights on 63 levels per output channel,
each row over its largest magnitude in uint8 steps of 2/255 around 128) and gives fbgemm's
bits for it (the tests compare them); it exists so that a decode step (and the first pass's
encoder and decoder layers, twopass_asr.first_pass.native_layers) can run in one C call with no
torch operator between its products.

Compiled at first use as row_kernels compiles row_scaling.c (same cache, keyed the same way),
with OpenMP for its two threads. Where that fails, decode_step_library() is None, one warning
says why, and the torch LLM stays on fbgemm (int8) or torch's bf16, with HF's decode steps.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from twopass_asr.kernels.row_kernels import C_POINTER, C_REAL, C_SIZE, compiled_library_or_none, pointer_or_none

SOURCES = tuple(Path(__file__).with_name(name) for name in ("decode_step.c", "int8_product.h", "bf16_product.h",
                                                           "amx_tiles.h", "row_magnitude.h", "exp_nonpositive.h"))
LIBRARY = "decode_step.so"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
# fbgemm's input quantization in tokenwise_int8: rows over their magnitude, on [-1, 1] in 255 steps.
INPUT_STEP = 2.0 / 255.0

# The levels of each output's weights in a bf16 head's int8 screen (Bf16HeadScreen): the more, the
# tighter its bounds and the fewer bf16 blocks a row reads.
SCREEN_LEVELS = 127
# A tile of weights: 16 outputs by 64 inputs in int8 (int8_product.h), by 32 in bf16 (bf16_product.h).
TILE_OUTPUTS, TILE_INPUTS, BF16_TILE_INPUTS = 16, 64, 32


class Int8LayerStruct(ctypes.Structure):
    """int8_product.h's int8_layer."""
    _fields_ = [("weights", C_POINTER), ("scales", C_POINTER), ("sums", C_POINTER), ("outputs", C_SIZE),
                ("inputs", C_SIZE), ("tiles", C_POINTER)]


class Bf16LayerStruct(ctypes.Structure):
    """bf16_product.h's bf16_layer."""
    _fields_ = [("weights", C_POINTER), ("outputs", C_SIZE), ("inputs", C_SIZE), ("tiles", C_POINTER)]


class ProjectionStruct(ctypes.Structure):
    """decode_step.c's projection: int8 or bf16, the other left empty."""
    _fields_ = [("int8", Int8LayerStruct), ("bf16", Bf16LayerStruct)]


class DecoderLayerStruct(ctypes.Structure):
    """decode_step.c's decoder_layer."""
    _fields_ = [("input_norm", C_POINTER), ("post_attention_norm", C_POINTER), ("query_norm", C_POINTER),
                ("key_norm", C_POINTER), ("qkv", ProjectionStruct), ("output", ProjectionStruct),
                ("gate_up", ProjectionStruct), ("down", ProjectionStruct), ("keys", C_POINTER), ("values", C_POINTER)]


class HeadScreenStruct(ctypes.Structure):
    """decode_step.c's head_screen."""
    _fields_ = [("weights", Int8LayerStruct), ("magnitudes", C_POINTER), ("rounding", C_POINTER)]


class Qwen3ModelStruct(ctypes.Structure):
    """decode_step.c's qwen3_model."""
    _fields_ = [("layers", C_SIZE), ("hidden", C_SIZE), ("heads", C_SIZE), ("kv_heads", C_SIZE), ("head_dim", C_SIZE),
                ("intermediate", C_SIZE), ("slots", C_SIZE), ("capacity", C_SIZE), ("norm_eps", C_REAL),
                ("input_step", C_REAL), ("bf16_products", ctypes.c_int), ("inverse_frequencies", C_POINTER),
                ("layer", ctypes.POINTER(DecoderLayerStruct)), ("final_norm", C_POINTER), ("head", ProjectionStruct),
                ("screen", HeadScreenStruct)]


SIGNATURES = {
    "qwen3_forward": ([ctypes.POINTER(Qwen3ModelStruct), C_SIZE, C_POINTER, C_POINTER, C_POINTER, C_POINTER, C_POINTER,
                       C_POINTER, C_SIZE, C_POINTER, C_POINTER, C_POINTER, ctypes.c_int], None),
    "step_scratch_floats": ([ctypes.POINTER(Qwen3ModelStruct), C_SIZE], C_SIZE),
    "int8_rows_product": ([ctypes.POINTER(Int8LayerStruct), C_POINTER, C_SIZE, C_REAL, C_POINTER, C_POINTER, C_POINTER,
                           ctypes.c_int], None),
    "bf16_rows_product": ([ctypes.POINTER(Bf16LayerStruct), C_POINTER, C_SIZE, C_POINTER, C_POINTER, ctypes.c_int],
                          None),
    "int8_tile_inputs": ([], ctypes.c_int),
    "bf16_products_native": ([], ctypes.c_int),
    "int8_product_uses_avx512_vnni": ([], ctypes.c_int),
}


@functools.cache
def decode_step_library() -> ctypes.CDLL | None:
    """decode_step.c compiled for this CPU (row_kernels.compiled_library_or_none), once per
    process; None, with one warning, where it cannot be."""
    return compiled_library_or_none(SOURCES, LIBRARY, FLAGS, "the torch LLM stays on fbgemm (int8) or torch's bf16, "
                                    "with HF's decode steps (slower)", SIGNATURES)


def require_decode_step_library() -> ctypes.CDLL:
    library = decode_step_library()
    if library is None:
        raise RuntimeError(f"{SOURCES[0].name} could not be compiled (see the warning logged): the compiled int8 "
                           "and bf16 kernels and the C decode step are unavailable")
    return library


def products_use_avx512_vnni() -> bool:
    """Whether this process's compiled products use AVX-512 VNNI (and AMX's tiles where Linux
    grants them), the int8 dot products cpu_features counts; other builds sum with AVX-VNNI or
    AVX2's pairs (int8_product.h)."""
    library = decode_step_library()
    return library is not None and bool(library.int8_product_uses_avx512_vnni())


_INPUT_STEP_FLOAT32 = torch.tensor(INPUT_STEP, dtype=torch.float32)


def _stored_scales(weight_scales: torch.Tensor) -> torch.Tensor:
    """Each output's scale as int8_product.h applies it to that output's sums: times the input
    step, in float32."""
    return (weight_scales.float().reshape(-1) * _INPUT_STEP_FLOAT32).contiguous()


class CompiledInt8Weights:
    """An int8 layer's weights as int8_product.h takes them: int8 [outputs, inputs] on -63..63
    (in tile order, padded with zeros to whole tiles, where `library` takes it for the shape,
    unless `tiles` is False), each output's scale times the input step, and each output's weight
    sum. `library`: the build of decode_step.c that runs the product, declared (SIGNATURES), this
    process's by default."""

    def __init__(self, weights: torch.Tensor, weight_scales: torch.Tensor, tiles: bool = True,
                 library: ctypes.CDLL | None = None):
        if weights.dtype != torch.int8 or weights.dim() != 2:
            raise ValueError(f"expected 2-D int8 weights, got {weights.dtype} {tuple(weights.shape)}")
        self.library = require_decode_step_library() if library is None else library
        self.outputs, self.inputs = weights.shape
        self.scales = _stored_scales(weight_scales)
        self.sums = weights.sum(1, dtype=torch.int32).contiguous()
        multiple = self.library.int8_tile_inputs()
        if tiles and multiple and self.outputs % TILE_OUTPUTS == 0 and self.inputs % multiple == 0:
            # One copy only: the row-major weights are not kept beside the tiles.
            padded = torch.nn.functional.pad(weights, (0, -self.inputs % TILE_INPUTS))
            self._row_major, self.tiles = None, padded.view(
                self.outputs // TILE_OUTPUTS, TILE_OUTPUTS, padded.shape[1] // TILE_INPUTS, TILE_OUTPUTS, 4).permute(
                0, 2, 3, 1, 4).contiguous()
        else:
            self._row_major, self.tiles = weights.contiguous(), None
        self.struct = Int8LayerStruct(pointer_or_none(self._row_major), self.scales.data_ptr(), self.sums.data_ptr(),
                                      self.outputs, self.inputs, pointer_or_none(self.tiles))

    @property
    def weights(self) -> torch.Tensor:
        """The int8 weights [outputs, inputs], row by row."""
        if self._row_major is not None:
            return self._row_major
        return self.tiles.permute(0, 3, 1, 2, 4).reshape(self.outputs, -1)[:, :self.inputs]

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """The layer over float32 rows [rows, inputs] (without bias): [rows, outputs]."""
        if rows.dim() != 2 or rows.shape[1] != self.inputs or rows.dtype != torch.float32:
            raise ValueError(f"expected float32 rows of {self.inputs}, got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.contiguous()
        count = rows.shape[0]
        quantized, row_scales = torch.empty(count, self.inputs, dtype=torch.uint8), torch.empty(count)
        out = torch.empty(count, self.outputs)
        self.library.int8_rows_product(ctypes.byref(self.struct), rows.data_ptr(), count, INPUT_STEP,
                                       quantized.data_ptr(), row_scales.data_ptr(), out.data_ptr(),
                                       torch.get_num_threads())
        return out


class CompiledBf16Weights:
    """A linear layer's weights in bf16 as bf16_product.h takes them: [outputs, inputs] (in tile
    order, padded with zeros to whole tiles, where `library`'s products are native and the shape
    suits). `library`: the build of decode_step.c that runs the product, this process's by
    default."""

    def __init__(self, weights: torch.Tensor, library: ctypes.CDLL | None = None):
        if not weights.dtype.is_floating_point or weights.dim() != 2:
            raise ValueError(f"expected 2-D float weights, got {weights.dtype} {tuple(weights.shape)}")
        self.library = require_decode_step_library() if library is None else library
        self.outputs, self.inputs = weights.shape
        rounded = weights.detach().to(torch.bfloat16).view(torch.int16)
        if self.library.bf16_products_native() and self.outputs % TILE_OUTPUTS == 0 and self.inputs % 2 == 0:
            padded = torch.nn.functional.pad(rounded, (0, -self.inputs % BF16_TILE_INPUTS))
            self._row_major, self.tiles = None, padded.view(
                self.outputs // TILE_OUTPUTS, TILE_OUTPUTS, padded.shape[1] // BF16_TILE_INPUTS, TILE_OUTPUTS,
                2).permute(0, 2, 3, 1, 4).contiguous()
        else:
            self._row_major, self.tiles = rounded.contiguous(), None
        self.struct = Bf16LayerStruct(pointer_or_none(self._row_major), self.outputs, self.inputs,
                                      pointer_or_none(self.tiles))

    @property
    def weights(self) -> torch.Tensor:
        """The bf16 weights [outputs, inputs], row by row."""
        if self._row_major is not None:
            return self._row_major.view(torch.bfloat16)
        return self.tiles.permute(0, 3, 1, 2, 4).reshape(self.outputs, -1)[:, :self.inputs].view(torch.bfloat16)

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """The layer over float32 rows [rows, inputs] (without bias), each rounded to bf16 first:
        [rows, outputs] in float32."""
        if rows.dim() != 2 or rows.shape[1] != self.inputs or rows.dtype != torch.float32:
            raise ValueError(f"expected float32 rows of {self.inputs}, got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.contiguous()
        count = rows.shape[0]
        rounded, out = torch.empty(count, self.inputs, dtype=torch.int16), torch.empty(count, self.outputs)
        self.library.bf16_rows_product(ctypes.byref(self.struct), rows.data_ptr(), count, rounded.data_ptr(),
                                       out.data_ptr(), torch.get_num_threads())
        return out


class Bf16HeadScreen:
    """The int8 copy of a bf16 output head (CompiledBf16Weights) by which the C pass finds a row's
    greedy token reading half the head's bytes, the same token as the whole bf16 head gives
    (decode_step.c's screened_head): each output's weights on SCREEN_LEVELS levels, the sum of its
    bf16 weights' magnitudes, and the largest difference between a bf16 weight and the value the
    int8 product gives it, both rounded up to float. Only where the bf16 product is native (tile
    order) and the int8 one sums with VNNI or AMX: AVX2's 16-bit pair sums would overflow on 127
    levels."""

    @staticmethod
    def suits(head: CompiledBf16Weights) -> bool:
        """Whether `head` can have a screen: its weights in tile order, its library's int8 products
        summed with VNNI or AMX."""
        return head.tiles is not None and bool(head.library.int8_product_uses_avx512_vnni())

    def __init__(self, head: CompiledBf16Weights, chunk_rows: int = 8192):
        if not self.suits(head):
            raise ValueError("a head screen needs the native bf16 product's tile order and int8 sums with VNNI or "
                             "AMX")
        exact = head.weights
        quantized = torch.empty(exact.shape, dtype=torch.int8)
        scales = torch.empty(head.outputs)
        magnitudes = torch.empty(head.outputs, dtype=torch.float64)
        rounding = torch.empty(head.outputs, dtype=torch.float64)
        for start in range(0, head.outputs, chunk_rows):
            rows = exact[start:start + chunk_rows].double()
            sizes = rows.abs()
            largest = sizes.amax(1)
            scale = torch.where(largest > 0, largest / SCREEN_LEVELS, torch.ones_like(largest)).float()
            levels = torch.round(rows / scale.double()[:, None]).clamp_(-SCREEN_LEVELS, SCREEN_LEVELS)
            # What the int8 product multiplies each weight by.
            applied = _stored_scales(scale).double() / _INPUT_STEP_FLOAT32.double()
            quantized[start:start + chunk_rows] = levels.to(torch.int8)
            scales[start:start + chunk_rows] = scale
            magnitudes[start:start + chunk_rows] = sizes.sum(1)
            rounding[start:start + chunk_rows] = (rows - levels * applied[:, None]).abs_().amax(1)
        self.weights = CompiledInt8Weights(quantized, scales, library=head.library)
        self.magnitudes, self.rounding = _rounded_up(magnitudes), _rounded_up(rounding)
        self.struct = HeadScreenStruct(self.weights.struct, self.magnitudes.data_ptr(), self.rounding.data_ptr())


def _rounded_up(values: torch.Tensor) -> torch.Tensor:
    """float64 values as the float32 values at or above them."""
    nearest = values.float()
    return torch.where(nearest.double() < values, torch.nextafter(nearest, torch.tensor(float("inf"))),
                       nearest).contiguous()


__all__ = ["BF16_TILE_INPUTS", "Bf16HeadScreen", "Bf16LayerStruct", "CompiledBf16Weights", "CompiledInt8Weights",
           "DecoderLayerStruct", "FLAGS", "HeadScreenStruct", "INPUT_STEP", "Int8LayerStruct", "LIBRARY",
           "ProjectionStruct", "Qwen3ModelStruct", "SCREEN_LEVELS", "SIGNATURES", "SOURCES", "TILE_INPUTS",
           "TILE_OUTPUTS", "decode_step_library", "products_use_avx512_vnni", "require_decode_step_library"]
