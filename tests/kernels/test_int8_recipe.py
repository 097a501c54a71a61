import pytest

from twopass_asr.kernels.int8_recipe import resolve_int8_recipe_precision, stays_float


def test_auto_precision_is_int8_where_int8_dot_products_are_measured_fast():
    assert resolve_int8_recipe_precision("auto", "cpu", int8_dot_products=True) == "int8"
    assert resolve_int8_recipe_precision("auto", "cpu", int8_dot_products=False) == "fp32"
    assert resolve_int8_recipe_precision("auto", "cuda", int8_dot_products=True) == "fp32"  # CPU kernels
    assert resolve_int8_recipe_precision("int8", "cpu", int8_dot_products=False) == "int8"  # asked for: kept
    assert resolve_int8_recipe_precision("fp32", "cpu", int8_dot_products=True) == "fp32"


def test_int8_on_a_gpu_and_unknown_values_are_refused_by_name():
    with pytest.raises(ValueError, match="int8 runs on onnxruntime's CPU kernels, not on cuda:1"):
        resolve_int8_recipe_precision("int8", "cuda:1")
    with pytest.raises(ValueError, match=r"precision must be one of auto, fp32, int8, got 'bf16'"):
        resolve_int8_recipe_precision("bf16", "cpu")


def test_the_layers_funasr_leaves_in_float_are_told_by_name():
    assert stays_float("decoder.output_layer") and stays_float("encoder.bias_encoder")
    assert not stays_float("encoder.encoders.0.self_attn.linear_out")
