"""The Fun-ASR-Nano LLM as a Hugging Face directory vLLM can load.

Fun-ASR-Nano keeps every weight (audio encoder, adaptor, LLM) in one model.pt, while vLLM
loads a Hugging Face directory. The export takes the `llm.`-prefixed tensors unchanged
(same dtype, same values, tied lm_head kept as its own copy) into model.safetensors next to
the LLM sub-directory's config and tokenizer files.

It runs lazily when the model loads, into a cache directory keyed by the checkpoint's path,
size and modification time: the model store stays as the user prepared it (it may be
read-only), and a replaced model.pt gets a fresh export instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from twopass_asr.store.model_store import ModelDirError

LLM_PREFIX = "llm."
WEIGHTS_FILE = "model.safetensors"


def default_export_root() -> Path:
    """Next to vLLM's own cache (the launcher points VLLM_CACHE_ROOT into the project)."""
    vllm_cache = os.environ.get("VLLM_CACHE_ROOT") or str(Path.home() / ".cache" / "vllm")
    return Path(vllm_cache) / "funasr_nano_llm"


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
    stat = model_pt.stat()
    key = json.dumps([str(model_pt.resolve()), stat.st_size, stat.st_mtime_ns,
                      (llm_dir / "config.json").read_text(encoding="utf-8")])
    target = (export_root or default_export_root()) / hashlib.sha256(key.encode()).hexdigest()[:20]
    if (target / WEIGHTS_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place, so a crash never leaves half a directory.
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        for item in llm_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        _save_safetensors(llm_state_dict(model_pt), staging / WEIGHTS_FILE)
        try:
            staging.rename(target)
        except OSError:
            if not (target / WEIGHTS_FILE).is_file():  # not a concurrent exporter winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
