"""The first pass's matrix products by kernel on this CPU: what int8 can gain over float32
before anything else in a round is counted.

Each distinct shape of the streaming Paraformer encoder's linear layers that FunASR's int8
recipe quantizes is timed at several row counts (a stream's 600 ms chunk is 20 encoder
frames at chunk_size [5, 10, 5], so B streams in one round are 20 x B rows), on every kernel
this CPU runs: float32 on MLAS and on oneDNN (weights packed once, as the float32 engine
runs them), int8 per token on fbgemm and, with AMX, on oneDNN (the per-row work in C
where a compiler is at hand, as the fused encoder runs them) and on the compiled kernel (its own
per-row work, as the native encoder runs it), and int8 as FunASR's own recipe on onnxruntime.
The encoder's products of one round are the sum over its layers.

    .venv/bin/python -m perf.bench_linear [--rows 20,160,460] [--repeats 20] [--threads 1]

Writes perf/results/linear_kernels.{md,csv,png}; the first line printed names the CPU.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from perf.bench_first_pass import DEFAULT_MODEL_DIR, ensure_model
from perf.metrics import percentile
from perf.plots import save_log_log_lines
from twopass_asr import REPO_ROOT
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.kernels.int8_recipe import int8_kernels_on_this_cpu, stays_float

DEFAULT_OUT = REPO_ROOT / "perf" / "results"
FRAMES_PER_STREAM = 20  # encoder rows of one stream's chunk at chunk_size [5, 10, 5]
Shape = tuple[int, int, bool]  # in_features, out_features, has a bias
FLOAT32_KERNELS = {"mlas": "float32 MLAS", "onednn": "float32 oneDNN"}  # prepacked_linear's kernels


def encoder_shapes(model_dir: Path) -> Counter[Shape]:
    """How many of the encoder's int8-quantized linear layers have each shape."""
    from twopass_asr.funasr_classes import funasr_automodel

    encoder = funasr_automodel(model_dir, disable_update=True, disable_pbar=True, disable_log=True).model.encoder
    return Counter((layer.in_features, layer.out_features, layer.bias is not None)
                   for name, layer in encoder.named_modules()
                   if type(layer) is torch.nn.Linear and not stays_float(f"encoder.{name}"))


def kernel_products(linear: torch.nn.Linear) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each kernel's product for `linear`, over rows [rows, in_features]."""
    from twopass_asr.kernels.int8_linear import quantize_linear_layers, stream_rows
    from twopass_asr.kernels.prepacked_linear import MlasLinear, OneDnnLinear, mlas_available, onednn_available
    from twopass_asr.kernels.row_kernels import row_kernels
    from twopass_asr.kernels.tokenwise_int8 import TokenwiseInt8Linear

    products: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if mlas_available():
        products[FLOAT32_KERNELS["mlas"]] = MlasLinear(linear)
    if onednn_available():
        products[FLOAT32_KERNELS["onednn"]] = OneDnnLinear(linear)
    kernels = row_kernels()
    for kernel in int8_kernels_on_this_cpu():
        if kernel == "onnxruntime":
            holder = torch.nn.Sequential(linear)
            quantize_linear_layers(holder, rows="frames")

            def recipe(rows, layer=holder[0]):
                with stream_rows(frames=[rows.shape[0]]):
                    return layer(rows.unsqueeze(0))

            products["int8 onnxruntime (FunASR's recipe)"] = recipe
            continue
        layer = TokenwiseInt8Linear(linear, kernel)
        if kernels is None or kernel == "compiled":  # the compiled product does its per-row work itself
            products[f"int8 {kernel}"] = layer
        else:
            products[f"int8 {kernel}"] = lambda rows, layer=layer: layer.product_with_row_kernels(rows, kernels)
    return products


def median_us(product: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        product(rows)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(rows)
        times.append((time.perf_counter() - start) * 1e6)
    return percentile(times, 50)


def measure(shapes: Counter[Shape], row_counts: list[int], repeats: int) -> dict[tuple[int, Shape], dict[str, float]]:
    """µs of one product, per (rows, shape) and kernel."""
    torch.manual_seed(0)
    timings = {}
    for shape in shapes:
        in_features, out_features, bias = shape
        products = kernel_products(torch.nn.Linear(in_features, out_features, bias=bias))
        with torch.inference_mode():
            for rows in row_counts:
                x = torch.randn(rows, in_features)
                timings[rows, shape] = {name: median_us(product, x, repeats) for name, product in products.items()}
                print(f"{rows} rows, {in_features}x{out_features}: "
                      + ", ".join(f"{name} {us:.0f} µs" for name, us in timings[rows, shape].items()), flush=True)
    return timings


def encoder_totals_ms(shapes: Counter[Shape], timings: dict, rows: int) -> dict[str, float]:
    """The encoder's products of one round at `rows` rows, per kernel."""
    kernels = next(iter(timings.values())).keys()
    return {kernel: sum(count * timings[rows, shape][kernel] for shape, count in shapes.items()) / 1000
            for kernel in kernels}


def write_results(shapes: Counter[Shape], timings: dict, row_counts: list[int], out_dir: Path, context: str) -> str:
    from twopass_asr.kernels.prepacked_linear import choose_kernel

    out_dir.mkdir(parents=True, exist_ok=True)
    kernels = list(next(iter(timings.values())))
    totals = {rows: encoder_totals_ms(shapes, timings, rows) for rows in row_counts}
    reference = FLOAT32_KERNELS[choose_kernel()]  # the float32 engine's, at this thread count
    int8 = [kernel for kernel in kernels if kernel.startswith("int8")]
    columns = ["rows", "shape (in x out)", "layers", *[f"{k} µs" for k in kernels],
               *[f"{reference} / {k}" for k in int8]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for rows in row_counts:
        for shape, count in shapes.items():
            t = timings[rows, shape]
            lines.append("| " + " | ".join([str(rows), f"{shape[0]} x {shape[1]}", str(count),
                                            *[f"{t[k]:.0f}" for k in kernels],
                                            *[f"{t[reference] / t[k]:.2f}x" for k in int8]]) + " |")
        total = totals[rows]
        lines.append("| " + " | ".join([str(rows), "**the encoder, one round (ms)**", str(sum(shapes.values())),
                                        *[f"{total[k]:.1f}" for k in kernels],
                                        *[f"**{total[reference] / total[k]:.2f}x**" for k in int8]]) + " |")
    table = "\n".join(lines)
    (out_dir / "linear_kernels.md").write_text(f"# The first pass's products by kernel\n\n{context}\n\n{table}\n",
                                               encoding="utf-8")
    with open(out_dir / "linear_kernels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["rows", "in_features", "out_features", "layers", *[f"{k} us" for k in kernels]])
        for (rows, shape), t in timings.items():
            writer.writerow([rows, shape[0], shape[1], shapes[shape], *[f"{t[k]:.1f}" for k in kernels]])

    save_log_log_lines(out_dir / "linear_kernels.png", row_counts,
                       {kernel: [totals[rows][kernel] for rows in row_counts] for kernel in kernels},
                       xlabel=f"rows ({FRAMES_PER_STREAM} per stream)",
                       ylabel="ms, the encoder's products of one round", title="The encoder's products by kernel",
                       context=context)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="20,160,460",
                        help=f"comma-separated rows per product ({FRAMES_PER_STREAM} per stream in a round)")
    parser.add_argument("--repeats", type=int, default=20, help="timed products per shape, rows and kernel (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="streaming Paraformer whose encoder gives the shapes (full-size random one built here "
                             "if missing)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    if min(row_counts) < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--rows, --repeats and --threads must be positive")

    cpu = cpu_summary()
    print(f"CPU: {cpu}", flush=True)
    torch.set_num_threads(args.threads)
    shapes = encoder_shapes(ensure_model(args.model_dir))
    context = (f"CPU {cpu}; the encoder's int8-quantized linear layers of {args.model_dir.name}, "
               f"{args.threads} thread(s), median of {args.repeats} products")
    print(context, flush=True)
    timings = measure(shapes, row_counts, args.repeats)
    print(write_results(shapes, timings, row_counts, args.out, context), flush=True)
    print(f"wrote {args.out / 'linear_kernels.md'}, .csv and .png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
