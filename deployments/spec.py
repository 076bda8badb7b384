"""The replica spec: everything one vLLM replica needs to start, as plain data.

`deployments/layout.py` builds these from the user's config and the Advisor's plan;
`deployments/engine.py` is the only place that turns one into vLLM engine arguments and Serve
deployment options.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

DeviceKind = Literal["cuda", "cpu"]
EngineKwargValue = Union[bool, int, float, str, None, list[Union[bool, int, float, str]]]


class ReplicaResources(BaseModel):
    """What Ray reserves for one replica (logical resources; Ray does not isolate memory)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    num_gpus: float = Field(0.0, ge=0.0, le=1.0, description="GPU share: 1/N when N replicas share a GPU.")
    num_cpus: float = Field(1.0, ge=0.0, description="CPU cores Ray reserves for the replica.")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type the replica must run on.")


class ReplicaSpec(BaseModel):
    """One vLLM replica: which model, how much KV memory, how many concurrent sequences."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    served_name: str = Field(description="Model name clients send in the `model` field.")
    model_path: str = Field(description="Local folder with config.json, weights and tokenizer.")
    device_kind: DeviceKind = Field(description="Where vLLM runs the model: a CUDA GPU or the CPU.")
    replicas_per_device: int = Field(ge=1, description="N: replicas sharing one device.")
    resources: ReplicaResources = Field(description="Ray resources reserved per replica.")
    max_num_seqs: int = Field(ge=1, description="Most sequences the engine batches at once (B).")
    kv_cache_bytes: Optional[int] = Field(
        None, gt=0, description="KV pool size in bytes; None lets vLLM size it from its memory share."
    )
    device_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="Share of the whole device's memory ALL replicas on it may use."
    )
    max_model_len: Optional[int] = Field(None, ge=16, description="Context length; None = model default.")
    dtype: str = Field("auto", description="Weights/activations dtype passed to vLLM.")
    enforce_eager: bool = Field(False, description="Skip torch.compile / CUDA graphs (faster start).")
    engine_kwargs: dict[str, EngineKwargValue] = Field(
        default_factory=dict, description="Extra vLLM EngineArgs, checked against vLLM's own fields."
    )
    server_kwargs: dict[str, EngineKwargValue] = Field(
        default_factory=dict, description="vLLM OpenAI server options (FrontendArgs), checked against vLLM's own fields."
    )
    mps_thread_percentage: Optional[int] = Field(
        None, ge=1, le=100, description="Under MPS: the share of the GPU's SMs this engine may use "
                                        "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE); None: no cap.")
    shape_window_s: float = Field(60.0, gt=0, description="Seconds of finished requests the replica reports as the "
                                  "live workload shape (the app sets the policy's `shape_window_s`).")
    stall_timeout_s: float = Field(60.0, gt=0, description="Seconds without an engine step, while requests wait for "
                                   "it, after which the engine counts as stalled (at least 10x the longest step "
                                   "seen: `replica_stats.stall_limit`).")
