"""Application builder for `serve run config.yaml` (import path `deployments.app:build_app`).

`AppArgs` is the schema of the application's `args`. The builder validates them (errors name the
field, the value and the fix), looks at the Ray cluster (GPUs or CPU-only), turns each model into
a `ReplicaSpec` with its resources (`num_gpus = 1/N` on GPU clusters, a share of the node's CPUs
otherwise), and binds the OpenAI ingress in front of one replica deployment per model.
"""

from __future__ import annotations

import difflib
import logging
import os
import uuid
from typing import Annotated, Literal, Optional, Union

from pydantic import (BaseModel, ByteSize, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)
import ray
from ray import serve
from ray.serve import Application

from advisor.memory import KV_BLOCK_TOKENS
from advisor.planner import DeviceSpec, PlanError, PlannerConfig, kv_pool_bytes, plan_replicas
from advisor.profiler import Profile, WorkloadShape
from cluster.board import AppPlacement
from cluster.inventory import Inventory, cluster_inventory
from cluster.packing import ModelDemand, PackInput, PackResult, pack
from cluster.policy import ModelPolicyInput, PolicyConfig, Route, VariantSpec
from deployments.autoscale import POLICY_FUNCTION, policy_kwargs
from deployments.engine import (EngineConfigError, check_engine_kwargs, check_server_kwargs, deployment_options,
                                replica_deployment_name, vllm_version)
from deployments.ingress import OpenAIIngress, RetryPolicy, ServedModel
from deployments.replica import LLMReplica
from deployments.spec import DeviceKind, EngineKwargValue, ReplicaResources, ReplicaSpec
from deployments.vllm_api import openai_schema


logger = logging.getLogger("ray.serve")


class AppConfigError(ValueError):
    """Invalid application args; the message names each field, its value and the fix."""


REDACTED = "**********"  # how an API key appears wherever args are printed or logged


class ModelConfig(BaseModel):
    """One served model and how its replicas are packed."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field(
        "smollm2-135m",
        description="an embedded model name (smollm2-135m), a local Hugging Face folder, or a hub id",
    )
    name: Optional[str] = Field(None, description="the name clients send as `model`; defaults to `model`")
    replicas_per_device: Union[Literal["auto"], Annotated[int, Field(ge=1, le=64)]] = Field(
        "auto", description="replicas packed on one device (N), 1..64, or auto: the Advisor's plan"
    )
    devices: int = Field(1, ge=1, description="how many devices this model's replicas occupy at start, >= 1")
    min_replicas: Optional[int] = Field(None, ge=1, description="fewest replicas under load scaling, >= 1 (default: the start count)")
    max_replicas: Optional[int] = Field(None, ge=1, description="most replicas under load scaling (default: the start count)")
    variants: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=list,
        description="other replicas-per-device values (N) the policy may re-pack to, e.g. [1, 2]; needs the app's "
                    "autoscaling_policy and a profile (replicas_per_device: auto)",
    )
    start_variant: Optional[Annotated[int, Field(ge=1, le=64)]] = Field(
        None, description="the variant (N) the model starts on, one of `variants`; omit to start on the plan's N "
                          "(benchmarks and tests that need a fixed start set it)",
    )
    max_num_seqs: int = Field(32, ge=1, le=4096, description="per-replica batch cap (B), 1..4096 (auto: planned)")
    kv_cache_bytes: Optional[ByteSize] = Field(
        None, description="KV pool per replica, e.g. 512MiB or 2GiB; omit to let vLLM size it (auto: planned)"
    )
    prompt_tokens: int = Field(128, ge=1, description="typical prompt length the plan is made for (auto)")
    output_tokens: int = Field(64, ge=2, description="typical output length the plan is made for (auto)")
    tpot_slo_ms: Optional[float] = Field(None, gt=0, description="TPOT p99 limit in ms the plan must keep (auto)")
    device_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="share of a device's memory all its replicas may use together, (0, 1]"
    )
    max_model_len: Optional[int] = Field(2048, ge=16, description="context length in tokens, >= 16, or null")
    dtype: str = Field("auto", description="auto, float32, bfloat16 or float16")
    enforce_eager: bool = Field(False, description="true skips torch.compile/CUDA graphs: faster start")
    engine_kwargs: dict[str, EngineKwargValue] = Field(
        default_factory=dict, description="extra vLLM EngineArgs by their vLLM names"
    )
    server_kwargs: dict[str, EngineKwargValue] = Field(
        default_factory=dict,
        description="vLLM OpenAI server options by their vLLM names (`vllm serve` flags without --, e.g. "
                    "tool_call_parser: hermes, enable_auto_tool_choice: true, chat_template: PATH)",
    )

    @property
    def served_name(self) -> str:
        return self.name or self.model

    @property
    def elastic(self) -> bool:
        """True when the policy may change this model's replica counts (needs the app-level policy)."""
        return bool(self.variants) or self.min_replicas is not None or self.max_replicas is not None

    @model_validator(mode="after")
    def _bounds(self) -> "ModelConfig":
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        if self.start_variant is not None and self.start_variant not in self.variants:
            raise ValueError(f"start_variant {self.start_variant} is not one of variants {self.variants}; "
                             f"add {self.start_variant} to variants or drop start_variant")
        return self

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        allowed = {"auto", "float32", "bfloat16", "float16", "half", "float"}
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(sorted(allowed))}")
        return v


class AppArgs(BaseModel):
    """The `args` of the plateau-serve application in config.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig()], min_length=1, description="a list of model entries, at least one"
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto (GPUs when Ray has them, else CPUs), cuda or cpu"
    )
    api_key: Optional[SecretStr] = Field(
        None, description="bearer token clients must send; omit for none (never printed: shown as **********)")
    api_key_env: Optional[str] = Field(None, description="name of an environment variable holding the API key")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="retries of requests that hit a dead replica")
    device_memory: Optional[ByteSize] = Field(
        None, description="memory of each GPU when NVML cannot read it (logical GPUs on a CPU machine), e.g. 8GiB"
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="autoscaling and re-pack thresholds")

    @model_validator(mode="after")
    def _unique_names(self) -> "AppArgs":
        names = [m.served_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"served model names must be unique; repeated: {', '.join(dupes)} (set `name`)")
        return self

    def resolved_api_key(self) -> Optional[str]:
        """The key clients must send. An `api_key_env` naming an unset variable is an error (unless
        `api_key` is the fallback): the server would otherwise start without authentication."""
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if value:
                return value
            if self.api_key is None:
                raise AppConfigError(
                    f"api_key_env = {self.api_key_env!r}: the environment variable {self.api_key_env} is not set (or "
                    f"empty) where the application starts, so the server would accept requests without an API "
                    f"key; export {self.api_key_env} in the shell that starts Ray / `serve run`, or remove api_key_env"
                )
        return self.api_key.get_secret_value() if self.api_key is not None else None


class ClusterView(BaseModel):
    """The slice of the Ray cluster the builder needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    gpus: float = Field(description="GPUs Ray knows (logical).")
    cpus_per_node: float = Field(description="CPUs of the largest node.")
    engine_device: DeviceKind = Field(description="Where the installed vLLM runs models.")

    @classmethod
    def from_ray(cls) -> "ClusterView":
        if not ray.is_initialized():
            ray.init()
        cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        return cls(
            gpus=float(ray.cluster_resources().get("GPU", 0.0)),
            cpus_per_node=max(cpus or [1.0]),
            engine_device=installed_engine_device(),
        )


def installed_engine_device() -> DeviceKind:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda"


def parse_args(raw: Optional[dict]) -> AppArgs:
    """Validate application args into `AppArgs`, or raise `AppConfigError` naming every problem."""
    try:
        args = AppArgs.model_validate(raw or {})
    except ValidationError as exc:
        raise AppConfigError(_explain(exc)) from None
    for i, m in enumerate(args.models):
        try:
            check_engine_kwargs(dict(m.engine_kwargs))
            check_server_kwargs(dict(m.server_kwargs))
        except EngineConfigError as exc:
            raise AppConfigError(f"invalid plateau-serve config: models[{i}].{exc}") from None
    return args


def _explain(exc: ValidationError) -> str:
    """One line per field: path, value, what pydantic said, and what the field expects."""
    lines = ["invalid plateau-serve config (application args):"]
    seen: dict[tuple, list[str]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        msgs = seen.setdefault(loc, [])
        if not msgs:
            lines.append((loc, err.get("input")))
        msgs.append(err["msg"])
    out = [lines[0]]
    for loc, value in lines[1:]:
        if any(part == "api_key" for part in loc):
            value = REDACTED
        fix = _field_hint(loc)
        out.append(f"  {_dotted(loc)} = {value!r}: {' or '.join(dict.fromkeys(seen[loc]))}"
                   + (f" (expected: {fix})" if fix else ""))
    return "\n".join(out)


def _is_union_tag(part) -> bool:
    # pydantic names the union member an error came from ("literal['auto']", "int") in the path
    return isinstance(part, str) and (part in ("int", "str", "float", "bool") or "[" in part or part.startswith("constrained-"))


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "args"


def _field_hint(loc) -> Optional[str]:
    model: type[BaseModel] = AppArgs
    hint = None
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            close = difflib.get_close_matches(str(part), list(model.model_fields), n=1)
            guess = f"; did you mean {close[0]!r}?" if close else ""
            return f"a known field ({', '.join(model.model_fields)}){guess}"
        hint = field.description
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        nested = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            model = nested[0]
    return hint


def _uses_gpus(device: str, cluster: ClusterView) -> bool:
    return device == "cuda" or (device == "auto" and cluster.gpus > 0)


def replica_spec(m: ModelConfig, cluster: ClusterView, device: str) -> ReplicaSpec:
    """The spec and resources of one replica of model `m` on this cluster (N already resolved)."""
    if m.replicas_per_device == "auto":
        raise AppConfigError(f"model {m.served_name!r}: replicas_per_device is still 'auto'; resolve the plan first")
    n = m.replicas_per_device
    use_gpus = _uses_gpus(device, cluster)
    if use_gpus and cluster.gpus <= 0:
        raise AppConfigError(
            "device = 'cuda' but the Ray cluster has no GPUs; start it with GPUs "
            "(`ray start --head --num-gpus=1`) or set device: auto"
        )
    if use_gpus:
        resources = ReplicaResources(num_gpus=round(1.0 / n, 6), num_cpus=min(1.0, cluster.cpus_per_node / n))
    else:
        resources = ReplicaResources(num_gpus=0.0, num_cpus=round(cluster.cpus_per_node / n, 4))
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
        engine_kwargs=dict(m.engine_kwargs),
        server_kwargs=dict(m.server_kwargs),
    )


def _advisor_request(m: ModelConfig, cluster: ClusterView):
    from deployments.profiling import AdvisorRequest

    return AdvisorRequest(
        model=m.model, device="cuda" if cluster.engine_device == "cuda" else "cpu",
        shape=WorkloadShape(prompt_tokens=m.prompt_tokens, output_tokens=m.output_tokens),
        tpot_slo_ms=m.tpot_slo_ms, dtype=m.dtype, max_model_len=m.max_model_len, enforce_eager=m.enforce_eager,
    )


def resolve_auto(m: ModelConfig, cluster: ClusterView, device: str) -> tuple[ModelConfig, Optional[Profile]]:
    """Ask the Advisor actor for the plan of an `auto` model; apply it; return the profile behind it."""
    from advisor.actor import DeviceResources, get_or_create_advisor
    from deployments.profiling import AdvisorError, plan_model, profile_model, stored_profile

    use_gpus = _uses_gpus(device, cluster)
    request = _advisor_request(m, cluster)
    # The profiling task holds the whole device: a GPU, or every CPU of the node.
    resources = DeviceResources(num_gpus=1.0 if use_gpus else 0.0, num_cpus=0.0 if use_gpus else cluster.cpus_per_node)
    advisor = get_or_create_advisor(plan_model, profile_model)
    try:
        plan = ray.get(advisor.get_plan.remote(request, resources))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ValueError):  # AdvisorError: does not fit, impossible SLO, bad model
            raise AppConfigError(f"model {m.served_name!r}: no replica plan: {cause}") from None
        raise
    for reason in plan.reasons:
        logger.info("plan for %s: %s", m.served_name, reason)
    try:
        profile = stored_profile(request)
    except AdvisorError:
        profile = None
    if profile is None:
        logger.warning("plan for %s: the profile is not in this node's store; no re-packing for this model",
                       m.served_name)
    resolved = m.model_copy(update={
        "replicas_per_device": plan.replicas_per_device, "max_num_seqs": plan.max_num_seqs,
        "kv_cache_bytes": ByteSize(plan.kv_cache_bytes),
    })
    return resolved, profile


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
                 profile: Optional[Profile]) -> ModelLayout:
    """Variants, engine specs and replica bounds of one model whose N is resolved."""
    name = m.served_name
    planner = PlannerConfig(device_memory_fraction=m.device_memory_fraction, max_model_len=m.max_model_len)
    dev = None
    if profile is not None:
        dev = _device_for_plans(profile, inventory, cluster)
        shape = WorkloadShape(prompt_tokens=m.prompt_tokens, output_tokens=m.output_tokens)
        try:
            plan = plan_replicas(profile, dev, shape, planner)
        except PlanError as exc:
            raise AppConfigError(f"model {name!r} fits no device of this cluster: {exc}") from None
        m = m.model_copy(update={"replicas_per_device": plan.replicas_per_device, "max_num_seqs": plan.max_num_seqs,
                                 "kv_cache_bytes": ByteSize(plan.kv_cache_bytes)})
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
            kv = min(usable // k - fixed, kv_pool_bytes(profile.kv_bytes_per_token, block, m.max_num_seqs, longest,
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
                                                 "kv_cache_bytes": ByteSize(kv) if kv is not None else None}),
                            cluster, device)
        specs[k] = spec
        variants.append(VariantSpec(n=k, deployment=replica_deployment_name(name, k), share=round(1.0 / k, 6),
                                    memory_bytes=max(1, memory), max_num_seqs=spec.max_num_seqs))
    start = start_n * m.devices
    low = m.min_replicas or start
    high = max(m.max_replicas or start, low)
    initial = min(max(start, low), high)
    inp = ModelPolicyInput(model=name, variants=variants, min_replicas=low, max_replicas=high, profile=profile,
                           device=dev, planner=planner)
    return ModelLayout(config=m, policy_input=inp, specs=specs, active_n=start_n, initial_replicas=initial)


def place(layouts: list[ModelLayout], inventory: Inventory) -> PackResult:
    """Pack every model's start replicas (and, first, its minimum) or fail naming what does not fit."""
    def demand(replicas_of) -> PackInput:
        return PackInput(devices=inventory.capacities(), models=[
            ModelDemand(model=lay.active.deployment, kind=inventory.kind, replicas=replicas_of(lay),
                        share=lay.active.share, memory_per_replica_bytes=lay.active.memory_bytes)
            for lay in layouts])
    devices = ", ".join(f"{d.name} ({d.model_name}, {d.memory_bytes / 2**30:.1f} GiB {d.memory_source})"
                        for d in inventory.devices)
    for what, replicas_of in (("min_replicas", lambda lay: lay.policy_input.min_replicas),
                              ("start replicas", lambda lay: lay.initial_replicas)):
        result = pack(demand(replicas_of))
        if result.unplaced:
            by_dep = {lay.active.deployment: lay for lay in layouts}
            lines = []
            for u in result.unplaced:
                lay = by_dep[u.model]
                v = lay.active
                lines.append(f"  model {lay.policy_input.model!r}: {u.replicas} of its {replicas_of(lay)} {what} "
                             f"(N={v.n}: share {v.share:g} and {v.memory_bytes / 2**30:.2f} GiB each) do not fit: "
                             f"{u.reason}")
            raise AppConfigError("the models do not fit this cluster's devices:\n" + "\n".join(lines)
                                 + f"\n  devices: {devices}")
    return result


def build(args: AppArgs, cluster: ClusterView, inventory: Optional[Inventory] = None) -> Application:
    inventory = inventory or cluster_inventory(
        int(args.device_memory) if args.device_memory else None, use_gpus=_uses_gpus(args.device, cluster))
    if not inventory.devices:
        raise AppConfigError("the Ray cluster has no alive nodes to place replicas on")
    layouts = []
    for m in args.models:
        profile = None
        if m.replicas_per_device == "auto":
            m, profile = resolve_auto(m, cluster, args.device)
        layouts.append(layout_model(m, cluster, inventory, args.device, profile))
    packing = place(layouts, inventory)
    capacities = inventory.capacities()
    deploy_id = uuid.uuid4().hex  # saved policy state is read back into this build only
    handles: dict[str, dict[int, object]] = {}
    served, routes = [], {}
    for lay in layouts:
        name = lay.policy_input.model
        if lay.config.elastic:
            logger.info("model %s: replica counts follow the plateau policy (needs the application's "
                        "autoscaling_policy: deployments.autoscale:PlateauAutoscaler in config.yaml)", name)
        handles[name] = {}
        routes[name] = []
        for k, spec in lay.specs.items():
            count = lay.initial_replicas if k == lay.active_n else 0
            autoscaling = {
                # re-packing scales whole variants to zero, so only a single-variant model keeps its minimum
                "min_replicas": 0 if len(lay.specs) > 1 else lay.policy_input.min_replicas,
                "max_replicas": max(1, lay.policy_input.max_replicas),
                "initial_replicas": count,
                # the plateau policy holds its own hysteresis; Serve's delays would stack on top
                "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
                "metrics_interval_s": 1.0, "look_back_period_s": 5.0,
                "target_ongoing_requests": max(1.0, spec.max_num_seqs * args.policy.target_batch_fill),
                "policy": {"policy_kwargs": policy_kwargs(lay.policy_input, k, args.policy, capacities, deploy_id)},
            }
            opts = deployment_options(spec, count, autoscaling)
            handles[name][k] = serve.deployment(LLMReplica).options(**opts).bind(spec)
            routes[name].append(Route(n=k, deployment=opts["name"], accepting=k == lay.active_n, running=count,
                                      max_num_seqs=spec.max_num_seqs))
        served.append(ServedModel(name=name, max_model_len=lay.config.max_model_len, replicas=lay.initial_replicas))
    placement = AppPlacement(app="", devices=inventory.devices, packing=packing, routes=routes)
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096,
        # an application-level policy needs every deployment to autoscale; the ingress stays at one
        autoscaling_config={"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1},
    )
    first = layouts[0]
    schema = openai_schema(first.specs[first.active_n])
    return ingress.bind(handles, served, args.resolved_api_key(), args.retry, placement, schema, vllm_version())


def build_app(raw_args: Optional[dict] = None) -> Application:
    """Entry point for `serve run`: validate the args, read the cluster, bind the app."""
    from deployments.install_check import check_install

    check_install()  # a broken torchvision says what to run, not "Could not import module 'LlamaConfig'"
    args = parse_args(raw_args)
    args.resolved_api_key()  # an unset api_key_env fails here, before anything starts
    check_policy_configured(args, raw_args, _serve_app_configs())
    return build(args, ClusterView.from_ray())


def check_policy_configured(args: AppArgs, raw_args: Optional[dict], app_configs: list[dict]) -> None:
    """Elastic models (variants, min/max_replicas) need the app-level plateau policy: without it
    Serve's default policy would scale their variant deployments (min_replicas 0, no delays).

    The builder is not told the app's `autoscaling_policy`, but Serve's controller writes the
    config (with it) to its checkpoint before it starts the build task, so the builder reads the
    app configs back and looks for the one built by this builder with these args.
    """
    elastic = [m.served_name for m in args.models if m.elastic]
    if not elastic:
        return
    ours = [c for c in app_configs if str(c.get("import_path", "")).startswith("deployments.app:")
            and (c.get("args") or {}) == (raw_args or {})]
    if any((c.get("autoscaling_policy") or {}).get("policy_function") == POLICY_FUNCTION for c in ours):
        return
    found = "no Serve application config with these args was found" if not ours else \
        f"its autoscaling_policy is {ours[0].get('autoscaling_policy')!r}"
    raise AppConfigError(
        f"models {', '.join(elastic)} set variants or min/max_replicas, which needs the application-level "
        f"policy ({found}); add `autoscaling_policy: {{policy_function: {POLICY_FUNCTION}}}` to the application "
        f"in config.yaml and deploy it with `serve run config.yaml`, or remove variants/min_replicas/max_replicas"
    )


def _serve_app_configs() -> list[dict]:
    """The app configs Serve's controller holds (empty when there is no controller, e.g. a Python deploy)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return []
    configs = ray.get(controller.get_app_configs.remote(), timeout=60)
    return [c.model_dump() for c in configs.values()]
