"""Memory of the service: the memory of every process of tritonserver's tree once the models
have loaded, for each precision profile, as RSS (resident pages, counting a page shared by
several processes, such as torch's libraries, in each of them) and PSS (each shared page
split between the processes that map it: the sum over processes is the physical memory the
service holds).

    python -m perf.memory --store .model_store-full [--profiles auto,fp32,int8]

Each profile starts its own tritonserver on the store (both passes in that precision: auto
as each chooses on this machine, fp32 or int8), waits until it is ready and a few seconds more,
reads every process's RSS and PSS (psutil) and stops it.
Writes perf/results/memory.{md,json}; the first line printed names the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil

from perf.bench_args import PROFILES, comma_choices, profile_environment
from twopass_asr import REPO_ROOT
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.serving.triton_launcher import TritonServer

SETTLE_S = 5.0  # after ready: vLLM's processes finish warming up


def process_name(process: psutil.Process) -> str:
    """tritonserver, stub:<model> for a Python-backend stub, else the process's own name."""
    command = process.cmdline()
    if command and command[0].endswith("triton_python_backend_stub") and len(command) > 1:
        return f"stub:{Path(command[1]).parent.parent.name}"
    return process.name()


KINDS = ("rss", "pss")


def tree_memory_mb(root_pid: int) -> dict[str, dict[str, float]]:
    """RSS and PSS in MiB by process name over a process and all its descendants."""
    root = psutil.Process(root_pid)
    usage: dict[str, dict[str, float]] = {}
    for process in [root] + root.children(recursive=True):
        try:
            name, info = process_name(process), process.memory_full_info()
        except psutil.Error:
            continue  # exited meanwhile
        totals = usage.setdefault(name, dict.fromkeys(KINDS, 0.0))
        for kind in KINDS:
            totals[kind] += getattr(info, kind) / 2**20
    return usage


def measure(store: Path, profile: str, log_dir: Path) -> dict[str, dict[str, float]]:
    with TritonServer(store, log_path=log_dir / f"memory-{profile}.log", env=profile_environment(profile)) as server:
        time.sleep(SETTLE_S)
        return tree_memory_mb(server.process.pid)


def markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    names = sorted({name for usage in results.values() for name in usage})
    columns = [(profile, kind) for profile in results for kind in KINDS]
    lines = ["| process | " + " | ".join(f"{profile} {kind.upper()} MB" for profile, kind in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in names:
        cells = (results[profile].get(name, {}).get(kind, 0.0) for profile, kind in columns)
        lines.append(f"| {name} | " + " | ".join(f"{value:.0f}" for value in cells) + " |")
    totals = (sum(usage[kind] for usage in results[profile].values()) for profile, kind in columns)
    lines.append("| total | " + " | ".join(f"{value:.0f}" for value in totals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="model store the service serves")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated: auto, fp32 and/or int8")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results")
    args = parser.parse_args(argv)
    profiles = comma_choices(parser, "--profiles", args.profiles, PROFILES)
    if not args.store.is_dir():
        parser.error(f"--store {args.store} is not a directory")
    cpu = cpu_summary()
    print(cpu, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for profile in profiles:
        print(f"[memory] {profile}: starting tritonserver", flush=True)
        results[profile] = measure(args.store.resolve(), profile, args.out)
    table = markdown(results)
    (args.out / "memory.md").write_text(f"# Service memory after load (RSS and PSS)\n\n{cpu}\n\n{table}\n")
    (args.out / "memory.json").write_text(json.dumps({"cpu": cpu, "memory_mb": results}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
