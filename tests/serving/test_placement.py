"""Which device a Triton model instance computes on: the GPU Triton gives a KIND_GPU instance,
else the device setting."""

from __future__ import annotations

import pytest

from twopass_asr.serving.placement import instance_device, physical_gpu


def no_gpu() -> bool:
    return False


def a_gpu() -> bool:
    return True


@pytest.mark.parametrize("device_id", [0, 1, "3"])
def test_a_kind_gpu_instance_runs_on_the_gpu_triton_gave_it(device_id):
    # An instance group over gpus [0, 1, 3] spreads its instances: each gets its own ordinal.
    for configured in ("cpu", "cuda", "auto", f"cuda:{device_id}"):
        assert instance_device(configured, "GPU", device_id, no_gpu) == f"cuda:{device_id}"


def test_a_device_setting_naming_another_gpu_than_the_group_is_refused():
    with pytest.raises(ValueError, match=r"device cuda:0 contradicts the instance group.*cuda:1"):
        instance_device("cuda:0", "GPU", 1, a_gpu)


def test_a_cpu_instance_follows_the_device_setting():
    assert instance_device("cpu", "CPU", 0, a_gpu) == "cpu"
    assert instance_device("cuda:2", "CPU", 0, a_gpu) == "cuda:2"
    assert instance_device("auto", "CPU", 0, a_gpu) == "cuda"
    assert instance_device("auto", "CPU", 0, no_gpu) == "cpu"
    for bad in ("gpu", "cuda:x", "CUDA", ""):
        with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or auto"):
            instance_device(bad, "CPU", 0, a_gpu)


def test_engine_processes_are_given_the_physical_gpu_of_the_instances_ordinal():
    assert physical_gpu("cuda:1", None) == "1"
    assert physical_gpu("cuda", "") == "0"
    # Ordinals count the GPUs this process sees.
    assert physical_gpu("cuda:1", "4,6") == "6"
    assert physical_gpu("cuda:0", "GPU-5e1f, GPU-77aa") == "GPU-5e1f"
    with pytest.raises(ValueError, match="not among the GPUs"):
        physical_gpu("cuda:2", "4,6")
