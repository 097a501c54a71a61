"""One frontend over two tritonservers (replicas of the model repository): streams are spread
over both and give what one server gives; a replica that is down gets no new streams."""

from __future__ import annotations

import asyncio

import pytest

from frontend.client import transcribe
from frontend.server import parse_args
from tests.frontend.test_protocol_e2e import FrontendProcess
from tests.frontend.test_operations import http_get, metric, samples, wait_for
from twopass_asr.second_pass.vllm_engine import ENGINE_ENV
from twopass_asr.serving.triton_launcher import TritonServer

pytestmark = pytest.mark.triton

STREAMS = 10


@pytest.fixture(scope="module")
def second_triton(test_models, tmp_path_factory):
    # The torch engine starts in seconds; its fp32 texts equal vLLM's (both equal FunASR's).
    with TritonServer(test_models, log_path=tmp_path_factory.mktemp("replica") / "tritonserver.log",
                      env={ENGINE_ENV: "torch"}) as server:
        yield server


def sequences_started(server: TritonServer) -> float:
    return server.model_counter("vad", "nv_inference_request_success")


def segments_of(result) -> list[tuple[int, int, str]]:
    return [(m["start_time"], m["end_time"], m["text"]) for m in result.segments]


def test_streams_are_spread_over_the_replicas_and_give_one_servers_results(triton_server, second_triton,
                                                                         speech_wav):
    alone = FrontendProcess(triton_server.grpc_url, name="one-server")
    try:
        expected = asyncio.run(transcribe(alone.url, speech_wav.pcm, {"mode": "2pass"}))
    finally:
        alone.stop()
    assert expected.error is None and expected.segments

    frontend = FrontendProcess(f"{triton_server.grpc_url},{second_triton.grpc_url}", name="replicas")
    before = {server.grpc_url: sequences_started(server) for server in (triton_server, second_triton)}

    async def concurrent():
        return await asyncio.gather(*(transcribe(frontend.url, speech_wav.pcm, {"mode": "2pass"})
                                      for _ in range(STREAMS)))

    try:
        results = asyncio.run(concurrent())
    finally:
        frontend.stop()
    for result in results:
        assert result.error is None and result.final is not None
        assert segments_of(result) == segments_of(expected)
    for server in (triton_server, second_triton):
        # Each stream sends its VAD requests to one server; both got streams.
        assert sequences_started(server) > before[server.grpc_url], server.grpc_url


def test_a_replica_that_is_down_gets_no_new_streams(triton_server, speech_wav):
    from twopass_asr.serving.triton_launcher import free_port

    down = f"127.0.0.1:{free_port()}"
    frontend = FrontendProcess(f"{down},{triton_server.grpc_url}", "--readiness-interval-s", "0.2", name="one-down")
    try:
        wait_for(lambda: metric(samples(frontend), "backend_ready", backend=triton_server.grpc_url) == 1, 30,
                 "the live replica is seen ready")
        assert metric(samples(frontend), "backend_ready", backend=down) == 0
        assert http_get(frontend, "/readyz") == (200, "ready\n")

        async def concurrent():
            return await asyncio.gather(*(transcribe(frontend.url, speech_wav.pcm, {"mode": "2pass"})
                                          for _ in range(3)))

        for result in asyncio.run(concurrent()):
            assert result.error is None and result.segments
    finally:
        frontend.stop()


def test_replica_addresses_are_checked():
    assert parse_args(["--triton-url", "a:1,b:2"]).triton_url == ["a:1", "b:2"]
    for bad in ("a:1,,b:2", "a:1,a:1", ""):
        with pytest.raises(SystemExit):
            parse_args(["--triton-url", bad])
