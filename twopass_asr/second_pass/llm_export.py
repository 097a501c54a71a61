"""The Fun-ASR-Nano LLM as a Hugging Face directory vLLM can load.

Fun-ASR-Nano keeps every weight (audio encoder, adaptor, LLM) in one model.pt, while vLLM
loads a Hugging Face directory. The export takes the `llm.`-prefixed tensors unchanged
(same dtype, same values, tied lm_head kept as its own copy) into model.safetensors next to
the LLM sub-directory's config and tokenizer files.

It runs lazily when the model loads, once per checkpoint, into the export cache
(twopass_asr.store.export_cache).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from twopass_asr.store.export_cache import cached_export, default_cache_root
from twopass_asr.store.model_store import ModelDirError

LLM_PREFIX = "llm."
WEIGHTS_FILE = "model.safetensors"


def default_export_root() -> Path:
    return default_cache_root() / "funasr_nano_llm"


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


def export_llm_dir(model_dir, llm_dir, export_root: Path | None = None) -> Path:
    """The vLLM-loadable directory of this Nano's LLM, exported on first use."""
    model_pt = Path(model_dir) / "model.pt"
    llm_dir = Path(llm_dir)

    def build(directory: Path) -> None:
        for item in llm_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, directory / item.name)
        _save_safetensors(llm_state_dict(model_pt), directory / WEIGHTS_FILE)

    return cached_export(model_pt, (llm_dir / "config.json").read_text(encoding="utf-8"),
                         export_root or default_export_root(), lambda d: (d / WEIGHTS_FILE).is_file(), build)


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


__all__ = ["default_export_root", "export_llm_dir", "llm_state_dict"]
