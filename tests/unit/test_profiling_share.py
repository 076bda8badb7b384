"""The CUDA profiling engine's memory share: vLLM starts an engine only when the free memory it
sees covers its share of the whole device, so the share follows what the engine needs, not 0.9."""

from __future__ import annotations

import math

import pytest

from advisor.profiler import WorkloadShape
from deployments.engine import engine_args
from deployments.profiling import (SWEEP_MEMORY, AdvisorError, DeviceMemory, cuda_kv_room, cuda_memory_share,
                                   profiling_spec)
from tests.unit.test_cuda_path import _memory

GIB = 1 << 30
CONTEXT = 600 << 20  # the CUDA context the engine's worker creates before vLLM reads the free memory


def vllm_starts(free_bytes: int, total_bytes: int, gpu_memory_utilization: float) -> bool:
    """vLLM 0.32's start check (vllm/v1/worker/utils.py `request_memory`): the free memory the
    worker sees must be at least ceil(total x gpu_memory_utilization)."""
    return free_bytes >= math.ceil(total_bytes * gpu_memory_utilization)


def test_profiling_engine_starts_next_to_a_tenant_holding_a_third_of_the_gpu():
    total, free = 80 * GIB, 52 * GIB  # another tenant holds 28 GiB
    memory = _memory(weight_bytes=16 * GIB)
    spec = profiling_spec("/m", memory, WorkloadShape(), 64, "cuda", 20 * GIB,
                          device_memory=DeviceMemory(free_bytes=free, total_bytes=total))
    util = engine_args(spec)["gpu_memory_utilization"]
    assert vllm_starts(free - CONTEXT, total, util)
    assert util * total >= memory.weight_bytes + spec.kv_cache_bytes + SWEEP_MEMORY.cuda_reserve_bytes


def test_share_covers_the_need_rounded_up_to_vllms_four_decimals():
    share = cuda_memory_share(free_bytes=70 * GIB, total_bytes=80 * GIB, weight_bytes=16 * GIB, kv_bytes=10 * GIB,
                              reserve_bytes=3 * GIB)
    assert share == math.ceil(29 / 80 * 10_000) / 10_000 == 0.3625
    odd = cuda_memory_share(70 * GIB, 80 * GIB, 16 * GIB, 10 * GIB + 12345, 3 * GIB)
    assert odd == 0.3626 and round(odd, 4) == odd  # engine_args' rounding keeps it


def test_engines_started_one_after_another_each_ask_for_their_own_need():
    share = cuda_memory_share(70 * GIB, 80 * GIB, 4 * GIB, 6 * GIB, 2 * GIB, engines=4)
    per_engine = share / 4
    assert per_engine == pytest.approx(12 / 80)
    free = 70 * GIB
    for _ in range(4):  # each start sees the memory of the ones before it gone
        assert vllm_starts(free - CONTEXT, 80 * GIB, round(per_engine, 4))
        free -= 12 * GIB


def test_a_need_the_free_memory_cannot_pass_names_the_numbers_and_the_fix():
    with pytest.raises(AdvisorError) as err:
        cuda_memory_share(free_bytes=30 * GIB, total_bytes=80 * GIB, weight_bytes=16 * GIB, kv_bytes=12 * GIB,
                          reserve_bytes=3 * GIB)
    text = str(err.value)
    assert "31.0 GiB" in text and "30.0 of 80.0 GiB free" in text and "16.0 GiB weights" in text
    assert "--max-kv-bytes" in text and "free the device" in text


def test_a_cpu_profiling_spec_keeps_its_share():
    device = DeviceMemory(free_bytes=30 * GIB, total_bytes=64 * GIB)
    spec = profiling_spec("/m", _memory(), WorkloadShape(), 8, "cpu", 4 * GIB, device_memory=device)
    assert spec.device_memory_fraction == 0.9


def test_the_profile_reads_free_and_total_of_its_device_once_for_the_pool_and_the_share(monkeypatch):
    import deployments.profiling as profiling
    from advisor.nvml import NvmlDevice
    from deployments.profiling import AdvisorRequest
    from tests.fake_nvml import FakeNvml

    monkeypatch.setattr(profiling, "cuda_device", lambda device: NvmlDevice("0", FakeNvml()))  # 10 GiB in use
    device = profiling._device_memory(AdvisorRequest(model="m", device="cuda"))
    assert device == DeviceMemory(free_bytes=70 * GIB, total_bytes=80 * GIB)
    cap = profiling._kv_cap(AdvisorRequest(model="m", device="cuda"), _memory())
    spec = profiling_spec("/m", _memory(), WorkloadShape(), 64, "cuda", cap, device_memory=device)
    assert vllm_starts(device.free_bytes - CONTEXT, device.total_bytes, engine_args(spec)["gpu_memory_utilization"])
    assert profiling._device_memory(AdvisorRequest(model="m", device="cpu")) is None


def test_a_pool_as_large_as_the_kv_room_always_gets_a_share():
    for free in (6 * GIB, 37 * GIB + 12345, 79 * GIB + 999):
        kv = cuda_kv_room(free, weight_bytes=2 * GIB)
        share = cuda_memory_share(free, 80 * GIB, 2 * GIB, kv, SWEEP_MEMORY.cuda_reserve_bytes)
        assert vllm_starts(free - CONTEXT, 80 * GIB, share)


def test_a_cap_read_when_more_memory_was_free_is_clamped_to_the_later_reading():
    memory = _memory(weight_bytes=16 * GIB)
    cap = SWEEP_MEMORY.cuda_free_share * 70 * GIB - 19 * GIB  # read when 70 GiB were free
    later = DeviceMemory(free_bytes=69 * GIB, total_bytes=80 * GIB)
    spec = profiling_spec("/m", memory, WorkloadShape(prompt_tokens=2048), 128, "cuda", int(cap), device_memory=later)
    assert spec.kv_cache_bytes <= cuda_kv_room(later.free_bytes, memory.weight_bytes) < cap
    assert vllm_starts(later.free_bytes - CONTEXT, later.total_bytes, engine_args(spec)["gpu_memory_utilization"])


def test_measured_replicas_each_pass_vllms_check_after_the_ones_before_them(monkeypatch):
    from deployments import profiling
    from deployments.profiling import AdvisorRequest, _replicas_share
    from tests.factories import make_profile

    total, free = 80 * GIB, 40 * GIB  # a tenant holds 40 GiB: 0.9 / 2 each fails the second replica
    monkeypatch.setattr(profiling, "_device_memory", lambda req: DeviceMemory(free_bytes=free, total_bytes=total))
    memory = _memory(weight_bytes=2 * GIB)
    kv = 8 * GIB
    profile = make_profile()
    spec = profiling_spec("/m", memory, WorkloadShape(), 64, "cuda", kv, device_memory=DeviceMemory(
        free_bytes=free, total_bytes=total)).model_copy(update={
            "replicas_per_device": 2, "kv_cache_bytes": kv,
            "device_memory_fraction": _replicas_share(AdvisorRequest(model="m", device="cuda"), memory, profile, kv, 2)})
    util = engine_args(spec)["gpu_memory_utilization"]
    need = memory.weight_bytes + kv + SWEEP_MEMORY.cuda_reserve_bytes
    assert vllm_starts(free - CONTEXT, total, util)  # the first replica
    assert vllm_starts(free - need - CONTEXT, total, util)  # the second, with the first's memory gone
    assert not vllm_starts(free - need - CONTEXT, total, round(0.9 / 2, 4))  # what a fixed 0.9 asked
    monkeypatch.setattr(profiling, "_device_memory", lambda req: None)
    assert _replicas_share(AdvisorRequest(model="m"), memory, profile, kv, 2) == 0.9  # CPU
