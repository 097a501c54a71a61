"""Exports derived from a model's weights (the Nano's LLM for vLLM, the Paraformer's int8
ONNX export), made once on first use and kept in a cache directory.

Each export lives under a key made of its source file's resolved path, size and
modification time, plus whatever else it depends on: the model store stays as the user
prepared it (it may be read-only), and a replaced checkpoint gets a fresh export instead of
a stale one. An export is built beside its place and renamed into it, so a crash or a
concurrent loader never leaves half a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from twopass_asr import REPO_ROOT

CACHE_ENV = "TWOPASS_ASR_EXPORT_CACHE"


def default_cache_root() -> Path:
    """$TWOPASS_ASR_EXPORT_CACHE, else the project's .cache/exports."""
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache" / "exports")


def cached_export(source: Path, depends_on: str, root: Path, complete: Callable[[Path], bool],
                  build: Callable[[Path], None]) -> Path:
    """The export of `source` under `root`: reused when `complete` says it is whole, else made
    by `build(directory)`. `depends_on`: anything besides the source file that changes it."""
    stat = source.stat()
    key = json.dumps([str(source.resolve()), stat.st_size, stat.st_mtime_ns, depends_on])
    target = root / hashlib.sha256(key.encode()).hexdigest()[:20]
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        build(staging)
        if target.exists() and not complete(target):  # left incomplete by an older version
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not complete(target):  # not a concurrent loader winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = ["CACHE_ENV", "cached_export", "default_cache_root"]
