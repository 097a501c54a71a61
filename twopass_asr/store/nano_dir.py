"""The Fun-ASR-Nano model directory: its layout (config.yaml, model.pt, the LLM directory,
the CTC vocabulary) and the validator that checks one before anything loads it."""

from __future__ import annotations

from pathlib import Path

from twopass_asr.funasr_classes import register_classes_of
from twopass_asr.store import model_store
from twopass_asr.store.model_store import ModelDirError

CTC_VOCAB_FILE = "multilingual.tiktoken"
# Tensors of the CTC head, which FunASR loads only for timestamps: optional in a checkpoint.
CTC_PREFIXES = ("ctc_decoder.", "ctc.")
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def resolved_model_kwargs(config: dict, model_dir: Path) -> dict:
    """Keyword arguments FunASR's AutoModel passes to FunASRNano for this directory:
    config.yaml merged with model_conf, paths made absolute the way configuration.json's
    file_path_metas make them, input size from the frontend (n_mels * lfr_m)."""
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    llm_dir = str(Path(model_dir) / resolved["llm_conf"]["init_param_path"])
    resolved["llm_conf"]["init_param_path"] = llm_dir
    resolved["tokenizer_conf"]["init_param_path"] = llm_dir
    if resolved.get("ctc_decoder"):
        resolved["dataset_conf"]["ctc_tokenizer_conf"]["vocab_path"] = str(Path(model_dir) / CTC_VOCAB_FILE)
    frontend = resolved["frontend_conf"]
    return {**resolved.get("model_conf", {}), **resolved,
            "input_size": frontend["n_mels"] * frontend["lfr_m"]}


def validate_nano_dir(path) -> dict[str, Path]:
    """Check a Fun-ASR-Nano directory before loading it: required files present and every
    model.pt tensor shaped as config.yaml and the LLM's config.json say (FunASR itself
    would silently leave mismatched tensors random). Raises ModelDirError naming the
    missing file or the mismatched tensor; returns the components' paths ("llm", and
    "ctc_vocab" where config.yaml configures CTC)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"Fun-ASR-Nano model directory {path} does not exist")
    config = model_store.load_config(path, "Fun-ASR-Nano", required_keys=())
    if not (path / "model.pt").is_file():
        raise ModelDirError(f"Fun-ASR-Nano model directory {path} lacks model.pt")
    if config.get("model") != "FunASRNano":
        raise ModelDirError(f"Fun-ASR-Nano model directory {path}: config.yaml names model "
                            f"{config.get('model')!r}, expected 'FunASRNano'")
    paths = _component_paths(path, config)
    expected = _expected_shapes(path, config, paths)
    found = model_store.checkpoint_shapes(path / "model.pt", "Fun-ASR-Nano")
    for name, shape in expected.items():
        if name not in found:
            if name.startswith(CTC_PREFIXES):
                continue  # FunASR disables CTC timestamps when they are absent
            raise ModelDirError(f"Fun-ASR-Nano model directory {path}: model.pt lacks tensor {name} "
                                f"(expected shape {list(shape)})")
        if found[name] != shape:
            raise ModelDirError(f"Fun-ASR-Nano model directory {path}: model.pt tensor {name} has shape "
                                f"{list(found[name])}, config expects {list(shape)}")
    return paths


def _component_paths(path: Path, config: dict) -> dict[str, Path]:
    """The LLM directory and (when config.yaml configures CTC) the CTC vocabulary file,
    checked for the files FunASR and vLLM read."""
    llm_conf = config.get("llm_conf") or {}
    llm_name = llm_conf.get("init_param_path")
    if not llm_name:
        raise ModelDirError(f"{path / 'config.yaml'} has no llm_conf.init_param_path (the LLM directory)")
    llm_dir = Path(llm_name) if Path(llm_name).is_absolute() else path / llm_name
    if not llm_dir.is_dir():
        raise ModelDirError(f"Fun-ASR-Nano model directory {path} lacks the LLM directory {llm_dir.name}/")
    for name in ("config.json", "tokenizer_config.json"):
        if not (llm_dir / name).is_file():
            raise ModelDirError(f"Fun-ASR-Nano model directory {path} lacks {llm_dir.name}/{name}")
    if not any(all((llm_dir / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        raise ModelDirError(f"Fun-ASR-Nano model directory {path} lacks {llm_dir.name}/tokenizer.json "
                            "(or vocab.json + merges.txt)")
    paths = {"llm": llm_dir}
    if config.get("ctc_decoder"):
        vocab = path / CTC_VOCAB_FILE
        if not vocab.is_file():
            raise ModelDirError(f"Fun-ASR-Nano model directory {path} lacks {CTC_VOCAB_FILE} "
                                "(the CTC tokenizer vocabulary config.yaml configures)")
        paths["ctc_vocab"] = vocab
    return paths


def _expected_shapes(path: Path, config: dict, paths: dict[str, Path]) -> dict[str, tuple]:
    """State-dict shapes of the FunASRNano config.yaml describes, built with FunASR's own
    class on the meta device (no memory, no initialisation)."""
    import torch
    from funasr.register import tables

    register_classes_of(config)

    kwargs = resolved_model_kwargs(config, path)
    kwargs["llm_conf"]["init_param_path"] = str(paths["llm"])
    kwargs["tokenizer_conf"]["init_param_path"] = str(paths["llm"])
    if "ctc_vocab" in paths:
        kwargs["dataset_conf"]["ctc_tokenizer_conf"]["vocab_path"] = str(paths["ctc_vocab"])
    try:
        with torch.device("meta"):
            model = tables.model_classes.get("FunASRNano")(**kwargs)
    except Exception as exc:
        raise ModelDirError(f"Fun-ASR-Nano model directory {path}: config.yaml and "
                            f"{paths['llm'].name}/config.json do not build a FunASRNano: "
                            f"{type(exc).__name__}: {exc}") from exc
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
