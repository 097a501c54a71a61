"""funasr_nano_vllm through a real tritonserver gives FunASR's FunASRNano text for the
same segments and prompt options (tiny random model, float32; the shared server runs the
default engine, auto, which is vLLM here; tests/second_pass/test_nano_vllm.py covers the engine itself
and the torch fallback)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from tests.conftest import SUITE_TORCH_THREADS
from tests.triton_client_utils import decoupled_texts, tensor
from twopass_asr.audio import pcm16_to_float
from twopass_asr.hotwords import parse_hotwords
from twopass_asr.kernels.cpu_priority import DEFAULT_CPU_NICE, MAX_NICE
from twopass_asr.second_pass.drafts import DRAFT_ROWS_ENV
from twopass_asr.second_pass.precision import ENCODER_PRECISION_ENV, PRECISION_ENV
from twopass_asr.second_pass.recognizer import NanoRecognizer
from twopass_asr.second_pass.vllm_engine import CANCELLED_IN_ENGINE, ENGINE_ENV
from twopass_asr.serving.triton_launcher import (DEFAULT_MODEL_REPOSITORY, TritonServer, TritonStartError,
                                                group_processes)

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def reference_nano(test_models):
    from funasr import AutoModel

    return AutoModel(model=str(test_models / "funasr_nano"), disable_update=True, disable_pbar=True, disable_log=True,
                     ncpu=SUITE_TORCH_THREADS)


def segment_inputs(pcm, hotwords=None, language=None, itn=None, stream=None, draft=None):
    inputs = [tensor("AUDIO", pcm.astype(np.int16), "INT16")]
    if draft is not None:
        inputs.append(tensor("DRAFT", np.array([draft.encode()], dtype=np.object_), "BYTES"))
    if stream is not None:
        inputs.append(tensor("STREAM", np.array([stream], dtype=bool), "BOOL"))
    if hotwords is not None:
        inputs.append(tensor("HOTWORDS", np.array([hotwords.encode()], dtype=np.object_), "BYTES"))
    if language is not None:
        inputs.append(tensor("LANGUAGE", np.array([language.encode()], dtype=np.object_), "BYTES"))
    if itn is not None:
        inputs.append(tensor("ITN", np.array([itn], dtype=bool), "BOOL"))
    return inputs


def reference_text(model, pcm, hotwords="", language=None, itn=True):
    kwargs = {"hotwords": parse_hotwords(hotwords), "itn": itn}
    if language not in (None, "", "auto"):
        kwargs["language"] = language
    with torch.no_grad():
        result = model.generate(input=pcm16_to_float(pcm), **kwargs)
    return result[0]["text"]


CASES = [
    dict(),
    dict(hotwords="阿里巴巴 通义"),
    dict(hotwords='{"魔搭": 20, "千问": 10}', itn=False),
    dict(language="en"),
    dict(language="zh", itn=False, hotwords="语音,识别"),
]


def test_nano_matches_funasr(triton_server, reference_nano, speech_wav):
    segments = [speech_wav.pcm[i * 16000 : i * 16000 + (2 + i) * 8000] for i in range(len(CASES))]
    requests = [segment_inputs(pcm, **case) for pcm, case in zip(segments, CASES)]
    got = decoupled_texts(triton_server.grpc_url, "funasr_nano_vllm", requests)
    expected = [reference_text(reference_nano, pcm, **case) for pcm, case in zip(segments, CASES)]
    assert got == expected
    assert all(got), "the tiny model must produce text"
    # Prompt options reach the model: the same audio with another prompt decodes differently.
    assert len(set(decoupled_texts(triton_server.grpc_url, "funasr_nano_vllm",
                                   [segment_inputs(segments[0], **case) for case in CASES]))) > 1


def test_nano_rejects_wrong_audio_type(triton_server):
    bad = [tensor("AUDIO", np.zeros(1600, np.float32), "FP32")]
    with pytest.raises(InferenceServerException):
        decoupled_texts(triton_server.grpc_url, "funasr_nano_vllm", [bad])
    good = [segment_inputs(np.zeros(8000, np.int16))]
    assert len(decoupled_texts(triton_server.grpc_url, "funasr_nano_vllm", good)) == 1


def test_nano_refuses_prompt_options_beyond_their_bounds(triton_server):
    pcm = np.zeros(8000, np.int16)
    for options, reason in ((dict(hotwords=" ".join(f"word{i}" for i in range(5000))), "hotwords take"),
                            (dict(language="x" * 10_000), "language must be at most")):
        with pytest.raises(InferenceServerException, match=reason):
            decoupled_texts(triton_server.grpc_url, "funasr_nano_vllm", [segment_inputs(pcm, **options)])


def test_eight_concurrent_segments_match_funasr(triton_server, reference_nano, speech_wav):
    cases = CASES + CASES[:3]
    segments = [speech_wav.pcm[i * 9000 : i * 9000 + (2 + i % 4) * 8000] for i in range(len(cases))]
    requests = [segment_inputs(pcm, **case) for pcm, case in zip(segments, cases)]
    passes_before = triton_server.model_counter("funasr_nano_vllm", "twopass_asr_nano_encoder_passes_total")
    segments_before = triton_server.model_counter("funasr_nano_vllm", "twopass_asr_nano_encoded_segments_total")
    got = decoupled_texts(triton_server.grpc_url, "funasr_nano_vllm", requests)
    assert got == [reference_text(reference_nano, pcm, **case) for pcm, case in zip(segments, cases)]
    # The segments waited together, so the audio encoder took several of them per pass.
    passes = triton_server.model_counter("funasr_nano_vllm", "twopass_asr_nano_encoder_passes_total") - passes_before
    segments = triton_server.model_counter("funasr_nano_vllm", "twopass_asr_nano_encoded_segments_total")
    assert segments - segments_before == 8
    assert 1 <= passes < 8


def test_shared_server_generates_with_vllm(triton_server):
    """The default engine (auto) must find vLLM here: the other tests then cover it."""
    if os.environ.get(ENGINE_ENV, "auto") == "torch":
        pytest.skip(f"{ENGINE_ENV}=torch")
    assert "(vLLM generation)" in triton_server.log_text()


def test_cancelled_stream_does_not_break_later_requests(triton_server, reference_nano, speech_wav):
    import tritonclient.grpc as grpcclient

    segment = speech_wav.pcm[16000:64000]
    on_vllm = "(vLLM generation)" in triton_server.log_text()
    # The tiny random model never emits EOS, so the requests are usually still generating
    # when the first delta arrives; on a loaded machine all six can finish (a few ms of
    # tokens) before the cancellation lands, so it is tried up to three times.
    for attempt in range(3):
        aborted_before = triton_server.log_text().count(CANCELLED_IN_ENGINE)
        first_delta = threading.Event()
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        client.start_stream(callback=lambda result, error, delta=first_delta: delta.set())
        for index in range(6):
            client.async_stream_infer("funasr_nano_vllm", segment_inputs(segment),
                                      request_id=f"cancel-{attempt}-{index}")
        assert first_delta.wait(120)
        client.stop_stream(cancel_requests=True)
        got = decoupled_texts(triton_server.grpc_url, "funasr_nano_vllm", [segment_inputs(segment)] * 2)
        assert got == [reference_text(reference_nano, segment)] * 2
        # The cancellation reached the model mid-generation and aborted the engine request.
        if not on_vllm or triton_server.log_text().count(CANCELLED_IN_ENGINE) > aborted_before:
            break
    else:
        pytest.fail("in three tries no cancellation aborted a request in vLLM's engine")


def thread_nice_values(pid: int) -> set[int]:
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            values.add(os.getpriority(os.PRIO_PROCESS, int(task.name)))
        except (ProcessLookupError, ValueError):
            continue
    return values


def test_second_pass_runs_at_lower_cpu_priority(triton_server):
    """cpu_nice (empty = 10 on CPU): every thread of funasr_nano_vllm's stub, and of the
    processes it started (vLLM's EngineCore and Worker), runs that many nice levels below
    the first-pass models."""
    group = group_processes(triton_server.process.pid)
    base = os.getpriority(os.PRIO_PROCESS, triton_server.process.pid)

    def stubs(model):
        return {pid for pid, (_, command) in group.items()
                if "triton_python_backend_stub" in command and f"/{model}/" in command}

    second_pass = stubs("funasr_nano_vllm")
    assert len(second_pass) == 1
    started_by_it = set()
    while True:
        more = {pid for pid, (parent, _) in group.items() if parent in second_pass | started_by_it} - started_by_it
        if not more:
            break
        started_by_it |= more
    if "(vLLM generation)" in triton_server.log_text():
        assert started_by_it, "vLLM's engine processes run beside the stub"
    lowered = min(MAX_NICE, base + DEFAULT_CPU_NICE)
    for pid in second_pass | started_by_it:
        assert thread_nice_values(pid) == {lowered}, group[pid][1]
    first_pass = stubs("paraformer_streaming") | stubs("vad")
    assert len(first_pass) == 2  # one instance each
    for pid in first_pass:
        assert thread_nice_values(pid) == {base}, group[pid][1]


def test_int8_audio_encoder_serves_its_text_and_a_wrong_precision_is_named(test_models, speech_wav, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / "funasr_nano_vllm", repository / "funasr_nano_vllm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    torch_engine = {ENGINE_ENV: "torch"}  # starts in seconds; the encoder is the same for vLLM
    wrong = TritonServer(test_models, repository, log_path=tmp_path / "wrong.log",
                         env={**torch_engine, ENCODER_PRECISION_ENV: "bf16"})
    with pytest.raises(TritonStartError, match=r"parameter encoder_precision \(environment "
                                               r"TWOPASS_ASR_NANO_ENCODER_PRECISION\) must be one of auto, fp32, "
                                               r"int8, got 'bf16'"):
        wrong.start()

    segments = [speech_wav.pcm[i * 16000:i * 16000 + (2 + i) * 8000] for i in range(3)]
    recognizer = NanoRecognizer(test_models / "funasr_nano", encoder_precision="int8")
    expected = [recognizer.recognize(pcm) for pcm in segments]
    with TritonServer(test_models, repository, log_path=tmp_path / "int8.log",
                      env={**torch_engine, ENCODER_PRECISION_ENV: "int8"}) as server:
        requests = [segment_inputs(pcm) for pcm in segments]
        assert decoupled_texts(server.grpc_url, "funasr_nano_vllm", requests) == expected
        assert f"LLM in fp32, audio encoder in int8 on {recognizer.encoder_int8_kernel}," in server.log_text()
    assert all(expected), "the tiny model must produce text"


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_compiled_precisions_on_the_torch_engine_serve_their_text(test_models, speech_wav, tmp_path, precision):
    """precision int8 or bf16 with engine torch: torch's layers on the compiled products
    (llm_on_torch), each decode step in C (native_decode). The segments go together, so the
    model may decode them in one batch: each row's products and attention are its own (int8
    activations quantized per token), so each gets the text it has alone. With a draft of
    the first pass's text (here the text itself, then one with every other character
    another) the decode steps check its tokens in passes of up to 12 rows (the env's, where
    three segments have rows to spare on any CPU): the texts stay the same, and the model
    counts the draft tokens it kept."""
    repository = tmp_path / "repository"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / "funasr_nano_vllm", repository / "funasr_nano_vllm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    segments = [speech_wav.pcm[i * 16000:i * 16000 + (2 + i) * 8000] for i in range(3)]
    recognizer = NanoRecognizer(test_models / "funasr_nano")
    recognizer.use_torch_generation(precision)
    expected = [recognizer.recognize(pcm) for pcm in segments]
    with TritonServer(test_models, repository, log_path=tmp_path / f"{precision}.log",
                      env={ENGINE_ENV: "torch", PRECISION_ENV: precision, ENCODER_PRECISION_ENV: "fp32",
                           DRAFT_ROWS_ENV: "12"}) as server:
        got = decoupled_texts(server.grpc_url, "funasr_nano_vllm", [segment_inputs(pcm) for pcm in segments])
        log = server.log_text()
        assert f"(torch generation, decode steps in C), LLM in {precision}, audio encoder in fp32," in log
        assert "new tokens, the first pass's drafts checked in passes of up to 12 rows" in log
        assert server.model_counter("funasr_nano_vllm", "twopass_asr_nano_draft_tokens_proposed_total") == 0
        for drafts in (expected, ["".join(c if i % 2 else "的" for i, c in enumerate(text)) for text in expected]):
            requests = [segment_inputs(pcm, draft=draft) for pcm, draft in zip(segments, drafts)]
            assert decoupled_texts(server.grpc_url, "funasr_nano_vllm", requests) == expected
        assert server.model_counter("funasr_nano_vllm", "twopass_asr_nano_draft_tokens_accepted_total") > 0
    assert got == expected and all(expected)
