"""Turn WAV files into perf_analyzer --input-data JSON for every model.

vad / paraformer_streaming: one sequence per WAV, one step per chunk (the PCM chunk as the
frontend sends it). funasr_nano_vllm: one request per VAD segment of each WAV (segments
cut with the real FSMN-VAD, as the service does), for --streaming runs.

    python -m perf.pa_inputs --out perf/results/pa_inputs a.wav b.wav
    python -m perf.pa_inputs --out perf/results/pa_inputs --synthesise 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from twopass_asr.first_pass.options import DEFAULT_STEP_SAMPLES as CHUNK_SAMPLES
from twopass_asr.speech_synth import read_wav
from twopass_asr.store.model_store import bundled_vad_dir


def audio_tensor(pcm: np.ndarray) -> dict:
    return {"content": pcm.astype(np.int16).tolist(), "shape": [len(pcm)]}


def sequence_steps(pcm: np.ndarray, chunk_samples: int) -> list[dict]:
    return [{"AUDIO": audio_tensor(pcm[i : i + chunk_samples])} for i in range(0, len(pcm), chunk_samples)]


def vad_segments(pcm: np.ndarray, max_end_silence_ms: int = 800) -> list[np.ndarray]:
    from twopass_asr.vad.batched import BatchedStreamingVad, VadOptions

    vad = BatchedStreamingVad(bundled_vad_dir())
    stream = vad.new_stream(VadOptions(max_end_silence_ms=max_end_silence_ms))
    events = vad.process(stream, pcm, is_final=True)
    segments, start = [], None
    for beg, end in events:
        start = beg if beg >= 0 else start
        if end >= 0 and start is not None:
            segments.append(pcm[start * 16 : end * 16])
    return segments


def synthesised_wavs(count: int) -> list[np.ndarray]:
    from twopass_asr.speech_synth import ENGLISH_VOICE, MANDARIN_VOICE, speech_with_silences

    phrases = [
        ("jin1 tian1 tian1 qi4 hen3 hao3", MANDARIN_VOICE),
        ("please call me back when you get this message", ENGLISH_VOICE),
        ("wo3 men5 qu4 gong1 yuan2 san4 bu4 ba5", MANDARIN_VOICE),
        ("the meeting starts at nine tomorrow morning", ENGLISH_VOICE),
    ]
    return [
        speech_with_silences([phrases[(i + k) % len(phrases)] for k in range(3)], [500, 1200 + 100 * i, 1000, 600])
        for i in range(count)
    ]


def write_inputs(wavs: list[np.ndarray], out_dir: Path, chunk_samples: int = CHUNK_SAMPLES) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sequences = [sequence_steps(pcm, chunk_samples) for pcm in wavs]
    paths = {}
    for model in ("vad", "paraformer_streaming"):
        paths[model] = out_dir / f"{model}.json"
        paths[model].write_text(json.dumps({"data": sequences}))
    segments = [seg for pcm in wavs for seg in vad_segments(pcm)]
    if not segments:
        raise SystemExit("no speech segments found in the given audio")
    paths["funasr_nano_vllm"] = out_dir / "funasr_nano_vllm.json"
    paths["funasr_nano_vllm"].write_text(json.dumps({"data": [{"AUDIO": audio_tensor(seg)} for seg in segments]}))
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wavs", nargs="*", type=Path, help="16 kHz mono 16-bit WAV files")
    parser.add_argument("--synthesise", type=int, default=0, help="add N synthesised speech files (espeak-ng)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chunk-samples", type=int, default=CHUNK_SAMPLES)
    args = parser.parse_args(argv)
    wavs = [read_wav(p) for p in args.wavs] + synthesised_wavs(args.synthesise)
    if not wavs:
        parser.error("give WAV files or --synthesise N")
    for model, path in write_inputs(wavs, args.out, args.chunk_samples).items():
        print(f"{model}: {path}")


if __name__ == "__main__":
    main()
