"""Reference server for capacity comparisons: the same WebSocket 2pass protocol (config
parsing, audio decoding and messages come from frontend/), but served the way FunASR's
original single-process websocket servers do it: FunASR AutoModels loaded in-process (a
streaming FSMN-VAD, an online Paraformer, an offline Fun-ASR-Nano) and every model call,
for every stream and segment, made one at a time with AutoModel.generate. No batching, no
Triton.

    python -m perf.baseline_server --store .model_store-full --port 10096

The stream pipeline is the frontend's (frontend/session.py), so the load tool's decode-grid
accounting holds for both servers: audio in pieces of 60-600 ms, each through the VAD then
the first-pass buffer, a first-pass decode per whole chunk, and in 2pass mode a first-pass
flush and a new chunk grid at every segment end; the segment's second pass runs right
there, before the stream's next audio (as in FunASR's servers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from frontend.audio import AudioHistory, AudioInput
from frontend.protocol import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    SAMPLE_RATE,
    ProtocolError,
    StreamConfig,
    decode_text_frame,
    error_message,
    final_message,
    partial_message,
    segment_message,
    start_config,
    update_config,
)
from frontend.session import HISTORY_KEEP_MS, MAX_STEP_SAMPLES, MIN_STEP_SAMPLES
from twopass_asr.audio import pcm16_to_float
from twopass_asr.hotwords import parse_hotwords
from twopass_asr.vad.batched import DEFAULT_VAD_STEP_MS, VadOptions, stream_vad_opts

log = logging.getLogger("perf.baseline_server")

# Fun-ASR-Nano needs at least one 25 ms fbank frame.
MIN_SEGMENT_SAMPLES = 400


class Models:
    """The three FunASR AutoModels and the single thread every call runs on."""

    def __init__(self, store: Path, threads: int, max_new_tokens: int):
        import torch
        from funasr import AutoModel

        from twopass_asr.store.model_store import validate_paraformer_dir, validate_vad_dir
        from twopass_asr.store.nano_dir import validate_nano_dir

        torch.set_num_threads(threads)
        dirs = {name: store / name for name in ("vad", "paraformer_streaming", "funasr_nano")}
        validate_vad_dir(dirs["vad"])
        validate_paraformer_dir(dirs["paraformer_streaming"])
        validate_nano_dir(dirs["funasr_nano"])
        common = {"disable_update": True, "disable_pbar": True, "disable_log": True, "device": "cpu",
                  "ncpu": threads}
        self.vad = AutoModel(model=str(dirs["vad"]), **common)
        self.online = AutoModel(model=str(dirs["paraformer_streaming"]), **common)
        self.offline = AutoModel(model=str(dirs["funasr_nano"]), **common)
        # FunASR keeps VAD options on the model object; each call installs its stream's.
        self._vad_defaults = self.vad.model.vad_opts
        # As the service's recognizer: the directory's own cap (config.yaml max_length) still applies.
        self.max_new_tokens = min(max_new_tokens, int(self.offline.kwargs.get("max_length", 512)))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="funasr")

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def vad_step(self, cache: dict, pcm: np.ndarray, final: bool, config: StreamConfig) -> list[list[int]]:
        options = VadOptions(config.vad_tail_sil, config.vad_max_len, config.vad_energy)
        self.vad.model.vad_opts = stream_vad_opts(self._vad_defaults, options)
        result = self.vad.generate(input=pcm16_to_float(pcm), cache=cache, is_final=final,
                                   chunk_size=DEFAULT_VAD_STEP_MS, max_end_silence_time=config.vad_tail_sil)
        return [list(map(int, row)) for row in result[0]["value"]] if result else []

    def online_step(self, cache: dict, pcm: np.ndarray, final: bool, config: StreamConfig) -> str:
        result = self.online.generate(input=pcm16_to_float(pcm), cache=cache, is_final=final,
                                      chunk_size=list(config.chunk_size),
                                      encoder_chunk_look_back=config.encoder_chunk_look_back,
                                      decoder_chunk_look_back=config.decoder_chunk_look_back)
        return result[0]["text"] if result else ""

    def recognize(self, pcm: np.ndarray, config: StreamConfig) -> str:
        if len(pcm) < MIN_SEGMENT_SAMPLES:
            return ""
        language = None if config.svs_lang in ("", "auto") else config.svs_lang
        result = self.offline.generate(input=[pcm16_to_float(pcm)], cache={}, batch_size=1,
                                       hotwords=parse_hotwords(config.hotwords), language=language, itn=config.itn,
                                       max_length=self.max_new_tokens)
        return result[0]["text"] if result else ""


class BaselineStream:
    """One stream, processed in arrival order; model calls go through Models.run."""

    def __init__(self, config: StreamConfig, models: Models, send):
        self.config = config
        self.models = models
        self.send = send
        self.audio = AudioInput(config.audio_fs, config.wav_format)
        self.pending = np.zeros(0, dtype=np.int16)
        self.received = 0
        self.history = AudioHistory()
        self.vad_cache: dict = {}
        self.online_cache: dict = {}
        self.online_open = False
        self.online_buffer = np.zeros(0, dtype=np.int16)
        self.open_segment_start: int | None = None
        self.finishing = False
        self.finish_results: list[dict] = []

    async def feed(self, data: bytes) -> None:
        self.pending = np.concatenate([self.pending, self.audio.feed(data)])
        while len(self.pending) >= MIN_STEP_SAMPLES:
            piece, self.pending = self.pending[:MAX_STEP_SAMPLES], self.pending[MAX_STEP_SAMPLES:]
            await self.step(piece, final=False)

    async def step(self, pcm: np.ndarray, final: bool) -> None:
        self.received += len(pcm)
        mode = self.config.mode
        events = []
        if mode != "online":
            self.history.append(pcm)
            events = await self.models.run(self.models.vad_step, self.vad_cache, pcm, final, self.config)
        if mode != "offline":
            self.online_buffer = np.concatenate([self.online_buffer, pcm])
            await self.decode_online(end=False)
        for start_ms, end_ms in events:
            if start_ms >= 0:
                self.open_segment_start = start_ms
            if end_ms >= 0 and self.open_segment_start is not None:
                await self.close_segment(self.open_segment_start, end_ms)
                self.open_segment_start = None
        if mode != "online":
            keep_from = self.received * 1000 // SAMPLE_RATE - HISTORY_KEEP_MS
            if self.open_segment_start is not None:
                keep_from = min(keep_from, self.open_segment_start)
            self.history.discard_before_ms(keep_from)

    async def decode_online(self, end: bool, emit: bool = True) -> str:
        chunk = self.config.first_pass_chunk_samples
        texts = []
        while len(self.online_buffer) >= chunk:
            piece, self.online_buffer = self.online_buffer[:chunk], self.online_buffer[chunk:]
            texts.append(await self.online_call(piece, False, emit))
        if end and (self.online_open or len(self.online_buffer)):
            piece, self.online_buffer = self.online_buffer, np.zeros(0, dtype=np.int16)
            texts.append(await self.online_call(piece, True, emit))
        return "".join(texts)

    async def online_call(self, pcm: np.ndarray, final: bool, emit: bool) -> str:
        text = await self.models.run(self.models.online_step, self.online_cache, pcm, final, self.config)
        self.online_open = not final
        if final:
            self.online_cache = {}
        if text and emit:
            await self.send(partial_message(self.config, text))
        return text

    async def close_segment(self, start_ms: int, end_ms: int) -> None:
        if self.config.mode == "2pass":
            await self.decode_online(end=True)
        text = await self.models.run(self.models.recognize, self.history.slice_ms(start_ms, end_ms), self.config)
        message = segment_message(self.config, text, start_ms, end_ms)
        if self.finishing:
            self.finish_results.append(message)
        else:
            await self.send(message)

    async def finish(self) -> None:
        self.finishing = True
        tail = np.concatenate([self.pending, self.audio.finish()])
        self.pending = np.zeros(0, dtype=np.int16)
        await self.step(tail, final=True)
        final_result = None
        if self.config.mode != "offline":
            text = await self.decode_online(end=True, emit=self.config.mode != "online")
            if self.config.mode == "online":
                final_result = partial_message(self.config, text)
        for message in self.finish_results[:-1]:
            await self.send(message)
        if self.finish_results:
            final_result = self.finish_results[-1]
        await self.send(final_message(self.config, final_result))


async def handle_connection(websocket: ServerConnection, models: Models) -> None:
    config: StreamConfig | None = None
    stream: BaselineStream | None = None

    async def send(message: dict) -> None:
        await websocket.send(json.dumps(message, ensure_ascii=False))

    try:
        async for frame in websocket:
            if isinstance(frame, str):
                fields = decode_text_frame(frame)
                if stream is None:
                    config = start_config(fields, config)
                    stream = BaselineStream(config, models, send)
                else:
                    config = stream.config = update_config(stream.config, fields)
                if config.ends_stream:
                    await stream.finish()
                    stream = None
            elif stream is None:
                raise ProtocolError("audio_before_config", "binary audio received with no stream open: send a "
                                    "JSON config first", CLOSE_POLICY_VIOLATION)
            else:
                await stream.feed(frame)
    except ConnectionClosed:
        pass
    except ProtocolError as exc:
        await _close_with_error(websocket, config, exc.code, exc.message, exc.close_code)
    except Exception as exc:  # one stream's failure must not take the server down
        log.exception("stream failed")
        await _close_with_error(websocket, config, "internal_error", f"internal server error: {exc!r}",
                                CLOSE_INTERNAL_ERROR)


async def _close_with_error(websocket, config: StreamConfig | None, code: str, reason: str, close_code: int) -> None:
    try:
        await websocket.send(json.dumps(error_message(config.mode if config else "", config.wav_name if config else "",
                                                      code, reason)))
        await websocket.close(close_code, reason[:120])
    except ConnectionClosed:
        pass


async def serve_forever(models: Models, host: str, port: int) -> None:
    # No keepalive pings, as in FunASR's own server: while a long generate() holds the one
    # model thread, a late pong must not close a healthy stream.
    async with serve(lambda ws: handle_connection(ws, models), host, port, max_size=None, ping_interval=None,
                     select_subprotocol=lambda _conn, offered: offered[0] if offered else None) as server:
        log.info("baseline server listening on ws://%s:%d/", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="model store with vad/, paraformer_streaming/, funasr_nano/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10096)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the model calls")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="cap on second-pass tokens per segment (FunASR's max_length; the service's "
                             "funasr_nano_vllm caps at its max_new_tokens parameter, 256)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    if args.threads < 1 or args.max_new_tokens < 1:
        parser.error("--threads and --max-new-tokens must be at least 1")
    try:
        models = Models(args.store, args.threads, args.max_new_tokens)
    except Exception as exc:
        log.error("cannot load the models from %s: %s", args.store, exc)
        return 1
    try:
        asyncio.run(serve_forever(models, args.host, args.port))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
