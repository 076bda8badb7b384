"""The engine seam on a real GPU: two engines packed on one device with CUDA graphs, the second
starting after the first holds its memory. Runs only where CUDA vLLM and a GPU are present; the
skip is decided through NVML and package metadata, never by initialising CUDA in this process
(a forked engine could not use CUDA then)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.engine_build import cuda_engine_missing

MISSING = cuda_engine_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

KV_BYTES = 1 << 30
SMOLLM2_BF16_KV_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # layers x (K, V) x KV heads x head dim x bytes


def _spec(model_path: str, enforce_eager: bool = False):
    from deployments.spec import ReplicaResources, ReplicaSpec

    return ReplicaSpec(
        served_name="smollm2-135m", model_path=model_path, device_kind="cuda", replicas_per_device=2,
        resources=ReplicaResources(num_gpus=0.5, num_cpus=1), max_num_seqs=64, kv_cache_bytes=KV_BYTES,
        max_model_len=2048, dtype="bfloat16", enforce_eager=enforce_eager,
    )


async def _ask(engine) -> str:
    from vllm import SamplingParams

    final = None
    async for out in engine.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0),
                                     uuid.uuid4().hex):
        final = out
    return final.outputs[0].text


def test_second_colocated_engine_starts_after_the_first_holds_its_memory(smollm2_path):
    from advisor.nvml import cuda_device
    from deployments.engine import engine_args, start_engine

    spec = _spec(str(smollm2_path))
    device = cuda_device("cuda")
    share = float(engine_args(spec)["gpu_memory_utilization"])
    before = device.memory_used()
    engines = [start_engine(spec)]
    try:
        held = device.memory_used() - before
        assert held >= KV_BYTES, f"the first engine holds only {held / 2**20:.0f} MiB: its KV pool is not allocated"
        # vLLM's start check (vllm/v1/worker/utils.py request_memory): free >= share x total.
        assert device.memory_free() >= share * device.memory_total
        engines.append(start_engine(spec))
        assert device.memory_used() - before >= 2 * KV_BYTES
        for engine in engines:
            assert asyncio.run(_ask(engine)).strip()
            assert engine.vllm_config.model_config.enforce_eager is False  # CUDA graphs on
            cache = engine.vllm_config.cache_config
            assert cache.num_gpu_blocks * cache.block_size == pytest.approx(KV_BYTES / SMOLLM2_BF16_KV_PER_TOKEN,
                                                                            rel=0.05)
    finally:
        for engine in engines:
            engine.shutdown()
