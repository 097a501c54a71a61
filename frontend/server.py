"""WebSocket server speaking FunASR's 2pass protocol, backed by Triton over gRPC; it also
serves the web page (frontend/static/), Prometheus metrics (/metrics) and health checks
(/healthz: the process answers; /readyz: ready while an inference server is and no drain is
under way) over plain HTTP(S) on the same port. With several Triton servers each stream goes
to the least loaded ready one and moves to another if its own is lost (session.py). SIGTERM
or SIGINT drains: new connections are refused, open streams get up to --drain-timeout-s to
finish, then end with 1001; a second signal ends them at once; what is left of the shutdown
after that may take EXIT_GRACE_S before the process ends anyway. The capacity baseline
(perf/baseline_server.py) is this server with FunASR models in-process instead.

    python -m frontend.server --triton-url 127.0.0.1:8001 --port 10095
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import itertools
import json
import logging
import mimetypes
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from frontend.backend import Backend, InferenceError
from frontend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from frontend.metrics import FrontendMetrics
from frontend.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    ProtocolError,
    StreamConfig,
    decode_text_frame,
    error_message,
    start_config,
    update_config,
)
from frontend.session import StreamSession
from frontend.triton_client import DEFAULT_STEP_TIMEOUT_S, TritonBackend, TritonGateway, TritonUnavailable

log = logging.getLogger("frontend.server")

DEFAULT_STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_READINESS_INTERVAL_S = 2.0
SHUTTING_DOWN = "server shutting down"
# After the drain, the rest of the shutdown (the listener, the gRPC channels, the event loop's and
# the interpreter's teardown) may take this long before the process ends without it: grpc.aio's
# poller thread can hang an exit (grpc/grpc#40989), and a server told to stop must stop.
EXIT_GRACE_S = 10.0


@dataclass
class ServerSettings:
    max_connections: int = 0  # 0: no limit
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    static_dir: Path | None = DEFAULT_STATIC_DIR
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    readiness_interval_s: float = DEFAULT_READINESS_INTERVAL_S


class ServerShuttingDown(Exception):
    """The drain deadline passed with this connection's stream still open."""


class FrontendServer:
    """State shared by all connections: the backend, the open connections, the metrics, the
    backend's readiness and whether a drain is under way."""

    def __init__(self, settings: ServerSettings, backend: Backend):
        self.settings = settings
        self.backend = backend
        self.metrics = FrontendMetrics()
        self.connections: set[Connection] = set()
        self.readiness: dict[str, bool] = {}  # per inference server, as last checked
        self.draining = False
        self._connection_numbers = itertools.count(1)
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self._hurry = asyncio.Event()

    def next_connection_number(self) -> int:
        return next(self._connection_numbers)

    async def handle(self, websocket: ServerConnection) -> None:
        await Connection(self, websocket).run()

    def opened(self, connection: Connection) -> None:
        self.connections.add(connection)
        self._no_connections.clear()
        self.metrics.connections_open.set(len(self.connections))

    def closed(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.metrics.connections_open.set(len(self.connections))
        if not self.connections:
            self._no_connections.set()

    @property
    def ready(self) -> bool:
        return not self.draining and any(self.readiness.values())

    async def check_readiness(self) -> None:
        self.readiness = await self.backend.readiness()
        for name, ready in self.readiness.items():
            self.metrics.backend_ready.labels(name).set(1 if ready else 0)

    async def watch_readiness(self) -> None:
        while True:
            try:
                await self.check_readiness()
            except Exception:  # a probe bug must not stop the probing (nor the server)
                log.exception("readiness check failed")
                self.readiness = {}
            await asyncio.sleep(self.settings.readiness_interval_s)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """WebSocket handshakes go on (refused while draining); plain HTTP GETs get the
        metrics, the health checks or the web page's files."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if self.draining:
                return _text_response(503, "Service Unavailable", f"{SHUTTING_DOWN}; connect again elsewhere\n")
            return None
        path = urlsplit(request.path).path
        if path == "/metrics":
            body = self.metrics.exposition()
            return Response(200, "OK", Headers([("Content-Type", METRICS_CONTENT_TYPE),
                                                ("Content-Length", str(len(body)))]), body)
        if path == "/healthz":
            return _text_response(200, "OK", "ok\n")
        if path == "/readyz":
            if self.ready:
                return _text_response(200, "OK", "ready\n")
            reason = ("draining" if self.draining
                      else f"no inference server ready ({self.readiness or 'not checked yet'})")
            return _text_response(503, "Service Unavailable", f"not ready: {reason}\n")
        return static_response(self.settings.static_dir, request.path)

    async def drain(self) -> None:
        """Refuse new connections; close those with no stream open; let open streams finish
        (each connection closes with 1001 after its final message) until the drain timeout or
        hurry(); then end the rest with a server_shutdown error and 1001."""
        self.draining = True
        log.info("draining: %d connection(s) open, up to %g s", len(self.connections), self.settings.drain_timeout_s)
        for connection in list(self.connections):
            connection.drain()
        waits = [asyncio.ensure_future(self._no_connections.wait()), asyncio.ensure_future(self._hurry.wait())]
        await asyncio.wait(waits, timeout=self.settings.drain_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if self.connections:
            log.info("drain over: ending %d connection(s) with 1001", len(self.connections))
        for connection in list(self.connections):
            connection.shut_down()

    def hurry(self) -> None:
        """End a drain under way now."""
        self._hurry.set()

    @staticmethod
    def select_subprotocol(connection: ServerConnection, offered) -> str | None:
        # Browsers offer "binary"; FunASR's Python and C++ clients offer nothing. Accept both.
        return "binary" if "binary" in offered else None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> Server:
        return await serve(
            self.handle,
            host,
            port,
            ssl=ssl_context,
            process_request=self.process_request,
            select_subprotocol=self.select_subprotocol,
            # Beyond our own limit, frames up to twice it still get a JSON error; larger
            # ones are refused by the library itself (close code 1009).
            max_size=2 * self.settings.max_frame_bytes,
            # Audio does not compress; deflate would only cost CPU.
            compression=None,
        )

    async def close(self) -> None:
        await self.backend.close()


def static_response(static_dir: Path | None, request_path: str) -> Response:
    path = unquote(urlsplit(request_path).path)
    if static_dir is None or not static_dir.is_dir():
        return _text_response(404, "Not Found", "no web page is installed on this server\n")
    relative = path.lstrip("/") or "index.html"
    root = static_dir.resolve()
    target = (root / relative).resolve()
    if root not in target.parents or not target.is_file():
        return _text_response(404, "Not Found", f"{path} not found\n")
    content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type in ("application/javascript", "application/json"):
        content_type += "; charset=utf-8"
    body = target.read_bytes()
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache")])
    return Response(200, "OK", headers, body)


def _text_response(status: int, reason: str, text: str) -> Response:
    body = text.encode()
    headers = Headers([("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return Response(status, reason, headers, body)


class Connection:
    """One WebSocket: a sequence of streams, each a config, audio and an end."""

    def __init__(self, server: FrontendServer, websocket: ServerConnection):
        self.server = server
        self.websocket = websocket
        self.number = server.next_connection_number()
        self.session: StreamSession | None = None
        self.config: StreamConfig | None = None  # of the latest stream, inherited by the next
        self.streams = 0
        self._failure: BaseException | None = None
        self._receiver: asyncio.Task | None = None
        # A close begun outside the receive loop, held so that the task is not collected early.
        self._closing: asyncio.Future | None = None

    async def run(self) -> None:
        opened = time.monotonic()
        peer = self.websocket.remote_address
        peer_text = f"{peer[0]}:{peer[1]}" if peer else "?"
        log.info("conn %d open from %s subprotocol=%s", self.number, peer_text, self.websocket.subprotocol)
        settings = self.server.settings
        if settings.max_connections and len(self.server.connections) >= settings.max_connections:
            await self._send_error(
                "server_busy", f"server at capacity ({settings.max_connections} connections); retry later",
                CLOSE_TRY_AGAIN_LATER,
            )
            log.info("conn %d refused: at capacity (%d connections)", self.number, settings.max_connections)
            return
        if self.server.draining:  # the handshake began just before the drain did
            await self.websocket.close(CLOSE_GOING_AWAY, SHUTTING_DOWN)
            return
        self.server.opened(self)
        try:
            self._receiver = asyncio.create_task(self._receive())
            try:
                await self._receiver
            except asyncio.CancelledError:
                if self._failure is None:
                    raise  # the server is shutting down
            if self._failure is not None:
                await self._report(self._failure)
        finally:
            if self.session is not None and not self.session.completed:
                await self.session.abort()
            self.server.closed(self)
            log.info(
                "conn %d closed after %.1f s: %d stream(s), close code %s%s",
                self.number, time.monotonic() - opened, self.streams, self.websocket.close_code,
                f" ({self.websocket.close_reason})" if self.websocket.close_reason else "",
            )

    async def _receive(self) -> None:
        try:
            async for frame in self.websocket:
                if len(frame) > self.server.settings.max_frame_bytes:
                    raise ProtocolError(
                        "frame_too_large",
                        f"frame of {len(frame)} bytes exceeds the limit of {self.server.settings.max_frame_bytes}; "
                        "send audio in smaller pieces",
                        CLOSE_POLICY_VIOLATION,
                    )
                if isinstance(frame, str):
                    await self._on_text(frame)
                else:
                    await self._on_audio(frame)
        except ConnectionClosed:
            pass  # client vanished; run() cleans up
        except Exception as exc:  # bad input, or a bug: this connection ends, the server goes on
            self._failure = exc

    async def _on_text(self, text: str) -> None:
        fields = decode_text_frame(text)
        if self.session is None or self.session.completed:
            self.config = start_config(fields, self.config)
            self.session = StreamSession(self.config, self.server.backend.open_stream(), self._send,
                                         self._session_failed, self.server.metrics)
            self.streams += 1
        else:
            self.config = update_config(self.config, fields)
            await self.session.push_config(self.config)
        if self.config.ends_stream:
            await self.session.end()
            if self.server.draining:
                await self.websocket.close(CLOSE_GOING_AWAY, SHUTTING_DOWN)

    async def _on_audio(self, data: bytes) -> None:
        if self.session is None or self.session.completed:
            raise ProtocolError(
                "audio_before_config",
                "binary audio received with no stream open: send a JSON config first"
                + (" (the previous stream ended with is_speaking=false)" if self.session else ""),
                CLOSE_POLICY_VIOLATION,
            )
        await self.session.push_audio(data)

    async def _send(self, message: dict) -> None:
        await self.websocket.send(json.dumps(message, ensure_ascii=False))
        self.server.metrics.messages.labels(message.get("mode", "")).inc()

    def drain(self) -> None:
        """The server drains: with no stream open, close now; else after its final message."""
        if self.session is None or self.session.completed:
            self._close_soon()

    def shut_down(self) -> None:
        """The drain deadline passed: end the open stream with an error, or just close."""
        if self.session is None or self.session.completed:
            self._close_soon()
        else:
            self._session_failed(ServerShuttingDown(f"{SHUTTING_DOWN}: the stream did not end within the drain "
                                                    f"time ({self.server.settings.drain_timeout_s:g} s)"))

    def _close_soon(self) -> None:
        self._closing = asyncio.ensure_future(self.websocket.close(CLOSE_GOING_AWAY, SHUTTING_DOWN))

    def _session_failed(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        if self._receiver is not None:
            self._receiver.cancel()

    async def _report(self, failure: BaseException) -> None:
        if isinstance(failure, ConnectionClosed):
            return
        if isinstance(failure, ServerShuttingDown):
            log.info("conn %d: %s", self.number, failure)
            await self._send_error("server_shutdown", str(failure), CLOSE_GOING_AWAY)
        elif isinstance(failure, ProtocolError):
            log.info("conn %d bad input (%s): %s", self.number, failure.code, failure.message)
            await self._send_error(failure.code, failure.message, failure.close_code)
        elif isinstance(failure, TritonUnavailable):
            log.error("conn %d: %s", self.number, failure)
            await self._send_error("inference_unavailable", str(failure), CLOSE_INTERNAL_ERROR)
        elif isinstance(failure, InferenceError):
            log.error("conn %d inference failed: %s", self.number, failure)
            await self._send_error("inference_error", str(failure), CLOSE_INTERNAL_ERROR)
        else:
            log.error("conn %d internal error", self.number, exc_info=failure)
            await self._send_error("internal_error", f"internal server error: {failure!r}", CLOSE_INTERNAL_ERROR)

    async def _send_error(self, code: str, reason: str, close_code: int) -> None:
        self.server.metrics.errors.labels(code).inc()
        config = self.session.config if self.session is not None else self.config
        mode = config.mode if config else ""
        wav_name = config.wav_name if config else ""
        # Frames the client sent before seeing the error may fill the receive buffer, and
        # websockets stops reading at its high-water mark: its close frame would go unseen
        # until the close timeout. Discard them while closing.
        discard = asyncio.create_task(self._discard_incoming())
        try:
            await self._send(error_message(mode, wav_name, code, reason))
            await self.websocket.close(close_code, _close_reason(reason))
        except ConnectionClosed:
            pass
        finally:
            discard.cancel()

    async def _discard_incoming(self) -> None:
        try:
            async for _ in self.websocket:
                pass
        except ConnectionClosed:
            pass


def _close_reason(text: str) -> str:
    # A close frame's reason is limited to 123 bytes of UTF-8.
    encoded = text.encode()[:123]
    return encoded.decode("utf-8", errors="ignore")


def triton_urls(text: str) -> list[str]:
    urls = [url.strip() for url in text.split(",")]
    if not all(urls) or len(set(urls)) != len(urls):
        raise argparse.ArgumentTypeError(f"expected host:port[,host:port...] without repeats, got {text!r}")
    return urls


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-url", default="127.0.0.1:8001", type=triton_urls,
                        help="Triton gRPC address host:port, or several, comma-separated (replicas: each stream "
                             "goes to the ready one with the fewest open streams)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=10095)
    parser.add_argument("--certfile", help="TLS certificate (PEM): serve wss:// and https://")
    parser.add_argument("--keyfile", help="TLS private key (PEM) for --certfile")
    parser.add_argument("--max-connections", type=int, default=0,
                        help="refuse further connections (close code 1013) beyond this many; 0 = no limit")
    parser.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES,
                        help="largest accepted WebSocket frame")
    parser.add_argument("--static-dir", type=Path, default=DEFAULT_STATIC_DIR, help="web page files served over HTTP")
    parser.add_argument("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="on SIGTERM/SIGINT, how long open streams may go on before they end with 1001")
    parser.add_argument("--readiness-interval-s", type=float, default=DEFAULT_READINESS_INTERVAL_S,
                        help="how often the inference server's readiness is checked (for /readyz and metrics)")
    parser.add_argument("--step-timeout-s", type=float, default=DEFAULT_STEP_TIMEOUT_S,
                        help="a VAD or first-pass step unanswered this long counts as its server lost: the "
                             "stream moves to another server")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    if args.max_connections < 0 or args.max_frame_bytes < 1024:
        parser.error("--max-connections must be >= 0 and --max-frame-bytes >= 1024")
    if args.drain_timeout_s < 0 or not args.readiness_interval_s > 0 or not args.step_timeout_s > 0:
        parser.error("--drain-timeout-s must be >= 0, --readiness-interval-s and --step-timeout-s > 0")
    return args


def ssl_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


async def run_server(make_backend: Callable[[], Backend], settings: ServerSettings, host: str, port: int,
                     certfile: str | None = None, keyfile: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain (a second signal hurries it) and shut down, the
    process ending within EXIT_GRACE_S of the drain (this is the process's whole life). The
    backend is made here, in the event loop, because it may bind to it (a gRPC channel does)."""
    frontend = FrontendServer(settings, make_backend())
    server = await frontend.start(host, port, ssl_context(certfile, keyfile))
    readiness = asyncio.create_task(frontend.watch_readiness())
    scheme = "wss" if certfile else "ws"
    log.info("listening on %s://%s:%d/ (%s)", scheme, host, port, frontend.backend.description)
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            frontend.hurry()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await frontend.drain()
    log.info("shutting down")
    end_process_after(EXIT_GRACE_S)
    readiness.cancel()
    server.close()
    await server.wait_closed()
    await frontend.close()


def end_process_after(grace_s: float) -> None:
    """Start a daemon timer that, if this process is still alive after grace_s, logs the stacks
    of its threads (where it is stuck) and ends it with status 0: its streams are over by then."""
    def end_now() -> None:
        log.error("the shutdown did not finish within %g s of the drain; ending the process now, its threads' "
                  "stacks follow", grace_s)
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(grace_s, end_now)
    timer.daemon = True
    timer.start()


def run(make_backend: Callable[[], Backend], settings: ServerSettings, host: str, port: int,
        certfile: str | None = None, keyfile: str | None = None) -> int:
    """run_server in a new event loop; returns the exit status (1: the server could not start)."""
    # The handshake-level chatter of websockets (e.g. plain HTTP page requests) is noise.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        asyncio.run(run_server(make_backend, settings, host, port, certfile, keyfile))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    log.info("stopped")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(max_connections=args.max_connections, max_frame_bytes=args.max_frame_bytes,
                              static_dir=args.static_dir, drain_timeout_s=args.drain_timeout_s,
                              readiness_interval_s=args.readiness_interval_s)
    return run(lambda: TritonBackend([TritonGateway(url) for url in args.triton_url], args.step_timeout_s), settings,
               args.host, args.port, args.certfile, args.keyfile)


if __name__ == "__main__":
    sys.exit(main())
