"""`plateau profile` / `plateau plan` on a real GPU, as a user runs them: the profile is taken in
the serving mode (CUDA graphs), keyed by it, carries a DRAM bandwidth reading from NVML GPM on
Hopper and newer, and a measured non-KV overhead. Runs only where CUDA vLLM and a GPU are present."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.engine_build import cuda_engine_missing

MISSING = cuda_engine_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


def _plateau(*args: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def _hopper_or_newer() -> bool:
    from advisor.nvml import cuda_device

    device = cuda_device("cuda")
    major, _ = device.nvml.nvmlDeviceGetCudaComputeCapability(device.handle)
    return major >= 9


def test_profile_in_cuda_graph_mode_reports_bandwidth_and_overhead(tmp_path, smollm2_path):
    env = dict(os.environ)
    common = [str(smollm2_path), "--device", "cuda:0", "--max-batch", "64", "--max-points", "5",
              "--prompt-tokens", "128", "--output-tokens", "64", "--store", str(tmp_path / "profiles")]
    profile = _plateau("profile", *common, env=env)
    assert profile["mode"] == "graphs" and profile["store_key"]["mode"] == "graphs"
    assert profile["device_name"].startswith("cuda:")
    assert profile["overhead_bytes"] > 0
    assert all(p["gpu_memory_used_bytes"] for p in profile["points"])
    if _hopper_or_newer():
        assert all(p["dram_bw_util"] is not None and p["dram_bw_util"] > 0 for p in profile["points"]), \
            "no DRAM bandwidth reading from NVML GPM on a Hopper-class GPU"
    else:
        pytest.skip("pre-Hopper GPU: NVML GPM (DRAM bandwidth) is not available; profile checked without it")


def test_plan_validates_packed_replicas_in_the_same_mode(tmp_path, smollm2_path):
    env = dict(os.environ)
    plan = _plateau("plan", str(smollm2_path), "--device", "cuda", "--max-batch", "64", "--max-points", "5",
                    "--store", str(tmp_path / "profiles"), "--validate", env=env)
    assert plan["replicas_per_device"] >= 1
    assert plan["validation"]["aggregate_tokens_per_s"] > 0
