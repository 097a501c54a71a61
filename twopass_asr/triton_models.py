"""What the Triton Python-backend adapters share: parameters, model directories, per-stream
state bookkeeping and error responses. Imported only inside tritonserver's Python stub."""

from __future__ import annotations

import json
import locale
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from twopass_asr import model_store
from twopass_asr.parameters import whole_number
from twopass_asr.stream_state import StreamError, StreamStore


def model_parameters(args: dict) -> tuple[dict, dict[str, str]]:
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    return config, params


def resolve_model_dir(args: dict, params: dict[str, str], store_name: str) -> Path:
    """`model_dir` parameter if set (relative to the model repository), else the store's
    directory for this model ($TWOPASS_ASR_MODELS)."""
    configured = params.get("model_dir", "")
    if configured:
        path = Path(configured)
        return path if path.is_absolute() else Path(args["model_repository"]).parent / path
    return model_store.store_root() / store_name


def resolve_device(params: dict[str, str]) -> str:
    """cpu / cuda / auto, from TWOPASS_ASR_DEVICE or the `device` parameter."""
    device = os.environ.get("TWOPASS_ASR_DEVICE") or params.get("device", "cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise pb_utils.TritonModelException(f"device must be cpu, cuda or auto, got {device!r}")
    return device


def set_torch_threads(configured: str, instances: int) -> None:
    """The `threads` parameter: torch intra-op threads of this instance (its own stub
    process). Empty: the cores shared out between the model's instances, so that
    instances running at the same time do not contend for the same cores."""
    if not configured:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, instances)))
        return
    try:
        torch.set_num_threads(whole_number(configured, "parameter threads"))
    except ValueError as exc:
        raise pb_utils.TritonModelException(str(exc)) from exc


def use_utf8_locale() -> None:
    # The stub embeds Python with the ASCII C locale; some imports (torch inductor, vLLM) need UTF-8.
    try:
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    except locale.Error:
        pass


def optional_scalar(request, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise StreamError(f"{name} must hold one value, got {values.size}")
    value = values[0]
    # Numeric tensors hold numpy scalars; BYTES tensors hold plain bytes objects.
    return value.item() if isinstance(value, np.generic) else value


def optional_vector(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def required_audio(request) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, "AUDIO")
    if tensor is None:
        raise StreamError("missing input AUDIO (int16 PCM samples)")
    return tensor.as_numpy().reshape(-1)


def error_response(message: str) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class InstanceMetric:
    """A Triton metric labelled with the model instance. It holds its family, which must
    outlive the metric."""

    def __init__(self, args: dict, name: str, description: str, kind) -> None:
        self._family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self._metric = self._family.Metric(labels={"model": args["model_name"],
                                                   "instance": args["model_instance_name"]})

    def set(self, value: float) -> None:
        self._metric.set(value)

    def increment(self, value: float) -> None:
        self._metric.increment(value)


class SequenceModel:
    """Base of the sequence-batched adapters. Subclasses give the engine and the I/O:
    `load(model_dir, device, params)`, `new_state(request)`, `process_batch(states, audios, finals)`
    and `outputs(result)`."""

    store_name: str = ""  # the model's directory name in the model store
    validate_dir: Callable[[Path], None]

    def initialize(self, args: dict) -> None:
        use_utf8_locale()
        config, params = model_parameters(args)
        self.logger = pb_utils.Logger
        model_dir = resolve_model_dir(args, params, self.store_name)
        try:
            type(self).validate_dir(model_dir)
        except model_store.ModelDirError as exc:
            raise pb_utils.TritonModelException(str(exc)) from exc
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", []))
        set_torch_threads(params.get("threads", ""), instances)
        device = resolve_device(params)
        self.load(model_dir, device, params)
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds", 60_000_000))
        self.streams: StreamStore = StreamStore(
            max_streams=int(params.get("max_streams", "1024")), idle_timeout_s=idle_us / 1e6
        )
        self.active_streams = InstanceMetric(args, "twopass_asr_active_streams",
                                             "Streams whose state this model instance holds",
                                             pb_utils.MetricFamily.GAUGE)
        self.logger.log_info(f"{args['model_name']}: loaded {model_dir} on {device}, "
                             f"{torch.get_num_threads()} torch thread(s)")

    def execute(self, requests):
        """All ready requests of this call are computed together in one batched pass."""
        responses: list = [None] * len(requests)
        batch: list[tuple[int, int, Any, np.ndarray, bool]] = []
        for index, request in enumerate(requests):
            try:
                if not optional_scalar(request, "READY"):
                    # An empty batch slot; nothing to compute.
                    responses[index] = pb_utils.InferenceResponse(output_tensors=self.outputs(None))
                    continue
                corrid = int(optional_scalar(request, "CORRID"))
                audio = required_audio(request)
                if audio.dtype != np.int16:
                    raise StreamError(f"AUDIO must be int16 PCM, got {audio.dtype}")
                if optional_scalar(request, "START"):
                    state = self.streams.start(corrid, lambda: self.new_state(request))
                else:
                    state = self.streams.get(corrid)
                batch.append((index, corrid, state, audio, bool(optional_scalar(request, "END"))))
            except (StreamError, ValueError) as exc:
                responses[index] = error_response(str(exc))
        if batch:
            self._run_batch(batch, responses)
        self.active_streams.set(len(self.streams))
        return responses

    def _run_batch(self, batch, responses) -> None:
        indices, corrids, states, audios, finals = zip(*batch)
        try:
            results = self.process_batch(list(states), list(audios), list(finals))
        except Exception as exc:  # the streams of a failed pass are dropped; the model keeps serving
            self.logger.log_error(f"{self.store_name}: batch of streams {list(corrids)} failed: {exc!r}")
            for index, corrid in zip(indices, corrids):
                self.streams.end(corrid)
                responses[index] = error_response(f"internal error in {self.store_name}: {exc}")
            return
        for index, corrid, result, is_final in zip(indices, corrids, results, finals):
            if is_final:
                self.streams.end(corrid)
            responses[index] = pb_utils.InferenceResponse(output_tensors=self.outputs(result))
