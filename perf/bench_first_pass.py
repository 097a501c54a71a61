"""First-pass speed: batched streaming Paraformer vs FunASR decoding one stream at a time.

With the full-size random Paraformer (real shapes, ~220M parameters), B streams each feed
600 ms chunks. For B in --batches, one batched forward (BatchedStreamingParaformer.
process_batch, linear weights packed once for the kernel the service picks: MLAS at one torch
thread, oneDNN at more) is timed against FunASR's AutoModel.generate run stream after stream
on the same chunks (steady state: the first chunk of every stream is a warm-up), and against
the same batched forward with oneDNN's packed weights and with torch's plain nn.Linear.
Reports wall and CPU time, stream-chunks served per CPU-second, and a compute floor: the
FLOPs of one batched step (counted by torch's FlopCounterMode on the engine with torch's own
linear layers: it does not see the packed kernels) divided by a matmul rate measured right before
each timed forward (the rate of a shared cloud core drifts by +-20% within a minute, so a
rate measured once at the start makes the floor ratio noise).

    .venv/bin/python -m perf.bench_first_pass [--batches 1,2,4,8,16,32] [--rounds 3] [--threads 1]

Writes perf/results/first_pass.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perf.bench_args import add_batch_arguments, batch_counts
from twopass_asr import REPO_ROOT
from twopass_asr.first_pass.options import DEFAULT_STEP_SAMPLES as CHUNK_SAMPLES

DEFAULT_MODEL_DIR = REPO_ROOT / ".cache" / "bench-models" / "paraformer-full-seed0"
DEFAULT_OUT = REPO_ROOT / "perf" / "results"
CHUNK_SECONDS = CHUNK_SAMPLES / 16000


@dataclass
class Row:
    batch: int
    batched_wall_ms: float  # one batched forward for all B streams
    batched_cpu_ms: float
    variant_wall_ms: dict[str, float]  # the same batched forward with other linear kernels (CPU only)
    reference_wall_ms: float  # FunASR, the B streams one after another
    reference_cpu_ms: float
    gflop_per_stream: float
    roof_gflops: float  # median of the matmul rates measured before each timed forward
    floor_ms: float  # FLOPs of the batched step / the matmul rate measured before it (median)
    floor_fraction: float  # median over rounds of floor / batched CPU time
    identical_text: bool

    @property
    def speedup(self) -> float:
        return self.reference_wall_ms / self.batched_wall_ms

    @property
    def batched_streams_per_cpu_s(self) -> float:
        return self.batch / (self.batched_cpu_ms / 1000)

    @property
    def reference_streams_per_cpu_s(self) -> float:
        return self.batch / (self.reference_cpu_ms / 1000)


def ensure_model(model_dir: Path) -> Path:
    if (model_dir / "model.pt").exists() and (model_dir / "config.yaml").exists():
        return model_dir
    from twopass_asr.store.random_paraformer import build_random_paraformer

    return build_random_paraformer(model_dir, "full", seed=0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 3) -> float:
    """Best observed float32 GEMM rate at torch's thread count (the compute roof)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def timed(fn, device: torch.device) -> tuple[float, float, object]:
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000, result


def bench_batch(engine, variants: dict, reference, batch: int, rounds: int, rng) -> Row:
    """`variants`: name -> another BatchedStreamingParaformer over the same weights."""
    from torch.utils.flop_counter import FlopCounterMode

    from twopass_asr.audio import pcm16_to_float
    from twopass_asr.first_pass.options import DecodeOptions

    options = DecodeOptions()
    device = engine.device
    # rounds + 2 chunks per stream: a warm-up, the timed rounds, one FLOP-counted round.
    audio = [[(rng.standard_normal(CHUNK_SAMPLES) * 3000).astype(np.int16) for _ in range(rounds + 2)]
             for _ in range(batch)]
    streams = {name: [e.new_stream(options) for _ in range(batch)]
               for name, e in {"batched": engine, **variants}.items()}
    caches = [{} for _ in range(batch)]

    def reference_round(r):
        return [reference.generate(input=pcm16_to_float(audio[i][r]), cache=caches[i], is_final=False,
                                   chunk_size=list(options.chunk_size),
                                   encoder_chunk_look_back=options.encoder_look_back,
                                   decoder_chunk_look_back=options.decoder_look_back)[0]["text"]
                for i in range(batch)]

    def engine_round(name, r):
        e = variants.get(name, engine)
        return e.process_batch(streams[name], [audio[i][r] for i in range(batch)], [False] * batch)

    expected = reference_round(0)
    identical = all(engine_round(name, 0) == expected for name in streams)
    batched, ref, roofs = [], [], []
    variant_walls: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(1, rounds + 1):
        roofs.append(matmul_gflops(device))
        wall, cpu, texts = timed(lambda: engine_round("batched", r), device)
        batched.append((wall, cpu))
        for name in variants:
            variant_wall, _, variant_texts = timed(lambda: engine_round(name, r), device)
            variant_walls[name].append(variant_wall)
            identical &= variant_texts == texts
        ref_wall, ref_cpu, ref_texts = timed(lambda: reference_round(r), device)
        ref.append((ref_wall, ref_cpu))
        identical &= texts == ref_texts
    # On an engine with torch's own linear layers: FlopCounterMode does not see the packed kernels.
    with FlopCounterMode(display=False) as counter:
        engine_round("nn.Linear" if "nn.Linear" in variants else "batched", rounds + 1)
    flops = counter.get_total_flops()

    def median(values):
        return float(np.median(values))

    floors = [flops / (roof * 1e9) * 1000 for roof in roofs]
    # CPU time, not wall time: other processes share this machine's cores.
    fractions = [floor / cpu for floor, (_, cpu) in zip(floors, batched)]
    return Row(batch=batch, batched_wall_ms=median([w for w, _ in batched]),
               batched_cpu_ms=median([c for _, c in batched]),
               variant_wall_ms={name: median(walls) for name, walls in variant_walls.items()},
               reference_wall_ms=median([w for w, _ in ref]),
               reference_cpu_ms=median([c for _, c in ref]), gflop_per_stream=flops / batch / 1e9,
               roof_gflops=median(roofs), floor_ms=median(floors), floor_fraction=median(fractions),
               identical_text=identical)


def header(variants: list[str]) -> list[str]:
    variant_columns = [c for name in variants for c in (f"batched, {name} ms", f"vs {name}")]
    return (["batch", "batched ms / forward"] + variant_columns
            + ["FunASR ms (B streams in turn)", "speed-up", "batched CPU ms", "FunASR CPU ms",
               "stream-chunks / CPU-s batched", "stream-chunks / CPU-s FunASR", "CPU-s ratio",
               "GFLOP / stream-chunk", "GEMM roof GFLOP/s", "floor ms", "floor / batched CPU", "batched CPU / floor",
               "same text"])


def row_cells(row: Row) -> list[str]:
    variant_cells = [c for wall in row.variant_wall_ms.values()
                     for c in (f"{wall:.1f}", f"{wall / row.batched_wall_ms:.2f}x")]
    return ([str(row.batch), f"{row.batched_wall_ms:.1f}"] + variant_cells
            + [f"{row.reference_wall_ms:.1f}", f"{row.speedup:.2f}x",
               f"{row.batched_cpu_ms:.1f}", f"{row.reference_cpu_ms:.1f}", f"{row.batched_streams_per_cpu_s:.2f}",
               f"{row.reference_streams_per_cpu_s:.2f}",
               f"{row.batched_streams_per_cpu_s / row.reference_streams_per_cpu_s:.2f}x",
               f"{row.gflop_per_stream:.2f}", f"{row.roof_gflops:.0f}", f"{row.floor_ms:.1f}",
               f"{row.floor_fraction:.0%}", f"{1 / row.floor_fraction:.2f}x",
               "yes" if row.identical_text else "NO"])


def write_results(rows: list[Row], variants: list[str], out_dir: Path, context: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = header(variants)
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    (out_dir / "first_pass.md").write_text(f"# First pass: batched vs per-stream\n\n{context}\n\n"
                                           + "\n".join(table) + "\n", encoding="utf-8")
    with open(out_dir / "first_pass.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["batch", "batched_wall_ms", "batched_cpu_ms"]
                        + [f"{name.replace('.', '_')}_wall_ms" for name in variants]
                        + ["reference_wall_ms", "reference_cpu_ms", "gflop_per_stream_chunk", "roof_gflops",
                           "floor_ms", "floor_fraction", "identical_text"])
        for r in rows:
            writer.writerow([r.batch, f"{r.batched_wall_ms:.3f}", f"{r.batched_cpu_ms:.3f}"]
                            + [f"{r.variant_wall_ms[name]:.3f}" for name in variants]
                            + [f"{r.reference_wall_ms:.3f}", f"{r.reference_cpu_ms:.3f}", f"{r.gflop_per_stream:.4f}",
                               f"{r.roof_gflops:.1f}", f"{r.floor_ms:.3f}", f"{r.floor_fraction:.4f}",
                               r.identical_text])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r.batch for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(batches, [r.batched_wall_ms for r in rows], "o-", label="batched (one forward)")
    for name, marker in zip(variants, "v^"):
        left.plot(batches, [r.variant_wall_ms[name] for r in rows], f"{marker}-", label=f"batched, {name}")
    left.plot(batches, [r.reference_wall_ms for r in rows], "s-", label="FunASR, streams in turn")
    left.plot(batches, [r.floor_ms for r in rows], ":", label="compute floor")
    left.axhline(CHUNK_SECONDS * 1000, color="grey", lw=0.8, ls="--", label="600 ms real time")
    left.set(xscale="log", yscale="log", xlabel="streams per batch", ylabel="wall ms per 600 ms chunk round",
             title="Time to advance B streams by one chunk")
    left.set_xticks(batches, [str(b) for b in batches])
    left.legend(fontsize=8)
    right.plot(batches, [r.batched_cpu_ms / r.batch for r in rows], "o-", label="batched")
    right.plot(batches, [r.reference_cpu_ms / r.batch for r in rows], "s-", label="FunASR")
    right.plot(batches, [r.floor_ms / r.batch for r in rows], ":", label="compute floor")
    right.set(xscale="log", yscale="log", xlabel="streams per batch", ylabel="CPU ms per stream-chunk",
              title="CPU cost per stream-chunk")
    right.set_xticks(batches, [str(b) for b in batches])
    right.legend(fontsize=8)
    fig.suptitle(context, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "first_pass.png", dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_batch_arguments(parser, batches="1,2,4,8,16,32", rounds=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device of both engines (cuda: GPU timings; the "
                        "CPU linear kernels are then not compared)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="full-size random Paraformer (built here if missing)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    batches = batch_counts(parser, args)
    if args.threads < 1:
        parser.error("--threads must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")

    torch.set_num_threads(args.threads)
    from funasr import AutoModel

    from twopass_asr.first_pass.batched import BatchedStreamingParaformer
    from twopass_asr.kernels.prepacked_linear import choose_kernel

    model_dir = ensure_model(args.model_dir)
    engine = BatchedStreamingParaformer(model_dir, device=args.device)
    variants = {}
    if device.type == "cpu":
        variants = {"oneDNN": BatchedStreamingParaformer(model_dir, linear_kernel="onednn"),
                    "nn.Linear": BatchedStreamingParaformer(model_dir, linear_kernel=None)}
    reference = AutoModel(model=str(model_dir), device=args.device, disable_update=True, disable_pbar=True,
                          disable_log=True, ncpu=args.threads)
    where = (f"{args.threads} torch thread(s), batched linear kernel {choose_kernel()}" if device.type == "cpu"
             else f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}")
    context = (f"full-size random Paraformer ({sum(p.numel() for p in engine.model.parameters()) / 1e6:.0f}M "
               f"parameters), chunk_size [0,10,5], look-back 4/1, 600 ms chunks, {where}, "
               f"float32 GEMM roof measured (2048^3 matmul, best of 3) before each timed forward, "
               f"median of {args.rounds} rounds")
    print(context, flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        row = bench_batch(engine, variants, reference, batch, args.rounds, rng)
        rows.append(row)
        print(" | ".join(f"{h}: {c}" for h, c in zip(header(list(variants)), row_cells(row))), flush=True)
    write_results(rows, list(variants), args.out, context)
    print(f"wrote {args.out / 'first_pass.md'}, .csv and .png", flush=True)
    return 0 if all(r.identical_text for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
