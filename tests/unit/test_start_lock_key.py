"""The engine start lock is keyed by the physical GPU the engine runs on, whichever way
CUDA_VISIBLE_DEVICES names it: a CLI profile and a Ray replica on one GPU start one at a time."""

from __future__ import annotations

from advisor.nvml import gpu_uuid
from deployments.engine import device_key
from tests.factories import make_spec
from tests.fake_nvml import FakeNvml

CUDA = make_spec(device_kind="cuda")


def key(cuda_visible_devices: str | None, nvml=None) -> str:
    env = {} if cuda_visible_devices is None else {"CUDA_VISIBLE_DEVICES": cuda_visible_devices}
    return device_key(CUDA, env, nvml if nvml is not None else FakeNvml())


def test_one_gpu_named_by_index_uuid_prefix_or_not_at_all_is_one_lock():
    nvml = FakeNvml()
    gpu0 = key(None, nvml)  # a CLI profile on an unrestricted machine: cuda:0 is NVML's GPU 0
    assert gpu0 == f"cuda-{nvml.uuids[0]}"
    assert key("0", nvml) == key("0,1", nvml) == key(nvml.uuids[0], nvml) == key("GPU-5a1f", nvml) == gpu0
    assert key(f"{nvml.uuids[0]},{nvml.uuids[1]}", nvml) == gpu0  # Ray's replica: the first visible entry


def test_different_gpus_are_different_locks():
    nvml = FakeNvml()
    assert key("1", nvml) == f"cuda-{nvml.uuids[1]}" != key("0", nvml)
    assert key("1,0", nvml) == key(nvml.uuids[1], nvml)


def test_without_nvml_the_visible_devices_string_is_the_key_and_a_safe_file_name():
    no_nvml = FakeNvml(init_fails=True)
    assert key(None, no_nvml) == "cuda-all"
    assert key("0,1", no_nvml) == "cuda-0_1"
    legacy_mig = key("MIG-GPU-5a1f0c3e/1/0", no_nvml)
    assert "/" not in legacy_mig and legacy_mig.startswith("cuda-MIG-GPU-5a1f0c3e")


def test_cpu_engines_share_one_lock_and_gpu_uuid_reads_nothing_without_nvml():
    assert device_key(make_spec(device_kind="cpu"), {}, FakeNvml()) == "cpu"
    assert gpu_uuid("cuda", {}, FakeNvml(init_fails=True)) is None
    assert gpu_uuid("cuda:1", {"CUDA_VISIBLE_DEVICES": "1,0"}, FakeNvml()) == FakeNvml().uuids[0]
