"""Per-stream streaming features (fbank -> LFR -> CMVN) that reproduce FunASR's
WavFrontendOnline exactly, without its waveform bookkeeping.

FunASR keeps, per stream, the samples that did not fill a whole fbank frame and the fbank
frames that did not fill a whole LFR window; both carry over to the next call. Its fbank
(funasr.utils.fbank) runs kaldi-native-fbank (the project keeps torchaudio, its other backend,
out) afresh over those samples and the new ones at each call. This module gives each stream one
fbank with FunASR's options instead, fed each call's new samples only: a frame is computed from
its own samples alone, and the frames start at the same samples, so they are the same bits,
without setting up the window, FFT and mel banks again at every call. That fbank is
kaldi_fbank.c (twopass_asr.kernels.kaldi_fbank: kaldi-native-fbank's bits, its FFT planned once,
many frames a call) where it compiles and supports the options, else kaldi-native-fbank's online
extractor. The LFR splicing is FunASR's own (WavFrontendOnline.apply_lfr).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import kaldi_native_fbank as knf
import numpy as np
import torch
from funasr.frontends.wav_frontend import WavFrontendOnline

from twopass_asr.kernels.kaldi_fbank import NativeFbank, kaldi_fbank_library, unsupported

log = logging.getLogger(__name__)


class CompiledFbankStream:
    """One stream's fbank on kaldi_fbank.c: it keeps the samples from the next frame's start on
    (FunASR's "input_cache")."""

    def __init__(self, fbank: NativeFbank):
        self.fbank = fbank
        self.pending = np.zeros(0, dtype=np.float32)

    def new_frames(self, samples: np.ndarray, is_final: bool) -> np.ndarray:
        """The frames these float32 samples complete, shape (frames, bins). With whole frames
        only (kaldi's snip_edges), the stream's end adds none."""
        samples = np.concatenate((self.pending, samples))
        frames = self.fbank.frames(samples)
        self.pending = samples[len(frames) * self.fbank.frame_shift:]
        return frames


class KaldiNativeFbankStream:
    """One stream's fbank on kaldi-native-fbank's online extractor, which keeps the samples after
    the last whole frame and numbers its frames from the stream's start."""

    def __init__(self, options: knf.FbankOptions, sample_rate: int):
        self.fbank = knf.OnlineFbank(options)
        self.sample_rate = sample_rate
        # Frames handed on so far (those before it are discarded).
        self.frames_read = 0

    def new_frames(self, samples: np.ndarray, is_final: bool) -> np.ndarray:
        # A list is the sequence kaldi-native-fbank's binding takes fastest.
        self.fbank.accept_waveform(self.sample_rate, samples.tolist())
        if is_final:
            self.fbank.input_finished()
        ready = self.fbank.num_frames_ready
        if ready == self.frames_read:
            return np.zeros((0, self.fbank.dim), dtype=np.float32)
        # get_frame's arrays are views of the extractor's frames: copied (stacked) before pop frees them.
        frames = np.stack([self.fbank.get_frame(i) for i in range(self.frames_read, ready)])
        self.fbank.pop(ready - self.frames_read)
        self.frames_read = ready
        return frames


@dataclass
class FeatureState:
    fbank: CompiledFbankStream | KaldiNativeFbankStream
    # Fbank frames not yet consumed by an LFR window (FunASR's "lfr_splice_cache"); None
    # until the first frame arrives, because FunASR seeds it by repeating that frame.
    splice_frames: torch.Tensor | None = None


class StreamingFeatures:
    """Feature extraction configured from a loaded WavFrontendOnline; `compiled` False keeps
    kaldi-native-fbank's extractor (for comparisons)."""

    def __init__(self, frontend: WavFrontendOnline, compiled: bool = True):
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
        self.compiled_fbank = self._compiled_fbank() if compiled else None

    def _compiled_fbank(self) -> NativeFbank | None:
        reason = unsupported(self.fbank_options)
        if reason is not None:
            log.info("fbank on kaldi-native-fbank's extractor: kaldi_fbank.c has %s", reason)
            return None
        library = kaldi_fbank_library()
        return None if library is None else NativeFbank(self.fbank_options, library)

    def new_state(self) -> FeatureState:
        if self.compiled_fbank is not None:
            return FeatureState(fbank=CompiledFbankStream(self.compiled_fbank))
        return FeatureState(fbank=KaldiNativeFbankStream(self.fbank_options, self.fs))

    def extract(self, state: FeatureState, samples: torch.Tensor, is_final: bool) -> torch.Tensor:
        """Feed float samples in [-1, 1); returns the LFR+CMVN frames that became complete,
        shape (frames, n_mels * lfr_m). A final call ends the state."""
        # Scaled as FunASR scales them.
        new_frames = state.fbank.new_frames((samples * (1 << 15)).numpy(), is_final)

        if len(new_frames):
            fbank = torch.from_numpy(new_frames)
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
