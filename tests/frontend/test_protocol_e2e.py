"""The WebSocket frontend (`python -m frontend.server`, as users run it) against a real
tritonserver on the tiny models: modes, stream life cycle, concurrency, bad input, and
failures on either side."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import wave

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from frontend.client import run_stream, transcribe
from frontend.server import DEFAULT_DRAIN_TIMEOUT_S, EXIT_GRACE_S
from tests.conftest import ARTIFACTS
from tests.triton_client_utils import chunks_of, decoupled_texts, run_sequence, tensor, text_of
from twopass_asr import REPO_ROOT
from twopass_asr.second_pass.vllm_engine import ENGINE_ENV
from twopass_asr.serving.triton_launcher import TritonServer, free_port, python_stacks

pytestmark = pytest.mark.triton

class FrontendProcess:
    def __init__(self, triton_url: str, *extra: str, name: str = "frontend"):
        self.port = free_port()
        self.log_path = ARTIFACTS / f"{name}-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "frontend.server", "--triton-url", triton_url, "--host", "127.0.0.1",
             "--port", str(self.port), *extra],
            cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, whose stacks python_stacks takes
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("frontend did not start: " + self.log())

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            # The server's own bounds: a drain (at once with no stream open), then EXIT_GRACE_S.
            self.process.wait(DEFAULT_DRAIN_TIMEOUT_S + EXIT_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            stacks = python_stacks(self.process.pid)
            self.process.kill()
            raise AssertionError(f"the frontend did not exit on SIGTERM; its stacks:\n{stacks}\n"
                                 f"its log's end:\n{self.log()[-4000:]}") from None
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def frontend(triton_server):
    process = FrontendProcess(triton_server.grpc_url)
    yield process
    process.stop()
    assert process.process.returncode == 0, process.log()


def utterance_spans_ms(pcm: np.ndarray) -> list[tuple[int, int]]:
    """Where the synthesised speech is (its silences are exact zeros; the quiet decay at
    the end of an utterance is not counted)."""
    voiced = np.flatnonzero(np.abs(pcm) > 1000)
    spans, start, last = [], voiced[0], voiced[0]
    for index in voiced[1:]:
        if index - last > 16 * 600:
            spans.append((start // 16, last // 16))
            start = index
        last = index
    spans.append((start // 16, last // 16))
    return spans


def check_stream(result, mode: str, wav_name: str = "client"):
    """Protocol invariants of one finished stream."""
    assert result.error is None, result.error
    finals = [m for m in result.messages if m.get("is_final")]
    assert len(finals) == 1 and result.messages[-1] is finals[0]
    assert finals[0]["is_end"] is True
    assert all(m["wav_name"] == wav_name for m in result.messages)
    online, offline = {"online": ("online", None), "offline": (None, "offline"),
                       "2pass": ("2pass-online", "2pass-offline")}[mode]
    assert {m["mode"] for m in result.messages} <= {online, offline}
    partials = [m for m in result.messages if m["mode"] == online]
    segments = [m for m in result.messages if m["mode"] == offline and "start_time" in m]
    times = [(m["start_time"], m["end_time"]) for m in segments]
    assert all(s < e for s, e in times) and all(e1 <= s2 for (_, e1), (s2, _) in zip(times, times[1:]))
    return partials, segments


@pytest.mark.parametrize("mode", ["online", "offline", "2pass"])
def test_modes(frontend, triton_server, speech_wav, mode):
    result = asyncio.run(transcribe(frontend.url, speech_wav.pcm, {"mode": mode}))
    partials, segments = check_stream(result, mode)
    spans = utterance_spans_ms(speech_wav.pcm)
    if mode == "online":
        assert partials and not segments
        # One first-pass sequence over the whole stream, decoded in 600 ms chunks: the same
        # text as feeding the model directly.
        direct = run_sequence(_grpc(triton_server), "paraformer_streaming", chunks_of(speech_wav.pcm, 9600),
                              start_inputs=[tensor("CHUNK_SIZE", np.array([[5, 10, 5]], np.int32), "INT32")])
        assert "".join(m["text"] for m in result.messages) == "".join(text_of(t) for t in direct)
        return
    assert bool(partials) == (mode == "2pass")
    # One segment per utterance, around it.
    assert len(segments) == len(spans)
    for segment, (start, end) in zip(segments, spans):
        assert start - 1000 <= segment["start_time"] <= start + 200
        assert end - 200 <= segment["end_time"] <= end + 1000
    # Each segment's text is the second pass on exactly that stretch of the stream.
    audio = [speech_wav.pcm[m["start_time"] * 16:m["end_time"] * 16] for m in segments]
    direct = decoupled_texts(triton_server.grpc_url, "funasr_nano_vllm",
                             [[tensor("AUDIO", pcm, "INT16"),
                               tensor("LANGUAGE", np.array([b"auto"], dtype=np.object_), "BYTES"),
                               tensor("ITN", np.array([True]), "BOOL")] for pcm in audio])
    assert [m["text"] for m in segments] == direct
    assert all(direct), "the tiny second-pass model must produce text for this check to mean anything"


def _grpc(triton_server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(triton_server.grpc_url)


def test_two_streams_on_one_connection(frontend, speech_wav):
    spans = utterance_spans_ms(speech_wav.pcm)
    first_utterance = speech_wav.pcm[: (spans[0][1] + 1000) * 16]

    async def scenario():
        async with connect(frontend.url) as websocket:
            one = await run_stream(websocket, speech_wav.pcm, {"mode": "2pass", "wav_name": "one"})
            # The second stream inherits mode 2pass from the first.
            two = await run_stream(websocket, first_utterance, {"wav_name": "two", "hotwords": "hello world"})
            return one, two

    one, two = asyncio.run(scenario())
    _, segments_one = check_stream(one, "2pass", "one")
    _, segments_two = check_stream(two, "2pass", "two")
    assert len(segments_one) == len(spans) and len(segments_two) == 1
    # The second stream's times start again from zero.
    assert segments_two[0]["start_time"] == segments_one[0]["start_time"]


def test_ten_concurrent_connections_get_their_own_results(frontend, speech_wav):
    spans = utterance_spans_ms(speech_wav.pcm)
    streams = []
    for index in range(10):
        utterances = 1 + index % len(spans)
        lead_ms = 100 * index
        pcm = np.concatenate([np.zeros(16 * lead_ms, np.int16),
                              speech_wav.pcm[: (spans[utterances - 1][1] + 900) * 16]])
        streams.append((utterances, lead_ms, pcm))

    async def scenario():
        return await asyncio.gather(*(
            transcribe(frontend.url, pcm, {"mode": "2pass", "wav_name": f"s{i}"}, realtime=False)
            for i, (_, _, pcm) in enumerate(streams)
        ))

    results = asyncio.run(scenario())
    reference = None
    for index, ((utterances, lead_ms, _), result) in enumerate(zip(streams, results)):
        _, segments = check_stream(result, "2pass", f"s{index}")
        assert len(segments) == utterances
        starts = [m["start_time"] - lead_ms for m in segments]
        reference = reference or starts
        # Same speech shifted by lead_ms: same segment starts once the shift is removed.
        assert all(abs(a - b) <= 30 for a, b in zip(starts, reference)), (index, starts, reference)


async def _expect_error(url: str, frames: list, code: str, close_code: int):
    async with connect(url, max_size=None) as websocket:
        for frame in frames:
            try:
                await websocket.send(frame)
            except ConnectionClosed:
                break
        message = json.loads(await asyncio.wait_for(websocket.recv(), 30))
        assert message["code"] == code, message
        assert message["is_final"] is True and message["is_end"] is True and message["error"]
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(websocket.recv(), 30)
        assert websocket.close_code == close_code
        return message


@pytest.mark.parametrize(
    "frames, code, close_code, reason",
    [
        (["hello"], "invalid_json", 1007, "not JSON"),
        ([b"\x00\x01" * 480], "audio_before_config", 1008, "JSON config first"),
        ([json.dumps({"mode": "2pass", "chunk_size": "5,10"})], "invalid_config", 1007, "chunk_size"),
        ([json.dumps({"is_speaking": "no"})], "invalid_config", 1007, "is_speaking"),
        ([json.dumps({"wav_format": "mp3"})], "unsupported_wav_format", 1003, "mp3"),
        ([json.dumps({"mode": "2pass"}), b"\x00\x00" * 960, json.dumps({"mode": "online"})], "config_locked", 1008,
         "mode"),
    ],
)
def test_bad_input_gets_error_then_close(frontend, frames, code, close_code, reason):
    message = asyncio.run(_expect_error(frontend.url, frames, code, close_code))
    assert reason in message["error"]


def test_audio_after_stream_end_is_rejected(frontend, speech_wav):
    async def scenario():
        async with connect(frontend.url) as websocket:
            result = await run_stream(websocket, speech_wav.pcm[:16000], {"mode": "online"})
            await websocket.send(b"\x00\x00" * 960)
            message = json.loads(await asyncio.wait_for(websocket.recv(), 30))
            return result, message

    result, message = asyncio.run(scenario())
    check_stream(result, "online")
    assert message["code"] == "audio_before_config"


def test_odd_sized_frames_and_wav_header_give_the_same_result(frontend, speech_wav):
    pcm = speech_wav.pcm[: 16000 * 4]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(16000), wav.writeframes(pcm.tobytes())

    async def send_bytes(data: bytes, config: dict, frame_bytes: int):
        async with connect(frontend.url) as websocket:
            await websocket.send(json.dumps(config))
            for offset in range(0, len(data), frame_bytes):
                await websocket.send(data[offset:offset + frame_bytes])
            await websocket.send(json.dumps({"is_speaking": False}))
            messages = []
            while not messages or not messages[-1].get("is_final"):
                messages.append(json.loads(await asyncio.wait_for(websocket.recv(), 60)))
            return messages

    async def scenario():
        return await asyncio.gather(
            send_bytes(pcm.tobytes(), {"mode": "online"}, 1920),
            send_bytes(pcm.tobytes(), {"mode": "online"}, 1001),
            send_bytes(buffer.getvalue(), {"mode": "online", "wav_format": "wav"}, 777),
        )

    even, odd, with_header = asyncio.run(scenario())
    texts = ["".join(m["text"] for m in messages) for messages in (even, odd, with_header)]
    assert "error" not in even[-1] and texts[0]
    assert texts[0] == texts[1] == texts[2]


def test_other_sample_rate_is_resampled(frontend, speech_wav):
    pcm16 = speech_wav.pcm
    # 16 kHz -> 8 kHz by averaging pairs; the server resamples back.
    pcm8 = ((pcm16[: len(pcm16) // 2 * 2].astype(np.int32).reshape(-1, 2).sum(axis=1)) // 2).astype(np.int16)

    async def scenario():
        return await asyncio.gather(transcribe(frontend.url, pcm8, {"mode": "offline", "audio_fs": 8000}),
                                    transcribe(frontend.url, pcm16, {"mode": "offline"}))

    at8k, at16k = asyncio.run(scenario())
    _, segments8 = check_stream(at8k, "offline")
    _, segments16 = check_stream(at16k, "offline")
    # The same speech, so the same segments, on the same (16 kHz-based) time line.
    assert len(segments8) == len(segments16) == len(utterance_spans_ms(pcm16))
    for a, b in zip(segments8, segments16):
        assert abs(a["start_time"] - b["start_time"]) <= 100 and abs(a["end_time"] - b["end_time"]) <= 100, (a, b)


def test_limits_frame_size_and_connections(triton_server):
    process = FrontendProcess(triton_server.grpc_url, "--max-frame-bytes", "65536", "--max-connections", "1",
                              name="frontend-limits")
    try:
        async def scenario():
            async with connect(process.url) as first:
                await first.send(json.dumps({"mode": "online"}))
                busy = await _expect_error(process.url, [], "server_busy", 1013)
                too_large = None
                await first.send(b"\x00\x00" * 50_000)  # 100 kB > 64 KiB
                too_large = json.loads(await asyncio.wait_for(first.recv(), 30))
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(first.recv(), 30)
                return busy, too_large, first.close_code

        busy, too_large, close_code = asyncio.run(scenario())
        assert "capacity" in busy["error"]
        assert too_large["code"] == "frame_too_large" and "100000 bytes" in too_large["error"]
        assert close_code == 1008
    finally:
        process.stop()
    log = process.log()
    assert "at capacity" in log and "frame_too_large" in log


def _active_streams(triton_server) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{triton_server.metrics_port}/metrics", timeout=5).read().decode()
    counts: dict[str, float] = {}
    for model, value in re.findall(r'twopass_asr_active_streams\{[^}]*model="([^"]+)"[^}]*\} (\S+)', text):
        counts[model] = counts.get(model, 0) + float(value)
    return counts


def _wait_for(condition, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    return condition()


def test_vanishing_client_ends_its_triton_sequences(frontend, triton_server, speech_wav):
    before = _active_streams(triton_server)

    async def scenario():
        websocket = await connect(frontend.url)
        await websocket.send(json.dumps({"mode": "2pass"}))
        for offset in range(0, 16000 * 3, 960):
            await websocket.send(speech_wav.pcm[offset:offset + 960].tobytes())
        while True:  # a partial shows both sequences are open
            if json.loads(await asyncio.wait_for(websocket.recv(), 30))["mode"] == "2pass-online":
                break
        during = await asyncio.to_thread(_active_streams, triton_server)
        websocket.transport.abort()  # no close frame: the client just vanishes
        return during

    during = asyncio.run(scenario())
    assert during.get("vad", 0) >= before.get("vad", 0) + 1
    assert during.get("paraformer_streaming", 0) >= before.get("paraformer_streaming", 0) + 1
    after = _wait_for(lambda: (c := _active_streams(triton_server)).get("vad", 0) <= before.get("vad", 0)
                      and c.get("paraformer_streaming", 0) <= before.get("paraformer_streaming", 0) and c)
    assert after, f"streams still open: before {before}, now {_active_streams(triton_server)}"
    assert _wait_for(lambda: re.search(r"conn \d+ closed .* close code 1006", frontend.log()))


def test_triton_stopped_mid_session(test_models, speech_wav):
    """A private tritonserver (the shared one must live on; its Nano on the torch engine, which
    starts faster than vLLM: this is about the frontend): stopping it fails the open stream with
    1011; the frontend keeps accepting connections and serves again once Triton is back on the
    same address."""
    private = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                   log_path=ARTIFACTS / "tritonserver-private.log", env={ENGINE_ENV: "torch"})
    triton = TritonServer(test_models, **private).start()
    process = FrontendProcess(triton.grpc_url, name="frontend-private")
    try:
        async def interrupted_stream():
            task = asyncio.create_task(transcribe(process.url, speech_wav.pcm, {"mode": "2pass"}, realtime=True))
            await asyncio.sleep(2.0)
            await asyncio.to_thread(triton.stop)
            return await task

        result = asyncio.run(interrupted_stream())
        assert result.error is not None and result.error["code"] in ("inference_unavailable", "inference_error")
        assert result.close_code == 1011
        assert result.messages[-1] is result.error

        # Still accepting: a new stream is answered with the same clear error.
        down = asyncio.run(transcribe(process.url, speech_wav.pcm[:16000], {"mode": "offline"}))
        assert down.error["code"] == "inference_unavailable" and down.close_code == 1011
        assert "unreachable" in down.error["error"]

        triton = TritonServer(test_models, **private).start()
        # The gRPC channel retries the address at least every 2 s.
        assert _wait_for(lambda: asyncio.run(transcribe(process.url, speech_wav.pcm[:8000], {"mode": "offline"})
                                             ).error is None, timeout_s=60)
        back = asyncio.run(transcribe(process.url, speech_wav.pcm, {"mode": "2pass"}))
        check_stream(back, "2pass")
    finally:
        process.stop()
        triton.stop()
    assert process.process.returncode == 0
    assert "unreachable" in process.log()
