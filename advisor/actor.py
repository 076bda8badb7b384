"""The Advisor: a named, detached, restartable Ray actor that hands out replica plans.

Thin shell: the work happens in functions injected at creation (`plan_fn`, `profile_fn`; the app
builder passes deployments/profiling.py's), each run as a Ray task that holds the whole device,
because a profile must not share its device with serving replicas. Plans are cached in memory
(a provisional plan, made from a profile flagged as noisy, is not: the next start profiles again);
profiles persist in the parquet store, so a restarted Advisor re-plans from them without
starting an engine. `observe()` keeps live replica samples for refining the fit later.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional

import ray
from pydantic import BaseModel, ConfigDict, Field

from advisor.planner import ReplicaPlan

ADVISOR_NAME = "plateau-advisor"
ADVISOR_NAMESPACE = "plateau"


class DeviceResources(BaseModel):
    """What a device task asks Ray for: a whole GPU, or all CPUs of a node, of one accelerator type."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type of the node to run on.")

    def task_options(self) -> dict[str, object]:
        """Ray task options (`accelerator_type` becomes the node resource accelerator_type:<T>)."""
        typed = {"accelerator_type": self.accelerator_type} if self.accelerator_type else {}
        return {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus, **typed}


class Observation(BaseModel):
    """One live reading of a replica, for refining the step-time fit."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    at: float = Field(description="Unix time of the reading.")
    running_requests: float
    tokens_per_s: float
    mean_context_tokens: float
    kv_usage: float


class Advisor:
    def __init__(self, plan_fn: Callable[[Any], ReplicaPlan], profile_fn: Optional[Callable[[Any], Any]] = None,
                 max_observations: int = 10_000):
        self._plan_fn = plan_fn
        self._profile_fn = profile_fn
        self._plans: dict[str, ReplicaPlan] = {}
        self._planning: dict[str, asyncio.Future] = {}  # request -> the device task under way
        self._observations: list[Observation] = []
        self._max_observations = max_observations

    async def get_plan(self, request: BaseModel, resources: DeviceResources) -> ReplicaPlan:
        """The plan for `request` (cached); profiles first when no stored profile exists. Callers
        asking for the same plan at once share one device task (models are planned in parallel)."""
        key = request.model_dump_json() + resources.model_dump_json()  # a device type is part of what is asked
        if key in self._plans:
            return self._plans[key]
        if key not in self._planning:
            self._planning[key] = asyncio.ensure_future(self._plan(key, request, resources))
        return await asyncio.shield(self._planning[key])

    async def _plan(self, key: str, request: BaseModel, resources: DeviceResources) -> ReplicaPlan:
        try:
            plan = await self._on_device(self._plan_fn, request, resources)
        finally:
            del self._planning[key]
        if not plan.provisional:  # a plan from a noisy profile serves one start; the next one profiles again
            self._plans[key] = plan
        return plan

    async def profile(self, request: BaseModel, resources: DeviceResources):
        if self._profile_fn is None:
            raise RuntimeError("this Advisor was created without a profile function")
        return await self._on_device(self._profile_fn, request, resources)

    def observe(self, samples: list[Observation]) -> int:
        self._observations.extend(samples)
        del self._observations[: max(0, len(self._observations) - self._max_observations)]
        return len(self._observations)

    def observations(self, model: Optional[str] = None) -> list[Observation]:
        return [o for o in self._observations if model is None or o.model == model]

    def plans(self) -> list[ReplicaPlan]:
        return list(self._plans.values())

    @staticmethod
    async def _on_device(fn: Callable, request: BaseModel, resources: DeviceResources):
        task = device_task().options(**resources.task_options())
        return await task.remote(fn, request)


def _call(fn: Callable, request: BaseModel):
    started = time.monotonic()
    result = fn(request, lambda msg: print(msg, flush=True))
    print(f"[advisor] device task done in {time.monotonic() - started:.0f} s", flush=True)
    return result


def get_or_create_advisor(plan_fn: Callable, profile_fn: Optional[Callable] = None):
    """The cluster's Advisor actor handle (created detached and restartable on first use)."""
    return ray.remote(Advisor).options(
        name=ADVISOR_NAME, namespace=ADVISOR_NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0,
    ).remote(plan_fn, profile_fn)


def device_task():
    """The Ray task a profile or plan runs as: no retry, and a fresh worker each time
    (`max_calls=1`): the worker exits after the task, so no engine process, memory or CUDA context
    of the profile outlives it. The caller adds the device's resources."""
    return ray.remote(max_calls=1, max_retries=0)(_call)
