"""The kernels of the per-token int8 layers (twopass_asr.kernels.tokenwise_int8) as test
parameters: fbgemm and the compiled kernel everywhere, oneDNN only where the CPU has AMX int8,
the one kind of CPU it is chosen and allowed on."""

import pytest

from twopass_asr.kernels.int8_recipe import int8_kernels_on_this_cpu

# The kernels whose products the first pass's fused encoder layers run around (fused_encoder).
FUSED_KERNEL_PARAMS = [
    pytest.param("fbgemm"),
    pytest.param("onednn", marks=pytest.mark.skipif("onednn" not in int8_kernels_on_this_cpu(),
                                                    reason="oneDNN's int8 runs where AMX int8 does")),
]
TOKENWISE_KERNEL_PARAMS = [*FUSED_KERNEL_PARAMS, pytest.param("compiled")]
