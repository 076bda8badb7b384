"""Plans that follow reality: live replica readings against the profile's step model, and the refit.

A replica decoding batch B at context ctx is predicted to make `T(B, ctx) * share(N)` tokens/s:
the step model's whole-device rate times the share a replica of packing variant N gets (the
planner's own prediction, `share_factors`). When the replicas sustain less than
`min_fraction` of that, or the step time the model predicts misses the live step times by more
than `max_step_error`, the step model is refitted from the live samples and the profile's curve
and knee are recomputed from it (`refit_profile`), so the planner and the re-pack policy plan with
what the device really does. Pure functions over frozen models; `now` comes in.
"""

from __future__ import annotations

import math
import statistics
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from advisor.plateau import StepModel, find_knee
from advisor.planner import DeviceSpec, PlannerConfig, evaluate_shape
from advisor.profiler import Profile


class RefitConfig(BaseModel):
    """When live readings overrule the profile."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    min_fraction: float = Field(0.75, gt=0, le=1, description="Refit when replicas sustain under this share of "
                                                              "their predicted tokens/s (median over samples).")
    max_step_error: float = Field(0.25, gt=0, description="Refit when the step model misses live step times by "
                                                          "more than this (mean relative error).")
    min_samples: int = Field(6, ge=2, description="Live samples needed before comparing.")
    min_batch: float = Field(1.0, gt=0, description="Ignore replicas decoding fewer sequences than this.")
    sample_every_s: float = Field(5.0, ge=0, description="Keep at most one sample per replica per this interval.")
    window_s: float = Field(180.0, gt=0, description="Samples older than this are dropped.")
    max_samples: int = Field(200, ge=2, description="Samples kept per model, newest.")
    min_batch_levels: int = Field(3, ge=2, description="Distinct batch levels (powers of two) needed to refit "
                                                       "a and b; fewer: the whole curve is scaled.")
    cooldown_s: float = Field(300.0, ge=0, description="No new refit this soon after the last one.")


class LiveSample(BaseModel):
    """One replica's live reading."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    batch: float = Field(ge=0, description="Sequences the replica decodes (running requests).")
    context_tokens: float = Field(ge=0, description="Mean prompt + generated tokens of its requests.")
    tokens_per_s: float = Field(ge=0, description="Tokens/s the replica generated.")
    replicas_per_device: int = Field(1, ge=1, description="N of the replica's packing variant.")
    at: float = Field(0.0, description="Unix time of the reading.")


class FitCheck(BaseModel):
    """Live readings against the prediction, and the verdict."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    samples: int
    batch: float = Field(description="Mean live batch per replica.")
    context_tokens: float = Field(description="Mean live context.")
    live_tokens_per_s: float = Field(description="Mean live tokens/s per replica.")
    predicted_tokens_per_s: float = Field(description="Mean predicted tokens/s per replica at the live batches.")
    sustained_fraction: float = Field(description="Median of live / predicted over the samples.")
    step_error: float = Field(description="Mean |predicted - live| / live step time.")
    verdict: Literal["ok", "too_few_samples", "under_prediction", "fit_miss"]
    reason: str


def share_factors(profile: Profile, device: DeviceSpec, planner: PlannerConfig = PlannerConfig()) -> dict[int, float]:
    """N -> the share of the whole-device rate one replica of N is predicted to make (the planner's own)."""
    ev = evaluate_shape(profile, device, profile.shape, planner)
    one = ev.option(1).predicted_aggregate_tokens_per_s
    return {o.replicas_per_device: o.predicted_aggregate_tokens_per_s / (o.replicas_per_device * one)
            for o in ev.options}


def usable(samples: list[LiveSample], cfg: RefitConfig) -> list[LiveSample]:
    return [s for s in samples if s.batch >= cfg.min_batch and s.tokens_per_s > 0]


def _device_steps(samples: list[LiveSample], shares: dict[int, float]) -> np.ndarray:
    """Live step times (ms) as the whole device would show them (undoing the replica's share)."""
    return np.array([1000.0 * s.batch * shares.get(s.replicas_per_device, 1.0) / s.tokens_per_s for s in samples])


def check_fit(model: StepModel, samples: list[LiveSample], shares: dict[int, float], cfg: RefitConfig) -> FitCheck:
    """Compare live samples with the step model's prediction; the verdict says whether to refit."""
    live = usable(samples, cfg)
    if not live:
        return FitCheck(samples=0, batch=0, context_tokens=0, live_tokens_per_s=0, predicted_tokens_per_s=0,
                        sustained_fraction=1.0, step_error=0.0, verdict="too_few_samples",
                        reason=f"no replica decoded >= {cfg.min_batch:g} sequences yet")
    predicted = [model.tokens_per_s(s.batch, s.context_tokens) * shares.get(s.replicas_per_device, 1.0) for s in live]
    fraction = statistics.median(s.tokens_per_s / p for s, p in zip(live, predicted))
    steps = _device_steps(live, shares)
    pred_steps = np.array([model.step_ms(s.batch, s.context_tokens) for s in live])
    error = float(np.mean(np.abs(pred_steps - steps) / steps))
    batch = statistics.fmean(s.batch for s in live)
    ctx = statistics.fmean(s.context_tokens for s in live)
    live_t = statistics.fmean(s.tokens_per_s for s in live)
    pred_t = statistics.fmean(predicted)
    numbers = (f"replicas sustain {fraction:.0%} of the predicted tokens/s ({live_t:.1f} vs {pred_t:.1f} per replica "
               f"at batch {batch:.1f}, context {ctx:.0f}); step-time fit error {error:.0%} over {len(live)} samples")
    if len(live) < cfg.min_samples:
        verdict, why = "too_few_samples", f"{numbers} (need {cfg.min_samples} samples)"
    elif fraction < cfg.min_fraction:
        verdict, why = "under_prediction", f"{numbers}: under the {cfg.min_fraction:.0%} limit"
    elif error > cfg.max_step_error:
        verdict, why = "fit_miss", f"{numbers}: over the {cfg.max_step_error:.0%} limit"
    else:
        verdict, why = "ok", numbers
    return FitCheck(samples=len(live), batch=batch, context_tokens=ctx, live_tokens_per_s=live_t,
                    predicted_tokens_per_s=pred_t, sustained_fraction=fraction, step_error=error, verdict=verdict,
                    reason=why)


def refit_step_model(model: StepModel, samples: list[LiveSample], shares: dict[int, float],
                     cfg: RefitConfig) -> StepModel:
    """A step model for the live samples: with enough batch levels, a and b are fitted by least squares
    (the per-KV-token cost c, which live traffic rarely separates, is the profile's, scaled); else the
    whole profiled curve is scaled by the median live/predicted step-time ratio."""
    live = usable(samples, cfg)
    if not live:
        raise ValueError("refit needs live samples with a running batch")
    steps = _device_steps(live, shares)
    B = np.array([s.batch for s in live])
    ctx = np.array([s.context_tokens for s in live])
    pred = np.array([model.step_ms(s.batch, s.context_tokens) for s in live])
    r = float(np.median(steps / pred))
    a, b, c = model.a_ms * r, model.b_ms * r, model.c_ms * r
    levels = {round(math.log2(max(1.0, x))) for x in B}
    if len(levels) >= cfg.min_batch_levels:
        X = np.column_stack([np.ones_like(B), B])
        coef, *_ = np.linalg.lstsq(X, steps - c * B * ctx, rcond=None)
        if coef[0] >= 0 and coef[1] + c * float(ctx.mean()) > 0:
            a, b = float(coef[0]), float(coef[1])
    fitted = a + b * B + c * B * ctx
    mape = float(np.mean(np.abs(fitted - steps) / steps) * 100.0)
    return StepModel(a_ms=a, b_ms=b, c_ms=c, mape=mape, points=len(live))


def refit_profile(profile: Profile, model: StepModel) -> Profile:
    """The profile as the live step model says the device behaves: each measured point's throughput and
    TPOT scaled by how far `model` moves the prediction at that point, the knee found again."""
    old = profile.step_model

    def redo(p):  # by the ratio of the two models at the point, so a share point keeps its share
        k = model.tokens_per_s(p.batch, p.context_tokens) / old.tokens_per_s(p.batch, p.context_tokens)
        return p.model_copy(update={"tokens_per_s": p.tokens_per_s * k, "tpot_p50_ms": p.tpot_p50_ms / k,
                                    "tpot_p99_ms": p.tpot_p99_ms / k})
    points = [redo(p) for p in profile.points]
    knee = find_knee(points, profile.rules)
    knee = knee.model_copy(update={"reason": f"refit from live samples: {knee.reason}"})
    shares = [s.model_copy(update={"point": redo(s.point)}) for s in profile.share_points]
    return profile.model_copy(update={"points": points, "fit_points": [redo(p) for p in profile.fit_points],
                                      "knee": knee, "step_model": model, "share_points": shares})


def describe_change(old: StepModel, new: StepModel) -> str:
    return (f"t(B,ctx) = {old.a_ms:.2f}+{old.b_ms:.4f}B+{old.c_ms:.6f}B*ctx ms -> "
            f"{new.a_ms:.2f}+{new.b_ms:.4f}B+{new.c_ms:.6f}B*ctx ms (fit error on live samples {new.mape:.0f}%)")


def best_variant(profile: Profile, device: DeviceSpec, planner: PlannerConfig,
                 variants: Optional[list[int]] = None) -> tuple[int, int]:
    """(N, B*) the planner would choose for the profile's own shape among `variants` (all N if None)."""
    ev = evaluate_shape(profile, device, profile.shape, planner)
    options = [o for o in ev.options if o.fits and (variants is None or o.replicas_per_device in variants)]
    if not options:
        return 0, ev.b_star
    best = options[0]
    for o in options[1:]:
        if o.predicted_aggregate_tokens_per_s > best.predicted_aggregate_tokens_per_s * (1 + planner.min_gain):
            best = o
    return best.replicas_per_device, ev.b_star
