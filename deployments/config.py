"""The schema of the application's `args` in config.yaml, and its validation.

`AppArgs` (with one `ModelConfig` per served model) is what `serve run config.yaml` passes to the
builder and what `plateau config check` reads. `parse_args` validates raw args and raises
`AppConfigError` with one line per problem: the field's path, its value, what is wrong and what
the field expects. API keys never appear in these messages: the values of `api_key` and
`api_key_env` (a key pasted there by mistake) and of unknown fields (perhaps a misspelled
`api_key`) are not shown.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Annotated, Literal, Optional, Union

from pydantic import (BaseModel, ByteSize, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)

from advisor.storage import StoreUrlError, check_where
from cluster.policy import PolicyConfig
from cluster.routing import RequestLimits
from deployments.engine import EngineConfigError, check_engine_kwargs, check_server_kwargs, replica_deployment_name
from deployments.ingress import RetryPolicy
from deployments.spec import EngineKwargValue


class AppConfigError(ValueError):
    """Invalid application args; the message names each field, its value and the fix."""


REDACTED = "**********"  # how an API key appears wherever args are printed or logged
SECRET_FIELDS = ("api_key", "api_key_env")  # whose values no error message shows
_ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
    device_type: Optional[str] = Field(
        None, min_length=1, description="Ray accelerator type (H100, A10G, or a node's own accelerator_type:<T> resource) the "
                          "model is profiled, planned and placed on; omit for any device",
    )
    device_types: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="several Ray accelerator types to serve the model on at once, each with its own profile, plan, "
                    "variants and replica counts (devices, min/max_replicas hold per type), behind the one name; "
                    "instead of device_type",
    )
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
    first_start: Literal["auto", "predict", "profile"] = Field(
        "auto", description="auto with no stored profile for the device: `predict` serves at once on the performance "
                            "model's plan and measures the profile beside the replicas (the policy plans with it, the "
                            "next start serves its plan); `profile` profiles before serving; `auto` predicts on CPUs "
                            "and profiles first on GPUs",
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
    stall_timeout_s: float = Field(
        60.0, ge=5.0, le=3600.0,
        description="seconds a replica's engine may make no step while requests wait for it, 5..3600; then it counts "
                    "as stalled (its requests end with an error, Serve replaces the replica); the replica stretches "
                    "it to 10x the longest step it saw",
    )
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

    def per_device_type(self) -> list[tuple[str, "ModelConfig"]]:
        """(key, config) for each device type the model is served on: one entry pinned to `device_type`
        (or to none) keyed by the served name, or one per entry of `device_types` keyed
        `<served name>@<type>` (the key names the model's variants, its policy state and status)."""
        if not self.device_types:
            return [(self.served_name, self)]
        pinned = [(t, self.model_copy(update={"device_type": t, "device_types": []})) for t in self.device_types]
        if len(pinned) == 1:
            return [(self.served_name, pinned[0][1])]
        return [(f"{self.served_name}@{t}", m) for t, m in pinned]

    @model_validator(mode="after")
    def _bounds(self) -> "ModelConfig":
        if self.device_type is not None and self.device_types:
            raise ValueError(f"set device_type ({self.device_type!r}) or device_types ({self.device_types}), not both")
        repeated = sorted({t for t in self.device_types if self.device_types.count(t) > 1})
        if repeated:
            raise ValueError(f"device_types repeats {', '.join(repeated)}")
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
        None, description="bearer token clients must send, written into the config file; prefer api_key_env; omit "
                          "both for none (never printed: shown as **********)")
    api_key_env: Optional[str] = Field(
        None, description="name of an environment variable holding the API key (letters, digits and _, e.g. "
                          "PLATEAU_API_KEY); the way to set a key: it keeps the key out of the config file")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="retries of requests that hit a dead replica")
    limits: RequestLimits = Field(
        default_factory=RequestLimits, description="largest request body and deepest JSON nesting accepted")
    device_memory: Optional[ByteSize] = Field(
        None, description="memory of each GPU when NVML cannot read it (logical GPUs on a CPU machine), e.g. 8GiB"
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="autoscaling and re-pack thresholds")
    profile_store: Optional[str] = Field(
        None, description="where every node reads and writes profiles on a cluster of several machines: an "
                          "absolute folder path every node mounts (NFS, a shared disk) or an object-storage URL "
                          "(s3://bucket/prefix, with s3fs on every node); "
                          "default: $PLATEAU_HOME/profiles of the node that profiles")
    cluster_autoscaling: bool = Field(
        False, description="true on a Ray cluster whose autoscaler adds nodes (cluster launcher, KubeRay): devices the "
                           "placement lacks are requested (ray.autoscaler.sdk.request_resources) and the replicas wait "
                           "for them; false: a placement that does not fit fails the start")

    @field_validator("api_key_env")
    @classmethod
    def _env_var_name(cls, v: Optional[str]) -> Optional[str]:
        # a value that is no variable name is most likely the key itself: the message never repeats it
        if v is not None and not _ENV_VAR_NAME.fullmatch(v):
            raise ValueError("not the name of an environment variable (letters, digits and _, not starting with a "
                             "digit); if this is the key itself, export it as a variable, e.g. PLATEAU_API_KEY, set "
                             "api_key_env: PLATEAU_API_KEY, and take the key out of the config file")
        return v

    @field_validator("profile_store")
    @classmethod
    def _store_path(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                check_where(v)
            except StoreUrlError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> "AppArgs":
        names = [m.served_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"served model names must be unique; repeated: {', '.join(dupes)} (set `name`)")
        # variant deployments are named from each key with characters other than letters, digits, - _ .
        # replaced by _: `m@small` and a model named `m_small` would share them
        named: dict[str, list[str]] = {}
        for m in self.models:
            for key, _ in m.per_device_type():
                named.setdefault(replica_deployment_name(key, 1), []).append(key)
        clash = [keys for keys in named.values() if len(keys) > 1]
        if clash:
            raise ValueError("; ".join(f"{' and '.join(repr(k) for k in keys)} would name the same variant deployments"
                                       for keys in clash) + " (a model with device_types is keyed <name>@<type>); "
                             "rename one (set `name`)")
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


def open_access_warning(args: AppArgs) -> Optional[str]:
    """The warning for a key that was asked for but is empty (`api_key: ""`, perhaps as the fallback
    of an unset `api_key_env`): the server then accepts every request, while the config looks like it
    has a key. None when a key is set, or when none was asked for (open on purpose)."""
    if args.resolved_api_key() != "":
        return None
    return ("api_key is empty, so the server accepts requests without an API key: put the key in an environment "
            "variable and set api_key_env to its name (e.g. api_key_env: PLATEAU_API_KEY), or remove api_key to "
            "serve without a key on purpose")


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
            lines.append((loc, _shown_value(loc, err)))
        msgs.append(err["msg"])
    out = [lines[0]]
    for loc, value in lines[1:]:
        fix = _field_hint(loc)
        out.append(f"  {_dotted(loc)}{'' if value is None else f' = {value}'}: "
                   f"{' or '.join(dict.fromkeys(seen[loc]))}" + (f" (expected: {fix})" if fix else ""))
    return "\n".join(out)


def _shown_value(loc, err) -> Optional[str]:
    """How an error shows the value it is about: redacted for `SECRET_FIELDS`, and not at all for an
    unknown field (its name and the closest known one are the fix; it may be a misspelled api_key)."""
    if err.get("type") == "extra_forbidden":
        return None
    if any(part in SECRET_FIELDS for part in loc):
        return repr(REDACTED)
    return repr(err.get("input"))


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
