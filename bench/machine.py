"""Describe the machine a benchmark ran on, and write its JSON result under bench/results/."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from deployments.profiling import cpu_model_name

    info = {
        "host": socket.gethostname(),
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "gpu": None,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        info["gpu"] = pynvml.nvmlDeviceGetName(handle)
    except Exception:
        pass
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    import ray

    info["ray"] = ray.__version__
    return info


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    body = {"benchmark": name, "utc": stamp, "machine": machine(), **payload}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path
