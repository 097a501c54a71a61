"""The per-row work around tokenwise_int8's int8 products (each row's largest magnitude, its
quantization, the output's scaling back), and the elementwise passes of the first pass's fused
encoder layers (twopass_asr.first_pass.fused_encoder), compiled from row_scaling.c for this CPU.

torch does each as several full passes over the rows (abs, amax, divide, multiply, round, cast;
the scaled output into a new tensor), and in a 46-stream first-pass round on AMX they took
twice the CPU of the int8 products themselves (perf/RESULTS.md, 2026-12-04, session 14). The C
functions make one pass per row while it is in cache and scale the output in place, with the
same bits as torch's operations; the call releases the GIL, so the first pass's worker threads
overlap there too. A TokenwiseInt8Linear on fbgemm keeps torch's operations: fbgemm's product
quantizes its float input itself, so there the C functions would save little, and their calls
from Python cost more than they save at a few rows (the torch int8 LLM's one token a step). The
fused encoder uses them on both kernels: it saves the passes between the products as well.

Compiled at first use by the system's C compiler ($CC, else cc) with -march=native into the
kernel cache ($TWOPASS_ASR_KERNEL_CACHE, else the project's .cache/kernels), keyed by the
source, the flags, the compiler and the CPU's flags, so another CPU sharing the checkout
compiles its own. Where that fails (no compiler, say), row_kernels() is None, one warning says
why, and tokenwise_int8 keeps torch's operations.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import shlex
import subprocess
from pathlib import Path

import torch

from twopass_asr import REPO_ROOT
from twopass_asr.kernels.cpu_features import cpu_flags
from twopass_asr.store.export_cache import cached_export

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("row_scaling.c", "row_magnitude.h"))
LIBRARY = "row_scaling.so"
CACHE_ENV = "TWOPASS_ASR_KERNEL_CACHE"
# A product's input forms (RowKernels), and their element types.
INPUT_FORMS = {"steps": torch.int8, "quotients": torch.float32}
# No contraction of a multiply and an add into one rounding: torch's elementwise operations
# round each (the source asks for the one fused multiply-add addcmul has).
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")
# The same for the native layers' C (first pass, VAD), whose sums over a row run in SIMD lanes.
SIMD_FLAGS = (*FLAGS, "-fopenmp-simd")
# The C types the kernels' functions take: an address, a size or count (int64_t), a float.
C_POINTER, C_SIZE, C_REAL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# A library's function signatures: its name -> (argument types, result type or None for void).
Signatures = dict[str, tuple[list, type | None]]
# row_scaling.c's.
SIGNATURES: Signatures = {
    "quantize_rows": ([C_POINTER, C_SIZE, C_SIZE, C_POINTER, C_POINTER, C_POINTER], None),
    "scale_rows": ([C_POINTER, C_SIZE, C_SIZE, C_POINTER, C_REAL, C_POINTER], None),
    "scale_relu_quantize_rows": ([C_POINTER, C_SIZE, C_SIZE, C_POINTER, C_REAL, C_POINTER, C_POINTER, C_POINTER,
                                  C_POINTER], None),
    "add_scaled_rows": ([C_POINTER, C_POINTER, C_SIZE, C_SIZE, C_POINTER, C_REAL, C_POINTER, C_POINTER], None),
    "fsmn_memory": ([C_POINTER, C_SIZE, C_SIZE, C_SIZE, C_SIZE, C_POINTER, C_POINTER, C_SIZE, C_SIZE, C_POINTER,
                     C_POINTER], None),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache" / "kernels")


def c_compiler() -> list[str]:
    """The C compiler the kernels are built with: $CC, else cc."""
    return shlex.split(os.environ.get("CC") or "cc")


class RowKernels:
    """row_scaling.c's functions on torch tensors. Each checks what it is given: the C code
    trusts its pointers and sizes.

    A product's input comes in one of the two forms of INPUT_FORMS (row_scaling.c): "steps",
    int8 on -127..127 (oneDNN), or "quotients", float32 (fbgemm). `library` is row_scaling.c
    built and declared (SIGNATURES)."""

    def __init__(self, library: ctypes.CDLL):
        self._quantize = library.quantize_rows
        self._scale = library.scale_rows
        self._scale_relu_quantize = library.scale_relu_quantize_rows
        self._add_scaled = library.add_scaled_rows
        self._fsmn = library.fsmn_memory

    @staticmethod
    def _check_rows(x: torch.Tensor, name: str = "rows") -> tuple[int, int]:
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 2-D float32 CPU tensor, got {x.dtype} {tuple(x.shape)} "
                             f"on {x.device}{'' if x.is_contiguous() else ', not contiguous'}")
        return x.shape[0], x.shape[1]

    @staticmethod
    def _check_vector(values: torch.Tensor | None, size: int, name: str) -> None:
        if values is not None and (values.shape != (size,) or values.dtype != torch.float32
                                   or not values.is_contiguous()):
            raise ValueError(f"{name} must be {size} contiguous float32 values, got {values.dtype} "
                             f"{tuple(values.shape)}")

    @staticmethod
    def _input_buffers(rows: int, columns: int, form: str) -> tuple[torch.Tensor, int | None, int | None]:
        if form not in INPUT_FORMS:
            raise ValueError(f"a product's input form must be one of {', '.join(INPUT_FORMS)}, got {form!r}")
        buffer = torch.empty((rows, columns), dtype=INPUT_FORMS[form])
        return (buffer, buffer.data_ptr(), None) if form == "steps" else (buffer, None, buffer.data_ptr())

    def quantize_rows(self, x: torch.Tensor, form: str = "steps") -> tuple[torch.Tensor, torch.Tensor]:
        """(each row over its largest magnitude as a product's input in `form`, the magnitudes
        [rows])."""
        rows, columns = self._check_rows(x)
        product_input, steps, quotients = self._input_buffers(rows, columns, form)
        scales = torch.empty(rows)
        self._quantize(x.data_ptr(), rows, columns, steps, quotients, scales.data_ptr())
        return product_input, scales

    def scale_rows_(self, y: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    divisor: float = 127.0) -> None:
        """In place: y's rows (a product of quantize_rows' input) times scales / divisor, plus
        bias."""
        rows, columns = self._check_rows(y)
        self._check_vector(scales, rows, "scales")
        self._check_vector(bias, columns, "bias")
        self._scale(y.data_ptr(), rows, columns, scales.data_ptr(), divisor, pointer_or_none(bias))

    def scale_relu_quantize_rows(self, y: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                                 divisor: float, form: str) -> tuple[torch.Tensor, torch.Tensor]:
        """ReLU(y's rows scaled as scale_rows_ does) as the next product's input in `form`, and
        their magnitudes; y is left holding ReLU's output."""
        rows, columns = self._check_rows(y)
        self._check_vector(scales, rows, "scales")
        self._check_vector(bias, columns, "bias")
        product_input, steps, quotients = self._input_buffers(rows, columns, form)
        next_scales = torch.empty(rows)
        self._scale_relu_quantize(y.data_ptr(), rows, columns, scales.data_ptr(), divisor, pointer_or_none(bias), steps,
                                  quotients, next_scales.data_ptr())
        return product_input, next_scales

    def add_scaled_rows_(self, x: torch.Tensor, y: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                         divisor: float, addend: torch.Tensor | None = None) -> None:
        """In place: x += (y's rows scaled as scale_rows_ does) + addend."""
        rows, columns = self._check_rows(x, "x")
        for name, other in (("y", y), ("addend", addend)):
            if other is not None and (self._check_rows(other, name) != (rows, columns)):
                raise ValueError(f"{name} must be {rows} x {columns} like x, got {tuple(other.shape)}")
        self._check_vector(scales, rows, "scales")
        self._check_vector(bias, columns, "bias")
        self._add_scaled(x.data_ptr(), y.data_ptr(), rows, columns, scales.data_ptr(), divisor, pointer_or_none(bias),
                         pointer_or_none(addend))

    def fsmn_memory(self, values: torch.Tensor, lengths: torch.Tensor, taps: torch.Tensor,
                    left: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The SANM encoder's FSMN memory of values [batch, time, columns] (the last dimension
        contiguous, rows any stride apart), each stream's values zeroed from its length (int64
        [batch]) on: (the masked values, their depthwise convolution over time by taps [width,
        columns] with `left` frames of zeros before, plus the masked values), both [batch, time,
        columns]."""
        if values.dim() != 3 or values.dtype != torch.float32 or values.device.type != "cpu" \
                or values.stride(2) != 1 or values.stride(0) != values.shape[1] * values.stride(1):
            raise ValueError(f"values must be float32 CPU [batch, time, columns] with contiguous columns and "
                             f"evenly strided rows, got {values.dtype} {tuple(values.shape)} {values.stride()}")
        batch, time, columns = values.shape
        if lengths.shape != (batch,) or lengths.dtype != torch.int64 or not lengths.is_contiguous():
            raise ValueError(f"lengths must be {batch} contiguous int64 values, "
                             f"got {lengths.dtype} {tuple(lengths.shape)}")
        width = self._check_rows(taps, "taps")[0]
        if taps.shape[1] != columns or not 0 <= left < width:
            raise ValueError(f"taps must be [width, {columns}] with 0 <= left < width, got {tuple(taps.shape)}, "
                             f"left {left}")
        masked, memory = torch.empty((batch, time, columns)), torch.empty((batch, time, columns))
        self._fsmn(values.data_ptr(), values.stride(1), batch, time, columns, lengths.data_ptr(), taps.data_ptr(),
                   width, left, masked.data_ptr(), memory.data_ptr())
        return masked, memory


def pointer_or_none(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def compile_library(sources: tuple[Path, ...], library: str, flags: tuple[str, ...], cache_dir: Path,
                    compiler: list[str]) -> ctypes.CDLL:
    """The C files of `sources` compiled together by `compiler` with `flags` for this CPU into
    `cache_dir` and loaded: an export of the first source (store.export_cache), reused while the
    sources (the headers they include among them), flags, compiler and CPU are the same. Raises
    OSError or subprocess.CalledProcessError where that fails."""

    def build(directory: Path) -> None:
        subprocess.run([*compiler, *flags, "-o", str(directory / library),
                        *(str(source) for source in sources if source.suffix == ".c"), "-lm"],
                       check=True, capture_output=True, text=True, timeout=120)

    others = [[str(source), source.stat().st_size, source.stat().st_mtime_ns] for source in sources[1:]]
    depends_on = json.dumps([flags, compiler, sorted(cpu_flags() or ()), others])
    built = cached_export(sources[0], depends_on, cache_dir, lambda directory: (directory / library).is_file(), build)
    return ctypes.CDLL(str(built / library))


def declare(library: ctypes.CDLL, signatures: Signatures) -> ctypes.CDLL:
    """`library` with its functions' C types set from `signatures`: undeclared, ctypes would pass
    Python ints as C ints, cutting 64-bit sizes and addresses."""
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library


def compile_row_kernels(cache_dir: Path, compiler: list[str]) -> RowKernels:
    """row_scaling.c compiled (compile_library) and loaded."""
    return RowKernels(declare(compile_library(SOURCES, LIBRARY, FLAGS, cache_dir, compiler), SIGNATURES))


def compiled_library_or_none(sources: tuple[Path, ...], library: str, flags: tuple[str, ...], without_it: str,
                             signatures: Signatures) -> ctypes.CDLL | None:
    """compile_library into default_cache_dir with $CC or cc, its functions declared
    (`signatures`); None where that fails, with one warning that says why and what runs instead
    (`without_it`)."""
    compiler = c_compiler()
    try:
        return declare(compile_library(sources, library, flags, default_cache_dir(), compiler), signatures)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        log.warning("%s: compiling %s with %s failed: %s", without_it, sources[0].name, " ".join(compiler),
                    str(detail).strip()[-500:])
        return None


class PinnedTensors:
    """The float32 tensors a compiled library's C structures point into, kept alive beside them:
    calling it with a tensor keeps a contiguous float32 copy and returns its address."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []

    def __call__(self, values: torch.Tensor) -> int:
        tensor = values.detach().float().contiguous()
        self.tensors.append(tensor)
        return tensor.data_ptr()


@functools.cache
def row_kernels() -> RowKernels | None:
    """The compiled kernels (compiled_library_or_none), once per process; None, with one
    warning, where they cannot be had."""
    library = compiled_library_or_none(SOURCES, LIBRARY, FLAGS, "int8 layers keep torch's per-row operations (slower)",
                                       SIGNATURES)
    return None if library is None else RowKernels(library)


__all__ = ["CACHE_ENV", "C_POINTER", "C_REAL", "C_SIZE", "FLAGS", "INPUT_FORMS", "PinnedTensors", "RowKernels",
           "SIGNATURES", "SIMD_FLAGS", "Signatures", "c_compiler", "compile_library", "compile_row_kernels",
           "compiled_library_or_none", "declare", "default_cache_dir", "pointer_or_none", "row_kernels"]
