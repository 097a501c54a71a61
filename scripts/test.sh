#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite against real processes.
# Extra arguments go to pytest (e.g. -k vad, -m "not browser").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_CACHE_ROOT="$PWD/.cache/vllm"
# TWOPASS_ASR_TEST_WORKERS=2 runs two pytest-xdist workers, each given whole test files (their
# module fixtures and servers stay together): much faster, as much of the suite waits on server
# starts and real-time audio. Not the default: with both cores busy, tritonserver 2.51's Python
# backend faults (a lost model load, a SIGSEGV sending streamed deltas) surfaced (README, Tests).
workers=${TWOPASS_ASR_TEST_WORKERS:-1}
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile)
exec .venv/bin/python -m pytest -v -ra "${parallel[@]}" "$@"
