"""TokenwiseInt8Linear, the int8 layer on fbgemm, oneDNN or the compiled kernel: each input row quantized on its own
range, so a row's output never depends on the rows it is computed with."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.int8_kernels import TOKENWISE_KERNEL_PARAMS
from twopass_asr.kernels.cpu_features import cpu_flags
from twopass_asr.kernels.decode_step import (
    FLAGS,
    LIBRARY,
    SIGNATURES,
    SOURCES,
    TILE_OUTPUTS,
    CompiledInt8Weights,
)
from twopass_asr.kernels.layer_replacement import SharedInputSlice, fuse_shared_input_layers
from twopass_asr.kernels.row_kernels import c_compiler, compile_library, declare
from twopass_asr.kernels.tokenwise_int8 import (
    TOKENWISE_KERNELS,
    TokenwiseInt8Linear,
    int8_per_output_channel,
    replace_linear_layers,
)
from twopass_asr.second_pass.llm_on_torch import quantize_llm_for_torch

IN_FEATURES, OUT_FEATURES = 256, 192


@pytest.fixture(params=[False, True], ids=["no-bias", "bias"])
def linear(request):
    torch.manual_seed(7)
    return torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=request.param)


@pytest.fixture(params=TOKENWISE_KERNEL_PARAMS)
def kernel(request):
    return request.param


def rows(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, IN_FEATURES, generator=torch.Generator().manual_seed(seed))


def relative_error(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approximate - exact).norm() / exact.norm())


@torch.no_grad()
def test_weights_are_int8_per_output_channel_on_the_kernels_levels(linear, kernel):
    levels = {"fbgemm": 63, "onednn": 127, "compiled": 63}[kernel]
    assert TOKENWISE_KERNELS[kernel] == levels
    weights, scales = int8_per_output_channel(linear.weight, levels=levels)
    packed = TokenwiseInt8Linear(linear, kernel).weight()
    assert torch.equal(packed.int_repr(), weights)
    assert torch.equal(packed.int_repr().abs().amax(dim=1), torch.full((OUT_FEATURES,), levels, dtype=torch.int8))
    torch.testing.assert_close(packed.q_per_channel_scales().float(), scales.flatten())


@torch.no_grad()
def test_the_largest_products_do_not_saturate(kernel):
    """AVX2 adds pairs of uint8 x int8 products in 16 bits: every activation and weight at its
    largest is the case that would overflow with 127 weight levels (measured: 12 % error on
    Gaussian rows). On fbgemm's 63 levels, and in oneDNN's 32-bit sums (VNNI, AMX), only the
    rounding of 1 to uint8 is left (255 is 1.004)."""
    linear = torch.nn.Linear(IN_FEATURES, 4, bias=False)
    linear.weight.data = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(4, IN_FEATURES).clone()
    ones = torch.ones(2, IN_FEATURES)
    ones[1] *= -1
    torch.testing.assert_close(TokenwiseInt8Linear(linear, kernel)(ones), linear(ones), rtol=0.005, atol=0)


@torch.no_grad()
def test_a_row_gives_the_same_output_whatever_rows_come_with_it(linear, kernel):
    layer = TokenwiseInt8Linear(linear, kernel)
    batch = rows(6)
    together = layer(batch)
    for start in range(0, 6, 2):
        assert torch.equal(layer(batch[start:start + 2]), together[start:start + 2])
    for row in range(6):  # one segment decoding alone
        assert torch.equal(layer(batch[row:row + 1]), together[row:row + 1])
    assert torch.equal(layer(batch.view(2, 3, IN_FEATURES)), together.view(2, 3, OUT_FEATURES))


@torch.no_grad()
def test_one_token_with_large_activations_leaves_the_others_exact(linear, kernel):
    """What per-token quantization is for: torch's own dynamic int8 layer takes one range for
    all the rows of a call, so one row 1000x larger costs the others their precision there."""
    layer = TokenwiseInt8Linear(linear, kernel)
    batch = rows(8)
    with_outlier = batch.clone()
    with_outlier[0] *= 1000
    assert torch.equal(layer(with_outlier)[1:], layer(batch)[1:])
    assert relative_error(layer(with_outlier)[1:], linear(batch[1:])) < 0.03

    per_call = torch.ao.nn.quantized.dynamic.Linear(IN_FEATURES, OUT_FEATURES, bias_=linear.bias is not None)
    per_call.set_weight_bias(layer.weight(), linear.bias)
    assert relative_error(per_call(with_outlier)[1:], linear(batch[1:])) > 0.3


@torch.no_grad()
@pytest.mark.parametrize("count", [1, 2, 16])
def test_output_is_close_to_the_float_layer(linear, count, kernel):
    batch = rows(count, seed=count)
    assert relative_error(TokenwiseInt8Linear(linear, kernel)(batch), linear(batch)) < 0.03


@torch.no_grad()
def test_an_all_zero_row_gives_the_bias(linear, kernel):
    """Left padding: a row of zeros must not become 0/0."""
    layer = TokenwiseInt8Linear(linear, kernel)
    out = layer(torch.cat([torch.zeros(1, IN_FEATURES), rows(1)]))
    expected = torch.zeros(OUT_FEATURES) if linear.bias is None else linear.bias
    torch.testing.assert_close(out[0], expected)


def test_replace_linear_layers_takes_the_chosen_float32_layers(kernel):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    engine = torch.backends.quantized.engine
    assert replace_linear_layers(model, lambda name: name == "2", kernel) == 1
    assert type(model[0]) is torch.nn.Linear and type(model[2]) is TokenwiseInt8Linear and model[2].kernel == kernel
    assert torch.backends.quantized.engine == engine  # packing for a kernel leaves torch's engine as it was
    with pytest.raises(ValueError, match="the int8 kernel must be one of fbgemm, onednn, compiled, got 'qnnpack'"):
        TokenwiseInt8Linear(torch.nn.Linear(8, 8), "qnnpack")
    half = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16))
    with pytest.raises(ValueError, match="0 is torch.bfloat16"):
        replace_linear_layers(half, lambda name: True)


class GatedBlock(torch.nn.Module):
    """Three projections of one input, as an attention's query, key and value."""

    def __init__(self, bias: bool):
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Linear(IN_FEATURES, 64, bias=bias)
        self.b = torch.nn.Linear(IN_FEATURES, 96, bias=bias)
        self.c = torch.nn.Linear(IN_FEATURES, 32, bias=bias)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], dim=-1)


@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shared_kernel", ["fbgemm", "compiled"])
def test_layers_sharing_an_input_give_their_own_int8_layers_bits_from_one_product(bias, shared_kernel, monkeypatch):
    block, separate = GatedBlock(bias), GatedBlock(bias)
    fuse_shared_input_layers(block, ("a", "b", "c"), lambda linear: TokenwiseInt8Linear(linear, shared_kernel))
    replace_linear_layers(separate, lambda name: True, shared_kernel)
    assert all(type(getattr(block, name)) is SharedInputSlice for name in "abc")
    for name in "abc":
        assert torch.equal(getattr(block, name).weight().int_repr(), getattr(separate, name).weight().int_repr())

    products = []
    fused_call = TokenwiseInt8Linear.forward
    monkeypatch.setattr(TokenwiseInt8Linear, "forward", lambda self, x: products.append(x) or fused_call(self, x))
    for count in (1, 5):
        batch = rows(count, seed=count).view(1, count, IN_FEATURES)
        expected = separate(batch)
        products.clear()
        assert torch.equal(block(batch), expected)
        assert len(products) == 1
    # The product is dropped when the block's forward ends: a slice called on its own computes it again.
    expected = separate.b(batch)
    products.clear()
    assert torch.equal(block.b(batch), expected) and len(products) == 1
    other = rows(2, seed=9)
    expected = separate.c(other)
    products.clear()
    assert torch.equal(block.c(other), expected) and len(products) == 1  # another input, its own product


@torch.no_grad()
@pytest.mark.parametrize("in_features, out_features", [(256, 200), (1000, 201)], ids=["whole-blocks", "with-tails"])
def test_the_compiled_kernel_gives_fbgemms_bits(in_features, out_features):
    """The compiled product (int8_product.h) takes fbgemm's recipe; the torch int8 LLM runs on
    it, so its tokens are those it had on fbgemm. Rows of very different magnitudes, 1 to 9 of
    them (the C product takes rows four at a time), a width that is not a whole number of its
    32-byte vectors and an odd number of outputs (it takes them two at a time)."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    fbgemm, compiled = TokenwiseInt8Linear(linear, "fbgemm"), TokenwiseInt8Linear(linear, "compiled")
    assert torch.equal(compiled.weight().int_repr(), fbgemm.weight().int_repr())
    for count in range(1, 10):
        batch = torch.randn(count, in_features, generator=torch.Generator().manual_seed(count))
        batch *= torch.logspace(-3, 3, count)[:, None]
        assert torch.equal(compiled(batch), fbgemm(batch)), count
    # A quotient whose product with the inverse step rounds to 14.500002 in float32, where
    # fbgemm's fused multiply-add with the zero point lands below 113.5: 114 for fbgemm, and
    # 113 when the product is rounded first.
    tie = torch.zeros(1, in_features)
    tie[0, 0], tie[0, 1] = 1.0, float.fromhex("-0x1.d1d1d8p-4")
    assert torch.equal(compiled(tie), fbgemm(tie))


@torch.no_grad()
def test_quotients_at_the_quantization_boundaries_give_fbgemms_bytes():
    """Every element lying on or next to a boundary between two bytes takes fbgemm's byte: the
    compiled kernel's quotient by the row's magnitude, and its rounding of the quotient times the
    inverse step plus the zero point, are fbgemm's to the last bit. Each row holds, for every
    boundary, the float nearest to it and the two floats on each side; an identity layer passes
    every byte to its own output. Rows of magnitudes from tiny to near float's largest."""
    boundaries = (torch.arange(255, dtype=torch.float64) + 0.5 - 128) / 127.5
    scales = (1.0, 0.7316, 3.3e-3, 123.456, 5e-24, 2.0**-95, 1e30, 2.0**126, 3e38)
    batch = []
    for scale in scales:
        near = [(boundaries * scale).float()]
        for direction in (float("inf"), float("-inf")):
            up_or_down = torch.nextafter(near[0], torch.tensor(direction))
            near += [up_or_down, torch.nextafter(up_or_down, torch.tensor(direction))]
        row = torch.cat([torch.tensor([scale], dtype=torch.float32), *near]).clamp(-scale, scale)
        batch.append(torch.nn.functional.pad(row, (0, 1280 - row.numel())))
    batch = torch.stack(batch)
    identity = torch.nn.Linear(1280, 1280, bias=False)
    identity.weight.copy_(torch.eye(1280))
    fbgemm, compiled = TokenwiseInt8Linear(identity, "fbgemm"), TokenwiseInt8Linear(identity, "compiled")
    assert torch.equal(compiled(batch), fbgemm(batch))


# Builds of int8_product.h for the instruction sets its paths are written for, and the CPU flags
# each needs: AVX2's pair sums, AVX-VNNI's (256 bits), AVX-512 VNNI, each in tile order and row by
# row, and this CPU's own build (on AMX tiles where it has them).
PRODUCT_BUILDS = {
    "avx2-pairs": (("-march=haswell",), {"avx2"}),
    "avx-vnni": (("-march=haswell", "-mavxvnni"), {"avx2", "avx_vnni"}),
    "avx512-vnni": (("-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"), {"avx512bw", "avx512_vnni"}),
    "this-cpu": (("-march=native",), set()),
}


@torch.no_grad()
@pytest.mark.parametrize("build", PRODUCT_BUILDS)
def test_every_path_of_the_compiled_product_gives_fbgemms_bits(build, tmp_path):
    """Each instruction set's product, in tile order where its build takes it and row by row,
    gives fbgemm's bits: the sums are exact in every path. Row counts under and between blocks
    of rows (4 on 256 bits, 8 on 512, 16 and 32 on tiles), an odd number of 16-output blocks, the
    first pass's feed-forward width, its first layer's 560 inputs (tile order padded; not on AMX's
    tiles, which take whole ones) and a shape that is row by row only."""
    march, needs = PRODUCT_BUILDS[build]
    missing = needs - (cpu_flags() or set())
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}")
    compiler = c_compiler()
    flags = tuple(flag for flag in FLAGS if flag != "-march=native") + march
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run([*compiler, *march, "-o", str(tmp_path / "probe"), str(probe)], capture_output=True).returncode:
        pytest.skip(f"{' '.join(compiler)} does not take {' '.join(march)}")
    library = declare(compile_library(SOURCES, LIBRARY, flags, tmp_path, compiler), SIGNATURES)
    torch.manual_seed(5)
    for in_features, out_features in ((512, 208), (2048, 512), (560, 224), (1000, 201)):
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        compiled, fbgemm = TokenwiseInt8Linear(linear, "compiled"), TokenwiseInt8Linear(linear, "fbgemm")
        assert torch.equal(compiled.weight().int_repr(), fbgemm.weight().int_repr())
        ordered = CompiledInt8Weights(compiled.packed.weights, compiled.weight_scales, library=library)
        row_by_row = CompiledInt8Weights(compiled.packed.weights, compiled.weight_scales, tiles=False, library=library)
        multiple = library.int8_tile_inputs()
        assert (ordered.tiles is not None) == (multiple > 0 and in_features % multiple == 0
                                               and out_features % TILE_OUTPUTS == 0)
        assert torch.equal(ordered.weights, row_by_row.weights) and row_by_row.tiles is None
        for count in (1, 5, 8, 9, 15, 16, 17, 31, 32, 33, 50, 70):
            batch = torch.randn(count, in_features, generator=torch.Generator().manual_seed(count))
            batch *= torch.logspace(-3, 3, count)[:, None]
            expected = fbgemm(batch)
            assert torch.equal(ordered.product(batch), expected), (in_features, count)
            assert torch.equal(row_by_row.product(batch), expected), (in_features, count)


def test_layers_with_different_inputs_cannot_share_one():
    block = GatedBlock(bias=False)
    block.c = torch.nn.Linear(IN_FEATURES // 2, 32, bias=False)
    with pytest.raises(ValueError, match="a, c cannot share an input"):
        fuse_shared_input_layers(block, ("a", "c"), TokenwiseInt8Linear)
    with pytest.raises(ValueError, match="float32 torch.nn.Linear"):
        fuse_shared_input_layers(torch.nn.Sequential(torch.nn.Linear(8, 8).half()), ("0",), TokenwiseInt8Linear)
    # The torch int8 LLM fuses its layers on fbgemm or the compiled kernel: oneDNN's dynamic
    # product rounded stacked shapes differently (session 13).
    with pytest.raises(ValueError, match="not 'onednn'"):
        quantize_llm_for_torch(None, "onednn")
