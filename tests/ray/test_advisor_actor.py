"""The Advisor actor in a real local Ray cluster, with an injected plan function (no engine)."""

from __future__ import annotations

import pytest
import ray
from pydantic import BaseModel

from advisor.actor import ADVISOR_NAME, ADVISOR_NAMESPACE, DeviceResources, Observation, get_or_create_advisor
from advisor.planner import ReplicaPlan
from bench.own_cluster import own_local_ray

pytestmark = pytest.mark.ray


class Req(BaseModel):
    model: str
    device: str = "cpu"


def fake_plan(req: Req, log) -> ReplicaPlan:
    import os

    log(f"planning {req.model}")
    return ReplicaPlan(
        model=req.model, device_name=f"pid-{os.getpid()}", device_kind="cpu", replicas_per_device=2,
        num_gpus_per_replica=0.0, num_cpus_per_replica=1.0, max_num_seqs=32, kv_cache_bytes=1 << 28,
        memory_per_replica_bytes=1 << 31, context_tokens=192, predicted_tokens_per_s_per_replica=300.0,
        predicted_aggregate_tokens_per_s=600.0, single_engine_tokens_per_s=450.0, memory_freed_bytes=0,
        reasons=["fake"],
    )


@pytest.fixture(scope="module")
def cluster():
    with own_local_ray(num_cpus=2):
        yield


def test_plans_come_from_a_device_task_and_are_cached(cluster):
    advisor = get_or_create_advisor(fake_plan)
    res = DeviceResources(num_cpus=2)  # the whole "device": both CPUs
    first = ray.get(advisor.get_plan.remote(Req(model="a"), res))
    again = ray.get(advisor.get_plan.remote(Req(model="a"), res))
    other = ray.get(advisor.get_plan.remote(Req(model="b"), res))
    assert first == again and first.replicas_per_device == 2
    assert {p.model for p in ray.get(advisor.plans.remote())} == {"a", "b"} and other.model == "b"
    # named and detached: the same actor is found by name
    same = ray.get_actor(ADVISOR_NAME, namespace=ADVISOR_NAMESPACE)
    assert len(ray.get(same.plans.remote())) == 2


def test_observations_are_kept_per_model(cluster):
    advisor = get_or_create_advisor(fake_plan)
    obs = [Observation(model=m, at=1.0, running_requests=8, tokens_per_s=200, mean_context_tokens=150, kv_usage=0.2)
           for m in ("a", "a", "b")]
    assert ray.get(advisor.observe.remote(obs)) >= 3
    assert len(ray.get(advisor.observations.remote("a"))) >= 2


def test_a_killed_advisor_restarts_and_plans_again(cluster):
    advisor = get_or_create_advisor(fake_plan)
    ray.kill(advisor, no_restart=False)
    plan = ray.get(advisor.get_plan.remote(Req(model="c"), DeviceResources(num_cpus=1)), timeout=120)
    assert plan.model == "c"
