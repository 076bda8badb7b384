"""Plans that follow reality: live samples against the step model, the refit, and the policy's decision."""

import pytest

from advisor.planner import DeviceSpec
from advisor.refit import LiveSample, RefitConfig, check_fit, refit_profile, refit_step_model, share_factors
from cluster.policy import (ModelPolicyInput, ModelView, PolicyConfig, PolicyContext, PolicyState, VariantObservation,
                            VariantSpec, decide)
from cluster.refit import RefitState, follow_reality
from tests.factories import make_profile, step_ms

GiB = 1 << 30
PROFILE = make_profile()  # a fake engine with t(B, ctx) = 20 + 0.3 B + 0.002 B ctx ms
DEVICE = DeviceSpec(kind="cuda", name="g", memory_bytes=8 * GiB)
SHARES = share_factors(PROFILE, DEVICE)
CTX = 160.0
CFG = RefitConfig(min_samples=4, sample_every_s=0)


def samples(batches, n=2, **truth):
    """Replicas of variant N whose device really runs t = step_ms(B, ctx, **truth)."""
    return [LiveSample(batch=b, context_tokens=CTX, replicas_per_device=n,
                       tokens_per_s=SHARES[n] * 1000 * b / step_ms(b, CTX, **truth)) for b in batches]


def test_live_samples_that_follow_the_profile_pass():
    check = check_fit(PROFILE.step_model, samples([4, 8, 16, 32]), SHARES, CFG)
    assert check.verdict == "ok" and check.sustained_fraction == pytest.approx(1.0, abs=0.02)
    assert check.step_error < 0.02 and check.samples == 4


def test_too_few_or_idle_samples_decide_nothing():
    assert check_fit(PROFILE.step_model, samples([8, 8]), SHARES, CFG).verdict == "too_few_samples"
    idle = [s.model_copy(update={"batch": 0.0}) for s in samples([4, 8, 16, 32])]
    assert check_fit(PROFILE.step_model, idle, SHARES, CFG).verdict == "too_few_samples"


def test_replicas_slower_than_predicted_are_refitted_to_what_they_do():
    slow = samples([8, 8, 8, 8], a=40, b=0.6, c=0.004)  # every step twice as long
    check = check_fit(PROFILE.step_model, slow, SHARES, CFG)
    assert check.verdict == "under_prediction" and check.sustained_fraction == pytest.approx(0.5, abs=0.02)
    assert "50% of the predicted" in check.reason
    model = refit_step_model(PROFILE.step_model, slow, SHARES, CFG)  # one batch level: the curve is scaled
    assert model.step_ms(8, CTX) == pytest.approx(step_ms(8, CTX, a=40, b=0.6, c=0.004), rel=0.01)
    assert check_fit(model, slow, SHARES, CFG).verdict == "ok"


def test_a_differently_shaped_curve_is_refitted_and_moves_the_knee():
    # The device pays far less per step than profiled (a = 5, not 20): the plateau comes earlier.
    live = samples([2, 4, 8, 16, 32], a=5)
    check = check_fit(PROFILE.step_model, live, SHARES, CFG)
    assert check.verdict == "fit_miss" and check.step_error > 0.25
    model = refit_step_model(PROFILE.step_model, live, SHARES, CFG)
    for b in (2, 8, 32):
        assert model.step_ms(b, CTX) == pytest.approx(step_ms(b, CTX, a=5), rel=0.02)
    refitted = refit_profile(PROFILE, model)
    assert refitted.b_star < PROFILE.b_star and "refit from live samples" in refitted.knee.reason
    assert refitted.step_model == model and refitted.noise == PROFILE.noise


def test_follow_reality_refits_once_then_cools_down():
    cfg = RefitConfig(min_samples=4, sample_every_s=0, cooldown_s=100)
    st = RefitState()
    out = follow_reality(0.0, PROFILE, DEVICE, PROFILE_PLANNER, [1, 2], {2: samples([4, 8], a=5)}, st, cfg)
    assert out.refit_reason is None and out.profile is PROFILE and len(out.state.samples) == 2  # too few yet
    out = follow_reality(2.0, PROFILE, DEVICE, PROFILE_PLANNER, [1, 2], {2: samples([2, 16, 32], a=5)},
                         out.state, cfg)
    assert out.refit_reason is not None and "step model refit from live samples" in out.refit_reason
    assert out.state.refits == 1 and out.state.samples == [] and out.profile.b_star < PROFILE.b_star
    again = follow_reality(3.0, PROFILE, DEVICE, PROFILE_PLANNER, [1, 2], {2: samples([8] * 6, a=80)},
                           out.state, cfg)
    assert again.refit_reason is None and again.state.refits == 1  # cooldown
    assert again.profile == out.profile  # the refitted profile stays in use


PROFILE_PLANNER = ModelPolicyInput(model="x", min_replicas=1, max_replicas=1, variants=[
    VariantSpec(n=1, deployment="d", share=1, memory_bytes=GiB, max_num_seqs=8)]).planner


def test_the_policy_refits_from_replica_samples_and_reports_it():
    inp = ModelPolicyInput(model="alpha", min_replicas=1, max_replicas=2, profile=PROFILE, device=DEVICE, variants=[
        VariantSpec(n=2, deployment="LLM:alpha@n2", share=0.5, memory_bytes=2 * GiB, max_num_seqs=32)])
    cfg = PolicyConfig(refit=RefitConfig(min_samples=4, sample_every_s=0))
    st = PolicyState()
    decisions = []
    for t in range(3):
        o = VariantObservation(running=2, target=2, requests=16, tokens_per_s=100,
                               samples=samples([8, 8], a=40, b=0.6, c=0.004))
        out = decide(PolicyContext(now=float(t), models=[ModelView(input=inp, variants={2: o})], devices=[]), st, cfg)
        st = out.state
        decisions += out.new_decisions
    [d] = [d for d in decisions if d.action == "refit"]
    assert "50% of the predicted" in d.reason and "N=" in d.reason
    assert st.refits["alpha"].profile is not None and st.refits["alpha"].refits == 1
    live = out.live[0]
    assert live.refits == 1 and live.fit is not None


def test_observe_turns_per_replica_metrics_into_samples():
    from tests.unit.test_autoscale_shell import context
    from deployments.autoscale import observe

    # r1 decoded 8 sequences per 40 ms step; r2 ran too few decode-only steps to judge; r3 none
    metrics = {"tokens_per_s": {"r1": 100.0, "r2": 50.0, "r3": 0.0}, "running_requests": {"r1": 8.0, "r2": 30.0},
               "mean_context_tokens": {"r1": 170.0, "r2": 140.0},
               "decode_steps": {"r1": 120.0, "r2": 2.0, "r3": 0.0}, "decode_batch": {"r1": 8.0, "r2": 30.0, "r3": 0.0},
               "decode_step_ms": {"r1": 40.0, "r2": 90.0, "r3": 0.0}}
    o = observe(context("LLM:alpha@n2", None, running=3, metrics=metrics))
    assert [(s.batch, s.context_tokens, s.tokens_per_s) for s in o.samples] == [(8.0, 170.0, 200.0)]
    assert o.tokens_per_s == 150.0  # the load signal stays the generated tokens/s


def test_status_shows_live_vs_plan():
    from cluster.board import AppPlacement, AppStatus, render_status
    from cluster.packing import PackResult
    from cluster.policy import LiveModel, Route

    check = check_fit(PROFILE.step_model, samples([8, 8, 8, 8], a=40, b=0.6, c=0.004), SHARES, CFG)
    routes = {"a": [Route(n=2, deployment="LLM:a@n2", accepting=True, running=1, max_num_seqs=32)]}
    status = AppStatus(
        placement=AppPlacement(app="p", devices=[], packing=PackResult(placement={}, devices_used=0, lower_bound=0,
                                                                        unplaced=[]), routes=routes),
        routes=routes, live=[LiveModel(model="a", active_n=2, b_star=8, measured_tokens_per_s=30.0, kv_usage=0.1,
                                       replicas={2: 1}, fit=check, refits=1)])
    text = render_status("p", status, now=1.0)
    assert "live vs plan (1 refit(s)): under_prediction: replicas sustain 50% of the predicted tokens/s" in text


def test_samples_that_no_step_model_fits_refit_nothing():
    """Readings that contradict each other (the same batch at twice and half the profiled speed, as
    an instant batch against a trailing rate gives while load changes) must not move the plan."""
    noisy = samples([8, 8, 16, 16], a=5) + samples([8, 8, 16, 16], a=120, b=3)
    out = follow_reality(0.0, PROFILE, DEVICE, PROFILE_PLANNER, [1, 2], {2: noisy}, RefitState(), CFG)
    assert out.state.check.verdict in ("under_prediction", "fit_miss")
    assert out.refit_reason is None and out.profile is PROFILE and out.state.refits == 0
    assert "no refit" in out.state.check.reason and "disagree with each other" in out.state.check.reason
