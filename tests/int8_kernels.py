"""The kernels of the per-token int8 layers (twopass_asr.kernels.tokenwise_int8) as test
parameters: fbgemm everywhere, oneDNN only where the CPU has int8 dot products, the one kind of
CPU it is chosen and allowed on."""

import pytest

from twopass_asr.kernels.cpu_features import cpu_has_int8_dot_products

TOKENWISE_KERNEL_PARAMS = [
    pytest.param("fbgemm"),
    pytest.param("onednn", marks=pytest.mark.skipif(not cpu_has_int8_dot_products(),
                                                    reason="oneDNN's int8 runs where AVX-512 VNNI or AMX int8 do")),
]
