"""advisor/nvml.py against a stand-in pynvml module (injected by constructor): which physical GPU
a CUDA device is, and the GPM sampler's probe, error handling, back-off and sample bookkeeping."""

from __future__ import annotations

import pytest

from advisor.nvml import (
    GPM_DRAM_BW_UTIL,
    GpuSelectionError,
    NvmlDevice,
    NvmlSampler,
    SamplerConfig,
    cuda_device,
    cuda_device_count,
    physical_entry,
    visible_entries,
)
from tests.fake_nvml import FakeNvml

GIB = 1 << 30
NVML_ERROR_NOT_SUPPORTED = 3


# ---- which device ---------------------------------------------------------------------------
def test_visible_entries_parse_unset_empty_and_lists():
    assert visible_entries(None) is None
    assert visible_entries("") == []
    assert visible_entries("NoDevFiles") == []
    assert visible_entries("1, 0") == ["1", "0"]


def test_physical_entry_follows_cuda_visible_devices():
    assert physical_entry(1, None) == "1"
    assert physical_entry(0, "3,2") == "3"
    assert physical_entry(1, "GPU-aa,MIG-bb") == "MIG-bb"
    with pytest.raises(GpuSelectionError, match="cuda:2.*only 2 device"):
        physical_entry(2, "0,1")


def test_ray_assigned_second_gpu_by_index_is_read_from_physical_gpu_1():
    # Ray gives the replica GPU 1: CUDA_VISIBLE_DEVICES=1, the engine calls it cuda:0.
    nvml = FakeNvml()
    device = cuda_device("cuda:0", {"CUDA_VISIBLE_DEVICES": "1"}, nvml)
    assert device.handle == ("gpu", 1)
    assert device.memory_used() == 2 * GIB  # GPU 1's memory, not GPU 0's 10 GiB


def test_uuid_entries_map_to_their_nvml_handles():
    nvml = FakeNvml()
    env = {"CUDA_VISIBLE_DEVICES": f"{nvml.uuids[1]},{nvml.uuids[0]}"}
    assert cuda_device("cuda:0", env, nvml).handle == ("gpu", 1)
    assert cuda_device("cuda:1", env, nvml).handle == ("gpu", 0)


def test_mig_uuid_maps_to_the_mig_instance():
    nvml = FakeNvml()
    device = cuda_device("cuda", {"CUDA_VISIBLE_DEVICES": "MIG-c0ffee00-2222-2222-2222-222222222222"}, nvml)
    assert device.handle == ("mig", 1)
    assert device.memory_total == 10 * GIB and "MIG" in device.name


def test_unique_uuid_prefix_is_accepted_like_cuda_does_and_unknown_is_an_error():
    nvml = FakeNvml()
    assert NvmlDevice("GPU-9b7e", nvml).handle == ("gpu", 1)
    with pytest.raises(GpuSelectionError, match="GPU-ffff.*nvidia-smi -L"):
        NvmlDevice("GPU-ffff", nvml)


def test_no_nvml_means_no_device_and_zero_count():
    nvml = FakeNvml(init_fails=True)
    assert cuda_device("cuda", {}, nvml) is None
    assert cuda_device_count({}, nvml) == 0


def test_device_count_respects_cuda_visible_devices():
    assert cuda_device_count({}, FakeNvml()) == 2
    assert cuda_device_count({"CUDA_VISIBLE_DEVICES": "1"}, FakeNvml()) == 1
    assert cuda_device_count({"CUDA_VISIBLE_DEVICES": ""}, FakeNvml()) == 0


# ---- GPM sampler ----------------------------------------------------------------------------
def _sampler(nvml: FakeNvml, **config) -> NvmlSampler:
    return NvmlSampler(NvmlDevice("0", nvml), SamplerConfig(**config))


def test_gpm_readings_are_means_between_samples_and_every_sample_is_freed():
    nvml = FakeNvml()
    sampler = _sampler(nvml)
    assert sampler.gpm and not nvml.live  # the probe freed its sample
    for _ in range(3):
        sampler.sample_once()
    sampler.release()
    reading = sampler.reading()
    assert reading.dram_bw_util == pytest.approx(61.5)
    assert reading.sm_util == pytest.approx(42.0)
    assert reading.gpu_busy == pytest.approx(88.0)  # GPM graphics activity, the time-slicing bound
    assert reading.memory_used_bytes == 10 * GIB
    assert not nvml.live


def test_gpm_flag_without_working_samples_is_probed_off_without_a_leak():
    nvml = FakeNvml(failing_sample_gets=-1)  # vGPU guest: support flag set, sampling fails
    sampler = _sampler(nvml)
    assert not sampler.gpm
    assert not nvml.live
    sampler.sample_once()
    assert sampler.reading().dram_bw_util is None
    assert sampler.reading().gpu_busy is None
    assert sampler.reading().sm_util == 37.0  # the coarse utilisation instead


def test_a_failed_metric_is_not_recorded_as_zero_and_backs_off():
    nvml = FakeNvml(metric_codes={GPM_DRAM_BW_UTIL: NVML_ERROR_NOT_SUPPORTED})
    sampler = _sampler(nvml)
    sampler.sample_once()  # first sample
    sampler.sample_once()  # metrics: DRAM BW fails, SM works
    assert sampler.reading().dram_bw_util is None
    assert sampler.reading().sm_util == pytest.approx(42.0)
    gets = nvml.sample_gets
    sampler.sample_once()  # backing off: no NVML GPM call this period
    assert nvml.sample_gets == gets
    sampler.release()
    assert not nvml.live


def test_repeated_run_time_failures_give_up_gpm_and_leak_nothing():
    nvml = FakeNvml()
    sampler = _sampler(nvml, gpm_max_failures=3, gpm_max_backoff_periods=2)
    nvml.failing_sample_gets = -1  # starts failing after the probe (e.g. MIG reconfigured)
    for _ in range(20):
        sampler.sample_once()
    assert not sampler.gpm
    assert not nvml.live
    assert nvml.sample_gets == 1 + 3  # the probe, then three failures with back-off between them
    assert sampler.reading().dram_bw_util is None


def test_recovery_after_one_failure_resets_the_back_off():
    nvml = FakeNvml()
    sampler = _sampler(nvml)
    nvml.failing_sample_gets = 1
    sampler.sample_once()  # fails; skip one period
    sampler.sample_once()  # skipped
    sampler.sample_once()  # first sample again
    sampler.sample_once()  # a reading
    assert sampler.gpm and sampler.reading().dram_bw_util == pytest.approx(61.5)
    sampler.release()
    assert not nvml.live


def test_start_stop_thread_frees_its_samples():
    nvml = FakeNvml()
    sampler = _sampler(nvml, period_s=0.001)
    for _ in range(3):  # the replica restarts the sampler every gauge period
        sampler.start()
        sampler.stop()
    assert not nvml.live
