"""Failover delay: what losing a Triton replica mid-stream costs the streams on it.

Two tritonservers on one model store and a frontend over both; N real-time 2pass clients
run twice on the same audio: once with no fault, once with the first replica killed
(SIGKILL, its whole process group) --kill-at-s seconds after the first client started. The
frontend moves the streams of the killed replica to the other one (frontend/session.py); it
logs each move with the stream's wav_name, which tells which streams moved. Reported:

- every stream's outcome in the faulty run (final message, errors), and whether its segments
  (count, times, texts) equal the run without the fault;
- the extra delay of the affected segments: for each moved stream's segments whose result
  came after the kill, its second-pass latency (from the end of its speech in the audio)
  in the faulty run minus the same segment's in the run without the fault; p50/p95/max.
  The streams that stayed are summarised the same way for comparison.

    python -m perf.failover --store .model_store-full [--clients 8] [--kill-at-s 5] [--server-env NAME=VALUE]

The servers start with the service's defaults and `--server-env` on top (e.g.
TWOPASS_ASR_LLM_ENGINE=torch: tiny test models then start in seconds). Writes failover.json,
failover.md and failover.png under --out; the first line printed names the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from perf import metrics, ws_load
from perf.bench_args import REAL_SPEECH_TOKENS_PER_S, add_server_env_argument, server_environment
from perf.capacity import python_server, start_triton
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.second_pass.recognizer import DEFAULT_MAX_NEW_TOKENS
from twopass_asr.serving.triton_launcher import free_port

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "failover"
MOVE_LINE = re.compile(r"stream '(client\d+)': .*moving it to another server")


async def run_clients(url: str, plan: ws_load.AudioPlan, clients: int, ramp_s: float, timeout_s: float,
                      kill: tuple[float, Any] | None = None) -> tuple[list[ws_load.StreamRecord], float | None]:
    """The clients' records, and when (run clock, seconds) `kill` = (after_s, callable) ran."""
    records = [ws_load.StreamRecord(index) for index in range(clients)]
    clock = time.monotonic()
    tasks = [asyncio.create_task(ws_load.client_stream(url, plan, record, clock, ramp_s * index / clients, 1.0,
                                                       timeout_s)) for index, record in enumerate(records)]
    killed_at = None
    if kill is not None:
        await asyncio.sleep(kill[0])
        kill[1]()
        killed_at = time.monotonic() - clock
    await asyncio.gather(*tasks)
    return records, killed_at


def segments_of(record: ws_load.StreamRecord) -> list[tuple[int, int, str]]:
    return [(m["start_time"], m["end_time"], m["text"]) for m in record.result.messages if "start_time" in m]


def extra_delays(plan: ws_load.AudioPlan, calm: list[ws_load.StreamRecord], faulty: list[ws_load.StreamRecord],
                 streams: set[int], killed_at: float) -> list[float]:
    """Per segment of `streams` answered after the kill: faulty second-pass latency minus calm."""
    delays = []
    for index in sorted(streams):
        before, after = ws_load.stream_metrics(plan, calm[index]), ws_load.stream_metrics(plan, faulty[index])
        arrivals = [t for m, t in zip(faulty[index].result.messages, faulty[index].result.arrival_s)
                    if ws_load.is_second_pass(m)]
        for calm_s, faulty_s, arrived in zip(before["second_pass"], after["second_pass"], arrivals):
            if arrived >= killed_at:
                delays.append(faulty_s - calm_s)
    return delays


def summary_row(name: str, values: list[float]) -> str:
    stats = metrics.summarise(values)
    cell = lambda key: "-" if stats[key] is None else f"{stats[key] * 1000:.0f}"  # noqa: E731
    return f"| {name} | {len(values)} | {cell('p50')} | {cell('p95')} | {cell('max')} |"


def plot(delays: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in delays.items():
        if values:
            ordered = sorted(v * 1000 for v in values)
            ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=name)
    ax.set_xlabel("extra second-pass delay against the run without the fault (ms)")
    ax.set_ylabel("share of segments")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="the model store both tritonservers serve")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kill-at-s", type=float, default=5.0,
                        help="kill the first replica this long after the first client started")
    add_server_env_argument(parser)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ws_load.add_common_arguments(parser)
    args = parser.parse_args(argv)
    server_env = server_environment(parser, "--server-env", args.server_env)
    if args.clients < 2 or args.kill_at_s <= 0:
        parser.error("--clients must be at least 2 (one per replica) and --kill-at-s positive")
    cpu = cpu_summary()
    print(f"CPU {cpu}", flush=True)
    pcm = ws_load.load_pcm(args.wav)
    logs = args.out / "logs"
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(start_triton(args.store, logs / name, args.max_new_tokens,
                                                    REAL_SPEECH_TOKENS_PER_S, extra_env=server_env))
                   for name in ("victim", "survivor")]
        port = free_port()
        frontend_log = logs / "frontend.log"
        url = stack.enter_context(python_server(
            ["frontend.server", "--triton-url", ",".join(server.grpc_url for server in servers), "--host",
             "127.0.0.1", "--port", str(port), "--readiness-interval-s", "0.5"], port, frontend_log, "frontend", 60))
        plan = ws_load.prepare_plan(url, pcm, "2pass", args.vad_dir, args.probe_wait, args.timeout_s or 300.0)
        timeout_s = args.timeout_s or 60 + 3 * plan.audio_s
        print(f"[failover] {args.clients} clients, {plan.audio_s:.1f} s of audio each, no fault ...", file=sys.stderr)
        calm, _ = asyncio.run(run_clients(url, plan, args.clients, args.ramp_s, timeout_s))
        moves_before = frontend_log.read_text(errors="replace").count("moving it to another server")
        log_start = frontend_log.stat().st_size
        print(f"[failover] again, killing the first replica at {args.kill_at_s:g} s ...", file=sys.stderr)
        victim = servers[0]
        faulty, killed_at = asyncio.run(run_clients(
            url, plan, args.clients, args.ramp_s, timeout_s,
            kill=(args.kill_at_s, lambda: os.killpg(victim.process.pid, signal.SIGKILL))))
        with open(frontend_log, "rb") as handle:
            handle.seek(log_start)
            moved_names = set(MOVE_LINE.findall(handle.read().decode(errors="replace")))
    moved = {int(name.removeprefix("client")) for name in moved_names}
    stayed = set(range(args.clients)) - moved
    outcomes = [ws_load.stream_metrics(plan, record) for record in faulty]
    same_segments = sum(segments_of(a) == segments_of(b) for a, b in zip(calm, faulty))
    delays = {"moved streams": extra_delays(plan, calm, faulty, moved, killed_at),
              "streams that stayed": extra_delays(plan, calm, faulty, stayed, killed_at)}
    result = {
        "cpu": cpu, "store": str(args.store), "server_env": server_env, "clients": args.clients,
        "audio_s": plan.audio_s, "killed_at_s": killed_at, "moves_before_fault": moves_before,
        "moved_streams": sorted(moved), "finals": sum(o["final"] for o in outcomes),
        "errors": sorted({o["error"] for o in outcomes if o["error"]}),
        "failures": [o["failure"] for o in outcomes if o["failure"]],
        "streams_with_the_calm_runs_segments": same_segments,
        "extra_delay_s": {name: metrics.summarise(values) for name, values in delays.items()},
        "extra_delays_s": delays,
    }
    lines = [f"# Failover delay\n\nCPU: {cpu}. Store {args.store}; server environment {server_env or 'default'}. "
             f"{args.clients} real-time 2pass clients, {plan.audio_s:.1f} s of audio each; the first of two "
             f"replicas killed (SIGKILL) at {killed_at:.1f} s.\n",
             f"- Streams moved: {len(moved)} of {args.clients}; final messages {result['finals']}/{args.clients}; "
             f"errors {result['errors'] or 'none'}; failures {len(result['failures'])}.",
             f"- Streams whose segments (count, times, texts) equal the run without the fault: "
             f"{same_segments}/{args.clients}.\n",
             "Extra second-pass delay of the segments answered after the kill (faulty run minus the run "
             "without the fault, the same segment, latency from the end of its speech), ms:\n",
             "| streams | segments | p50 | p95 | max |", "|---|---|---|---|---|",
             *(summary_row(name, values) for name, values in delays.items())]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "failover.json").write_text(json.dumps(result, indent=2))
    (args.out / "failover.md").write_text("\n".join(lines) + "\n")
    plot(delays, args.out / "failover.png", f"{args.clients} streams, one of two replicas killed at "
                                            f"{killed_at:.1f} s ({cpu})")
    print("\n".join(lines))
    print(f"wrote {args.out}/failover.{{json,md,png}}")
    complete = result["finals"] == args.clients and same_segments == args.clients and moved
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
