"""Per-stream streaming features (fbank -> LFR -> CMVN) that reproduce FunASR's
WavFrontendOnline exactly, without its waveform bookkeeping.

FunASR keeps, per stream, the samples that did not fill a whole fbank frame and the fbank
frames that did not fill a whole LFR window; both carry over to the next call. Its fbank
(funasr.utils.fbank) runs kaldi-native-fbank (the project keeps torchaudio, its other backend,
out) afresh over those samples and the new ones at each call. This module gives each stream one
kaldi-native-fbank extractor with FunASR's options instead, fed each call's new samples only: a
frame is computed from its own samples alone, and the frames start at the same samples, so they
are the same bits, without setting up the window, FFT and mel banks again at every call. The
LFR splicing is FunASR's own (WavFrontendOnline.apply_lfr).
"""

from __future__ import annotations

from dataclasses import dataclass

import kaldi_native_fbank as knf
import numpy as np
import torch
from funasr.frontends.wav_frontend import WavFrontendOnline


@dataclass
class FeatureState:
    # This stream's fbank: it keeps the samples after the last whole frame (FunASR's
    # "input_cache") and numbers its frames from the stream's start.
    fbank: knf.OnlineFbank
    # Fbank frames handed on so far (those before it are discarded).
    frames_read: int = 0
    # Fbank frames not yet consumed by an LFR window (FunASR's "lfr_splice_cache"); None
    # until the first frame arrives, because FunASR seeds it by repeating that frame.
    splice_frames: torch.Tensor | None = None


class StreamingFeatures:
    """Feature extraction configured from a loaded WavFrontendOnline."""

    def __init__(self, frontend: WavFrontendOnline):
        if not isinstance(frontend, WavFrontendOnline):
            raise TypeError(f"streaming features need FunASR's WavFrontendOnline, got {type(frontend).__name__}")
        self.fs = frontend.fs
        self.lfr_m = frontend.lfr_m
        self.lfr_n = frontend.lfr_n
        self.dim = frontend.output_size()
        cmvn = frontend.cmvn
        self.cmvn_shift = None if cmvn is None else cmvn[0, : self.dim].clone()
        self.cmvn_scale = None if cmvn is None else cmvn[1, : self.dim].clone()
        # The options funasr.utils.fbank gives kaldi-native-fbank for WavFrontendOnline's call:
        # its frame, window and mel settings, no energy floor, the rest kaldi's defaults.
        self.fbank_options = knf.FbankOptions()
        self.fbank_options.frame_opts.samp_freq = float(frontend.fs)
        self.fbank_options.frame_opts.frame_length_ms = float(frontend.frame_length)
        self.fbank_options.frame_opts.frame_shift_ms = float(frontend.frame_shift)
        self.fbank_options.frame_opts.dither = float(frontend.dither)
        self.fbank_options.frame_opts.window_type = str(frontend.window)
        self.fbank_options.mel_opts.num_bins = int(frontend.n_mels)
        self.fbank_options.energy_floor = 0.0

    def new_state(self) -> FeatureState:
        return FeatureState(fbank=knf.OnlineFbank(self.fbank_options))

    def extract(self, state: FeatureState, samples: torch.Tensor, is_final: bool) -> torch.Tensor:
        """Feed float samples in [-1, 1); returns the LFR+CMVN frames that became complete,
        shape (frames, n_mels * lfr_m). A final call ends the state."""
        # As FunASR scales them; a list is the sequence kaldi-native-fbank's binding takes fastest.
        state.fbank.accept_waveform(self.fs, (samples * (1 << 15)).numpy().tolist())
        if is_final:
            state.fbank.input_finished()
        ready = state.fbank.num_frames_ready

        if ready > state.frames_read:
            fbank = torch.from_numpy(np.stack([state.fbank.get_frame(i) for i in range(state.frames_read, ready)]))
            state.fbank.pop(ready - state.frames_read)
            state.frames_read = ready
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
