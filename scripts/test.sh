#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite against real processes.
# Extra arguments go to pytest (e.g. -k vad, -m "not browser").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_CACHE_ROOT="$PWD/.cache/vllm"
# Two workers, each given whole test files (their module fixtures and servers stay together):
# much of the suite waits on server starts and real-time audio, which leaves a core free.
# More workers than cores only slow each other; -n 0 (after these) runs in one process.
workers=${TWOPASS_ASR_TEST_WORKERS:-$(( $(nproc) < 2 ? 1 : 2 ))}
exec .venv/bin/python -m pytest -v -ra -n "$workers" --dist loadfile "$@"
