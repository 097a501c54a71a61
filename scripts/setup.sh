#!/usr/bin/env bash
# Idempotent setup of everything the service and its tests need, on a fresh Debian 12 machine
# of our kind (CPU, Python 3.11). Safe to run again: finished steps are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${TWOPASS_ASR_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }

# gcc and libc6-dev: the C compiler the int8 row kernels are built with at load
# (twopass_asr/kernels/row_kernels.py).
apt_packages=(espeak-ng sox libb64-0d chromium gcc libc6-dev)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt: installing ${missing[*]}"
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

stamp=$VENV/.twopass-lock
lock_hash=$(cat requirements/*.txt requirements/*.in | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_hash" ]; then
  [ -x "$VENV/bin/python" ] || { log "creating virtual environment $VENV"; "$PY" -m venv "$VENV"; }
  log "pip: uv and torch==2.13.0 (CPU build) first"
  "$VENV/bin/python" -m pip install -q uv
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  log "uv: the locked environment (requirements/lock.txt)"
  # --no-deps: the lock is complete; resolving again would hit the numpy<2 vs opencv conflict.
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" --no-deps -r requirements/lock.txt
  # Its declared dependencies pin old numpy/onnxruntime; we only need its VAD weights.
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" --no-deps -r requirements/no-deps.txt
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" --no-deps -e .
  echo "$lock_hash" > "$stamp"
else
  log "virtual environment up to date"
fi

# The Python backend needs the stub built for the venv's Python next to libtriton_python.so.
TRITON=$("$VENV/bin/python" -c "import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / 'tritonserver')")
pyver=$("$VENV/bin/python" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
stub_src=$TRITON/python_backend_stubs/$pyver/triton_python_backend_stub
stub_dst=$TRITON/backends/python/triton_python_backend_stub
if ! cmp -s "$stub_src" "$stub_dst"; then
  log "tritonserver: python backend stub for Python $pyver"
  cp "$stub_src" "$stub_dst"
fi

# perf_analyzer: the newest build that runs on glibc 2.36 ships inside tritonclient 2.51.0.
mkdir -p tools/bin
if [ ! -x tools/bin/perf_analyzer ]; then
  log "perf_analyzer from the tritonclient 2.51.0 wheel"
  tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download -q --no-deps tritonclient==2.51.0 -d "$tmp"
  unzip -q -o -j "$tmp"/tritonclient-2.51.0-*.whl 'tritonclient-2.51.0.data/data/bin/perf_analyzer' -d tools/bin
  chmod +x tools/bin/perf_analyzer
  rm -rf "$tmp"
fi
log "setup complete"
