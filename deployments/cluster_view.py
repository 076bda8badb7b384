"""The slice of the Ray cluster the application builder needs: GPUs, CPUs per node, and where the
installed vLLM runs models (CUDA or CPU)."""

from __future__ import annotations

import ray
from pydantic import BaseModel, ConfigDict, Field

from deployments.spec import DeviceKind


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


def uses_gpus(device: str, cluster: ClusterView) -> bool:
    return device == "cuda" or (device == "auto" and cluster.gpus > 0)
