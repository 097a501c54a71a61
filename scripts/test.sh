#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite against real processes.
# Extra arguments go to pytest (e.g. -k vad, -m "not browser").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_CACHE_ROOT="$PWD/.cache/vllm"
exec .venv/bin/python -m pytest -v -ra "$@"
