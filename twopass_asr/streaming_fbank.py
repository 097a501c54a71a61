"""Per-stream streaming features (fbank -> LFR -> CMVN) that reproduce FunASR's
WavFrontendOnline exactly, without its waveform bookkeeping.

FunASR keeps, per stream, the samples that did not fill a whole fbank frame and the fbank
frames that did not fill a whole LFR window; both carry over to the next call. This module
keeps the same two leftovers and calls the same fbank kernel (funasr.utils.fbank) and LFR
splicing (WavFrontendOnline.apply_lfr), so features are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from funasr.frontends.wav_frontend import WavFrontendOnline
from funasr.utils import fbank as funasr_fbank


@dataclass
class FeatureState:
    # Samples after the last whole fbank frame (FunASR's "input_cache").
    leftover_samples: torch.Tensor
    # Fbank frames not yet consumed by an LFR window (FunASR's "lfr_splice_cache"); None
    # until the first frame arrives, because FunASR seeds it by repeating that frame.
    splice_frames: torch.Tensor | None = None


class StreamingFeatures:
    """Feature extraction configured from a loaded WavFrontendOnline."""

    def __init__(self, frontend: WavFrontendOnline):
        if not isinstance(frontend, WavFrontendOnline):
            raise TypeError(f"streaming features need FunASR's WavFrontendOnline, got {type(frontend).__name__}")
        self.fs = frontend.fs
        self.n_mels = frontend.n_mels
        self.window = frontend.window
        self.frame_length_ms = frontend.frame_length
        self.frame_shift_ms = frontend.frame_shift
        self.frame_samples = frontend.frame_sample_length
        self.shift_samples = frontend.frame_shift_sample_length
        self.dither = frontend.dither
        self.lfr_m = frontend.lfr_m
        self.lfr_n = frontend.lfr_n
        self.dim = frontend.output_size()
        cmvn = frontend.cmvn
        self.cmvn_shift = None if cmvn is None else cmvn[0, : self.dim].clone()
        self.cmvn_scale = None if cmvn is None else cmvn[1, : self.dim].clone()

    def new_state(self) -> FeatureState:
        return FeatureState(leftover_samples=torch.empty(0))

    def extract(self, state: FeatureState, samples: torch.Tensor, is_final: bool) -> torch.Tensor:
        """Feed float samples in [-1, 1); returns the LFR+CMVN frames that became complete,
        shape (frames, n_mels * lfr_m)."""
        waveform = torch.cat((state.leftover_samples, samples))
        n_frames = WavFrontendOnline.compute_frame_num(waveform.shape[0], self.frame_samples, self.shift_samples)
        state.leftover_samples = waveform[n_frames * self.shift_samples:]

        if n_frames:
            fbank = funasr_fbank.fbank(
                (waveform * (1 << 15)).unsqueeze(0),
                num_mel_bins=self.n_mels,
                frame_length=self.frame_length_ms,
                frame_shift=self.frame_shift_ms,
                dither=self.dither,
                energy_floor=0.0,
                window_type=self.window,
                sample_frequency=self.fs,
            )
            if state.splice_frames is None:
                # LFR's left context at the very start is the first frame repeated.
                state.splice_frames = fbank[0:1].repeat((self.lfr_m - 1) // 2, 1)
            if not is_final and fbank.shape[0] + state.splice_frames.shape[0] < self.lfr_m:
                state.splice_frames = torch.cat((state.splice_frames, fbank))
                return self._no_frames()
            frames = torch.cat((state.splice_frames, fbank))
        elif is_final and state.splice_frames is not None:
            # apply_lfr reads through as_strided: give it its own storage, as FunASR does.
            frames = state.splice_frames.clone()
        else:
            return self._no_frames()

        lfr, state.splice_frames, _ = WavFrontendOnline.apply_lfr(frames, self.lfr_m, self.lfr_n, is_final)
        if self.cmvn_shift is not None:
            lfr += self.cmvn_shift
            lfr *= self.cmvn_scale
        return lfr

    def _no_frames(self) -> torch.Tensor:
        return torch.zeros((0, self.dim))
