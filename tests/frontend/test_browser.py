"""The web page in real headless Chromium against the real service (tritonserver + the
frontend WebSocket server), with the microphone replaced by Chromium's fake capture device
playing a WAV file."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from twopass_asr import REPO_ROOT
from twopass_asr.serving.triton_launcher import free_port

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: `apt-get install chromium`", allow_module_level=True)

FRAME_BYTES = 960 * 2          # 60 ms of 16 kHz int16
BYTES_PER_SECOND = 16000 * 2
SECOND_PASS_MODES = ("2pass-offline", "offline")
RESULT_TIMEOUT_MS = 120_000

# Records when and how much the page sends, for the pacing check.
RECORD_SENDS = """
(() => {
  const sends = [];
  window.__sends = sends;
  const originalSend = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    sends.push({ time: performance.now(), bytes: typeof data === 'string' ? -1 : data.byteLength });
    return originalSend.call(this, data);
  };
})();
"""


@pytest.fixture(scope="module")
def frontend_url(triton_server, tmp_path_factory):
    """The frontend server (WebSocket + the static page) on a free port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("frontend") / "frontend.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "frontend.server", "--triton-url", triton_server.grpc_url,
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"frontend server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"frontend server did not serve {url} within 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def static_files_url():
    """frontend/static/ over plain HTTP, for tests of single page modules."""
    handler = functools.partial(_QuietFileHandler, directory=str(REPO_ROOT / "frontend" / "static"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietFileHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as instance:
        yield instance


class PageSession:
    """A Chromium page whose microphone plays `capture_wav`, with everything it reports."""

    def __init__(self, page):
        self.page = page
        self.problems: list[str] = []       # console errors and uncaught exceptions
        self.sent: list[str | bytes] = []
        self.received: list[str | bytes] = []
        page.on("console", lambda message: message.type == "error" and self.problems.append(
            f"console error: {message.text}"))
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("websocket", self._watch)
        page.add_init_script(RECORD_SENDS)

    def _watch(self, websocket):
        websocket.on("framesent", lambda payload: self.sent.append(payload))
        websocket.on("framereceived", lambda payload: self.received.append(payload))

    def received_messages(self) -> list[dict]:
        return [json.loads(frame) for frame in self.received if isinstance(frame, str)]

    def sent_audio(self) -> list[bytes]:
        return [frame for frame in self.sent if isinstance(frame, bytes)]

    def sent_text(self) -> list[dict]:
        return [json.loads(frame) for frame in self.sent if isinstance(frame, str)]


@contextmanager
def chromium_page(playwright, capture_wav: Path):
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={capture_wav}",
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync",
        ],
    )
    try:
        yield PageSession(browser.new_page())
    finally:
        browser.close()


def _best_alignment(sent: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Correlation and gain of `sent` against the looped `reference` at the best lag.
    The fake device loops its file, so every lag is circular."""
    repeats = int(np.ceil(len(sent) / len(reference))) + 1
    looped = np.tile(reference, repeats)
    size = 1 << int(np.ceil(np.log2(len(looped) + len(sent))))
    products = np.fft.irfft(np.fft.rfft(looped, size) * np.conj(np.fft.rfft(sent, size)), size)[: len(reference)]
    # Normalised by each candidate's energy, or a louder passage beats the true match.
    energy = np.concatenate(([0.0], np.cumsum(looped ** 2)))
    candidate_energy = energy[len(sent): len(sent) + len(reference)] - energy[: len(reference)]
    lag = int(np.argmax(products / np.sqrt(np.maximum(candidate_energy, 1e-9))))
    aligned = looped[lag: lag + len(sent)]
    correlation = float(np.corrcoef(aligned, sent)[0, 1])
    gain = float(aligned @ sent / (aligned @ aligned))
    return correlation, gain


def _voiced_window_matches(sent: np.ndarray, reference: np.ndarray, window: int = 4000) -> list[tuple[float, float]]:
    """(correlation, gain) of each 250 ms window of `sent` that holds speech. Windows are
    aligned one by one: on a busy machine Chromium's fake capture device now and then
    repeats or skips one of its 10 ms buffers, which shifts everything after it."""
    matches = []
    for start in range(0, len(sent) - window + 1, window):
        piece = sent[start: start + window]
        if np.sqrt(np.mean(piece ** 2)) > 300:
            matches.append(_best_alignment(piece, reference))
    return matches


def _send_rate(page) -> float:
    """Bytes per second of audio the page sent, timed in the page. A frame goes out when
    it was captured plus some delay, and a busy machine stalls the page and then lets the
    held frames out in a burst, so the rate is taken between the least delayed frames of
    the first and last thirds: delays only ever add, and those frames sit on the capture
    clock. The first frames are left out: audio captured while the connection opened
    goes out in one burst."""
    sends = [send for send in page.evaluate("window.__sends") if send["bytes"] > 0]
    steady = [send["time"] / 1000 for send in sends[10:] if send["bytes"] == FRAME_BYTES]
    assert len(steady) > 30, f"too few audio frames to time: {len(steady)}"
    nominal_interval_s = FRAME_BYTES / BYTES_PER_SECOND
    lateness = [sent_s - index * nominal_interval_s for index, sent_s in enumerate(steady)]
    third = len(steady) // 3
    first = min(range(third), key=lateness.__getitem__)
    last = min(range(len(steady) - third, len(steady)), key=lateness.__getitem__)
    return (last - first) * FRAME_BYTES / (steady[last] - steady[first])


def _write_tones(path: Path, rate: int, tones_hz: tuple[float, ...], amplitude: float, seconds: float) -> Path:
    times = np.arange(int(rate * seconds)) / rate
    signal = np.zeros_like(times)
    for tone in tones_hz:
        signal += amplitude * np.sin(2 * np.pi * tone * times)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((signal * 32767).astype("<i2").tobytes())
    return path


def _wait_for(page, condition_js: str) -> None:
    """Waits for a condition on the page, but stops at once if the page reports a failure."""
    page.wait_for_function(
        f"() => ({condition_js}) || document.getElementById('status').dataset.state === 'failed'",
        timeout=RESULT_TIMEOUT_MS,
    )
    if page.get_attribute("#status", "data-state") == "failed":
        pytest.fail(f"the page reports a failure: {page.text_content('#error')}")


def _format_time(ms: float) -> str:
    centiseconds = int(ms / 10 + 0.5)      # JavaScript's Math.round, not banker's rounding
    return f"{centiseconds // 6000:02d}:{centiseconds % 6000 // 100:02d}.{centiseconds % 100:02d}"


def test_page_streams_microphone_and_shows_both_passes(playwright, frontend_url, speech_wav, tmp_path):
    with chromium_page(playwright, speech_wav.path) as session:
        page = session.page
        page.goto(frontend_url)
        port = frontend_url.split(":")[2].rstrip("/")
        assert page.input_value("#server-url") == f"ws://127.0.0.1:{port}/"

        page.click("#start")
        _wait_for(page, "document.getElementById('status').dataset.state === 'streaming'")
        _wait_for(page, "document.getElementById('partial').textContent.length > 0")
        _wait_for(page, "document.querySelectorAll('#segments li').length > 0")
        # Both at once: the committed segment, and live text of the audio after it.
        _wait_for(page, "document.getElementById('partial').textContent.length > 0")
        page.screenshot(path=str(tmp_path / "page-live.png"), full_page=True)
        assert page.is_enabled("#stop") and not page.is_enabled("#start")
        page.click("#stop")
        _wait_for(page, "document.getElementById('status').dataset.state === 'idle'")
        page.screenshot(path=str(tmp_path / "page-final.png"), full_page=True)

        messages = session.received_messages()
        assert messages and messages[-1]["is_final"] is True, messages[-3:]
        assert not any("error" in message for message in messages), messages
        assert any(m["mode"] == "2pass-online" and m["text"] for m in messages), "no first-pass text arrived"

        # Every second-pass segment is on the page, in order, with its times.
        expected = [(m["start_time"], m["end_time"], m["text"]) for m in messages
                    if m["mode"] in SECOND_PASS_MODES and "start_time" in m]
        assert expected, "no second-pass segment arrived"
        shown = page.eval_on_selector_all("#segments li", """items => items.map(item => [
            Number(item.dataset.startMs), Number(item.dataset.endMs),
            item.querySelector('.segment-text').textContent,
            item.querySelector('.segment-time').textContent])""")
        assert [tuple(row[:3]) for row in shown] == expected
        for start_ms, end_ms, _, label in shown:
            assert label == f"{_format_time(start_ms)} – {_format_time(end_ms)}"
        # The live first-pass line was replaced by the committed segments.
        assert page.text_content("#partial") == ""
        plural = "" if len(expected) == 1 else "s"
        assert page.text_content("#status") == f"Finished — {len(expected)} segment{plural}"
        assert page.is_hidden("#error")
        assert page.is_enabled("#start") and not page.is_enabled("#stop")

        # What went over the wire: the config, ~60 ms int16 frames at 16 kHz, the end.
        config, *_, end = session.sent_text()
        assert config == {"mode": "2pass", "chunk_size": [5, 10, 5], "chunk_interval": 10,
                          "wav_name": "microphone", "wav_format": "pcm", "audio_fs": 16000,
                          "is_speaking": True, "hotwords": "", "itn": True}
        assert end == {"is_speaking": False}
        assert isinstance(session.sent[0], str) and isinstance(session.sent[-1], str), \
            "the config must come first and the end message last"
        frames = session.sent_audio()
        assert all(len(frame) == FRAME_BYTES for frame in frames[:-1])
        assert 0 < len(frames[-1]) <= FRAME_BYTES and len(frames[-1]) % 2 == 0
        assert abs(_send_rate(page) / BYTES_PER_SECOND - 1) < 0.1

        # The 16 kHz stream is the WAV the fake microphone played (through Chromium's
        # resampling to the device rate and the page's back to 16 kHz).
        sent_pcm = np.frombuffer(b"".join(frames), dtype="<i2").astype(np.float64)
        matches = _voiced_window_matches(sent_pcm, speech_wav.pcm.astype(np.float64))
        assert len(matches) >= 8, f"only {len(matches)} windows of speech were sent"
        # Loose bounds: on a loaded machine the capture side drops a few render quanta
        # (the spectral test below checks the resampler's quality). A wrong rate or
        # drifting clock would leave no window matching at all.
        faithful = [m for m in matches if m[0] > 0.9 and abs(m[1] - 1) < 0.1]
        assert len(faithful) >= 0.8 * len(matches), matches
        assert session.problems == []


def test_page_low_pass_filters_before_downsampling(playwright, frontend_url, tmp_path):
    """A 1 kHz tone must come through at full level; an 11 kHz tone (above the 8 kHz
    Nyquist frequency of 16 kHz) must be filtered out, not folded down to 5 kHz as
    dropping samples would do."""
    tones = _write_tones(tmp_path / "tones48k.wav", 48000, (1000, 11000), amplitude=0.4, seconds=4)
    with chromium_page(playwright, tones) as session:
        page = session.page
        page.goto(frontend_url)
        page.select_option("#mode", "online")
        page.click("#start")
        _wait_for(page, "document.getElementById('status').dataset.state === 'streaming'")
        page.wait_for_function("window.__sends.filter(send => send.bytes > 0).length >= 60", timeout=30_000)
        page.click("#stop")
        _wait_for(page, "document.getElementById('status').dataset.state === 'idle'")
        assert session.problems == []

    pcm = np.frombuffer(b"".join(session.sent_audio()), dtype="<i2").astype(np.float64)
    size = 8192
    starts = range(8000, len(pcm) - size + 1, size // 2)       # after the start-up transient
    assert len(starts) >= 4, f"only {len(pcm)} samples sent"
    frequencies = np.fft.rfftfreq(size, 1 / 16000)

    def measure(window):
        spectrum = np.abs(np.fft.rfft(window * np.blackman(size)))

        def level_db(frequency):
            return 20 * np.log10(spectrum[np.abs(frequencies - frequency) < 20].max())

        return frequencies[np.argmax(spectrum)], np.abs(window).max() / 32768, level_db(1000) - level_db(5000)

    # The cleanest window counts: on a loaded machine the capture side can drop a render
    # quantum, and the click splatters over the spectrum. Aliasing would be in every window.
    peak_hz, peak_amplitude, alias_rejection_db = max(
        (measure(pcm[start: start + size]) for start in starts), key=lambda result: result[2])
    assert abs(peak_hz - 1000) < 2, peak_hz                       # right pitch => right rate
    assert abs(peak_amplitude - 0.4) < 0.02, peak_amplitude       # unit gain in the pass band
    assert alias_rejection_db > 60, alias_rejection_db


def test_page_shows_server_errors(playwright, frontend_url, speech_wav):
    with chromium_page(playwright, speech_wav.path) as session:
        page = session.page
        page.goto(frontend_url)
        page.fill("#hotwords", '{"broken": ')
        page.click("#start")
        page.wait_for_selector("#status[data-state=failed]", timeout=30_000)
        error_text = page.text_content("#error")
        assert page.is_visible("#error")
        assert error_text.startswith("Server error [invalid_config]:") and "hotwords" in error_text, error_text
        assert page.is_enabled("#start")
        assert session.problems == []

        # Nothing listening: the page says it could not connect.
        page.fill("#hotwords", "")
        page.fill("#server-url", f"ws://127.0.0.1:{free_port()}/")
        page.click("#start")
        page.wait_for_selector("#status[data-state=failed]", timeout=30_000)
        assert page.text_content("#error").startswith("Could not connect to ws://127.0.0.1:")

        page.fill("#server-url", "http://example.invalid/")
        page.click("#start")
        assert page.text_content("#error") == 'The WebSocket URL must start with ws:// or wss://, got "http://example.invalid/"'


TRANSCRIPT_SCENARIOS = """
async () => {
  const { Transcript, formatTime } = await import('./transcript.js');
  const partial = (text) => ({ mode: '2pass-online', text, is_final: false });
  const results = {};

  // Segment 1 is speech 0-1500 ms; its VAD end is heard 800 ms later (cutoff 2700 ms).
  const twoPass = new Transcript({ sessionMode: '2pass' });
  twoPass.apply(partial('a'), 600);
  twoPass.apply(partial('b'), 1200);
  twoPass.apply(partial('c'), 2100);
  twoPass.apply(partial(''), 2200);
  twoPass.apply(partial('x'), 3600);        // next segment, before segment 1's second pass
  results.beforeCommit = twoPass.partialText;
  twoPass.apply({ mode: '2pass-offline', text: 'ABC', start_time: 0, end_time: 1500, is_final: false }, 3700);
  results.afterCommit = twoPass.partialText;
  twoPass.apply(partial('d'), 2400);        // late text of segment 1
  twoPass.apply(partial('y'), 4200);
  results.afterLate = twoPass.partialText;
  twoPass.apply({ mode: '2pass-offline', text: 'XY', start_time: 3000, end_time: 4500, is_final: true }, 5000);
  results.final = [twoPass.partialText, twoPass.segments, twoPass.finished];

  const online = new Transcript({ sessionMode: 'online' });
  online.apply({ mode: 'online', text: 'he', is_final: false }, 600);
  online.apply({ mode: 'online', text: 'llo', is_final: true }, 1200);
  results.online = [online.partialText, online.segments.length, online.finished];

  const offline = new Transcript({ sessionMode: 'offline' });
  offline.apply({ mode: 'offline', text: 'one', start_time: 10, end_time: 900, is_final: false }, 2000);
  offline.apply({ mode: 'offline', text: '', is_final: true }, 2500);
  results.offline = offline.segments;

  const failed = new Transcript({ sessionMode: '2pass' });
  failed.apply(partial('q'), 600);
  failed.apply({ mode: '2pass', error: 'inference server unreachable', code: 'inference_unavailable',
                 is_final: true, is_end: true }, 900);
  results.failed = [failed.partialText, failed.segments.length, failed.finished];

  const untimed = new Transcript();
  untimed.apply(partial('p'), 600);
  untimed.apply({ mode: '2pass-offline', text: 'P', is_final: false }, 900);
  results.untimed = [untimed.partialText, untimed.segments];

  results.times = [formatTime(0), formatTime(83456), formatTime(3_725_004)];
  return results;
}
"""


def test_transcript_replaces_only_the_committed_segments_partial_text(playwright, static_files_url, tmp_path):
    """transcript.js alone (a unit test, run in the browser it is written for)."""
    silence = _write_tones(tmp_path / "silence.wav", 16000, (), amplitude=0, seconds=1)
    with chromium_page(playwright, silence) as session:
        session.page.goto(static_files_url)
        results = session.page.evaluate(TRANSCRIPT_SCENARIOS)
        assert session.problems == []
    assert results["beforeCommit"] == "abcx"
    # Segment 1's pieces (heard up to 1500 + 800 + 400 ms) go, the next segment's stay.
    assert results["afterCommit"] == "x"
    assert results["afterLate"] == "xy"
    assert results["final"] == [
        "",
        [{"text": "ABC", "startMs": 0, "endMs": 1500}, {"text": "XY", "startMs": 3000, "endMs": 4500}],
        True,
    ]
    assert results["online"] == ["hello", 0, True]
    assert results["offline"] == [{"text": "one", "startMs": 10, "endMs": 900}]
    assert results["failed"] == ["q", 0, True]       # after an error the live text stays
    assert results["untimed"] == ["", [{"text": "P", "startMs": None, "endMs": None}]]
    assert results["times"] == ["00:00.00", "01:23.46", "62:05.00"]
