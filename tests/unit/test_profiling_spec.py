"""The profiling engine's spec: its long context comes from the sweep config, its KV from the one sizing rule."""

from advisor.memory import memory_model
from advisor.planner import kv_pool_bytes
from advisor.profiler import SweepConfig, WorkloadShape
from deployments.profiling import PROFILING_LEN_MARGIN_TOKENS, SWEEP_MEMORY, profiling_spec
from tests.unit.test_memory import SMOLLM2, folder


def test_the_profiling_engine_is_sized_for_the_fit_points_of_the_sweep_config(tmp_path):
    memory = memory_model(folder(tmp_path, SMOLLM2), dtype="float32", device_kind="cpu")
    shape = WorkloadShape(prompt_tokens=100, output_tokens=20)
    for factor in (2.0, 4.0):
        spec = profiling_spec("/m", memory, shape, 8, "cpu", 4 << 30, sweep=SweepConfig(fit_context_factor=factor))
        longest = int(100 * factor) + 20
        assert spec.max_model_len == longest + PROFILING_LEN_MARGIN_TOKENS
        assert spec.kv_cache_bytes == kv_pool_bytes(memory.kv_bytes_per_token, 128, 8, longest,
                                                     SWEEP_MEMORY.kv_slack - 1.0)
