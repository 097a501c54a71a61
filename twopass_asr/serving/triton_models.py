"""What the Triton Python-backend adapters share: parameters, model directories, per-stream
state bookkeeping and error responses. Imported only inside tritonserver's Python stub."""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import locale
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from twopass_asr.parameters import whole_number
from twopass_asr.serving.chunk_scheduler import ChunkScheduler, run_outcomes
from twopass_asr.serving.placement import instance_device
from twopass_asr.serving.stream_store import StreamError, StreamStore
from twopass_asr.store import model_store


def return_freed_memory() -> None:
    """After a model has loaded: collect what loading left behind and hand the heap's free
    memory back to the OS. glibc keeps it otherwise, and loading (checkpoints read whole,
    weights packed or exported to int8) frees gigabytes on the full-size models
    (perf/RESULTS.md, 2026-12-02, memory)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides


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


def resolve_device(params: dict[str, str], args: dict) -> str:
    """This instance's torch device (placement.instance_device): the GPU Triton gave a
    KIND_GPU instance, else TWOPASS_ASR_DEVICE or the `device` parameter."""
    configured = os.environ.get("TWOPASS_ASR_DEVICE") or params.get("device", "cpu")
    try:
        return instance_device(configured, args.get("model_instance_kind", "CPU"),
                               args.get("model_instance_device_id", 0), torch.cuda.is_available)
    except ValueError as exc:
        raise pb_utils.TritonModelException(f"{args['model_name']}: {exc}") from exc


def choice(params: dict[str, str], key: str, env: str, allowed: Sequence[str], default: str) -> str:
    """A parameter whose environment variable, when set, wins; checked against `allowed`."""
    value = os.environ.get(env) or params.get(key, "") or default
    if value not in allowed:
        raise pb_utils.TritonModelException(
            f"parameter {key} (environment {env}) must be one of {', '.join(allowed)}, got {value!r}")
    return value


def cores() -> int:
    return len(os.sched_getaffinity(0))


def torch_threads(configured: str, sharers: int) -> int:
    """The `threads` parameter: torch intra-op threads of each forward pass. Empty: the
    cores shared out between the passes that may run at once (instances x workers), so
    that they do not contend for the same cores."""
    if not configured:
        return max(1, cores() // max(1, sharers))
    return whole_number(configured, "parameter threads")


def worker_count(configured: str, decoupled: bool, instances: int = 1) -> int:
    """The `workers` parameter: forward passes one decoupled instance runs at once.
    Empty: the cores shared out between the instances, at least one each. A model that is
    not decoupled answers in execute: one."""
    if not decoupled:
        if configured not in ("", "1"):
            raise ValueError("parameter workers needs model_transaction_policy { decoupled: true }")
        return 1
    if not configured:
        return max(1, cores() // max(1, instances))
    return whole_number(configured, "parameter workers")


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
    outlive the metric. Updates are serialised across the process's threads: the Python
    backend of tritonserver 2.51 corrupts its shared memory when two threads of one stub
    update metrics at once (SIGSEGV in its metric handling, reproduced in seconds with
    worker threads answering chunks).

    A model's finalize calls release_all: a metric still referenced when the stub's
    interpreter shuts down (from a leftover frame, say) is freed after the stub has let go of
    its shared memory, and the stub dies of SIGSEGV on the way out."""

    _update_lock = threading.Lock()
    _live: list["InstanceMetric"] = []  # a stub process runs one model instance

    def __init__(self, args: dict, name: str, description: str, kind) -> None:
        self._family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self._metric = self._family.Metric(labels={"model": args["model_name"],
                                                   "instance": args["model_instance_name"]})
        with self._update_lock:
            self._live.append(self)

    def set(self, value: float) -> None:
        with self._update_lock:
            if self._metric is not None:
                self._metric.set(value)

    def increment(self, value: float) -> None:
        with self._update_lock:
            if self._metric is not None:
                self._metric.increment(value)

    @classmethod
    def release_all(cls) -> None:
        """Free every metric of this process now; later updates are dropped."""
        with cls._update_lock:
            for metric in cls._live:
                metric._metric = metric._family = None
            cls._live.clear()


class SequenceModel:
    """Base of the sequence-batched adapters. Subclasses give the engine and the I/O:
    `load(model_dir, device, params)`, `new_state(request)`, `process_batch(states, audios, finals)`
    and `outputs(result)`.

    Not decoupled, execute computes its requests in one batched pass and returns the
    answers. Decoupled (model_transaction_policy), execute hands the chunks to a
    ChunkScheduler whose `workers` threads run batched passes side by side, and each
    answer is sent when its pass is done."""

    store_name: str = ""  # the model's directory name in the model store
    validate_dir: Callable[[Path], None]
    passes_may_overlap = True  # False: the engine must not run two passes at once (workers 1)

    def initialize(self, args: dict) -> None:
        use_utf8_locale()
        config, params = model_parameters(args)
        self.logger = pb_utils.Logger
        model_dir = resolve_model_dir(args, params, self.store_name)
        try:
            type(self).validate_dir(model_dir)
        except model_store.ModelDirError as exc:
            raise pb_utils.TritonModelException(str(exc)) from exc
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", []))
        try:
            self.workers = workers = worker_count(params.get("workers", ""), self.decoupled, instances)
            if workers > 1 and not self.passes_may_overlap:
                raise ValueError(f"{args['model_name']} runs one pass at a time: set parameter workers to 1")
            threads = torch_threads(params.get("threads", ""), instances * workers)
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from exc
        torch.set_num_threads(threads)
        device = resolve_device(params, args)
        self.load(model_dir, device, params)
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds", 60_000_000))
        self.streams: StreamStore = StreamStore(
            max_streams=int(params.get("max_streams", "1024")), idle_timeout_s=idle_us / 1e6
        )
        self.active_streams = InstanceMetric(args, "twopass_asr_active_streams",
                                             "Streams whose state this model instance holds",
                                             pb_utils.MetricFamily.GAUGE)
        self.passes = InstanceMetric(args, "twopass_asr_sequence_passes_total",
                                     "Batched passes over chunks of sequences", pb_utils.MetricFamily.COUNTER)
        self.pass_chunks = InstanceMetric(args, "twopass_asr_sequence_pass_chunks_total",
                                          "Chunks computed in those passes", pb_utils.MetricFamily.COUNTER)
        self.pass_seconds = InstanceMetric(args, "twopass_asr_sequence_pass_seconds_total",
                                           "Seconds those passes ran", pb_utils.MetricFamily.COUNTER)
        self.scheduler = None
        if self.decoupled:
            self.scheduler = ChunkScheduler(
                self._process_chunks, workers=workers, max_batch=max(1, int(config.get("max_batch_size", 1))),
                # torch's thread count is per thread: each worker sets its own.
                on_worker_start=lambda: torch.set_num_threads(threads), name=args["model_name"])
        return_freed_memory()
        # The launcher reads this line as the end of the load (triton_launcher.unconfirmed_loads).
        self.logger.log_info(f"{args['model_name']}: loaded {model_store.served_path(model_dir)} on {device}, "
                             f"{threads} torch thread(s) x {workers} worker(s)")

    def finalize(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        InstanceMetric.release_all()

    def execute(self, requests):
        responses: list = [None] * len(requests)
        chunks: list[tuple[int, tuple[int, Any, np.ndarray, bool]]] = []
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
                chunks.append((index, (corrid, state, audio, bool(optional_scalar(request, "END")))))
            except (StreamError, ValueError) as exc:
                responses[index] = error_response(str(exc))

        if not self.decoupled:
            if chunks:
                outcomes = run_outcomes(self._process_chunks, [chunk for _, chunk in chunks])
                for (index, chunk), (result, error) in zip(chunks, outcomes):
                    responses[index] = self._answer(chunk, result, error)
            self.active_streams.set(len(self.streams))
            return responses

        for request, response in zip(requests, responses):
            if response is not None:
                request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        for index, chunk in chunks:
            self.scheduler.submit(chunk[1], chunk,
                                  functools.partial(self._send_answer, requests[index].get_response_sender(), chunk))
        self.active_streams.set(len(self.streams))
        return None

    def _send_answer(self, sender, chunk, result, error) -> None:
        response = self._answer(chunk, result, error)
        if error is not None or chunk[3]:  # the stream ended: the gauge drops before its client hears
            self.active_streams.set(len(self.streams))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _process_chunks(self, chunks) -> list:
        _, states, audios, finals = zip(*chunks)
        started = time.monotonic()
        results = self.process_batch(list(states), list(audios), list(finals))
        self.pass_seconds.increment(time.monotonic() - started)
        self.passes.increment(1)
        self.pass_chunks.increment(len(chunks))
        return results

    def _answer(self, chunk, result, error) -> "pb_utils.InferenceResponse":
        """The response to one chunk; a stream whose pass failed is dropped, and the model
        keeps serving the others."""
        corrid, state, _, is_final = chunk
        if error is not None:
            self.logger.log_error(f"{self.store_name}: a pass with stream {corrid} failed: {error!r}")
            self.streams.end(corrid, state)
            return error_response(f"internal error in {self.store_name}: {error}")
        if is_final:
            self.streams.end(corrid, state)
        return pb_utils.InferenceResponse(output_tensors=self.outputs(result))
