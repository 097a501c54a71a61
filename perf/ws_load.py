"""WebSocket load generator for the 2pass service (or any server speaking docs/protocol.md):
N concurrent clients each stream a WAV at real-time pace (or --speed x), started evenly
over --ramp-s, and the tool measures per stream:

- first partial: from sending the first audio frame to receiving the first partial;
- partial lag: from sending the last byte of a first-pass chunk to receiving the partial
  that chunk produced (partials are matched to chunks as perf/metrics.py explains: a probe
  stream learns, once per audio file, which frame each partial comes from);
- second pass: from sending the audio at a segment's end_time to receiving its
  2pass-offline message ("after detection": from sending the frame at which the VAD
  reported the end, i.e. without the VAD's end-silence wait);
- end of stream: from sending is_speaking:false to receiving the final message;
- errors (error messages, failed connects, timeouts) and dropped connections (closed
  without a final message);

and, for the server's processes (the WebSocket listener and, for the service, the
tritonserver behind it, each with all its children), CPU % (100 = one core) and peak RSS.

    python -m perf.ws_load --url ws://127.0.0.1:10095 --clients 1,2,4,8 --out perf/results/ws_load

Writes results.json, results.md and latency.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from frontend.client import StreamResult, default_frame_samples, read_wav, receive_until_final
from frontend.session import MAX_STEP_SAMPLES, MIN_STEP_SAMPLES
from perf import metrics
from twopass_asr.audio import SAMPLE_RATE
from twopass_asr.serving.triton_launcher import read_metric_samples

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ws_load"


# ---------------------------------------------------------------- the audio and its grid


@dataclass
class AudioPlan:
    """One WAV as every client sends it: frames, the server's decode grid, and (after the
    probe) the frame each partial comes from."""

    pcm: np.ndarray
    config: dict[str, Any]
    frame_lengths: list[int]
    pieces: list[metrics.Piece]
    decode_frames: list[int]  # frame triggering each first-pass decode
    detection_frames: dict[int, int]  # segment end_ms -> frame at which the VAD reported it
    partial_frames: list[int] | None = None  # probe: frame of each partial
    partial_texts: list[str] | None = None

    @property
    def audio_s(self) -> float:
        return len(self.pcm) / SAMPLE_RATE

    def frames(self) -> list[bytes]:
        data = np.asarray(self.pcm, dtype="<i2").tobytes()
        out, offset = [], 0
        for length in self.frame_lengths:
            out.append(data[offset:offset + 2 * length])
            offset += 2 * length
        return out


def stream_config(mode: str = "2pass", vad_tail_sil: int = 800, vad_max_len: int = 60000) -> dict[str, Any]:
    """The config every client sends (explicit, so the grid replay uses the same values)."""
    return {"mode": mode, "chunk_size": [5, 10, 5], "chunk_interval": 10, "encoder_chunk_look_back": 4,
            "decoder_chunk_look_back": 1, "audio_fs": SAMPLE_RATE, "wav_format": "pcm",
            "vad_tail_sil": vad_tail_sil, "vad_max_len": vad_max_len, "is_speaking": True}


@contextlib.contextmanager
def quiet_logging():
    """FunASR logs every model load at INFO; the load tool's output is its progress line."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def replay_vad(pieces: list[metrics.Piece], pcm: np.ndarray, vad_dir: Path, config: dict[str, Any]) -> list[list]:
    """The VAD events of each piece, from the same FSMN-VAD the server runs."""
    import torch

    from twopass_asr.vad.batched import BatchedStreamingVad, VadOptions

    torch.set_num_threads(1)  # a few ms per piece; more threads only contend with the server
    with quiet_logging():
        vad = BatchedStreamingVad(vad_dir)
    stream = vad.new_stream(VadOptions(max_end_silence_ms=config["vad_tail_sil"],
                                       max_segment_ms=config["vad_max_len"]))
    events, offset = [], 0
    for piece in pieces:
        events.append(vad.process(stream, pcm[offset:offset + piece.samples], is_final=piece.final))
        offset += piece.samples
    return events


def plan_audio(pcm: np.ndarray, config: dict[str, Any], vad_dir: Path | None) -> AudioPlan:
    frame = default_frame_samples(config, SAMPLE_RATE)
    frame_lengths = [min(frame, len(pcm) - start) for start in range(0, len(pcm), frame)]
    pieces = metrics.server_pieces(frame_lengths, MIN_STEP_SAMPLES, MAX_STEP_SAMPLES)
    chunk_samples = config["chunk_size"][1] * SAMPLE_RATE * 60 // 1000
    mode = config["mode"]
    detection_frames, flush_pieces = {}, []
    if mode != "online":
        if vad_dir is None:
            from twopass_asr.store.model_store import bundled_vad_dir

            vad_dir = bundled_vad_dir()
        closed = metrics.segment_ends(replay_vad(pieces, pcm, vad_dir, config))
        detection_frames = {end_ms: pieces[index].frame for index, _start, end_ms in closed}
        flush_pieces = [index for index, _start, _end in closed]
    decodes = []
    if mode != "offline":
        decodes = metrics.first_pass_decodes(pieces, chunk_samples, flush_pieces if mode == "2pass" else (),
                                             final_flush_is_partial=mode == "2pass")
    return AudioPlan(pcm, config, frame_lengths, pieces, decodes, detection_frames)


class ProbeMismatch(RuntimeError):
    """The probe could not tie every partial to a decode."""


def is_partial(message: dict) -> bool:
    return message.get("mode") in ("online", "2pass-online") and not message.get("is_final") and "error" not in message


def is_second_pass(message: dict) -> bool:
    """A segment's second-pass text (2pass-offline, with the segment's times)."""
    return "end_time" in message and "error" not in message


async def probe(url: str, plan: AudioPlan, max_wait_s: float = 5.0, final_timeout_s: float = 300.0) -> None:
    """Learn which frame each partial comes from: send frames back to back, and after each
    frame that triggers a first-pass decode wait for the server; partials arriving in that
    wait belong to that frame. The wait ends at the expected number of partials or after a
    timeout that adapts to how fast this server answers (an empty decode sends nothing).
    While a segment the VAD has ended has no second-pass result yet, the wait runs until
    final_timeout_s after the frame that ended it: a server that runs a segment's second pass
    before the stream's next audio (FunASR's, perf/baseline_server.py) answers the decodes after
    it only once it is done. A second pass that never comes is a mismatch (ProbeMismatch)."""
    if plan.config["mode"] == "offline":
        plan.partial_frames, plan.partial_texts = [], []
        return
    triggers: dict[int, int] = {}
    for frame in plan.decode_frames:
        triggers[frame] = triggers.get(frame, 0) + 1
    segment_end_frames = sorted(plan.detection_frames.values())
    second_pass_deadlines: list[float] = []  # per segment end, in order, once its frame is sent
    second_passes_seen = 0
    frames, texts, unexpected = [], [], []
    inbox: asyncio.Queue = asyncio.Queue()
    slowest = 0.0
    async with connect(url, max_size=None, open_timeout=30, ping_interval=None) as websocket:

        async def receive() -> None:
            try:
                async for text in websocket:
                    await inbox.put(json.loads(text))
            except ConnectionClosed:
                pass
            await inbox.put({"closed": websocket.close_code})

        receiver = asyncio.create_task(receive())

        def take(message: dict, frame: int) -> None:
            nonlocal second_passes_seen
            if "closed" in message:
                raise RuntimeError(f"probe stream: the server closed the connection (code {message['closed']}) "
                                   "before the final message")
            if "error" in message:
                raise RuntimeError(f"probe stream failed: {message['error']}")
            if is_partial(message):
                frames.append(frame)
                texts.append(message.get("text", ""))
            elif is_second_pass(message):
                second_passes_seen += 1

        async def wait_for_frame(frame: int, expected: int) -> None:
            nonlocal slowest
            started, got = time.monotonic(), 0
            while got < expected:
                second_pass_due = bisect.bisect_right(segment_end_frames, frame) > second_passes_seen
                if second_pass_due:
                    timeout = second_pass_deadlines[second_passes_seen] - time.monotonic()
                else:
                    timeout = min(max_wait_s, 0.3 + 4 * slowest) if slowest else max_wait_s
                try:
                    if inbox.empty():
                        message = await asyncio.wait_for(inbox.get(), max(timeout, 0.0))
                    else:  # taken even past a deadline: it may be the second pass waited for
                        message = inbox.get_nowait()
                except asyncio.TimeoutError:
                    if second_pass_due:
                        raise ProbeMismatch(
                            f"probe: no second-pass result within {final_timeout_s:g} s of frame "
                            f"{segment_end_frames[second_passes_seen]}, where the plan's VAD ends a segment; "
                            "the server's VAD differs from --vad-dir's, or its second pass is slower than "
                            "--timeout-s") from None
                    return
                take(message, frame)
                if is_partial(message):
                    got += 1
                    if not second_pass_due:
                        slowest = max(slowest, time.monotonic() - started)
                if second_pass_due:
                    started = time.monotonic()  # a decode's own time counts from the second pass's end

        await websocket.send(json.dumps({**plan.config, "wav_name": "probe"}))
        for index, data in enumerate(plan.frames()):
            while not inbox.empty():  # partials outside a wait: the grid does not fit
                message = inbox.get_nowait()
                if is_partial(message):
                    unexpected.append(index)
                take(message, index - 1)
            await websocket.send(data)
            second_pass_deadlines += [time.monotonic() + final_timeout_s] * segment_end_frames.count(index)
            if index in triggers:
                await wait_for_frame(index, triggers[index])
        await websocket.send(json.dumps({"is_speaking": False, "is_end": True}))
        end_frame = len(plan.frame_lengths)
        while True:
            message = await asyncio.wait_for(inbox.get(), final_timeout_s)
            take(message, end_frame)
            if message.get("is_final"):
                break
        receiver.cancel()
    if unexpected:
        raise ProbeMismatch(
            f"probe: {len(unexpected)} partial(s) arrived while no decode was expected (first near frame "
            f"{unexpected[0]}); the server's decode grid differs from perf/metrics.py's model of it, or the "
            f"server answered slower than the probe's wait (raise --probe-wait)")
    plan.partial_frames, plan.partial_texts = frames, texts


# ---------------------------------------------------------------- one client


@dataclass
class StreamRecord:
    index: int
    result: StreamResult = field(default_factory=StreamResult)
    frame_sent: list[float] = field(default_factory=list)  # run-clock seconds
    end_sent: float | None = None
    failure: str | None = None  # connect failure, timeout, exception
    max_send_late_s: float = 0.0  # how far the sender fell behind its pace
    done: bool = False

    @property
    def dropped(self) -> bool:
        """Closed without a final message and without an error message."""
        return self.failure is None and self.result.final is None


async def client_stream(url: str, plan: AudioPlan, record: StreamRecord, clock: float, delay_s: float,
                        speed: float, timeout_s: float) -> None:
    await asyncio.sleep(delay_s)
    frame_s = [length / SAMPLE_RATE / speed for length in plan.frame_lengths]
    now = lambda: time.monotonic() - clock  # noqa: E731
    result = record.result
    try:
        async with connect(url, max_size=None, open_timeout=30, ping_interval=None) as websocket:

            async def send_all() -> None:
                await websocket.send(json.dumps({**plan.config, "wav_name": f"client{record.index}"}))
                start = time.monotonic()
                due = 0.0
                for data, duration in zip(plan.frames(), frame_s):
                    late = time.monotonic() - start - due
                    if late < 0:
                        await asyncio.sleep(-late)
                    record.max_send_late_s = max(record.max_send_late_s, late)
                    await websocket.send(data)
                    record.frame_sent.append(now())
                    due += duration
                await asyncio.sleep(max(0.0, start + due - time.monotonic()))
                await websocket.send(json.dumps({"is_speaking": False, "is_end": True}))
                record.end_sent = result.end_sent_s = now()

            sender = asyncio.create_task(send_all())
            try:
                await asyncio.wait_for(receive_until_final(websocket, result, now), timeout_s)
            except asyncio.TimeoutError:
                record.failure = f"no final message within {timeout_s:.0f} s"
            finally:
                if not sender.done():
                    sender.cancel()
                outcome = (await asyncio.gather(sender, return_exceptions=True))[0]
                if isinstance(outcome, Exception) and not isinstance(outcome, ConnectionClosed) and not record.failure:
                    record.failure = f"sending failed: {outcome!r}"
    except Exception as exc:  # refused, handshake rejected (e.g. HTTP 503), reset: this stream failed
        record.failure = record.failure or f"connection failed: {exc!r}"
    record.done = True


def stream_metrics(plan: AudioPlan, record: StreamRecord) -> dict[str, Any]:
    """Per-stream latencies (seconds) and counts."""
    result = record.result
    messages = list(zip(result.messages, result.arrival_s))
    partial_arrivals = [t for m, t in messages if is_partial(m)]
    partial_texts = [m.get("text", "") for m, _ in messages if is_partial(m)]
    segments = [(m["end_time"], t) for m, t in messages if is_second_pass(m)]
    first_sent = record.frame_sent[0] if record.frame_sent else None
    lags = None
    if plan.partial_frames is not None and result.final is not None:
        lags = metrics.partial_lags(partial_arrivals, plan.partial_frames, record.frame_sent, record.end_sent)
    end_to_final = None
    if result.final is not None and record.end_sent is not None:
        end_to_final = result.arrival_s[result.messages.index(result.final)] - record.end_sent
    return {
        "first_partial": [partial_arrivals[0] - first_sent] if partial_arrivals and first_sent is not None else [],
        "partial_lag": lags or [],
        "partial_unmatched": lags is None and bool(plan.decode_frames) and result.final is not None,
        "partial_text_differs": plan.partial_texts is not None and partial_texts != plan.partial_texts,
        "second_pass": metrics.second_pass_latencies(segments, plan.frame_lengths, record.frame_sent)
        if len(record.frame_sent) == len(plan.frame_lengths) else [],
        "second_pass_after_detection": metrics.detection_latencies(segments, plan.detection_frames,
                                                                   record.frame_sent, record.end_sent),
        "end_of_stream": [end_to_final] if end_to_final is not None else [],
        "segments": len(segments),
        "partials": len(partial_arrivals),
        "final": result.final is not None and result.error is None,
        "error": result.error.get("code") if result.error else None,
        "failure": record.failure,
        "dropped": record.dropped and record.failure is None,
    }


# ---------------------------------------------------------------- server processes


def listener_pid(port: int) -> int | None:
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def discover_server_processes(url: str) -> dict[str, int]:
    """{group name: root pid}: the process listening on the WebSocket port and, when it is
    this project's frontend, the tritonserver listening on its --triton-url port."""
    import psutil

    port = urlparse(url).port or (443 if url.startswith("wss") else 80)
    pid = listener_pid(port)
    if pid is None:
        return {}
    cmdline = psutil.Process(pid).cmdline()
    groups = {"frontend" if "frontend.server" in cmdline else "server": pid}
    if "--triton-url" in cmdline:
        triton_port = int(cmdline[cmdline.index("--triton-url") + 1].rsplit(":", 1)[1])
        triton = listener_pid(triton_port)
        if triton is not None:
            groups["tritonserver"] = triton
    return groups


TRITON_DEFAULT_METRICS_PORT = 8002


def metric_endpoints(url: str, groups: dict[str, int]) -> dict[str, str]:
    """{group: Prometheus URL} of the discovered server processes that keep the counters
    metrics.served_breakdown reads: this project's frontend (/metrics on its WebSocket port)
    and tritonserver (its --metrics-port)."""
    import psutil

    endpoints = {}
    if "frontend" in groups:
        parsed = urlparse(url)
        endpoints["frontend"] = f"http://{parsed.hostname}:{parsed.port}/metrics"
    if "tritonserver" in groups:
        options = {}
        arguments = psutil.Process(groups["tritonserver"]).cmdline()
        for index, argument in enumerate(arguments):
            if argument.startswith("--metrics-"):
                name, equals, value = argument.partition("=")
                options[name] = value if equals else (arguments[index + 1] if index + 1 < len(arguments) else "")
        address = options.get("--metrics-address", "127.0.0.1")
        port = options.get("--metrics-port", TRITON_DEFAULT_METRICS_PORT)
        endpoints["tritonserver"] = f"http://{address}:{port}/metrics"
    return endpoints


def scrape(endpoints: dict[str, str]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Every sample of the endpoints (metric_samples, merged), and the endpoints that could
    not be read (named, with why)."""
    samples: dict[str, dict[str, float]] = {}
    unread = []
    for group, endpoint in endpoints.items():
        try:
            for name, by_model in read_metric_samples(endpoint).items():
                merged = samples.setdefault(name, {})
                for model, value in by_model.items():
                    merged[model] = merged.get(model, 0.0) + value
        except OSError as exc:
            unread.append(f"{group} ({endpoint}): {exc}")
    return samples, unread


def process_label(process) -> str:
    cmdline = process.cmdline()
    for arg in cmdline:
        if "model_repository/" in arg:
            return "stub:" + arg.split("model_repository/", 1)[1].split("/", 1)[0]
    return process.name()


class ProcessMonitor:
    """Samples each group's process tree (root and all descendants) every `interval_s`:
    CPU % = CPU seconds used by the tree during the run / wall seconds * 100, peak RSS =
    the largest sum of the tree's RSS seen. CPU is also broken down by process (a Triton
    Python-backend stub is labelled with its model's name)."""

    def __init__(self, groups: dict[str, int], interval_s: float = 0.5):
        self.groups = groups
        self.interval_s = interval_s
        self._first_cpu: dict[int, float] = {}
        self._last_cpu: dict[int, float] = {}
        self._pid_group: dict[int, str] = {}
        self._pid_label: dict[int, str] = {}
        self.peak_rss = {name: 0 for name in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = self._stopped = 0.0

    def _sample(self) -> None:
        import psutil

        for name, root_pid in self.groups.items():
            try:
                root = psutil.Process(root_pid)
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                continue
            rss = 0
            for process in tree:
                try:
                    with process.oneshot():
                        times = process.cpu_times()
                        rss += process.memory_info().rss
                        if process.pid not in self._pid_label:
                            self._pid_label[process.pid] = process_label(process)
                except psutil.Error:
                    continue
                cpu = times.user + times.system
                self._first_cpu.setdefault(process.pid, cpu)
                self._last_cpu[process.pid] = cpu
                self._pid_group[process.pid] = name
            self.peak_rss[name] = max(self.peak_rss[name], rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "ProcessMonitor":
        self._sample()
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._stopped = time.monotonic()

    def report(self) -> dict[str, dict[str, float]]:
        wall = max(self._stopped - self._started, 1e-9)
        used = {name: 0.0 for name in self.groups}
        by_process: dict[str, dict[str, float]] = {name: {} for name in self.groups}
        for pid, first in self._first_cpu.items():
            group, seconds = self._pid_group[pid], self._last_cpu[pid] - first
            used[group] += seconds
            label = self._pid_label[pid]
            by_process[group][label] = by_process[group].get(label, 0.0) + 100 * seconds / wall
        return {name: {"cpu_percent": 100 * used[name] / wall, "peak_rss_mb": self.peak_rss[name] / 2**20,
                       "cpu_percent_by_process": by_process[name]}
                for name in self.groups}


# ---------------------------------------------------------------- a load run


def progress_line(clients: int, records: list[StreamRecord], elapsed: float) -> str:
    done = sum(r.done for r in records)
    failed = sum(1 for r in records if r.done and (r.failure or r.result.error or r.result.final is None))
    partials = sum(sum(1 for m in r.result.messages if is_partial(m)) for r in records)
    segments = sum(sum(1 for m in r.result.messages if is_second_pass(m)) for r in records)
    width = 30
    filled = width * done // max(clients, 1)
    return (f"\r[ws_load] N={clients:<3} [{'#' * filled}{'.' * (width - filled)}] {done}/{clients} done, "
            f"{failed} failed, {partials} partials, {segments} segments, {elapsed:5.1f}s")


async def run_load(url: str, plan: AudioPlan, clients: int, *, speed: float = 1.0, ramp_s: float = 0.0,
                   timeout_s: float | None = None, server_groups: dict[str, int] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """N clients, each streaming the plan's audio once; returns the run's summary. Partial
    lags need the plan's probe (prepare_plan)."""
    timeout_s = timeout_s or 60 + 3 * plan.audio_s / speed
    records = [StreamRecord(i) for i in range(clients)]
    clock = time.monotonic()
    groups = server_groups if server_groups is not None else discover_server_processes(url)
    endpoints = metric_endpoints(url, groups)
    counters_before, unread = scrape(endpoints)
    with ProcessMonitor(groups) as monitor:
        tasks = [asyncio.create_task(client_stream(url, plan, r, clock, ramp_s * i / clients, speed, timeout_s))
                 for i, r in enumerate(records)]
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=1.0)
            if progress:
                print(progress_line(clients, records, time.monotonic() - clock), end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        await asyncio.gather(*tasks)
    wall = time.monotonic() - clock
    run = summarise_run(plan, records, clients, speed, ramp_s, wall, monitor.report())
    counters_after, unread_after = scrape(endpoints)
    unread += unread_after
    for reason in unread:
        print(f"[ws_load] metrics not read from {reason}", file=sys.stderr)
    run["served"] = metrics.served_breakdown(counters_before, counters_after) if endpoints and not unread else None
    return run


def summarise_run(plan: AudioPlan, records: list[StreamRecord], clients: int, speed: float, ramp_s: float,
                  wall_s: float, processes: dict) -> dict[str, Any]:
    per_stream = [stream_metrics(plan, r) for r in records]
    pooled = lambda key: [v for s in per_stream for v in s[key]]  # noqa: E731
    failures = [s["failure"] for s in per_stream if s["failure"]]
    return {
        "clients": clients,
        "speed": speed,
        "ramp_s": ramp_s,
        "mode": plan.config["mode"],
        "audio_s": plan.audio_s,
        "wall_s": wall_s,
        "finals": sum(s["final"] for s in per_stream),
        "errors": sum(1 for s in per_stream if s["error"]),
        "error_codes": sorted({s["error"] for s in per_stream if s["error"]}),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "dropped": sum(s["dropped"] for s in per_stream),
        "segments": sum(s["segments"] for s in per_stream),
        "partials": sum(s["partials"] for s in per_stream),
        "partial_unmatched_streams": sum(s["partial_unmatched"] for s in per_stream),
        "partial_text_differs_streams": sum(s["partial_text_differs"] for s in per_stream),
        "sender_max_late_s": max((r.max_send_late_s for r in records), default=0.0),
        "latency_s": {key: metrics.summarise(pooled(key)) for key in
                      ("first_partial", "partial_lag", "second_pass", "second_pass_after_detection", "end_of_stream")},
        "processes": processes,
    }


# ---------------------------------------------------------------- reports


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def markdown_table(runs: list[dict]) -> str:
    header = ["N", "finals", "err/fail/drop", "first partial p50/p95 ms", "partial lag p50/p95/max ms",
              "2nd pass p50/p95 ms", "2nd pass after VAD p50/p95 ms", "end of stream p50/p95 ms", "CPU %", "peak RSS MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        lat = run["latency_s"]
        procs = run["processes"]
        lines.append("| " + " | ".join([
            str(run["clients"]),
            f"{run['finals']}/{run['clients']}",
            f"{run['errors']}/{run['failures']}/{run['dropped']}",
            f"{_ms(lat['first_partial']['p50'])}/{_ms(lat['first_partial']['p95'])}",
            f"{_ms(lat['partial_lag']['p50'])}/{_ms(lat['partial_lag']['p95'])}/{_ms(lat['partial_lag']['max'])}",
            f"{_ms(lat['second_pass']['p50'])}/{_ms(lat['second_pass']['p95'])}",
            f"{_ms(lat['second_pass_after_detection']['p50'])}/{_ms(lat['second_pass_after_detection']['p95'])}",
            f"{_ms(lat['end_of_stream']['p50'])}/{_ms(lat['end_of_stream']['p95'])}",
            ", ".join(f"{name} {p['cpu_percent']:.0f}" for name, p in procs.items()) or "-",
            ", ".join(f"{name} {p['peak_rss_mb']:.0f}" for name, p in procs.items()) or "-",
        ]) + " |")
    return "\n".join(lines)


SERVED_COLUMNS = (("frontend_second_pass_s", "frontend: VAD end to text"),
                  ("encoder_wait_s", "Nano encoder wait"), ("encoder_pass_s", "encoder pass"),
                  ("encoder_batch", "segments per encoder pass"), ("torch_generate_wait_s", "generation wait"),
                  ("torch_generate_pass_s", "generation pass"), ("torch_generate_batch", "segments per generation"),
                  ("draft_tokens_per_segment", "draft tokens kept per segment"),
                  ("paraformer_streaming_pass_s", "first pass"), ("paraformer_streaming_batch", "chunks per pass"),
                  ("vad_pass_s", "VAD pass"), ("vad_batch", "VAD chunks per pass"))


def served_table(runs: list[dict]) -> str | None:
    """Where the servers say the time went (metrics.served_breakdown), one row per run; ms
    except the batch sizes. None when no run has the servers' counters."""
    runs = [run for run in runs if run.get("served")]
    if not runs:
        return None
    header = ["N", "segments", *(title for _, title in SERVED_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        served = run["served"]
        segments = served["frontend_segments"]
        cells = [str(run["clients"]), "-" if segments is None else f"{segments:.0f}"]
        for key, _ in SERVED_COLUMNS:
            value = served[key]
            counted = key.endswith(("_batch", "_per_segment"))
            cells.append("-" if value is None else f"{value:.2f}" if counted else _ms(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(runs: list[dict]) -> str:
    """The latency table, and where the servers say the time went when they kept count."""
    served = served_table(runs)
    if served is None:
        return markdown_table(runs)
    return f"{markdown_table(runs)}\n\nWhere the servers say the time went (ms, means over the run):\n\n{served}"


PLOTTED = (("first_partial", "first partial"), ("partial_lag", "partial lag"), ("second_pass", "second pass"),
           ("end_of_stream", "end of stream"))


def plot_latencies(runs: list[dict], path: Path, title: str, limits: dict[str, float] | None = None) -> Path:
    """p50/p95/p99 of each latency against the number of clients; `limits` draws thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: r["clients"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (key, label) in zip(axes.flat, PLOTTED):
        xs = [r["clients"] for r in runs]
        for q, style in ((50, "o-"), (95, "s-"), (99, "^--")):
            ys = [r["latency_s"][key][f"p{q}"] for r in runs]
            points = [(x, 1000 * y) for x, y in zip(xs, ys) if y is not None]
            if points:
                ax.plot(*zip(*points), style, label=f"p{q}")
        if limits and key in limits:
            ax.axhline(1000 * limits[key], color="red", linestyle=":", label="limit")
        ax.set_title(label)
        ax.set_ylabel("ms")
        ax.set_xlabel("concurrent streams")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_reports(runs: list[dict], out: Path, title: str, extra: dict | None = None,
                  limits: dict[str, float] | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "latency.png"}
    paths["json"].write_text(json.dumps({**(extra or {}), "runs": runs}, indent=2))
    paths["markdown"].write_text(f"# {title}\n\n{report_markdown(runs)}\n")
    plot_latencies(runs, paths["plot"], title, limits)
    return paths


def load_pcm(wav: Path | None) -> np.ndarray:
    if wav is None:
        from perf.pa_inputs import synthesised_wavs

        return synthesised_wavs(1)[0]
    pcm, rate = read_wav(wav)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{wav}: need 16 kHz audio, got {rate} Hz")
    return pcm


def prepare_plan(url: str, pcm: np.ndarray, mode: str, vad_dir: Path | None, probe_wait_s: float,
                 final_timeout_s: float = 300.0) -> AudioPlan:
    """The audio's grid and the probe's partial-to-frame map. When the probe cannot tie the
    partials to decodes (a server slower than --probe-wait), the runs go on without partial
    lags rather than with wrong ones."""
    plan = plan_audio(pcm, stream_config(mode), vad_dir)
    try:
        asyncio.run(probe(url, plan, probe_wait_s, final_timeout_s))
    except ProbeMismatch as exc:
        print(f"[ws_load] WARNING: {exc}; partial lag will not be measured", file=sys.stderr)
    return plan


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated client counts, got {text!r}") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"client counts must be at least 1, got {text!r}")
    return counts


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wav", type=Path, default=None, help="16 kHz mono 16-bit WAV (default: synthesised speech)")
    parser.add_argument("--mode", choices=["2pass", "online", "offline"], default="2pass")
    parser.add_argument("--speed", type=float, default=1.0, help="send at this multiple of real time")
    parser.add_argument("--ramp-s", type=float, default=2.0, help="start the clients evenly over this many seconds")
    parser.add_argument("--vad-dir", type=Path, default=None,
                        help="the server's FSMN-VAD dir, to replay segment ends (default: the bundled one)")
    parser.add_argument("--probe-wait", type=float, default=5.0, help="longest wait for a decode in the probe")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="give up on a stream's final message after this long (default 60 s + 3x the audio)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:10095")
    parser.add_argument("--clients", type=parse_counts, default=[1, 2, 4], help="e.g. 1,2,4,8: one run per count")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.speed <= 0:
        parser.error("--speed must be positive")
    try:
        pcm = load_pcm(args.wav)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    try:
        plan = prepare_plan(args.url, pcm, args.mode, args.vad_dir, args.probe_wait, args.timeout_s or 300.0)
    except (OSError, RuntimeError) as exc:
        parser.exit(1, f"ws_load: probe stream against {args.url} failed: {exc!r}\n")
    probed = "?" if plan.partial_frames is None else len(plan.partial_frames)
    print(f"[ws_load] {plan.audio_s:.1f} s of audio, {probed} partials and "
          f"{len(plan.detection_frames)} segments per stream (probe)", file=sys.stderr)
    runs = [asyncio.run(run_load(args.url, plan, n, speed=args.speed, ramp_s=args.ramp_s, timeout_s=args.timeout_s))
            for n in args.clients]
    paths = write_reports(runs, args.out, f"ws_load {args.url} ({args.mode}, speed {args.speed})",
                          {"url": args.url, "probe_partials": probed,
                           "probe_segments": len(plan.detection_frames)})
    print(report_markdown(runs))
    print(f"[ws_load] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0 if all(r["finals"] == r["clients"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
