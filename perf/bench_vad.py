"""Streaming VAD speed: batched FSMN-VAD vs FunASR's VAD run one stream at a time.

With the real FSMN-VAD weights and synthesised speech, B streams each feed chunks of
--chunk-ms. For B in --batches, one BatchedStreamingVad.process_batch call over the B
streams is timed against FunASR's AutoModel.generate(chunk_size=60) run stream after
stream on the same chunks (steady state: every stream's first chunk is a warm-up; medians
over --rounds chunks). Also checks the two give identical segment events.

    .venv/bin/python -m perf.bench_vad [--batches 1,2,4,8,16,32] [--rounds 5] [--chunk-ms 600]

Writes perf/results/vad_<chunk-ms>ms.{md,csv}.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perf.bench_args import add_batch_arguments, batch_counts
from twopass_asr import REPO_ROOT
from twopass_asr.audio import SAMPLE_RATE

DEFAULT_OUT = REPO_ROOT / "perf" / "results"


@dataclass
class Row:
    batch: int
    batched_wall_ms: float  # one process_batch call for all B streams
    batched_cpu_ms: float
    reference_wall_ms: float  # FunASR, the B streams one after another
    reference_cpu_ms: float
    identical_events: bool

    @property
    def speedup(self) -> float:
        return self.reference_wall_ms / self.batched_wall_ms


def recordings(count: int, min_samples: int) -> list[np.ndarray]:
    from twopass_asr.speech_synth import ENGLISH_VOICE, MANDARIN_VOICE, speech_with_silences

    phrases = [
        ("jin1 tian1 tian1 qi4 hen3 hao3", MANDARIN_VOICE),
        ("please call me back when you get this message", ENGLISH_VOICE),
        ("wo3 men5 qu4 gong1 yuan2 san4 bu4 ba5", MANDARIN_VOICE),
        ("the meeting starts at nine tomorrow morning", ENGLISH_VOICE),
    ]
    out = []
    for i in range(count):
        pcm = speech_with_silences([phrases[(i + k) % len(phrases)] for k in range(3)],
                                   [400 + 200 * i, 900, 700, 300], noise_db=-50.0 - 5 * i, seed=i)
        out.append(np.tile(pcm, -(-min_samples // len(pcm)))[:min_samples])
    return out


class FunasrPerStream:
    """FunASR's streaming VAD as its examples run it: generate() per chunk with the
    stream's own cache; the model's options are swapped to the stream's copy."""

    def __init__(self, model_dir: Path):
        from funasr import AutoModel

        # ncpu: AutoModel otherwise sets torch's process-wide thread count to 4.
        self.model = AutoModel(model=str(model_dir), disable_update=True, disable_pbar=True, disable_log=True,
                               ncpu=torch.get_num_threads())
        self.pristine = copy.deepcopy(self.model.model.vad_opts)

    def new_stream(self, options) -> dict:
        from twopass_asr.vad.batched import stream_vad_opts

        return {"options": options, "opts": stream_vad_opts(self.pristine, options), "cache": {}}

    def process(self, stream: dict, pcm: np.ndarray, is_final: bool) -> list[list[int]]:
        from twopass_asr.audio import pcm16_to_float

        self.model.model.vad_opts = stream["opts"]
        kwargs = {}
        if stream["options"].max_end_silence_ms is not None:
            kwargs["max_end_silence_time"] = stream["options"].max_end_silence_ms
        result = self.model.generate(input=pcm16_to_float(pcm), cache=stream["cache"], is_final=is_final,
                                     chunk_size=60, **kwargs)
        return [list(map(int, seg)) for seg in result[0]["value"]]


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000, result


def bench_batch(engine, reference, audio: list[np.ndarray], batch: int, rounds: int, chunk: int) -> Row:
    from twopass_asr.vad.batched import VadOptions

    # Half the streams use a fixed end silence, half FunASR's dynamic schedule.
    options = [VadOptions(max_end_silence_ms=500) if i % 2 else VadOptions() for i in range(batch)]
    pcm = [np.roll(audio[i % len(audio)], 2371 * i) for i in range(batch)]
    streams = [engine.new_stream(o) for o in options]
    ref_streams = [reference.new_stream(o) for o in options]

    def chunks(r):
        return [p[r * chunk:(r + 1) * chunk] for p in pcm]

    def batched_round(r):
        return engine.process_batch(streams, chunks(r), [False] * batch)

    def reference_round(r):
        return [reference.process(s, c, False) for s, c in zip(ref_streams, chunks(r))]

    identical = batched_round(0) == reference_round(0)
    batched, ref = [], []
    for r in range(1, rounds + 1):
        wall, cpu, events = timed(lambda: batched_round(r))
        batched.append((wall, cpu))
        ref_wall, ref_cpu, ref_events = timed(lambda: reference_round(r))
        ref.append((ref_wall, ref_cpu))
        identical &= events == ref_events

    def median(values):
        return float(np.median(values))

    return Row(batch=batch, batched_wall_ms=median([w for w, _ in batched]),
               batched_cpu_ms=median([c for _, c in batched]), reference_wall_ms=median([w for w, _ in ref]),
               reference_cpu_ms=median([c for _, c in ref]), identical_events=identical)


HEADER = ["batch", "batched ms / call", "FunASR ms (B streams in turn)", "speed-up", "batched CPU ms / stream-chunk",
          "FunASR CPU ms / stream-chunk", "same events"]


def row_cells(row: Row) -> list[str]:
    return [str(row.batch), f"{row.batched_wall_ms:.1f}", f"{row.reference_wall_ms:.1f}", f"{row.speedup:.2f}x",
            f"{row.batched_cpu_ms / row.batch:.2f}", f"{row.reference_cpu_ms / row.batch:.2f}",
            "yes" if row.identical_events else "NO"]


def write_results(rows: list[Row], out_dir: Path, name: str, context: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    text = f"# Streaming VAD: batched vs per-stream FunASR\n\n{context}\n\n" + "\n".join(table) + "\n"
    (out_dir / f"{name}.md").write_text(text, encoding="utf-8")
    with open(out_dir / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["batch", "batched_wall_ms", "batched_cpu_ms", "reference_wall_ms", "reference_cpu_ms",
                         "identical_events"])
        for r in rows:
            writer.writerow([r.batch, f"{r.batched_wall_ms:.3f}", f"{r.batched_cpu_ms:.3f}",
                             f"{r.reference_wall_ms:.3f}", f"{r.reference_cpu_ms:.3f}", r.identical_events])
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_batch_arguments(parser, batches="1,2,4,8,16,32", rounds=5)
    parser.add_argument("--chunk-ms", type=int, default=600, help="chunk length the streams send")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--model-dir", type=Path, default=None, help="FSMN-VAD dir (default: the bundled real one)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    batches = batch_counts(parser, args)
    if args.chunk_ms < 10:
        parser.error("--chunk-ms must be >= 10")

    from twopass_asr.store.model_store import bundled_vad_dir
    from twopass_asr.vad.batched import BatchedStreamingVad

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or bundled_vad_dir()
    chunk = args.chunk_ms * SAMPLE_RATE // 1000
    engine = BatchedStreamingVad(model_dir)
    reference = FunasrPerStream(model_dir)
    audio = recordings(4, chunk * (args.rounds + 1))
    rows = []
    for batch in batches:
        rows.append(bench_batch(engine, reference, audio, batch, args.rounds, chunk))
        print(" | ".join(row_cells(rows[-1])), flush=True)
    context = (f"{args.chunk_ms} ms chunks of synthesised speech, real FSMN-VAD, torch threads={args.threads}, "
               f"median of {args.rounds} chunks per stream; CPU only.")
    print(write_results(rows, args.out, f"vad_{args.chunk_ms}ms", context))
    return 0 if all(r.identical_events for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
