"""Protocol fuzzer: many hostile WebSocket sessions in parallel against the frontend, each of
which must end the way docs/protocol.md says, never in a hang, and the server must serve a
normal stream afterwards.

Session kinds (chosen at random, seeded): text that is not JSON or not an object, a config
field of the wrong type or out of range, audio before any config, a frame over the size
limit (and over twice it), a WAV stream with a broken header, a config that changes the mode
mid-stream, random bytes as audio in any mode (ending normally), hostile sizes (a huge
wav_name or hotwords list), and clients that vanish mid-stream without a close. Each kind
has the outcomes it may end in (an error code with its close code, or a final message); any
other outcome, or a session still open after --session-timeout-s, fails the run. After the
sessions a normal 2pass stream of speech must end with its segments.

    python -m perf.fuzz --store .model_store [--sessions 10000] [--parallel 32] [--server-env NAME=VALUE]
    python -m perf.fuzz --url ws://127.0.0.1:10095 --max-frame-bytes 8388608 ...   # a running frontend

With --store it starts tritonserver and a frontend of its own (--max-frame-bytes 65536, so the
size cases stay small). Writes fuzz.json and fuzz.md under --out; exit 1 when any session
ended unexpectedly or hung, or the normal stream failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from frontend.client import transcribe
from perf import ws_load
from perf.bench_args import REAL_SPEECH_TOKENS_PER_S, add_server_env_argument, server_environment
from perf.capacity import service
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.second_pass.recognizer import DEFAULT_MAX_NEW_TOKENS

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fuzz"
OWN_FRONTEND_MAX_FRAME_BYTES = 65536
FINAL = "final"
VANISHED = "vanished"
# (field, value) pairs a config must refuse with invalid_config.
BAD_FIELDS = [
    ("mode", "3pass"), ("mode", 2), ("chunk_size", "5,x,5"), ("chunk_size", [5, 0, 5]), ("chunk_size", [5, 10]),
    ("chunk_interval", "10"), ("chunk_interval", 0), ("encoder_chunk_look_back", -1), ("decoder_chunk_look_back", 1e9),
    ("audio_fs", "16000"), ("wav_name", ["a"]), ("is_speaking", "yes"), ("itn", 1), ("hotwords", 42),
    ("hotwords", "{not json"), ("vad_tail_sil", 0), ("vad_max_len", 10**12), ("vad_energy", "loud"),
    ("svs_lang", {"x": 1}), ("is_end", 0.5),
]


class Session:
    """One hostile session's messages and how it ended."""

    def __init__(self, websocket):
        self.websocket = websocket
        self.messages: list[dict[str, Any]] = []

    async def send_text(self, text: str) -> None:
        await self.websocket.send(text)

    async def send_json(self, message: dict) -> None:
        await self.websocket.send(json.dumps(message))

    async def send_bytes(self, data: bytes) -> None:
        await self.websocket.send(data)

    async def read_to_end(self) -> tuple[str, int | None]:
        """(the error code, "final" or "closed", close code) once the server ends the
        session or sends a final message."""
        try:
            async for text in self.websocket:
                message = json.loads(text)
                self.messages.append(message)
                if "error" in message:
                    await self.websocket.wait_closed()
                    return message.get("code", "?"), self.websocket.close_code
                if message.get("is_final"):
                    return FINAL, None
        except ConnectionClosed:
            pass
        return "closed", self.websocket.close_code


def random_config(rng: random.Random) -> dict[str, Any]:
    return {"mode": rng.choice(["2pass", "online", "offline"]), "wav_name": f"fuzz{rng.randrange(10**6)}",
            "is_speaking": True, "chunk_size": rng.choice([[5, 10, 5], [0, 10, 5], [0, 5, 5], [8, 8, 4]])}


def random_audio(rng: random.Random, max_frames: int = 12) -> list[bytes]:
    """Frames of random bytes (odd lengths too): loud noise as 16-bit PCM."""
    return [rng.randbytes(rng.randrange(1, 9600)) for _ in range(rng.randrange(1, max_frames))]


async def send_audio_then_end(session: Session, rng: random.Random) -> None:
    for frame in random_audio(rng):
        await session.send_bytes(frame)
    await session.send_json({"is_speaking": False})


def kinds(max_frame_bytes: int) -> dict[str, tuple[Callable[[Session, random.Random], Awaitable[None]], set]]:
    """Each kind: what it sends, and the outcomes it may end in ((code, close code) pairs)."""

    async def bad_json(session, rng):
        text = rng.choice(['{"mode": "2pass"', "{'mode': '2pass'}", "", "nul", "{" * rng.randrange(1, 5000),
                           "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 200)))])
        await session.send_text(text)

    async def not_an_object(session, rng):
        await session.send_text(json.dumps(rng.choice([[1, 2], 3, "2pass", None, True, [{"mode": "2pass"}]])))

    async def wrong_field(session, rng):
        field, value = rng.choice(BAD_FIELDS)
        await session.send_json({**random_config(rng), field: value})

    async def audio_first(session, rng):
        await session.send_bytes(rng.randbytes(rng.randrange(1, 4000)))

    async def frame_too_large(session, rng):
        await session.send_json(random_config(rng))
        await session.send_bytes(bytes(rng.randrange(max_frame_bytes + 1, 2 * max_frame_bytes)))

    async def frame_over_twice_the_limit(session, rng):
        await session.send_bytes(bytes(2 * max_frame_bytes + rng.randrange(1, 1000)))

    async def broken_wav_header(session, rng):
        await session.send_json({**random_config(rng), "wav_format": "wav"})
        junk = b"RIFF" + rng.randbytes(rng.randrange(0, 70000))
        for offset in range(0, len(junk), 16384):
            await session.send_bytes(junk[offset:offset + 16384])
        await session.send_json({"is_speaking": False})

    async def mode_changed(session, rng):
        config = random_config(rng)
        await session.send_json(config)
        await session.send_bytes(rng.randbytes(3200))
        await session.send_json({"mode": "online" if config["mode"] != "online" else "2pass"})

    async def random_bytes_as_audio(session, rng):
        await session.send_json(random_config(rng))
        await send_audio_then_end(session, rng)

    async def hostile_sizes(session, rng):
        huge = rng.choice([{"wav_name": "w" * rng.randrange(10**4, 10**5)},
                           {"hotwords": " ".join(f"word{i}" for i in range(rng.randrange(1000, 5000)))},
                           {"svs_lang": "x" * rng.randrange(10**3, 10**4)}])
        await session.send_json({**random_config(rng), **huge})
        await send_audio_then_end(session, rng)

    refused = {("invalid_json", 1007)}
    config = {("invalid_config", 1007)}
    final = {(FINAL, None)}
    return {
        "bad_json": (bad_json, refused),
        "not_an_object": (not_an_object, refused),
        "wrong_field": (wrong_field, config),
        "audio_first": (audio_first, {("audio_before_config", 1008)}),
        "frame_too_large": (frame_too_large, {("frame_too_large", 1008)}),
        "frame_over_twice_the_limit": (frame_over_twice_the_limit, {("closed", 1009)}),
        "broken_wav_header": (broken_wav_header, {("invalid_wav_header", 1003), ("unsupported_wav_format", 1003),
                                                  (FINAL, None)}),
        "mode_changed": (mode_changed, {("config_locked", 1008)}),
        "random_bytes_as_audio": (random_bytes_as_audio, final),
        # A text frame over the size limit is refused as any frame is.
        "hostile_sizes": (hostile_sizes, final | config | {("frame_too_large", 1008), ("closed", 1009)}),
    }


async def vanish(url: str, rng: random.Random) -> None:
    """A client that sends a config and some audio, then drops its TCP connection unannounced."""
    websocket = await connect(url, max_size=None, open_timeout=30)
    await websocket.send(json.dumps(random_config(rng)))
    for frame in random_audio(rng, 6):
        await websocket.send(frame)
    await asyncio.sleep(rng.random() * 0.5)
    websocket.transport.abort()


async def run_session(url: str, index: int, seed: int, table: dict, timeout_s: float) -> tuple[str, str]:
    """(kind, outcome): outcome is "ok", "hang", or what happened when it was not allowed."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = rng.choice([*table, VANISHED])
    try:
        if kind == VANISHED:
            await asyncio.wait_for(vanish(url, rng), timeout_s)
            return kind, "ok"
        send, allowed = table[kind]
        async with connect(url, max_size=None, open_timeout=30) as websocket:
            session = Session(websocket)
            reader = asyncio.create_task(session.read_to_end())
            with contextlib.suppress(ConnectionClosed):
                await send(session, rng)
            outcome = await asyncio.wait_for(reader, timeout_s)
    except asyncio.TimeoutError:
        return kind, "hang"
    except Exception as exc:  # refused connection, reset: an outcome the table does not allow
        return kind, f"client error {type(exc).__name__}: {exc}"
    return kind, "ok" if outcome in allowed else f"ended as {outcome}"


async def run_all(url: str, sessions: int, parallel: int, seed: int, table: dict, timeout_s: float,
                  progress: bool = True) -> list[tuple[str, str]]:
    limit = asyncio.Semaphore(parallel)
    results: list[tuple[str, str]] = []

    async def one(index: int) -> None:
        async with limit:
            results.append(await run_session(url, index, seed, table, timeout_s))
        if progress and len(results) % 500 == 0:
            print(f"[fuzz] {len(results)}/{sessions} sessions", file=sys.stderr, flush=True)

    await asyncio.gather(*(one(index) for index in range(sessions)))
    return results


def report(results: list[tuple[str, str]], normal: dict, seconds: float, cpu: str, url: str) -> tuple[dict, str]:
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for kind, outcome in results:
        by_kind[kind][outcome] += 1
    bad = {kind: {o: n for o, n in counts.items() if o != "ok"} for kind, counts in by_kind.items()}
    bad = {kind: outcomes for kind, outcomes in bad.items() if outcomes}
    data = {"cpu": cpu, "url": url, "sessions": len(results), "seconds": seconds,
            "by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
            "unexpected": bad, "hangs": sum(counts["hang"] for counts in by_kind.values()),
            "normal_stream_after": normal}
    lines = [f"# Protocol fuzz\n\nCPU: {cpu}. {len(results)} hostile sessions against {url} in {seconds:.0f} s.\n",
             "| kind | sessions | as the protocol says | otherwise |", "|---|---|---|---|"]
    for kind, counts in sorted(by_kind.items()):
        other = ", ".join(f"{o}: {n}" for o, n in counts.items() if o != "ok") or "-"
        lines.append(f"| {kind} | {sum(counts.values())} | {counts['ok']} | {other} |")
    lines.append(f"\nHangs: {data['hangs']}. A normal 2pass stream afterwards: "
                 f"{'ended with ' + str(normal['segments']) + ' segments' if normal['ok'] else normal['error']}.")
    return data, "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running frontend")
    target.add_argument("--store", type=Path, help="start tritonserver and a frontend on this model store")
    parser.add_argument("--max-frame-bytes", type=int, default=None,
                        help="the frontend's --max-frame-bytes (with --url; default its default)")
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--session-timeout-s", type=float, default=60.0)
    add_server_env_argument(parser)
    parser.add_argument("--wav", type=Path, default=None, help="speech for the normal stream (default: synthesised)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    server_env = server_environment(parser, "--server-env", args.server_env)
    if args.sessions < 1 or args.parallel < 1:
        parser.error("--sessions and --parallel must be positive")
    from frontend.server import DEFAULT_MAX_FRAME_BYTES

    cpu = cpu_summary()
    print(f"CPU {cpu}", flush=True)
    pcm = ws_load.load_pcm(args.wav)
    with contextlib.ExitStack() as stack:
        if args.url:
            url, max_frame_bytes = args.url, args.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES
        else:
            max_frame_bytes = OWN_FRONTEND_MAX_FRAME_BYTES
            url = stack.enter_context(service(args.store, args.out / "logs", DEFAULT_MAX_NEW_TOKENS,
                                              REAL_SPEECH_TOKENS_PER_S, extra_env=server_env,
                                              frontend_args=["--max-frame-bytes", str(max_frame_bytes)]))
        started = time.monotonic()
        results = asyncio.run(run_all(url, args.sessions, args.parallel, args.seed, kinds(max_frame_bytes),
                                      args.session_timeout_s))
        seconds = time.monotonic() - started
        after = asyncio.run(transcribe(url, pcm, {"mode": "2pass"}, timeout_s=300))
    normal = {"ok": after.error is None and after.final is not None and bool(after.segments),
              "segments": len(after.segments), "error": after.error}
    data, table = report(results, normal, seconds, cpu, url)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(data, indent=2))
    (args.out / "fuzz.md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.out}/fuzz.{{json,md}}")
    return 0 if not data["unexpected"] and normal["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
