"""The serve command: prepares models, starts tritonserver and the frontend, answers on
the WebSocket port, and Ctrl-C (SIGINT) stops everything with no orphan processes."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from frontend.client import transcribe
from twopass_asr import REPO_ROOT
from twopass_asr.first_pass import options as first_pass_options
from twopass_asr.second_pass import precision as second_pass_precision
from twopass_asr.serving.serve import parse_args, precision_environment
from twopass_asr.serving.triton_launcher import free_port
from twopass_asr.store import model_store

pytestmark = pytest.mark.triton


def wait_for_page(port: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve exited early with code {process.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("the service did not come up")


def test_serve_answers_from_the_users_models_and_stops_cleanly_on_ctrl_c(test_models, speech_wav, tmp_path):
    """Served with its defaults from a store linked to a user's directories (here the test
    models): the models loaded are those directories, not random ones built in their place."""
    store = tmp_path / "store"
    mine = {name: (test_models / name).resolve() for name in (model_store.PARAFORMER, model_store.NANO)}
    subprocess.run([sys.executable, "-m", "twopass_asr.store.prepare", "--store", str(store),
                    "--paraformer-dir", str(mine[model_store.PARAFORMER]),
                    "--nano-dir", str(mine[model_store.NANO])], check=True)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "twopass_asr.serving.serve", "--store", str(store),
         "--host", "127.0.0.1", "--port", str(port), "--triton-http-port", str(free_port()),
         "--triton-grpc-port", str(free_port()), "--triton-metrics-port", str(free_port()),
         "--log-dir", str(tmp_path)],
        cwd=REPO_ROOT,
    )
    try:
        wait_for_page(port, process)
        descendants = psutil.Process(process.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in descendants)
        assert "tritonserver" in names and "frontend.server" in names
        triton_log = (tmp_path / "tritonserver.log").read_text(encoding="utf-8", errors="replace")
        for triton_model, name in (("paraformer_streaming", model_store.PARAFORMER),
                                   ("funasr_nano_vllm", model_store.NANO)):
            assert f"{triton_model}: loaded {store / name} -> {mine[name]}" in triton_log

        result = asyncio.run(transcribe(f"ws://127.0.0.1:{port}/", speech_wav.pcm, {"mode": "2pass"}))
        finals = [m for m in result.messages if m.get("is_final")]
        assert len(finals) == 1 and finals[0] is result.messages[-1]
        assert any(m["mode"] == "2pass-offline" and m["text"] for m in result.messages)

        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, f"orphans left behind: {[' '.join(p.cmdline()) for p in alive]}"
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_refuses_a_taken_port_at_once(tmp_path):
    """A port already in use is reported before any model is prepared or loaded."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "twopass_asr.serving.serve", "--store", str(tmp_path / "no-store"), "--random", "tiny",
             "--host", "127.0.0.1", "--port", str(free_port()), "--triton-http-port", str(free_port()),
             "--triton-grpc-port", str(port), "--triton-metrics-port", str(free_port()),
             "--log-dir", str(tmp_path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 1
    assert f"port {port} (--triton-grpc-port) on 127.0.0.1 is already in use" in result.stderr
    assert not (tmp_path / "no-store").exists(), "nothing is prepared"


def test_precision_options_reach_the_models_as_their_environment():
    def environment(argv):
        args = parse_args(argv)
        return precision_environment(args.first_pass_precision, args.second_pass_precision,
                                     args.second_pass_encoder_precision)

    assert environment([]) == {}
    assert environment(["--first-pass-precision", "int8", "--second-pass-precision", "bf16"]) == {
        first_pass_options.PRECISION_ENV: "int8", second_pass_precision.PRECISION_ENV: "bf16"}
    assert environment(["--second-pass-precision", "fp32"]) == {second_pass_precision.PRECISION_ENV: "fp32"}
    assert environment(["--second-pass-encoder-precision", "int8"]) == {
        second_pass_precision.ENCODER_PRECISION_ENV: "int8"}
    with pytest.raises(SystemExit):
        parse_args(["--second-pass-precision", "int3"])
    with pytest.raises(SystemExit):
        parse_args(["--second-pass-encoder-precision", "bf16"])
