"""FunASR's ONNX runtime (funasr-onnx) on FunASR's own export, the reference for the int8
first pass: the export quantizes FunASR's layers, and the runtime and the batched engine
(streams batched at different positions) agree within measured bounds, in float32 and in
int8 (the engine running the export's int8 layers).

The two compute the float32 operations with different kernels (onnxruntime's, torch's),
results a few ulps apart. In float32 that flips a token only where this random model's best
two tokens are all but tied (one chunk in ~60, in some runs of the synthesised speech,
which differs a little from run to run); in int8 it moves activations across rounding steps
and spreads. So the tests bound the encoder's output and the share of equal chunk texts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import SUITE_TORCH_THREADS
from tests.int8_kernels import TOKENWISE_KERNEL_PARAMS
from twopass_asr.first_pass.batched import BatchedStreamingParaformer
from twopass_asr.first_pass.engines import FunasrOnnxStreamingParaformer
from twopass_asr.first_pass.native_layers import native_auto_kernel
from twopass_asr.first_pass.options import DecodeOptions
from twopass_asr.kernels.cpu_features import cpu_has_int8_dot_products
from twopass_asr.kernels.int8_linear import module_path, stream_rows
from twopass_asr.store import model_store
from twopass_asr.store.export_cache import CACHE_ENV
from twopass_asr.store.funasr_onnx_export import require_export
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


def recipe_int8(model_dir, **settings) -> BatchedStreamingParaformer:
    """The batched engine in int8 on FunASR's recipe itself (onnxruntime), whatever the CPU."""
    return BatchedStreamingParaformer(model_dir, precision="int8", int8_kernel="onnxruntime", **settings)


def tokenwise_int8(model_dir, kernel: str) -> BatchedStreamingParaformer:
    return BatchedStreamingParaformer(model_dir, precision="int8", int8_kernel=kernel)


@pytest.fixture(scope="module")
def paraformer_dir(test_models):
    return test_models / model_store.PARAFORMER


@pytest.fixture(scope="module")
def float32_engine(paraformer_dir):
    return BatchedStreamingParaformer(paraformer_dir)


def test_export_quantizes_every_linear_layer_but_funasrs_float_ones(paraformer_export, paraformer_dir):
    from funasr import AutoModel

    model = AutoModel(model=str(paraformer_dir), disable_update=True, disable_pbar=True, disable_log=True,
                      ncpu=SUITE_TORCH_THREADS).model
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    quantized = {module_path(node.name)
                 for file in ("model_quant.onnx", "decoder_quant.onnx")
                 for node in onnx.load(paraformer_export / file).graph.node if node.op_type == "MatMulInteger"}
    left_float = {name for name in linear if "output" in name}
    assert left_float == {"decoder.output_layer", "predictor.cif_output"}
    assert quantized == linear - left_float


def step_chunks(pcm: np.ndarray, step: int) -> list[np.ndarray]:
    """The audio in whole decode steps and a shorter last piece, as FunASR's servers feed its
    ONNX runtime (which decodes whatever one call brings, where the engines cut steps)."""
    return [pcm[start:start + step] for start in range(0, len(pcm), step)]


def batched_texts(engine, streams: list[list[np.ndarray]], options: DecodeOptions) -> list[list[str]]:
    """Each stream's text per chunk, every step one batched pass over the streams still going."""
    texts: list[list[str]] = [[] for _ in streams]
    states = [engine.new_stream(options) for _ in streams]
    for step in range(max(map(len, streams))):
        live = [i for i, chunks in enumerate(streams) if step < len(chunks)]
        for i, text in zip(live, engine.process_batch([states[i] for i in live], [streams[i][step] for i in live],
                                                      [step == len(streams[i]) - 1 for i in live])):
            texts[i].append(text)
    return texts


def reference_texts(reference, streams: list[list[np.ndarray]], options: DecodeOptions) -> list[list[str]]:
    """Each stream's text per chunk from the runtime, one stream at a time."""
    texts = []
    for chunks in streams:
        stream = reference.new_stream(options)
        texts.append([reference.process_batch([stream], [chunk], [i == len(chunks) - 1])[0]
                      for i, chunk in enumerate(chunks)])
    return texts


def comparable(texts: list[list[str]], options: DecodeOptions) -> list[list[str]]:
    """The chunks both runtimes finish alike, without the spacing they join tokens with."""
    kept = texts if options.chunk_size in SAME_LAST_CHUNK else [stream[:-1] for stream in texts]
    return [[text.replace(" ", "") for text in stream] for stream in kept]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def share_equal(ours: list[list[str]], theirs: list[list[str]]) -> float:
    pairs = [(a, b) for mine, reference in zip(ours, theirs) for a, b in zip(mine, reference)]
    return sum(a == b for a, b in pairs) / len(pairs)


def encoder_errors(engine, export_dir, pcm: np.ndarray, options: DecodeOptions, export_file: str) -> np.ndarray:
    """Per chunk: the relative error of `engine`'s encoder output from the export's, run
    whole by onnxruntime on the same input frames (those the float32 feature path makes)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(export_dir / export_file), providers=["CPUExecutionProvider"])
    stream = engine.new_stream(options)
    errors = []
    for chunk in step_chunks(pcm, options.step_samples)[:-1]:
        for step in engine._plan_steps(stream, torch.from_numpy(chunk / 32768.0).float(), False):
            frames = engine._encoder_input(step)[None]
            count = frames.shape[1]
            theirs = session.run(None, {"speech": frames.numpy(), "speech_lengths": np.array([count], np.int32)})[0]
            with torch.no_grad(), stream_rows(frames=[count]):
                mine = engine._encode(frames, torch.ones(1, count, dtype=torch.bool), torch.tensor([count]), [step])
            errors.append(relative_error(mine.numpy(), theirs))
    return np.array(errors)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.chunk_size)))
def test_float32_runtime_and_batched_engine_agree_for_streams_at_different_positions(
        paraformer_export, float32_engine, speech_wav, options):
    reference = FunasrOnnxStreamingParaformer(paraformer_export, quantized=False)
    # Three streams of the same speech starting at different offsets, so every batched
    # step mixes streams at different positions (and, near the end, different lengths).
    streams = [step_chunks(speech_wav.pcm[offset:], options.step_samples) for offset in (0, 5000, 13000)]
    expected = reference_texts(reference, streams, options)
    assert sum(bool(text) for texts in expected for text in texts) > len(expected[0]), "too little text to compare"
    # Measured: all equal in most runs, one chunk in ~60 in others.
    assert share_equal(comparable(batched_texts(float32_engine, streams, options), options),
                       comparable(expected, options)) >= 0.9


def test_float32_encoder_output_is_the_runtimes(paraformer_export, float32_engine, speech_wav):
    errors = encoder_errors(float32_engine, paraformer_export, speech_wav.pcm, OPTIONS[0], "model.onnx")
    assert errors.max() < 1e-3  # measured: median 2e-5, max 1.5e-4


def test_int8_engine_stays_within_the_measured_bound_of_funasrs_int8_runtime(
        paraformer_export, paraformer_dir, float32_engine, speech_wav):
    """Each int8 layer equals the runtime's bit for bit on the same input
    (tests/kernels/test_int8_linear.py); the float32 operations between them move some
    activations across a rounding step, and that spreads through the layers. So the two
    int8 runtimes differ about as much as int8 differs from float32, and no more: the
    bounds below are about twice the ones measured (perf/RESULTS.md, 2026-12-02)."""
    options = OPTIONS[0]
    int8 = recipe_int8(paraformer_dir, int8_export=paraformer_export)
    streams = [step_chunks(speech_wav.pcm[offset:], options.step_samples) for offset in (0, 5000, 13000)]
    ours = comparable(batched_texts(int8, streams, options), options)
    theirs = comparable(reference_texts(FunasrOnnxStreamingParaformer(paraformer_export, quantized=True), streams,
                                        options), options)
    assert share_equal(ours, theirs) >= 0.8

    ours_to_theirs = encoder_errors(int8, paraformer_export, speech_wav.pcm, options, "model_quant.onnx")
    int8_to_float32 = encoder_errors(float32_engine, paraformer_export, speech_wav.pcm, options, "model_quant.onnx")
    assert ours_to_theirs.max() < 0.03 and np.median(ours_to_theirs) < 0.015
    assert np.median(ours_to_theirs) <= np.median(int8_to_float32)


def test_int8_is_not_float32(paraformer_export, paraformer_dir, float32_engine, speech_wav):
    """The int8 layers change some text of this random model (else the int8 comparison
    above would not tell the two apart). Six streams: with the three above (62 chunks) about 6
    texts differ, but the synthesised speech varies from run to run, and once in about ten
    local runs none did."""
    options = OPTIONS[0]
    streams = [step_chunks(speech_wav.pcm[offset:], options.step_samples)
               for offset in (0, 2500, 5000, 9000, 13000, 17000)]
    int8 = recipe_int8(paraformer_dir, int8_export=paraformer_export)
    assert batched_texts(int8, streams, options) != batched_texts(float32_engine, streams, options)


@pytest.mark.parametrize("kernel", TOKENWISE_KERNEL_PARAMS)
def test_tokenwise_int8_quantizes_the_layers_funasrs_export_does(paraformer_export, paraformer_dir, kernel):
    from twopass_asr.kernels.tokenwise_int8 import TokenwiseInt8Linear

    quantized = {module_path(node.name)
                 for file in ("model_quant.onnx", "decoder_quant.onnx")
                 for node in onnx.load(paraformer_export / file).graph.node if node.op_type == "MatMulInteger"}
    model = tokenwise_int8(paraformer_dir, kernel).model
    layers = {name: module for name, module in model.named_modules() if isinstance(module, TokenwiseInt8Linear)}
    assert set(layers) == quantized and {layer.kernel for layer in layers.values()} == {kernel}


@pytest.mark.parametrize("kernel", TOKENWISE_KERNEL_PARAMS)
def test_tokenwise_int8_stays_within_the_measured_bound_of_funasrs_int8_runtime(
        paraformer_export, paraformer_dir, float32_engine, speech_wav, kernel):
    """The per-token kernels quantize each row (a frame, a token) on its own range where FunASR's
    runtime quantizes a stream's chunk on one, and weights on 63 (fbgemm) or 127 (oneDNN)
    symmetric levels where FunASR's have 255 with a zero point (tests/kernels/
    test_tokenwise_int8.py): the two int8s cannot be equal, only close. Measured on this model,
    fbgemm (oneDNN passes the same bounds): 79-92 % of chunk texts equal FunASR's int8 runtime's over ten
    runs (the synthesised speech differs a little from run to run; float32: 93-95 %); encoder
    output 2.0 % (median; max 2.3 %) from that runtime's and 1.5 % (max 1.8 %) from float32,
    where FunASR's int8 is 1.1 % from float32. The error bounds are about twice those."""
    options = OPTIONS[0]
    int8 = tokenwise_int8(paraformer_dir, kernel)
    streams = [step_chunks(speech_wav.pcm[offset:], options.step_samples) for offset in (0, 5000, 13000)]
    ours = comparable(batched_texts(int8, streams, options), options)
    theirs = comparable(reference_texts(FunasrOnnxStreamingParaformer(paraformer_export, quantized=True), streams,
                                        options), options)
    share = share_equal(ours, theirs)
    assert share >= 0.65, share

    ours_to_theirs = encoder_errors(int8, paraformer_export, speech_wav.pcm, options, "model_quant.onnx")
    ours_to_float32 = encoder_errors(int8, paraformer_export, speech_wav.pcm, options, "model.onnx")
    assert ours_to_theirs.max() < 0.045 and np.median(ours_to_theirs) < 0.04, ours_to_theirs
    assert ours_to_float32.max() < 0.035 and np.median(ours_to_float32) < 0.03, ours_to_float32


def test_int8_made_at_load_is_the_int8_of_a_stored_export(paraformer_export, paraformer_dir, speech_wav,
                                                          tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "exports"))
    options = OPTIONS[0]
    streams = [step_chunks(speech_wav.pcm[offset:], options.step_samples) for offset in (0, 5000)]
    at_load = recipe_int8(paraformer_dir)
    stored = recipe_int8(paraformer_dir, int8_export=paraformer_export)
    assert batched_texts(at_load, streams, options) == batched_texts(stored, streams, options)
    # The export made at the first load is cached and reused by the next.
    [cached] = (tmp_path / "exports" / "paraformer_onnx").iterdir()
    made = cached.stat().st_mtime_ns
    recipe_int8(paraformer_dir)
    assert [p.name for p in (tmp_path / "exports" / "paraformer_onnx").iterdir()] == [cached.name]
    assert cached.stat().st_mtime_ns == made
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, int8, got 'int4'"):
        BatchedStreamingParaformer(paraformer_dir, precision="int4")
    with pytest.raises(ValueError, match="int8_kernel must be one of auto, onnxruntime, fbgemm, onednn, compiled, "
                                         "got 'mkl'"):
        BatchedStreamingParaformer(paraformer_dir, precision="int8", int8_kernel="mkl")
    assert at_load.precision_description == "int8 on onnxruntime"
    auto = BatchedStreamingParaformer(paraformer_dir, precision="auto")
    assert auto.precision_description == "int8 on " + native_auto_kernel(cpu_has_int8_dot_products())


def test_an_export_of_other_weights_is_refused(paraformer_export, tmp_path):
    from twopass_asr.store.random_paraformer import build_random_paraformer

    other = build_random_paraformer(tmp_path / "other", "tiny", seed=1)
    with pytest.raises(ModelDirError, match=r"is not this model's weight quantized; the export is stale"):
        recipe_int8(other, int8_export=paraformer_export)


def test_runtime_refuses_look_back_and_a_missing_export(paraformer_export, tmp_path):
    reference = FunasrOnnxStreamingParaformer(paraformer_export, quantized=True)
    with pytest.raises(ValueError, match="no encoder or decoder look-back"):
        reference.new_stream(DecodeOptions())
    with pytest.raises(ModelDirError, match=r"lacks model_quant\.onnx, decoder_quant\.onnx.*export_paraformer_onnx"):
        require_export(tmp_path, quantized=True)
