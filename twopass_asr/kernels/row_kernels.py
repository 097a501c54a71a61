"""The per-row work around tokenwise_int8's int8 products on oneDNN (each row's largest
magnitude, its quantization, the output's scaling back), compiled from row_scaling.c for this
CPU.

torch does each as several full passes over the rows (abs, amax, divide, multiply, round, cast;
the scaled output into a new tensor), and in a 46-stream first-pass round on AMX they took
twice the CPU of the int8 products themselves (perf/RESULTS.md, 2026-12-04, session 14). The C
functions make one pass per row while it is in cache and scale the output in place, with the
same bits as torch's operations; the call releases the GIL, so the first pass's worker threads
overlap there too. fbgemm's product quantizes its float input itself, so there the C functions
would save little, and their calls from Python cost more than they save at a few rows (the torch
int8 LLM's one token a step): it keeps torch's operations.

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

SOURCE = Path(__file__).with_name("row_scaling.c")
LIBRARY = "row_scaling.so"
CACHE_ENV = "TWOPASS_ASR_KERNEL_CACHE"
# No contraction of a multiply and an add into one rounding: torch's elementwise operations
# round each (the source asks for the one fused multiply-add addcmul has).
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache" / "kernels")


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


class RowKernels:
    """row_scaling.c's functions on torch tensors. Each checks what it is given: the C code
    trusts its pointers and sizes."""

    def __init__(self, library: ctypes.CDLL):
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._quantize = library.quantize_rows
        self._quantize.argtypes = [pointer, size, size, pointer, pointer]
        self._scale = library.scale_rows
        self._scale.argtypes = [pointer, size, size, pointer, pointer]
        for function in (self._quantize, self._scale):
            function.restype = None

    @staticmethod
    def _check_rows(x: torch.Tensor) -> tuple[int, int]:
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(f"rows must be a contiguous 2-D float32 CPU tensor, got {x.dtype} {tuple(x.shape)} "
                             f"on {x.device}{'' if x.is_contiguous() else ', not contiguous'}")
        return x.shape[0], x.shape[1]

    def quantize_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 steps on -127..127 of each row over its largest magnitude, the magnitudes [rows])."""
        rows, columns = self._check_rows(x)
        steps, scales = torch.empty((rows, columns), dtype=torch.int8), torch.empty(rows)
        self._quantize(x.data_ptr(), rows, columns, steps.data_ptr(), scales.data_ptr())
        return steps, scales

    def scale_rows_(self, y: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        """In place: y's rows (products of quantize_rows' steps) times scales / 127, plus bias."""
        rows, columns = self._check_rows(y)
        if scales.shape != (rows,) or scales.dtype != torch.float32 or not scales.is_contiguous():
            raise ValueError(f"scales must be {rows} contiguous float32 values, "
                             f"got {scales.dtype} {tuple(scales.shape)}")
        if bias is not None and (bias.shape != (columns,) or bias.dtype != torch.float32 or not bias.is_contiguous()):
            raise ValueError(f"bias must be {columns} contiguous float32 values, got {bias.dtype} {tuple(bias.shape)}")
        self._scale(y.data_ptr(), rows, columns, scales.data_ptr(), None if bias is None else bias.data_ptr())


def compile_row_kernels(cache_dir: Path, compiler: list[str]) -> RowKernels:
    """row_scaling.c compiled by `compiler` for this CPU into `cache_dir` (an export of the
    source, store.export_cache: reused while source, flags, compiler and CPU are the same) and
    loaded. Raises OSError or subprocess.CalledProcessError where that fails."""

    def build(directory: Path) -> None:
        subprocess.run([*compiler, *FLAGS, "-o", str(directory / LIBRARY), str(SOURCE), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)

    depends_on = json.dumps([FLAGS, compiler, sorted(cpu_flags() or ())])
    built = cached_export(SOURCE, depends_on, cache_dir, lambda directory: (directory / LIBRARY).is_file(), build)
    return RowKernels(ctypes.CDLL(str(built / LIBRARY)))


@functools.cache
def row_kernels() -> RowKernels | None:
    """The compiled kernels (compile_row_kernels into default_cache_dir with $CC or cc), once per
    process; None, with one warning, where they cannot be had."""
    compiler = _compiler()
    try:
        return compile_row_kernels(default_cache_dir(), compiler)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        log.warning("int8 layers keep torch's per-row operations (slower): compiling %s with %s failed: %s",
                    SOURCE.name, " ".join(compiler), str(detail).strip()[-500:])
        return None


__all__ = ["CACHE_ENV", "RowKernels", "compile_row_kernels", "default_cache_dir", "row_kernels"]
