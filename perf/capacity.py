"""Capacity search: the largest number of concurrent real-time streams a server sustains
with p95 partial lag under one first-pass chunk (600 ms), p95 second-pass latency under
2 s (counted from the VAD's report of the segment end; --second-pass-from speech counts
from the end of the speech), and every stream ending normally (final message, no error,
no dropped connection).
N doubles from 1 until a run fails, then a binary search between the last pass and the
first failure; each step is one perf.ws_load run.

    # a running server
    python -m perf.capacity --url ws://127.0.0.1:10095 --max-clients 32
    # the service (tritonserver + frontend) and the FunASR baselines, one after the other,
    # on the same model store and audio; prints the capacity ratios (--profiles auto,fp32,int8:
    # the service in its default precisions, in FunASR's float32, and in int8 with the LLM too;
    # --baselines fp32,int8:
    # FunASR per stream with its online Paraformer in torch float32, and on its ONNX runtime
    # in int8, as FunASR's CPU runtime runs it by default)
    python -m perf.capacity --compare --store .model_store-full --max-clients 16 --profiles auto,fp32

Writes capacity.json, a Markdown table and latency plots under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from perf import metrics, ws_load
from perf.bench_args import (
    PROFILES,
    REAL_SPEECH_TOKENS_PER_S,
    add_server_env_argument,
    comma_choices,
    profile_environment,
    server_environment,
)
from twopass_asr import REPO_ROOT
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.second_pass.recognizer import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_ENV,
    MAX_NEW_TOKENS_PER_SECOND_ENV,
)
from twopass_asr.serving.triton_launcher import TritonServer, TritonStartError, free_port

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "capacity"
SETTLE_S = 2.0  # between steps, so work queued by the previous run cannot delay the next
# The FunASR baselines, by the precision of their online Paraformer (perf.baseline_server).
BASELINES = ("fp32", "int8")


# Where the second-pass latency limit counts from: the frame with which the VAD reported the
# segment's end (the second pass's own work and queueing; issue 17's target), or the end of
# the speech in the audio (adding the VAD's end-silence wait, about 0.6 s).
SECOND_PASS_FROM = {"vad": "second_pass_after_detection", "speech": "second_pass"}


def check_run(run: dict, max_partial_lag_s: float, max_second_pass_s: float,
              second_pass_from: str = "vad") -> str | None:
    """Why a run misses the targets, or None when it meets them."""
    if run["finals"] != run["clients"]:
        return (f"{run['clients'] - run['finals']} of {run['clients']} streams without a final message "
                f"({run['errors']} errors, {run['failures']} failures, {run['dropped']} dropped)")
    latency = run["latency_s"]
    lag = latency["partial_lag"]["p95"]
    if run["mode"] != "offline":
        if lag is None:
            return "no partial lag measured (no partials could be matched to chunks)"
        if lag >= max_partial_lag_s:
            return f"p95 partial lag {lag * 1000:.0f} ms >= {max_partial_lag_s * 1000:.0f} ms"
    second = latency[SECOND_PASS_FROM[second_pass_from]]["p95"]
    if run["mode"] != "online":
        if second is None:
            return "no second-pass results"
        if second >= max_second_pass_s:
            return (f"p95 second-pass latency from the {second_pass_from} end {second * 1000:.0f} ms >= "
                    f"{max_second_pass_s * 1000:.0f} ms")
    return None


def search(url: str, plan: ws_load.AudioPlan, max_clients: int, max_partial_lag_s: float, max_second_pass_s: float,
           speed: float = 1.0, ramp_s: float = 2.0, timeout_s: float | None = None,
           second_pass_from: str = "vad") -> dict[str, Any]:
    """Exponential then binary search over N; returns the capacity and every step."""
    steps: list[dict] = []

    def attempt(clients: int) -> bool:
        if steps:
            time.sleep(SETTLE_S)
        run = asyncio.run(ws_load.run_load(url, plan, clients, speed=speed, ramp_s=ramp_s, timeout_s=timeout_s))
        run["failed_because"] = check_run(run, max_partial_lag_s, max_second_pass_s, second_pass_from)
        steps.append(run)
        verdict = "ok" if run["failed_because"] is None else f"FAIL: {run['failed_because']}"
        print(f"[capacity] N={clients}: {verdict}", file=sys.stderr, flush=True)
        served = ws_load.served_table([run])
        if served is not None:
            print(served, file=sys.stderr, flush=True)
        return run["failed_because"] is None

    best, bounded = metrics.largest_passing(attempt, max_clients)
    return {"url": url, "capacity": best, "bounded_by_max_clients": bounded, "max_clients": max_clients,
            "limits": {"partial_lag_p95_s": max_partial_lag_s, "second_pass_p95_s": max_second_pass_s,
                       "second_pass_from": second_pass_from},
            "audio_s": plan.audio_s, "steps": steps}


def write_search_reports(result: dict, out: Path, title: str) -> None:
    second_pass = SECOND_PASS_FROM[result["limits"]["second_pass_from"]]
    limits = {"partial_lag": result["limits"]["partial_lag_p95_s"], second_pass: result["limits"]["second_pass_p95_s"]}
    runs = sorted(result["steps"], key=lambda r: r["clients"])
    ws_load.write_reports(runs, out, title, {k: v for k, v in result.items() if k != "steps"}, limits)
    (out / "capacity.json").write_text(json.dumps(result, indent=2))


def capacity_line(result: dict) -> str:
    bound = " (or more: the search stopped at --max-clients)" if result["bounded_by_max_clients"] else ""
    return f"capacity {result['capacity']} concurrent streams{bound}"


# ---------------------------------------------------------------- servers for --compare


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}; see {log_path}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout_s:.0f} s; see {log_path}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def python_server(module_args: list[str], port: int, log_path: Path, what: str, timeout_s: float) -> Iterator[str]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", *module_args], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPO_ROOT)
        try:
            wait_for_port(port, process, timeout_s, what, log_path)
            yield f"ws://127.0.0.1:{port}"
        finally:
            stop_process(process)


def start_triton(store: Path, log_dir: Path, max_new_tokens: int, tokens_per_second: float, profile: str = "auto",
                 extra_env: dict[str, str] | None = None, attempts: int = 3) -> TritonServer:
    """tritonserver on free ports, both passes in precision `profile` (auto, fp32 or int8), then
    `extra_env` on top. Another program can take a port between choosing it and tritonserver
    binding it (loading the models takes a minute): then try new ports."""
    env = {MAX_NEW_TOKENS_ENV: str(max_new_tokens), MAX_NEW_TOKENS_PER_SECOND_ENV: str(tokens_per_second),
           **profile_environment(profile), **(extra_env or {})}
    for attempt in range(1, attempts + 1):
        try:
            return TritonServer(store, log_path=log_dir / "tritonserver.log", env=env).start()
        except TritonStartError as exc:
            if "already in use" not in str(exc) or attempt == attempts:
                raise
            print("[capacity] tritonserver port taken meanwhile; retrying on new ports", file=sys.stderr)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def service(store: Path, log_dir: Path, max_new_tokens: int, tokens_per_second: float,
            profile: str = "auto", extra_env: dict[str, str] | None = None,
            frontend_args: Sequence[str] = ()) -> Iterator[str]:
    """tritonserver on the store, and the WebSocket frontend (with `frontend_args`) in front of it."""
    with start_triton(store, log_dir, max_new_tokens, tokens_per_second, profile, extra_env) as triton:
        port = free_port()
        with python_server(["frontend.server", "--triton-url", triton.grpc_url, "--host", "127.0.0.1",
                            "--port", str(port), *frontend_args], port, log_dir / "frontend.log", "frontend",
                           60) as url:
            yield url


@contextlib.contextmanager
def baseline(store: Path, log_dir: Path, threads: int, max_new_tokens: int,
             tokens_per_second: float | None = None, first_pass_precision: str = "fp32") -> Iterator[str]:
    port = free_port()
    length_cap = [] if tokens_per_second is None else ["--max-new-tokens-per-second", str(tokens_per_second)]
    with python_server(["perf.baseline_server", "--store", str(store), "--port", str(port),
                        "--threads", str(threads), "--max-new-tokens", str(max_new_tokens), *length_cap,
                        "--first-pass-precision", first_pass_precision],
                       port, log_dir / f"baseline-{first_pass_precision}.log", "baseline server", 600) as url:
        yield url


def measure(name: str, server, args, pcm, out: Path) -> dict:
    print(f"[capacity] starting {name} ...", file=sys.stderr, flush=True)
    with server as url:
        plan = ws_load.prepare_plan(url, pcm, args.mode, args.vad_dir, args.probe_wait, args.timeout_s or 300.0)
        result = search(url, plan, args.max_clients, args.max_partial_lag, args.max_second_pass, args.speed,
                        args.ramp_s, args.timeout_s, args.second_pass_from)
    write_search_reports(result, out / name, f"{name}: latency vs concurrent streams")
    print(f"[capacity] {name}: {capacity_line(result)}", file=sys.stderr, flush=True)
    return result


def comparison_table(results: dict[str, dict]) -> str:
    lines = ["| server | capacity (streams) | steps (N: verdict) |", "|---|---|---|"]
    for name, result in results.items():
        steps = ", ".join(f"{r['clients']}: {'ok' if r['failed_because'] is None else 'fail'}" for r in result["steps"])
        more = "+" if result["bounded_by_max_clients"] else ""
        lines.append(f"| {name} | {result['capacity']}{more} | {steps} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (not with --compare)")
    parser.add_argument("--compare", action="store_true",
                        help="start the service and then the FunASR baseline on --store and measure both")
    parser.add_argument("--store", type=Path, default=None, help="model store for --compare")
    parser.add_argument("--baseline-threads", type=int, default=2, help="torch threads of the baseline server")
    parser.add_argument("--profiles", default="auto",
                        help="with --compare: the service's precision profiles to measure, comma-separated: auto "
                             "(both passes as they choose on this machine), fp32 (FunASR's own precision) and/or "
                             "int8 (both passes, the LLM too)")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="with --compare: the FunASR baselines to measure, comma-separated: fp32 (its online "
                             "Paraformer in torch) and/or int8 (on FunASR's ONNX runtime, its int8 export); "
                             "empty: none")
    add_server_env_argument(parser, "--service-env")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="second-pass generation cap per segment for both servers with --compare")
    parser.add_argument("--max-new-tokens-per-second", type=float, default=REAL_SPEECH_TOKENS_PER_S,
                        help="and per second of the segment's audio: a random Nano never stops by itself, "
                             "so both servers cut it where a real transcript of that length ends "
                             "(default %(default)s, perf/README.md)")
    parser.add_argument("--max-clients", type=int, default=32)
    parser.add_argument("--max-partial-lag", type=float, default=0.6, help="p95 partial lag limit, s (one chunk)")
    parser.add_argument("--max-second-pass", type=float, default=2.0, help="p95 second-pass latency limit, s")
    parser.add_argument("--second-pass-from", choices=sorted(SECOND_PASS_FROM), default="vad",
                        help="count the second pass from the VAD's report of the segment end (default) or from "
                             "the end of the speech in the audio (adds the VAD's end-silence wait)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ws_load.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_clients < 1 or args.max_new_tokens < 1:
        parser.error("--max-clients and --max-new-tokens must be at least 1")
    if not args.max_new_tokens_per_second > 0:
        parser.error("--max-new-tokens-per-second must be positive")
    profiles = comma_choices(parser, "--profiles", args.profiles, PROFILES)
    baselines = comma_choices(parser, "--baselines", args.baselines, BASELINES) if args.baselines else []
    service_env = server_environment(parser, "--service-env", args.service_env)
    if args.compare == bool(args.url):
        parser.error("give either --url (a running server) or --compare --store DIR")
    if args.compare and (args.store is None or not args.store.is_dir()):
        parser.error("--compare needs --store, an existing model store directory")
    try:
        pcm = ws_load.load_pcm(args.wav)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if not args.compare:
        try:
            plan = ws_load.prepare_plan(args.url, pcm, args.mode, args.vad_dir, args.probe_wait,
                                        args.timeout_s or 300.0)
        except (OSError, RuntimeError) as exc:
            parser.exit(1, f"capacity: probe stream against {args.url} failed: {exc!r}\n")
        result = search(args.url, plan, args.max_clients, args.max_partial_lag, args.max_second_pass,
                        args.speed, args.ramp_s, args.timeout_s, args.second_pass_from)
        write_search_reports(result, args.out, f"capacity {args.url}")
        print(ws_load.report_markdown(sorted(result["steps"], key=lambda r: r["clients"])))
        print(capacity_line(result))
        return 0
    args.vad_dir = args.vad_dir or args.store / "vad"
    store = args.store.resolve()
    logs = args.out / "logs"
    results = {}
    for profile in profiles:
        name = f"service-{profile}"
        results[name] = measure(name, service(store, logs / name, args.max_new_tokens, args.max_new_tokens_per_second,
                                              profile, service_env), args, pcm, args.out)
    for precision in baselines:
        name = f"baseline-{precision}"
        results[name] = measure(name, baseline(store, logs, args.baseline_threads, args.max_new_tokens,
                                               args.max_new_tokens_per_second, precision), args, pcm, args.out)
    # Each service profile's capacity over each baseline's (None where that baseline's is 0).
    ratios = {f"{service_name} / {baseline_name}": (served["capacity"] / peer["capacity"] if peer["capacity"] else None)
              for service_name, served in results.items() if service_name.startswith("service-")
              for baseline_name, peer in results.items() if baseline_name.startswith("baseline-")}
    summary = {"cpu": cpu_summary(), "store": str(store), "audio_s": next(iter(results.values()))["audio_s"],
               "max_new_tokens": args.max_new_tokens, "max_new_tokens_per_second": args.max_new_tokens_per_second,
               "second_pass_from": args.second_pass_from, "service_env": service_env,
               "capacity": {name: r["capacity"] for name, r in results.items()},
               "bounded_by_max_clients": {name: r["bounded_by_max_clients"] for name, r in results.items()},
               "ratios": ratios}
    (args.out / "compare.json").write_text(json.dumps(summary, indent=2))
    table = comparison_table(results)
    ratio_lines = "\n".join(f"{pair}: " + (f"{ratio:.2f}x" if ratio is not None else "undefined (baseline capacity 0)")
                            for pair, ratio in ratios.items())
    settings = f"Service environment over its profile: {service_env}\n\n" if service_env else ""
    (args.out / "compare.md").write_text(f"# Capacity: service vs FunASR baselines\n\n{cpu_summary()}\n\n{settings}"
                                         f"{table}\n\n{ratio_lines}\n")
    print(table)
    print(ratio_lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
