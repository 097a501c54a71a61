"""The export cache: one build per source and dependency, a changed source gets a fresh
export, and a failed or partial build never counts as an export."""

from __future__ import annotations

import os

import pytest

from twopass_asr.store.export_cache import cached_export


def exporter(builds: list[str]):
    def build(directory):
        builds.append(directory.name)
        (directory / "weights").write_text("exported")

    return build


def complete(directory):
    return (directory / "weights").is_file()


def test_one_build_per_source_and_dependency(tmp_path):
    source = tmp_path / "model.pt"
    source.write_text("v1")
    root, builds = tmp_path / "cache", []
    first = cached_export(source, "config A", root, complete, exporter(builds))
    assert (first / "weights").read_text() == "exported" and len(builds) == 1
    assert cached_export(source, "config A", root, complete, exporter(builds)) == first and len(builds) == 1
    other = cached_export(source, "config B", root, complete, exporter(builds))
    assert other != first and len(builds) == 2
    # A replaced checkpoint (new size or time) is exported again, not served stale.
    source.write_text("v2, longer")
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert cached_export(source, "config A", root, complete, exporter(builds)) not in (first, other)
    assert len(builds) == 3
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".export-")) == []


def test_failed_and_partial_builds_leave_no_export(tmp_path):
    source = tmp_path / "model.pt"
    source.write_text("v1")
    root = tmp_path / "cache"

    def broken(directory):
        (directory / "half").write_text("x")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        cached_export(source, "", root, complete, broken)
    assert list(root.iterdir()) == []
    builds = []
    target = cached_export(source, "", root, complete, exporter(builds))
    (target / "weights").unlink()  # left incomplete, say by an interrupted older version
    (target / "stray").write_text("x")
    assert cached_export(source, "", root, complete, exporter(builds)) == target and len(builds) == 2
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
