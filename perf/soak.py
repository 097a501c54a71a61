"""Soak: a steady 2pass load for a long time (default 1 hour) while the memory of every server
process is sampled, to show whether anything grows.

N clients each stream the WAV in real time, again and again, until --duration-s has passed
(a new stream starts as soon as the previous one's final message arrived). Every --sample-s
the RSS of each process of the service is read: the frontend, tritonserver and each of its
children (the Python-backend stubs by model, vLLM's processes). Reported: RSS per process
at the start (the first sample after the first streams ended) and at the end, its growth,
the streams completed, and every stream that ended otherwise (errors, failures, drops).

    python -m perf.soak --store .model_store-full [--clients 2] [--duration-s 3600] [--sample-s 10]
    python -m perf.soak --url ws://127.0.0.1:10095 ...    # a running service

Writes soak.json, soak.md and soak.png (RSS over time per process) under --out; exit 1 when
a stream did not end normally.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import threading
import time
from pathlib import Path

from perf import ws_load
from perf.bench_args import REAL_SPEECH_TOKENS_PER_S, add_server_env_argument, server_environment
from perf.capacity import service
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.second_pass.recognizer import DEFAULT_MAX_NEW_TOKENS

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "soak"


class RssSampler:
    """Every `interval_s`, the RSS (MB) of each process of each group's tree, by label
    (group/process label; several processes with one label are summed)."""

    def __init__(self, groups: dict[str, int], interval_s: float):
        self.groups = groups
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._clock = time.monotonic()

    def sample(self) -> None:
        import psutil

        rss: dict[str, float] = {}
        for group, root_pid in self.groups.items():
            try:
                root = psutil.Process(root_pid)
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                continue
            for process in tree:
                try:
                    label = f"{group}/{ws_load.process_label(process)}"
                    rss[label] = rss.get(label, 0.0) + process.memory_info().rss / 2**20
                except psutil.Error:
                    continue
        self.samples.append((time.monotonic() - self._clock, rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


async def steady_load(url: str, plan: ws_load.AudioPlan, clients: int, duration_s: float,
                      on_stream_done) -> list[dict]:
    """Each client streams the plan's audio in real time again and again until duration_s;
    returns every stream's metrics."""
    deadline = time.monotonic() + duration_s
    finished: list[dict] = []
    timeout_s = 60 + 3 * plan.audio_s
    numbers = itertools.count()

    async def client(index: int) -> None:
        await asyncio.sleep(index * plan.audio_s / clients)  # spread the streams' phases
        while time.monotonic() < deadline:
            record = ws_load.StreamRecord(next(numbers))
            await ws_load.client_stream(url, plan, record, time.monotonic(), 0.0, 1.0, timeout_s)
            finished.append(ws_load.stream_metrics(plan, record))
            on_stream_done(finished)

    await asyncio.gather(*(client(index) for index in range(clients)))
    return finished


def rss_table(samples: list[tuple[float, dict[str, float]]], start_index: int) -> list[dict]:
    """Per process: RSS (MB) at the start sample and the last, and the growth."""
    start, end = samples[start_index][1], samples[-1][1]
    rows = []
    for label in sorted(set(start) | set(end)):
        first, last = start.get(label), end.get(label)
        rows.append({"process": label, "start_mb": first, "end_mb": last,
                     "growth_mb": None if first is None or last is None else last - first})
    return rows


def plot(samples: list[tuple[float, dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label for _, rss in samples for label in rss})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label in labels:
        points = [(t / 60, rss[label]) for t, rss in samples if label in rss]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running service")
    target.add_argument("--store", type=Path, help="start tritonserver and a frontend on this model store")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    add_server_env_argument(parser)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--wav", type=Path, default=None, help="16 kHz mono WAV (default: synthesised speech)")
    parser.add_argument("--vad-dir", type=Path, default=None, help="the server's FSMN-VAD dir (default: bundled)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    server_env = server_environment(parser, "--server-env", args.server_env)
    if args.clients < 1 or args.duration_s <= 0 or args.sample_s <= 0:
        parser.error("--clients, --duration-s and --sample-s must be positive")
    cpu = cpu_summary()
    print(f"CPU {cpu}", flush=True)
    pcm = ws_load.load_pcm(args.wav)
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url
        else:
            url = stack.enter_context(service(args.store, args.out / "logs", args.max_new_tokens,
                                              REAL_SPEECH_TOKENS_PER_S, extra_env=server_env))
        plan = ws_load.plan_audio(pcm, ws_load.stream_config("2pass"), args.vad_dir)
        groups = ws_load.discover_server_processes(url)
        if not groups:
            parser.error(f"no process listens at {url}")
        start_index: list[int] = []

        def on_stream_done(finished: list[dict]) -> None:
            if not start_index and len(finished) >= args.clients:
                sampler.sample()  # the start: every client has finished a stream, so everything is loaded
                start_index.append(len(sampler.samples) - 1)
            if len(finished) % 10 == 0:
                print(f"[soak] {len(finished)} streams, {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)

        began = time.monotonic()
        with RssSampler(groups, args.sample_s) as sampler:
            streams = asyncio.run(steady_load(url, plan, args.clients, args.duration_s, on_stream_done))
    normal = [s for s in streams if s["final"]]
    abnormal = [{"error": s["error"], "failure": s["failure"], "dropped": s["dropped"]}
                for s in streams if not s["final"]]
    rows = rss_table(sampler.samples, start_index[0] if start_index else 0)
    result = {"cpu": cpu, "url": url, "clients": args.clients, "duration_s": args.duration_s,
              "audio_s": plan.audio_s, "streams": len(streams), "normal_streams": len(normal),
              "abnormal_streams": abnormal, "rss": rows,
              "samples": [{"t_s": t, "rss_mb": rss} for t, rss in sampler.samples]}
    mb = lambda value: "-" if value is None else f"{value:.0f}"  # noqa: E731
    lines = [f"# Soak\n\nCPU: {cpu}. {args.clients} real-time 2pass clients for {args.duration_s / 60:g} min "
             f"({plan.audio_s:.1f} s of audio per stream): {len(streams)} streams, {len(normal)} ended normally.\n",
             "| process | RSS at start MB | at end MB | growth MB |", "|---|---|---|---|",
             *(f"| {r['process']} | {mb(r['start_mb'])} | {mb(r['end_mb'])} | {mb(r['growth_mb'])} |" for r in rows)]
    if abnormal:
        lines.append(f"\nStreams that did not end normally: {abnormal[:5]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    plot(sampler.samples, args.out / "soak.png", f"RSS under {args.clients} steady 2pass streams ({cpu})")
    print("\n".join(lines))
    print(f"wrote {args.out}/soak.{{json,md,png}}")
    return 0 if not abnormal and streams else 1


if __name__ == "__main__":
    sys.exit(main())
