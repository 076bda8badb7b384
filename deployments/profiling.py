"""The vLLM side of profiling: a `BatchRunner` over a real `AsyncLLM` built through the engine seam.

`advisor/profiler.py` owns the sweep; this module only starts an engine sized for the sweep and
runs closed batches of exactly B requests of random token-id prompts (ignore_eos, so every
request produces exactly the output length), timing TTFT and every token.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from typing import Optional

import psutil

from advisor.memory import MemoryModel
from advisor.profiler import BatchMeasurement, WorkloadShape
from deployments.engine import start_engine
from deployments.replica_stats import ReplicaStats, stat_logger_factory
from deployments.spec import DeviceKind, EngineKwargValue, ReplicaResources, ReplicaSpec

KV_POLL_S = 0.05


def profiling_spec(
    model_path: str, memory: MemoryModel, shape: WorkloadShape, max_batch: int, device_kind: DeviceKind,
    max_kv_bytes: int, dtype: str = "auto", engine_kwargs: Optional[dict[str, EngineKwargValue]] = None,
) -> ReplicaSpec:
    """One engine on the whole device, with KV room for `max_batch` sequences of the longest shape."""
    longest = shape.prompt_tokens * 4 + shape.output_tokens  # the fit points use 4x the prompt
    kv = min(max_kv_bytes, int(memory.kv_bytes_for(max_batch, longest) * 1.05))
    return ReplicaSpec(
        served_name="profile", model_path=model_path, device_kind=device_kind, replicas_per_device=1,
        resources=ReplicaResources(num_cpus=1), max_num_seqs=max_batch, kv_cache_bytes=kv,
        max_model_len=min(memory.max_model_len, longest + 16), dtype=dtype, enforce_eager=True,
        engine_kwargs=dict(engine_kwargs or {}),
    )


class VllmBatchRunner:
    """Runs closed batches on one AsyncLLM; use as a context manager (shuts the engine down)."""

    def __init__(self, spec: ReplicaSpec, seed: int = 0, cores: Optional[list[int]] = None):
        self.spec = spec
        self.max_batch = spec.max_num_seqs
        self.stats = ReplicaStats()
        if spec.device_kind == "cpu" and cores is None:
            cores = sorted(os.sched_getaffinity(0))
        self.cores = cores
        self.engine = start_engine(spec, cores, [stat_logger_factory(self.stats)])
        self._loop = asyncio.new_event_loop()
        self._rng = random.Random(seed)
        self.num_kv_blocks = self.engine.vllm_config.cache_config.num_gpu_blocks
        self.kv_block_tokens = self.engine.vllm_config.cache_config.block_size

    def __enter__(self) -> "VllmBatchRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.shutdown()
        # The engine's output-handler task lives on our loop: let it finish before closing.
        pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def engine_memory_bytes(self) -> int:
        """Memory the engine holds: RSS of its processes on CPU, device memory used on CUDA."""
        if self.spec.device_kind == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info()
            return int(total - free)
        children = psutil.Process().children(recursive=True)
        return sum(_rss(p) for p in children if p.name().startswith("VLLM"))

    def run(self, batch: int, shape: WorkloadShape) -> BatchMeasurement:
        return self._loop.run_until_complete(self._run(batch, shape))

    async def _run(self, batch: int, shape: WorkloadShape) -> BatchMeasurement:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=shape.output_tokens, ignore_eos=True, temperature=0.0,
                                detokenize=False, output_kind=RequestOutputKind.DELTA)
        peak = 0.0
        done = asyncio.Event()

        async def watch_kv() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, self.stats.snapshot(time.monotonic()).kv_usage)
                await asyncio.sleep(KV_POLL_S)

        async def one() -> tuple[float, float, int]:
            # Distinct random prompts: prefix caching must not turn prefill into a cache hit.
            ids = [self._rng.randrange(100, 10_000) for _ in range(shape.prompt_tokens)]
            t0 = time.perf_counter()
            first = last = None
            n = 0
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
                now = time.perf_counter()
                n += len(out.outputs[0].token_ids)
                first = first if first is not None else now
                last = now
            return (first - t0) * 1000.0, (last - first) * 1000.0 / max(1, n - 1), n

        watcher = asyncio.create_task(watch_kv())
        start = time.perf_counter()
        results = await asyncio.gather(*[one() for _ in range(batch)])
        wall = time.perf_counter() - start
        done.set()
        await watcher
        return BatchMeasurement(
            batch=batch, wall_s=wall, output_tokens=sum(r[2] for r in results),
            ttft_ms=[r[0] for r in results], tpot_ms=[r[1] for r in results], kv_usage_peak=peak,
        )


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0
