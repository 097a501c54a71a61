"""First-pass speed: batched streaming Paraformer vs FunASR decoding one stream at a time.

With the full-size random Paraformer (real shapes, ~220M parameters), B streams each feed
600 ms chunks. For B in --batches, one batched forward (BatchedStreamingParaformer.
process_batch, linear weights prepacked for oneDNN as served) is timed against FunASR's
AutoModel.generate run stream after stream on the same chunks (steady state: the first chunk
of every stream is a warm-up), and against the same batched forward with torch's plain
nn.Linear. Reports wall and CPU time, stream-chunks served per CPU-second, and a compute
floor: the FLOPs of one batched step (counted by torch's FlopCounterMode on the plain
engine: it does not see oneDNN's linear op) divided by a matmul rate measured right before
each timed forward (the rate of a shared cloud core drifts by +-20% within a minute, so a
rate measured once at the start makes the floor ratio noise).

    .venv/bin/python perf/bench_first_pass.py [--batches 1,2,4,8,16,32] [--rounds 3] [--threads 1]

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

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / ".cache" / "bench-models" / "paraformer-full-seed0"
DEFAULT_OUT = REPO_ROOT / "perf" / "results"
CHUNK_SAMPLES = 9600  # 600 ms at 16 kHz: one chunk_size[1]=10 step
CHUNK_SECONDS = CHUNK_SAMPLES / 16000


@dataclass
class Row:
    batch: int
    batched_wall_ms: float  # one batched forward for all B streams
    batched_cpu_ms: float
    plain_wall_ms: float  # the same batched forward with torch's nn.Linear
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
    def prepack_speedup(self) -> float:
        return self.plain_wall_ms / self.batched_wall_ms

    @property
    def batched_streams_per_cpu_s(self) -> float:
        return self.batch / (self.batched_cpu_ms / 1000)

    @property
    def reference_streams_per_cpu_s(self) -> float:
        return self.batch / (self.reference_cpu_ms / 1000)


def ensure_model(model_dir: Path) -> Path:
    if (model_dir / "model.pt").exists() and (model_dir / "config.yaml").exists():
        return model_dir
    from twopass_asr.random_paraformer import build_random_paraformer

    return build_random_paraformer(model_dir, "full", seed=0)


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
    """Best observed float32 GEMM rate at torch's thread count (the compute roof)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000, result


def bench_batch(engine, plain_engine, reference, batch: int, rounds: int, rng) -> Row:
    from torch.utils.flop_counter import FlopCounterMode

    from twopass_asr.audio import pcm16_to_float
    from twopass_asr.paraformer import DecodeOptions

    options = DecodeOptions()
    # rounds + 2 chunks per stream: a warm-up, the timed rounds, one FLOP-counted round.
    audio = [[(rng.standard_normal(CHUNK_SAMPLES) * 3000).astype(np.int16) for _ in range(rounds + 2)]
             for _ in range(batch)]
    streams = [engine.new_stream(options) for _ in range(batch)]
    plain_streams = [plain_engine.new_stream(options) for _ in range(batch)]
    caches = [{} for _ in range(batch)]

    def reference_round(r):
        return [reference.generate(input=pcm16_to_float(audio[i][r]), cache=caches[i], is_final=False,
                                   chunk_size=list(options.chunk_size),
                                   encoder_chunk_look_back=options.encoder_look_back,
                                   decoder_chunk_look_back=options.decoder_look_back)[0]["text"]
                for i in range(batch)]

    def batched_round(r):
        return engine.process_batch(streams, [audio[i][r] for i in range(batch)], [False] * batch)

    def plain_round(r):
        return plain_engine.process_batch(plain_streams, [audio[i][r] for i in range(batch)], [False] * batch)

    identical = batched_round(0) == reference_round(0) == plain_round(0)
    batched, plain, ref, roofs = [], [], [], []
    for r in range(1, rounds + 1):
        roofs.append(matmul_gflops())
        wall, cpu, texts = timed(lambda: batched_round(r))
        batched.append((wall, cpu))
        plain_wall, _, plain_texts = timed(lambda: plain_round(r))
        plain.append(plain_wall)
        ref_wall, ref_cpu, ref_texts = timed(lambda: reference_round(r))
        ref.append((ref_wall, ref_cpu))
        identical &= texts == ref_texts == plain_texts
    with FlopCounterMode(display=False) as counter:
        plain_round(rounds + 1)
    flops = counter.get_total_flops()

    def median(values):
        return float(np.median(values))

    floors = [flops / (roof * 1e9) * 1000 for roof in roofs]
    # CPU time, not wall time: other processes share this machine's cores.
    fractions = [floor / cpu for floor, (_, cpu) in zip(floors, batched)]
    return Row(batch=batch, batched_wall_ms=median([w for w, _ in batched]),
               batched_cpu_ms=median([c for _, c in batched]), plain_wall_ms=median(plain),
               reference_wall_ms=median([w for w, _ in ref]),
               reference_cpu_ms=median([c for _, c in ref]), gflop_per_stream=flops / batch / 1e9,
               roof_gflops=median(roofs), floor_ms=median(floors), floor_fraction=median(fractions),
               identical_text=identical)


HEADER = ["batch", "batched ms / forward", "batched, nn.Linear ms", "prepacking speed-up",
          "FunASR ms (B streams in turn)", "speed-up", "batched CPU ms",
          "FunASR CPU ms", "stream-chunks / CPU-s batched", "stream-chunks / CPU-s FunASR", "CPU-s ratio",
          "GFLOP / stream-chunk", "GEMM roof GFLOP/s", "floor ms", "floor / batched CPU", "batched CPU / floor",
          "same text"]


def row_cells(row: Row) -> list[str]:
    return [str(row.batch), f"{row.batched_wall_ms:.1f}", f"{row.plain_wall_ms:.1f}", f"{row.prepack_speedup:.2f}x",
            f"{row.reference_wall_ms:.1f}", f"{row.speedup:.2f}x",
            f"{row.batched_cpu_ms:.1f}", f"{row.reference_cpu_ms:.1f}", f"{row.batched_streams_per_cpu_s:.2f}",
            f"{row.reference_streams_per_cpu_s:.2f}",
            f"{row.batched_streams_per_cpu_s / row.reference_streams_per_cpu_s:.2f}x",
            f"{row.gflop_per_stream:.2f}", f"{row.roof_gflops:.0f}", f"{row.floor_ms:.1f}", f"{row.floor_fraction:.0%}",
            f"{1 / row.floor_fraction:.2f}x",
            "yes" if row.identical_text else "NO"]


def write_results(rows: list[Row], out_dir: Path, context: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    (out_dir / "first_pass.md").write_text(f"# First pass: batched vs per-stream\n\n{context}\n\n"
                                           + "\n".join(table) + "\n", encoding="utf-8")
    with open(out_dir / "first_pass.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["batch", "batched_wall_ms", "batched_cpu_ms", "plain_linear_wall_ms", "reference_wall_ms",
                         "reference_cpu_ms", "gflop_per_stream_chunk", "roof_gflops", "floor_ms", "floor_fraction", "identical_text"])
        for r in rows:
            writer.writerow([r.batch, f"{r.batched_wall_ms:.3f}", f"{r.batched_cpu_ms:.3f}", f"{r.plain_wall_ms:.3f}",
                             f"{r.reference_wall_ms:.3f}", f"{r.reference_cpu_ms:.3f}", f"{r.gflop_per_stream:.4f}",
                             f"{r.roof_gflops:.1f}", f"{r.floor_ms:.3f}", f"{r.floor_fraction:.4f}", r.identical_text])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r.batch for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(batches, [r.batched_wall_ms for r in rows], "o-", label="batched (one forward)")
    left.plot(batches, [r.plain_wall_ms for r in rows], "^-", label="batched, nn.Linear")
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
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="comma-separated stream counts")
    parser.add_argument("--rounds", type=int, default=3, help="timed chunks per stream (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="full-size random Paraformer (built here if missing)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in batches) or args.rounds < 1 or args.threads < 1:
        parser.error("batches, --rounds and --threads must be positive")

    torch.set_num_threads(args.threads)
    from funasr import AutoModel

    from twopass_asr.batched_paraformer import BatchedStreamingParaformer

    model_dir = ensure_model(args.model_dir)
    engine = BatchedStreamingParaformer(model_dir)
    plain_engine = BatchedStreamingParaformer(model_dir, prepack=False)
    reference = AutoModel(model=str(model_dir), disable_update=True, disable_pbar=True, disable_log=True,
                          ncpu=args.threads)
    context = (f"full-size random Paraformer ({sum(p.numel() for p in plain_engine.model.parameters()) / 1e6:.0f}M "
               f"parameters), chunk_size [0,10,5], look-back 4/1, 600 ms chunks, {args.threads} torch thread(s), "
               f"float32 GEMM roof measured (2048^3 matmul, best of 3) before each timed forward, "
               f"median of {args.rounds} rounds")
    print(context, flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        row = bench_batch(engine, plain_engine, reference, batch, args.rounds, rng)
        rows.append(row)
        print(" | ".join(f"{h}: {c}" for h, c in zip(HEADER, row_cells(row))), flush=True)
    write_results(rows, args.out, context)
    print(f"wrote {args.out / 'first_pass.md'}, .csv and .png", flush=True)
    return 0 if all(r.identical_text for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
