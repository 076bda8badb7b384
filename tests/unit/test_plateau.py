"""Knee detection and the step-time fit on synthetic curves with noise."""

import random

import pytest

from advisor.plateau import PlateauRules, ProfilePoint, find_knee, fit_step_model, plateau_batches

TRUE = dict(a=20.0, b=0.3, c=0.002)  # ms: weights read, per-seq work, per-seq per-ctx-token KV read


def point(batch, ctx=300.0, noise=0.0, rng=None):
    step = TRUE["a"] + TRUE["b"] * batch + TRUE["c"] * batch * ctx
    if noise:
        step *= 1 + rng.uniform(-noise, noise)
    tps = 1000.0 * batch / step
    return ProfilePoint(batch=batch, context_tokens=ctx, tokens_per_s=tps, tpot_p50_ms=step, tpot_p99_ms=step * 1.2,
                        ttft_ms=step * 2, kv_usage=min(1.0, batch / 256))


def test_fit_recovers_the_step_model_from_two_context_lengths():
    rng = random.Random(0)
    pts = [point(b, 300, 0.03, rng) for b in (1, 2, 4, 8, 16, 32, 64, 128)] + [point(b, 1500, 0.03, rng) for b in (16, 64)]
    m = fit_step_model(pts)
    assert m.a_ms == pytest.approx(TRUE["a"], rel=0.1)
    assert m.b_ms + m.c_ms * 300 == pytest.approx(TRUE["b"] + TRUE["c"] * 300, rel=0.1)
    # Predict throughput at a context length never measured at that batch.
    truth = point(32, 3000).tokens_per_s
    assert m.tokens_per_s(32, 3000) == pytest.approx(truth, rel=0.15)
    assert m.mape < 5


def test_b_star_moves_down_when_context_grows():
    m = fit_step_model([point(b, 300) for b in (1, 8, 64)] + [point(b, 2000) for b in (8, 64)])
    assert m.b_star(2000, 0.9) < m.b_star(300, 0.9)
    # closed form: f/(1-f) * a / (b + c*ctx)
    assert m.b_star(300, 0.9) == pytest.approx(9 * 20 / (0.3 + 0.6), rel=0.02)


def test_knee_is_the_smallest_batch_near_peak_and_ignores_one_lucky_point():
    pts = [point(b) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    lucky = pts[3].model_copy(update={"tokens_per_s": pts[-1].tokens_per_s * 1.5})  # batch 8 spike
    rules = PlateauRules(plateau_fraction=0.8, tpot_growth_limit=100)
    clean = find_knee(pts, rules)
    noisy = find_knee(pts[:3] + [lucky] + pts[4:], rules)
    assert clean.limited_by == "throughput"
    assert clean.b_star == 64  # 825 tok/s >= 0.8 x 1024 sustained (batch 256: 1024 tok/s)
    assert noisy.b_star == clean.b_star and noisy.peak_tokens_per_s == pytest.approx(clean.peak_tokens_per_s)


def test_latency_rules_lower_b_star_and_impossible_slo_is_an_error():
    pts = [point(b) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    free = find_knee(pts, PlateauRules())
    tight = find_knee(pts, PlateauRules(tpot_p99_slo_ms=40.0))
    assert tight.b_star < free.b_star and tight.limited_by == "tpot_slo"
    assert all(p.tpot_p99_ms <= 40 for p in pts if p.batch <= tight.b_star)
    with pytest.raises(ValueError, match="no batch size meets"):
        find_knee(pts, PlateauRules(tpot_p99_slo_ms=5.0))


# ---- the batches still on the plateau past B* ----------------------------------------

def measured(batch, tps, tpot):
    return ProfilePoint(batch=batch, context_tokens=160, tokens_per_s=tps, tpot_p50_ms=tpot, tpot_p99_ms=tpot * 1.2,
                        ttft_ms=100, kv_usage=0.1)


# A profile of SmolLM2 on a 2-core VM: flat from 24 to 64, batch 64 breaks the x5 TPOT rule.
EVENING = [measured(1, 20.0, 49.9), measured(2, 38.9, 51.7), measured(4, 76.8, 51.8), measured(8, 133.9, 59.7),
           measured(16, 166.5, 95.4), measured(24, 239.0, 116.1), measured(32, 247.0, 130.1),
           measured(64, 249.1, 332.9)]


def test_plateau_batches_run_from_b_star_to_the_last_batch_within_the_latency_rules():
    assert find_knee(EVENING, PlateauRules()).b_star == 24
    assert plateau_batches(EVENING, PlateauRules()) == [24, 32]
    # a looser latency rule lets batch 64 in: it is still on the plateau
    assert plateau_batches(EVENING, PlateauRules(tpot_growth_limit=10)) == [24, 32, 64]


def test_plateau_batches_stop_at_the_first_batch_that_falls_off_the_plateau():
    dip = EVENING[:6] + [measured(32, 250.0, 130.1), measured(48, 210.0, 180.0), measured(64, 250.0, 332.9)]
    assert plateau_batches(dip, PlateauRules(tpot_growth_limit=10)) == [24, 32]
