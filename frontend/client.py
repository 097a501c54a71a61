"""A small asyncio client for the 2pass protocol: stream PCM over a WebSocket the way
FunASR's clients do and collect what the server sends back. Used by the tests and the
load tool; also a command line:

    python -m frontend.client speech.wav --url ws://127.0.0.1:10095 --mode 2pass
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


@dataclass
class StreamResult:
    """Messages of one stream in arrival order, each with its arrival time in seconds
    since the first audio frame was sent."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    arrival_s: list[float] = field(default_factory=list)
    end_sent_s: float | None = None  # when {"is_speaking": false} went out
    close_code: int | None = None  # set when the server closed the connection

    @property
    def final(self) -> dict[str, Any] | None:
        finals = [m for m in self.messages if m.get("is_final")]
        return finals[-1] if finals else None

    @property
    def error(self) -> dict[str, Any] | None:
        errors = [m for m in self.messages if "error" in m]
        return errors[0] if errors else None

    @property
    def partials(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("mode") in ("online", "2pass-online")]

    @property
    def segments(self) -> list[dict[str, Any]]:
        """Second-pass results (the final message too when it carries a segment)."""
        return [m for m in self.messages if "start_time" in m]


def default_frame_samples(config: dict[str, Any], sample_rate: int) -> int:
    """What FunASR's clients send per frame: chunk_size[1]*60 ms / chunk_interval."""
    chunk_size = config.get("chunk_size", [5, 10, 5])
    if isinstance(chunk_size, str):
        chunk_size = [int(v) for v in chunk_size.split(",")]
    frame_ms = chunk_size[1] * 60 / config.get("chunk_interval", 10)
    return max(1, int(sample_rate * frame_ms / 1000))


async def receive_until_final(websocket, result: "StreamResult", clock) -> None:
    """Collect server messages, each with its arrival time by `clock`, until the final
    message or the close; records the close code."""
    try:
        async for text in websocket:
            message = json.loads(text)
            result.messages.append(message)
            result.arrival_s.append(clock())
            if message.get("is_final"):
                return
    except ConnectionClosed:
        pass
    result.close_code = websocket.close_code


async def run_stream(
    websocket: ClientConnection,
    pcm: np.ndarray,
    config: dict[str, Any] | None = None,
    *,
    frame_samples: int | None = None,
    realtime: bool = False,
    timeout_s: float = 120.0,
) -> StreamResult:
    """One stream on an open connection: config, PCM frames, `is_speaking: false`; returns
    once the final message (or an error) arrived or the server closed the connection.
    `realtime` paces frames at the audio's own speed, as a microphone would."""
    config = {"mode": "2pass", "wav_name": "client", "is_speaking": True, **(config or {})}
    sample_rate = int(config.get("audio_fs", 16000))
    frame_samples = frame_samples or default_frame_samples(config, sample_rate)
    data = np.asarray(pcm, dtype="<i2").tobytes()
    frame_bytes = 2 * frame_samples
    result = StreamResult()
    started = time.monotonic()

    async def send_all() -> None:
        await websocket.send(json.dumps(config))
        for index, offset in enumerate(range(0, len(data), frame_bytes)):
            if realtime:
                await asyncio.sleep(max(0.0, started + index * frame_samples / sample_rate - time.monotonic()))
            await websocket.send(data[offset:offset + frame_bytes])
        await websocket.send(json.dumps({"is_speaking": False, "is_end": True}))
        result.end_sent_s = time.monotonic() - started

    sender = asyncio.create_task(send_all())
    try:
        await asyncio.wait_for(receive_until_final(websocket, result, lambda: time.monotonic() - started), timeout_s)
    finally:
        if not sender.done():
            sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    if result.error is not None:
        # The server closes right after an error message; record how.
        try:
            await asyncio.wait_for(websocket.wait_closed(), 10)
        except asyncio.TimeoutError:
            pass
        result.close_code = websocket.close_code
    return result


async def transcribe(url: str, pcm: np.ndarray, config: dict[str, Any] | None = None, *,
                     ssl_context: ssl.SSLContext | None = None, subprotocols: list[str] | None = None,
                     **options: Any) -> StreamResult:
    """Connect, run one stream, close."""
    async with connect(url, ssl=ssl_context, subprotocols=subprotocols, max_size=None,
                       open_timeout=30) as websocket:
        return await run_stream(websocket, pcm, config, **options)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise ValueError(f"{path}: need 16-bit mono WAV, got {wav.getsampwidth() * 8}-bit "
                             f"{wav.getnchannels()}-channel")
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2"), wav.getframerate()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wav", type=Path, help="16-bit mono WAV file")
    parser.add_argument("--url", default="ws://127.0.0.1:10095")
    parser.add_argument("--mode", choices=["online", "offline", "2pass"], default="2pass")
    parser.add_argument("--hotwords", default="")
    parser.add_argument("--realtime", action="store_true", help="send at the audio's own speed")
    parser.add_argument("--insecure", action="store_true", help="wss:// without verifying the certificate")
    args = parser.parse_args(argv)
    try:
        pcm, rate = read_wav(args.wav)
    except (OSError, ValueError, wave.Error) as exc:
        parser.error(str(exc))
    context = None
    if args.url.startswith("wss://") and args.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    config = {"mode": args.mode, "audio_fs": rate, "wav_name": args.wav.stem, "hotwords": args.hotwords}
    result = asyncio.run(transcribe(args.url, pcm, config, ssl_context=context, realtime=args.realtime))
    for message, arrival in zip(result.messages, result.arrival_s):
        print(f"{arrival:7.3f}s {json.dumps(message, ensure_ascii=False)}")
    return 1 if result.error or result.final is None else 0


if __name__ == "__main__":
    sys.exit(main())
