"""The LLM replica deployment: one vLLM `AsyncLLM` engine behind a Ray Serve replica.

Owns prompt preparation (chat template, token limits), streaming and non-streaming generation,
cancellation (a cancelled call aborts the engine request), the health check (fails once the
engine process is gone), and the replica's load signals (`record_autoscaling_stats()` plus the
same values as `ray.serve.metrics` gauges).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import AsyncIterator, Optional, Union

import psutil
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.metrics import Gauge

from deployments.engine import cpu_cores_for, start_engine, vllm_version
from deployments.models import resolve_model
from deployments.protocol import (
    Choice,
    GenerateChunk,
    GenerateError,
    GenerateOutcome,
    GenerateRequest,
    GenerateResult,
    StreamItem,
)
from deployments.replica_stats import ReplicaStats, ReplicaStatsSnapshot, stat_logger_factory
from deployments.spec import ReplicaSpec

logger = logging.getLogger("ray.serve")

GAUGE_PERIOD_S = 2.0
_GAUGES = {
    "running_requests": "Sequences the vLLM engine is decoding now.",
    "waiting_requests": "Requests queued inside the vLLM engine.",
    "ongoing_requests": "Requests the replica holds.",
    "tokens_per_s": "Generated tokens per second (10 s window).",
    "mean_context_tokens": "Mean prompt+generated tokens of ongoing requests.",
    "kv_usage": "Share of the replica's KV pool in use (0..1).",
    "preemptions_total": "Sequences preempted by the engine since start.",
    "recent_requests": "Requests finished in the last 60 s.",
    "recent_prompt_tokens": "Mean prompt tokens of requests finished in the last 60 s.",
    "recent_output_tokens": "Mean generated tokens of requests finished in the last 60 s.",
}


class ReplicaInfo(BaseModel):
    """What a replica is and where its engine runs (for status pages and fault tests)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    replica_id: str
    pid: int
    served_name: str
    model_path: str
    device_kind: str
    cpu_cores: Optional[list[int]]
    engine_pids: list[int]
    num_kv_blocks: Optional[int]
    kv_block_tokens: Optional[int]
    max_model_len: int
    vllm_version: str


class _Prepared(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    prompt_token_ids: list[int]
    max_tokens: int


class LLMReplica:
    """Serve deployment class; `deployments/app.py` applies its options from the spec."""

    async def __init__(self, spec: ReplicaSpec):
        path = await asyncio.to_thread(resolve_model, spec.model_path)
        self.spec = spec.model_copy(update={"model_path": str(path)})
        self.stats = ReplicaStats()
        self.cores: Optional[list[int]] = None
        if spec.device_kind == "cpu":
            slot = _local_rank()
            self.cores = cpu_cores_for(slot, spec.replicas_per_device, sorted(os.sched_getaffinity(0)))
        self.engine = start_engine(self.spec, self.cores, [stat_logger_factory(self.stats)])
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self._gauges = {}
        for name, desc in _GAUGES.items():
            g = Gauge(f"plateau_replica_{name}", description=desc, tag_keys=("model",))
            g.set_default_tags({"model": spec.served_name})  # Serve adds its tags into this dict
            self._gauges[name] = g
        # On a GPU: the device's DRAM bandwidth use (NVML GPM) over each gauge period. Replicas
        # sharing a GPU report the same device-wide number.
        self._sampler = _device_sampler() if spec.device_kind == "cuda" else None
        if self._sampler is not None:
            g = Gauge("plateau_replica_device_dram_bw_util", description="DRAM bandwidth use of the replica's GPU, % "
                      "of peak (NVML GPM).", tag_keys=("model",))
            g.set_default_tags({"model": spec.served_name})
            self._gauges["device_dram_bw_util"] = g
            self._sampler.start()
        self._gauge_task = asyncio.get_running_loop().create_task(self._publish_gauges())
        logger.info("replica of %s ready: cores=%s max_model_len=%d", spec.served_name, self.cores, self.max_model_len)

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateOutcome:
        """Run one request to completion."""
        from vllm.sampling_params import RequestOutputKind

        prepared = self._prepare(request)
        if isinstance(prepared, GenerateError):
            return prepared
        final = None
        async for item in self._run(request, prepared, RequestOutputKind.FINAL_ONLY):
            if isinstance(item, GenerateError):
                return item
            final = item
        choices = [
            Choice(index=o.index, text=o.text, finish_reason=o.finish_reason, completion_tokens=len(o.token_ids))
            for o in sorted(final.outputs, key=lambda o: o.index)
        ]
        return GenerateResult(choices=choices, prompt_tokens=len(prepared.prompt_token_ids))

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[StreamItem]:
        """Yield new text per choice as the engine produces it."""
        from vllm.sampling_params import RequestOutputKind

        prepared = self._prepare(request)
        if isinstance(prepared, GenerateError):
            yield prepared
            return
        counts: dict[int, int] = {}
        prompt_tokens = len(prepared.prompt_token_ids)
        async for item in self._run(request, prepared, RequestOutputKind.DELTA):
            if isinstance(item, GenerateError):
                yield item
                return
            for out in item.outputs:
                counts[out.index] = counts.get(out.index, 0) + len(out.token_ids)
                yield GenerateChunk(
                    index=out.index,
                    text=out.text,
                    finish_reason=out.finish_reason,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=counts[out.index],
                )

    async def _run(self, request: GenerateRequest, prepared: _Prepared, kind) -> AsyncIterator[Union[object, GenerateError]]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        params = self._sampling_params(request, prepared.max_tokens, kind)
        rid = request.request_id
        prompt_len = len(prepared.prompt_token_ids)
        generated = 0
        self.stats.on_start(rid, prompt_len)
        try:
            async for out in self.engine.generate({"prompt_token_ids": prepared.prompt_token_ids}, params, rid):
                new = sum(len(o.token_ids) for o in out.outputs)
                if kind.name == "FINAL_ONLY":
                    new -= generated  # final output carries all tokens so far
                generated += new
                self.stats.on_tokens(time.monotonic(), rid, new, prompt_len + generated // max(1, request.n))
                yield out
        except EngineDeadError:
            yield GenerateError(
                status=503, type="service_unavailable",
                message=f"the replica serving {self.spec.served_name!r} lost its engine; retry the request",
                retryable=True,
            )
        except VLLMClientError as exc:
            yield GenerateError(status=400, type="invalid_request_error", message=str(exc))
        finally:
            self.stats.on_finish(rid, time.monotonic(), generated // max(1, request.n))

    def _prepare(self, request: GenerateRequest) -> Union[_Prepared, GenerateError]:
        tok = self.engine.tokenizer
        if request.messages is not None:
            if not getattr(tok, "chat_template", None):
                return _bad("messages", f"model {self.spec.served_name!r} has no chat template; use /v1/completions")
            text = tok.apply_chat_template(
                [m.model_dump() for m in request.messages], tokenize=False, add_generation_prompt=True
            )
            ids = list(tok.encode(text, add_special_tokens=False))
        elif request.prompt is not None:
            ids = list(tok.encode(request.prompt))
        else:
            ids = list(request.prompt_token_ids or [])
            vocab = len(tok) if tok is not None else None
            if vocab is not None and any(t < 0 or t >= vocab for t in ids):
                return _bad("prompt", f"token ids must be in [0, {vocab}) for this model")
        param = "messages" if request.messages is not None else "prompt"
        if not ids:
            return _bad(param, "the prompt is empty; send at least one token")
        limit = self.max_model_len
        if len(ids) >= limit:
            return _bad(
                param,
                f"the prompt has {len(ids)} tokens but this model's context length (max_model_len) is "
                f"{limit} tokens, which must also hold at least one output token; shorten the prompt",
            )
        max_tokens = request.max_tokens if request.max_tokens is not None else limit - len(ids)
        if len(ids) + max_tokens > limit:
            return _bad(
                "max_tokens",
                f"this model's context length (max_model_len) is {limit} tokens; you asked for "
                f"{len(ids)} prompt + {max_tokens} output tokens; lower max_tokens to at most {limit - len(ids)}",
            )
        return _Prepared(prompt_token_ids=ids, max_tokens=max_tokens)

    @staticmethod
    def _sampling_params(request: GenerateRequest, max_tokens: int, kind):
        from vllm import SamplingParams

        return SamplingParams(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=max_tokens,
            stop=request.stop or None,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            ignore_eos=request.ignore_eos,
            output_kind=kind,
        )

    # ---- health, stats, info ----------------------------------------------------------------
    async def check_health(self) -> None:
        if self.engine.errored:
            raise RuntimeError(f"vLLM engine of {self.spec.served_name!r} is dead; Serve will replace this replica")

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.stats.snapshot(time.monotonic()).as_metrics()

    def get_stats(self) -> ReplicaStatsSnapshot:
        return self.stats.snapshot(time.monotonic())

    def info(self) -> ReplicaInfo:
        cache = self.engine.vllm_config.cache_config
        children = psutil.Process().children(recursive=True)
        return ReplicaInfo(
            replica_id=_replica_id(),
            pid=os.getpid(),
            served_name=self.spec.served_name,
            model_path=self.spec.model_path,
            device_kind=self.spec.device_kind,
            cpu_cores=self.cores,
            engine_pids=[p.pid for p in children if "EngineCore" in _proc_name(p)],
            num_kv_blocks=cache.num_gpu_blocks,
            kv_block_tokens=cache.block_size,
            max_model_len=self.max_model_len,
            vllm_version=vllm_version(),
        )

    async def _publish_gauges(self) -> None:
        while True:
            snap = self.stats.snapshot(time.monotonic())
            for name, value in snap.as_metrics().items():
                self._gauges[name].set(value)
            if self._sampler is not None:
                sample = self._sampler.stop()
                self._sampler.start()
                if sample.dram_bw_util is not None:
                    self._gauges["device_dram_bw_util"].set(sample.dram_bw_util)
            await asyncio.sleep(GAUGE_PERIOD_S)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _bad(param: str, message: str) -> GenerateError:
    return GenerateError(status=400, type="invalid_request_error", message=message, param=param)


def _device_sampler():
    """An NVML sampler on the GPU this replica's engine runs on (None without NVML or GPM).

    The engine runs on `cuda:0` as this process sees it: the first entry of the
    `CUDA_VISIBLE_DEVICES` Ray set for the replica. That entry can be an index, a GPU UUID or a
    MIG UUID, and NVML numbers devices physically, so it is mapped to its NVML handle, never int()-ed.
    """
    from advisor.nvml import GpuSelectionError, gpu_sampler

    try:
        sampler = gpu_sampler("cuda:0")
    except GpuSelectionError as exc:
        logger.warning("no device counters for this replica: %s", exc)
        return None
    return sampler if sampler is not None and sampler.gpm else None


def _local_rank() -> int:
    try:
        rank = serve.get_replica_context().rank
        return int(rank.local_rank) if rank is not None else 0
    except Exception:  # outside a Serve replica (direct construction in tools)
        return 0


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"


def _proc_name(proc: psutil.Process) -> str:
    try:
        return " ".join([proc.name()] + proc.cmdline()[:1])
    except psutil.Error:
        return ""
