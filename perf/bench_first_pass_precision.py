"""First pass by precision: the batched engine in float32 and in int8 on each of its kernels,
against FunASR's ONNX runtime per stream in float32 and int8, on the same speech.

B streams of synthesised speech (each starting at another offset) advance one 600 ms chunk
per round. Each round is timed for: the batched engine in float32 (linear weights packed for
MLAS); in int8 on onnxruntime (FunASR's own int8 export's layers), on fbgemm and, with VNNI
or AMX, on oneDNN (activations per token); and FunASR's ONNX runtime (funasr-onnx) on its
float32 and int8 export, the B streams one after another. All with chunk_size [5, 10, 5] and
no look-back, which is all FunASR's ONNX runtime has. Also reported: how many chunk texts each
int8 engine shares with FunASR's int8 runtime and with float32.

    .venv/bin/python -m perf.bench_first_pass_precision [--batches 1,2,4,8,16] [--rounds 3] [--threads 1]

Builds the full-size random Paraformer and its export under .cache/bench-models if missing.
Writes perf/results/first_pass_precision.{md,csv,png}; the first line printed names the CPU.
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
from perf.bench_first_pass import DEFAULT_MODEL_DIR, ensure_model
from perf.metrics import percentile
from perf.plots import save_log_log_lines
from twopass_asr import REPO_ROOT
from twopass_asr.first_pass.options import DecodeOptions
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.kernels.int8_recipe import int8_kernels_on_this_cpu

DEFAULT_OUT = REPO_ROOT / "perf" / "results"
OPTIONS = DecodeOptions(chunk_size=(5, 10, 5), encoder_look_back=0, decoder_look_back=0)
INT8_KERNELS = int8_kernels_on_this_cpu()
INT8_ENGINES = tuple(f"int8 batched {kernel}" for kernel in INT8_KERNELS)
ENGINES = ("float32 batched", *INT8_ENGINES, "FunASR ONNX float32", "FunASR ONNX int8")


@dataclass
class Row:
    batch: int
    wall_ms: dict[str, float]  # median time of one round (B stream-chunks) per engine
    cpu_ms: dict[str, float]
    matches_funasr_int8: dict[str, float]  # per int8 engine, the fraction of chunk texts
    matches_float32: dict[str, float]


def ensure_export(model_dir: Path, export_dir: Path) -> Path:
    from twopass_asr.store.funasr_onnx_export import export_paraformer_onnx, require_export
    from twopass_asr.store.model_store import ModelDirError

    try:  # both runtimes run here: the float32 files and the int8 ones
        return require_export(require_export(export_dir, quantized=False), quantized=True)
    except ModelDirError:
        pass
    print(f"exporting {model_dir} with FunASR's export to {export_dir} (a few minutes)", flush=True)
    return export_paraformer_onnx(model_dir, export_dir)


def speech(seconds: float) -> np.ndarray:
    from twopass_asr.speech_synth import ENGLISH_VOICE, MANDARIN_VOICE, speech_with_silences

    phrases = [("jin1 tian1 tian1 qi4 hen3 hao3", MANDARIN_VOICE),
               ("the quick brown fox jumps over the lazy dog", ENGLISH_VOICE),
               ("wo3 men5 qu4 gong1 yuan2 san4 bu4 ba5", MANDARIN_VOICE)]
    pcm = speech_with_silences(phrases, [300, 500, 400, 300])
    return np.tile(pcm, int(np.ceil(seconds * 16000 / len(pcm))))[: int(seconds * 16000)]


def bench_batch(engines: dict, batch: int, rounds: int, audio: np.ndarray) -> Row:
    step = OPTIONS.step_samples
    offsets = [i * 7 * step // 3 for i in range(batch)]  # streams at different positions
    chunks = [[audio[o + r * step: o + (r + 1) * step] for r in range(rounds + 1)] for o in offsets]
    streams = {name: [engine.new_stream(OPTIONS) for _ in range(batch)] for name, engine in engines.items()}

    def run(name: str, r: int) -> list[str]:
        engine, states = engines[name], streams[name]
        if name.startswith("FunASR"):  # its runtime takes one stream per call
            return [engine.process_batch([s], [chunks[i][r]], [False])[0] for i, s in enumerate(states)]
        return engine.process_batch(states, [c[r] for c in chunks], [False] * batch)

    walls: dict[str, list[float]] = {name: [] for name in engines}
    cpus: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, list[str]] = {name: [] for name in engines}
    for r in range(rounds + 1):  # round 0 warms up
        for name in engines:
            wall, cpu = time.perf_counter(), time.process_time()
            result = run(name, r)
            if r:
                walls[name].append((time.perf_counter() - wall) * 1000)
                cpus[name].append((time.process_time() - cpu) * 1000)
                texts[name] += [text.replace(" ", "") for text in result]

    def agreement(a: str, b: str) -> float:
        return float(np.mean([x == y for x, y in zip(texts[a], texts[b])]))

    return Row(batch, {name: percentile(values, 50) for name, values in walls.items()},
               {name: percentile(values, 50) for name, values in cpus.items()},
               {name: agreement(name, "FunASR ONNX int8") for name in INT8_ENGINES},
               {name: agreement(name, "float32 batched") for name in INT8_ENGINES})


def header() -> list[str]:
    return (["B"] + [f"{name} ms" for name in ENGINES]
            + [f"{kernel}: {column}" for kernel in INT8_KERNELS
               for column in ("vs float32 batched", "vs FunASR int8", "= FunASR int8 text", "= float32 text")])


def cells(row: Row) -> list[str]:
    wall = row.wall_ms
    return ([str(row.batch)] + [f"{wall[name]:.1f}" for name in ENGINES]
            + [cell for name in INT8_ENGINES
               for cell in (f"{wall['float32 batched'] / wall[name]:.2f}x",
                            f"{wall['FunASR ONNX int8'] / wall[name]:.2f}x",
                            f"{row.matches_funasr_int8[name]:.0%}", f"{row.matches_float32[name]:.0%}")])


def write_results(rows: list[Row], out_dir: Path, context: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = header()
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    (out_dir / "first_pass_precision.md").write_text(
        f"# First pass by precision\n\n{context}\n\n" + "\n".join(table) + "\n", encoding="utf-8")
    with open(out_dir / "first_pass_precision.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["batch"] + [f"{name} wall_ms" for name in ENGINES] + [f"{name} cpu_ms" for name in ENGINES]
                        + [f"{name} {column}" for name in INT8_ENGINES
                           for column in ("matches_funasr_int8", "matches_float32")])
        for r in rows:
            writer.writerow([r.batch] + [f"{r.wall_ms[n]:.3f}" for n in ENGINES]
                            + [f"{r.cpu_ms[n]:.3f}" for n in ENGINES]
                            + [f"{value:.4f}" for n in INT8_ENGINES
                               for value in (r.matches_funasr_int8[n], r.matches_float32[n])])

    batches = [r.batch for r in rows]
    save_log_log_lines(out_dir / "first_pass_precision.png", batches,
                       {name: [r.wall_ms[name] for r in rows] for name in ENGINES}, xlabel="streams",
                       ylabel="wall ms per 600 ms chunk round", title="Time to advance B streams by one chunk",
                       context=context, reference=(OPTIONS.step_samples / 16, "600 ms real time"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_batch_arguments(parser, batches="1,2,4,8,16", rounds=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="full-size random Paraformer (built here if missing)")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="FunASR's ONNX export of it (default: beside it, made here if missing)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    batches = batch_counts(parser, args)
    if args.threads < 1:
        parser.error("--threads must be positive")

    cpu = cpu_summary()
    print(f"CPU: {cpu}", flush=True)
    torch.set_num_threads(args.threads)
    from twopass_asr.first_pass.batched import BatchedStreamingParaformer
    from twopass_asr.first_pass.engines import FunasrOnnxStreamingParaformer

    model_dir = ensure_model(args.model_dir)
    export_dir = ensure_export(model_dir, args.export_dir or model_dir.with_name(model_dir.name + "-onnx"))
    engines = {
        "float32 batched": BatchedStreamingParaformer(model_dir),
        **{f"int8 batched {kernel}": BatchedStreamingParaformer(model_dir, precision="int8", int8_kernel=kernel,
                                                                int8_export=export_dir) for kernel in INT8_KERNELS},
        "FunASR ONNX float32": FunasrOnnxStreamingParaformer(export_dir, quantized=False, threads=args.threads),
        "FunASR ONNX int8": FunasrOnnxStreamingParaformer(export_dir, quantized=True, threads=args.threads),
    }
    context = (f"CPU {cpu}; full-size random Paraformer, chunk_size [5,10,5], no look-back, 600 ms chunks of "
               f"synthesised speech, {args.threads} thread(s), median of {args.rounds} rounds")
    print(context, flush=True)
    audio = speech((max(batches) * 7 / 3 + args.rounds + 2) * OPTIONS.step_samples / 16000)
    rows = []
    for batch in batches:
        rows.append(bench_batch(engines, batch, args.rounds, audio))
        print(" | ".join(f"{h}: {c}" for h, c in zip(header(), cells(rows[-1]))), flush=True)
    write_results(rows, args.out, context)
    print(f"wrote {args.out / 'first_pass_precision.md'}, .csv and .png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
