"""Does tritonserver stay up under hostile traffic? Sequence clients fire 100 ms chunks at
vad and paraformer_streaming as fast as they are answered, while second-pass clients send
2 s segments to funasr_nano_vllm and walk away from every other one (--cancel):

  none    read every segment to its final response
  timer   cancel at a random time 0.05-1.5 s after sending (a WebSocket user leaving)
  delta   cancel right after the third response (with --stream-deltas: mid-stream)

It prints what was answered and cancelled and whether the server survived, and exits 1 if
it did not. tritonserver 2.51 dies under `--cancel delta --stream-deltas` (README, "Known
limitations"); rerun this after upgrading Triton:

    python -m perf.server_stress --store .test_models --seconds 60 --cancel delta --stream-deltas
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from frontend.triton_client import SECOND_PASS_MODEL, InferenceError, TritonGateway
from perf.bench_first_pass_triton import speech_audio
from twopass_asr.serving.triton_launcher import TritonServer

CHUNK_SAMPLES = 1600
CANCEL_MODES = ("none", "timer", "delta")


@dataclass
class StressCounts:
    chunks_answered: list[int] = field(default_factory=list)  # per sequence client
    segments_sent: int = 0
    segments_cancelled: int = 0
    responses: int = 0


async def sequence_client(gateway: TritonGateway, pcm: np.ndarray, first_id: int, stop_at: float) -> int:
    """Sequences of pcm's 100 ms chunks on vad and paraformer_streaming, each chunk sent
    once the one before is answered; returns the chunks answered by both."""
    chunks = [pcm[i : i + CHUNK_SAMPLES] for i in range(0, len(pcm), CHUNK_SAMPLES)]
    first_pass = gateway.open_stream("paraformer_streaming")
    vad = gateway.open_stream("vad")
    answered, sequence_id = 0, first_id
    while time.monotonic() < stop_at:
        for index, chunk in enumerate(chunks):
            flags = {"start": index == 0, "end": index == len(chunks) - 1}
            await first_pass.infer(TritonGateway.audio_inputs(chunk), sequence_id, **flags)
            await vad.infer(TritonGateway.audio_inputs(chunk), sequence_id, **flags)
            answered += 1
        sequence_id += 1000
    await first_pass.close()
    await vad.close()
    return answered


async def segment_client(client, segment: np.ndarray, stop_at: float, cancel: str, stream_deltas: bool,
                         rng: random.Random, counts: StressCounts) -> None:
    # The frontend's request (its defaults: no hotwords, language auto, itn on).
    inputs = TritonGateway.segment_inputs(segment, hotwords="", language="auto", itn=True, stream=stream_deltas)
    while time.monotonic() < stop_at:
        walk_away = cancel != "none" and counts.segments_sent % 2 == 1
        counts.segments_sent += 1

        async def one_request():
            yield {"model_name": SECOND_PASS_MODEL, "inputs": inputs}

        responses = client.stream_infer(one_request())

        async def read(stop_after: int | None) -> bool:
            """True when it stopped after stop_after responses, before the stream ended."""
            seen = 0
            async for _, error in responses:
                if error is not None:
                    raise RuntimeError(f"{SECOND_PASS_MODEL}: {error.message()}")
                counts.responses += 1
                seen += 1
                if seen == stop_after:
                    return True
            return False

        if not walk_away:
            await read(None)
        elif cancel == "timer":
            try:
                await asyncio.wait_for(read(None), rng.uniform(0.05, 1.5))
            except asyncio.TimeoutError:
                responses.cancel()
                counts.segments_cancelled += 1
        elif await read(3):
            responses.cancel()
            counts.segments_cancelled += 1


async def run_load(url: str, seconds: float, sequence_clients: int, segment_clients: int, pcm: np.ndarray,
                   cancel: str = "timer", stream_deltas: bool = False, seed: int = 0,
                   counts: StressCounts | None = None) -> StressCounts:
    """The load above for `seconds`, counted into `counts`; raises the first client's
    failure (a dead server shows as an unavailable stream)."""
    counts = counts if counts is not None else StressCounts()
    gateway = TritonGateway(url)
    try:
        stop_at = time.monotonic() + seconds
        segment = pcm[: 2 * 16000]
        counts.chunks_answered = list(await asyncio.gather(
            *(sequence_client(gateway, pcm, 900_000 + index, stop_at) for index in range(sequence_clients)),
            *(segment_client(gateway.client, segment, stop_at, cancel, stream_deltas, random.Random(seed + index), counts)
              for index in range(segment_clients)),
        ))[:sequence_clients]
    finally:
        await gateway.close()
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="model store to serve (e.g. .test_models)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--sequence-clients", type=int, default=8)
    parser.add_argument("--segment-clients", type=int, default=6)
    parser.add_argument("--cancel", choices=CANCEL_MODES, default="delta")
    parser.add_argument("--stream-deltas", action="store_true", help="ask for text deltas (STREAM=true)")
    parser.add_argument("--log", type=Path, default=Path("perf/results/server_stress-tritonserver.log"))
    args = parser.parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(args.store, log_path=args.log) as server:
        started = time.monotonic()
        counts, failure = StressCounts(), None
        try:
            asyncio.run(run_load(server.grpc_url, args.seconds, args.sequence_clients, args.segment_clients,
                                 speech_audio(3), args.cancel, args.stream_deltas, counts=counts))
        except (InferenceError, grpc.RpcError, RuntimeError) as exc:
            failure = exc
        alive = server.process.poll() is None
        print(f"{time.monotonic() - started:.0f} s, cancel={args.cancel}, stream deltas={args.stream_deltas}")
        if counts.chunks_answered:
            print(f"chunks answered per sequence client: {counts.chunks_answered}")
        print(f"segments sent {counts.segments_sent}, cancelled {counts.segments_cancelled}, "
              f"responses {counts.responses}")
        if failure is not None:
            print(f"a client failed: {failure}")
        print(f"tritonserver {'alive' if alive else 'DIED'} (log: {args.log})")
    return 0 if alive and failure is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
