"""The package's dependencies point one way: no import circle inside twopass_asr, and what
serves requests (the Triton models, the frontend, twopass_asr.serving) never reaches the
random-weight builders, which only make model directories."""

from __future__ import annotations

import ast
from pathlib import Path

from twopass_asr import REPO_ROOT

RANDOM_BUILDERS = {"twopass_asr.store.random_nano", "twopass_asr.store.random_paraformer"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` names a module; `from module import name` does not.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (REPO_ROOT / "twopass_asr").rglob("*.py")}
    files |= {module_name(p): p for p in (REPO_ROOT / "frontend").glob("*.py")}
    files |= {f"model_repository.{p.parts[-3]}": p for p in (REPO_ROOT / "model_repository").glob("*/1/model.py")}
    known = set(files)
    return {name: project_imports(path, known) - {name} for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_sees_the_layout():
    graph = import_graph()
    assert "twopass_asr.first_pass.options" in graph["twopass_asr.first_pass.batched"]
    assert "twopass_asr.store.nano_dir" in graph["twopass_asr.store.random_nano"]
    assert "twopass_asr.serving.triton_models" in graph["model_repository.paraformer_streaming"]


def test_no_import_circle_in_the_package():
    graph = import_graph()
    circles = [name for name in graph if name.startswith("twopass_asr") and name in reachable(graph, name)]
    assert not circles, f"modules that import themselves through others: {circles}"


def test_serving_code_never_reaches_the_random_builders():
    graph = import_graph()
    serving = [name for name in graph
               if name.startswith(("model_repository.", "frontend", "twopass_asr.serving", "twopass_asr.first_pass",
                                   "twopass_asr.vad", "twopass_asr.second_pass"))]
    assert len(serving) > 20
    leaks = {name: sorted(reachable(graph, name) & RANDOM_BUILDERS) for name in serving}
    assert not {name: found for name, found in leaks.items() if found}
