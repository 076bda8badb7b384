"""Application builder for `serve run config.yaml` (import path `deployments.app:build_app`).

`AppArgs` is the schema of the application's `args`. The builder validates them (errors name the
field, the value and the fix), looks at the Ray cluster (GPUs or CPU-only), turns each model into
a `ReplicaSpec` with its resources (`num_gpus = 1/N` on GPU clusters, a share of the node's CPUs
otherwise), and binds the OpenAI ingress in front of one replica deployment per model.
"""

from __future__ import annotations

import difflib
import os
from typing import Literal, Optional

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve import Application

from deployments.engine import EngineConfigError, check_engine_kwargs, deployment_options
from deployments.ingress import OpenAIIngress, RetryPolicy, ServedModel
from deployments.replica import LLMReplica
from deployments.spec import DeviceKind, EngineKwargValue, ReplicaResources, ReplicaSpec


class AppConfigError(ValueError):
    """Invalid application args; the message names each field, its value and the fix."""


class ModelConfig(BaseModel):
    """One served model and how its replicas are packed."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field(
        "smollm2-135m",
        description="an embedded model name (smollm2-135m), a local Hugging Face folder, or a hub id",
    )
    name: Optional[str] = Field(None, description="the name clients send as `model`; defaults to `model`")
    replicas_per_device: int = Field(2, ge=1, le=64, description="replicas packed on one device (N), 1..64")
    devices: int = Field(1, ge=1, description="how many devices this model's replicas occupy, >= 1")
    max_num_seqs: int = Field(32, ge=1, le=4096, description="per-replica batch cap (B), 1..4096")
    kv_cache_bytes: Optional[ByteSize] = Field(
        None, description="KV pool per replica, e.g. 512MiB or 2GiB; omit to let vLLM size it from its share"
    )
    device_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="share of a device's memory all its replicas may use together, (0, 1]"
    )
    max_model_len: Optional[int] = Field(2048, ge=16, description="context length in tokens, >= 16, or null")
    dtype: str = Field("auto", description="auto, float32, bfloat16 or float16")
    enforce_eager: bool = Field(False, description="true skips torch.compile/CUDA graphs: faster start")
    engine_kwargs: dict[str, EngineKwargValue] = Field(
        default_factory=dict, description="extra vLLM EngineArgs by their vLLM names"
    )

    @property
    def served_name(self) -> str:
        return self.name or self.model

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
    api_key: Optional[str] = Field(None, description="bearer token clients must send; omit for none")
    api_key_env: Optional[str] = Field(None, description="name of an environment variable holding the API key")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="retries of requests that hit a dead replica")

    @model_validator(mode="after")
    def _unique_names(self) -> "AppArgs":
        names = [m.served_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"served model names must be unique; repeated: {', '.join(dupes)} (set `name`)")
        return self

    def resolved_api_key(self) -> Optional[str]:
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or self.api_key
        return self.api_key


class ClusterView(BaseModel):
    """The slice of the Ray cluster the builder needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    gpus: float = Field(description="GPUs Ray knows (logical).")
    cpus_per_node: float = Field(description="CPUs of the largest node.")
    engine_device: DeviceKind = Field(description="Where the installed vLLM runs models.")

    @classmethod
    def from_ray(cls) -> "ClusterView":
        import ray

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
        except EngineConfigError as exc:
            raise AppConfigError(f"invalid plateau-serve config: models[{i}].{exc}") from None
    return args


def _explain(exc: ValidationError) -> str:
    lines = ["invalid plateau-serve config (application args):"]
    for err in exc.errors():
        loc = _dotted(err["loc"])
        fix = _field_hint(err["loc"])
        value = err.get("input")
        lines.append(f"  {loc} = {value!r}: {err['msg']}" + (f" (expected: {fix})" if fix else ""))
    return "\n".join(lines)


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


def replica_spec(m: ModelConfig, cluster: ClusterView, device: str) -> ReplicaSpec:
    """The spec and resources of one replica of model `m` on this cluster."""
    n = m.replicas_per_device
    use_gpus = device == "cuda" or (device == "auto" and cluster.gpus > 0)
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
    )


def build(args: AppArgs, cluster: ClusterView) -> Application:
    handles = {}
    served = []
    for m in args.models:
        spec = replica_spec(m, cluster, args.device)
        count = m.replicas_per_device * m.devices
        opts = deployment_options(spec, count)
        handles[spec.served_name] = serve.deployment(LLMReplica).options(**opts).bind(spec)
        served.append(ServedModel(name=spec.served_name, max_model_len=m.max_model_len, replicas=count))
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096
    )
    return ingress.bind(handles, served, args.resolved_api_key(), args.retry)


def build_app(raw_args: Optional[dict] = None) -> Application:
    """Entry point for `serve run`: validate the args, read the cluster, bind the app."""
    args = parse_args(raw_args)
    return build(args, ClusterView.from_ray())
