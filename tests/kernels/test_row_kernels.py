"""The per-row work around the int8 products, and the first pass's fused encoder passes, in C
(twopass_asr.kernels.row_kernels): the same bits as torch's operations they replace, compiled
once per source and CPU, and torch's operations kept where no compiler is at hand."""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch

from tests.int8_kernels import TOKENWISE_KERNEL_PARAMS
from twopass_asr.kernels import row_kernels as row_kernels_module
from twopass_asr.kernels.int8_recipe import int8_kernels_on_this_cpu
from twopass_asr.kernels.row_kernels import compile_row_kernels, row_kernels
from twopass_asr.kernels.tokenwise_int8 import TokenwiseInt8Linear, _onednn_product, _row_scales, _scripted

ONEDNN = [p for p in TOKENWISE_KERNEL_PARAMS if p.values == ("onednn",)]


def awkward_rows(count: int, columns: int) -> torch.Tensor:
    """Gaussian rows with what a pass over rows gets wrong: an all-zero row (padding), negative
    zeros, a row 1000x the others, a row of steps at exactly k + 1/2 (ties, which torch rounds
    to even; 1.0 sets that row's scale)."""
    x = torch.randn(count, columns, generator=torch.Generator().manual_seed(count * columns))
    x[0] = 0.0
    x[1, ::2] = -0.0
    x[2] *= 1000
    ties = (torch.arange(columns) % 252 - 125.5) / 127
    ties[0] = 1.0
    x[3] = ties
    return x


@pytest.fixture
def compiled():
    kernels = row_kernels()
    assert kernels is not None, "row_scaling.c did not compile (is there a C compiler? see the warning logged)"
    return kernels


@pytest.mark.parametrize("count, columns", [(4, 37), (5, 256), (33, 512), (200, 2048)])
def test_the_c_kernels_give_the_bits_of_torchs_operations(compiled, count, columns):
    x = awkward_rows(count, columns)
    steps, scales = compiled.quantize_rows(x)
    scale = _row_scales(x)
    assert torch.equal(scales, scale.flatten())
    assert torch.equal(steps, (x / scale).mul_(127.0).round_().to(torch.int8))

    products = torch.randn(count, columns + 3) * 1000
    bias = torch.randn(columns + 3)
    for with_bias in (bias, None):
        scaled = products.clone()
        compiled.scale_rows_(scaled, scales, with_bias)  # in place
        expected = products * (scale / 127.0) if with_bias is None else torch.addcmul(bias, products, scale / 127.0)
        assert torch.equal(scaled, expected)


@pytest.mark.parametrize("columns", [37, 512, 2048])
def test_the_fused_passes_give_the_bits_of_torchs_operations(compiled, columns):
    """The passes the first pass's fused encoder makes (twopass_asr.first_pass.fused_encoder),
    against the torch operations of the layer they replace, in both input forms."""
    x = awkward_rows(9, columns)
    scale = _row_scales(x)
    quotients, scales = compiled.quantize_rows(x, "quotients")
    assert torch.equal(scales, scale.flatten()) and torch.equal(quotients, x / scale)

    products = awkward_rows(9, columns) * 300
    bias = torch.randn(columns)
    for divisor in (127.0, 1.0):
        for with_bias in (bias, None):
            factor = scale / divisor
            scaled = products * factor if with_bias is None else torch.addcmul(with_bias, products, factor)
            hidden = torch.relu(scaled)
            hidden_scale = _row_scales(hidden)
            for form, expected in (("steps", (hidden / hidden_scale).mul_(127.0).round_().to(torch.int8)),
                                   ("quotients", hidden / hidden_scale)):
                y = products.clone()
                product_input, next_scales = compiled.scale_relu_quantize_rows(y, scales, with_bias, divisor, form)
                assert torch.equal(y, hidden), (divisor, form)  # ReLU's output left in place
                assert torch.equal(next_scales, hidden_scale.flatten()) and torch.equal(product_input, expected)

            residual, addend = torch.randn(9, columns), torch.randn(9, columns)
            for extra in (addend, None):
                out = residual.clone()
                compiled.add_scaled_rows_(out, products, scales, with_bias, divisor, extra)
                assert torch.equal(out, residual + (scaled if extra is None else scaled + extra)), (divisor, extra)


@pytest.mark.parametrize("batch, time, left", [(1, 20, 5), (5, 13, 5), (3, 7, 10), (4, 9, 0)])
def test_the_fsmn_memory_gives_the_bits_of_torchs_depthwise_convolution(compiled, batch, time, left):
    """FunASR's FSMN memory over a padded batch (values zeroed after each stream's length, a
    depthwise convolution padded to keep the length, plus the values), from the value columns
    of a wider projection, as the encoder layer computes it in torch."""
    generator = torch.Generator().manual_seed(batch * time + left)
    columns, width = 48, 11
    projection = torch.randn(batch, time, 3 * columns, generator=generator)
    projection[0, 0, 2 * columns:2 * columns + 4] = -0.0
    lengths = torch.randint(1, time + 1, (batch,), generator=generator)
    lengths[0] = time
    conv = torch.nn.Conv1d(columns, columns, width, groups=columns, bias=False)
    pad = torch.nn.ConstantPad1d((left, width - 1 - left), 0.0)
    values = projection[..., 2 * columns:]
    with torch.no_grad():
        masked = values * (torch.arange(time)[None, :] < lengths[:, None])[..., None].float()
        expected = conv(pad(masked.transpose(1, 2))).transpose(1, 2) + masked
    taps = conv.weight.detach()[:, 0, :].t().contiguous()
    got_masked, memory = compiled.fsmn_memory(values, lengths, taps, left)
    assert torch.equal(got_masked, masked) and torch.equal(got_masked.signbit(), masked.signbit())
    assert torch.equal(memory, expected)


@torch.no_grad()
@pytest.mark.parametrize("kernel", ONEDNN)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_a_onednn_layer_gives_the_bits_of_torchs_operations(compiled, kernel, bias):
    layer = TokenwiseInt8Linear(torch.nn.Linear(512, 2048, bias=bias), kernel)

    def torch_operations(x: torch.Tensor) -> torch.Tensor:
        return _scripted(_onednn_product)(x, layer.packed, layer.weight_scales, layer.weight_zero_points, layer.bias,
                                          layer.in_features, layer.out_features)

    for count in (4, 33, 200):
        x = awkward_rows(count, 512)
        assert torch.equal(layer(x), torch_operations(x)), f"{count} rows"
    three_d = awkward_rows(12, 512).view(3, 4, 512)
    assert torch.equal(layer(three_d), torch_operations(three_d))
    transposed = awkward_rows(512, 6).t()  # not contiguous: copied first
    assert torch.equal(layer(transposed), torch_operations(transposed))


def test_the_kernels_refuse_what_they_cannot_read(compiled):
    with pytest.raises(ValueError, match="contiguous 2-D float32"):
        compiled.quantize_rows(torch.zeros(4, 6).t())
    with pytest.raises(ValueError, match="contiguous 2-D float32"):
        compiled.quantize_rows(torch.zeros(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="scales must be 4"):
        compiled.scale_rows_(torch.zeros(4, 6), torch.ones(3), None)
    with pytest.raises(ValueError, match="bias must be 6"):
        compiled.scale_rows_(torch.zeros(4, 6), torch.ones(4), torch.zeros(5))
    with pytest.raises(ValueError, match="input form must be one of steps, quotients"):
        compiled.quantize_rows(torch.zeros(4, 6), "int4")
    with pytest.raises(ValueError, match="addend must be 4 x 6"):
        compiled.add_scaled_rows_(torch.zeros(4, 6), torch.zeros(4, 6), torch.ones(4), None, 1.0, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="lengths must be 2"):
        compiled.fsmn_memory(torch.zeros(2, 3, 6), torch.ones(3, dtype=torch.int64), torch.zeros(3, 6), 1)
    with pytest.raises(ValueError, match="left < width"):
        compiled.fsmn_memory(torch.zeros(2, 3, 6), torch.ones(2, dtype=torch.int64), torch.zeros(3, 6), 3)
    with pytest.raises(ValueError, match="contiguous columns"):
        compiled.fsmn_memory(torch.zeros(2, 6, 3).transpose(1, 2), torch.ones(2, dtype=torch.int64),
                             torch.zeros(3, 6), 1)


def test_the_library_is_compiled_once_for_a_source_and_cpu(tmp_path):
    compile_row_kernels(tmp_path, ["cc"])
    built = sorted(tmp_path.rglob("*"))
    libraries = [path for path in built if path.is_file()]
    assert len(libraries) == 1 and libraries[0].suffix == ".so"
    modified = libraries[0].stat().st_mtime_ns
    kernels = compile_row_kernels(tmp_path, ["cc"])
    assert sorted(tmp_path.rglob("*")) == built and libraries[0].stat().st_mtime_ns == modified
    steps, scales = kernels.quantize_rows(torch.tensor([[0.5, -1.0, 0.25, 62.5 / 127]]))
    assert steps.tolist() == [[64, -127, 32, 62]] and scales.tolist() == [1.0]  # 63.5 and 62.5: to even


def test_a_failed_compile_leaves_no_file(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        compile_row_kernels(tmp_path, ["cc", "-include", "/nonexistent/header.h"])
    assert list(tmp_path.iterdir()) == []


@torch.no_grad()
def test_without_a_compiler_the_layers_keep_torchs_operations(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(row_kernels_module.CACHE_ENV, str(tmp_path / "cache"))
    row_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=row_kernels_module.__name__):
            assert row_kernels() is None
            assert row_kernels() is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no-such-compiler" in warnings[0] and "torch's per-row operations" in warnings[0]
        if "onednn" in int8_kernels_on_this_cpu():  # the layers still compute, on torch's operations
            linear = torch.nn.Linear(64, 32)
            x = awkward_rows(8, 64)[4:]
            approximate = TokenwiseInt8Linear(linear, "onednn")(x)
            assert float((approximate - linear(x)).norm() / linear(x).norm()) < 0.03
    finally:
        row_kernels.cache_clear()
