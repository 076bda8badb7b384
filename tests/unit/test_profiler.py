"""The adaptive sweep against a fake engine with a known step-time curve."""

import pytest

from advisor.plateau import PlateauRules
from advisor.profiler import SweepConfig, WorkloadShape, sweep
from tests.factories import FakeRunner, make_profile, step_ms


def test_sweep_doubles_to_the_plateau_then_bisects_within_the_point_budget():
    runner = FakeRunner(max_batch=64)
    pts = sweep(runner, WorkloadShape(), PlateauRules(tpot_growth_limit=50), SweepConfig(max_points=8))
    batches = [p.batch for p in pts]
    # 1..64 by doubling; the knee (90% of the sustained peak) is 64, so the bisection measures 48.
    assert batches == [1, 2, 4, 8, 16, 32, 48, 64]
    assert len(set(runner.calls)) == len(pts)
    # decode tokens/s is exactly B * 1000 / step for the fake engine
    p8 = next(p for p in pts if p.batch == 8)
    assert p8.tokens_per_s == pytest.approx(8 * 1000 / step_ms(8, WorkloadShape().context_tokens))


def test_sweep_stops_where_the_latency_slo_breaks():
    runner = FakeRunner()
    pts = sweep(runner, WorkloadShape(), PlateauRules(tpot_p99_slo_ms=30.0), SweepConfig())
    assert max(p.batch for p in pts) <= 32  # step(32) = 20 + 9.6 + 10.2 = 39.8 ms > 30 ms stops doubling


def test_small_batches_repeat_until_enough_tokens():
    runner = FakeRunner()
    sweep(runner, WorkloadShape(output_tokens=64), PlateauRules(tpot_growth_limit=50),
          SweepConfig(min_tokens_per_point=256, max_points=3))
    assert runner.calls[:4] == [1, 1, 1, 1]  # 4 x 64 tokens


def test_profile_fits_the_curve_and_predicts_other_contexts():
    profile = make_profile(FakeRunner())
    m = profile.step_model
    assert m.mape < 1.0
    assert len(profile.fit_points) == 2 and profile.fit_points[0].context_tokens > profile.points[0].context_tokens
    truth = 64 * 1000 / step_ms(64, 2000)
    assert m.tokens_per_s(64, 2000) == pytest.approx(truth, rel=0.02)
    assert profile.knee.b_star in {p.batch for p in profile.points}


def test_decode_window_excludes_prefill_and_the_tail():
    from deployments.profiling import summarize

    # Two requests: A's first token at 1.0 s, B's at 2.0 s (long prefill); A ends at 4.0 s, B at 5.0 s.
    # 10 tokens per second each while both decode: the window [2.0, 4.0] holds 2 x 20 tokens.
    def stamps(first, last):
        n = int((last - first) * 10)
        return [(first + i / 10, 1) for i in range(n + 1)]

    m = summarize(2, 5.0, [(0.0, stamps(1.0, 4.0)), (0.0, stamps(2.0, 5.0))], kv_peak=0.1)
    assert m.decode_window_s == pytest.approx(2.0)
    assert m.decode_window_tokens == 40
    assert m.decode_tokens_per_s == pytest.approx(20.0)
    assert m.ttft_ms == [pytest.approx(1000.0), pytest.approx(2000.0)]
