import pytest

from twopass_asr.kernels import int8_recipe
from twopass_asr.kernels.int8_recipe import (
    choose_int8_kernel,
    describe_int8,
    resolve_int8_precision,
    resolve_int8_setting,
    stays_float,
)


def test_auto_precision_is_int8_on_a_cpu_and_fp32_on_a_gpu():
    assert resolve_int8_precision("auto", "cpu") == "int8"
    assert resolve_int8_precision("auto", "cuda") == "fp32"  # the int8 kernels are CPU ones
    assert resolve_int8_precision("int8", "cpu") == "int8"
    assert resolve_int8_precision("fp32", "cpu") == "fp32"
    assert resolve_int8_precision("fp32", "cuda:0") == "fp32"


def test_int8_on_a_gpu_and_unknown_values_are_refused_by_name():
    with pytest.raises(ValueError, match=r"int8 runs on CPU kernels \(onnxruntime, fbgemm, onednn, compiled\), "
                                         "not on cuda:1"):
        resolve_int8_precision("int8", "cuda:1")
    with pytest.raises(ValueError, match=r"precision must be one of auto, fp32, int8, got 'bf16'"):
        resolve_int8_precision("bf16", "cpu")


def test_auto_kernel_is_onednn_on_amx_fbgemm_elsewhere_or_the_models_choice(monkeypatch):
    monkeypatch.setattr(int8_recipe, "cpu_has_amx_int8", lambda: True)
    assert choose_int8_kernel("auto", int8_dot_products=True) == "onednn"
    assert choose_int8_kernel("auto", int8_dot_products=False) == "fbgemm"

    def compiled_without(int8_dot_products):  # a model that runs faster on the compiled kernel without them
        return "onednn" if int8_dot_products else "compiled"

    assert choose_int8_kernel("auto", int8_dot_products=False, auto_kernel=compiled_without) == "compiled"
    assert choose_int8_kernel("auto", int8_dot_products=True, auto_kernel=compiled_without) == "onednn"
    assert choose_int8_kernel("onnxruntime", int8_dot_products=False) == "onnxruntime"  # asked for: kept
    assert choose_int8_kernel("fbgemm", int8_dot_products=True) == "fbgemm"
    assert choose_int8_kernel("onednn", int8_dot_products=True) == "onednn"
    monkeypatch.setattr(int8_recipe, "cpu_has_int8_dot_products", lambda: False)
    assert choose_int8_kernel("auto") == "fbgemm"
    monkeypatch.setattr(int8_recipe, "cpu_has_int8_dot_products", lambda: True)
    monkeypatch.setattr(int8_recipe, "cpu_has_amx_int8", lambda: False)
    assert choose_int8_kernel("auto") == "fbgemm"  # AVX-512 VNNI alone: oneDNN's reference kernel
    with pytest.raises(ValueError, match="encoder_int8_kernel must be one of auto, onnxruntime, fbgemm, onednn, "
                                         "compiled, got 'mkl'"):
        choose_int8_kernel("mkl", "encoder_int8_kernel")


def test_onednn_asked_for_without_amx_is_refused_by_name(monkeypatch):
    """Without VNNI oneDNN adds pairs of 8-bit products in 16 bits, which its 127 weight levels
    would overflow; with AVX-512 VNNI alone it took its reference kernel (perf/RESULTS.md,
    session 30)."""
    monkeypatch.setattr(int8_recipe, "cpu_has_amx_int8", lambda: False)
    with pytest.raises(ValueError, match="int8_kernel onednn needs AMX int8 tiles.*use compiled, fbgemm or auto"):
        choose_int8_kernel("onednn", int8_dot_products=True)
    with pytest.raises(ValueError, match="first_pass_int8_kernel onednn needs"):
        resolve_int8_setting("fp32", "onednn", "cpu", "first_pass_int8_kernel")


def test_a_setting_resolves_to_a_kernel_in_int8_only_and_checks_it_either_way(monkeypatch):
    assert resolve_int8_setting("int8", "fbgemm", "cpu") == ("int8", "fbgemm")
    assert resolve_int8_setting("auto", "onnxruntime", "cuda") == ("fp32", None)
    assert describe_int8("int8", "fbgemm") == "int8 on fbgemm" and describe_int8("fp32", None) == "fp32"
    with pytest.raises(ValueError, match="int8_kernel must be one of auto, onnxruntime, fbgemm, onednn, compiled, "
                                         "got 'mkl'"):
        resolve_int8_setting("fp32", "mkl", "cpu")
    # a model's own auto choice (a compile, for the first pass) is asked for in int8 only
    monkeypatch.setattr(int8_recipe, "cpu_has_int8_dot_products", lambda: False)
    asked = []

    def choice(int8_dot_products):
        asked.append(int8_dot_products)
        return "compiled"

    assert resolve_int8_setting("int8", "auto", "cpu", auto_kernel=choice) == ("int8", "compiled")
    assert resolve_int8_setting("fp32", "auto", "cpu", auto_kernel=choice) == ("fp32", None)
    assert resolve_int8_setting("auto", "auto", "cuda", auto_kernel=choice) == ("fp32", None)
    assert asked == [False]


def test_the_layers_funasr_leaves_in_float_are_told_by_name():
    assert stays_float("decoder.output_layer") and stays_float("encoder.bias_encoder")
    assert not stays_float("encoder.encoders.0.self_attn.linear_out")


def test_the_kernels_on_this_cpu_leave_out_onednn_without_amx(monkeypatch):
    monkeypatch.setattr(int8_recipe, "cpu_has_amx_int8", lambda: False)
    assert int8_recipe.int8_kernels_on_this_cpu() == ("onnxruntime", "fbgemm", "compiled")
    monkeypatch.setattr(int8_recipe, "cpu_has_amx_int8", lambda: True)
    assert int8_recipe.int8_kernels_on_this_cpu() == ("onnxruntime", "fbgemm", "onednn", "compiled")
