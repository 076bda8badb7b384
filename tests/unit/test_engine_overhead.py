"""The engine's non-KV overhead a profile records: the peak the engine reached while it was measured,
not only what it held right after start (in CUDA-graph mode vLLM empties its allocator cache around
graph capture, and the prefill activations come back on the first long prompt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from advisor.memory import ArchitectureFacts, MemoryModel
from advisor.plateau import ProfilePoint
from advisor.profiler import DeviceSample, WorkloadShape
from deployments import profiling
from deployments.profiling import AdvisorRequest, engine_peak_bytes, non_kv_overhead
from tests.factories import FakeRunner

GIB = 1 << 30


def _point(used: int | None) -> ProfilePoint:
    return ProfilePoint(batch=1, context_tokens=100.0, tokens_per_s=10.0, tpot_p50_ms=1.0, tpot_p99_ms=1.0,
                        ttft_ms=1.0, kv_usage=0.1, gpu_memory_used_bytes=used)


def test_peak_is_the_largest_point_reading_above_what_was_used_before_the_engine():
    before = 2 * GIB
    points = [_point(before + 37 * GIB), _point(before + 40 * GIB), _point(before + 38 * GIB)]
    assert engine_peak_bytes(37 * GIB, before, points) == 40 * GIB


def test_peak_keeps_the_after_start_reading_when_points_saw_less_or_nothing():
    assert engine_peak_bytes(37 * GIB, 2 * GIB, [_point(30 * GIB)]) == 37 * GIB
    # CPU profiles and profiles without NVML carry no device memory on their points
    assert engine_peak_bytes(5 * GIB, 0, [_point(None), _point(None)]) == 5 * GIB
    assert engine_peak_bytes(5 * GIB, 0, []) == 5 * GIB
    # a point read below the memory used before the engine started counts as nothing, not negative
    assert engine_peak_bytes(0, 10 * GIB, [_point(4 * GIB)]) == 0


# ---- profile_model's measurement records the peak --------------------------------------------
def _memory() -> MemoryModel:
    facts = ArchitectureFacts(model_type="llama", num_layers=32, hidden_size=4096, num_attention_heads=32,
                              num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                              max_position_embeddings=8192, tie_word_embeddings=False, checkpoint_dtype="bfloat16")
    return MemoryModel(architecture=facts, dtype="bfloat16", device_kind="cuda", parameters=8 * GIB,
                       weight_bytes=16 * GIB, kv_bytes_per_token=131072, kv_block_tokens=16, max_model_len=8192)


USED_BEFORE = 2 * GIB
KV_BLOCKS = 10_000  # x 16 tokens x 128 KiB = 20 GiB minus a little
AFTER_START_OVERHEAD = 1 * GIB
PEAK_OVERHEAD = 3 * GIB  # the prefill activations of the long fit prompts, freed before capture


class _FakeEngineRunner(FakeRunner):
    """`VllmBatchRunner`'s surface: an engine holding weights, KV and 1 GiB after start."""

    def __init__(self, spec, seed=0, cores=None, yield_cpu=False):
        super().__init__(max_batch=spec.max_num_seqs)
        self.cores = cores
        self.num_kv_blocks = KV_BLOCKS
        self.kv_block_tokens = 16
        self.used_before_bytes = USED_BEFORE

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def engine_memory_bytes(self) -> int:
        return 16 * GIB + KV_BLOCKS * 16 * 131072 + AFTER_START_OVERHEAD


class _FakeSampler:
    """Device memory used while a point ran: the activation peak appears on the long fit prompts."""

    def __init__(self):
        self.calls = 0

    def start(self):
        self.calls += 1

    def stop(self) -> DeviceSample:
        kv = KV_BLOCKS * 16 * 131072
        extra = PEAK_OVERHEAD if self.calls > 4 else AFTER_START_OVERHEAD
        return DeviceSample(memory_used_bytes=USED_BEFORE + 16 * GIB + kv + extra)


def test_measured_profile_records_the_activation_peak_seen_after_start(monkeypatch):
    monkeypatch.setattr(profiling, "VllmBatchRunner", _FakeEngineRunner)
    monkeypatch.setattr(profiling, "_memory", lambda req: (Path("/m"), _memory()))
    monkeypatch.setattr(profiling, "_kv_cap", lambda req, memory: 24 * GIB)
    monkeypatch.setattr(profiling, "gpu_sampler", lambda device: _FakeSampler())
    monkeypatch.setattr(profiling, "load_probe", lambda req, cores=None: None)
    monkeypatch.setattr(profiling, "device_name", lambda req: "cuda:H100")
    monkeypatch.setattr(profiling, "vllm_version", lambda: "0.0")
    req = AdvisorRequest(model="m", device="cuda", shape=WorkloadShape(prompt_tokens=128, output_tokens=64),
                         max_batch=16, max_points=4, tpot_slo_ms=None)

    profile = profiling._measure_profile(req, lambda line: None, None)

    kv = KV_BLOCKS * 16 * 131072
    assert non_kv_overhead(_FakeEngineRunner.engine_memory_bytes(None), 16 * GIB, kv) == AFTER_START_OVERHEAD
    assert profile.overhead_bytes == PEAK_OVERHEAD
    assert profile.mode == "graphs"


def test_stored_profiles_without_point_memory_still_load():
    point = ProfilePoint.model_validate({"batch": 1, "context_tokens": 1.0, "tokens_per_s": 1.0, "tpot_p50_ms": 1.0,
                                         "tpot_p99_ms": 1.0, "ttft_ms": 1.0, "kv_usage": 0.0})
    assert point.gpu_memory_used_bytes is None
    assert engine_peak_bytes(GIB, 0, [point]) == GIB


@pytest.mark.parametrize("used", [None, 0])
def test_peak_ignores_points_without_a_reading(used):
    assert engine_peak_bytes(3 * GIB, GIB, [_point(used)]) == 3 * GIB
