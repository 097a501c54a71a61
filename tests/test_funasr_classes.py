"""twopass_asr.funasr_classes: the served processes' FunASR, without its import-everything
__init__, finds every class a model directory names exactly as the whole package does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import SUITE_TORCH_THREADS
from twopass_asr import REPO_ROOT

MODELS = ("vad", "paraformer_streaming", "funasr_nano")

# Prints, for each model directory given, the class behind every name its config.yaml
# mentions (or FunASR derives from one) in every registry table, and how many funasr modules
# the process imported.
RESOLVE = """
import json, sys, yaml
light = sys.argv[1] == "light"
if light:
    from twopass_asr.funasr_classes import register_classes_of, use_light_funasr
    assert use_light_funasr()
else:
    import funasr
from funasr.register import tables
from twopass_asr.funasr_classes import whole_registry

registered = {name for classes in whole_registry().values() for name in classes}

def names(value):
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*map(names, value.values()))
    if isinstance(value, list):
        return set().union(*map(names, value))
    return set()

resolved = {}
for directory in sys.argv[2:]:
    config = yaml.safe_load(open(directory + "/config.yaml"))
    if light:
        register_classes_of(config)
    for table in dir(tables):
        if not table.endswith("_classes"):
            continue
        classes = getattr(tables, table)
        # The names the config gives, and those FunASR derives from them (its export's "...Export").
        for name in (name for name in classes if name.startswith(tuple(names(config) & registered))):
            resolved[f"{table}:{name}"] = f"{classes[name].__module__}.{classes[name].__qualname__}"
print(json.dumps({"resolved": resolved, "modules": sum(m.startswith("funasr.") for m in sys.modules)}))
"""


def resolve(mode: str, directories: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", RESOLVE, mode, *directories], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def both(test_models):
    directories = [str(test_models / name) for name in MODELS]
    return resolve("light", directories), resolve("full", directories)


def test_every_named_class_resolves_as_with_the_whole_package(both):
    light, full = both
    assert light["resolved"] == full["resolved"]
    for key in ("model_classes:FsmnVADStreaming", "model_classes:ParaformerStreaming", "model_classes:FunASRNano",
                "encoder_classes:SANMEncoderChunkOpt", "predictor_classes:CifPredictorV2",
                "encoder_classes:SANMEncoderChunkOptExport", "decoder_classes:ParaformerSANMDecoderOnlineExport"):
        assert key in full["resolved"], key


def test_the_light_package_imports_a_fraction_of_funasr(both):
    light, full = both
    assert light["modules"] < full["modules"] / 2, (light["modules"], full["modules"])


def test_loading_a_model_keeps_the_callers_torch_threads(test_models):
    """AutoModel would set the calling thread's count to its own (4), and the engines the caller builds
    next would pick other float kernels (prepacked_linear's auto reads the count)."""
    import torch

    from twopass_asr.funasr_classes import funasr_automodel

    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            funasr_automodel(test_models / "vad", disable_update=True, disable_pbar=True, disable_log=True)
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(SUITE_TORCH_THREADS)
