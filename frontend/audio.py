"""Client audio -> 16 kHz int16 samples, and the recent audio a stream keeps for its
second pass. Pure: no I/O."""

from __future__ import annotations

import struct
from collections import deque

import numpy as np
import soxr

from frontend.protocol import CLOSE_UNSUPPORTED_DATA, SAMPLE_RATE, ProtocolError

# A RIFF header with a few metadata chunks fits easily; more means this is not a header.
MAX_WAV_HEADER_BYTES = 64 * 1024
_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


class WavHeaderSkipper:
    """Strips a RIFF/WAVE header from the start of a byte stream, wherever the frame
    boundaries fall. Audio that does not start with "RIFF" passes through untouched (some
    clients say "wav" and send bare PCM)."""

    def __init__(self):
        self._pending = b""
        self.done = False
        self.sample_rate: int | None = None

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self._pending += data
        if len(self._pending) < 12:
            return b""
        if not (self._pending.startswith(b"RIFF") and self._pending[8:12] == b"WAVE"):
            return self._finish(0)
        offset = 12
        while offset + 8 <= len(self._pending):
            chunk_id = self._pending[offset:offset + 4]
            (chunk_len,) = struct.unpack_from("<I", self._pending, offset + 4)
            body = offset + 8
            if chunk_id == b"data":
                return self._finish(body)
            if chunk_id == b"fmt ":
                if body + 16 > len(self._pending):
                    break
                self._check_format(self._pending[body:body + 16])
            offset = body + chunk_len + (chunk_len & 1)  # chunks are padded to even sizes
        if len(self._pending) > MAX_WAV_HEADER_BYTES:
            raise ProtocolError(
                "invalid_wav_header",
                f"no 'data' chunk within the first {MAX_WAV_HEADER_BYTES} bytes of the WAV stream",
                CLOSE_UNSUPPORTED_DATA,
            )
        return b""

    def flush(self) -> bytes:
        """End of stream before the header was complete: whatever was held is audio only
        if it never looked like a header."""
        if self.done or self._pending.startswith(b"RIFF"):
            return b""
        return self._finish(0)

    def _finish(self, audio_offset: int) -> bytes:
        self.done = True
        audio, self._pending = self._pending[audio_offset:], b""
        return audio

    def _check_format(self, fmt: bytes) -> None:
        audio_format, channels, sample_rate, _, _, bits = struct.unpack("<HHIIHH", fmt)
        if audio_format not in (_WAVE_FORMAT_PCM, _WAVE_FORMAT_EXTENSIBLE) or channels != 1 or bits != 16:
            raise ProtocolError(
                "unsupported_wav_format",
                f"WAV audio must be 16-bit mono PCM, got format {audio_format}, {channels} channel(s), {bits} bits",
                CLOSE_UNSUPPORTED_DATA,
            )
        self.sample_rate = sample_rate


class AudioInput:
    """Binary frames of one stream -> int16 samples at 16 kHz.

    Frames may split samples: an odd trailing byte waits for the next frame. Other sample
    rates are resampled with soxr's streaming resampler (state carried across frames).
    """

    def __init__(self, audio_fs: int, wav_format: str):
        self.audio_fs = audio_fs
        self._header = WavHeaderSkipper() if wav_format == "wav" else None
        self._odd_byte = b""
        self._resampler: soxr.ResampleStream | None = None
        self._rate_known = self._header is None

    def feed(self, data: bytes) -> np.ndarray:
        if self._header is not None:
            data = self._header.feed(data)
            if not self._header.done:
                return _EMPTY
            self._adopt_header_rate()
        return self._convert(data, last=False)

    def finish(self) -> np.ndarray:
        """End of stream: the resampler's tail; a lone odd byte is dropped."""
        if self._header is not None and not self._header.done:
            data = self._header.flush()
            self._adopt_header_rate()
            return self._convert(data, last=True)
        return self._convert(b"", last=True)

    def _adopt_header_rate(self) -> None:
        # The RIFF header knows the true rate better than the config's audio_fs.
        if not self._rate_known:
            self._rate_known = True
            if self._header.sample_rate:
                self.audio_fs = self._header.sample_rate

    def _convert(self, data: bytes, last: bool) -> np.ndarray:
        data = self._odd_byte + data
        usable = len(data) & ~1
        self._odd_byte = data[usable:]
        samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.int16)
        if self.audio_fs == SAMPLE_RATE:
            return samples
        if self._resampler is None:
            self._resampler = soxr.ResampleStream(self.audio_fs, SAMPLE_RATE, 1, dtype="int16")
        return self._resampler.resample_chunk(samples, last=last)


_EMPTY = np.zeros(0, dtype=np.int16)


class AudioHistory:
    """The most recent 16 kHz audio of a stream, addressable by ms from the stream start.
    VAD reports a segment's start only after it has heard some of it, so a second-pass
    segment is cut from here."""

    def __init__(self):
        # Frames as received (no copy per append); joined only when a segment is cut.
        self._chunks: deque[np.ndarray] = deque()
        self._first_sample = 0  # stream position of the first held sample
        self._held = 0

    def append(self, pcm: np.ndarray) -> None:
        if len(pcm):
            self._chunks.append(pcm)
            self._held += len(pcm)

    @property
    def first_sample(self) -> int:
        """The stream position of the oldest sample held."""
        return self._first_sample

    def slice_ms(self, start_ms: int, end_ms: int) -> np.ndarray:
        """Samples in [start_ms, end_ms), clipped to what is still held."""
        return self.slice_samples(ms_to_samples(start_ms), ms_to_samples(end_ms))

    def slice_samples(self, start: int, end: int) -> np.ndarray:
        """Samples from stream position `start` to `end`, clipped to what is still held."""
        held = np.concatenate(self._chunks) if self._chunks else _EMPTY
        start = max(start - self._first_sample, 0)
        end = max(end - self._first_sample, start)
        return held[start:end].copy()

    def discard_before_ms(self, ms: int) -> None:
        cut = ms_to_samples(ms) - self._first_sample
        while self._chunks and cut > 0:
            first = self._chunks[0]
            if len(first) <= cut:
                self._chunks.popleft()
                dropped = len(first)
            else:
                self._chunks[0] = first[cut:]
                dropped = cut
            cut -= dropped
            self._first_sample += dropped
            self._held -= dropped


def ms_to_samples(ms: int) -> int:
    return ms * SAMPLE_RATE // 1000
