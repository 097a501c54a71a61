"""paraformer_streaming through a real tritonserver gives, chunk for chunk, the text of
FunASR's AutoModel.generate streaming on the same chunks (tiny random model)."""

from __future__ import annotations

import os
import random
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from perf.bench_first_pass_triton import model_repository
from tests.conftest import SUITE_TORCH_THREADS
from tests.int8_kernels import TOKENWISE_KERNEL_PARAMS
from tests.triton_client_utils import chunks_of, run_sequence, tensor, text_of
from twopass_asr.audio import pcm16_to_float
from twopass_asr.first_pass.batched import BatchedStreamingParaformer
from twopass_asr.first_pass.engines import FunasrOnnxStreamingParaformer
from twopass_asr.first_pass.native_layers import native_auto_kernel
from twopass_asr.first_pass.options import INT8_KERNEL_ENV, PRECISION_ENV
from twopass_asr.kernels.cpu_features import cpu_has_int8_dot_products
from twopass_asr.serving.triton_launcher import TritonServer, TritonStartError
from twopass_asr.store.export_cache import CACHE_ENV

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def reference_paraformer(test_models):
    from funasr import AutoModel

    return AutoModel(model=str(test_models / "paraformer_streaming"), disable_update=True, disable_pbar=True,
                     disable_log=True, ncpu=SUITE_TORCH_THREADS)


def reference_texts(model, chunks, chunk_size=(0, 10, 5), encoder_look_back=4, decoder_look_back=1):
    cache = {}
    texts = []
    for index, chunk in enumerate(chunks):
        result = model.generate(
            input=pcm16_to_float(chunk), cache=cache, is_final=index == len(chunks) - 1,
            chunk_size=list(chunk_size), encoder_chunk_look_back=encoder_look_back,
            decoder_chunk_look_back=decoder_look_back,
        )
        texts.append(result[0]["text"] if result else "")
    return texts


def option_inputs(chunk_size, encoder_look_back, decoder_look_back):
    return [
        tensor("CHUNK_SIZE", np.array([chunk_size], np.int32), "INT32"),
        tensor("ENCODER_LOOK_BACK", np.array([[encoder_look_back]], np.int32), "INT32"),
        tensor("DECODER_LOOK_BACK", np.array([[decoder_look_back]], np.int32), "INT32"),
    ]


@pytest.mark.parametrize(
    "chunk_size,encoder_look_back,decoder_look_back,chunking",
    [
        ((0, 10, 5), 4, 1, 9600),
        ((0, 10, 5), 4, 1, [3000, 7001, 960]),
        ((0, 8, 4), 2, 0, 7680),
        ((5, 10, 5), 0, 2, 9600),
    ],
)
def test_paraformer_matches_funasr(triton_server, reference_paraformer, speech_wav, chunk_size,
                                   encoder_look_back, decoder_look_back, chunking):
    chunks = chunks_of(speech_wav.pcm, chunking)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    got = [text_of(out) for out in run_sequence(
        client, "paraformer_streaming", chunks, option_inputs(chunk_size, encoder_look_back, decoder_look_back))]
    expected = reference_texts(reference_paraformer, chunks, chunk_size, encoder_look_back, decoder_look_back)
    assert got == expected
    assert sum(1 for text in got if text) >= 3, "the tiny model's CIF must fire on speech"


def test_concurrent_streams_match_funasr(triton_server, reference_paraformer, speech_wav):
    """Eight interleaved streams (different audio, lengths, start times) each get exactly
    their own reference output while Triton batches their chunks together."""
    rng = random.Random(7)
    streams = []
    for index in range(8):
        start = rng.randrange(0, 16000 * 3)
        length = rng.randrange(16000 * 2, len(speech_wav.pcm) - start)
        pcm = np.roll(speech_wav.pcm, index * 1234)[start : start + length]
        streams.append(chunks_of(pcm, 9600))

    def run(chunks):
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        return [text_of(out) for out in run_sequence(client, "paraformer_streaming", chunks)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, streams))
    for chunks, got in zip(streams, results):
        assert got == reference_texts(reference_paraformer, chunks)


def test_workers_share_the_cores(triton_server):
    """paraformer_streaming (config.pbtxt: one decoupled instance, workers and threads
    empty) runs one single-threaded worker per core; vad, one instance that is not
    decoupled, gives its one pass all the cores."""
    log = triton_server.log_text()
    settings = {model: re.findall(rf"{model}: loaded .* on cpu, (\d+) torch thread\(s\) x (\d+) worker", log)
                for model in ("paraformer_streaming", "vad")}
    cores = len(os.sched_getaffinity(0))
    assert settings["paraformer_streaming"] == [("1", str(cores))]
    assert settings["vad"] == [(str(cores), "1")]


def test_bad_decoding_options_are_rejected(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    bad = tensor("CHUNK_SIZE", np.array([[0, 0, 5]], np.int32), "INT32")
    with pytest.raises(InferenceServerException, match="chunk_size"):
        run_sequence(client, "paraformer_streaming", [np.zeros(9600, np.int16)], [bad], sequence_id=777001)
    # The failed start left no state, and the model keeps serving a good stream.
    assert isinstance(text_of(run_sequence(client, "paraformer_streaming", [np.zeros(9600, np.int16)])[0]), str)


def test_streams_are_freed_on_end(triton_server, speech_wav):
    """The active-stream gauge (exported, or model_counter raises) returns to zero once
    every sequence has ended; its values are stream counts, so a zero sum means all zero."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    run_sequence(client, "paraformer_streaming", chunks_of(speech_wav.pcm[:32000], 9600))
    assert triton_server.model_counter("paraformer_streaming", "twopass_asr_active_streams") == 0


def test_busy_streams_and_abandoned_segments_keep_the_server_up(triton_server, speech_wav):
    """Twelve clients firing 100 ms chunks at vad and paraformer_streaming as fast as they
    are answered, for 20 s, while four second-pass clients walk away from every other
    segment at a random time (as the frontend does when its WebSocket client leaves).
    Before metric updates were serialised (InstanceMetric), the Python backend crashed
    tritonserver within seconds of the sequence traffic alone: the paraformer workers and
    the stubs' main threads updated metrics at once."""
    import asyncio

    from perf.server_stress import CHUNK_SAMPLES, run_load

    pcm = speech_wav.pcm[: 16000 * 3]
    counts = asyncio.run(run_load(triton_server.grpc_url, 20, sequence_clients=12, segment_clients=4, pcm=pcm,
                                  cancel="timer"))
    assert all(count >= len(pcm) // CHUNK_SAMPLES for count in counts.chunks_answered), counts
    assert counts.segments_cancelled >= 1 and counts.responses >= 1, counts
    assert triton_server.process.poll() is None and triton_server.is_ready()


def test_a_wrong_precision_or_int8_kernel_is_named(test_models, tmp_path):
    repository = model_repository("batched", tmp_path)  # paraformer_streaming alone, as shipped
    for env, message in [({PRECISION_ENV: "int4"},
                          r"parameter precision \(environment TWOPASS_ASR_FIRST_PASS_PRECISION\) "
                          r"must be one of auto, fp32, int8, got 'int4'"),
                         ({PRECISION_ENV: "int8", INT8_KERNEL_ENV: "mkl"},
                          r"parameter int8_kernel \(environment TWOPASS_ASR_FIRST_PASS_INT8_KERNEL\) "
                          r"must be one of auto, onnxruntime, fbgemm, onednn, compiled, got 'mkl'")]:
        wrong = TritonServer(test_models, repository, log_path=tmp_path / "wrong.log", env=env)
        with pytest.raises(TritonStartError, match=message):
            wrong.start()


@pytest.mark.parametrize("kernel", ["onnxruntime", *TOKENWISE_KERNEL_PARAMS])
def test_int8_serves_the_int8_engines_text_for_streams_in_flight_together(test_models, speech_wav, tmp_path, kernel):
    """Each stream gets the text the engine gives it alone, whichever streams share its passes
    (the server groups them by timing): every kernel quantizes a stream's activations apart
    from the others', and the float parts give a stream the same bits in any batch."""
    repository = model_repository("batched", tmp_path)
    engine = BatchedStreamingParaformer(test_models / "paraformer_streaming", precision="int8", int8_kernel=kernel)
    sequences = [chunks_of(speech_wav.pcm[offset:], 9600) for offset in (0, 7000, 15000)]
    expected = []
    for chunks in sequences:
        stream = engine.new_stream()
        expected.append([engine.process(stream, chunk, i == len(chunks) - 1) for i, chunk in enumerate(chunks)])
    env = {PRECISION_ENV: "int8", INT8_KERNEL_ENV: kernel}
    with TritonServer(test_models, repository, log_path=tmp_path / "int8.log", env=env) as server:
        assert f"paraformer_streaming: batched engine in int8 on {kernel}" in server.log_text()

        def serve(chunks):  # one client per stream: a client holds one gRPC stream
            client = grpcclient.InferenceServerClient(server.grpc_url)
            return [text_of(result) for result in run_sequence(client, "paraformer_streaming", chunks)]

        with ThreadPoolExecutor(len(sequences)) as pool:
            assert list(pool.map(serve, sequences)) == expected
    assert any(expected[0]), "too little text to compare"


def test_auto_precision_is_chosen_by_the_cpu_and_logged(test_models, tmp_path):
    repository = model_repository("batched", tmp_path)  # precision auto, as shipped
    # The suite's fp32 (conftest) off: the shipped default counts.
    with TritonServer(test_models, repository, log_path=tmp_path / "auto.log", env={PRECISION_ENV: ""}) as server:
        kernel = native_auto_kernel(cpu_has_int8_dot_products())
        assert f"paraformer_streaming: batched engine in int8 on {kernel} (auto)" in server.log_text()


def test_funasr_onnx_engine_serves_funasrs_own_int8_runtime(test_models, speech_wav, tmp_path, monkeypatch):
    """The engine perf compares with (FunASR's ONNX runtime per stream, int8) serves through
    tritonserver exactly that runtime's text, for streams in flight together."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "exports"))  # the server reuses this export
    runtime = FunasrOnnxStreamingParaformer.for_model_dir(test_models / "paraformer_streaming", precision="int8")
    assert runtime.precision == "int8"
    sequences = [chunks_of(speech_wav.pcm[offset:], 9600) for offset in (0, 7000, 15000)]
    expected = []
    for chunks in sequences:
        stream = runtime.new_stream()
        expected.append(runtime.process_batch([stream] * len(chunks), chunks,
                                              [index == len(chunks) - 1 for index in range(len(chunks))]))
    repository = model_repository("funasr_onnx:int8", tmp_path)
    env = {PRECISION_ENV: "", CACHE_ENV: str(tmp_path / "exports")}
    with TritonServer(test_models, repository, log_path=tmp_path / "onnx.log", env=env) as server:
        assert "paraformer_streaming: funasr_onnx engine in int8" in server.log_text()

        def serve(chunks):  # one client per stream: a client holds one gRPC stream
            client = grpcclient.InferenceServerClient(server.grpc_url)
            return [text_of(result) for result in run_sequence(client, "paraformer_streaming", chunks)]

        with ThreadPoolExecutor(len(sequences)) as pool:
            assert list(pool.map(serve, sequences)) == expected
        # That runtime has no look-back: a stream asking for it is refused, and named why.
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match="no encoder or decoder look-back"):
            run_sequence(client, "paraformer_streaming", sequences[0][:1], option_inputs((0, 10, 5), 4, 1))
    assert all(any(texts) for texts in expected), "too little text to compare"
