"""FunASR's ONNX runtime (funasr-onnx) on FunASR's own export, the reference for the int8
first pass: the export quantizes FunASR's layers, and in float32 the runtime's text equals
the batched engine's chunk for chunk, streams batched at different positions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from twopass_asr.first_pass.batched import BatchedStreamingParaformer
from twopass_asr.first_pass.engines import FunasrOnnxStreamingParaformer
from twopass_asr.first_pass.options import DecodeOptions
from twopass_asr.store import model_store
from twopass_asr.store.funasr_onnx_export import export_paraformer_onnx, require_export
from twopass_asr.store.model_store import ModelDirError

# The runtime has no look-back; these vary everything else it takes. FunASR's torch
# generate (which the batched engine equals) and its ONNX runtime finish a stream's last
# chunk differently unless chunk_size is [5, 10, x] (the protocol's default): for the
# others only the last chunk's text may differ.
OPTIONS = [
    DecodeOptions(chunk_size=(5, 10, 5), encoder_look_back=0, decoder_look_back=0),
    DecodeOptions(chunk_size=(5, 10, 0), encoder_look_back=0, decoder_look_back=0),
    DecodeOptions(chunk_size=(0, 10, 5), encoder_look_back=0, decoder_look_back=0),
    DecodeOptions(chunk_size=(0, 8, 4), encoder_look_back=0, decoder_look_back=0),
    DecodeOptions(chunk_size=(2, 5, 3), encoder_look_back=0, decoder_look_back=0),
]
SAME_LAST_CHUNK = {(5, 10, 5), (5, 10, 0)}


@pytest.fixture(scope="module")
def paraformer_dir(test_models):
    return test_models / model_store.PARAFORMER


@pytest.fixture(scope="module")
def export_dir(paraformer_dir, tmp_path_factory):
    return export_paraformer_onnx(paraformer_dir, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def batched(paraformer_dir):
    return BatchedStreamingParaformer(paraformer_dir)


def module_path(node_name: str) -> str:
    """'/encoder/encoders/encoders.0/self_attn/linear_out/MatMul_quant' ->
    'encoder.encoders.0.self_attn.linear_out' (a list's scope repeats the list's name)."""
    parts: list[str] = []
    for scope in node_name.strip("/").split("/")[:-1]:
        if parts and scope.startswith(parts[-1] + "."):
            parts[-1] = scope
        else:
            parts.append(scope)
    return ".".join(parts)


def test_export_quantizes_every_linear_layer_but_funasrs_float_ones(export_dir, paraformer_dir):
    from funasr import AutoModel

    model = AutoModel(model=str(paraformer_dir), disable_update=True, disable_pbar=True, disable_log=True).model
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    quantized = {module_path(node.name)
                 for file in ("model_quant.onnx", "decoder_quant.onnx")
                 for node in onnx.load(export_dir / file).graph.node if node.op_type == "MatMulInteger"}
    left_float = {name for name in linear if "output" in name}
    assert left_float == {"decoder.output_layer", "predictor.cif_output"}
    assert quantized == linear - left_float


def step_chunks(pcm: np.ndarray, step: int) -> list[np.ndarray]:
    """The audio in whole decode steps and a shorter last piece, as FunASR's servers feed its
    ONNX runtime (which decodes whatever one call brings, where the engines cut steps)."""
    return [pcm[start:start + step] for start in range(0, len(pcm), step)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.chunk_size)))
def test_float32_runtime_equals_the_batched_engine_for_streams_at_different_positions(
        export_dir, batched, speech_wav, options):
    reference = FunasrOnnxStreamingParaformer(export_dir, quantized=False)
    # Three streams of the same speech starting at different offsets, so every batched
    # step mixes streams at different positions (and, near the end, different lengths).
    streams = [step_chunks(speech_wav.pcm[offset:], options.step_samples) for offset in (0, 5000, 13000)]
    expected = []
    for chunks in streams:
        stream = reference.new_stream(options)
        expected.append([reference.process_batch([stream], [chunk], [i == len(chunks) - 1])[0]
                         for i, chunk in enumerate(chunks)])
    got = [[] for _ in streams]
    states = [batched.new_stream(options) for _ in streams]
    for step in range(max(map(len, streams))):
        live = [i for i, chunks in enumerate(streams) if step < len(chunks)]
        texts = batched.process_batch([states[i] for i in live], [streams[i][step] for i in live],
                                      [step == len(streams[i]) - 1 for i in live])
        for i, text in zip(live, texts):
            got[i].append(text)

    def comparable(texts):  # the runtimes join tokens with different spacing
        kept = texts if options.chunk_size in SAME_LAST_CHUNK else texts[:-1]
        return [text.replace(" ", "") for text in kept]

    assert [comparable(texts) for texts in got] == [comparable(texts) for texts in expected]
    assert sum(bool(text) for texts in expected for text in texts) > len(expected[0]), "too little text to compare"


def test_runtime_refuses_look_back_and_a_missing_export(export_dir, tmp_path):
    reference = FunasrOnnxStreamingParaformer(export_dir, quantized=True)
    with pytest.raises(ValueError, match="no encoder or decoder look-back"):
        reference.new_stream(DecodeOptions())
    with pytest.raises(ModelDirError, match=r"lacks model_quant\.onnx, decoder_quant\.onnx.*export_paraformer_onnx"):
        require_export(tmp_path, quantized=True)
