"""What operators run the frontend by: its Prometheus metrics, /healthz and /readyz, and the
drain on SIGTERM; `python -m frontend.server` processes against real tritonservers."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from frontend.client import StreamResult, receive_until_final, transcribe
from tests.frontend.test_protocol_e2e import FrontendProcess
from twopass_asr.second_pass.vllm_engine import ENGINE_ENV
from twopass_asr.serving.triton_launcher import TritonServer, free_port

pytestmark = pytest.mark.triton


def http_get(frontend: FrontendProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{frontend.port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(frontend: FrontendProcess) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value of every metric /metrics exposes."""
    status, text = http_get(frontend, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(values, name: str, **labels) -> float:
    return values.get((f"twopass_frontend_{name}", tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.2)


@pytest.fixture
def own_frontend(triton_server):
    """A frontend of this test alone (its counts start at zero)."""
    process = FrontendProcess(triton_server.grpc_url, "--readiness-interval-s", "0.2", name="operations")
    yield process
    if process.process.poll() is None:
        process.stop()


def test_metrics_count_the_traffic_sent(own_frontend, triton_server, speech_wav):
    result = asyncio.run(transcribe(own_frontend.url, speech_wav.pcm, {"mode": "2pass"}))
    assert result.error is None and result.final is not None
    bad = asyncio.run(transcribe(own_frontend.url, speech_wav.pcm[:16000], {"mode": "2pass", "wav_format": "ogg"}))
    assert bad.error is not None
    online = asyncio.run(transcribe(own_frontend.url, speech_wav.pcm, {"mode": "online"}))
    assert online.error is None

    wait_for(lambda: {metric(samples(own_frontend), name) for name in ("streams_open", "connections_open")} == {0},
             15, "the streams and connections are counted ended")
    values = samples(own_frontend)
    assert metric(values, "streams_total", mode="2pass") == 1
    assert metric(values, "streams_total", mode="online") == 1
    sent = {}
    for message in result.messages + bad.messages + online.messages:
        sent[message["mode"]] = sent.get(message["mode"], 0) + 1
    for mode, count in sent.items():
        assert metric(values, "messages_total", mode=mode) == count, mode
    assert metric(values, "errors_total", code=bad.error["code"]) == 1
    # The online stream's final message carries the first pass's tail: not a partial on time.
    partials = len([m for m in result.partials + online.partials if not m.get("is_final")])
    assert partials and metric(values, "partial_lag_seconds_count") == partials
    assert result.segments and metric(values, "second_pass_seconds_count") == len(result.segments)
    assert 0 < metric(values, "second_pass_seconds_sum") < 60 * len(result.segments)
    assert metric(values, "backend_ready", backend=triton_server.grpc_url) == 1
    assert values[("process_resident_memory_bytes", ())] > 0


def test_open_connections_and_streams_are_counted_while_open(own_frontend, speech_wav):
    async def scenario():
        async with connect(own_frontend.url) as websocket:
            await websocket.send(json.dumps({"mode": "2pass", "is_speaking": True}))
            await websocket.send(speech_wav.pcm[:16000].astype("<i2").tobytes())
            await asyncio.sleep(0.5)
            during = await asyncio.to_thread(samples, own_frontend)
            await websocket.send(json.dumps({"is_speaking": False}))
            result = StreamResult()
            await asyncio.wait_for(receive_until_final(websocket, result, time.monotonic), 60)
            # The stream is over (once its model streams are closed); the connection stays
            # open for another.
            await asyncio.to_thread(wait_for, lambda: metric(samples(own_frontend), "streams_open") == 0, 15,
                                    "the stream is counted ended")
            return during, await asyncio.to_thread(samples, own_frontend)

    during, between = asyncio.run(scenario())
    assert metric(during, "connections_open") == 1 and metric(during, "streams_open") == 1
    assert metric(between, "connections_open") == 1
    wait_for(lambda: metric(samples(own_frontend), "connections_open") == 0, 10, "the connection is counted closed")


def test_readiness_follows_the_inference_server(test_models, speech_wav, tmp_path):
    """Not ready while no Triton answers at --triton-url (yet alive), ready once one does
    and streams then work, not ready again when it goes."""
    grpc_port = free_port()
    frontend = FrontendProcess(f"127.0.0.1:{grpc_port}", "--readiness-interval-s", "0.2", name="readiness")
    try:
        assert http_get(frontend, "/healthz") == (200, "ok\n")
        wait_for(lambda: http_get(frontend, "/readyz")[0] == 503, 10, "not ready without Triton")
        assert "no inference server ready" in http_get(frontend, "/readyz")[1]
        # The torch engine starts in seconds; readiness does not depend on which engine generates.
        with TritonServer(test_models, grpc_port=grpc_port, log_path=tmp_path / "triton.log",
                          env={ENGINE_ENV: "torch"}):
            wait_for(lambda: http_get(frontend, "/readyz") == (200, "ready\n"), 60, "ready with Triton")
            assert metric(samples(frontend), "backend_ready", backend=f"127.0.0.1:{grpc_port}") == 1
            result = asyncio.run(transcribe(frontend.url, speech_wav.pcm, {"mode": "2pass"}))
            assert result.error is None and result.segments
        wait_for(lambda: http_get(frontend, "/readyz")[0] == 503, 30, "not ready once Triton is gone")
        assert metric(samples(frontend), "backend_ready", backend=f"127.0.0.1:{grpc_port}") == 0
        assert http_get(frontend, "/healthz") == (200, "ok\n")
    finally:
        frontend.stop()


def test_sigterm_lets_the_open_stream_finish_and_refuses_new_connections(triton_server, speech_wav):
    frontend = FrontendProcess(triton_server.grpc_url, name="drain")
    pcm = speech_wav.pcm
    half = len(pcm) // 2

    async def scenario():
        async with connect(frontend.url) as streaming, connect(frontend.url) as idle:
            await streaming.send(json.dumps({"mode": "2pass", "is_speaking": True}))
            await streaming.send(pcm[:half].astype("<i2").tobytes())
            await asyncio.sleep(0.5)
            frontend.process.send_signal(signal.SIGTERM)
            # The idle connection (no stream open) is closed at once with 1001.
            await asyncio.wait_for(idle.wait_closed(), 10)
            assert idle.close_code == 1001
            with pytest.raises(InvalidStatus) as refused:
                async with connect(frontend.url, open_timeout=10):
                    pass
            assert refused.value.response.status_code == 503
            assert (await asyncio.to_thread(http_get, frontend, "/readyz"))[0] == 503
            assert (await asyncio.to_thread(http_get, frontend, "/healthz"))[0] == 200
            # The open stream goes on to its final message, then the server closes.
            for offset in range(half, len(pcm), 9600):
                await streaming.send(pcm[offset:offset + 9600].astype("<i2").tobytes())
            await streaming.send(json.dumps({"is_speaking": False}))
            result = StreamResult()
            await asyncio.wait_for(receive_until_final(streaming, result, time.monotonic), 120)
            await asyncio.wait_for(streaming.wait_closed(), 10)
            return result, streaming.close_code

    try:
        result, close_code = asyncio.run(scenario())
        assert result.error is None and result.final is not None and result.segments
        assert close_code == 1001
        assert frontend.process.wait(30) == 0
    finally:
        if frontend.process.poll() is None:
            frontend.stop()
    assert "draining: 2 connection(s) open" in frontend.log()


def test_a_stream_still_open_at_the_drain_deadline_ends_with_an_error_and_1001(triton_server):
    frontend = FrontendProcess(triton_server.grpc_url, "--drain-timeout-s", "1", name="drain-deadline")

    async def scenario():
        async with connect(frontend.url) as websocket:
            await websocket.send(json.dumps({"mode": "2pass", "is_speaking": True}))
            # Silence: no segment, so no second-pass request is cancelled when the stream is
            # ended (tritonserver 2.51 can crash on such cancellations, README "Known limitations").
            await websocket.send(np.zeros(16000, dtype="<i2").tobytes())
            await asyncio.sleep(0.5)
            frontend.process.send_signal(signal.SIGTERM)
            result = StreamResult()
            await asyncio.wait_for(receive_until_final(websocket, result, time.monotonic), 30)
            await asyncio.wait_for(websocket.wait_closed(), 10)
            return result, websocket.close_code

    try:
        result, close_code = asyncio.run(scenario())
        assert result.error is not None and result.error["code"] == "server_shutdown", result.messages
        assert close_code == 1001
        assert frontend.process.wait(30) == 0
    finally:
        if frontend.process.poll() is None:
            frontend.stop()


def test_bad_drain_and_readiness_settings_are_refused():
    from frontend.server import parse_args

    for argv in (["--drain-timeout-s", "-1"], ["--readiness-interval-s", "0"]):
        with pytest.raises(SystemExit):
            parse_args(argv)

