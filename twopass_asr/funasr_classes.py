"""FunASR's model classes without importing all of FunASR.

`import funasr` imports every module of the package (its __init__ walks them all so that each
registers its classes by name): 300-440 MB more memory in the VAD's and the first pass's
processes (perf/RESULTS.md, 2026-12-02, session 4), where one model directory needs a few. A
served model's process calls `use_light_funasr` before anything imports funasr: the package is
then set up without that walk, and `funasr_automodel` registers the classes a directory's
config.yaml names before building it.

Which class a name stands for is what the whole-package import makes it: a name registered by
several modules goes to the one registered last, and that order follows the package's import
dependencies, not file names. So the registry of the whole import is read once, in a
subprocess, kept in the export cache (per FunASR version and installation), and the classes a
config names are put in the registry exactly as it has them. Elsewhere (tests, tools) FunASR is
imported whole, which registers everything itself.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import yaml

from twopass_asr.store.export_cache import default_cache_root

# What funasr/__init__.py exports lazily.
_LAZY_EXPORTS = {"AutoModel": "funasr.auto.auto_model", "AutoFrontend": "funasr.auto.auto_frontend"}
# Prints {table: {name: [module, qualified name]}} of the whole package's registry.
_DUMP_REGISTRY = """
import contextlib, io, json
with contextlib.redirect_stdout(io.StringIO()):
    import funasr
from funasr.register import tables
registry = {table: {name: [cls.__module__, cls.__qualname__] for name, cls in getattr(tables, table).items()}
            for table in dir(tables) if table.endswith("_classes")}
print(json.dumps(registry))
"""


def _package_spec() -> importlib.machinery.ModuleSpec:
    spec = importlib.util.find_spec("funasr")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("FunASR is not installed (pip install funasr)")
    return spec


def _package_root() -> Path:
    return Path(list(_package_spec().submodule_search_locations)[0])


def use_light_funasr() -> bool:
    """Make `funasr` the package without its import-everything __init__, unless it is
    imported already. Returns whether it did."""
    if "funasr" in sys.modules:
        return False
    spec = _package_spec()
    root = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("funasr")
    package.__spec__ = spec  # never executed: __init__ stays unrun
    package.__path__ = [str(root)]
    package.__file__ = str(root / "__init__.py")
    package.__version__ = (root / "version.txt").read_text().strip()

    def lazy_export(name: str):
        if name not in _LAZY_EXPORTS:
            raise AttributeError(f"module 'funasr' has no attribute {name!r}")
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)

    package.__getattr__ = lazy_export
    package.twopass_light = True
    sys.modules["funasr"] = package
    return True


def whole_registry(cache_root: Path | None = None) -> dict[str, dict[str, list[str]]]:
    """{table: {name: [module, qualified name]}} as `import funasr` leaves FunASR's registry;
    read from the cache, or made once by a subprocess that imports FunASR whole."""
    root = _package_root()
    version = (root / "version.txt").read_text().strip()
    installation = hashlib.sha256(f"{root}:{(root / '__init__.py').stat().st_mtime_ns}".encode()).hexdigest()[:12]
    path = (cache_root or default_cache_root()) / f"funasr_registry-{version}-{installation}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = subprocess.run([sys.executable, "-c", _DUMP_REGISTRY], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise ImportError(f"importing FunASR to read its registry failed: {result.stderr[-2000:]}")
    registry = json.loads(result.stdout.strip().splitlines()[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: the models' processes may make it at the same time.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(registry, handle)
    os.replace(handle.name, path)
    return registry


def _names(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_names(item) for item in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*(_names(item) for item in value))
    return set()


def register_classes_of(config: dict) -> None:
    """Put in FunASR's registry, under every name `config` (a parsed config.yaml) mentions,
    the class the whole-package import registers under it; and under the names FunASR derives
    from those by a suffix (its export looks up "<encoder>Export", "<decoder>OnlineExport").
    Where FunASR is (or now gets) imported whole, its registry is complete already."""
    import funasr
    from funasr.register import tables

    if not getattr(funasr, "twopass_light", False):
        return
    registry = whole_registry()
    named = _names(config) & {name for classes in registry.values() for name in classes}
    chosen = []
    for table, classes in registry.items():
        for name in (name for name in classes if name.startswith(tuple(named))):
            module, qualified = classes[name]
            target: Any = importlib.import_module(module)
            for part in qualified.split("."):
                target = getattr(target, part)
            chosen.append((table, name, target))
    # Only after every import: an import registers its own classes, maybe over a chosen one.
    for table, name, target in chosen:
        if not hasattr(tables, table):
            setattr(tables, table, {})
        getattr(tables, table)[name] = target


def funasr_automodel(model_dir: str | Path, **kwargs):
    """funasr.AutoModel for a model directory, its classes registered first. AutoModel sets the
    calling thread's torch thread count to its `ncpu` (4 unless given); unless told otherwise it
    gets the caller's own count, so loading a model never changes how the caller computes (what
    prepacked_linear's auto kernel reads, for one)."""
    import torch

    with open(Path(model_dir) / "config.yaml", encoding="utf-8") as handle:
        register_classes_of(yaml.safe_load(handle) or {})
    from funasr import AutoModel

    kwargs.setdefault("ncpu", torch.get_num_threads())
    return AutoModel(model=str(model_dir), **kwargs)


__all__ = ["funasr_automodel", "register_classes_of", "use_light_funasr", "whole_registry"]
