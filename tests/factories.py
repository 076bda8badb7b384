"""Factories with defaults for the data models the tests build."""

from __future__ import annotations

from deployments.spec import ReplicaResources, ReplicaSpec


def make_spec(**overrides) -> ReplicaSpec:
    fields = dict(
        served_name="smollm2-135m",
        model_path="/models/smollm2",
        device_kind="cpu",
        replicas_per_device=2,
        resources=ReplicaResources(num_gpus=0.0, num_cpus=1.0),
        max_num_seqs=32,
        kv_cache_bytes=256 << 20,
        max_model_len=2048,
        dtype="float32",
        enforce_eager=True,
    )
    fields.update(overrides)
    return ReplicaSpec(**fields)
