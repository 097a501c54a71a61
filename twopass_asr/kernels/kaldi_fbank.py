"""Kaldi log mel filterbank frames from kaldi_fbank.c, with kaldi-native-fbank's bits.

kaldi-native-fbank, FunASR's fbank, plans its FFT again for every frame (KISS FFT's tables, a
sine and cosine for each of them), takes the samples as a Python list, is read a frame a call,
and holds the GIL throughout, so the first pass's worker threads took turns on it
(perf/RESULTS.md, 2026-12-07, session 37). kaldi_fbank.c plans once and does
kaldi-native-fbank's float operations in their order, many frames a call, without the GIL; the
window and mel weights are kaldi-native-fbank's own, read from it. The tests compare the
frames' bits with kaldi-native-fbank's.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np

from twopass_asr.kernels.row_kernels import C_POINTER, C_REAL, C_SIZE, FLAGS, compiled_library_or_none

SOURCES = tuple(Path(__file__).with_name(name) for name in ("kaldi_fbank.c", "vector_lanes.h"))


class FbankPlanStruct(ctypes.Structure):
    """kaldi_fbank.c's fbank_plan."""
    _fields_ = [("frame_length", C_SIZE), ("frame_shift", C_SIZE), ("fft_length", C_SIZE), ("remove_dc_offset", C_SIZE),
                ("preemphasis", C_REAL), ("log_floor", C_REAL), ("window", C_POINTER), ("bins", C_SIZE),
                ("bin_first", C_POINTER), ("bin_size", C_POINTER), ("bin_weights", C_POINTER), ("twiddles", C_POINTER),
                ("real_twiddles", C_POINTER), ("order", C_POINTER)]


SIGNATURES = {"fbank_fft_tables": ([C_SIZE, C_POINTER, C_POINTER, C_POINTER], None),
              "fbank_frames": ([ctypes.POINTER(FbankPlanStruct), C_POINTER, C_SIZE, C_POINTER], None)}


@functools.cache
def kaldi_fbank_library() -> ctypes.CDLL | None:
    """kaldi_fbank.c compiled for this CPU (row_kernels.compiled_library_or_none), once per process;
    None, with one warning, where it cannot be."""
    return compiled_library_or_none(SOURCES, "kaldi_fbank.so", FLAGS,
                                    "features are computed by kaldi-native-fbank (slower)", SIGNATURES)


def window_samples(options: knf.FbankOptions) -> tuple[int, int, int]:
    """A frame's length and shift in samples, rounded as kaldi-native-fbank rounds them (float32
    products, truncated), and its FFT's length (the length rounded up to a power of two)."""
    frame = options.frame_opts
    per_ms = np.float32(frame.samp_freq) * np.float32(0.001)
    length, shift = int(per_ms * np.float32(frame.frame_length_ms)), int(per_ms * np.float32(frame.frame_shift_ms))
    return length, shift, 1 << (length - 1).bit_length()


def unsupported(options: knf.FbankOptions) -> str | None:
    """Why kaldi_fbank.c cannot compute frames with these options, or None where it can: it does
    kaldi's log mel energies without dither, energy or edge reflection, on an FFT whose length is
    twice a power of 4 (512 for 16 kHz audio's 25 ms frames)."""
    frame = options.frame_opts
    fft_points = window_samples(options)[2] // 2
    # window_samples gives a power of two: a power of 4 has its one bit at an even position.
    checks = {"fft_length": fft_points >= 4 and fft_points.bit_length() % 2,
              "dither": frame.dither == 0, "snip_edges": frame.snip_edges, "use_energy": not options.use_energy,
              "use_log_fbank": options.use_log_fbank, "use_log_floor": options.use_log_floor,
              "use_power": options.use_power, "round_to_power_of_two": frame.round_to_power_of_two,
              "htk_mode": not options.mel_opts.htk_mode}
    wrong = [name for name, fine in checks.items() if not fine]
    return f"unsupported fbank options: {', '.join(wrong)}" if wrong else None


class NativeFbank:
    """One fbank configuration planned for kaldi_fbank.c (see `unsupported`)."""

    def __init__(self, options: knf.FbankOptions, library: ctypes.CDLL):
        reason = unsupported(options)
        if reason is not None:
            raise ValueError(reason)
        self.library = library
        self.frame_length, self.frame_shift, fft_length = window_samples(options)
        window = np.asarray(knf.FeatureWindowFunction(options.frame_opts).window, dtype=np.float32)
        mel = knf.MelBanks(options.mel_opts, options.frame_opts, 1.0).get_matrix()
        self.bins = mel.shape[0]
        # Each bin's weights from its first non-zero one to its last, as kaldi-native-fbank keeps them.
        spans = [np.flatnonzero(row)[[0, -1]] for row in mel]
        bin_first = np.array([first for first, _ in spans], dtype=np.int64)
        bin_size = np.array([last - first + 1 for first, last in spans], dtype=np.int64)
        bin_weights = np.concatenate([row[first:last + 1] for row, (first, last) in zip(mel, spans)]).astype(np.float32)
        twiddles = np.empty(fft_length, dtype=np.float32)
        real_twiddles = np.empty(fft_length // 2, dtype=np.float32)
        order = np.empty(fft_length // 2, dtype=np.int32)
        library.fbank_fft_tables(fft_length, twiddles.ctypes.data, real_twiddles.ctypes.data, order.ctypes.data)
        # The plan points into these arrays: they live as long as it.
        self._arrays = (window, bin_first, bin_size, bin_weights, twiddles, real_twiddles, order)
        self.plan = FbankPlanStruct(
            self.frame_length, self.frame_shift, fft_length, int(options.frame_opts.remove_dc_offset),
            options.frame_opts.preemph_coeff, options.eps, window.ctypes.data, self.bins, bin_first.ctypes.data,
            bin_size.ctypes.data, bin_weights.ctypes.data, twiddles.ctypes.data, real_twiddles.ctypes.data,
            order.ctypes.data)

    def frames(self, samples: np.ndarray) -> np.ndarray:
        """The whole frames of `samples` (as float32, the precision kaldi-native-fbank takes them
        in), frame f from sample f * frame_shift: shape (frames, bins)."""
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        count = 0 if len(samples) < self.frame_length else 1 + (len(samples) - self.frame_length) // self.frame_shift
        features = np.empty((count, self.bins), dtype=np.float32)
        if count:
            self.library.fbank_frames(ctypes.byref(self.plan), samples.ctypes.data, count, features.ctypes.data)
        return features


__all__ = ["FbankPlanStruct", "NativeFbank", "kaldi_fbank_library", "unsupported", "window_samples"]
