"""Randomly initialised Fun-ASR-Nano model directories, laid out like the real
FunAudioLLM/Fun-ASR-Nano-2512, so tests and speed measurements can run FunASR's own
FunASRNano (and vLLM on its Qwen3 LLM) without the real weights, which are unreachable
offline.

Layout (same names as the real repository):
    config.yaml            FunASR config: SenseVoiceEncoderSmall -> Transformer adaptor -> Qwen3
    configuration.json     ModelScope metadata; its file_path_metas make the relative paths
                           below absolute when funasr.AutoModel loads the directory
    model.pt               state dict of the whole FunASRNano (audio_encoder., audio_adaptor.,
                           llm.), without CTC tensors (FunASR then disables CTC timestamps,
                           text is unaffected)
    multilingual.tiktoken  vocabulary of the CTC tokenizer config.yaml names
    Qwen3-0.6B/            config.json, generation_config.json and a Qwen2-style byte-level
                           BPE tokenizer (tokenizer.json, vocab.json, merges.txt,
                           tokenizer_config.json with a ChatML chat template)

"tiny" keeps the structure with small dimensions (fast CPU tests, float32, LLM head_dim 32
so vLLM's CPU attention runs it, generation capped by config.yaml `max_length`). "full" has
the real shapes (~0.98B parameters, bfloat16 like the real checkpoint) for speed
measurement. The text either produces is meaningless.
"""

from __future__ import annotations

import base64
import copy
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from twopass_asr.store.nano_dir import CTC_PREFIXES, CTC_VOCAB_FILE, resolved_model_kwargs

HUB_MODEL_ID = "FunAudioLLM/Fun-ASR-Nano-2512"
LLM_SUBDIR = "Qwen3-0.6B"
SIZES = ("tiny", "full")

# The real config.yaml's model-defining part (FunASR 1.4.x names). Dimensions are replaced
# per size; everything else is kept so the random model takes the real model's code paths.
REAL_CONFIG: dict = {
    "model": "FunASRNano",
    "model_conf": {"lsm_weight": 0.1, "length_normalized_loss": True},
    "audio_encoder": "SenseVoiceEncoderSmall",
    "audio_encoder_conf": {
        "output_size": 512,
        "attention_heads": 4,
        "linear_units": 2048,
        "num_blocks": 50,
        "tp_blocks": 20,
        "dropout_rate": 0.1,
        "positional_dropout_rate": 0.1,
        "attention_dropout_rate": 0.1,
        "input_layer": "pe",
        "pos_enc_class": "SinusoidalPositionEncoder",
        "normalize_before": True,
        "kernel_size": 11,
        "sanm_shfit": 0,
        "selfattention_layer_type": "sanm",
        "freeze": True,
        "freeze_layer_num": -1,
        "feat_permute": True,
    },
    "llm": "Qwen3-0.6b",
    "llm_conf": {
        "hub": "hf",
        "freeze": True,
        "llm_dtype": "bf16",
        "init_param_path": LLM_SUBDIR,
        "use_lora": False,
        "lora_conf": {
            "freeze_lora": True,
            "task_type": "CAUSAL_LM",
            "r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "bias": "none",
            "target_modules": ["q_proj", "v_proj"],
        },
    },
    "audio_adaptor": "Transformer",
    "audio_adaptor_conf": {
        "downsample_rate": 1,
        "use_low_frame_rate": True,
        "ffn_dim": 2048,
        "llm_dim": 1024,
        "encoder_dim": 512,
        "n_layer": 2,
        "freeze": True,
    },
    "ctc_decoder": "Transformer",
    "detach_ctc_decoder": True,
    "ctc_decoder_conf": {
        "downsample_rate": 1,
        "ffn_dim": 2048,
        "llm_dim": 512,
        "encoder_dim": 512,
        "n_layer": 5,
        "freeze": False,
    },
    "ctc_weight": 1.0,
    "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
    "frontend": "WavFrontend",
    "frontend_conf": {
        "fs": 16000,
        "window": "hamming",
        "n_mels": 80,
        "frame_length": 25,
        "frame_shift": 10,
        "lfr_m": 7,
        "lfr_n": 6,
        "cmvn_file": None,
    },
    "dataset": "FunASR",
    "dataset_conf": {
        "index_ds": "FunASR",
        "batch_sampler": "BatchSampler",
        "batch_type": "token",
        "batch_size": 6000,
        "max_token_length": 3500,
        "shuffle": True,
        "sort_size": 1024,
        "num_workers": 4,
        "audio_adaptor_downsample_rate": "${audio_adaptor_conf.downsample_rate}",
        "audio_encoder_downsample_rate": 6,
        "prompt_classes": "MultiContextPrompt",
        "prompt_conf": {
            "max_neg_hotwords_num": 0,
            "min_neg_hotwords_num": 0,
            "use_hist": False,
            "use_one_pass_result": True,
            "use_hotwords": True,
            "use_asr_hotwords": True,
        },
        "ctc_tokenizer": "SenseVoiceTokenizer",
        "ctc_target_normalize": True,
        "ctc_tokenizer_conf": {"vocab_path": None, "is_multilingual": True, "num_languages": 8749},
    },
    "tokenizer": "HuggingfaceTokenizer",
    "tokenizer_conf": {"init_param_path": "${llm_conf.init_param_path}"},
}

# configuration.json: file_path_metas are resolved against the model directory by FunASR's
# loader, which keeps the directory relocatable (no absolute paths in config.yaml).
CONFIGURATION_JSON: dict = {
    "framework": "pytorch",
    "task": "auto-speech-recognition",
    "model": {"type": "funasr"},
    "pipeline": {"type": "funasr-pipeline"},
    "model_name_in_hub": {"ms": HUB_MODEL_ID, "hf": HUB_MODEL_ID},
    "file_path_metas": {
        "init_param": "model.pt",
        "config": "config.yaml",
        "llm_conf": {"init_param_path": LLM_SUBDIR},
        "tokenizer_conf": {"init_param_path": LLM_SUBDIR},
        "dataset_conf": {"ctc_tokenizer_conf": {"vocab_path": CTC_VOCAB_FILE}},
    },
}

# Qwen3-0.6B's config.json. Special-token ids are filled in from the generated tokenizer.
REAL_QWEN3_CONFIG: dict = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Qwen2/Qwen3 added tokens, in the real order (ids follow the ordinary vocabulary);
# True = special (dropped by skip_special_tokens).
QWEN_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
REAL_QWEN_ORDINARY_VOCAB = 151643  # id of <|endoftext|> in the real tokenizer

# Qwen2's pre-tokenisation regex (contractions, letters, single digits, punctuation, spaces).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Written for this project: a ChatML template (what the real Qwen3 template renders for
# plain system/user/assistant messages).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text for the byte-level BPE: the prompt phrases FunASRNano builds plus everyday
# Chinese and English, so prompts and typical output tokenise into multi-byte pieces.
BPE_TRAINING_TEXT = """
You are a helpful assistant.
请结合上下文信息，更加准确地完成语音转写任务。如果没有相关信息，我们会留空。
**上下文信息：** 热词列表：[阿里巴巴, 通义, 魔搭, 千问] 语音转写：语音转写成中文：语音转写成英文：
语音转写，不进行文本规整：
今天天气很好，我们去公园散步吧。明天上午十点在会议室开会，请大家准时参加。
语音识别技术可以把声音转换成文字，广泛用于会议记录、字幕生成和智能客服。
这个模型支持中文、英文和日文，也支持多种方言和口音。请问现在几点了？
我想订一张去北京的火车票，最好是明天早上出发的。谢谢你的帮助，再见。
The quick brown fox jumps over the lazy dog. Speech recognition turns audio into text.
Please join the meeting at ten o'clock tomorrow morning in the main conference room.
We are testing a two-pass streaming service: the first pass is fast, the second is accurate.
Hello world, this is a test of the speech to text system. How are you doing today?
It's a good day, isn't it? We'll see what they've done. I'm sure you'd like it.
Numbers like 2024, 3.14 and 100% appear in transcripts, as do names and places.
"""


def build_random_nano(out_dir, size: str, seed: int = 0) -> Path:
    """Write a random-weight Fun-ASR-Nano directory to `out_dir` (created; must not hold
    files already). The same (size, seed) gives identical tensors."""
    import funasr.models.fun_asr_nano.model  # noqa: F401  (registers FunASRNano)
    from funasr.register import tables

    if size not in SIZES:
        raise ValueError(f"unknown Fun-ASR-Nano size {size!r}; expected one of {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"refusing to build Fun-ASR-Nano into non-empty directory {out_dir}")
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    def progress(message: str) -> None:
        print(f"[random-nano {size}] {time.perf_counter() - started:6.1f}s {message}",
              file=sys.stderr, flush=True)

    progress(f"building into {out_dir} (seed {seed})")
    special_ids = _write_qwen_tokenizer(out_dir / LLM_SUBDIR, size)
    progress(f"tokenizer written ({special_ids['<|endoftext|>']} ordinary tokens)")
    qwen_config = _qwen_config(size, special_ids)
    llm_dir = out_dir / LLM_SUBDIR
    (llm_dir / "config.json").write_text(json.dumps(qwen_config, indent=2) + "\n", encoding="utf-8")
    generation_config = {
        "bos_token_id": qwen_config["bos_token_id"],
        "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        "pad_token_id": special_ids["<|endoftext|>"],
        "do_sample": False,
    }
    config = nano_config(size)
    if "max_length" in config:
        generation_config["max_new_tokens"] = config["max_length"]
    (llm_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n",
                                                    encoding="utf-8")
    ctc_vocab_size = config.get("ctc_vocab_size", 60515)
    _write_ctc_vocab(out_dir / CTC_VOCAB_FILE, ctc_vocab_size)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
                                         encoding="utf-8")
    (out_dir / "configuration.json").write_text(json.dumps(CONFIGURATION_JSON, indent=2) + "\n",
                                                encoding="utf-8")
    progress("config.yaml, configuration.json, multilingual.tiktoken written")

    model_kwargs = resolved_model_kwargs(config, out_dir)
    torch.manual_seed(seed)
    model = tables.model_classes.get("FunASRNano")(**model_kwargs)
    if size == "tiny":
        _mute_unprintable_tokens(model.llm, out_dir / LLM_SUBDIR, special_ids["<|im_end|>"])
    progress(f"FunASRNano initialised ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
             "parameters incl. CTC)")
    save_dtype = torch.bfloat16 if size == "full" else torch.float32
    # Cloned: tied embeddings must not share storage (safetensors, which FunASR's vLLM
    # preparation writes, refuses shared tensors), as in the real checkpoint.
    state = {
        name: (tensor.detach().to(save_dtype) if tensor.is_floating_point() else tensor.detach()).clone()
        for name, tensor in model.state_dict().items()
        if not name.startswith(CTC_PREFIXES)
    }
    del model
    torch.save(state, out_dir / "model.pt")
    progress(f"model.pt written ({sum(t.numel() for t in state.values()) / 1e6:.1f}M parameters, "
             f"{(out_dir / 'model.pt').stat().st_size / 1e6:.0f} MB); done")
    return out_dir


def nano_config(size: str) -> dict:
    """config.yaml contents for a size: the real config, with small dimensions for tiny."""
    config = copy.deepcopy(REAL_CONFIG)
    # No dither, so FunASR's own reference decodes deterministically, as NanoRecognizer does.
    config["frontend_conf"]["dither"] = 0.0
    if size == "full":
        return config
    config["audio_encoder_conf"].update(output_size=32, attention_heads=4, linear_units=64,
                                        num_blocks=2, tp_blocks=1)
    config["audio_adaptor_conf"].update(ffn_dim=64, llm_dim=TINY_LLM["hidden_size"], encoder_dim=32)
    config["ctc_decoder_conf"].update(ffn_dim=64, llm_dim=32, encoder_dim=32, n_layer=1)
    config["llm_conf"]["llm_dtype"] = "fp32"
    config["ctc_vocab_size"] = TINY_CTC_VOCAB
    # Random weights rarely emit <|im_end|>: FunASR's own generation cap keeps outputs short.
    config["max_length"] = TINY_MAX_NEW_TOKENS
    return config


TINY_LLM = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 128,
    "max_window_layers": 2,
    "torch_dtype": "float32",
    # Tied embeddings make a random model repeat its last input token; untied, the output
    # depends on the audio and the prompt.
    "tie_word_embeddings": False,
}
TINY_BPE_VOCAB = 512
VOCABULARY_MULTIPLE = 128
TINY_CTC_VOCAB = 2048
TINY_MAX_NEW_TOKENS = 12


def _mute_unprintable_tokens(llm, llm_dir: Path, eos_id: int) -> None:
    """Zero the output-projection rows of tokens that do not decode to printable text on
    their own (partial UTF-8 bytes, control characters, added tokens other than EOS): with
    random weights greedy decoding then (practically) never picks them, so the tiny model's
    text is clean and decoding token by token (streaming) equals decoding all at once."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(llm_dir / "tokenizer.json"))
    ordinary = tokenizer.token_to_id(QWEN_ADDED_TOKENS[0][0])
    muted = [
        token_id for token_id in range(llm.lm_head.weight.shape[0])
        if token_id != eos_id and (token_id >= ordinary or not _printable(tokenizer.decode([token_id])))
    ]
    with torch.no_grad():
        llm.lm_head.weight[muted] = 0.0


def _printable(text: str) -> bool:
    return bool(text) and "\ufffd" not in text and all(ch.isprintable() or ch == " " for ch in text)


def _qwen_config(size: str, special_ids: dict[str, int]) -> dict:
    config = copy.deepcopy(REAL_QWEN3_CONFIG)
    if size == "tiny":
        config.update(TINY_LLM)
        # Padded past the tokenizer's tokens as Qwen's own configs are (151,936 for 151,669), so
        # that the output head has the shape the compiled kernels' tile order takes, as the real one.
        tokens = special_ids[QWEN_ADDED_TOKENS[-1][0]] + 1
        config["vocab_size"] = -(-tokens // VOCABULARY_MULTIPLE) * VOCABULARY_MULTIPLE
    config["bos_token_id"] = special_ids["<|endoftext|>"]
    config["eos_token_id"] = special_ids["<|im_end|>"]
    return config


def _write_qwen_tokenizer(llm_dir: Path, size: str) -> dict[str, int]:
    """Train a Qwen2-style byte-level BPE on the built-in text and save it as transformers
    and vLLM load Qwen's. Returns {added token: id}. For "full" the ordinary vocabulary is
    padded with never-merged pieces to the real 151643 entries, so every special token has
    its real id and every id the full-size LLM can emit decodes."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    llm_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_BPE_VOCAB if size == "tiny" else 4096,
                                  min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tokenizer.train_from_iterator(BPE_TRAINING_TEXT.strip().splitlines(), trainer=trainer)

    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if size == "full":
        _pad_vocab(vocab, REAL_QWEN_ORDINARY_VOCAB, pre_tokenizers.ByteLevel.alphabet())
    ordinary = len(vocab)
    special_ids = {}
    spec["added_tokens"] = []
    for offset, (content, special) in enumerate(QWEN_ADDED_TOKENS):
        special_ids[content] = ordinary + offset
        spec["added_tokens"].append({
            "id": ordinary + offset, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": special,
        })
    spec["post_processor"] = None
    (llm_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (llm_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = spec["model"]["merges"]
    merge_lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (llm_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n",
                                        encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(special_ids[content]): {"content": content, "lstrip": False, "normalized": False,
                                        "rstrip": False, "single_word": False, "special": special}
            for content, special in QWEN_ADDED_TOKENS
        },
        "additional_special_tokens": [c for c, special in QWEN_ADDED_TOKENS if special][1:],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (llm_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2),
                                                   encoding="utf-8")
    return special_ids


def _pad_vocab(vocab: dict[str, int], target: int, alphabet: list[str]) -> None:
    """Append unmerged byte-level pieces (all pairs, then triples, of the byte alphabet, in a
    fixed order) until the vocabulary has `target` entries."""
    alphabet = sorted(alphabet)
    length = 2
    while len(vocab) < target:
        for index in range(len(alphabet) ** length):
            piece = "".join(alphabet[(index // len(alphabet) ** k) % len(alphabet)]
                            for k in reversed(range(length)))
            if piece not in vocab:
                vocab[piece] = len(vocab)
                if len(vocab) == target:
                    return
        length += 1


def _write_ctc_vocab(path: Path, ctc_vocab_size: int) -> None:
    """A tiktoken vocabulary for the SenseVoiceTokenizer config.yaml names, sized so that
    ordinary tokens + the tokenizer's special tokens + the CTC blank = ctc_vocab_size (the
    real file's arithmetic). All 256 single bytes come first, so any text encodes."""
    from funasr.models.sense_voice.whisper_lib import tokenizer as whisper_tokenizer

    languages = REAL_CONFIG["dataset_conf"]["ctc_tokenizer_conf"]["num_languages"]
    specials = (2 + len(list(whisper_tokenizer.LANGUAGES)[:languages]) + len(whisper_tokenizer.AUDIO_EVENT)
                + len(whisper_tokenizer.EMOTION) + 6 + 50 + 1501)
    ordinary = ctc_vocab_size - 1 - specials
    if ordinary < 256:
        raise ValueError(f"ctc_vocab_size {ctc_vocab_size} leaves room for only {ordinary} byte tokens")
    pieces = [bytes([b]) for b in range(256)]
    first = 0
    while len(pieces) < ordinary:
        pieces.append(bytes([first // 256, first % 256]))
        first += 1
    path.write_text("".join(f"{base64.b64encode(p).decode()} {rank}\n" for rank, p in enumerate(pieces)),
                    encoding="ascii")
