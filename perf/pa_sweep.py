"""perf_analyzer concurrency sweep over the Triton models; saves each run's CSV and a
summary table (Markdown + CSV) under --out.

    # against a running server (e.g. started by scripts/serve.sh)
    python -m perf.pa_sweep --triton-url 127.0.0.1:8001 --concurrency 1,2,4,8,16
    # or let it start tritonserver on a model store
    python -m perf.pa_sweep --start-server --store .model_store --concurrency 1,4,8

Input data comes from perf.pa_inputs (synthesised speech unless --inputs is given).
On our 2-core machines perf_analyzer's default stability check rarely converges: the
default here is count windows with 25 % stability; --request-count N makes the windows N
requests long and accepts any stability (quick smoke runs).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

from twopass_asr import REPO_ROOT
from twopass_asr.serving.triton_launcher import TritonServer

PERF_ANALYZER = REPO_ROOT / "tools" / "bin" / "perf_analyzer"
MODELS = ("vad", "paraformer_streaming", "funasr_nano_vllm")
SUMMARY_COLUMNS = ["model", "concurrency", "infer/s", "p50 ms", "p95 ms", "p99 ms", "server queue ms", "server compute ms"]


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer links libcudart even on CPU; the pip CUDA runtime provides it."""
    import nvidia.cuda_runtime

    lib = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH")) if p)
    return env


def is_decoupled(url: str, model: str) -> bool:
    """Whether the served model answers on gRPC streams only (perf_analyzer --streaming)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
    return bool(config.get("model_transaction_policy", {}).get("decoupled", False))


def perf_analyzer_command(model: str, url: str, input_data: Path, concurrency: int, csv_path: Path,
                          request_count: int | None, decoupled: bool) -> list[str]:
    cmd = [str(PERF_ANALYZER), "-i", "grpc", "-u", url, "-m", model, "--input-data", str(input_data),
           "--concurrency-range", f"{concurrency}:{concurrency}", "--percentile", "95", "-f", str(csv_path)]
    if request_count:
        # A quick measurement: small count windows, any stability. (perf_analyzer 2.51's own
        # --request-count stops mid-sequence and then fails with "must specify the START flag".)
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(request_count),
                "--stability-percentage", "999", "--max-trials", "3"]
    else:
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", "100",
                "--stability-percentage", "25", "--max-trials", "10"]
    if decoupled:
        cmd.append("--streaming")
    return cmd


def summarise(model: str, csv_path: Path) -> dict:
    with open(csv_path, newline="") as f:
        row = next(csv.DictReader(f))
    ms = lambda key: float(row[key]) / 1000.0  # noqa: E731 - the CSV is in microseconds
    return {
        "model": model,
        "concurrency": int(row["Concurrency"]),
        "infer/s": float(row["Inferences/Second"]),
        "p50 ms": ms("p50 latency"),
        "p95 ms": ms("p95 latency"),
        "p99 ms": ms("p99 latency"),
        "server queue ms": ms("Server Queue"),
        "server compute ms": ms("Server Compute Infer"),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep(url: str, models: list[str], inputs: dict[str, Path], concurrencies: list[int], out: Path,
          request_count: int | None) -> list[dict]:
    env = perf_analyzer_env()
    rows = []
    for model in models:
        decoupled = is_decoupled(url, model)
        for concurrency in concurrencies:
            csv_path = out / f"{model}_c{concurrency}.csv"
            print(f"[pa_sweep] {model} concurrency {concurrency} ...", flush=True)
            result = subprocess.run(
                perf_analyzer_command(model, url, inputs[model], concurrency, csv_path, request_count, decoupled),
                env=env, capture_output=True, text=True,
            )
            (out / f"{model}_c{concurrency}.log").write_text(result.stdout + result.stderr)
            if result.returncode != 0 or not csv_path.exists():
                tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
                print(f"[pa_sweep]   failed: {' | '.join(tail)}", flush=True)
                continue
            rows.append(summarise(model, csv_path))
            print(f"[pa_sweep]   {rows[-1]['infer/s']:.1f} infer/s, p95 {rows[-1]['p95 ms']:.1f} ms", flush=True)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.md").write_text(markdown_table(rows) + "\n")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-url", default="127.0.0.1:8001")
    parser.add_argument("--start-server", action="store_true", help="start tritonserver on --store")
    parser.add_argument("--store", type=Path, default=None, help="model store for --start-server")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--inputs", type=Path, default=None, help="directory written by perf/pa_inputs.py")
    parser.add_argument("--synthesise", type=int, default=4, help="speech files to synthesise when --inputs is not given")
    parser.add_argument("--request-count", type=int, default=None, help="quick run: windows of N requests, any stability")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results" / "pa")
    args = parser.parse_args(argv)
    if not PERF_ANALYZER.exists():
        parser.error(f"{PERF_ANALYZER} is missing: run scripts/setup.sh")
    args.out.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    if args.inputs is None:
        from perf.pa_inputs import synthesised_wavs, write_inputs

        inputs = write_inputs(synthesised_wavs(args.synthesise), args.out / "inputs")
    else:
        inputs = {m: args.inputs / f"{m}.json" for m in models}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.start_server:
        with TritonServer(args.store, log_path=args.out / "tritonserver.log") as server:
            rows = sweep(server.grpc_url, models, inputs, concurrencies, args.out, args.request_count)
    else:
        rows = sweep(args.triton_url, models, inputs, concurrencies, args.out, args.request_count)
    print(markdown_table(rows))
    return 0 if len(rows) == len(models) * len(concurrencies) else 1


if __name__ == "__main__":
    sys.exit(main())
