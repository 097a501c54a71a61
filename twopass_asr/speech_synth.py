"""Synthesised speech with silences (espeak-ng + sox) for tests and benchmarks: there is
no speech corpus on our machines, and VAD needs real speech-like audio to cut."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from twopass_asr.audio import SAMPLE_RATE

# espeak-ng's "cmn" voice reads pinyin with English rules; this one reads it as Mandarin.
MANDARIN_VOICE = "cmn-latn-pinyin"
ENGLISH_VOICE = "en-us"


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found: install it with `apt-get install {package}` (scripts/setup.sh does)")
    return path


def speak(text: str, voice: str = MANDARIN_VOICE, speed_wpm: int = 160) -> np.ndarray:
    """One utterance as 16 kHz mono int16."""
    espeak = _require("espeak-ng", "espeak-ng")
    sox = _require("sox", "sox")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        out = Path(tmp) / "out.wav"
        subprocess.run([espeak, "-v", voice, "-s", str(speed_wpm), "-w", str(raw), text], check=True,
                       capture_output=True)
        subprocess.run([sox, str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(out)], check=True,
                       capture_output=True)
        return read_wav(out)


def speech_with_silences(
    utterances: list[tuple[str, str]], silence_ms: list[int], noise_db: float | None = None, seed: int = 0
) -> np.ndarray:
    """silence_ms[i] of silence before utterance i, and silence_ms[-1] after the last one;
    optional white noise at `noise_db` dBFS over everything."""
    if len(silence_ms) != len(utterances) + 1:
        raise ValueError("need one silence before each utterance plus one after the last")
    parts = []
    for (text, voice), gap in zip(utterances, silence_ms):
        parts.append(np.zeros(gap * SAMPLE_RATE // 1000, dtype=np.int16))
        parts.append(speak(text, voice))
    parts.append(np.zeros(silence_ms[-1] * SAMPLE_RATE // 1000, dtype=np.int16))
    audio = np.concatenate(parts).astype(np.float32)
    if noise_db is not None:
        rng = np.random.default_rng(seed)
        audio += rng.normal(0.0, 32768.0 * 10 ** (noise_db / 20), audio.shape)
    return np.clip(audio, -32768, 32767).astype(np.int16)


def read_wav(path: str | Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1 or wav.getframerate() != SAMPLE_RATE:
            raise ValueError(f"{path}: expected 16 kHz mono 16-bit PCM WAV")
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).copy()


def write_wav(path: str | Path, pcm: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(np.asarray(pcm, dtype=np.int16).tobytes())
    return Path(path)
