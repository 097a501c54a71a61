"""The vad model through a real tritonserver gives FunASR's streaming VAD segments,
chunk for chunk, with the real FSMN-VAD weights."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import SUITE_TORCH_THREADS
from tests.triton_client_utils import chunks_of, run_sequence, tensor
from twopass_asr.audio import pcm16_to_float
from twopass_asr.vad.batched import DEFAULT_VAD_STEP_MS

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def reference_vad(test_models):
    from funasr import AutoModel

    return AutoModel(model=str(test_models / "vad"), disable_update=True, disable_pbar=True, disable_log=True,
                     ncpu=SUITE_TORCH_THREADS)


def reference_segments(model, chunks, max_end_silence_ms):
    cache = {}
    kwargs = {} if max_end_silence_ms is None else {"max_end_silence_time": max_end_silence_ms}
    out = []
    for index, chunk in enumerate(chunks):
        result = model.generate(
            input=pcm16_to_float(chunk), cache=cache, is_final=index == len(chunks) - 1,
            chunk_size=DEFAULT_VAD_STEP_MS, **kwargs,
        )
        out.append([list(map(int, seg)) for seg in result[0]["value"]])
    return out


def closed_segments(events):
    """Pair start/end events into (start, end) segments."""
    segments, start = [], None
    for chunk_events in events:
        for beg, end in chunk_events:
            if beg >= 0:
                start = beg
            if end >= 0:
                segments.append((start, end))
    return segments


@pytest.mark.parametrize("noise_db", [None, -45.0])
@pytest.mark.parametrize("chunking", [9600, [960, 4000, 11], [16000 * 3]], ids=["600ms", "uneven", "3s"])
@pytest.mark.parametrize("max_end_silence_ms", [None, 500])
def test_vad_matches_funasr(triton_server, reference_vad, speech_wav, noise_db, chunking, max_end_silence_ms):
    pcm = speech_wav.pcm
    if noise_db is not None:
        noise = np.random.default_rng(1).normal(0, 32768 * 10 ** (noise_db / 20), pcm.shape)
        pcm = np.clip(pcm + noise, -32768, 32767).astype(np.int16)
    chunks = chunks_of(pcm, chunking)
    start_inputs = []
    if max_end_silence_ms is not None:
        start_inputs.append(tensor("MAX_END_SILENCE_MS", np.array([[max_end_silence_ms]], np.int32), "INT32"))
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    got = [out.reshape(-1, 2).tolist() for out in
           run_sequence(client, "vad", chunks, start_inputs, output="SEGMENTS")]
    expected = reference_segments(reference_vad, chunks, max_end_silence_ms)
    assert got == expected
    # Three utterances split by >= 1.2 s of silence; FunASR's default schedule wants 2 s of
    # silence early in a stream, so without a fixed end silence some of them merge.
    assert len(closed_segments(got)) == 3 if max_end_silence_ms else len(closed_segments(got)) >= 1


def test_vad_knobs_are_per_stream(triton_server, speech_wav):
    """A stream with a tiny max segment length is cut more often, while a concurrent
    default stream keeps its own settings."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    chunks = chunks_of(speech_wav.pcm, 9600)
    end_silence = tensor("MAX_END_SILENCE_MS", np.array([[500]], np.int32), "INT32")
    short = run_sequence(client, "vad", chunks,
                         [end_silence, tensor("MAX_SEGMENT_MS", np.array([[400]], np.int32), "INT32")],
                         output="SEGMENTS")
    default = run_sequence(client, "vad", chunks, [end_silence], output="SEGMENTS")
    short_segments = closed_segments([o.reshape(-1, 2).tolist() for o in short])
    default_segments = closed_segments([o.reshape(-1, 2).tolist() for o in default])
    assert len(default_segments) == 3
    assert len(short_segments) > len(default_segments)
    assert all(end - start <= 400 + 100 for start, end in short_segments)


def test_vad_rejects_unknown_stream(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    audio = tensor("AUDIO", np.zeros((1, 960), np.int16), "INT16")
    with pytest.raises(InferenceServerException, match="START|unknown stream"):
        client.infer("vad", [audio], sequence_id=424242, sequence_start=False, sequence_end=False)
    # The model keeps serving others.
    assert run_sequence(client, "vad", [np.zeros(960, np.int16)], output="SEGMENTS")[0].size == 0


def test_vad_refuses_overlapping_passes(test_models, tmp_path):
    """vad made decoupled with two workers fails to load with the reason: FunASR's VAD
    keeps per-call settings on the shared model, so its passes must not overlap."""
    import shutil

    from twopass_asr.serving.triton_launcher import DEFAULT_MODEL_REPOSITORY, TritonServer, TritonStartError

    shutil.copytree(DEFAULT_MODEL_REPOSITORY / "vad", tmp_path / "repo" / "vad",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "repo" / "vad" / "config.pbtxt"
    text = config.read_text()
    assert "instance_group [" in text
    text = text.replace("instance_group [", "model_transaction_policy { decoupled: true }\ninstance_group [", 1)
    config.write_text(text.replace('{ key: "max_streams"', '{ key: "workers" value: { string_value: "2" } },\n'
                                   '  { key: "max_streams"', 1))
    server = TritonServer(test_models, tmp_path / "repo", log_path=tmp_path / "tritonserver.log")
    with pytest.raises(TritonStartError, match="vad runs one pass at a time: set parameter workers to 1"):
        server.start(timeout=120)
