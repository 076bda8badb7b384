"""The Advisor: a named, detached, restartable Ray actor that hands out replica plans.

Thin shell: the work happens in functions injected at creation (`plan_fn`, `profile_fn`; the app
builder passes deployments/profiling.py's), each run as a Ray task on the device. A task that may
profile holds the whole device, because a profile must not share its device with serving replicas;
where serving replicas hold every device of the type (a redeploy of a running app), the task holds
none of it, runs beside them on a node of that type and plans only from a stored profile. Every
wait on a task is bounded: it must start within `schedule_timeout_s` and finish within
`run_timeout_s`, or it is cancelled and the error says what it waited for. CPU plans are cached in memory
(not a provisional plan, made from a profile flagged as noisy: the next start profiles again; nor
a GPU plan, which rests on how the GPU is shared at the time: `cacheable`);
profiles persist in the parquet store, so a restarted Advisor re-plans from them without
starting an engine. `observe()` keeps live replica samples for refining the fit later.

A predicted plan (a first start that serves before its profile exists) is answered at once; the
Advisor then measures that profile in a task of its own beside the serving replicas (holding none
of the device, its engine below theirs), one such measurement at a time, a few rounds at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any, Callable, Optional

import ray
from pydantic import BaseModel, ConfigDict, Field

from advisor.nvml import restore_raylet_devices
from advisor.planner import ReplicaPlan

ADVISOR_NAME = "plateau-advisor"
ADVISOR_NAMESPACE = "plateau"


class DeviceResources(BaseModel):
    """What a device task asks Ray for (a whole GPU, or all CPUs of a node, of one accelerator type;
    or, beside serving replicas, none of it on one node of that type) and how long it waits."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type of the node to run on.")
    whole_device: bool = Field(True, description="The task holds a whole device, so it may start a profiling "
                                                 "engine; False: it shares one with serving replicas and only plans "
                                                 "from a stored profile.")
    node_id: Optional[str] = Field(None, description="Ray node to run on (a task that holds no GPU still has to "
                                                     "land where one of the type is, for NVML to read it).")
    schedule_timeout_s: float = Field(900.0, gt=0, description="How long the task may wait for Ray to start it "
                                      "(a whole device to come free, or the autoscaler to add a node).")
    run_timeout_s: float = Field(3600.0, gt=0, description="How long it may run once started (a profile).")
    parallel: int = Field(1, ge=1, description="Device tasks of this accelerator type that may hold a device at "
                                               "once (the devices of the type): the others wait their turn in "
                                               "the Advisor, before their start limit runs.")

    def task_options(self) -> dict[str, object]:
        """Ray task options (`accelerator_type` becomes the node resource accelerator_type:<T>; `node_id` a hard
        node affinity)."""
        typed = {"accelerator_type": self.accelerator_type} if self.accelerator_type else {}
        if self.node_id is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            typed["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=self.node_id, soft=False)
        return {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus, **typed}

    def describe(self) -> str:
        """What the task asks Ray for, in the words of `ray status`."""
        where = f" of accelerator type {self.accelerator_type!r}" if self.accelerator_type else ""
        node = f" (node {self.node_id})" if self.node_id else ""
        return f"num_gpus={self.num_gpus:g}, num_cpus={self.num_cpus:g} on a node{where}{node}"


class DeviceTaskTimeout(TimeoutError):
    """A device task that did not start, or did not finish, within its limit (it was cancelled)."""


class DeviceShared(ValueError):
    """A profile asked of a device task that shares its device with serving replicas."""


BESIDE_RUN_TIMEOUT_S = 3600.0  # a whole profile, its quiet wait and one retry, on a device that serves


def beside_replicas(resources: DeviceResources) -> DeviceResources:
    """What a profile measured beside a device's serving replicas asks Ray for: none of the device
    (the replicas hold it), on the same node or accelerator type, for as long as a profile takes."""
    return resources.model_copy(update={"num_gpus": 0.0, "num_cpus": 0.0,
                                        "run_timeout_s": max(resources.run_timeout_s, BESIDE_RUN_TIMEOUT_S)})


def plan_key(request: BaseModel, resources: DeviceResources) -> str:
    """The Advisor's cache key of a plan: the request and the device type. How the task held the
    device (whole or beside replicas, which node) and its limits are not part of it: a plan from the
    same stored profile is the same plan."""
    return request.model_dump_json() + (resources.accelerator_type or "")


def cacheable(plan: Any) -> bool:
    """Whether the Advisor may hand `plan` out again without a device task. Not a plan from a noisy
    profile (it serves one start; the next profiles again), nor a GPU plan: it rests on how the GPU
    is shared now (MPS may have started or stopped since) and possibly on a gain not measured yet,
    so it is made again, from the stored profile (seconds, no engine)."""
    return not plan.provisional and getattr(plan, "device_kind", "cpu") != "cuda"


def plan_wait_s(resources: DeviceResources, margin_s: float = 60.0) -> float:
    """How long a caller waits for the Advisor's answer: the task's start and run limits (the
    Advisor enforces both) plus a margin for the actor itself."""
    return resources.schedule_timeout_s + resources.run_timeout_s + margin_s


def _subject(request: BaseModel) -> str:
    model = getattr(request, "model", None)
    return f"model {model!r}" if isinstance(model, str) else type(request).__name__


def not_started_message(request: BaseModel, resources: DeviceResources) -> str:
    """Why a device task that Ray never started failed, and what frees it."""
    if resources.whole_device:
        why = ("it holds a whole device to profile on, and none of the type came free (other Serve apps, an earlier "
               "deploy's replicas or another profile hold it; or the autoscaler did not add a node)")
        fix = "free a device of the type (stop or scale down what holds it) and deploy again"
    else:
        why = "it holds no device, only a place on that node: the node may be gone or its workers fail to start"
        fix = "check that the node is alive and deploy again"
    return (f"the Advisor's device task for {_subject(request)} waited {resources.schedule_timeout_s:g} s "
            f"(schedule_timeout_s) for Ray to start it and was cancelled: it asks for {resources.describe()}; {why}. "
            f"`ray status` shows the pending demand and what holds the resources; {fix}")


def not_finished_message(request: BaseModel, resources: DeviceResources) -> str:
    """Why a device task that started but ran past its limit failed."""
    work = "profiling the model or planning from its stored profile" if resources.whole_device else \
        "planning from the stored profile"
    return (f"the Advisor's device task for {_subject(request)} ({work}, {resources.describe()}) did not finish "
            f"within {resources.run_timeout_s:g} s (run_timeout_s) and was cancelled; its log (the device task's "
            f"worker log, `ray logs`) shows where it stopped; free the device of other load and deploy again")


def shared_device_profiler(request: BaseModel, log: Callable[[str], None]):
    """The profiler a device task that shares its device passes to the plan function: starting a
    profiling engine beside serving replicas would measure them too and could take the memory their
    activations come back to, so it refuses, naming the fix."""
    model = getattr(request, "model", None)
    name = model if isinstance(model, str) else "MODEL"
    device = getattr(request, "device", "cuda")
    raise DeviceShared(
        f"{_subject(request)} has no trusted stored profile for this device, and a profile needs a whole device "
        f"to itself: every device of its type is held (by this app's running replicas?), so the plan task shares "
        f"one and starts no engine. Free a device (scale the app down or `serve shutdown`) and deploy again, or "
        f"profile it first on a free device (`plateau profile {name} --device {device} --store <the app's profile_store>`)"
    )


async def await_device_task(stream, cancel: Callable[[], None], request: BaseModel, resources: DeviceResources):
    """The result of a device task whose `stream` (Ray's generator of its outputs) yields a start
    marker, then the result: each within its limit, else `cancel()` and `DeviceTaskTimeout`."""
    try:
        started = await asyncio.wait_for(stream.__anext__(), resources.schedule_timeout_s)
    except asyncio.TimeoutError:
        cancel()
        raise DeviceTaskTimeout(not_started_message(request, resources)) from None
    await started  # the start marker; a task that failed before it started raises here
    try:
        result = await asyncio.wait_for(stream.__anext__(), resources.run_timeout_s)
    except asyncio.TimeoutError:
        cancel()
        raise DeviceTaskTimeout(not_finished_message(request, resources)) from None
    return await result


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
    """`plan_fn(request, log)` makes a plan on the device; on a device it shares with serving
    replicas (`whole_device` False) it is called with `profiler=` a profiler that refuses and
    `measure_gain=False` (no engine may start there), so it must accept those keywords
    (deployments/profiling.py's `plan_model` does)."""

    def __init__(self, plan_fn: Callable[[Any], ReplicaPlan], profile_fn: Optional[Callable[[Any], Any]] = None,
                 max_observations: int = 10_000, measure_rounds: int = 3, measure_retry_s: float = 300.0):
        self._plan_fn = plan_fn
        self._profile_fn = profile_fn
        self._plans: dict[str, ReplicaPlan] = {}
        self._planning: dict[str, asyncio.Future] = {}  # request -> the device task under way
        self._measuring: dict[str, asyncio.Future] = {}  # request -> a predicted plan's profile being measured
        self._measure_turn = asyncio.Semaphore(1)
        self._measure_rounds = measure_rounds
        self._measure_retry_s = measure_retry_s
        self._turns: dict[str, asyncio.Semaphore] = {}  # accelerator type -> devices free for a whole-device task
        self._observations: list[Observation] = []
        self._max_observations = max_observations

    async def get_plan(self, request: BaseModel, resources: DeviceResources) -> ReplicaPlan:
        """The plan for `request` (cached); profiles first when no stored profile exists. Callers
        asking for the same plan at once share one device task (models are planned in parallel)."""
        key = plan_key(request, resources)
        if key in self._plans:
            return self._plans[key]
        if key not in self._planning:
            self._planning[key] = asyncio.ensure_future(self._plan(key, request, resources))
        return await asyncio.shield(self._planning[key])

    async def _plan(self, key: str, request: BaseModel, resources: DeviceResources) -> ReplicaPlan:
        try:
            async with self._turn(resources):
                plan = await self._on_device(self._plan_fn, request, resources)
        finally:
            del self._planning[key]
        if cacheable(plan):
            self._plans[key] = plan
        if getattr(plan, "predicted", False) and self._profile_fn is not None and key not in self._measuring:
            self._measuring[key] = asyncio.ensure_future(self._measure_beside(key, request, resources))
        return plan

    async def _measure_beside(self, key: str, request: BaseModel, resources: DeviceResources) -> None:
        """A predicted plan's profile, measured on a device the app's replicas now serve on: the task
        holds none of the device (`beside_replicas`), its engine runs below theirs, and its profile
        function stores the profile and hands a trusted one to the app's policy. One taken under too
        much load is stored flagged (never reused); it is measured again after `measure_retry_s`, at
        most `measure_rounds` times. Errors are printed: the app serves on its predicted plan."""
        beside = beside_replicas(resources)
        try:
            for round_ in range(1, self._measure_rounds + 1):
                try:
                    async with self._measure_turn:  # one at a time: two would measure each other
                        profile = await self._on_device(self._profile_fn, request, beside, beside=True)
                except Exception as exc:  # an engine that did not start, a task past its limit
                    print(f"[advisor] measuring {_subject(request)} beside its replicas failed: "
                          f"{type(exc).__name__}: {exc}", flush=True)
                    profile = None
                trusted = getattr(profile[0] if isinstance(profile, tuple) else profile, "trusted", False)
                if trusted:
                    return
                if round_ < self._measure_rounds:
                    print(f"[advisor] {_subject(request)}: no trusted profile yet ({round_} of {self._measure_rounds} "
                          f"rounds); measuring again in {self._measure_retry_s:g} s", flush=True)
                    await asyncio.sleep(self._measure_retry_s)
            print(f"[advisor] {_subject(request)}: no trusted profile after {self._measure_rounds} rounds; the app "
                  "keeps its predicted plan (refitted from live samples); a quiet restart measures again", flush=True)
        finally:
            self._measuring.pop(key, None)

    def measuring(self) -> list[str]:
        """The requests whose profile is being measured beside their replicas (for status pages)."""
        return list(self._measuring)

    async def profile(self, request: BaseModel, resources: DeviceResources):
        if self._profile_fn is None:
            raise RuntimeError("this Advisor was created without a profile function")
        if not resources.whole_device:
            raise DeviceShared(f"a profile of {_subject(request)} needs a whole device: ask with whole_device=True")
        async with self._turn(resources):
            return await self._on_device(self._profile_fn, request, resources)

    def observe(self, samples: list[Observation]) -> int:
        self._observations.extend(samples)
        del self._observations[: max(0, len(self._observations) - self._max_observations)]
        return len(self._observations)

    def observations(self, model: Optional[str] = None) -> list[Observation]:
        return [o for o in self._observations if model is None or o.model == model]

    def plans(self) -> list[ReplicaPlan]:
        return list(self._plans.values())

    def _turn(self, resources: DeviceResources):
        """Wait for a device of the type: a task that holds a whole device starts only when fewer than
        `parallel` of its type run, so time spent queued behind the Advisor's own tasks (several
        models profiled on one device) never counts against its start limit. Beside replicas no wait."""
        if not resources.whole_device:
            return contextlib.nullcontext()
        key = f"{resources.accelerator_type or ''}/{'gpu' if resources.num_gpus > 0 else 'cpu'}"
        if key not in self._turns:
            self._turns[key] = asyncio.Semaphore(resources.parallel)
        return self._turns[key]

    @staticmethod
    async def _on_device(fn: Callable, request: BaseModel, resources: DeviceResources, beside: bool = False):
        stream = device_task().options(**resources.task_options()).remote(fn, request, resources.whole_device, beside)
        # force: a task stuck in a C call never sees a KeyboardInterrupt; its worker is killed, and the
        # engines it started die with it (their reaper, deployments/profiling.py VllmBatchRunner)
        return await await_device_task(stream, lambda: ray.cancel(stream, force=True), request, resources)


DEVICE_TASK_STARTED = "plateau-device-task-started"


def _call(fn: Callable, request: BaseModel, whole_device: bool = True, beside: bool = False):
    """The device task: yields a start marker (so the Advisor tells a task Ray never started from one
    that runs long), then `fn`'s result. A plan beside serving replicas (not `whole_device`) gets a
    profiler that refuses and starts no engine to measure a gain; a profile measured `beside` them
    (a first start's, once they serve) is told so (`fn(request, log, beside=True)`)."""
    yield DEVICE_TASK_STARTED
    if not whole_device or beside:
        restore_raylet_devices(os.environ)
    started = time.monotonic()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if beside:
        result = fn(request, log, beside=True)
    elif whole_device:
        result = fn(request, log)
    else:
        result = fn(request, log, profiler=shared_device_profiler, measure_gain=False)
    print(f"[advisor] device task done in {time.monotonic() - started:.0f} s", flush=True)
    yield result


def get_or_create_advisor(plan_fn: Callable, profile_fn: Optional[Callable] = None):
    """The cluster's Advisor actor handle (created detached and restartable on first use)."""
    return ray.remote(Advisor).options(
        name=ADVISOR_NAME, namespace=ADVISOR_NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0,
    ).remote(plan_fn, profile_fn)


def device_task():
    """The Ray task a profile or plan runs as: no retry, and a fresh worker each time
    (`max_calls=1`): the worker exits after the task, so no engine process, memory or CUDA context
    of the profile outlives it. The caller adds the device's resources. `_call` is a generator, so
    Ray streams its outputs (the start marker first)."""
    return ray.remote(max_calls=1, max_retries=0)(_call)
