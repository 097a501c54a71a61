"""One frontend over two tritonservers (replicas of the model repository): streams are spread
over both and give what one server gives; a replica that is down gets no new streams; streams
on a replica that dies move to the other and lose nothing, and end with 1011 when none is left."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import grpc
import pytest

from frontend.backend import InferenceError
from frontend.client import transcribe
from frontend.server import parse_args
from frontend.triton_client import TritonGateway, TritonUnavailable
from tests.frontend.test_operations import http_get, metric, samples, wait_for
from tests.frontend.test_protocol_e2e import FrontendProcess
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


def test_a_broken_stream_counts_as_a_lost_server_only_when_the_server_no_longer_answers(triton_server):
    """A server killed mid-stream can end its gRPC streams with INTERNAL, not UNAVAILABLE."""
    broken = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                  details="Internal error from Core")

    async def failure_at(url: str):
        gateway = TritonGateway(url)
        try:
            return await gateway.rpc_failure(broken, "vad")
        finally:
            await gateway.close()

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_url = f"127.0.0.1:{unused.getsockname()[1]}"
    on_a_live_server = asyncio.run(failure_at(triton_server.grpc_url))
    on_a_dead_server = asyncio.run(failure_at(dead_url))
    assert type(on_a_live_server) is InferenceError and "INTERNAL" in str(on_a_live_server)
    assert isinstance(on_a_dead_server, TritonUnavailable) and "no longer answers" in str(on_a_dead_server)


def kill(server: TritonServer) -> None:
    """SIGKILL tritonserver and its model processes, as a crashed host would lose them."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(30)


@pytest.mark.parametrize("fault, after_s", [
    # The first utterance's segment closed (its second pass maybe under way), the second open.
    (signal.SIGKILL, 4.0),
    # In the silence after the second utterance, its second pass under way.
    (signal.SIGKILL, 6.3),
    # A server that stops answering (its connections stay up): found by the step timeout.
    (signal.SIGSTOP, 4.0),
], ids=["killed-in-segment", "killed-in-silence", "stopped"])
def test_streams_on_a_lost_replica_move_to_the_other_and_lose_nothing(triton_server, test_models, speech_wav,
                                                                     tmp_path, fault, after_s):
    """Ten real-time 2pass streams over two servers; one server is lost mid-stream. Each
    stream ends with one final message and exactly the segments of a run without the fault."""
    alone = FrontendProcess(triton_server.grpc_url, name="failover-expected")
    try:
        expected = asyncio.run(transcribe(alone.url, speech_wav.pcm, {"mode": "2pass"}))
    finally:
        alone.stop()
    assert expected.error is None and len(expected.segments) >= 2

    with TritonServer(test_models, log_path=tmp_path / "victim.log", env={ENGINE_ENV: "torch"}) as victim:
        # The victim is listed first, so it takes the first of each pair of streams.
        frontend = FrontendProcess(f"{victim.grpc_url},{triton_server.grpc_url}", "--readiness-interval-s", "0.5",
                                   "--step-timeout-s", "2", name="failover")
        try:
            async def streams_with_a_fault():
                clients = [asyncio.create_task(transcribe(frontend.url, speech_wav.pcm, {"mode": "2pass"},
                                                          realtime=True)) for _ in range(STREAMS)]
                await asyncio.sleep(after_s)
                os.killpg(victim.process.pid, fault)
                return await asyncio.gather(*clients)

            results = asyncio.run(streams_with_a_fault())
            moved = metric(samples(frontend), "failovers_total")
        finally:
            frontend.stop()
            kill(victim)
    assert moved == STREAMS // 2, frontend.log()[-3000:]
    for result in results:
        assert result.error is None, result.error
        assert [m.get("is_final") for m in result.messages].count(True) == 1
        assert segments_of(result) == segments_of(expected)


def test_streams_end_with_1011_when_both_servers_die_and_service_resumes_when_one_is_back(test_models, speech_wav,
                                                                                        tmp_path):
    """Two servers killed one after the other: the first one's streams move to the second;
    when it dies too, every stream gets inference_unavailable and 1011. /readyz turns 503, and
    200 again once a server is back on an address, which then serves new streams."""
    servers = [TritonServer(test_models, log_path=tmp_path / f"server{index}.log", env={ENGINE_ENV: "torch"}).start()
               for index in range(2)]
    frontend = FrontendProcess(",".join(server.grpc_url for server in servers), "--readiness-interval-s", "0.2",
                               name="both-die")
    try:
        wait_for(lambda: http_get(frontend, "/readyz")[0] == 200, 30, "ready")

        async def streams_with_two_kills():
            clients = [asyncio.create_task(transcribe(frontend.url, speech_wav.pcm, {"mode": "2pass"}, realtime=True))
                       for _ in range(4)]
            await asyncio.sleep(2.0)
            kill(servers[0])
            await asyncio.sleep(1.5)
            kill(servers[1])
            return await asyncio.gather(*clients)

        for result in asyncio.run(streams_with_two_kills()):
            assert result.error is not None and result.error["code"] == "inference_unavailable", result.messages
            assert result.close_code == 1011
        assert metric(samples(frontend), "failovers_total") == 2
        wait_for(lambda: http_get(frontend, "/readyz")[0] == 503, 30, "not ready with no server")

        with TritonServer(test_models, grpc_port=servers[1].grpc_port, log_path=tmp_path / "back.log",
                          env={ENGINE_ENV: "torch"}):
            wait_for(lambda: http_get(frontend, "/readyz")[0] == 200, 60, "ready once a server is back")
            result = asyncio.run(transcribe(frontend.url, speech_wav.pcm, {"mode": "2pass"}))
            assert result.error is None and result.segments
    finally:
        frontend.stop()
        for server in servers:
            server.stop()
