"""What runs where at start: each model's replica spec per packing variant, its plan (from the
Advisor for `replicas_per_device: auto`), its replica bounds, and the start packing on the
cluster's devices.

`ask_plan` asks the Advisor actor for a model's plan (every model's at once: device tasks of
different device types run in parallel) and `apply_plan` applies it; `layout_model` turns a model whose N is
resolved into its variants (one Serve deployment each) with their engine specs and memory;
`place` packs every model's start replicas or fails naming what does not fit. A model pinned to
a device type (`device_type`) gets all three on the devices of that type only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import ray
from pydantic import BaseModel, ByteSize, ConfigDict

from advisor.actor import ADVISOR_NAME, ADVISOR_NAMESPACE, DeviceResources, plan_wait_s
from advisor.memory import KV_BLOCK_TOKENS
from advisor.planner import DeviceSpec, PlanError, PlannerConfig, ReplicaPlan, kv_pool_bytes, plan_replicas
from advisor.profiler import Profile, WorkloadShape
from advisor.sharing import mps_thread_percentage
from cluster.autoscaler import NeededDevices, devices_needed
from cluster.inventory import Inventory
from cluster.packing import ModelDemand, PackInput, pack
from cluster.policy import ModelPolicyInput, VariantSpec
from deployments.cluster_view import ClusterView, uses_gpus
from deployments.config import AppConfigError, ModelConfig
from deployments.engine import replica_deployment_name
from deployments.spec import ReplicaResources, ReplicaSpec

logger = logging.getLogger("ray.serve")


def replica_spec(m: ModelConfig, cluster: ClusterView, device: str) -> ReplicaSpec:
    """The spec and resources of one replica of model `m` on this cluster (N already resolved)."""
    if m.replicas_per_device == "auto":
        raise AppConfigError(f"model {m.served_name!r}: replicas_per_device is still 'auto'; resolve the plan first")
    n = m.replicas_per_device
    use_gpus = uses_gpus(device, cluster)
    if use_gpus and cluster.gpus <= 0:
        raise AppConfigError(
            "device = 'cuda' but the Ray cluster has no GPUs; start it with GPUs "
            "(`ray start --head --num-gpus=1`) or set device: auto"
        )
    if use_gpus:
        resources = ReplicaResources(num_gpus=round(1.0 / n, 6), num_cpus=min(1.0, cluster.cpus_per_node / n),
                                     accelerator_type=m.device_type)
    else:
        resources = ReplicaResources(num_gpus=0.0, num_cpus=round(cluster.cpus_per_node / n, 4),
                                     accelerator_type=m.device_type)
    return ReplicaSpec(
        served_name=m.served_name,
        model_path=m.model,
        device_kind=cluster.engine_device,
        replicas_per_device=n,
        resources=resources,
        max_num_seqs=m.max_num_seqs,
        kv_cache_bytes=int(m.kv_cache_bytes) if m.kv_cache_bytes is not None else None,
        device_memory_fraction=m.device_memory_fraction,
        max_model_len=m.max_model_len,
        dtype=m.dtype,
        enforce_eager=m.enforce_eager,
        stall_timeout_s=m.stall_timeout_s,
        engine_kwargs=dict(m.engine_kwargs),
        server_kwargs=dict(m.server_kwargs),
    )


def advisor_request(m: ModelConfig, cluster: ClusterView, inventory: Inventory, store: Optional[str] = None):
    """What the Advisor plans `m` for. A model pinned to a device type is planned for the memory of
    that type's smallest device (which also keeps the Advisor's cached plans apart per type);
    `store` is the app's shared profile store (None: each node's own)."""
    from deployments.profiling import AdvisorRequest

    device = "cuda" if cluster.engine_device == "cuda" else "cpu"
    first_start = m.first_start if m.first_start != "auto" else ("predict" if device == "cpu" else "profile")
    return AdvisorRequest(
        model=m.model, device=device, first_start=first_start,
        shape=WorkloadShape(prompt_tokens=m.prompt_tokens, output_tokens=m.output_tokens),
        tpot_slo_ms=m.tpot_slo_ms, dtype=m.dtype, max_model_len=m.max_model_len, enforce_eager=m.enforce_eager,
        device_memory=inventory.smallest_memory_bytes if m.device_type else None, store_dir=store,
        shared_store=store is not None,
    )


def cluster_for(m: ModelConfig, cluster: ClusterView, inventory: Inventory) -> ClusterView:
    """The cluster as a model pinned to a device type sees it: on CPU devices, the CPUs of its
    type's smallest node (what its device task and replicas may ask for)."""
    if not m.device_type or inventory.kind != "cpu":
        return cluster
    return cluster.model_copy(update={"cpus_per_node": min(d.cores for d in inventory.devices)})


SHARED_SCHEDULE_TIMEOUT_S = 120.0  # a task that holds nothing on an alive node starts in seconds
SHARED_RUN_TIMEOUT_S = 600.0  # a plan from a stored profile: vLLM's import and the plan, no engine


def device_resources(m: ModelConfig, cluster: ClusterView, device: str,
                     shared_on: Optional[str] = None, parallel: int = 1) -> DeviceResources:
    """What the Advisor's device task holds: a whole GPU, or every CPU of a node, of the model's type;
    with `shared_on` (every device of the type is held, see `shared_node`) none of it, on that node.

    A task that shares holds no GPU (num_gpus=0: Ray leaves CUDA_VISIBLE_DEVICES as the node's
    raylet has it, so NVML reads the node's GPUs) because replicas at 1/N each can hold all of a
    GPU, where even a small fraction would never be scheduled."""
    use_gpus = uses_gpus(device, cluster)
    if shared_on is not None:
        return DeviceResources(num_gpus=0.0, num_cpus=0.0, accelerator_type=m.device_type, whole_device=False,
                               node_id=shared_on, schedule_timeout_s=SHARED_SCHEDULE_TIMEOUT_S,
                               run_timeout_s=SHARED_RUN_TIMEOUT_S)
    return DeviceResources(num_gpus=1.0 if use_gpus else 0.0, num_cpus=0.0 if use_gpus else cluster.cpus_per_node,
                           accelerator_type=m.device_type, parallel=max(1, parallel))


AvailableResources = Mapping[str, Mapping[str, float]]  # node id -> resource -> amount free (Ray's reading)


def shared_node(inventory: Inventory, available: Optional[AvailableResources], use_gpus: bool,
                cpus: float) -> Optional[str]:
    """The node a device task shares with serving replicas, or None when it can hold a whole device.

    None when some node of `inventory` (the model's devices) has a whole GPU (or `cpus` CPUs) free,
    or when Ray's availability could not be read (`available` None: the task holds a whole device
    and its wait is bounded). Else every device is held (on a redeploy, by the app's own replicas)
    and the task shares: an alive node of the inventory first. Ray reports free GPUs per node, not
    per GPU: two half-held GPUs read as one free, and that whole-GPU ask ends at its start limit."""
    nodes = list(dict.fromkeys(d.node_id for d in inventory.devices))
    if available is None or not nodes:
        return None
    resource, whole = ("GPU", 1.0) if use_gpus else ("CPU", cpus)
    if any(available.get(n, {}).get(resource, 0.0) >= whole - 1e-6 for n in nodes):
        return None
    return next((n for n in nodes if n in available), nodes[0])


def available_per_node() -> Optional[AvailableResources]:
    """Ray's free resources per alive node; None when Ray cannot say."""
    from ray._private.state import available_resources_per_node

    try:
        return available_resources_per_node()
    except Exception as exc:  # a GCS that does not answer: hold a whole device, as a first deploy does
        logger.warning("could not read Ray's free resources per node (%s): the Advisor's device task asks for a "
                       "whole device", exc)
        return None


@dataclass(frozen=True)
class PendingPlan:
    """A plan asked of the Advisor and not yet received (models are planned in parallel)."""

    model: ModelConfig
    request: BaseModel  # the AdvisorRequest
    ref: ray.ObjectRef
    resources: Optional[DeviceResources] = None  # what its device task asked for (None: the defaults)


def ask_plan(m: ModelConfig, cluster: ClusterView, device: str, inventory: Inventory,
             store: Optional[str] = None,
             read_available: Callable[[], Optional[AvailableResources]] = available_per_node) -> PendingPlan:
    """Ask the Advisor actor for the plan of an `auto` model (profiled on a device of its type, on
    `inventory`: the devices it may use; profiles in `store`) without waiting for it. Where serving
    replicas hold every device of the type the device task shares one (`shared_node`)."""
    from advisor.actor import get_or_create_advisor
    from deployments.profiling import plan_model, profile_model

    request = advisor_request(m, cluster, inventory, store)
    use_gpus = uses_gpus(device, cluster)
    resources = device_resources(m, cluster, device,
                                 shared_node(inventory, read_available(), use_gpus, cluster.cpus_per_node),
                                 parallel=len(inventory.devices))
    advisor = get_or_create_advisor(plan_model, profile_model)
    return PendingPlan(model=m, request=request, ref=advisor.get_plan.remote(request, resources), resources=resources)


def plan_wait_error(m: ModelConfig, resources: DeviceResources, waited_s: float) -> str:
    """Why the builder stopped waiting for the Advisor's plan, and what to check."""
    return (f"model {m.served_name!r}: no plan from the Advisor (actor {ADVISOR_NAME!r} in namespace "
            f"{ADVISOR_NAMESPACE!r}) after {waited_s:g} s, the most its device task may take to start "
            f"({resources.schedule_timeout_s:g} s) and run ({resources.run_timeout_s:g} s): check that the actor is "
            f"alive (`ray list actors`) and `ray status` for what its task waits on, then deploy again")


def apply_plan(pending: PendingPlan, wait=ray.get) -> tuple[ModelConfig, Optional[Profile], ReplicaPlan]:
    """Wait for the plan, at most `plan_wait_s` of what its device task asked for; apply it to the
    model; return the model, the profile behind the plan and the plan. Its warnings (no GPM
    readings, no MPS) are logged as warnings."""
    from deployments.profiling import AdvisorError, stored_profile

    m = pending.model
    on = f" on device type {m.device_type!r}" if m.device_type else ""  # a model may run on several types
    resources = pending.resources or DeviceResources()
    waited_s = plan_wait_s(resources)
    try:
        plan = wait(pending.ref, timeout=waited_s)
    except ray.exceptions.GetTimeoutError:
        raise AppConfigError(plan_wait_error(m, resources, waited_s)) from None
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        # AdvisorError (does not fit, impossible SLO, bad model), a shared device that cannot profile,
        # or a device task that did not start or finish in time
        if isinstance(cause, (ValueError, TimeoutError)):
            raise AppConfigError(f"model {m.served_name!r}{on}: no replica plan: {cause}") from None
        raise
    for reason in plan.reasons:
        logger.info("plan for %s%s: %s", m.served_name, on, reason)
    for warning in plan.warnings:
        logger.warning("plan for %s%s: %s", m.served_name, on, warning)
    try:  # the profile of the device the plan was made on (a device task's, on a node of the model's type)
        profile = plan.profile if plan.predicted else stored_profile(pending.request, plan.device_name, plan.sharing)
    except AdvisorError:
        profile = None
    if profile is None:
        logger.warning("plan for %s%s: its profile (%s) is not in the store this node reads (it was taken on another "
                       "node; set profile_store to a folder every node mounts or an s3:// URL); no re-packing for this "
                       "model",
                       m.served_name, on, plan.device_name)
    resolved = m.model_copy(update={
        "replicas_per_device": plan.replicas_per_device, "max_num_seqs": plan.max_num_seqs,
        "kv_cache_bytes": ByteSize(plan.kv_cache_bytes),
    })
    return resolved, profile, plan


def plan_summary(plan: ReplicaPlan) -> list[str]:
    """What `plateau status` shows of a model's plan: N, batch and GPU sharing, then its warnings."""
    sharing = f", GPU sharing {plan.sharing}" if plan.sharing else ""
    sms = f", {plan.mps_thread_percentage}% of the SMs each" if plan.mps_thread_percentage else ""
    measured = plan.validation or plan.measured_gain
    gain = f", measured {measured.gain:+.0%} with {measured.replicas} engines" if measured is not None else ""
    state = (" (provisional: predicted; the profile is measured beside the replicas: see the `measured` decision)"
             if plan.predicted else " (provisional)" if plan.provisional else "")
    head = f"N={plan.replicas_per_device}, max_num_seqs {plan.max_num_seqs}{sharing}{sms}{gain}{state}"
    return [head] + [f"warning: {w}" for w in plan.warnings]


class ModelLayout(BaseModel):
    """What the builder decided for one model: its variants, their specs and the start count."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    config: ModelConfig
    policy_input: ModelPolicyInput
    specs: dict[int, ReplicaSpec]
    active_n: int
    initial_replicas: int

    @property
    def active(self) -> VariantSpec:
        return self.policy_input.variant(self.active_n)


def _device_for_plans(profile: Profile, inventory: Inventory, cluster: ClusterView) -> DeviceSpec:
    """The device the policy re-plans on: the smallest device of the cluster, the profile's engine."""
    memory = inventory.smallest_memory_bytes
    cores = profile.cores or int(cluster.cpus_per_node)
    return DeviceSpec(kind=cluster.engine_device, name=profile.device_name, memory_bytes=memory, cores=cores)


def layout_model(m: ModelConfig, cluster: ClusterView, inventory: Inventory, device: str,
                 profile: Optional[Profile], key: Optional[str] = None, sharing: Optional[str] = None,
                 measured_key: Optional[str] = None) -> ModelLayout:
    """Variants, engine specs and replica bounds of one model whose N is resolved; `key` (default
    the served name) names its variants and its model in the policy (`<name>@<type>` for one of
    several device types); `sharing` (the plan's) caps each variant's SMs under MPS, also where the
    profile behind the plan is not readable here. `measured_key`: the profile is a prediction whose
    measured replacement the policy picks up there."""
    name = key or m.served_name
    planner = PlannerConfig(device_memory_fraction=m.device_memory_fraction, max_model_len=m.max_model_len,
                            # a predicted curve plans B*: only a measured batch past the knee sets the cap
                            admit_plateau=not (profile is not None and profile.predicted))
    dev = None
    other_batch = m.max_num_seqs  # the batch cap of the variants other than the planned N
    if profile is not None:
        dev = _device_for_plans(profile, inventory, cluster)
        shape = WorkloadShape(prompt_tokens=m.prompt_tokens, output_tokens=m.output_tokens)
        try:
            plan = plan_replicas(profile, dev, shape, planner)
        except PlanError as exc:
            where = f"device of type {m.device_type!r}" if m.device_type else "device of this cluster"
            raise AppConfigError(f"model {name!r} fits no {where}: {exc}") from None
        m = m.model_copy(update={"replicas_per_device": plan.replicas_per_device, "max_num_seqs": plan.max_num_seqs,
                                 "kv_cache_bytes": ByteSize(plan.kv_cache_bytes)})
        # the planned N may batch past B* (its KV was sized for that, where N replicas fit); the
        # other variants keep B*, whose KV the planner checked for every N
        other_batch = plan.b_star or plan.max_num_seqs
    elif m.variants:
        raise AppConfigError(
            f"model {name!r}: variants {m.variants} need the Advisor's profile to choose between them; "
            "set replicas_per_device: auto (or remove variants)"
        )
    n = int(m.replicas_per_device)
    start_n = m.start_variant or n
    usable = int(inventory.smallest_memory_bytes * m.device_memory_fraction)
    specs: dict[int, ReplicaSpec] = {}
    variants: list[VariantSpec] = []
    for k in sorted(set(m.variants) | {n}):
        if profile is None:
            kv, memory = (int(m.kv_cache_bytes) if m.kv_cache_bytes is not None else None), usable // k
        elif k == n:
            kv = int(m.kv_cache_bytes)
            memory = profile.weight_bytes + profile.overhead_bytes + kv
        else:
            fixed = profile.weight_bytes + profile.overhead_bytes
            block = KV_BLOCK_TOKENS[cluster.engine_device]
            shape_len = m.prompt_tokens + m.output_tokens
            longest = m.max_model_len or 2 * shape_len
            kv = min(usable // k - fixed, kv_pool_bytes(profile.kv_bytes_per_token, block, other_batch, longest,
                                                     planner.kv_headroom))
            needed = kv_pool_bytes(profile.kv_bytes_per_token, block, 1, shape_len, 0.0, m.max_model_len)
            if kv < needed:
                one = (f"one max_model_len {m.max_model_len}-token sequence plus a block" if m.max_model_len
                       else f"one {shape_len}-token sequence")
                raise AppConfigError(
                    f"model {name!r}: variant N={k} does not fit: a replica gets {usable / k / 2**30:.2f} GiB "
                    f"(1/{k} of {usable / 2**30:.2f} GiB usable) but weights + engine overhead take "
                    f"{fixed / 2**30:.2f} GiB and {one} needs {needed / 2**20:.0f} MiB more; drop {k} from "
                    f"variants, lower max_model_len or use larger devices"
                )
            memory = fixed + kv
        spec = replica_spec(m.model_copy(update={"replicas_per_device": k,
                                                 "max_num_seqs": m.max_num_seqs if k == n else other_batch,
                                                 "kv_cache_bytes": ByteSize(kv) if kv is not None else None}),
                            cluster, device)
        if (sharing or (profile.sharing if profile is not None else None)) == "mps" and k > 1:
            spec = spec.model_copy(update={"mps_thread_percentage": mps_thread_percentage(k)})
        specs[k] = spec
        variants.append(VariantSpec(n=k, deployment=replica_deployment_name(name, k), share=round(1.0 / k, 6),
                                    memory_bytes=max(1, memory), max_num_seqs=spec.max_num_seqs))
    start = start_n * m.devices
    low = m.min_replicas or start
    high = max(m.max_replicas or start, low)
    initial = min(max(start, low), high)
    inp = ModelPolicyInput(model=name, variants=variants, min_replicas=low, max_replicas=high, profile=profile,
                           device=dev, planner=planner, device_type=m.device_type, measured_key=measured_key)
    return ModelLayout(config=m, policy_input=inp, specs=specs, active_n=start_n, initial_replicas=initial)


def place(layouts: list[ModelLayout], inventory: Inventory, autoscaling: bool = False) -> NeededDevices:
    """Pack every model's start replicas (and, first, its minimum) or fail naming what does not fit.
    With `autoscaling` (a cluster whose Ray autoscaler adds nodes) what the devices lack is added as
    devices like the largest of its kind and type, to be requested; only a replica that even such a
    device cannot hold fails."""
    def demand(replicas_of) -> PackInput:
        return PackInput(devices=inventory.capacities(), models=[
            ModelDemand(model=lay.active.deployment, kind=inventory.kind, replicas=replicas_of(lay),
                        share=lay.active.share, memory_per_replica_bytes=lay.active.memory_bytes,
                        device_type=lay.config.device_type)
            for lay in layouts])
    devices = ", ".join(f"{d.name} ({d.model_name}{f' type {d.device_type}' if d.device_type else ''}, "
                        f"{d.memory_bytes / 2**30:.1f} GiB {d.memory_source})" for d in inventory.devices)
    for what, replicas_of in (("min_replicas", lambda lay: lay.policy_input.min_replicas),
                              ("start replicas", lambda lay: lay.initial_replicas)):
        spec = demand(replicas_of)
        needed = devices_needed(spec) if autoscaling else \
            NeededDevices(packing=pack(spec), devices=spec.devices, missing=[])
        result = needed.packing
        if result.unplaced:
            by_dep = {lay.active.deployment: lay for lay in layouts}
            lines = []
            for u in result.unplaced:
                lay = by_dep[u.model]
                v = lay.active
                lines.append(f"  model {lay.policy_input.model!r}: {u.replicas} of its {replicas_of(lay)} {what} "
                             f"(N={v.n}: share {v.share:g} and {v.memory_bytes / 2**30:.2f} GiB each) do not fit: "
                             f"{u.reason}")
            grow = ("" if autoscaling else "\n  on a cluster whose Ray autoscaler can add nodes, set "
                    "cluster_autoscaling: true to request the devices instead")
            raise AppConfigError("the models do not fit this cluster's devices:\n" + "\n".join(lines)
                                 + f"\n  devices: {devices}" + grow)
    return needed
