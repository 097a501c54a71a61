"""The compiled bf16 product (decode_step.c's bf16_product.h, CompiledBf16Weights), which the
torch bf16 LLM runs on: its inputs rounded to bf16 as torch rounds them, its sums those of the
rounded inputs and weights to float rounding, on every instruction set's path."""

from __future__ import annotations

import subprocess

import pytest
import torch

from twopass_asr.kernels.bf16_linear import CompiledBf16Linear
from twopass_asr.kernels.cpu_features import cpu_flags
from twopass_asr.kernels.decode_step import (
    FLAGS,
    LIBRARY,
    SIGNATURES,
    SOURCES,
    TILE_OUTPUTS,
    CompiledBf16Weights,
)
from twopass_asr.kernels.row_kernels import c_compiler, compile_library, declare

# Builds of bf16_product.h for the paths it is written for, and the CPU flags each needs: widened
# to float (row by row), AVX-512 BF16's dot products in tile order, and this CPU's own build (on
# AMX's tiles where it has them).
PRODUCT_BUILDS = {
    "widened": (("-march=haswell",), {"avx2"}),
    "avx512-bf16": (("-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"), {"avx512_bf16"}),
    "this-cpu": (("-march=native",), set()),
}


def library_for(build: str, tmp_path):
    march, needs = PRODUCT_BUILDS[build]
    missing = needs - (cpu_flags() or set())
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}")
    compiler = c_compiler()
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run([*compiler, *march, "-o", str(tmp_path / "probe"), str(probe)], capture_output=True).returncode:
        pytest.skip(f"{' '.join(compiler)} does not take {' '.join(march)}")
    flags = tuple(flag for flag in FLAGS if flag != "-march=native") + march
    return declare(compile_library(SOURCES, LIBRARY, flags, tmp_path, compiler), SIGNATURES)


@torch.no_grad()
@pytest.mark.parametrize("build", PRODUCT_BUILDS)
def test_every_path_of_the_bf16_product_sums_the_rounded_inputs_and_weights(build, tmp_path):
    """Each path's product is the float64 product of the bf16 inputs and weights to within float32
    summation's bound (a wrong layout or rounding is off by the size of the terms themselves).
    Row counts under and between blocks of rows (8 on AVX-512, 16 and 32 on tiles), an odd number
    of 16-output blocks, 560 inputs (tile order padded; not on AMX's tiles, which take whole
    ones), 62 inputs (a tile's part only) and a shape that is row by row only."""
    library = library_for(build, tmp_path)
    torch.manual_seed(7)
    for in_features, out_features in ((1024, 208), (560, 224), (62, 48), (1000, 201)):
        weights = torch.randn(out_features, in_features)
        packed = CompiledBf16Weights(weights, library=library)
        ordered = bool(library.bf16_products_native()) and out_features % TILE_OUTPUTS == 0
        assert (packed.tiles is not None) == ordered, (build, in_features, out_features)
        assert torch.equal(packed.weights, weights.bfloat16())
        rounded_weights = weights.bfloat16().double()
        for count in (1, 5, 8, 9, 15, 16, 17, 31, 32, 33, 50, 70):
            batch = torch.randn(count, in_features, generator=torch.Generator().manual_seed(count))
            batch *= torch.logspace(-3, 3, count)[:, None]
            rounded = batch.bfloat16().double()
            expected = rounded @ rounded_weights.T
            bound = in_features * 2.0**-23 * (rounded.abs() @ rounded_weights.abs().T)
            error = (packed.product(batch).double() - expected).abs()
            assert bool((error <= bound).all()), (build, in_features, count, float((error / bound).max()))


@torch.no_grad()
def test_inputs_round_to_the_nearest_bf16_ties_to_even_as_torchs():
    """An identity layer passes each rounded input to its output: every one equals torch's
    bfloat16 of it, ties (exactly halfway between two bf16 values) going to the even one, and the
    largest values just below overflow. Subnormals are left out: the CPU's bf16 dot products and
    tiles take them as zero, where widening keeps them."""
    size = 64
    ulp = 2.0**-7  # of a bf16 at 1
    ties = [1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 2 - ulp / 2, 3.0e38, -3.3e38, 1e-30, 0.0, -0.0]
    values = torch.cat([torch.tensor(ties, dtype=torch.float32), torch.randn(size - len(ties)) * 1e3])
    values = torch.stack([values, values.roll(1) * 1e-20, values.roll(2) * 0.73])
    identity = torch.nn.Linear(size, size, bias=False)
    identity.weight.copy_(torch.eye(size))
    rounded = CompiledBf16Linear(identity)(values)
    assert torch.equal(rounded, values.bfloat16().float())
    assert rounded[0, 0] == 1.0 and rounded[0, 1] == 1 + 2 * ulp  # to even, down and up


def test_the_bf16_layer_is_the_torch_layer_with_its_weights_and_inputs_rounded():
    torch.manual_seed(2)
    linear = torch.nn.Linear(96, 48)
    x = torch.randn(3, 5, 96)
    layer = CompiledBf16Linear(linear)
    expected = torch.nn.functional.linear(x.bfloat16().float(), linear.weight.bfloat16().float(), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x).shape == (3, 5, 48) and layer.weight().dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float32 rows of 96"):
        layer.packed.product(x[0].double())
