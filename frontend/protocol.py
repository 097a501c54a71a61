"""The FunASR 2pass WebSocket protocol (docs/protocol.md): config parsing and
validation, and the JSON messages the server sends. Pure: no I/O, no inference.

Where the protocol leaves room, this server decides:
- audio_fs other than 16000 (8000-192000 Hz) is resampled to 16 kHz (soxr, streaming);
  a "wav" stream's RIFF header rate overrides audio_fs. Times are ms of the stream.
- mode, audio_fs and wav_format are fixed for a stream (changing them: error
  "config_locked", close 1008); other fields may change at any time and apply from the
  next first-pass/VAD sequence (chunk_size, look-backs, vad_*) or the next finished
  segment (hotwords, itn, svs_lang, wav_name).
- A new stream on the same connection starts from the previous stream's settings.
- chunk_interval is validated but only paces the client: the server decodes every
  chunk_size[1]*60 ms of audio whatever the frame sizes.
- `is_speaking: false` or `is_end: true` ends the stream. Unknown fields and null values
  are ignored.
- The stream's last message carries is_final/is_end; when the end-of-stream flush yields a
  result (the last segment's second pass; the first pass's tail in online mode) that result
  is the final message, otherwise it has empty text.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from twopass_asr.audio import SAMPLE_RATE
from twopass_asr.first_pass.options import CHUNK_SIZE_BOUNDS, LOOK_BACK_BOUNDS, SAMPLES_PER_CHUNK_UNIT
from twopass_asr.hotwords import check_language, parse_hotwords

MODES = ("online", "offline", "2pass")
WAV_FORMATS = ("pcm", "wav")
# soxr resamples any rate; outside this range the audio is surely mislabelled.
MIN_AUDIO_FS, MAX_AUDIO_FS = 8000, 192000

# WebSocket close codes (RFC 6455).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013


class ProtocolError(Exception):
    """Bad input from the client. `code` is the short machine code sent in the error
    message, `close_code` the WebSocket close code that follows it."""

    def __init__(self, code: str, message: str, close_code: int = CLOSE_INVALID_PAYLOAD):
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


@dataclass(frozen=True)
class StreamConfig:
    mode: str = "2pass"
    chunk_size: tuple[int, int, int] = (5, 10, 5)
    # Client-side pacing only: the server decodes every chunk_size[1]*60 ms of audio
    # whatever the frame size, so this is validated and echoed nowhere.
    chunk_interval: int = 10
    encoder_chunk_look_back: int = 4
    decoder_chunk_look_back: int = 1
    audio_fs: int = SAMPLE_RATE
    wav_name: str = "demo"
    wav_format: str = "pcm"
    is_speaking: bool = True
    is_end: bool = False
    hotwords: str = ""
    itn: bool = True
    svs_lang: str = "auto"
    vad_tail_sil: int = 800
    vad_max_len: int = 60000
    vad_energy: float | None = None

    @property
    def first_pass_chunk_samples(self) -> int:
        """Samples per first-pass decode step (chunk_size[1] * 60 ms at 16 kHz)."""
        return self.chunk_size[1] * SAMPLES_PER_CHUNK_UNIT

    @property
    def ends_stream(self) -> bool:
        return not self.is_speaking or self.is_end


# Fields that shape the audio path; changing them inside a stream would reinterpret audio
# already received, so they are fixed until the stream ends.
FIXED_DURING_STREAM = ("mode", "audio_fs", "wav_format")


def _type_error(field: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError("invalid_config", f"field '{field}' must be {expected}, got {json.dumps(value)}")


def _int(field: str, value: Any, low: int, high: int) -> int:
    # bool is an int subclass in Python but never a valid number on the wire.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(field, "an integer", value)
    if not low <= value <= high:
        raise ProtocolError("invalid_config", f"field '{field}' must be between {low} and {high}, got {value}")
    return value


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(field, "true or false", value)
    return value


def _str(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(field, "a string", value)
    return value


def _chunk_size(value: Any) -> tuple[int, int, int]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise _type_error("chunk_size", 'three integers, as [a, b, c] or "a,b,c"', value) from None
    if not isinstance(value, list) or len(value) != 3:
        raise _type_error("chunk_size", 'three integers, as [a, b, c] or "a,b,c"', value)
    a, b, c = (_int(f"chunk_size[{i}]", v, *bounds) for i, (v, bounds) in enumerate(zip(value, CHUNK_SIZE_BOUNDS)))
    return (a, b, c)


def _mode(value: Any) -> str:
    value = _str("mode", value)
    if value not in MODES:
        raise ProtocolError("invalid_config", f"field 'mode' must be one of {', '.join(MODES)}, got {json.dumps(value)}")
    return value


def _wav_format(value: Any) -> str:
    value = _str("wav_format", value)
    if value.lower() not in WAV_FORMATS:
        raise ProtocolError(
            "unsupported_wav_format",
            f"wav_format {json.dumps(value)} is not supported: send 16-bit mono PCM as \"pcm\" "
            "(or \"wav\" with its RIFF header)",
            CLOSE_UNSUPPORTED_DATA,
        )
    return value.lower()


def _audio_fs(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error("audio_fs", "an integer sample rate in Hz", value)
    if not MIN_AUDIO_FS <= value <= MAX_AUDIO_FS:
        raise ProtocolError(
            "unsupported_audio_fs",
            f"audio_fs {value} is not supported: sample rates from {MIN_AUDIO_FS} to {MAX_AUDIO_FS} Hz are resampled to 16000",
            CLOSE_UNSUPPORTED_DATA,
        )
    return value


def _hotwords(value: Any) -> str:
    value = _str("hotwords", value)
    try:
        parse_hotwords(value)
    except ValueError as exc:
        raise ProtocolError("invalid_config", f"field 'hotwords': {exc}") from None
    return value


def _vad_energy(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error("vad_energy", "a number (dB)", value)
    if not -200 <= value <= 100:
        raise ProtocolError("invalid_config", f"field 'vad_energy' must be between -200 and 100 dB, got {value}")
    return float(value)


def _svs_lang(value: Any) -> str:
    value = _str("svs_lang", value)
    try:
        return check_language(value)
    except ValueError as exc:
        raise ProtocolError("invalid_config", f"field 'svs_lang': {exc}") from None


_FIELD_PARSERS = {
    "mode": _mode,
    "chunk_size": _chunk_size,
    "chunk_interval": lambda v: _int("chunk_interval", v, 1, 1000),
    "encoder_chunk_look_back": lambda v: _int("encoder_chunk_look_back", v, *LOOK_BACK_BOUNDS),
    "decoder_chunk_look_back": lambda v: _int("decoder_chunk_look_back", v, *LOOK_BACK_BOUNDS),
    "audio_fs": _audio_fs,
    "wav_name": lambda v: _str("wav_name", v),
    "wav_format": _wav_format,
    "is_speaking": lambda v: _bool("is_speaking", v),
    "is_end": lambda v: _bool("is_end", v),
    "hotwords": _hotwords,
    "itn": lambda v: _bool("itn", v),
    "svs_lang": _svs_lang,
    "vad_tail_sil": lambda v: _int("vad_tail_sil", v, 1, 3_600_000),
    "vad_max_len": lambda v: _int("vad_max_len", v, 1, 3_600_000),
    "vad_energy": _vad_energy,
}


def decode_text_frame(text: str) -> dict[str, Any]:
    """A text frame -> its known fields, validated and normalised. Unknown fields (other
    clients send extras such as "svs_itn") are ignored, and so is null (JavaScript clients
    send it for settings left empty)."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", f"text frame is not JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(message, dict):
        raise ProtocolError("invalid_json", f"text frame must be a JSON object, got {type(message).__name__}")
    return {name: parse(message[name]) for name, parse in _FIELD_PARSERS.items() if message.get(name) is not None}


def start_config(fields: dict[str, Any], previous: StreamConfig | None) -> StreamConfig:
    """Config of a new stream. Like FunASR's servers, a later stream on the same connection
    keeps the previous stream's settings unless the new config overrides them; only the
    end-of-stream flags start afresh."""
    base = StreamConfig() if previous is None else dataclasses.replace(previous, is_speaking=True, is_end=False)
    return dataclasses.replace(base, **fields)


def update_config(config: StreamConfig, fields: dict[str, Any]) -> StreamConfig:
    """A JSON frame inside a running stream."""
    for name in FIXED_DURING_STREAM:
        if name in fields and fields[name] != getattr(config, name):
            raise ProtocolError(
                "config_locked",
                f"field '{name}' cannot change during a stream (is {json.dumps(getattr(config, name))}, "
                f"got {json.dumps(fields[name])}); end the stream with is_speaking=false first",
                CLOSE_POLICY_VIOLATION,
            )
    return dataclasses.replace(config, **fields)


def mode_label(mode: str, second_pass: bool) -> str:
    if mode == "2pass":
        return "2pass-offline" if second_pass else "2pass-online"
    return mode


def partial_message(config: StreamConfig, text: str) -> dict[str, Any]:
    return {"mode": mode_label(config.mode, False), "text": text, "wav_name": config.wav_name, "is_final": False}


def segment_message(config: StreamConfig, text: str, start_ms: int, end_ms: int) -> dict[str, Any]:
    return {
        "mode": mode_label(config.mode, True),
        "text": text,
        "wav_name": config.wav_name,
        "is_final": False,
        "start_time": start_ms,
        "end_time": end_ms,
    }


def final_message(config: StreamConfig, last_result: dict[str, Any] | None) -> dict[str, Any]:
    """The stream's last message: the result produced by the end-of-stream flush when there
    is one (the last segment, or the first pass's tail in online mode), else empty text."""
    if last_result is None:
        last_result = {"mode": mode_label(config.mode, config.mode != "online"), "text": "", "wav_name": config.wav_name}
    return {**last_result, "is_final": True, "is_end": True}


def error_message(mode: str, wav_name: str, code: str, reason: str) -> dict[str, Any]:
    return {"mode": mode, "wav_name": wav_name, "is_final": True, "is_end": True, "error": reason, "code": code}
