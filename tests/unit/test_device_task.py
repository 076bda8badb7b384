"""The Advisor's device task on a cluster whose devices serving replicas hold: what it asks Ray for
(never a whole GPU that the app's own replicas hold shares of), and every wait on it bounded, with
an error that names what it waited for, for how long, and what to do."""

from __future__ import annotations

import asyncio

import pytest
import ray

from advisor.actor import (
    Advisor,
    DeviceResources,
    DeviceShared,
    DeviceTaskTimeout,
    _call,
    await_device_task,
    plan_key,
    plan_wait_s,
)
from cluster.inventory import Device, Inventory
from deployments.cluster_view import ClusterView
from deployments.config import AppConfigError, parse_args
from deployments.layout import PendingPlan, advisor_request, apply_plan, ask_plan, device_resources, shared_node

GiB = 1 << 30
GPU_CLUSTER = ClusterView(gpus=2, cpus_per_node=8, engine_device="cuda")
CPU_CLUSTER = ClusterView(gpus=0, cpus_per_node=8, engine_device="cpu")


def gpus(nodes=("a",), per_node=1, device_type=None):
    return Inventory(devices=[Device(name=f"{n}/gpu{i}", node_id=n, kind="cuda", model_name="NVIDIA H100",
                                     memory_bytes=80 * GiB, memory_source="nvml", cores=8, device_type=device_type)
                              for n in nodes for i in range(per_node)])


def cpus(nodes=("a",)):
    return Inventory(devices=[Device(name=f"{n}/cpu", node_id=n, kind="cpu", model_name="CPU node",
                                     memory_bytes=64 * GiB, memory_source="node", cores=8) for n in nodes])


def model(**fields):
    return parse_args({"models": [{"name": "m", "replicas_per_device": "auto", **fields}]}).models[0]


# ---- what the device task asks Ray for -------------------------------------------------------
def test_a_whole_free_gpu_is_held_to_profile_on():
    # node b has a GPU nobody holds (Ray omits a resource with nothing available)
    available = {"a": {"CPU": 8.0}, "b": {"CPU": 8.0, "GPU": 1.0}}
    assert shared_node(gpus(("a", "b")), available, use_gpus=True, cpus=8) is None
    assert shared_node(cpus(("a",)), {"a": {"CPU": 8.0}}, use_gpus=False, cpus=8) is None


def test_when_replicas_hold_every_gpu_the_task_shares_a_node_of_the_type():
    # two N=2 replicas at num_gpus=0.5 hold the whole GPU of node a; node b has 0.5 of its GPU left
    available = {"a": {"CPU": 7.0}, "b": {"CPU": 8.0, "GPU": 0.5}}
    assert shared_node(gpus(("a", "b")), available, use_gpus=True, cpus=8) == "a"
    assert shared_node(gpus(("gone", "b")), available, use_gpus=True, cpus=8) == "b"  # an alive node first
    # CPU replicas hold the node's CPUs: the task cannot have all of them
    assert shared_node(cpus(("a",)), {"a": {"CPU": 2.0}}, use_gpus=False, cpus=8) == "a"


def test_without_a_reading_of_ray_the_task_holds_the_whole_device_as_before():
    assert shared_node(gpus(), None, use_gpus=True, cpus=8) is None
    assert shared_node(Inventory(devices=[]), {}, use_gpus=True, cpus=8) is None


def test_a_shared_ask_holds_no_gpu_and_is_pinned_to_the_node():
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    m = model(device_type="H100")
    whole = device_resources(m, GPU_CLUSTER, "auto")
    assert (whole.num_gpus, whole.whole_device, whole.node_id) == (1.0, True, None)
    node = "ab" * 28  # a Ray node id
    shared = device_resources(m, GPU_CLUSTER, "auto", shared_on=node)
    assert (shared.num_gpus, shared.num_cpus, shared.whole_device) == (0.0, 0.0, False)
    assert shared.accelerator_type == "H100"
    opts = shared.task_options()
    assert opts["num_gpus"] == 0.0 and opts["accelerator_type"] == "H100"
    strategy = opts["scheduling_strategy"]
    assert isinstance(strategy, NodeAffinitySchedulingStrategy) and strategy.node_id == node and not strategy.soft
    # a plan from a stored profile starts in seconds: it need not wait as long as a whole device may take
    assert shared.schedule_timeout_s < whole.schedule_timeout_s
    cpu = device_resources(model(), CPU_CLUSTER, "cpu", shared_on="a")
    assert (cpu.num_cpus, cpu.whole_device) == (0.0, False)


class _FakeAdvisor:
    def __init__(self):
        self.asked = []

        class _Method:
            @staticmethod
            def remote(request, resources):
                self.asked.append(resources)
                return "ref"
        self.get_plan = _Method()


def test_a_redeploy_while_the_apps_replicas_hold_the_gpu_asks_for_no_whole_gpu(monkeypatch):
    from advisor import actor

    fake = _FakeAdvisor()
    monkeypatch.setattr(actor, "get_or_create_advisor", lambda plan_fn, profile_fn=None: fake)
    held = {"a": {"CPU": 7.0}}  # the running app's N=2 replicas hold GPU a: Ray lists no GPU available
    pending = ask_plan(model(), GPU_CLUSTER, "auto", gpus(("a",)), read_available=lambda: held)
    (asked,) = fake.asked
    assert asked.num_gpus == 0.0 and asked.node_id == "a" and not asked.whole_device
    assert pending.resources == asked
    # a first deploy on a free GPU still holds the whole device, to profile on
    ask_plan(model(), GPU_CLUSTER, "auto", gpus(("a",)), read_available=lambda: {"a": {"CPU": 8.0, "GPU": 1.0}})
    assert fake.asked[-1].num_gpus == 1.0 and fake.asked[-1].whole_device


# ---- a shared device task plans only from a stored profile ------------------------------------
def test_a_shared_device_task_refuses_to_profile_and_says_how_to_get_a_plan():
    req = advisor_request(model(), GPU_CLUSTER, gpus())

    def plan_fn(request, log, profiler=None, measure_gain=True):
        assert measure_gain == (profiler is None)  # beside serving replicas no engine starts to measure either
        return profiler(request, log) if profiler else "planned"

    assert list(_call(plan_fn, req)) [1:] == ["planned"]
    steps = _call(plan_fn, req, whole_device=False)
    next(steps)  # the start marker
    with pytest.raises(DeviceShared, match=r"needs a whole device.*plateau profile smollm2-135m --device cuda"):
        next(steps)


def test_plans_are_cached_whatever_way_the_device_was_held():
    from types import SimpleNamespace

    made = []

    class LocalAdvisor(Advisor):  # the device task runs inline instead of as a Ray task
        @staticmethod
        async def _on_device(fn, request, resources):
            made.append(resources)
            return SimpleNamespace(provisional=False, device_kind="cpu")

    req = advisor_request(model(), GPU_CLUSTER, gpus())
    whole = device_resources(model(), GPU_CLUSTER, "auto")
    shared = device_resources(model(), GPU_CLUSTER, "auto", shared_on="a")
    assert plan_key(req, whole) == plan_key(req, shared)

    async def both():
        advisor = LocalAdvisor(lambda r, log: None)
        return [await advisor.get_plan(req, whole), await advisor.get_plan(req, shared)]

    first, second = asyncio.run(both())
    assert first is second and made == [whole]  # the redeploy's shared ask reuses the first deploy's plan


def test_the_advisor_refuses_an_explicit_profile_beside_serving_replicas():
    advisor = Advisor(lambda r, log: None, lambda r, log: None)
    req = advisor_request(model(), GPU_CLUSTER, gpus())
    with pytest.raises(DeviceShared, match="needs a whole device"):
        asyncio.run(advisor.profile(req, device_resources(model(), GPU_CLUSTER, "auto", shared_on="a")))


# ---- every wait is bounded --------------------------------------------------------------------
async def _value(v):
    return v


class _Stream:
    """Ray's stream of a device task's outputs: `hang_at` is the item that never comes."""

    def __init__(self, items, hang_at=None):
        self.items, self.hang_at, self.i = list(items), hang_at, 0

    async def __anext__(self):
        if self.i == self.hang_at:
            await asyncio.sleep(3600)
        item = self.items[self.i]
        self.i += 1
        return _value(item)


FAST = DeviceResources(num_gpus=1.0, num_cpus=0.0, accelerator_type="H100", schedule_timeout_s=0.05,
                       run_timeout_s=0.05)
REQ = advisor_request(model(), GPU_CLUSTER, gpus())


def test_a_device_task_ray_never_starts_is_cancelled_with_what_it_waited_for():
    cancelled = []
    with pytest.raises(DeviceTaskTimeout) as err:
        asyncio.run(await_device_task(_Stream(["started", "plan"], hang_at=0), lambda: cancelled.append(1), REQ, FAST))
    msg = str(err.value)
    assert cancelled == [1]
    assert "model 'smollm2-135m' waited 0.05 s (schedule_timeout_s)" in msg
    assert "num_gpus=1, num_cpus=0 on a node of accelerator type 'H100'" in msg
    assert "`ray status`" in msg and "free a device of the type" in msg


def test_a_device_task_that_runs_past_its_limit_is_cancelled_and_says_so():
    cancelled = []
    with pytest.raises(DeviceTaskTimeout, match=r"did not finish within 0.05 s \(run_timeout_s\)"):
        asyncio.run(await_device_task(_Stream(["started", "plan"], hang_at=1), lambda: cancelled.append(1), REQ, FAST))
    assert cancelled == [1]


def test_a_device_task_in_time_returns_its_result():
    assert asyncio.run(await_device_task(_Stream(["started", "plan"]), lambda: None, REQ, FAST)) == "plan"


def test_the_builder_waits_for_the_plan_no_longer_than_the_advisor_may_take():
    waited = []

    def wait(ref, timeout):
        waited.append(timeout)
        raise ray.exceptions.GetTimeoutError("Get timed out")

    resources = DeviceResources(num_gpus=1.0, schedule_timeout_s=10, run_timeout_s=20)
    pending = PendingPlan(model=model(), request=REQ, ref="ref", resources=resources)
    with pytest.raises(AppConfigError, match=r"model 'm': no plan from the Advisor .* after 90 s.*`ray status`"):
        apply_plan(pending, wait=wait)
    assert waited == [plan_wait_s(resources)] == [90.0]


def test_a_device_task_timeout_reaches_the_user_as_a_config_error():
    def wait(ref, timeout):
        raise ray.exceptions.RayTaskError("get_plan", "", DeviceTaskTimeout("waited 900 s for Ray to start it"))

    with pytest.raises(AppConfigError, match="model 'm': no replica plan: waited 900 s for Ray to start it"):
        apply_plan(PendingPlan(model=model(), request=REQ, ref="ref"), wait=wait)


def test_gpu_plans_are_made_again_each_time_so_a_change_of_sharing_or_an_unmeasured_gain_is_seen():
    from types import SimpleNamespace

    from advisor.actor import cacheable

    assert cacheable(SimpleNamespace(provisional=False, device_kind="cpu"))
    assert not cacheable(SimpleNamespace(provisional=True, device_kind="cpu"))
    assert not cacheable(SimpleNamespace(provisional=False, device_kind="cuda"))
    made = []

    class LocalAdvisor(Advisor):
        @staticmethod
        async def _on_device(fn, request, resources):
            made.append(resources)
            return SimpleNamespace(provisional=False, device_kind="cuda")

    req = advisor_request(model(), GPU_CLUSTER, gpus())
    whole = device_resources(model(), GPU_CLUSTER, "auto")

    async def twice():
        advisor = LocalAdvisor(lambda r, log: None)
        return [await advisor.get_plan(req, whole), await advisor.get_plan(req, whole)]

    asyncio.run(twice())
    assert made == [whole, whole]


def test_models_queued_behind_each_other_on_one_device_wait_their_turn_before_their_start_limit():
    from types import SimpleNamespace

    running, most = [], []

    class LocalAdvisor(Advisor):
        @staticmethod
        async def _on_device(fn, request, resources):
            running.append(request.model)
            most.append(len(running))
            await asyncio.sleep(0.05)  # a profile
            running.remove(request.model)
            return SimpleNamespace(provisional=False, device_kind="cuda")

    one_gpu = device_resources(model(), GPU_CLUSTER, "auto", parallel=1)
    reqs = [advisor_request(model(name=n, model=f"/m/{n}"), GPU_CLUSTER, gpus()) for n in "abc"]

    async def three(resources):
        advisor = LocalAdvisor(lambda r, log: None)
        await asyncio.gather(*(advisor.get_plan(r, resources) for r in reqs))

    asyncio.run(three(one_gpu))
    assert max(most) == 1  # one device: one whole-device task at a time, the others queued in the Advisor
    most.clear()
    asyncio.run(three(device_resources(model(), GPU_CLUSTER, "auto", parallel=2)))
    assert max(most) == 2
    most.clear()
    asyncio.run(three(device_resources(model(), GPU_CLUSTER, "auto", shared_on="a")))
    assert max(most) == 3  # beside replicas nothing is held: no turn to wait for
