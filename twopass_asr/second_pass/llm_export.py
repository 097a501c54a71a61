"""The Fun-ASR-Nano LLM as a Hugging Face directory vLLM can load.

Fun-ASR-Nano keeps every weight (audio encoder, adaptor, LLM) in one model.pt, while vLLM
loads a Hugging Face directory. The export takes the `llm.`-prefixed tensors unchanged
(same dtype, same values, tied lm_head kept as its own copy) into model.safetensors next to
the LLM sub-directory's config and tokenizer files.

With `int8`, the decoder layers' linear weights (attention and MLP projections) are
quantized for vLLM's W8A8 path instead, in the compressed-tensors format vLLM reads: each
output channel's weights as int8, symmetric, scaled by its largest magnitude over 127, with
activations quantized per token at run time; embeddings, norms and the head stay as they are.

It runs lazily when the model loads, once per checkpoint (and form), into the export cache
(twopass_asr.store.export_cache).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from twopass_asr.kernels.tokenwise_int8 import int8_per_output_channel
from twopass_asr.store.export_cache import cached_export, default_cache_root
from twopass_asr.store.model_store import ModelDirError

LLM_PREFIX = "llm."
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# The decoder layers' linear projections (Qwen3's names) that the int8 form quantizes.
INT8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE_SUFFIX = "_scale"
INPUT_EMBEDDINGS = "model.embed_tokens.weight"


def default_export_root(int8: bool = False) -> Path:
    return default_cache_root() / ("funasr_nano_llm_int8" if int8 else "funasr_nano_llm")


def llm_state_dict(model_pt: Path) -> dict[str, torch.Tensor]:
    """The LLM's tensors of a Fun-ASR-Nano checkpoint, names without the `llm.` prefix."""
    state = torch.load(model_pt, map_location="cpu", mmap=True, weights_only=True)
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    llm = {name.removeprefix("module.")[len(LLM_PREFIX):]: tensor for name, tensor in state.items()
           if isinstance(tensor, torch.Tensor) and name.removeprefix("module.").startswith(LLM_PREFIX)}
    if not llm:
        raise ModelDirError(f"{model_pt} holds no LLM tensors (names starting with {LLM_PREFIX!r})")
    return llm


def export_llm_dir(model_dir, llm_dir, export_root: Path | None = None, int8: bool = False) -> Path:
    """The vLLM-loadable directory of this Nano's LLM (with `int8`, in vLLM's W8A8 form),
    exported on first use."""
    model_pt = Path(model_dir) / "model.pt"
    llm_dir = Path(llm_dir)

    def build(directory: Path) -> None:
        for item in llm_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, directory / item.name)
        state = llm_state_dict(model_pt)
        if int8:
            state = quantize_linear_weights(state)
            config = json.loads((llm_dir / CONFIG_FILE).read_text(encoding="utf-8"))
            config["quantization_config"] = W8A8_CONFIG
            (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        _save_safetensors(state, directory / WEIGHTS_FILE)

    form = "int8 w8a8 per-channel symmetric\n" if int8 else ""
    return cached_export(model_pt, form + (llm_dir / CONFIG_FILE).read_text(encoding="utf-8"),
                         export_root or default_export_root(int8), lambda d: (d / WEIGHTS_FILE).is_file(), build)


def mapped_input_embeddings(export_dir: Path) -> torch.Tensor:
    """The token embedding table [vocab, hidden] of an export (export_llm_dir), as stored,
    memory-mapped from its weights file: only the rows looked up are read into memory. The
    export cache never rewrites a finished export in place."""
    from safetensors import safe_open

    with safe_open(str(Path(export_dir) / WEIGHTS_FILE), framework="pt") as weights:
        return weights.get_tensor(INPUT_EMBEDDINGS)


def quantize_linear_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each INT8_LINEARS weight as int8 per output channel (int8_per_output_channel)
    and its scale beside it as `<name>_scale` [rows, 1]."""
    quantized = {}
    for name, tensor in state.items():
        if name.endswith(".weight") and name.split(".")[-2] in INT8_LINEARS:
            quantized[name], quantized[name + SCALE_SUFFIX] = int8_per_output_channel(tensor)
        else:
            quantized[name] = tensor
    return quantized


# compressed-tensors' description of that form: int8 weights, static per channel; int8
# activations, dynamic per token; both symmetric; every Linear but the head.
_INT8_SYMMETRIC = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "block_structure": None,
                   "actorder": None, "observer": None, "observer_kwargs": {}}
W8A8_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {**_INT8_SYMMETRIC, "strategy": "channel", "dynamic": False},
                                  "input_activations": {**_INT8_SYMMETRIC, "strategy": "token", "dynamic": True},
                                  "output_activations": None}},
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
}


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors sharing storage (tied embeddings); each gets its own copy.
    seen: set[int] = set()
    owned = {}
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        owned[name] = tensor.clone().contiguous() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    save_file(owned, str(path), metadata={"format": "pt"})


__all__ = ["INT8_LINEARS", "SCALE_SUFFIX", "W8A8_CONFIG", "default_export_root", "export_llm_dir",
           "llm_state_dict", "mapped_input_embeddings", "quantize_linear_weights"]
