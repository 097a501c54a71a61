"""How many concurrent real-time streams the first pass sustains through tritonserver:
the batched engine vs FunASR's per-stream runtimes (engine parameter of
paraformer_streaming: `funasr`, its torch generate; `funasr_onnx`, its ONNX runtime on its
own export), same model, same audio, same machine, in one run.

Each stream sends a 600 ms chunk every 600 ms (staggered starts) over gRPC and waits for
its answer; a chunk's latency runs from when it was due to when its text arrived. A
concurrency is sustained when the p95 latency of the chunks that another chunk follows stays
under one chunk (600 ms), i.e. answers keep up with the audio. A stream's last chunk (END)
is reported apart: no chunk is due after it, and its answer also carries FunASR's tail step
(a second pass over the look-ahead frames), so with 15 chunks a stream the last chunks alone
(6.7 % of all) would otherwise set the p95.

    python -m perf.bench_first_pass_triton --paraformer-dir .cache/bench-models/paraformer-full-seed0

An engine may name its precision, ENGINE:PRECISION (paraformer_streaming's precision
parameter: fp32, int8 or auto, the default), and the batched engine its int8 kernel after it,
ENGINE:PRECISION:KERNEL (the int8_kernel parameter): --engines funasr,batched:fp32,batched:int8,
or --engines batched:int8:fbgemm,batched:int8:compiled. An engine named twice is measured twice
(the second run labelled ENGINE#2): alternating runs, on an instance whose speed drifts.
FunASR's int8 runtime has no encoder or decoder look-back, so against it every engine runs
without (--look-back 0; otherwise each stream takes its engine's default):

    python -m perf.bench_first_pass_triton --paraformer-dir DIR --look-back 0 \
        --engines funasr_onnx:int8,batched:fp32,batched:int8

--layouts serves the model in other shapes, INSTANCESxWORKERS each: 1x2 is one decoupled
instance whose 2 worker threads take any stream's chunk (as config.pbtxt ships it on 2
cores), 2x1 two decoupled instances (two processes, Triton pinning each stream to one), 2x0
two instances that are not decoupled:

    python -m perf.bench_first_pass_triton --paraformer-dir DIR --layouts 1x2,2x0

--sweep instead runs the batched engine under sequence-batcher settings (config.pbtxt's
max_queue_delay_microseconds and preferred_batch_size, and the layouts: --delays-us x
--preferred x --layouts) at fixed stream counts (--streams), reporting the chunk latency
and the mean number of chunks per forward pass (from the model's pass counters):

    python -m perf.bench_first_pass_triton --paraformer-dir DIR --sweep --streams 1,2,4,8
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import itertools
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from frontend.triton_client import SequenceStream, TritonGateway
from perf.metrics import largest_passing, percentile
from twopass_asr import REPO_ROOT
from twopass_asr.first_pass.options import DEFAULT_STEP_SAMPLES as CHUNK_SAMPLES
from twopass_asr.first_pass.options import INT8_KERNEL_ENV, PRECISION_ENV
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.serving.triton_launcher import DEFAULT_MODEL_REPOSITORY, TritonServer
from twopass_asr.store.model_store import PARAFORMER

CHUNK_S = 0.6


@dataclass
class Latencies:
    """Seconds from a chunk's due time to its answer, for the chunks another chunk follows
    (steady) and for each stream's last one (final)."""

    steady: list[float] = field(default_factory=list)
    final: list[float] = field(default_factory=list)

    def row(self) -> dict:
        return {"p50_ms": 1000 * percentile(self.steady, 50), "p95_ms": 1000 * percentile(self.steady, 95),
                "final_p50_ms": 1000 * percentile(self.final, 50), "final_max_ms": 1000 * max(self.final),
                "all_p95_ms": 1000 * percentile(self.steady + self.final, 95),
                "chunks": len(self.steady) + len(self.final)}

    @staticmethod
    def describe(row: dict) -> str:
        return (f"p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  "
                f"(last chunks p50 {row['final_p50_ms']:.0f} / max {row['final_max_ms']:.0f} ms; "
                f"p95 with them {row['all_p95_ms']:.0f} ms)")


def speech_audio(seconds: float) -> np.ndarray:
    from perf.pa_inputs import synthesised_wavs

    pcm = np.concatenate(synthesised_wavs(2))
    reps = int(np.ceil(seconds * 16000 / len(pcm)))
    return np.tile(pcm, reps)[: int(seconds * 16000)]


Layout = tuple[int, int]  # (instances, workers per instance; 0 = not decoupled)


def parse_layouts(text: str) -> list[Layout | None]:
    """"1x2,2x0" -> [(1, 2), (2, 0)]; "shipped" -> None (config.pbtxt as it is)."""
    layouts = []
    for item in text.split(","):
        if item == "shipped":
            layouts.append(None)
            continue
        match = re.fullmatch(r"(\d+)x(\d+)", item)
        if not match or int(match[1]) < 1:
            raise SystemExit(f"layout {item!r}: expected INSTANCESxWORKERS (e.g. 1x2, 2x0) or 'shipped'")
        layouts.append((int(match[1]), int(match[2])))
    return layouts


def layout_name(layout: Layout | None) -> str:
    return "shipped" if layout is None else f"{layout[0]}x{layout[1]}"


def substitute(text: str, pattern: str, replacement: str, config: Path) -> str:
    text, found = re.subn(pattern, replacement, text)
    if not found:
        raise SystemExit(f"{config}: {pattern!r} not found")
    return text


def model_repository(engine: str, root: Path, queue_delay_us: int | None = None,
                     preferred: list[int] | None = None, layout: Layout | None = None) -> Path:
    """A repository holding only paraformer_streaming, with the given engine (ENGINE,
    ENGINE:PRECISION or ENGINE:PRECISION:KERNEL) and, when
    given, the sequence batcher's queue delay and preferred batch sizes ([] = none), and
    the layout (the threads parameter, empty, shares the cores out between the passes
    that can run at once)."""
    engine, _, setting = engine.partition(":")
    precision, _, kernel = setting.partition(":")
    # A directory of its own: an engine may be measured more than once in a run.
    repo = Path(tempfile.mkdtemp(dir=root, prefix=f"repo-{engine}-{precision or 'default'}-{kernel or 'default'}-"
                                                   f"{queue_delay_us}-{'_'.join(map(str, preferred or []))}-"
                                                   f"{layout_name(layout)}-"))
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / PARAFORMER, repo / PARAFORMER,
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / PARAFORMER / "config.pbtxt"
    text = substitute(config.read_text(), r'\{ key: "engine" value: \{ string_value: "batched" \} \}',
                      f'{{ key: "engine" value: {{ string_value: "{engine}" }} }}', config)
    if precision:
        text = substitute(text, r'\{ key: "precision" value: \{ string_value: "\w*" \} \}',
                          f'{{ key: "precision" value: {{ string_value: "{precision}" }} }}', config)
    if kernel:
        text = substitute(text, r'\{ key: "int8_kernel" value: \{ string_value: "\w*" \} \}',
                          f'{{ key: "int8_kernel" value: {{ string_value: "{kernel}" }} }}', config)
    if queue_delay_us is not None:
        text = substitute(text, r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {queue_delay_us}",
                          config)
    if preferred is not None:
        replacement = f"preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else ""
        text = substitute(text, r"preferred_batch_size: \[[^\]]*\]\n", replacement, config)
    if layout is not None:
        instances, workers = layout
        text = substitute(text, r"instance_group \[ \{ count: \d+", f"instance_group [ {{ count: {instances}", config)
        text = substitute(text, r"model_transaction_policy \{ decoupled: true \}",
                          f"model_transaction_policy {{ decoupled: {'true' if workers else 'false'} }}", config)
        text = substitute(text, r'\{ key: "workers" value: \{ string_value: "" \} \}',
                          f'{{ key: "workers" value: {{ string_value: "{workers or ""}" }} }}', config)
    config.write_text(text)
    return repo


async def run_stream(stream: SequenceStream, sequence_id: int, pcm: np.ndarray, start_at: float,
                     latencies: Latencies, look_back: int | None = None) -> None:
    chunks = [pcm[i : i + CHUNK_SAMPLES] for i in range(0, len(pcm), CHUNK_SAMPLES)]
    for index, chunk in enumerate(chunks):
        due = start_at + (index + 1) * CHUNK_S  # a chunk exists once its audio has been spoken
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        last = index == len(chunks) - 1
        inputs = (TritonGateway.first_pass_inputs(chunk, encoder_look_back=look_back, decoder_look_back=look_back)
                  if index == 0 else TritonGateway.audio_inputs(chunk))
        await stream.infer(inputs, sequence_id, start=index == 0, end=last)
        (latencies.final if last else latencies.steady).append(time.monotonic() - due)


async def load(url: str, streams: int, pcm: np.ndarray, seed: int, look_back: int | None = None) -> Latencies:
    """`streams` real-time streams, each on its own gRPC stream as the frontend sends them,
    with encoder and decoder look-back `look_back` (None: the engine's default)."""
    gateway = TritonGateway(url)
    rng = random.Random(seed)
    latencies = Latencies()
    now = time.monotonic()
    channels = [gateway.open_stream(PARAFORMER) for _ in range(streams)]
    try:
        await asyncio.gather(*(
            run_stream(channel, 10_000 * seed + i + 1, np.roll(pcm, rng.randrange(len(pcm))),
                       now + rng.uniform(0, CHUNK_S), latencies, look_back)
            for i, channel in enumerate(channels)
        ))
    finally:
        for channel in channels:
            await channel.close()
        await gateway.close()
    return latencies


def capacity(url: str, pcm: np.ndarray, max_streams: int, log, look_back: int | None = None
             ) -> tuple[int, list[dict]]:
    """Largest sustained concurrency (doubling, then bisection) and every trial."""
    rows: list[dict] = []

    def trial(n: int) -> bool:
        row = {"streams": n, **asyncio.run(load(url, n, pcm, seed=len(rows) + 1, look_back=look_back)).row()}
        row["sustained"] = row["p95_ms"] < 1000 * CHUNK_S
        rows.append(row)
        log(f"  {n:3d} streams: {Latencies.describe(row)}  {'ok' if row['sustained'] else 'falls behind'}")
        return row["sustained"]

    good, _ = largest_passing(trial, max_streams)
    return good, rows


def pass_counts(server: TritonServer) -> tuple[float, float]:
    """(chunks, forward passes) paraformer_streaming has computed so far."""
    return (server.model_counter(PARAFORMER, "twopass_asr_sequence_pass_chunks_total"),
            server.model_counter(PARAFORMER, "twopass_asr_sequence_passes_total"))


def sweep(args, pcm: np.ndarray, tmp: Path, store: Path) -> int:
    """Chunk latency and the mean chunks per forward pass at fixed loads, per
    sequence-batcher setting and layout."""
    delays = [int(v) for v in args.delays_us.split(",")]
    preferred_sets = [[int(v) for v in group.split()] for group in args.preferred.split(",")]
    streams = [int(v) for v in args.streams.split(",")]
    rows = []
    for layout, delay, preferred in itertools.product(parse_layouts(args.layouts), delays, preferred_sets):
        label = f"layout {layout_name(layout)}, delay {delay} us, preferred {preferred or 'none'}"
        print(f"[{label}] starting tritonserver", flush=True)
        repo = model_repository("batched", tmp, delay, preferred, layout)
        with TritonServer(store, repo, log_path=args.out / "first_pass_triton_sweep.log") as server:
            asyncio.run(load(server.grpc_url, 1, pcm[: 3 * CHUNK_SAMPLES], seed=999))  # warm-up
            for n in streams:
                before = pass_counts(server)
                latencies = asyncio.run(load(server.grpc_url, n, pcm, seed=n))
                chunks, passes = (after - first for after, first in zip(pass_counts(server), before))
                row = {"layout": layout_name(layout), "queue_delay_us": delay,
                       "preferred": " ".join(map(str, preferred)) or "none", "streams": n, **latencies.row(),
                       "mean_batch": chunks / passes if passes else 0.0}
                rows.append(row)
                print(f"  {n:3d} streams: {Latencies.describe(row)}  mean batch {row['mean_batch']:.2f}",
                      flush=True)
    with open(args.out / "first_pass_triton_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| layout | max_queue_delay_microseconds | preferred_batch_size | streams | p50 ms | p95 ms "
             "(last chunks apart) | chunks per pass |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['queue_delay_us']} | {r['preferred']} | {r['streams']} "
              f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['mean_batch']:.2f} |" for r in rows]
    (args.out / "first_pass_triton_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def plot_trials(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in dict.fromkeys(f"{r['engine']} {r['layout']}" for r in rows):
        trials = sorted((r for r in rows if f"{r['engine']} {r['layout']}" == label), key=lambda r: r["streams"])
        ax.plot([r["streams"] for r in trials], [r["p95_ms"] for r in trials], "o-", label=f"{label}, p95")
        ax.plot([r["streams"] for r in trials], [r["p50_ms"] for r in trials], ":", label=f"{label}, p50")
    ax.axhline(1000 * CHUNK_S, color="grey", lw=0.8, ls="--", label="one chunk (600 ms)")
    ax.set(xlabel="concurrent real-time streams", ylabel="chunk latency, ms (last chunks apart)",
           title="First pass through tritonserver")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ratio_lines(results: dict[str, int]) -> list[str]:
    """Each batched engine's streams over each of FunASR's per-stream runtimes', per layout
    ("ENGINE[:PRECISION] LAYOUT" labels)."""
    lines = []
    for label, streams in results.items():
        engine, layout = label.rsplit(" ", 1)
        if not engine.startswith("batched"):
            continue
        for peer, peer_streams in results.items():
            peer_engine, peer_layout = peer.rsplit(" ", 1)
            if peer_engine.startswith("funasr") and peer_layout == layout and peer_streams:
                lines.append(f"{engine} / {peer_engine}, layout {layout}: {streams / peer_streams:.2f}x")
    return [""] + lines if lines else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paraformer-dir", type=Path, required=True, help="streaming Paraformer model directory")
    parser.add_argument("--engines", default="funasr,batched")
    parser.add_argument("--seconds", type=float, default=12.0, help="audio per stream and trial")
    parser.add_argument("--max-streams", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results")
    parser.add_argument("--sweep", action="store_true", help="sequence-batcher settings at fixed loads")
    parser.add_argument("--delays-us", default="0,2000,50000", help="--sweep: max_queue_delay_microseconds values")
    parser.add_argument("--preferred", default="8 16,", help="--sweep: preferred_batch_size sets, comma-separated "
                        "(sizes within a set space-separated; an empty set = none)")
    parser.add_argument("--streams", default="1,2,4,8", help="--sweep: concurrent stream counts")
    parser.add_argument("--look-back", type=int, default=None,
                        help="encoder and decoder look-back of every stream (default: each engine's own)")
    parser.add_argument("--layouts", default="shipped", help="INSTANCESxWORKERS (0 workers = not decoupled) or "
                        "'shipped', comma-separated; each engine is measured in each")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pcm = speech_audio(args.seconds)
    results = {}
    all_rows = []
    runs: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        (store / PARAFORMER).symlink_to(args.paraformer_dir.resolve())
        if args.sweep:
            return sweep(args, pcm, Path(tmp), store)
        for engine, layout in itertools.product(args.engines.split(","), parse_layouts(args.layouts)):
            runs[engine, layout] += 1  # an engine named again is measured again: ENGINE#2
            run = engine if runs[engine, layout] == 1 else f"{engine}#{runs[engine, layout]}"
            label = f"{run} {layout_name(layout)}"
            print(f"[{label}] starting tritonserver", flush=True)
            log_name = f"first_pass_triton_{run.replace(':', '-').replace('#', '-')}_{layout_name(layout)}.log"
            # The repository's parameters count, not ones left in this shell's environment.
            with TritonServer(store, model_repository(engine, Path(tmp), layout=layout), log_path=args.out / log_name,
                              env={PRECISION_ENV: "", INT8_KERNEL_ENV: ""}) as server:
                asyncio.run(load(server.grpc_url, 1, pcm[: 3 * CHUNK_SAMPLES], seed=999, look_back=args.look_back))
                results[label], rows = capacity(server.grpc_url, pcm, args.max_streams, print, args.look_back)
            all_rows += [{"engine": run, "layout": layout_name(layout), **row} for row in rows]
            print(f"[{label}] sustains {results[label]} real-time streams", flush=True)
    with open(args.out / "first_pass_triton.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)
    look_back = "each engine's default" if args.look_back is None else args.look_back
    lines = [cpu_summary(), "", f"look-back: {look_back}", "",
             "| engine, layout | sustained real-time streams (p95 chunk latency < 600 ms) |", "|---|---|"]
    lines += [f"| {label} | {n} |" for label, n in results.items()]
    lines += ratio_lines(results)
    lines += ["", "| engine, layout | streams | p50 ms | p95 ms | last chunk p50 / max ms | p95 with last chunks ms |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} {r['layout']} | {r['streams']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
              f"| {r['final_p50_ms']:.0f} / {r['final_max_ms']:.0f} | {r['all_p95_ms']:.0f} |" for r in all_rows]
    plot_trials(all_rows, args.out / "first_pass_triton.png")
    (args.out / "first_pass_triton.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
