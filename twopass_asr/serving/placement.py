"""Which device a Triton model instance computes on (torch-free, so it is checked without a GPU).

Triton places each instance of an `instance_group { kind: KIND_GPU gpus: [...] }` on one of
the listed GPUs and tells the Python model which (model_instance_kind "GPU",
model_instance_device_id N): that instance runs on cuda:N, so a group over several GPUs
spreads its instances over them. Instances of kind CPU (the repository's default) run where
the `device` setting says: cpu, cuda (the first GPU), cuda:N, or auto (cuda when torch sees
a GPU).
"""

from __future__ import annotations

import logging
from typing import Callable

DEVICE_SETTINGS = ("cpu", "cuda", "auto")
log = logging.getLogger(__name__)


def instance_device(configured: str, instance_kind: str, instance_device_id: int | str,
                    cuda_available: Callable[[], bool]) -> str:
    """The torch device of a model instance: `configured` is the `device` setting, the rest
    what Triton passes the instance. ValueError for a setting that cannot be met."""
    if configured not in DEVICE_SETTINGS and not _is_cuda_ordinal(configured):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {configured!r}")
    if instance_kind == "GPU":
        placed = f"cuda:{int(instance_device_id)}"
        if _is_cuda_ordinal(configured) and configured != placed:
            raise ValueError(f"device {configured} contradicts the instance group, which placed this "
                             f"instance on {placed}: set device to cuda or auto, or change the group's gpus")
        if configured == "cpu":
            log.info("instance group kind KIND_GPU places this instance on %s (the device setting cpu applies "
                     "to KIND_CPU instances)", placed)
        return placed
    if configured == "auto":
        return "cuda" if cuda_available() else "cpu"
    return configured


def physical_gpu(device: str, visible_devices: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES entry of a torch device cuda[:N] as this process sees it
    (`visible_devices`: this process's CUDA_VISIBLE_DEVICES), for processes it starts that
    must use that GPU alone."""
    ordinal = int(device.partition(":")[2] or 0)
    if not visible_devices:
        return str(ordinal)
    visible = [entry.strip() for entry in visible_devices.split(",") if entry.strip()]
    if ordinal >= len(visible):
        raise ValueError(f"{device} is not among the GPUs CUDA_VISIBLE_DEVICES={visible_devices!r} makes visible")
    return visible[ordinal]


def _is_cuda_ordinal(value: str) -> bool:
    prefix, _, ordinal = value.partition(":")
    return prefix == "cuda" and ordinal.isdigit()


__all__ = ["DEVICE_SETTINGS", "instance_device", "physical_gpu"]
