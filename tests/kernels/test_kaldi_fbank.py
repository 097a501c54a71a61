"""kaldi_fbank.c against kaldi-native-fbank itself: the same frames, bit for bit, over the options
FunASR's frontends use and others it supports, and the options it refuses named."""

from __future__ import annotations

import kaldi_native_fbank as knf
import numpy as np
import pytest

from twopass_asr.kernels.kaldi_fbank import NativeFbank, kaldi_fbank_library, unsupported


@pytest.fixture(scope="module")
def library():
    library = kaldi_fbank_library()
    assert library is not None, "kaldi_fbank.c did not compile"
    return library


def fbank_options(sample_rate=16000, window="hamming", bins=80, preemphasis=0.97, remove_dc_offset=True):
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = float(sample_rate)
    options.frame_opts.dither = 0.0
    options.frame_opts.window_type = window
    options.frame_opts.preemph_coeff = preemphasis
    options.frame_opts.remove_dc_offset = remove_dc_offset
    options.mel_opts.num_bins = bins
    options.energy_floor = 0.0
    return options


def signal(kind: str, samples: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "speech-like noise":
        return (rng.standard_normal(samples) * 3000).astype(np.float32)
    if kind == "clipped":
        return np.clip(rng.standard_normal(samples) * 40000, -32768, 32767).astype(np.float32)
    if kind == "near silence":
        return (rng.standard_normal(samples) * 0.01).astype(np.float32)
    if kind == "silence":
        return np.zeros(samples, dtype=np.float32)
    tone = np.sin(2 * np.pi * 440 * np.arange(samples) / 16000) * 8000
    return (tone + rng.integers(-3, 4, samples)).astype(np.float32)


def kaldi_native_frames(options: knf.FbankOptions, samples: np.ndarray) -> np.ndarray:
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(options.frame_opts.samp_freq, samples.tolist())
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


@pytest.mark.parametrize("kind", ["speech-like noise", "clipped", "near silence", "silence", "tone"])
@pytest.mark.parametrize("window", ["hamming", "povey", "hanning"])
def test_frames_are_kaldi_native_fbanks_bits(library, kind, window):
    rng = np.random.default_rng(len(kind) * 7 + len(window))
    options = fbank_options(window=window)
    samples = signal(kind, 16000 * 3 + 123, rng)
    expected = kaldi_native_frames(options, samples)
    got = NativeFbank(options, library).frames(samples)
    assert got.shape == expected.shape == (299, 80)
    assert np.array_equal(got.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("sample_rate,window,bins,preemphasis,remove_dc_offset", [
    (16000, "rectangular", 23, 0.0, False),
    (16000, "blackman", 40, 0.97, False),
    (16000, "sine", 80, 0.0, True),
    (48000, "hamming", 80, 0.97, True),  # a 2048-point FFT
])
def test_other_supported_options_give_the_same_bits(library, sample_rate, window, bins, preemphasis, remove_dc_offset):
    options = fbank_options(sample_rate, window, bins, preemphasis, remove_dc_offset)
    assert unsupported(options) is None
    samples = signal("speech-like noise", sample_rate * 2, np.random.default_rng(sample_rate + bins))
    expected = kaldi_native_frames(options, samples)
    assert np.array_equal(NativeFbank(options, library).frames(samples).view(np.int32), expected.view(np.int32))


def test_fewer_samples_than_a_frame_give_no_frames(library):
    fbank = NativeFbank(fbank_options(), library)
    assert fbank.frames(np.ones(399, dtype=np.float32)).shape == (0, 80)
    assert fbank.frames(np.ones(400, dtype=np.float32)).shape == (1, 80)
    assert fbank.frames(np.ones(400 + 159, dtype=np.float32)).shape == (1, 80)
    assert fbank.frames(np.ones(400 + 160, dtype=np.float32)).shape == (2, 80)


def test_unsupported_options_are_named_and_refused(library):
    dithered = fbank_options()
    dithered.frame_opts.dither = 1.0
    edges = fbank_options()
    edges.frame_opts.snip_edges = False
    narrowband = fbank_options(sample_rate=8000)  # a 256-point FFT: 128 complex points, not a power of 4
    assert unsupported(dithered) == "unsupported fbank options: dither"
    assert unsupported(edges) == "unsupported fbank options: snip_edges"
    assert unsupported(narrowband) == "unsupported fbank options: fft_length"
    with pytest.raises(ValueError, match="dither"):
        NativeFbank(dithered, library)


def test_samples_in_another_float_type_are_taken_as_float32(library):
    fbank = NativeFbank(fbank_options(), library)
    samples = np.random.default_rng(3).standard_normal(4000) * 3000
    assert np.array_equal(fbank.frames(samples), fbank.frames(samples.astype(np.float32)))
    assert np.array_equal(fbank.frames(samples[::2]), fbank.frames(samples[::2].astype(np.float32)))
