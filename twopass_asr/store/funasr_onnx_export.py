"""FunASR's own ONNX export of a streaming Paraformer, float32 and int8: the files FunASR's
ONNX runtime (funasr-onnx) decodes, which is the reference for the int8 first pass.

FunASR's export quantizes by its int8 recipe, stated in twopass_asr.kernels.int8_recipe.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import shutil
from pathlib import Path

from twopass_asr.funasr_classes import funasr_automodel
from twopass_asr.kernels.int8_recipe import quiet_quantizer
from twopass_asr.store.export_cache import cached_export, default_cache_root
from twopass_asr.store.model_store import ModelDirError, validate_paraformer_dir

FLOAT_FILES = ("model.onnx", "decoder.onnx")
INT8_FILES = ("model_quant.onnx", "decoder_quant.onnx")
# What funasr-onnx reads beside the ONNX files.
RUNTIME_FILES = ("config.yaml", "am.mvn", "tokens.json")


@contextlib.contextmanager
def torchscript_onnx_exporter():
    """FunASR 1.4.16 calls torch.onnx.export with the defaults of the torch releases it was
    written for, whose exporter was the TorchScript one. torch 2.13 defaults to the dynamo
    exporter, which needs onnxscript and names nodes differently, so FunASR's choice of
    float layers by node name would not hold."""
    import torch

    original = torch.onnx.export
    torch.onnx.export = functools.partial(original, dynamo=False)
    try:
        yield
    finally:
        torch.onnx.export = original


def export_paraformer_onnx(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Export a streaming Paraformer directory with FunASR's own export (quantize=True) into
    `out_dir`, with the files funasr-onnx reads beside them. Returns `out_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    validate_paraformer_dir(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # FunASR prints a line per node; the result is checked below.
    with contextlib.redirect_stdout(io.StringIO()):
        model = funasr_automodel(model_dir, disable_update=True, disable_pbar=True, disable_log=True, device="cpu")
        with quiet_quantizer(logging.WARNING), torchscript_onnx_exporter():
            model.export(type="onnx", quantize=True, output_dir=str(out_dir))
    for name in RUNTIME_FILES:
        shutil.copy2(model_dir / name, out_dir / name)
    missing = _missing(out_dir, FLOAT_FILES + INT8_FILES)
    if missing:
        raise ModelDirError(f"FunASR's ONNX export of {model_dir} wrote no {', '.join(missing)} in {out_dir}")
    return out_dir


def cached_paraformer_export(model_dir: str | Path) -> Path:
    """export_paraformer_onnx of `model_dir`, made on first use into the export cache
    (twopass_asr.store.export_cache) and reused while model.pt, config.yaml and am.mvn stay as
    they are."""
    model_dir = Path(model_dir)
    depends_on = "".join((model_dir / name).read_text(encoding="utf-8") for name in ("config.yaml", "am.mvn"))
    return cached_export(model_dir / "model.pt", depends_on, default_cache_root() / "paraformer_onnx",
                         lambda directory: not _missing(directory, FLOAT_FILES + INT8_FILES + RUNTIME_FILES),
                         lambda directory: export_paraformer_onnx(model_dir, directory))


def _missing(export_dir: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not (export_dir / name).is_file()]


def require_export(export_dir: str | Path, quantized: bool) -> Path:
    """`export_dir` if it holds what funasr-onnx needs, else a ModelDirError saying how to make it."""
    export_dir = Path(export_dir)
    missing = _missing(export_dir, (INT8_FILES if quantized else FLOAT_FILES) + RUNTIME_FILES)
    if missing:
        raise ModelDirError(
            f"{export_dir} lacks {', '.join(missing)} of FunASR's ONNX export; make it with "
            "twopass_asr.store.funasr_onnx_export.export_paraformer_onnx(MODEL_DIR, EXPORT_DIR)"
        )
    return export_dir
