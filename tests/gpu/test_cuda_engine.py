"""Runs only where CUDA vLLM and a GPU are present: the engine seam on a real GPU."""

from __future__ import annotations

import asyncio
import uuid

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_two_engines_share_one_gpu_with_planned_kv(smollm2_path):
    from deployments.engine import start_engine
    from deployments.spec import ReplicaResources, ReplicaSpec
    from vllm import SamplingParams

    spec = ReplicaSpec(
        served_name="smollm2-135m", model_path=str(smollm2_path), device_kind="cuda", replicas_per_device=2,
        resources=ReplicaResources(num_gpus=0.5, num_cpus=1), max_num_seqs=64, kv_cache_bytes=1 << 30,
        max_model_len=2048, dtype="bfloat16", enforce_eager=True,
    )
    engines = [start_engine(spec), start_engine(spec)]  # the start lock serializes them

    async def ask(engine):
        final = None
        async for out in engine.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0),
                                         uuid.uuid4().hex):
            final = out
        return final.outputs[0].text

    try:
        for engine in engines:
            assert asyncio.run(ask(engine)).strip()
            cache = engine.vllm_config.cache_config
            per_token = 30 * 2 * 3 * 64 * 2  # SmolLM2 bf16 KV bytes per token
            assert cache.num_gpu_blocks * cache.block_size == pytest.approx((1 << 30) / per_token, rel=0.05)
    finally:
        for engine in engines:
            engine.shutdown()
