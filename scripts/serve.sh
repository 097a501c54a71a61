#!/usr/bin/env bash
# Set everything up (idempotent) and serve: tritonserver + WebSocket frontend on :10095.
# Extra arguments go to `python -m twopass_asr.serving.serve` (e.g. --random full, --certfile/--keyfile).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m twopass_asr.serving.serve "$@"
