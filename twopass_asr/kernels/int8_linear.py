"""Linear layers in int8 exactly as FunASR's int8 recipe (twopass_asr.kernels.int8_recipe)
quantizes them.

The recipe replaces each quantized MatMul by a small subgraph: the activations quantized to
uint8 per call (DynamicQuantizeLinear), an integer product with the per-channel uint8 weights
(MatMulInteger), scaled back to float32 and the bias added. Each `Int8Linear` runs its
layer's own subgraph on onnxruntime's int8 kernels: cut out of FunASR's own export where
there is one (the Paraformer, twopass_asr.store.funasr_onnx_export), or made here by the same
quantizer (`quantize_linear_layers`, for the Nano's audio encoder, which FunASR does not
export): the same weights, the same arithmetic.

FunASR's runtime quantizes a call's activations together, and a call is one stream's
chunk. A batched pass holds several streams (and padding), so a layer runs once per stream
over that stream's rows only, as the runtime would. The engine names each stream's rows
with `stream_rows` around its pass (thread-local: workers run passes at once).
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from twopass_asr.kernels.int8_recipe import quantize_dynamic_arguments, quiet_quantizer, stays_float
from twopass_asr.kernels.prepacked_linear import layer_session
from twopass_asr.store.model_store import ModelDirError

_rows = threading.local()


@contextlib.contextmanager
def stream_rows(**counts: Sequence[int]) -> Iterator[None]:
    """Within: per batch entry, how many leading rows are that stream's, for each kind of
    row a layer reads (the engine's "frames", "tokens")."""
    previous = getattr(_rows, "counts", None)
    _rows.counts = {kind: [int(n) for n in values] for kind, values in counts.items()}
    try:
        yield
    finally:
        _rows.counts = previous


class Int8Linear(torch.nn.Module):
    """One int8 layer of the recipe, on [batch, rows, features] float32 inputs."""

    def __init__(self, session, out_features: int, rows: str):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.out_features = out_features
        self.rows = rows  # which of stream_rows' counts says where each stream's rows end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        counts = getattr(_rows, "counts", None)
        if counts is None or self.rows not in counts:
            raise RuntimeError(f"an int8 layer reading {self.rows} ran outside stream_rows({self.rows}=...)")
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        for entry, count in enumerate(counts[self.rows]):
            if count:
                rows = x[entry:entry + 1, :count].detach().contiguous().numpy()
                (y,) = self.session.run(None, {self.input_name: rows})
                out[entry, :count] = torch.from_numpy(y[0])
        return out

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, rows={self.rows}"


def module_path(node_name: str) -> str:
    """The torch module an exported node came from: '/encoder/encoders/encoders.0/
    self_attn/linear_out/MatMul_quant' -> 'encoder.encoders.0.self_attn.linear_out' (the
    exporter names a list item's scope with the list's name in front)."""
    parts: list[str] = []
    for scope in node_name.strip("/").split("/")[:-1]:
        if parts and scope.startswith(parts[-1] + "."):
            parts[-1] = scope
        else:
            parts.append(scope)
    return ".".join(parts)


def _layer_ends(model) -> dict[str, tuple[str, str, str]]:
    """module path -> (float input, float output, weight initializer) of each quantized
    MatMul's subgraph: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (-> bias Add)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {tensor.name for tensor in model.graph.initializer}
    ends = {}
    for node in model.graph.node:
        if node.op_type != "MatMulInteger":
            continue
        quantize = producers[node.input[0]]
        cast = consumers[node.output[0]][0]
        scale = consumers[cast.output[0]][0]
        if quantize.op_type != "DynamicQuantizeLinear" or (cast.op_type, scale.op_type) != ("Cast", "Mul"):
            raise ModelDirError(f"unexpected int8 subgraph around {node.name}: {quantize.op_type} -> MatMulInteger "
                                f"-> {cast.op_type} -> {scale.op_type}")
        end = scale.output[0]
        after = consumers.get(end, [])
        if len(after) == 1 and after[0].op_type == "Add" and any(name in initializers for name in after[0].input):
            end = after[0].output[0]  # the layer's bias
        ends[module_path(node.name)] = (quantize.input[0], end, node.input[1])
    return ends


def _check_weight(name: str, linear: torch.nn.Linear, model, weight_name: str, export: Path) -> None:
    """The export's int8 weight must be this layer's weight quantized: a stale export (of
    other weights) is refused rather than served."""
    from onnx import numpy_helper

    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    quantized = numpy_helper.to_array(tensors[weight_name]).astype("float32")
    scale = numpy_helper.to_array(tensors[weight_name.replace("_quantized", "_scale")])
    zero = numpy_helper.to_array(tensors[weight_name.replace("_quantized", "_zero_point")]).astype("float32")
    restored = torch.from_numpy((quantized - zero) * scale).T
    if restored.shape != linear.weight.shape or not torch.all(
            (restored - linear.weight.detach()).abs() <= torch.from_numpy(scale)[:, None] * 0.5 + 1e-6):
        raise ModelDirError(f"{export}: the int8 weight of {name} is not this model's weight quantized; the export "
                            "is stale: export the model directory again")


def load_exported_int8_layers(module: torch.nn.Module, export_files: Sequence[Path],
                              rows_of: Callable[[str], str]) -> int:
    """Replace, in place, every linear layer under `module` that FunASR's int8 export (its
    ONNX files `export_files`) quantized, by that layer of the export; `rows_of(path)` names
    the rows each layer reads. Returns how many were replaced."""
    import onnx
    from onnx.utils import Extractor

    modules = dict(module.named_modules())
    replaced = 0
    for path in export_files:
        model = onnx.load(str(path))
        extractor = Extractor(model)
        for name, (source, end, weight) in _layer_ends(model).items():
            linear = modules.get(name)
            if not isinstance(linear, torch.nn.Linear):
                raise ModelDirError(f"{path}: quantized layer {name} is not a linear layer of this model")
            _check_weight(name, linear, model, weight, path)
            parent, _, attribute = name.rpartition(".")
            setattr(modules[parent], attribute,
                    Int8Linear(layer_session(extractor.extract_model([source], [end])), linear.out_features,
                                       rows_of(name)))
            replaced += 1
    return replaced


def _float_layer_model(linear: torch.nn.Linear):
    """One linear layer as the float ONNX graph FunASR's export gives it: MatMul by the
    transposed weight, then the bias added."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(linear.weight.detach().T.contiguous().numpy(), "weight")]
    nodes = [helper.make_node("MatMul", ["x", "weight"], ["product" if linear.bias is not None else "y"])]
    if linear.bias is not None:
        initializers.append(numpy_helper.from_array(linear.bias.detach().contiguous().numpy(), "bias"))
        nodes.append(helper.make_node("Add", ["product", "bias"], ["y"]))
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "rows", linear.in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "rows", linear.out_features])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # see prepacked_linear.MlasLinear
    return model


def quantize_linear_layers(module: torch.nn.Module, rows: str) -> int:
    """Replace, in place, every float32 nn.Linear under `module` that FunASR's recipe quantizes
    by its int8 layer, quantized here by onnxruntime's quantizer with the recipe's settings;
    every layer reads the rows `rows` names in stream_rows. Returns how many were replaced."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    replaced = 0
    with tempfile.TemporaryDirectory() as directory, quiet_quantizer():
        float_path, int8_path = Path(directory) / "float.onnx", Path(directory) / "int8.onnx"
        for name, linear in list(module.named_modules()):
            if type(linear) is not torch.nn.Linear or linear.weight.dtype != torch.float32 or stays_float(name):
                continue
            onnx.save(_float_layer_model(linear), str(float_path))
            quantize_dynamic(float_path, int8_path, **quantize_dynamic_arguments())
            parent, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent), attribute,
                    Int8Linear(layer_session(int8_path), linear.out_features, rows))
            replaced += 1
    return replaced
