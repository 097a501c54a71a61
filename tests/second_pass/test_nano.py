"""twopass_asr.second_pass: the random Fun-ASR-Nano builder and NanoRecognizer, checked against
FunASR's own AutoModel on the tiny model (float32, CPU)."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest
import torch
import yaml

from tests.int8_kernels import TOKENWISE_KERNEL_PARAMS
from twopass_asr.audio import pcm16_to_float
from twopass_asr.first_pass.native_layers import native_auto_kernel
from twopass_asr.kernels import int8_linear, row_kernels, tokenwise_int8
from twopass_asr.kernels.decode_step import Bf16HeadScreen, decode_step_library
from twopass_asr.kernels.cpu_features import cpu_has_int8_dot_products
from twopass_asr.kernels.int8_linear import Int8Linear
from twopass_asr.kernels.bf16_linear import CompiledBf16Linear
from twopass_asr.kernels.layer_replacement import SharedInputSlice
from twopass_asr.kernels.prepacked_linear import PrepackedLinear, choose_kernel
from twopass_asr.kernels.tokenwise_int8 import (
    TokenwiseInt8Linear,
    int8_per_output_channel,
    replace_linear_layers,
)
from twopass_asr.second_pass.drafts import DraftTally
from twopass_asr.second_pass.llm_export import INT8_LINEARS, export_llm_dir, mapped_input_embeddings
from twopass_asr.second_pass.llm_on_torch import is_product_layer
from twopass_asr.second_pass.native_decode import NativeDecoder
from twopass_asr.second_pass.recognizer import (
    MAX_NEW_TOKENS_ENV,
    MAX_NEW_TOKENS_PER_SECOND_ENV,
    NanoRecognizer,
    NanoRequest,
    generation_cap,
    max_new_tokens_setting,
    stop_token_ids,
    tokens_per_second_setting,
    until_stop,
)
from twopass_asr.store.random_nano import LLM_SUBDIR, build_random_nano

# This file's models run on two threads (two_torch_threads).
TORCH_THREADS = 2
pytestmark = pytest.mark.torch_threads(TORCH_THREADS)


def quietly(function, *args, **kwargs):
    # FunASR prints a line per CTC tensor the checkpoint (like the real one) lacks.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def two_torch_threads():
    """The files after this one (in any order, under pytest-xdist) get the count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_nano(two_torch_threads, tmp_path_factory):
    return quietly(build_random_nano, tmp_path_factory.mktemp("nano") / "funasr_nano", "tiny", 0)


@pytest.fixture(scope="module")
def recognizer(tiny_nano):
    return quietly(NanoRecognizer, tiny_nano)


@pytest.fixture(scope="module")
def reference(tiny_nano):
    from funasr import AutoModel

    return quietly(AutoModel, model=str(tiny_nano), disable_update=True, disable_pbar=True,
                   disable_log=True, ncpu=TORCH_THREADS)


def reference_text(reference, pcm, hotwords=(), language=None, itn=True):
    kwargs = {"hotwords": list(hotwords), "itn": itn}
    if language not in (None, "", "auto"):
        kwargs["language"] = language
    with torch.no_grad():
        return quietly(reference.generate, input=pcm16_to_float(pcm), **kwargs)[0]["text"]


def segments():
    """Deterministic audio of different lengths: noise, a tone, a chirp-like buzz."""
    rng = np.random.default_rng(7)
    t = np.arange(48000) / 16000
    return [
        (rng.standard_normal(8000) * 3000).astype(np.int16),
        (np.sin(2 * np.pi * 440 * t[:24000]) * 8000).astype(np.int16),
        (np.sign(np.sin(2 * np.pi * (200 + 300 * t[:40000]) * t[:40000])) * 4000).astype(np.int16),
    ]


CASES = [
    dict(),
    dict(hotwords=["阿里巴巴", "通义"]),
    dict(itn=False),
    dict(language="en"),
    dict(language="zh", itn=False, hotwords=["语音", "识别"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: ",".join(f"{k}={v}" for k, v in case.items()) or "plain")
def test_recognizer_text_equals_funasr_generate(recognizer, reference, case):
    for pcm in segments():
        got = recognizer.recognize(pcm, **case)
        assert got == reference_text(reference, pcm, **case)
        assert got.strip(), "the tiny model must produce text"


def test_prompt_embeds_equal_funasr_inference_prepare(recognizer, reference):
    # FunASR's own model: its encoder's linear layers are torch's, the recognizer's prepacked.
    model = reference.model
    for pcm, case in zip(segments(), CASES[1:]):
        prompt = model.get_prompt(case.get("hotwords", []), case.get("language"), case.get("itn", True))
        with torch.no_grad():
            expected = model.inference_prepare([model.generate_chatml(prompt, pcm16_to_float(pcm))], None,
                                               ["segment"], **recognizer.kwargs)[0][0]
        torch.testing.assert_close(recognizer.prompt_embeds(pcm, **case), expected.to(recognizer.dtype),
                                   rtol=1e-4, atol=1e-5)


def test_segments_encoded_together_equal_one_by_one(recognizer):
    # Different lengths and prompts: the encoder pass zero-pads the shorter ones.
    requests = [NanoRequest(pcm, **case) for pcm, case in zip(segments() * 2, CASES + CASES[:1])]
    prepared = [recognizer.prepare(request) for request in requests]
    together = recognizer.embed_prepared(prepared)
    assert len(together) == len(requests)
    for request, embeds, alone in zip(requests, together, prepared):
        single = recognizer.embed_prepared([alone])[0]
        assert embeds.shape == single.shape
        torch.testing.assert_close(embeds, single, rtol=1e-4, atol=1e-5)
        assert recognizer.generate(embeds) == recognizer.recognize(request.pcm, request.hotwords,
                                                                   request.language, request.itn)


def test_prompt_options_and_audio_change_the_text(recognizer):
    pcm = segments()[0]
    assert len({recognizer.recognize(pcm, **case) for case in CASES}) > 1
    assert len({recognizer.recognize(pcm) for pcm in segments()}) > 1


def test_auto_language_means_no_language(recognizer, reference):
    pcm = segments()[1]
    expected = reference_text(reference, pcm)
    assert recognizer.recognize(pcm, language="auto") == expected
    assert recognizer.recognize(pcm, language="") == expected
    assert recognizer.recognize(pcm, language=None) == expected


@torch.no_grad()
def recognize_batch(recognizer, requests: list[NanoRequest]) -> list[str]:
    """Texts of several segments: one audio encoder pass and one generate call over all, as
    the Triton model's batchers run them."""
    return recognizer.generate_batch(recognizer.embed_prepared([recognizer.prepare(request) for request in requests]))


def test_recognize_batch_equals_one_by_one(recognizer, monkeypatch):
    # Different lengths and prompts: generation left-pads the shorter prompts.
    requests = [NanoRequest(pcm, **case) for pcm, case in zip(segments() * 2, CASES + CASES[:1])]
    requests.append(NanoRequest(segments()[0], hotwords=["千问"], language="en", itn=False))
    expected = [recognizer.recognize(r.pcm, r.hotwords, r.language, r.itn) for r in requests[:-1]]
    expected.append(recognizer.recognize(segments()[0], ["千问"], "en", False))
    calls = []
    generate = recognizer.model.llm.generate
    monkeypatch.setattr(recognizer.model.llm, "generate",
                        lambda **kwargs: calls.append(kwargs["inputs_embeds"].shape[0]) or generate(**kwargs))
    assert recognize_batch(recognizer, requests) == expected
    assert calls == [len(requests)], "one generate call for the whole batch"
    assert len(set(expected)) > 1


@contextlib.contextmanager
def first_layer_rows(recognizer):
    """The rows the LLM's first decoder layer is given, call by call."""
    rows = []

    def record(module, args, kwargs):
        rows.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    handle = recognizer.model.llm.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def test_generation_continues_from_the_cached_opening_of_the_prompts(recognizer):
    """The chat text before the audio is prefilled once: prompts opening with it run the LLM over
    the rest only, and get the tokens of a whole-prompt prefill."""
    prepared = [recognizer.prepare(NanoRequest(pcm)) for pcm in segments()]
    prompts = recognizer.embed_prepared(prepared)
    opening = prepared[0].audio_start
    assert opening > 0 and {segment.audio_start for segment in prepared} == {opening}
    held = recognizer.prompt_prefixes.prefix_of(prompts)
    assert held is not None and held.rows == opening
    longest = max(len(prompt) for prompt in prompts)
    caps = [6, 7, 8]
    with first_layer_rows(recognizer) as rows:
        cached = recognizer.generate_tokens(prompts, caps)
    assert rows[0] == longest - opening, "the prefill must skip the cached opening"
    recognizer.prompt_prefixes.clear()
    with first_layer_rows(recognizer) as rows:
        whole = recognizer.generate_tokens(prompts, caps)
    assert rows[0] == longest
    assert cached == whole and all(cached)


def test_changing_the_llms_layers_drops_the_cached_openings(tiny_nano):
    int8 = quietly(NanoRecognizer, tiny_nano)
    int8.prompt_embeds(segments()[0])
    assert len(int8.prompt_prefixes) == 1
    int8.use_int8_generation()
    assert len(int8.prompt_prefixes) == 0
    released = quietly(NanoRecognizer, tiny_nano)
    released.prompt_embeds(segments()[0])
    released.release_generation_layers()
    released.prompt_embeds(segments()[1])
    assert len(released.prompt_prefixes) == 0, "nothing to prefill on once another engine generates"


@pytest.mark.skipif(choose_kernel() is None, reason="no packed linear kernel here")
def test_float32_generation_prepacks_the_llm_and_keeps_the_text(tiny_nano, reference):
    fallback = quietly(NanoRecognizer, tiny_nano)
    fallback.use_dtype(torch.float32)  # what the Triton model's torch fallback does
    assert any(isinstance(module, PrepackedLinear) for module in fallback.model.llm.modules())
    for pcm, case in zip(segments(), CASES):
        assert fallback.recognize(pcm, **case) == reference_text(reference, pcm, **case)
    fallback.use_dtype(torch.float32)
    with pytest.raises(ValueError, match="replaced in torch.float32"):
        fallback.use_dtype(torch.bfloat16)


def test_recognize_batch_names_the_bad_segment(recognizer):
    with pytest.raises(ValueError, match="segment too short"):
        recognize_batch(recognizer, [NanoRequest(segments()[0]), NanoRequest(np.zeros(100, np.int16))])
    assert recognizer.generate_batch([]) == []


def test_rows_are_cut_after_their_first_stop_token():
    stops = stop_token_ids([7, 9])
    assert stops == {7, 9}
    assert stop_token_ids(7) == {7} and stop_token_ids(None) == set()
    assert until_stop([5, 6, 9, 0, 0], stops) == [5, 6, 9]
    assert until_stop([5, 7, 9], stops) == [5, 7]
    assert until_stop([5, 0, 6], stops) == [5, 0, 6], "a pad token id alone does not stop a row"
    assert until_stop([5, 6], set()) == [5, 6]


def test_generation_respects_max_new_tokens(tiny_nano, recognizer):
    capped = quietly(NanoRecognizer, tiny_nano, max_new_tokens=2)
    pcm = segments()[2]
    short = capped.recognize(pcm)
    assert short and recognizer.recognize(pcm).startswith(short)
    # Counted as generated: a text's tokens decoded and encoded again need not be the same.
    assert len(capped.generate_tokens([capped.prompt_embeds(pcm)])[0]) <= 2
    with pytest.raises(ValueError, match="max_new_tokens"):
        NanoRecognizer(tiny_nano, max_new_tokens=0)


def test_segments_are_capped_by_their_length(tiny_nano, recognizer):
    pcms = segments()  # 0.5 s, 1.5 s, 2.5 s
    prompts = [recognizer.prompt_embeds(pcm) for pcm in pcms]
    full = recognizer.generate_tokens(prompts)
    caps = [generation_cap(len(pcm), recognizer.max_new_tokens, 2.0) for pcm in pcms]
    assert caps == [1, 3, 5] and all(len(row) > 5 for row in full)
    # One generate call for all, each row cut at its own cap: what it alone would generate.
    assert recognizer.generate_tokens(prompts, caps) == [row[:cap] for row, cap in zip(full, caps)]
    by_length = quietly(NanoRecognizer, tiny_nano, tokens_per_second=2.0)
    texts = [by_length.recognize(pcm) for pcm in pcms]
    assert texts == recognizer.generate_batch(prompts, caps)
    assert all(recognizer.recognize(pcm).startswith(text) for pcm, text in zip(pcms, texts))
    assert generation_cap(16000 * 600, 256, 2.0) == 256  # max_new_tokens still holds
    assert generation_cap(10, 256, 2.0) == 1
    assert generation_cap(10, 256, None) == 256


def test_tokens_per_second_setting_from_environment_or_parameter(monkeypatch):
    monkeypatch.delenv(MAX_NEW_TOKENS_PER_SECOND_ENV, raising=False)
    assert tokens_per_second_setting(None) is None
    assert tokens_per_second_setting(" ") is None
    assert tokens_per_second_setting("2.2") == 2.2
    monkeypatch.setenv(MAX_NEW_TOKENS_PER_SECOND_ENV, "3")
    assert tokens_per_second_setting("2.2") == 3.0
    for bad in ("0", "-1", "fast", "nan", "inf"):
        monkeypatch.setenv(MAX_NEW_TOKENS_PER_SECOND_ENV, bad)
        with pytest.raises(ValueError, match=f"max_new_tokens_per_second .*{bad!r}"):
            tokens_per_second_setting(None)


def test_max_new_tokens_setting_from_environment_or_parameter(monkeypatch):
    monkeypatch.delenv(MAX_NEW_TOKENS_ENV, raising=False)
    assert max_new_tokens_setting(None) == 256
    assert max_new_tokens_setting("40") == 40
    monkeypatch.setenv(MAX_NEW_TOKENS_ENV, "32")
    assert max_new_tokens_setting("40") == 32
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(MAX_NEW_TOKENS_ENV, bad)
        with pytest.raises(ValueError, match=f"{MAX_NEW_TOKENS_ENV}.*{bad!r}"):
            max_new_tokens_setting("40")


def test_bad_audio_is_rejected_with_a_clear_error(recognizer):
    with pytest.raises(ValueError, match="int16"):
        recognizer.recognize(np.zeros(8000, np.float32))
    with pytest.raises(ValueError, match="too short"):
        recognizer.recognize(np.zeros(100, np.int16))


def state_dict(model_dir):
    return torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)


def test_builder_is_deterministic_per_seed(tiny_nano, tmp_path):
    again = quietly(build_random_nano, tmp_path / "same", "tiny", 0)
    other = quietly(build_random_nano, tmp_path / "other", "tiny", 1)
    first, second, third = state_dict(tiny_nano), state_dict(again), state_dict(other)
    assert first.keys() == second.keys() == third.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], third[name]) for name in first)
    for name in ("config.yaml", "multilingual.tiktoken", f"{LLM_SUBDIR}/tokenizer.json", f"{LLM_SUBDIR}/config.json"):
        assert (tiny_nano / name).read_bytes() == (again / name).read_bytes(), name


def test_built_directory_has_the_real_layout(tiny_nano):
    config = yaml.safe_load((tiny_nano / "config.yaml").read_text(encoding="utf-8"))
    assert (config["model"], config["audio_encoder"], config["audio_adaptor"]) == (
        "FunASRNano", "SenseVoiceEncoderSmall", "Transformer")
    assert config["llm_conf"]["init_param_path"] == LLM_SUBDIR
    metas = json.loads((tiny_nano / "configuration.json").read_text(encoding="utf-8"))["file_path_metas"]
    assert metas["init_param"] == "model.pt" and metas["llm_conf"]["init_param_path"] == LLM_SUBDIR
    state = state_dict(tiny_nano)
    assert {name.split(".")[0] for name in state} == {"audio_encoder", "audio_adaptor", "llm"}
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    qwen = json.loads((tiny_nano / LLM_SUBDIR / "config.json").read_text(encoding="utf-8"))
    assert qwen["model_type"] == "qwen3" and qwen["head_dim"] in (32, 64, 80, 96, 112, 128)
    assert state["llm.model.embed_tokens.weight"].shape == (qwen["vocab_size"], qwen["hidden_size"])


def test_tokenizer_loads_in_transformers_with_chatml(tiny_nano):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_nano / LLM_SUBDIR)
    qwen = json.loads((tiny_nano / LLM_SUBDIR / "config.json").read_text(encoding="utf-8"))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == qwen["eos_token_id"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "语音转写：hello"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n语音转写：hello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == prompt
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n语音转写：hello\nassistant\n"


# bf16 against fp32, teacher-forced top-1 on the tiny random model: 1.00 in torch's bf16, 0.99 on
# the compiled bf16 product (flat logits make near ties common: a lower bound of what trained
# weights give); with one standard deviation of noise added to the LLM head, 0.42 either way.
BF16_AGREEMENT_FLOOR = 0.85


def top1_agreement(recognizer, prompts, reference_rows) -> float:
    predicted = [recognizer.teacher_forced_tokens(prompt, row) for prompt, row in zip(prompts, reference_rows)]
    pairs = [(p, r) for got, row in zip(predicted, reference_rows) for p, r in zip(got, row, strict=True)]
    return sum(p == r for p, r in pairs) / len(pairs)


@pytest.mark.parametrize("compiled", [False, True], ids=["torch-bf16", "compiled-bf16"])
def test_bf16_agrees_with_fp32_above_a_floor(tiny_nano, recognizer, compiled):
    """In torch's bf16 (use_dtype) and on the compiled bf16 product (use_bf16_generation)."""
    rng = np.random.default_rng(3)
    pcms = [(rng.standard_normal(16000 * (1 + i % 4)) * 3000).astype(np.int16) for i in range(12)]
    prompts = [recognizer.prompt_embeds(pcm, **CASES[i % len(CASES)]) for i, pcm in enumerate(pcms)]
    reference_rows = recognizer.generate_tokens(prompts)
    assert all(reference_rows)
    # Teacher forcing in the reference's own precision gives back its greedy tokens.
    assert top1_agreement(recognizer, prompts, reference_rows) == 1.0

    def in_bf16(noisy_head: bool) -> NanoRecognizer:
        bf16 = quietly(NanoRecognizer, tiny_nano)
        if noisy_head:
            head = bf16.model.llm.lm_head.weight
            with torch.no_grad():
                head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * head.std())
        if compiled:
            bf16.use_bf16_generation()
        else:
            bf16.use_dtype(torch.bfloat16)
        return bf16

    assert top1_agreement(in_bf16(False), prompts, reference_rows) >= BF16_AGREEMENT_FLOOR
    # The floor tells a broken conversion apart.
    assert top1_agreement(in_bf16(True), prompts, reference_rows) < BF16_AGREEMENT_FLOOR


def test_released_generation_layers_leave_the_prompts_as_they_were(tiny_nano, recognizer):
    released = quietly(NanoRecognizer, tiny_nano)
    before = sum(p.numel() for p in released.model.llm.parameters())
    released.release_generation_layers()
    embedding = released.model.llm.model.get_input_embeddings().weight.numel()
    assert sum(p.numel() for p in released.model.llm.parameters()) == embedding < before
    for pcm, case in zip(segments(), CASES):
        assert torch.equal(released.prompt_embeds(pcm, **case), recognizer.prompt_embeds(pcm, **case))
    prompt = recognizer.prompt_embeds(segments()[0])
    with pytest.raises(RuntimeError, match="released"):
        released.generate(prompt)
    with pytest.raises(RuntimeError, match="released"):
        released.teacher_forced_tokens(prompt, [1, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prompts_from_the_engines_mapped_table_equal_the_models_own(tiny_nano, tmp_path, dtype):
    """With vLLM generating, the prompts are built from the token table of vLLM's weights file,
    memory-mapped in the file's dtype: they must be the prompts the model's own table gives."""
    own = quietly(NanoRecognizer, tiny_nano)
    own.use_dtype(dtype)
    mapped = quietly(NanoRecognizer, tiny_nano)
    table = mapped_input_embeddings(export_llm_dir(tiny_nano, mapped.llm_dir, export_root=tmp_path))
    checkpoint = torch.load(tiny_nano / "model.pt", map_location="cpu", weights_only=True)
    assert torch.equal(table, checkpoint["llm.model.embed_tokens.weight"])
    mapped.release_generation_layers(table)
    mapped.use_dtype(dtype)
    assert mapped.model.llm.model.get_input_embeddings().weight.data_ptr() == table.data_ptr()  # not copied
    for pcm, case in zip(segments(), CASES):
        prompt = mapped.prompt_embeds(pcm, **case)
        assert prompt.dtype == dtype
        assert torch.equal(prompt, own.prompt_embeds(pcm, **case))
    with pytest.raises(ValueError, match="token embeddings"):
        quietly(NanoRecognizer, tiny_nano).release_generation_layers(table[:-1])


INT8_ENCODER_LAYERS = {"onnxruntime": Int8Linear, "fbgemm": TokenwiseInt8Linear, "onednn": TokenwiseInt8Linear,
                       "compiled": TokenwiseInt8Linear}


@pytest.fixture(scope="module", params=["onnxruntime", *TOKENWISE_KERNEL_PARAMS])
def int8_encoder(tiny_nano, request):
    return quietly(NanoRecognizer, tiny_nano, encoder_precision="int8", encoder_int8_kernel=request.param)


def audio_layers(model, kind) -> list[str]:
    return [f"{part}.{name}" for part in ("audio_encoder", "audio_adaptor")
            for name, module in getattr(model, part).named_modules() if type(module) is kind]


def test_int8_encoder_quantizes_every_audio_linear_layer(int8_encoder, reference):
    linears = audio_layers(reference.model, torch.nn.Linear)
    quantized = audio_layers(int8_encoder.model, INT8_ENCODER_LAYERS[int8_encoder.encoder_int8_kernel])
    assert int8_encoder.encoder_precision == "int8"
    assert quantized == linears and len(linears) > 10


def test_int8_encoder_quantizes_each_segment_on_its_own(int8_encoder):
    # Padding and other segments never widen a segment's activation range: batched equals alone
    # within float32 summation order (as in fp32), far below one quantization step (~1e-2 here).
    prepared = [int8_encoder.prepare(NanoRequest(pcm)) for pcm in segments()]
    for together, alone in zip(int8_encoder.embed_prepared(prepared), prepared):
        torch.testing.assert_close(together, int8_encoder.embed_prepared([alone])[0], rtol=1e-4, atol=1e-5)


def prompts_with(recognizer, monkeypatch, batch, encoder):
    monkeypatch.setattr(recognizer, "fused_audio_encoder", encoder)
    return recognizer.embed_prepared(batch)


def test_fused_int8_encoder_layers_give_funasrs_bits(int8_encoder, monkeypatch):
    """On fbgemm and oneDNN the encoder's layers run fused (FusedAudioEncoder): its prompts are
    those of FunASR's forward over the same int8 layers, bit for bit, alone and in a batch
    padded to its longest segment; with one layer's FSMN taps moved a frame they are not."""
    fused = int8_encoder.fused_audio_encoder
    if int8_encoder.encoder_int8_kernel not in ("fbgemm", "onednn"):
        assert fused is None or int8_encoder.encoder_int8_kernel == "compiled"
        return
    assert fused is not None
    prepared = [int8_encoder.prepare(NanoRequest(pcm)) for pcm in segments()]
    for batch in (prepared[:1], prepared):
        want, got = (prompts_with(int8_encoder, monkeypatch, batch, encoder) for encoder in (None, fused))
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    layers = fused.stacks[1].layers
    taps = layers.fsmn_taps
    monkeypatch.setattr(layers, "fsmn_taps", [*taps[:-1], taps[-1].roll(1, dims=0)])
    want, got = (prompts_with(int8_encoder, monkeypatch, prepared, encoder) for encoder in (None, fused))
    assert not any(torch.equal(a, b) for a, b in zip(want, got))


@contextlib.contextmanager
def torch_threads(threads: int):
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(kept)


def test_the_native_audio_encoder_agrees_with_funasrs_layers_on_any_number_of_threads(int8_encoder, monkeypatch):
    """On the compiled kernel each stack of the encoder's layers is one native call
    (native_layers' encode_segments), its norms and attention summed in another order than
    torch's: the prompts agree with FunASR's forward over the same int8 layers to float rounding
    (measured: at most 1.0e-7 relative with AVX-512; 0.85 % built for AVX2, where a rounding
    difference moved a product's input a quantization step), and a segment gets the same bits
    alone or batched with longer ones, on one, two or three threads. With the last layer's FSMN
    window a frame off they do not agree (median 5.6 %)."""
    if int8_encoder.encoder_int8_kernel != "compiled":
        pytest.skip("the audio encoder's layers run natively on the compiled kernel only")
    native = int8_encoder.fused_audio_encoder
    assert native is not None, "did sanm_encoder.c compile?"
    prepared = [int8_encoder.prepare(NanoRequest(pcm)) for pcm in segments()]

    def relative_errors(encoder):
        want = prompts_with(int8_encoder, monkeypatch, prepared, None)
        got = prompts_with(int8_encoder, monkeypatch, prepared, encoder)
        return [float((a - b).norm() / a.norm()) for a, b in zip(want, got)]

    assert max(relative_errors(native)) < 0.02
    by_threads = []
    for threads in (1, 2, 3):
        with torch_threads(threads):
            batched = prompts_with(int8_encoder, monkeypatch, prepared, native)
            for alone, together in zip(prepared, batched):
                assert torch.equal(prompts_with(int8_encoder, monkeypatch, [alone], native)[0], together)
        by_threads.append(batched)
    assert all(torch.equal(a, b) for other in by_threads[1:] for a, b in zip(by_threads[0], other))
    last = native.stacks[1].layers._layers[-1]
    monkeypatch.setattr(last, "fsmn_left", last.fsmn_left + 1)
    assert float(np.median(relative_errors(native))) > 0.04


def encoder_agreement(reference: NanoRecognizer, other: NanoRecognizer) -> tuple[float, float]:
    """(relative error of other's audio prompts, teacher-forced top-1 agreement of the
    reference's LLM fed them) against the reference's float32 encoder, over every CASE of
    every segment."""
    errors, agree, total = [], 0, 0
    for pcm in segments():
        for case in CASES:
            want, got = reference.prompt_embeds(pcm, **case), other.prompt_embeds(pcm, **case)
            errors.append(float((got - want).norm() / want.norm()))
            (row,) = reference.generate_tokens([want])
            forced = reference.teacher_forced_tokens(got, row)
            agree += sum(a == b for a, b in zip(forced, row))
            total += len(row)
    return max(errors), agree / total


def twice_the_weight(linear: torch.nn.Linear) -> torch.nn.Linear:
    twice = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        twice.weight.copy_(linear.weight * 2)
        if linear.bias is not None:
            twice.bias.copy_(linear.bias)
    return twice


def test_int8_encoder_agrees_with_fp32_and_a_broken_quantization_does_not(tiny_nano, recognizer, int8_encoder,
                                                                           monkeypatch):
    """Measured on the tiny model: prompts within 1.6% (onnxruntime) / 2.7% (fbgemm) of fp32's
    and 0.994 / 1.0 of the tokens agreeing (pinned: 5%, 0.95); with every layer quantized from
    twice its weight, 300% and 0.88 / 0.87 (the tiny LLM leans on the text before a token more
    than on the audio)."""
    error, agreement = encoder_agreement(recognizer, int8_encoder)
    assert error < 0.05 and agreement >= 0.95, (error, agreement)
    kernel = int8_encoder.encoder_int8_kernel
    if kernel == "onnxruntime":
        float_layer_model = int8_linear._float_layer_model
        monkeypatch.setattr(int8_linear, "_float_layer_model", lambda layer: float_layer_model(twice_the_weight(layer)))
    else:
        weight_rule = tokenwise_int8.int8_per_output_channel
        monkeypatch.setattr(tokenwise_int8, "int8_per_output_channel",
                            lambda weight, levels: weight_rule(weight * 2, levels))
    broken = quietly(NanoRecognizer, tiny_nano, encoder_precision="int8", encoder_int8_kernel=kernel)
    error, agreement = encoder_agreement(recognizer, broken)
    assert error > 0.05 and agreement < 0.95, (error, agreement)


def test_encoder_precision_auto_is_int8_on_a_cpu_on_the_kernel_it_is_fast_with(tiny_nano):
    auto = quietly(NanoRecognizer, tiny_nano, encoder_precision="auto")
    assert auto.encoder_description == "int8 on " + native_auto_kernel(cpu_has_int8_dot_products())


def test_an_unknown_encoder_int8_kernel_is_named(tiny_nano):
    with pytest.raises(ValueError, match="encoder_int8_kernel must be one of auto, onnxruntime, fbgemm, onednn, "
                                         "compiled, got 'mkl'"):
        NanoRecognizer(tiny_nano, encoder_precision="int8", encoder_int8_kernel="mkl")


def test_int8_encoder_is_refused_on_a_gpu_by_name(tiny_nano):
    with pytest.raises(ValueError, match=r"int8 runs on CPU kernels \(onnxruntime, fbgemm, onednn, compiled\), "
                                         "not on cuda"):
        NanoRecognizer(tiny_nano, device="cuda", encoder_precision="int8")


@pytest.fixture(scope="module")
def int8_generation(tiny_nano):
    int8 = quietly(NanoRecognizer, tiny_nano)
    int8.use_int8_generation()
    return int8


def test_int8_generation_quantizes_the_projections_and_head_per_output_channel(tiny_nano, recognizer,
                                                                                 int8_generation):
    plain = dict(recognizer.model.llm.named_modules())
    quantized = {name: module for name, module in int8_generation.model.llm.named_modules()
                 if type(module) in (TokenwiseInt8Linear, SharedInputSlice)}
    expected = {name for name, module in plain.items() if type(module) in (torch.nn.Linear, PrepackedLinear)
                and (name.rpartition(".")[2] in INT8_LINEARS or name == "lm_head")}
    assert set(quantized) == expected and len(expected) == 7 * len(recognizer.model.llm.model.layers) + 1
    float_llm = quietly(NanoRecognizer, tiny_nano, prepack=False).model.llm
    for name, layer in quantized.items():
        # The LLM's layers are on fbgemm's levels (the compiled kernel's too, llm_on_torch).
        weights, scales = int8_per_output_channel(float_llm.get_submodule(name).weight,
                                                  tokenwise_int8.TOKENWISE_KERNELS["fbgemm"])
        packed = layer.weight()
        assert torch.equal(packed.int_repr(), weights), name
        torch.testing.assert_close(packed.q_per_channel_scales().float(), scales.flatten())
    assert int8_generation.dtype == torch.float32
    assert type(int8_generation.model.llm.model.embed_tokens.weight) is torch.nn.Parameter  # prompts in float32


@torch.no_grad()
def test_int8_generation_fuses_projections_of_one_input_without_changing_a_bit(tiny_nano, recognizer,
                                                                            int8_generation):
    """The query/key/value and gate/up projections run as one product each; the LLM must give
    the bits of its layers quantized one by one."""
    separate = quietly(NanoRecognizer, tiny_nano, prepack=False)
    replace_linear_layers(separate.model.llm, is_product_layer)
    layer = int8_generation.model.llm.model.layers[0]
    assert type(layer.self_attn.k_proj) is SharedInputSlice and type(layer.mlp.up_proj) is SharedInputSlice
    prompts = [recognizer.prompt_embeds(pcm) for pcm in segments()]
    for prompt in prompts:
        assert torch.equal(int8_generation.model.llm(inputs_embeds=prompt[None]).logits,
                           separate.model.llm(inputs_embeds=prompt[None]).logits)
    assert int8_generation.generate_tokens(prompts) == separate.generate_tokens(prompts)


# Measured on the tiny model: torch's int8 generation 0.95, with every scale doubled 0.24.
LLM_INT8_AGREEMENT_FLOOR = 0.8


def llm_agreement(reference: NanoRecognizer, other: NanoRecognizer) -> float:
    """top1_agreement of other's LLM with the reference's greedy tokens, both fed the
    reference's prompts, over every CASE of every segment."""
    prompts = [reference.prompt_embeds(pcm, **case) for pcm in segments() for case in CASES]
    return top1_agreement(other, prompts, reference.generate_tokens(prompts))


def test_int8_generation_agrees_with_fp32_and_a_broken_quantization_does_not(tiny_nano, recognizer, int8_generation,
                                                                            monkeypatch):
    agreement = llm_agreement(recognizer, int8_generation)
    assert agreement >= LLM_INT8_AGREEMENT_FLOOR, agreement
    assert int8_generation.generate(recognizer.prompt_embeds(segments()[0]))  # greedy text too

    def doubled(weight, levels):
        weights, scales = int8_per_output_channel(weight, levels)
        return weights, scales * 2

    monkeypatch.setattr(tokenwise_int8, "int8_per_output_channel", doubled)
    broken = quietly(NanoRecognizer, tiny_nano)
    broken.use_int8_generation()
    assert llm_agreement(recognizer, broken) < LLM_INT8_AGREEMENT_FLOOR


@pytest.fixture(scope="module")
def int8_generation_in_hf_steps(tiny_nano):
    int8 = quietly(NanoRecognizer, tiny_nano)
    int8.use_int8_generation(native_steps=False)
    return int8


@pytest.fixture(scope="module")
def bf16_generation(tiny_nano):
    bf16 = quietly(NanoRecognizer, tiny_nano)
    bf16.use_bf16_generation()
    return bf16


@pytest.fixture(scope="module")
def bf16_generation_in_hf_steps(tiny_nano):
    bf16 = quietly(NanoRecognizer, tiny_nano)
    bf16.use_bf16_generation(native_steps=False)
    return bf16


@torch.no_grad()
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_compiled_generation_runs_its_prefill_and_decode_steps_in_c_with_the_tokens_of_hfs(precision, request,
                                                                                           monkeypatch):
    """native_decode: once a prompt opening's cache is held, generation runs no torch forward of
    the LLM: the prefill of the prompts' other rows and every further token are C passes. Their
    products are the layers' own and their float arithmetic another order of torch's, so on
    the tiny model (where near ties are common) the tokens still match HF's, alone and in
    batches of prompts of different lengths."""
    in_c = request.getfixturevalue(f"{precision}_generation")
    in_hf_steps = request.getfixturevalue(f"{precision}_generation_in_hf_steps")
    assert in_c.native_decoder is not None and in_hf_steps.native_decoder is None
    assert in_c.native_decoder.bf16 == (precision == "bf16")
    # A bf16 head is read through its int8 screen wherever the build allows one.
    screened = precision == "bf16" and Bf16HeadScreen.suits(in_c.model.llm.lm_head.packed)
    assert (in_c.native_decoder.head_screen is not None) == screened
    prompts = [in_c.prompt_embeds(pcm, **case) for pcm in segments() for case in CASES]
    expected = in_hf_steps.generate_tokens(prompts)
    assert min(len(row) for row in expected) > 3  # steps after the prefill
    assert [in_c.generate_tokens([prompt])[0] for prompt in prompts] == expected
    forwards = []
    llm = in_c.model.llm
    monkeypatch.setattr(llm, "forward", lambda *args, original=llm.forward, **kwargs:
                        forwards.append(kwargs["inputs_embeds"].shape) or original(*args, **kwargs))
    assert in_c.generate_tokens(prompts) == expected
    assert forwards == []


@torch.no_grad()
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_a_prompts_logits_are_the_same_bits_alone_or_batched(precision, request, monkeypatch):
    """native_decode: a row's products, norms and attention in a C pass are its own whatever
    rows come with it: decode_step.c attends a sequence's rows together and adds a block of
    keys' sums across vectors, but sums each row in its own order, and a softmax's total in
    the cache's order. A prompt prefix's cache is the C prefill's too. So a prompt's first
    logits are the same bits alone (continuing from its prefix's cache) as in a batch of
    prompts of other prefixes and lengths (prefilled whole, padded, its cache entries
    elsewhere). Through a bf16 head's int8 screen the logits outside the blocks it kept are its
    approximations, a row's own int8 products: the same bits too."""
    generation = request.getfixturevalue(f"{precision}_generation")
    prompts = [generation.prompt_embeds(pcm, **case) for pcm in segments() for case in CASES]
    assert len({len(prompt) for prompt in prompts}) > 1
    passes = []

    def recording(self, model, hidden, slots, positions, indices, valid, logit_rows, scratch, logits):
        tokens = forward(self, model, hidden, slots, positions, indices, valid, logit_rows, scratch, logits)
        passes.append(logits[:len(logit_rows)].clone())
        return tokens

    forward = NativeDecoder._forward
    monkeypatch.setattr(NativeDecoder, "_forward", recording)
    generation.generate_tokens(prompts, [1] * len(prompts))  # the prefill alone: one token each
    together = passes[-1]
    for index, prompt in enumerate(prompts):
        generation.generate_tokens([prompt], [1])  # holds its prefix's cache from here on
        assert generation.prompt_prefixes.prefix_of([prompt]) is not None, index
        generation.generate_tokens([prompt], [1])
        assert torch.equal(passes[-1][0], together[index]), index


def test_bf16_generation_rounds_the_projections_and_head_to_bf16(tiny_nano, recognizer, bf16_generation):
    plain = dict(recognizer.model.llm.named_modules())
    replaced = {name: module for name, module in bf16_generation.model.llm.named_modules()
                if type(module) in (CompiledBf16Linear, SharedInputSlice)}
    expected = {name for name, module in plain.items() if type(module) in (torch.nn.Linear, PrepackedLinear)
                and is_product_layer(name)}
    assert set(replaced) == expected and len(expected) == 7 * len(recognizer.model.llm.model.layers) + 1
    float_llm = quietly(NanoRecognizer, tiny_nano, prepack=False).model.llm
    for name, layer in replaced.items():
        assert torch.equal(layer.weight(), float_llm.get_submodule(name).weight.bfloat16()), name
    assert bf16_generation.dtype == torch.float32
    assert bf16_generation.model.llm.model.embed_tokens.weight.dtype == torch.float32  # prompts in float32


@torch.no_grad()
def test_c_decode_steps_stop_each_row_at_its_cap_or_stop_token(int8_generation):
    prompts = [int8_generation.prompt_embeds(pcm) for pcm in segments()]
    full = int8_generation.generate_tokens(prompts)
    caps = [1, 3, 5]
    assert int8_generation.generate_tokens(prompts, caps) == [row[:cap] for row, cap in zip(full, caps)]
    # A token of the first row taken as a stop token: that row ends there, the others go on
    # (or end there too, if they hold it). The prompts left-padded, without a cached opening.
    embeds = torch.nn.utils.rnn.pad_sequence([p.flip(0) for p in prompts], batch_first=True).flip(1)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(p), dtype=torch.int32) for p in prompts],
                                           batch_first=True).flip(1)
    decoder = int8_generation.native_decoder
    unstopped = decoder.generate(embeds, mask, None, 0, [12] * len(prompts), set())
    assert [len(row) for row in unstopped] == [12] * len(prompts)
    stop = unstopped[0][2]
    assert stop not in unstopped[0][:2]
    rows = decoder.generate(embeds, mask, None, 0, [12] * len(prompts), {stop})
    assert rows[0] == unstopped[0][:3]
    assert rows == [until_stop(row, {stop}) for row in unstopped]
    with pytest.raises(ValueError, match="right-aligned"):  # the prefill's logits come from each last entry
        decoder.generate(embeds.flip(1), mask.flip(1), None, 0, [12] * len(prompts), set())


def test_int8_generation_keeps_hfs_steps_where_generation_is_not_plain_greedy(tiny_nano, caplog):
    sampled = quietly(NanoRecognizer, tiny_nano)
    sampled.model.llm.generation_config.repetition_penalty = 1.3
    sampled.use_int8_generation()
    assert sampled.native_decoder is None
    assert "not plain greedy search" in caplog.text


@torch.no_grad()
def test_without_a_compiler_the_int8_llm_stays_on_fbgemm_with_hfs_steps(tiny_nano, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(row_kernels.CACHE_ENV, str(tmp_path / "cache"))
    decode_step_library.cache_clear()
    try:
        fallback = quietly(NanoRecognizer, tiny_nano)
        with caplog.at_level(logging.WARNING):
            fallback.use_int8_generation()
        assert fallback.native_decoder is None and fallback.model.llm.lm_head.kernel == "fbgemm"
        warnings = [record.getMessage() for record in caplog.records
                    if record.levelno == logging.WARNING and record.name.startswith("twopass_asr")]
        assert len(warnings) == 1 and "no-such-compiler" in warnings[0] and "fbgemm" in warnings[0], warnings
        assert fallback.generate_tokens([fallback.prompt_embeds(segments()[0])])[0]
        # bf16 takes torch's own bf16 model.
        fallback_bf16 = quietly(NanoRecognizer, tiny_nano)
        fallback_bf16.use_torch_generation("bf16")
        assert fallback_bf16.dtype == torch.bfloat16 and fallback_bf16.native_decoder is None
        assert type(fallback_bf16.model.llm.lm_head) is torch.nn.Linear
    finally:
        decode_step_library.cache_clear()


def test_int8_generation_fixes_the_llms_layers(tiny_nano, int8_generation):
    with pytest.raises(ValueError, match="replaced in torch.float32"):
        int8_generation.use_dtype(torch.bfloat16)
    int8_generation.use_dtype(torch.float32)  # what it is already
    with pytest.raises(ValueError, match="already replaced"):
        int8_generation.use_int8_generation()
    with pytest.raises(ValueError, match="already replaced"):
        int8_generation.use_bf16_generation()
    prepacked = quietly(NanoRecognizer, tiny_nano)
    prepacked.use_dtype(torch.float32)
    with pytest.raises(ValueError, match="already replaced"):
        prepacked.use_int8_generation()


def corrupted(tokens: list[int], vocabulary: int) -> list[int]:
    """A draft that strays from `tokens` as a first pass's text would: every fourth token
    replaced, one dropped and one added."""
    draft = [(token + 1) % vocabulary if i % 4 == 3 else token for i, token in enumerate(tokens)]
    del draft[1]
    draft.insert(len(draft) // 2, 7)
    return draft


@torch.no_grad()
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_drafts_cut_the_c_steps_and_leave_the_tokens_as_they_were(precision, request):
    """drafts.py: the C steps check a draft's proposals in one pass per run and keep what greedy
    decoding gives, so with the tokens' own sequence as the draft the steps are few, and with
    a draft that strays, or one of other tokens, the tokens stay those generated without one,
    alone and batched with prompts of other lengths, however few rows a pass may hold."""
    generation = request.getfixturevalue(f"{precision}_generation")
    prompts = [generation.prompt_embeds(pcm, **case) for pcm in segments() for case in CASES]
    caps = [20] * len(prompts)
    plain = generation.generate_tokens(prompts, caps)
    assert min(len(row) for row in plain) > 8
    vocabulary = generation.native_decoder.vocabulary
    straying = [corrupted(row, vocabulary) for row in plain]
    configured = generation.draft_rows
    try:
        generation.draft_rows = 9
        own = DraftTally()
        assert [generation.generate_tokens([prompt], [cap], [row], own)[0]
                for prompt, cap, row in zip(prompts, caps, plain)] == plain
        # A pass keeps a run of up to 9 tokens; the prefill gives the first.
        tokens_after_prefill = sum(len(row) - 1 for row in plain)
        assert own.passes <= tokens_after_prefill // 2 and own.accepted >= tokens_after_prefill // 2, own
        # Batched, with rows for every prompt's proposals, and with five rows to share.
        generation.draft_rows = len(prompts) * 9
        wide, shared, unrelated = DraftTally(), DraftTally(), DraftTally()
        assert generation.generate_tokens(prompts, caps, straying, wide) == plain
        assert 0 < wide.accepted < own.accepted and wide.proposed > wide.accepted, wide
        generation.draft_rows = len(prompts) + 5
        assert generation.generate_tokens(prompts, caps, straying, shared) == plain
        assert 0 < shared.proposed <= 5 * shared.passes, shared
        other_tokens = [[(token + 5) % vocabulary for token in row] for row in plain]
        assert generation.generate_tokens(prompts, caps, other_tokens, unrelated) == plain
        # With one row a pass a draft changes nothing, and no pass checks one.
        generation.draft_rows = 1
        unchecked = DraftTally()
        assert generation.generate_tokens(prompts, caps, plain, unchecked) == plain
        assert unchecked.proposed == 0 and generation.draft_pass_rows == 0
    finally:
        generation.draft_rows = configured
