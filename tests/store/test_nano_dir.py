"""The Fun-ASR-Nano directory validator: it names what is missing or mis-shaped before
anything loads the directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from twopass_asr.store.model_store import ModelDirError
from twopass_asr.store.nano_dir import validate_nano_dir
from twopass_asr.store.random_nano import LLM_SUBDIR, build_random_nano


@pytest.fixture(scope="module")
def tiny_nano(tmp_path_factory):
    return build_random_nano(tmp_path_factory.mktemp("nano") / "funasr_nano", "tiny", 0)


def state_dict(model_dir):
    return torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)


@pytest.fixture
def nano_copy(tiny_nano, tmp_path):
    return shutil.copytree(tiny_nano, tmp_path / "copy")


def test_validate_accepts_the_built_directory(tiny_nano):
    validate_nano_dir(tiny_nano)


@pytest.mark.parametrize("missing", ["config.yaml", "model.pt", f"{LLM_SUBDIR}/config.json",
                                     "multilingual.tiktoken", f"{LLM_SUBDIR}/tokenizer_config.json"])
def test_validate_names_a_missing_file(nano_copy, missing):
    (nano_copy / missing).unlink()
    with pytest.raises(ModelDirError, match=missing.split("/")[-1].replace(".", r"\.")):
        validate_nano_dir(nano_copy)


def test_validate_needs_some_tokenizer_files(nano_copy):
    (nano_copy / LLM_SUBDIR / "tokenizer.json").unlink()
    validate_nano_dir(nano_copy)  # vocab.json + merges.txt still describe the tokenizer
    (nano_copy / LLM_SUBDIR / "merges.txt").unlink()
    with pytest.raises(ModelDirError, match="tokenizer.json"):
        validate_nano_dir(nano_copy)


def test_validate_names_a_mismatched_or_missing_tensor(nano_copy):
    state = state_dict(nano_copy)
    name = "audio_adaptor.linear2.weight"
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    torch.save(state, nano_copy / "model.pt")
    with pytest.raises(ModelDirError, match=rf"{name} has shape \[{state[name].shape[0]}, "):
        validate_nano_dir(nano_copy)
    del state[name]
    torch.save(state, nano_copy / "model.pt")
    with pytest.raises(ModelDirError, match=f"lacks tensor {name}"):
        validate_nano_dir(nano_copy)


def test_validate_rejects_a_config_that_disagrees_with_the_llm(nano_copy):
    qwen_file = nano_copy / LLM_SUBDIR / "config.json"
    qwen = json.loads(qwen_file.read_text(encoding="utf-8"))
    qwen["intermediate_size"] *= 2
    qwen_file.write_text(json.dumps(qwen), encoding="utf-8")
    with pytest.raises(ModelDirError, match="mlp"):
        validate_nano_dir(nano_copy)


def test_validate_rejects_a_directory_that_does_not_exist(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        validate_nano_dir(tmp_path / "nowhere")
