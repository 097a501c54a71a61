"""Two-pass streaming speech recognition: the models' logic, importable without Triton."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
