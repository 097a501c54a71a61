"""Int8 layers cut out of FunASR's int8 export: each equals the export run whole by
onnxruntime bit for bit, and a batched call quantizes every stream's rows on their own."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from twopass_asr.first_pass.batched import BatchedStreamingParaformer
from twopass_asr.kernels.int8_linear import Int8Linear, _layer_ends, module_path, stream_rows
from twopass_asr.store import model_store


@pytest.fixture(scope="module")
def int8_engine(test_models, paraformer_export):
    return BatchedStreamingParaformer(test_models / model_store.PARAFORMER, precision="int8", int8_kernel="onnxruntime",
                                      int8_export=paraformer_export)


def int8_layers(engine) -> dict[str, Int8Linear]:
    return {name: module for name, module in engine.model.named_modules() if isinstance(module, Int8Linear)}


def test_module_path_follows_the_exporters_scopes():
    assert module_path("/encoder/encoders/encoders.0/self_attn/linear_out/MatMul_quant") == \
        "encoder.encoders.0.self_attn.linear_out"
    assert module_path("/decoder/decoders3/decoders3.0/feed_forward/w_1/MatMul_quant") == \
        "decoder.decoders3.0.feed_forward.w_1"


def random_inputs(session, rng: np.random.Generator, rows: int = 20) -> dict[str, np.ndarray]:
    """Inputs for one of the export's graphs: `rows` along every dynamic axis but the batch."""
    inputs = {}
    for spec in session.get_inputs():
        if spec.type == "tensor(int32)":  # a length
            inputs[spec.name] = np.array([rows], np.int32)
        else:
            shape = [1 if axis == "batch_size" else rows if isinstance(axis, str) else axis for axis in spec.shape]
            inputs[spec.name] = rng.standard_normal(shape).astype(np.float32) * 4
    return inputs


@pytest.mark.parametrize("file", ["model_quant.onnx", "decoder_quant.onnx"])
def test_every_layer_equals_the_whole_export_bit_for_bit(int8_engine, paraformer_export, file):
    graph = onnx.load(str(paraformer_export / file))
    ends = _layer_ends(graph)
    # Every layer's input and output become outputs of the whole graph, run as the runtime runs it.
    graph_inputs = {tensor.name for tensor in graph.graph.input}
    graph.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for source, end, _ in ends.values() for name in (source, end)
                              if name not in graph_inputs)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    whole = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = random_inputs(whole, np.random.default_rng(0))
    values = {**inputs, **dict(zip([output.name for output in whole.get_outputs()], whole.run(None, inputs)))}
    layers = int8_layers(int8_engine)
    assert set(ends) <= set(layers) and len(ends) >= 8
    for name, (source, end, _) in ends.items():
        rows = values[source].shape[1]
        with torch.no_grad(), stream_rows(**{layers[name].rows: [rows]}):
            mine = layers[name](torch.from_numpy(values[source])).numpy()
        np.testing.assert_array_equal(mine, values[end], err_msg=name)


def test_a_batched_call_quantizes_each_streams_rows_on_their_own(int8_engine):
    layer = int8_layers(int8_engine)["encoder.encoders.0.feed_forward.w_1"]
    rng = np.random.default_rng(1)
    features = layer.session.get_inputs()[0].shape[-1]
    # Streams of different loudness: quantized together, the quiet one would lose its detail.
    streams = [torch.from_numpy(rng.standard_normal((rows, features)).astype(np.float32) * scale)
               for rows, scale in ((7, 1.0), (3, 40.0), (5, 0.05))]
    batch = torch.full((3, 7, features), 123.0)  # padding the layer must not read
    for entry, rows in enumerate(streams):
        batch[entry, :rows.shape[0]] = rows
    def run(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        with torch.no_grad(), stream_rows(frames=rows):
            return layer(x)

    together = run(batch, [rows.shape[0] for rows in streams])
    alone = [run(rows[None], [rows.shape[0]])[0] for rows in streams]
    as_one_stream = run(torch.cat(streams)[None], [15])[0]
    for entry, rows in enumerate(alone):
        assert torch.equal(together[entry, :rows.shape[0]], rows)
        assert not together[entry, rows.shape[0]:].any()
    quiet = slice(10, 15)
    assert not torch.allclose(as_one_stream[quiet], alone[2], rtol=1e-3, atol=1e-4), \
        "quantizing the streams together should have changed the quiet stream"


def test_a_layer_outside_stream_rows_says_so(int8_engine):
    layer = int8_layers(int8_engine)["decoder.decoders.0.feed_forward.w_1"]
    with pytest.raises(RuntimeError, match=r"int8 layer reading tokens ran outside stream_rows\(tokens=...\)"):
        with torch.no_grad():
            layer(torch.zeros(1, 2, layer.session.get_inputs()[0].shape[-1]))
