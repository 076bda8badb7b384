"""`replicas_per_device: auto` end to end on a real GPU with real Ray Serve: the Advisor plans N from
the model's profile (taken first with `plateau profile`, as a user would, into the app's
profile_store), the app starts exactly the planned N replicas on the one GPU, every request gets an
answer, and NVML shows each replica holding no more device memory than the plan gave it (weights,
the measured non-KV overhead and its KV pool). Runs only where CUDA vLLM and a GPU are present (the
skip never initialises CUDA in this process)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import openai
import pytest

from bench.own_cluster import free_port, own_local_ray
from tests.engine_build import cuda_engine_missing
from tests.ray.conftest import replica_infos

MISSING = cuda_engine_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

HTTP_PORT = free_port()  # never a user's 8000
APP = "plateau-gpu-auto"
MODEL = "smollm2-135m"
WORKLOAD = {"prompt_tokens": 128, "output_tokens": 64}
MEMORY_SLACK = 0.05  # NVML's per-process figure against the plan's per-replica memory


@dataclass
class Served:
    plan: object  # the Advisor's ReplicaPlan
    profile: dict  # `plateau profile` output
    infos: list  # ReplicaInfo of every replica of the planned deployment
    used_before: int  # device memory in use before the cluster started


@pytest.fixture(scope="module")
def profile_store(smollm2_path, tmp_path_factory):
    """The model's profile in the serving mode (CUDA graphs, bf16), a short sweep, in a store of its own."""
    store = tmp_path_factory.mktemp("profiles")
    args = [MODEL, "--device", "cuda:0", "--dtype", "bfloat16", "--prompt-tokens", str(WORKLOAD["prompt_tokens"]),
            "--output-tokens", str(WORKLOAD["output_tokens"]), "--max-batch", "32", "--max-points", "4",
            "--store", str(store)]
    done = subprocess.run([sys.executable, "-m", "deployments.cli", "profile", *args], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    profile = json.loads(done.stdout)
    # a flagged profile is never reused (the app would profile again) and its plan is never cached
    assert not profile["noise"]["flagged"], f"profile taken under interference: {profile['noise']['reason']}"
    return store, profile


@pytest.fixture(scope="module")
def served(profile_store):
    import ray
    from ray import serve

    from advisor.actor import ADVISOR_NAME, ADVISOR_NAMESPACE
    from advisor.nvml import cuda_device
    from deployments.app import build
    from deployments.cluster_view import ClusterView
    from deployments.config import parse_args
    from deployments.engine import replica_deployment_name

    store, profile = profile_store
    used_before = cuda_device("cuda").memory_used()
    with own_local_ray(num_gpus=1):  # its own temp dir and ports
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        try:
            args = parse_args({"device": "cuda", "profile_store": str(store), "models": [{
                "model": MODEL, "name": MODEL, "replicas_per_device": "auto", **WORKLOAD, "max_model_len": 2048,
                "dtype": "bfloat16", "enforce_eager": False}]})
            serve.run(build(args, ClusterView.from_ray()), name=APP, route_prefix="/")
            advisor = ray.get_actor(ADVISOR_NAME, namespace=ADVISOR_NAMESPACE)
            (plan,) = [p for p in ray.get(advisor.plans.remote(), timeout=60) if p.model == MODEL]
            n = plan.replicas_per_device
            handle = serve.get_deployment_handle(replica_deployment_name(MODEL, n), app_name=APP)
            infos = list(replica_infos(handle, want=n, within_s=60).values())
            yield Served(plan=plan, profile=profile, infos=infos, used_before=used_before)
        finally:
            serve.shutdown()


def replica_device_bytes(processes: list[tuple[int, Optional[int]]], pids: set[int]) -> Optional[int]:
    """Device memory NVML lists for the processes `pids` (a replica and its engine), or None where
    NVML names none of them (a container's own PID namespace) or cannot say how much they use."""
    mine = [used for pid, used in processes if pid in pids]
    if not mine or any(used is None for used in mine):
        return None
    return sum(mine)


def test_the_app_runs_exactly_the_planned_replicas_with_the_planned_kv(served):
    plan, infos = served.plan, served.infos
    assert plan.device_kind == "cuda" and plan.replicas_per_device >= 1
    assert len({i.replica_id for i in infos}) == plan.replicas_per_device
    kv_per_token = served.profile["kv_bytes_per_token"]
    for info in infos:
        assert info.device_kind == "cuda" and info.engine_pids
        assert info.num_kv_blocks * info.kv_block_tokens * kv_per_token == pytest.approx(plan.kv_cache_bytes, rel=0.05)


def test_every_planned_replica_serves_answers(served):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="none", max_retries=0, timeout=120)
    for _ in range(4 * served.plan.replicas_per_device):  # the router spreads them over the replicas
        out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert out.choices[0].text.strip()


def test_each_replica_holds_no_more_device_memory_than_the_plan_gave_it(served):
    from advisor.nvml import cuda_device

    device = cuda_device("cuda")
    plan, infos = served.plan, served.infos
    limit = plan.memory_per_replica_bytes * (1 + MEMORY_SLACK)
    listed = [(p.pid, p.usedGpuMemory) for p in device.nvml.nvmlDeviceGetComputeRunningProcesses(device.handle)]
    per_replica = [replica_device_bytes(listed, {i.pid, *i.engine_pids}) for i in infos]
    if any(b is None for b in per_replica):  # NVML cannot attribute memory to our PIDs: the device-wide share
        share = (device.memory_used() - served.used_before) / len(infos)
        per_replica = [share] * len(infos)
    for used in per_replica:
        assert used <= limit, (f"a replica holds {used / 2**30:.2f} GiB of device memory; the plan gave it "
                               f"{plan.memory_per_replica_bytes / 2**30:.2f} GiB (weights + overhead "
                               f"{served.profile['overhead_bytes'] / 2**30:.2f} GiB + KV)")
    assert sum(per_replica) <= device.memory_total
