"""StreamingFeatures against FunASR's own online frontend: each stream's features, call for call,
are the bits FunASR's WavFrontendOnline gives with its cache, whatever the chunk sizes, on the
compiled fbank (kaldi_fbank.c) and on kaldi-native-fbank's extractor (the VAD's frontend is
checked the same way in tests/vad)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from funasr.frontends.wav_frontend import WavFrontendOnline
from funasr.utils.load_utils import extract_fbank

from twopass_asr.audio import pcm16_to_float
from twopass_asr.store.random_paraformer import build_random_paraformer
from twopass_asr.streaming_fbank import StreamingFeatures


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    model_dir = build_random_paraformer(tmp_path_factory.mktemp("paraformer") / "tiny", "tiny", seed=7)
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    return WavFrontendOnline(cmvn_file=str(model_dir / "am.mvn"), **config["frontend_conf"])


@pytest.mark.parametrize("compiled", [True, False], ids=["kaldi_fbank.c", "kaldi-native-fbank"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_are_funasrs_bits_call_for_call(frontend, seed, compiled):
    rng = np.random.default_rng(seed)
    pcm = (rng.standard_normal(int(rng.integers(16000, 64000))) * 3000).clip(-32768, 32767).astype(np.int16)
    audio = pcm16_to_float(pcm)
    sizes, chunks, at = [9600, 960, 4000, 11, 1234, 16000, 399, 400, 401], [], 0
    while at < len(audio):
        size = int(rng.choice(sizes))
        chunks.append(audio[at:at + size])
        at += size
    features = StreamingFeatures(frontend, compiled=compiled)
    assert (features.compiled_fbank is not None) == compiled
    state, cache, frames = features.new_state(), {}, 0
    for index, chunk in enumerate(chunks):
        final = index == len(chunks) - 1
        expected, _ = extract_fbank([chunk], frontend=frontend, cache=cache, is_final=final)
        got = features.extract(state, chunk, final)
        assert torch.equal(got, expected.reshape(-1, features.dim)), index
        frames += len(got)
    assert frames > 10  # the stream did give features
