"""perf/without_amx.py refuses AMX's tiles to a command and its children, as Linux does on a
CPU without them, under an old kernel or a seccomp filter; the service asks Linux, not only the
CPU's flags, before it counts on them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from twopass_asr import REPO_ROOT
from twopass_asr.kernels.cpu_features import cpu_flags

UNDER_REFUSAL = """
from twopass_asr.kernels.cpu_features import amx_tiles_granted, cpu_has_amx_int8, cpu_summary
from twopass_asr.kernels.int8_recipe import choose_int8_kernel, int8_kernels_on_this_cpu
try:
    choose_int8_kernel("onednn", int8_dot_products=True)
    onednn = "accepted"
except ValueError as error:
    onednn = str(error)
print(amx_tiles_granted(), cpu_has_amx_int8(), choose_int8_kernel("auto", int8_dot_products=True),
      " ".join(int8_kernels_on_this_cpu()), sep="|")
print(onednn)
print(cpu_summary())
"""


def without_amx(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perf.without_amx", *command], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)


def test_a_process_refused_amx_tiles_does_not_count_on_them():
    """Whatever the CPU: no tiles, no oneDNN int8 (its reference kernel without them), the
    summary a benchmark prints says so where the flags list AMX."""
    ran = without_amx(sys.executable, "-c", UNDER_REFUSAL)
    assert ran.returncode == 0, ran.stderr
    choices, onednn, summary = ran.stdout.splitlines()
    assert choices == "False|False|fbgemm|onnxruntime fbgemm compiled"
    assert "onednn needs AMX int8 tiles" in onednn
    lists_amx = bool((cpu_flags() or set()) & {"amx_tile", "amx_int8", "amx_bf16"})
    assert ("AMX tiles refused by Linux" in summary) == lists_amx


def test_the_compiled_product_keeps_fbgemms_bits_when_linux_refuses_amx_tiles():
    """A build for an AMX CPU whose tiles Linux refuses runs its AVX-512 VNNI path on the layers
    of whole tiles: this CPU's own build of the product, checked again in such a process."""
    if "amx_int8" not in (cpu_flags() or set()):
        pytest.skip("this CPU has no AMX: its own build already runs without tiles")
    ran = without_amx(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      "tests/kernels/test_tokenwise_int8.py::test_every_path_of_the_compiled_product_gives_fbgemms_bits"
                      "[this-cpu]")
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    assert "1 passed" in ran.stdout
