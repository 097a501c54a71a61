"""CPU priority of the second pass on cores it shares with the first pass.

On a CPU-only machine the second pass (Fun-ASR-Nano's encoder and vLLM's CPU processes)
and the first pass (VAD, Paraformer) compete for the same cores. The first pass has a
deadline every chunk; the second pass can use whatever CPU is left. Raising the second
pass's nice value lets the scheduler give the first pass the cores when both want them.
"""

from __future__ import annotations

import os
from pathlib import Path

from twopass_asr.parameters import whole_number

MAX_NICE = 19
# Far enough below the first pass to keep its partials coming, not so far that other work on a
# shared machine starves the second pass (perf/RESULTS.md, 2026-11-29 evening, lower CPU priority).
DEFAULT_CPU_NICE = 10


def nice_setting(value: str | None, device: str) -> int:
    """The `cpu_nice` parameter: how far to lower this process's CPU priority (0-19).
    Empty: DEFAULT_CPU_NICE on CPU, 0 on a GPU, where the LLM does not use the cores."""
    if not value:
        return DEFAULT_CPU_NICE if device == "cpu" else 0
    nice = whole_number(value, "parameter cpu_nice", minimum=0)
    if nice > MAX_NICE:
        raise ValueError(f"parameter cpu_nice must be at most {MAX_NICE}, got {value!r}")
    return nice


def lower_priority(increment: int) -> None:
    """Add `increment` to the nice value of every thread of this process, up to 19.

    Linux keeps a nice value per thread: os.nice() would change the calling thread only.
    Threads and processes started afterwards (torch's OpenMP pool, vLLM's engine processes)
    inherit their creator's value."""
    if increment <= 0:
        return
    for task in Path("/proc/self/task").iterdir():
        tid = int(task.name)
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, current + increment))
        except ProcessLookupError:
            continue  # the thread ended meanwhile


__all__ = ["DEFAULT_CPU_NICE", "lower_priority", "nice_setting"]
