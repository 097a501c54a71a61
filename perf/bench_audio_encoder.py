"""The Nano's audio encoder + adaptor by precision and int8 kernel: what one pass over B
segments costs as the second pass runs it (NanoRecognizer.embed_prepared, the call its
embedding batcher makes), and how far each int8 kernel's prompts are from float32's.

Engines: float32 as the service runs FunASR's layers (weights prepacked), and int8 on every
kernel this CPU runs: onnxruntime (FunASR's recipe, unfused), fbgemm and oneDNN per token (the
layers' per-row work in C passes) and the compiled kernel (each stack of layers one native
call, its rows shared among the threads). Each round times every engine once, in turn, over the
same B segments; the median of the rounds is reported, after one warm-up round.

    .venv/bin/python -m perf.bench_audio_encoder [--model-dir .model_store-full/funasr_nano]
        [--batches 1,8] [--seconds 5] [--rounds 5] [--threads 2]

Writes perf/results/audio_encoder.{md,csv,png}; the first line printed names the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import sys
import time
from pathlib import Path

import torch

from perf.bench_args import add_batch_arguments, batch_counts
from perf.bench_second_pass import DEFAULT_MODEL_DIR, make_segments
from perf.metrics import percentile
from perf.plots import save_log_log_lines
from twopass_asr import REPO_ROOT
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.kernels.int8_recipe import int8_kernels_on_this_cpu
from twopass_asr.second_pass.recognizer import NanoRecognizer, NanoRequest

DEFAULT_OUT = REPO_ROOT / "perf" / "results"
FLOAT32 = "fp32"


def load_engines(model_dir: Path) -> dict[str, NanoRecognizer]:
    """float32 and each int8 kernel this CPU runs, their LLM layers released (only the token
    table the prompts are built from is kept). A kernel the model cannot take is left out, and
    said so."""
    settings = {FLOAT32: dict(encoder_precision="fp32")}
    settings.update({f"int8 {kernel}": dict(encoder_precision="int8", encoder_int8_kernel=kernel)
                     for kernel in int8_kernels_on_this_cpu()})
    engines = {}
    for name, setting in settings.items():
        try:
            # FunASR prints a line per CTC tensor a checkpoint lacks.
            with contextlib.redirect_stdout(io.StringIO()):
                engine = NanoRecognizer(model_dir, **setting)
        except ValueError as error:
            print(f"{name}: left out ({error})", flush=True)
            continue
        engine.release_generation_layers()
        engines[name] = engine
    return engines


def time_batch(engines: dict[str, NanoRecognizer], batch: int, seconds: float, rounds: int
               ) -> tuple[dict[str, float], dict[str, float]]:
    """Per engine: the median ms of one pass over `batch` segments, and the largest relative
    error of a segment's prompt from float32's."""
    prepared = [engines[FLOAT32].prepare(NanoRequest(pcm)) for pcm in make_segments(batch, seconds, seed=11)]
    timings: dict[str, list[float]] = {name: [] for name in engines}
    prompts = {}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, engine in engines.items():
            begin = time.perf_counter()
            prompts[name] = engine.embed_prepared(prepared)
            if round_index:
                timings[name].append((time.perf_counter() - begin) * 1000)
    reference = prompts[FLOAT32]
    errors = {name: max(float((got - want).norm() / want.norm()) for got, want in zip(prompts[name], reference))
              for name in engines}
    return {name: percentile(values, 50) for name, values in timings.items()}, errors


def write_results(names: list[str], rows: list[tuple[int, dict, dict]], out_dir: Path, context: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["segments"] + [f"{name} ms" for name in names] + [f"{name} vs fp32" for name in names[1:]] \
        + [f"{name} prompt error" for name in names[1:]]
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for batch, ms, errors in rows:
        table.append("| " + " | ".join([str(batch)] + [f"{ms[n]:.1f}" for n in names]
                                       + [f"{ms[FLOAT32] / ms[n]:.2f}x" for n in names[1:]]
                                       + [f"{errors[n]:.1e}" for n in names[1:]]) + " |")
    text = f"# The Nano's audio encoder + adaptor by kernel\n\n{context}\n\n" + "\n".join(table) + "\n"
    (out_dir / "audio_encoder.md").write_text(text, encoding="utf-8")
    with open(out_dir / "audio_encoder.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["segments"] + [f"{n} ms" for n in names] + [f"{n} prompt error" for n in names[1:]])
        for batch, ms, errors in rows:
            writer.writerow([batch] + [f"{ms[n]:.3f}" for n in names] + [f"{errors[n]:.3e}" for n in names[1:]])

    batches = [batch for batch, _, _ in rows]
    save_log_log_lines(out_dir / "audio_encoder.png", batches,
                       {name: [ms[name] for _, ms, _ in rows] for name in names}, xlabel="segments in one pass",
                       ylabel="ms per pass", title="The Nano's audio encoder + adaptor", context=context)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_batch_arguments(parser, batches="1,8", rounds=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each segment")
    parser.add_argument("--threads", type=int, default=2, help="torch's threads (the native layers use as many)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    batches = batch_counts(parser, args)
    if args.seconds <= 0 or args.threads < 1:
        parser.error("--seconds and --threads must be positive")
    if not (args.model_dir / "model.pt").is_file():
        sys.exit(f"{args.model_dir} has no model.pt; build it with: python -m twopass_asr.store.prepare "
                 "--store .model_store-full --random full")
    cpu = cpu_summary()
    print(f"CPU: {cpu}", flush=True)
    torch.set_num_threads(args.threads)
    engines = load_engines(args.model_dir)
    names = list(engines)
    context = (f"CPU {cpu}; {args.model_dir.name}, {args.seconds:g} s segments, {args.threads} thread(s), "
               f"median of {args.rounds} rounds; prompt error: the largest relative error of a segment's "
               f"prompt from float32's")
    print(context, flush=True)
    rows = []
    for batch in batches:
        ms, errors = time_batch(engines, batch, args.seconds, args.rounds)
        rows.append((batch, ms, errors))
        print(f"{batch} segment(s): " + ", ".join(f"{n} {ms[n]:.1f} ms" for n in names), flush=True)
    print(write_results(names, rows, args.out, context), flush=True)
    print(f"wrote {args.out / 'audio_encoder.md'}, .csv and .png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
