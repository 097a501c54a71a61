"""Linear layers whose float32 weights are packed once at load, for CPU inference.

torch's `nn.Linear` on CPU calls MKL's sgemm, which packs the weight anew on every call.
With the few rows a streaming step has (tens of frames, a handful of streams) that packing
is a large part of the product. Two kernels keep the weight packed instead:

- `MlasLinear`: onnxruntime's MLAS GEMM, over a weight packed when its one-node session is
  built. It runs the first pass's few-row products faster than oneDNN (perf/RESULTS.md,
  2026-11-29 evening, MLAS). A session runs on the calling thread, so it is used only where
  torch runs single-threaded (the served layout: one torch thread per worker); a pool of its
  own would fight torch's OpenMP threads.
- `OneDnnLinear`: oneDNN's blocked layout (`torch.ops.mkldnn`), which uses torch's threads.

Results differ from nn.Linear only by float32 summation order, as between any two GEMM
kernels.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import onnxruntime

# oneDNN picks the reordered layout for a typical row count; any other count still works.
DEFAULT_ROWS_HINT = 32
KERNELS = ("auto", "mlas", "onednn")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def mlas_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def choose_kernel(kernel: str = "auto") -> str | None:
    """The kernel `prepack_linear_layers` uses: `auto` takes MLAS where torch runs on one
    thread and onnxruntime is installed, else oneDNN; None where the one asked for (or
    either, for auto) is unavailable."""
    if kernel not in KERNELS:
        raise ValueError(f"linear kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        if mlas_available() and torch.get_num_threads() == 1:
            return "mlas"
        return "onednn" if onednn_available() else None
    available = mlas_available() if kernel == "mlas" else onednn_available()
    return kernel if available else None


def layer_session(model) -> onnxruntime.InferenceSession:
    """An onnxruntime session for one layer's ONNX model (a ModelProto, or the Path of a file
    holding one), run on the calling thread, at onnxruntime's default (and FunASR's runtime's)
    optimisation level, so int8 layers fuse as in that runtime."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # Outputs are handed to torch; an arena per layer would only hold memory.
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    # From a file: a session built from bytes keeps them (a second copy of the weight)
    # for as long as it lives.
    if isinstance(model, Path):
        return onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "layer.onnx"
        path.write_bytes(model.SerializeToString())
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class PrepackedLinear(torch.nn.Module):
    """nn.Linear's forward over a weight packed once for one GEMM kernel."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.has_bias = linear.bias is not None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


class OneDnnLinear(PrepackedLinear):
    def __init__(self, linear: torch.nn.Linear, rows_hint: int = DEFAULT_ROWS_HINT):
        super().__init__(linear)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class MlasLinear(PrepackedLinear):
    """y = x W^T + b as one ONNX Gemm node; onnxruntime packs W for MLAS when the session
    is built and frees the unpacked copy."""

    def __init__(self, linear: torch.nn.Linear):
        from onnx import TensorProto, helper, numpy_helper

        super().__init__(linear)
        weight = linear.weight.detach().contiguous().numpy()
        initializers = [numpy_helper.from_array(weight, "weight")]
        if self.has_bias:
            initializers.append(numpy_helper.from_array(linear.bias.detach().contiguous().numpy(), "bias"))
        graph = helper.make_graph(
            [helper.make_node("Gemm", ["x"] + [t.name for t in initializers], ["y"], transB=1)], "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", self.in_features])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", self.out_features])], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        # onnx stamps its own newest IR version (14), which onnxruntime 1.23 refuses; IR 8
        # loads in every onnxruntime that requirements/base.in allows.
        model.ir_version = 8
        self.session = layer_session(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if x.numel() == 0:
            return x.new_empty(shape)
        (y,) = self.session.run(["y"], {"x": x.reshape(-1, self.in_features).contiguous().numpy()})
        return torch.from_numpy(y).view(shape)


def prepack_linear_layers(module: torch.nn.Module, kernel: str = "auto", rows_hint: int = DEFAULT_ROWS_HINT) -> int:
    """Replace, in place, every float32 CPU nn.Linear under `module` whose weight is not
    shared with another module (a tied embedding must stay one tensor) by a PrepackedLinear
    of `kernel` (see choose_kernel). For inference only (no gradients). Returns how many
    were replaced; 0 where the kernel is unavailable."""
    chosen = choose_kernel(kernel)
    if chosen is None:
        return 0
    weight_users: dict[int, int] = {}
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            weight_users[id(param)] = weight_users.get(id(param), 0) + 1

    def replaceable(child: torch.nn.Module) -> bool:
        return (type(child) is torch.nn.Linear and child.weight.device.type == "cpu"
                and child.weight.dtype == torch.float32 and weight_users[id(child.weight)] == 1)

    def packed(linear: torch.nn.Linear) -> PrepackedLinear:
        return MlasLinear(linear) if chosen == "mlas" else OneDnnLinear(linear, rows_hint)

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if replaceable(child):
                setattr(parent, name, packed(child))
                replaced += 1
    return replaced
