"""What this CPU can compute fast: the flags that decide precision and kernel choices, and a
one-line summary every benchmark prints (our machines differ from session to session)."""

from __future__ import annotations

import os
import re
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The flags that change which precision is fastest: int8 dot products, bf16 arithmetic, AMX tiles.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


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


def cpu_has_amx_int8(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU has AMX's int8 tiles, the one kind of CPU oneDNN's product of signed int8
    inputs (tokenwise_int8's onednn kernel) runs fast on: held to AVX-512 VNNI, oneDNN took its
    reference kernel for it (perf/RESULTS.md, 2026-12-06, session 30). False where the flags
    cannot be read."""
    flags = cpu_flags(cpuinfo)
    return flags is not None and "amx_int8" in flags


def cpu_summary(cpuinfo: Path = CPUINFO) -> str:
    """e.g. 'Intel(R) Xeon(R) Platinum 8481C, 2 cores: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16'."""
    try:
        model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo.read_text(), re.MULTILINE)
    except OSError:
        model = None
    flags = cpu_flags(cpuinfo) or set()
    present = " ".join(flag for flag in RELEVANT_FLAGS if flag in flags) or "none of " + " ".join(RELEVANT_FLAGS)
    return f"{model.group(1) if model else 'unknown CPU'}, {os.cpu_count()} cores: {present}"
