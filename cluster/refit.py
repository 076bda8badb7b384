"""The policy's side of plans that follow reality: gather live samples per model, judge, refit.

Each tick the replicas' readings (batch, context, tokens/s) are stamped and kept in a window;
`follow_reality` compares them with the profile in use (advisor/refit.py) and, when they
disagree past the limits and no refit happened within the cooldown, swaps in a profile refitted
from them, unless no step model fits the samples either (they disagree with each other). The
policy then plans (B*, best N, re-packs) with that profile, and the refit is one of its decisions. Pure: `now` comes in, the state goes out.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from advisor.planner import DeviceSpec, PlannerConfig
from advisor.profiler import Profile
from advisor.refit import (FitCheck, LiveSample, RefitConfig, best_variant, check_fit, describe_change,
                           refit_profile, refit_step_model, share_factors)


class RefitState(BaseModel):
    """One model's live samples and the refitted profile in use, if any."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    samples: list[LiveSample] = Field(default_factory=list, description="Recent live samples, oldest first.")
    last_sample_at: Optional[float] = Field(None, description="When samples were last taken.")
    profile: Optional[Profile] = Field(None, description="The refitted profile in use; None: the original.")
    last_refit_at: Optional[float] = None
    refits: int = Field(0, ge=0, description="Refits so far.")
    check: Optional[FitCheck] = Field(None, description="The last comparison of live samples with the prediction.")
    measured_at: Optional[float] = Field(None, description="When a measured profile replaced the predicted one "
                                                           "the model started on (`take_measured`).")


class RefitOutcome(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    state: RefitState
    profile: Optional[Profile] = Field(None, description="The profile to plan with this tick.")
    refit_reason: Optional[str] = Field(None, description="Set when this tick refitted: why, and what changed.")
    plan_from: Optional[tuple[int, int]] = Field(None, description="(N, B*) before the refit.")
    plan_to: Optional[tuple[int, int]] = Field(None, description="(N, B*) after the refit.")


def follow_reality(now: float, profile: Optional[Profile], device: Optional[DeviceSpec], planner: PlannerConfig,
                   variants: list[int], samples: dict[int, list[LiveSample]], state: RefitState,
                   cfg: RefitConfig) -> RefitOutcome:
    """Take this tick's samples (N -> per-replica readings), compare, and refit when reality disagrees."""
    if profile is None or device is None:
        return RefitOutcome(state=state, profile=profile)
    state = _ingest(now, samples, state, cfg)
    current = state.profile or profile
    shares = share_factors(current, device, planner)
    check = check_fit(current.step_model, state.samples, shares, cfg)
    state = state.model_copy(update={"check": check})
    cooling = state.last_refit_at is not None and now - state.last_refit_at < cfg.cooldown_s
    if check.verdict not in ("under_prediction", "fit_miss") or cooling:
        return RefitOutcome(state=state, profile=current)
    model = refit_step_model(current.step_model, state.samples, shares, cfg)
    if model.mape > 100.0 * cfg.max_step_error:
        # no step model fits them: the samples disagree with each other, and a curve fitted to them
        # would move the plan by noise
        why = (f"{check.reason}; no refit: the step model fitted to these samples still misses them by "
               f"{model.mape:.0f}% (over the {cfg.max_step_error:.0%} limit), so they disagree with each other")
        return RefitOutcome(state=state.model_copy(update={"check": check.model_copy(update={"reason": why})}),
                            profile=current)
    refitted = refit_profile(current, model)
    before = best_variant(current, device, planner, variants)
    after = best_variant(refitted, device, planner, variants)
    change = ("the plan changes: the policy re-packs when the live shape agrees" if after != before
              else "the plan is unchanged")
    reason = (f"{check.reason}; step model refit from live samples: {describe_change(current.step_model, model)}; "
              f"plan for the profiled shape N={before[0]} B*={before[1]} -> N={after[0]} B*={after[1]}: {change}")
    state = state.model_copy(update={"profile": refitted, "samples": [], "last_refit_at": now,
                                     "refits": state.refits + 1})
    return RefitOutcome(state=state, profile=refitted, refit_reason=reason, plan_from=before, plan_to=after)


def _ingest(now: float, samples: dict[int, list[LiveSample]], state: RefitState, cfg: RefitConfig) -> RefitState:
    kept = [s for s in state.samples if now - s.at <= cfg.window_s]
    due = state.last_sample_at is None or now - state.last_sample_at >= cfg.sample_every_s
    fresh = [s.model_copy(update={"at": now, "replicas_per_device": n})
             for n, readings in sorted(samples.items()) for s in readings if s.batch >= cfg.min_batch]
    if due and fresh:
        kept = (kept + fresh)[-cfg.max_samples:]
        return state.model_copy(update={"samples": kept, "last_sample_at": now})
    return state.model_copy(update={"samples": kept})


def take_measured(now: float, profile: Profile, measured: Profile, device: Optional[DeviceSpec],
                  planner: PlannerConfig, variants: list[int], state: RefitState) -> RefitOutcome:
    """A model that started on a predicted profile plans with its measured one from now on: the
    measured profile replaces the prediction (and any refit of it); the live samples, compared with
    the prediction so far, start over against it. Measured knees admit the plateau past B*."""
    current = state.profile or profile
    planner = planner.model_copy(update={"admit_plateau": True})
    before = best_variant(current, device, planner, variants) if device is not None else (0, current.b_star)
    after = best_variant(measured, device, planner, variants) if device is not None else (0, measured.b_star)
    change = ("the plan changes: the policy re-packs when the live shape agrees" if after[0] != before[0]
              else "the same N")
    reason = (f"the profile measured beside the replicas replaces the prediction: plan for the profiled shape "
              f"N={before[0]} B*={before[1]} -> N={after[0]} B*={after[1]}: {change}")
    state = state.model_copy(update={"profile": measured, "samples": [], "check": None, "measured_at": now})
    return RefitOutcome(state=state, profile=measured, refit_reason=reason, plan_from=before, plan_to=after)
