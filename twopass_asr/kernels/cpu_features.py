"""What this CPU can compute fast: the flags that decide precision and kernel choices, and a
one-line summary every benchmark prints (our machines differ from session to session)."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The flags that change which precision is fastest: int8 dot products, bf16 arithmetic, AMX tiles.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# Linux's request for AMX's tile state (arch/x86/include/uapi/asm/prctl.h, asm/fpu/types.h).
SYS_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The first processor's flags; None where /proc/cpuinfo cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    found = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return set(found.group(1).split()) if found else set()


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16, AMX, Arm BF16). Without it
    vLLM's CPU kernels convert every bf16 weight to float32 on the fly, slower than float32
    throughout (perf/RESULTS.md, 2026-11-28, vLLM in float32 vs bf16). False where the flags
    cannot be read."""
    flags = cpu_flags(cpuinfo)
    return flags is not None and bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_int8_dot_products(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU has the AVX-512 VNNI or AMX int8 instructions onnxruntime's int8 matrix
    kernels use for their fast path (AVX-VNNI alone, on AVX2 cores, is not counted: not
    measured; on AVX2 without it int8 measured slower than float32 once batched). False where
    the flags cannot be read."""
    flags = cpu_flags(cpuinfo)
    return flags is not None and bool(flags & {"avx512_vnni", "amx_int8"})


def amx_tiles_granted() -> bool:
    """Whether Linux lets this process use AMX's tiles. It asks for them (arch_prctl
    ARCH_REQ_XCOMP_PERM), as oneDNN, onnxruntime and the compiled int8 kernel do before their
    first tile, each falling back to AVX-512 when refused: by a CPU without AMX, a kernel before
    5.16, or a seccomp filter (perf/without_amx.py). Asking twice is harmless."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long]
    syscall.restype = ctypes.c_long
    return syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def amx_tiles_refused(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU lists AMX's tiles but Linux refuses them to this process: libraries that
    read the flags alone then fail at their first tile instruction (vLLM's attention, for one)."""
    flags = cpu_flags(cpuinfo) or set()
    return bool(flags & {"amx_tile", "amx_int8", "amx_bf16"}) and not amx_tiles_granted()


def cpu_has_amx_int8(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this process can run AMX's int8 tiles (the CPU lists them and Linux grants them),
    the one case in which oneDNN's product of signed int8 inputs (tokenwise_int8's onednn kernel)
    runs fast: held to AVX-512 VNNI, oneDNN took its reference kernel for it (perf/RESULTS.md,
    2026-12-06, session 30). False where the flags cannot be read."""
    flags = cpu_flags(cpuinfo)
    return flags is not None and "amx_int8" in flags and amx_tiles_granted()


def cpu_summary(cpuinfo: Path = CPUINFO) -> str:
    """e.g. 'Intel(R) Xeon(R) Platinum 8481C, 2 cores: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16', with
    ' (AMX tiles refused by Linux)' where this machine lists AMX but Linux refuses this process its tiles."""
    try:
        model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo.read_text(), re.MULTILINE)
    except OSError:
        model = None
    flags = cpu_flags(cpuinfo) or set()
    present = " ".join(flag for flag in RELEVANT_FLAGS if flag in flags) or "none of " + " ".join(RELEVANT_FLAGS)
    if cpuinfo == CPUINFO and amx_tiles_refused():
        present += " (AMX tiles refused by Linux)"
    return f"{model.group(1) if model else 'unknown CPU'}, {os.cpu_count()} cores: {present}"
