"""Run the whole service: prepare models, start tritonserver, then the WebSocket frontend.

Ctrl-C (or SIGTERM) drains the frontend (open streams finish; Ctrl-C again ends them), then
stops both and every process they started."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from twopass_asr import REPO_ROOT
from twopass_asr.first_pass import options as first_pass_options
from twopass_asr.kernels.int8_recipe import INT8_PRECISIONS
from twopass_asr.second_pass import precision as second_pass_precision
from twopass_asr.serving.triton_launcher import TritonServer, TritonStartError, port_in_use
from twopass_asr.store import model_store

log = logging.getLogger("twopass_asr.serving.serve")
# After its drain, the frontend closes connections and its gRPC channel; it ends itself within
# frontend.server.EXIT_GRACE_S (10 s) of the drain, and is killed a little after that.
FRONTEND_EXIT_GRACE_S = 15.0
REPLICA_PORT_STEP = 100


def precision_environment(first_pass: str | None, second_pass: str | None,
                          second_pass_encoder: str | None) -> dict[str, str]:
    """The environment that overrides the models' precision parameters with those given."""
    chosen = {first_pass_options.PRECISION_ENV: first_pass, second_pass_precision.PRECISION_ENV: second_pass,
              second_pass_precision.ENCODER_PRECISION_ENV: second_pass_encoder}
    return {env: value for env, value in chosen.items() if value}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, default=None, help="model store (default $TWOPASS_ASR_MODELS or .model_store)")
    parser.add_argument("--random", choices=["tiny", "full"], default=None,
                        help="serve random models (replacing what the store holds) without trying to download")
    parser.add_argument("--fallback-random", choices=["tiny", "full"], default="tiny",
                        help="random models to build for missing ones that cannot be downloaded (default tiny)")
    parser.add_argument("--first-pass-precision", choices=first_pass_options.PRECISIONS, default=None,
                        help="the first pass in fp32, int8 or auto: int8 on a CPU (its kernel by the CPU, "
                             "README; default: paraformer_streaming's config.pbtxt)")
    parser.add_argument("--second-pass-precision", choices=second_pass_precision.PRECISIONS, default=None,
                        help="the second pass's LLM in fp32, bf16, fp16 (GPU), int8 or auto: bf16 where the "
                             "hardware computes it natively, else int8 (default: funasr_nano_vllm's config.pbtxt)")
    parser.add_argument("--second-pass-encoder-precision", choices=INT8_PRECISIONS, default=None,
                        help="the second pass's audio encoder in fp32, int8 or auto: int8 on a CPU (its kernel "
                             "by the CPU, as the first pass's; default: funasr_nano_vllm's config.pbtxt)")
    parser.add_argument("--host", default="0.0.0.0", help="WebSocket/web page address")
    parser.add_argument("--port", type=int, default=10095, help="WebSocket/web page port")
    parser.add_argument("--certfile", default=None)
    parser.add_argument("--keyfile", default=None)
    parser.add_argument("--triton-http-port", type=int, default=8000)
    parser.add_argument("--triton-grpc-port", type=int, default=8001)
    parser.add_argument("--triton-replicas", type=int, default=1,
                        help="tritonservers to run, each with every model (replica i takes the --triton-*-port "
                             f"values plus {REPLICA_PORT_STEP} x i); the frontend spreads streams over them")
    parser.add_argument("--triton-metrics-port", type=int, default=8002)
    parser.add_argument("--log-dir", type=Path, default=REPO_ROOT / ".cache" / "logs")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0,
                        help="on Ctrl-C/SIGTERM, how long the frontend lets open streams finish before ending them")
    args = parser.parse_args(argv)
    if args.triton_replicas < 1:
        parser.error("--triton-replicas must be at least 1")
    return args


def prepare_command(args) -> list[str]:
    """The store keeps every valid model it holds; the fallback fills only missing ones."""
    cmd = [sys.executable, "-m", "twopass_asr.store.prepare", "--store", str(args.store or model_store.store_root())]
    return cmd + (["--random", args.random] if args.random else ["--fallback-random", args.fallback_random])


def prepare(args) -> Path:
    subprocess.run(prepare_command(args), check=True)
    return args.store or model_store.store_root()


def stop_frontend(frontend: subprocess.Popen, drain_timeout_s: float) -> None:
    """SIGTERM: the frontend drains (open streams finish, up to drain_timeout_s); another
    Ctrl-C meanwhile passes on a second signal, which ends the drain at once."""
    frontend.send_signal(signal.SIGTERM)
    log.info("frontend draining (up to %g s; Ctrl-C again to end open streams now)", drain_timeout_s)
    deadline = time.monotonic() + drain_timeout_s + FRONTEND_EXIT_GRACE_S
    while True:
        try:
            frontend.wait(max(0.1, deadline - time.monotonic()))
            return
        except subprocess.TimeoutExpired:
            frontend.kill()
            frontend.wait()
            return
        except KeyboardInterrupt:
            frontend.send_signal(signal.SIGTERM)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [serve] %(message)s")
    args = parse_args(argv)

    def request_stop(signum, _frame):
        raise KeyboardInterrupt

    # Explicit handlers: a shell starting us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Found taken now rather than after minutes of model loading.
    ports = [(args.host, args.port, "--port")]
    for replica in range(args.triton_replicas):
        shift = REPLICA_PORT_STEP * replica
        ports += [("127.0.0.1", args.triton_http_port + shift, "--triton-http-port"),
                  ("127.0.0.1", args.triton_grpc_port + shift, "--triton-grpc-port"),
                  ("127.0.0.1", args.triton_metrics_port + shift, "--triton-metrics-port")]
    for host, port, option in ports:
        if port_in_use(host, port):
            log.error("port %d (%s) on %s is already in use: stop what holds it or choose another with %s",
                      port, option, host, option)
            return 1
    tritons: list[TritonServer] = []
    frontend = None
    try:
        store = prepare(args)
        for replica in range(args.triton_replicas):
            shift = REPLICA_PORT_STEP * replica
            triton = TritonServer(
                store, host="127.0.0.1", http_port=args.triton_http_port + shift,
                grpc_port=args.triton_grpc_port + shift, metrics_port=args.triton_metrics_port + shift,
                log_path=args.log_dir / ("tritonserver.log" if replica == 0 else f"tritonserver-{replica}.log"),
                env=precision_environment(args.first_pass_precision, args.second_pass_precision,
                                          args.second_pass_encoder_precision),
            )
            tritons.append(triton)
            log.info("starting tritonserver %d of %d (log: %s)", replica + 1, args.triton_replicas, triton.log_path)
            triton.start(progress=log.info)
            log.info("tritonserver ready: gRPC %s", triton.grpc_url)
        cmd = [sys.executable, "-m", "frontend.server", "--triton-url", ",".join(t.grpc_url for t in tritons),
               "--host", args.host, "--port", str(args.port), "--drain-timeout-s", str(args.drain_timeout_s)]
        if args.certfile:
            cmd += ["--certfile", args.certfile, "--keyfile", args.keyfile]
        frontend = subprocess.Popen(cmd, start_new_session=True)
        scheme = "https" if args.certfile else "http"
        log.info("frontend starting: %s://%s:%d/ (web page) — Ctrl-C stops everything", scheme, args.host, args.port)
        # A replica that dies leaves the others serving (the frontend sends new streams there).
        reported = set()
        while frontend.poll() is None and any(t.process.poll() is None for t in tritons):
            for triton in tritons:
                if triton.process.poll() is not None and triton.grpc_url not in reported:
                    reported.add(triton.grpc_url)
                    log.error("tritonserver %s exited (code %s); see %s", triton.grpc_url, triton.process.returncode,
                              triton.log_path)
            time.sleep(0.5)
        failed = "frontend" if frontend.poll() is not None else "every tritonserver"
        log.error("%s exited unexpectedly; stopping", failed)
        return 1
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    except (TritonStartError, subprocess.CalledProcessError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        if frontend is not None and frontend.poll() is None:
            stop_frontend(frontend, args.drain_timeout_s)
        for triton in tritons:
            triton.stop()


if __name__ == "__main__":
    sys.exit(main())
