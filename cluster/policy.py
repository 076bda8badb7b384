"""The autoscaling and re-pack policy: pure functions of a context that carries `now`.

Each model is served by one deployment per packing variant (`<model>@n<N>`: replicas that each
take 1/N of a device). The policy keeps one variant active and moves replica counts:
- load: the active variant gets enough replicas for each to hold about `target_batch_fill` of its
  planned batch, within the model's min/max, after the wish held for `upscale_after_s` /
  `downscale_after_s`, and only as far as the packer finds room on the devices (with
  `may_add_devices`, cluster_autoscaling: on as many added devices like the largest as it takes;
  the output's `needed` is then what to ask Ray's autoscaler for);
- shape: the live prompt/output lengths go through the advisor's fitted step model
  (`evaluate_shape`); when another variant is predicted to beat the active one by
  `repack_min_gain` for `repack_sustain_s`, a re-pack starts, make-before-break: the new variant
  is brought up next to the old one (warming), then the old one stops taking requests, drains and
  is scaled to zero (draining), then the new variant is active (done).
- reality: the replicas' live batch, context and tokens/s are compared with the profile's
  prediction (cluster/refit.py); when they disagree the profile is refitted from them and the
  policy plans with the refit (a `refit` decision).
Every change is a `Decision` with a reason. The Serve-facing shell is `deployments/autoscale.py`.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from advisor.planner import DeviceSpec, PlannerConfig, ShapeEvaluation, evaluate_shape
from advisor.profiler import Profile, WorkloadShape
from advisor.refit import FitCheck, LiveSample, RefitConfig
from cluster.autoscaler import NeededDevices, devices_needed
from cluster.packing import DeviceCapacity, ModelDemand, PackInput, pack
from cluster.refit import RefitState, follow_reality, take_measured


class PolicyConfig(BaseModel):
    """Thresholds of the policy (the hysteresis lives here, not in code)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    target_batch_fill: float = Field(0.8, gt=0, le=1,
                                     description="Replicas for load: each near this share of its batch cap (max_num_seqs).")
    upscale_after_s: float = Field(5.0, ge=0, description="A wish for more replicas must hold this long.")
    downscale_after_s: float = Field(60.0, ge=0, description="A wish for fewer replicas must hold this long.")
    repack_min_gain: float = Field(0.10, ge=0, description="Predicted gain a re-pack must reach (0.1 = +10%).")
    repack_sustain_s: float = Field(20.0, ge=0, description="The better variant must stay better this long.")
    repack_cooldown_s: float = Field(120.0, ge=0, description="No new re-pack this soon after the last one ended.")
    shape_min_requests: int = Field(8, ge=1, description="Finished requests needed to trust the live shape.")
    shape_window_s: float = Field(60.0, gt=0, description="The live shape is that of the requests each replica "
                                  "finished in this many seconds: a change of lengths shows fully after about this long.")
    spread_min_requests: int = Field(32, ge=2, description="Finished requests needed to trust the spread of their "
                                     "output lengths (fewer: the shape's lengths are taken as all alike).")
    drain_grace_s: float = Field(3.0, ge=0, description="Wait after the old variant stops taking requests.")
    drain_timeout_s: float = Field(
        120.0, gt=0, description="Scale the old variant down even if requests linger, once they make no tokens; while "
                                 "they still do, the drain waits up to the time the longest request the model allows "
                                 "takes at its profiled step time (max_model_len steps at the variant's batch cap).")
    warm_timeout_s: float = Field(900.0, gt=0, description="Abort a re-pack whose new replicas never come up.")
    decisions_kept: int = Field(50, ge=1, description="Decisions kept for `plateau status`.")
    device_refresh_s: float = Field(30.0, ge=0, description="Read the cluster's devices again this often, so growth "
                                    "uses nodes that joined after the deploy (0: the deploy's devices only; with "
                                    "cluster_autoscaling the autoscaler's requests stand for them instead).")

    @field_validator("device_refresh_s")
    @classmethod
    def _refresh_not_too_often(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError(f"policy.device_refresh_s {v} would ask Ray for the cluster's nodes {1 / v:.0f} times a "
                             "second: give 0 (never) or at least 1")
        return v
    refit: RefitConfig = Field(default_factory=RefitConfig, description="When live readings overrule the profile.")


class VariantSpec(BaseModel):
    """One packing variant of a model: its deployment and what one replica takes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    n: int = Field(ge=1, description="Replicas per device (N).")
    deployment: str
    share: float = Field(gt=0, le=1, description="Device share per replica (1/N).")
    memory_bytes: int = Field(gt=0, description="Device memory per replica.")
    max_num_seqs: int = Field(ge=1, description="The replica's batch cap (its planned B).")


class ModelPolicyInput(BaseModel):
    """What the app builder knows of one model; fixed for the app's life."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    variants: list[VariantSpec] = Field(min_length=1)
    min_replicas: int = Field(ge=1)
    max_replicas: int = Field(ge=1)
    profile: Optional[Profile] = Field(None, description="The advisor's profile; without it no re-pack.")
    device: Optional[DeviceSpec] = Field(None, description="The device the profile's plans are for.")
    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    device_type: Optional[str] = Field(None, description="Ray accelerator type its replicas are pinned to.")
    measured_key: Optional[str] = Field(None, description="The profile is a prediction: where (Ray's internal KV) "
                                        "its measured replacement appears once the Advisor has measured it.")

    def variant(self, n: int) -> VariantSpec:
        return next(v for v in self.variants if v.n == n)


class VariantObservation(BaseModel):
    """What Serve and the replicas report for one variant deployment."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    running: int = Field(0, ge=0, description="Running replicas.")
    target: int = Field(0, ge=0, description="Serve's current target.")
    requests: float = Field(0.0, ge=0, description="Ongoing + queued requests (Serve's total_num_requests).")
    tokens_per_s: float = Field(0.0, ge=0, description="Summed over replicas.")
    kv_usage: float = Field(0.0, ge=0, description="Mean over replicas.")
    recent_requests: float = Field(0.0, ge=0, description="Requests finished in the shape window, summed.")
    recent_prompt_tokens: float = Field(0.0, ge=0, description="Their mean prompt length.")
    recent_output_tokens: float = Field(0.0, ge=0, description="Their mean output length.")
    recent_output_tokens_sq: float = Field(0.0, ge=0, description="Their mean squared output length (the spread).")
    samples: list[LiveSample] = Field(default_factory=list, description="Per-replica live batch, context, tokens/s.")


class ModelView(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    input: ModelPolicyInput
    variants: dict[int, VariantObservation] = Field(description="N -> observation; missing = nothing reported.")
    measured: Optional[Profile] = Field(None, description="The measured profile of a model that started on a "
                                                          "prediction, once the Advisor has published it.")


class PolicyContext(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    now: float
    models: list[ModelView]
    devices: list[DeviceCapacity]
    may_add_devices: bool = Field(False, description="Ray's autoscaler may add devices (cluster_autoscaling): growth "
                                                     "the devices cannot hold goes onto added ones like the largest.")


class Repack(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")  # gain may be inf
    from_n: int
    to_n: int
    started_at: float
    phase: Literal["warming", "draining"] = "warming"
    drain_started_at: Optional[float] = Field(
        None, description="When the old variant stopped taking requests; None while warming, and again while it "
                          "serves because the new replicas died (the drain and its grace start over once they are back).")
    new_target: int = Field(0, ge=0, description="Replicas applied to the new variant (after hysteresis and the room "
                                                 "check); warming ends when this many run.")
    reason: str
    predicted_gain: float
    cut: bool = Field(False, description="The old variant was scaled down with requests still in flight (said once, "
                                         "in a repack_drain decision).")


class ModelState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    active_n: int
    repack: Optional[Repack] = None
    want_n: Optional[int] = Field(None, description="Variant predicted better, not yet for long enough.")
    want_since: Optional[float] = None
    scale_want: Optional[int] = Field(None, description="Replica count wished for, not yet for long enough.")
    scale_since: Optional[float] = None
    last_repack_end: Optional[float] = None


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    at: float
    model: str
    action: Literal["scale", "repack_start", "repack_drain", "repack_done", "repack_abort", "refit", "measured"]
    from_n: int
    to_n: int
    replicas_from: int
    replicas_to: int
    reason: str
    predicted_gain: Optional[float] = None
    seconds: Optional[float] = Field(None, description="repack_done: from the decision to the old variant gone.")


class PolicyState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    models: dict[str, ModelState] = Field(default_factory=dict)
    decisions: list[Decision] = Field(default_factory=list)
    refits: dict[str, RefitState] = Field(default_factory=dict, description="Model -> live samples and refit.")


class Route(BaseModel):
    """How the ingress may use one variant."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    n: int
    deployment: str
    accepting: bool = Field(description="False while the variant drains or is off.")
    running: int
    max_num_seqs: int


class LiveModel(BaseModel):
    """Per-model readings for status and metrics."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    active_n: int
    best_n: Optional[int] = None
    b_star: int
    shape: Optional[WorkloadShape] = None
    planned_tokens_per_s: Optional[float] = Field(None, description="Predicted for the running replicas.")
    measured_tokens_per_s: float
    kv_usage: float
    replicas: dict[int, int] = Field(description="N -> target replicas.")
    repack: Optional[Repack] = None
    fit: Optional[FitCheck] = Field(None, description="Live readings against the plan's prediction.")
    refits: int = Field(0, ge=0, description="Times the profile was refitted from live samples.")


class PolicyOutput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    targets: dict[str, int] = Field(description="Deployment -> target replicas (every variant).")
    routes: dict[str, list[Route]]
    live: list[LiveModel]
    state: PolicyState
    new_decisions: list[Decision]
    needed: Optional[NeededDevices] = Field(None, description="With may_add_devices: the devices the targets use, "
                                                              "added ones included (what to ask the autoscaler for).")


# ---- the policy -------------------------------------------------------------------------------

class ModelStep(BaseModel):
    """One model's tick: its new state, the target and route of each variant, and the decisions taken."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    view: ModelView
    state: ModelState
    targets: dict[int, int] = Field(description="N -> target replicas of that variant.")
    accepting: dict[int, bool] = Field(description="N -> whether the variant takes new requests.")
    decisions: list[Decision] = Field(default_factory=list)
    grow_n: Optional[int] = Field(None, description="The variant that wishes to grow (held back for the room check).")
    grow_to: Optional[int] = Field(None, description="The target it wishes for.")

    def deployment_targets(self) -> dict[str, int]:
        return {v.deployment: self.targets[v.n] for v in self.view.input.variants}


def decide(ctx: PolicyContext, state: PolicyState, cfg: PolicyConfig = PolicyConfig()) -> PolicyOutput:
    ctx, refits, refit_decisions = _follow_reality(ctx, state, cfg)
    steps: list[ModelStep] = []
    live_inputs = []
    for view in ctx.models:
        inp = view.input
        ms = _known_state(state.models.get(inp.model), inp) or _initial_state(view)
        obs = {v.n: view.variants.get(v.n, VariantObservation()) for v in inp.variants}
        shape = _live_shape(obs.values(), cfg)
        ev = _evaluate(inp, shape)
        steps.append(_step_model(ctx.now, view, ms, obs, ev, cfg))
        live_inputs.append((obs, ev or _evaluate(inp, inp.profile.shape if inp.profile else None), shape))

    steps = _grant_growth(ctx, steps, cfg)  # with may_add_devices a re-pack's new variant may surge onto added devices
    steps = _check_repack_room(_with_added_devices(ctx, _all_targets(steps)), steps)
    steps = [_record_new_target(s) for s in steps]

    targets = _all_targets(steps)
    routes = {s.view.input.model: [Route(n=v.n, deployment=v.deployment, accepting=s.accepting[v.n],
                                         running=obs[v.n].running, max_num_seqs=v.max_num_seqs)
                                   for v in s.view.input.variants]
              for s, (obs, _, _) in zip(steps, live_inputs)}
    live = [_live(s.view.input, s.state, obs, ev, shape, s.targets) for s, (obs, ev, shape) in zip(steps, live_inputs)]
    decisions = refit_decisions + [d for s in steps for d in s.decisions]
    states = {**state.models, **{s.view.input.model: s.state for s in steps}}
    kept = (list(state.decisions) + decisions)[-cfg.decisions_kept:]
    live = [m.model_copy(update={"fit": refits[m.model].check, "refits": refits[m.model].refits})
            if m.model in refits else m for m in live]
    return PolicyOutput(targets=targets, routes=routes, live=live,
                        state=PolicyState(models=states, decisions=kept, refits=refits), new_decisions=decisions,
                        needed=_needed(ctx, targets) if ctx.may_add_devices else None)


def _follow_reality(ctx: PolicyContext, state: PolicyState,
                    cfg: PolicyConfig) -> tuple[PolicyContext, dict[str, RefitState], list[Decision]]:
    """Live samples against each model's profile; where a refit happened, plan with the refitted one."""
    views, refits, decisions = [], dict(state.refits), []
    for view in ctx.models:
        inp = view.input
        state_of_model = refits.get(inp.model, RefitState())
        if view.measured is not None and inp.profile is not None and state_of_model.measured_at is None:
            took = take_measured(ctx.now, inp.profile, view.measured, inp.device, inp.planner,
                                 [v.n for v in inp.variants], state_of_model)
            state_of_model = took.state
            running = sum(o.running for o in view.variants.values())
            decisions.append(_decision(ctx.now, inp.model, "measured", took.plan_from[0], took.plan_to[0], running,
                                       running, took.refit_reason))
        if state_of_model.measured_at is not None:  # measured knees admit the plateau past B*
            inp = inp.model_copy(update={"planner": inp.planner.model_copy(update={"admit_plateau": True})})
            view = view.model_copy(update={"input": inp})
        out = follow_reality(ctx.now, inp.profile, inp.device, inp.planner, [v.n for v in inp.variants],
                             {n: o.samples for n, o in view.variants.items()}, state_of_model, cfg.refit)
        refits[inp.model] = out.state
        if out.refit_reason is not None:
            running = sum(o.running for o in view.variants.values())
            decisions.append(_decision(ctx.now, inp.model, "refit", out.plan_from[0], out.plan_to[0], running, running,
                                       out.refit_reason))
        if out.profile is not inp.profile:
            view = view.model_copy(update={"input": inp.model_copy(update={"profile": out.profile})})
        views.append(view)
    return ctx.model_copy(update={"models": views}), refits, decisions


def _step_model(now: float, view: ModelView, ms: ModelState, obs: dict[int, VariantObservation],
                ev: Optional[ShapeEvaluation], cfg: PolicyConfig) -> ModelStep:
    inp = view.input
    load = sum(o.requests for o in obs.values())
    started: list[Decision] = []
    if ms.repack is None:
        ms, started = _consider_repack(now, inp, ms, obs, load, ev, cfg)
    step = _scale_active(now, view, ms, obs, load, cfg) if ms.repack is None else \
        _advance_repack(now, view, ms, obs, load, cfg)
    return step.model_copy(update={"decisions": started + step.decisions})


def _known_state(ms: Optional[ModelState], inp: ModelPolicyInput) -> Optional[ModelState]:
    """A saved state whose variants this deploy still has; else None (start from what runs)."""
    if ms is None:
        return None
    ns = {v.n for v in inp.variants}
    used = {ms.active_n} | ({ms.repack.from_n, ms.repack.to_n} if ms.repack else set())
    return ms if used <= ns else None


def _initial_state(view: ModelView) -> ModelState:
    """After a (controller) restart: the variant with the most replicas is the active one."""
    def weight(v: VariantSpec):
        o = view.variants.get(v.n, VariantObservation())
        return (o.running, o.target)
    best = max(view.input.variants, key=weight)
    return ModelState(active_n=best.n)


def _live_shape(observations, cfg: PolicyConfig) -> Optional[WorkloadShape]:
    total = sum(o.recent_requests for o in observations)
    if total < cfg.shape_min_requests:
        return None
    prompt = sum(o.recent_prompt_tokens * o.recent_requests for o in observations) / total
    output = sum(o.recent_output_tokens * o.recent_requests for o in observations) / total
    square = sum(o.recent_output_tokens_sq * o.recent_requests for o in observations) / total
    # the running batch is length-biased: long outputs hold more of it (WorkloadShape.context_tokens)
    cv = 0.0
    if total >= cfg.spread_min_requests and output > 0 and square > 0:
        cv = math.sqrt(max(0.0, square / output**2 - 1.0))
    return WorkloadShape(prompt_tokens=max(1, round(prompt)), output_tokens=max(2, round(output)),
                         output_tokens_cv=round(min(cv, 10.0), 3))


def _evaluate(inp: ModelPolicyInput, shape: Optional[WorkloadShape]) -> Optional[ShapeEvaluation]:
    if inp.profile is None or inp.device is None or shape is None:
        return None
    return evaluate_shape(inp.profile, inp.device, shape, inp.planner)


def _replicas_for(load: float, v: VariantSpec, inp: ModelPolicyInput, cfg: PolicyConfig) -> int:
    need = math.ceil(load / (v.max_num_seqs * cfg.target_batch_fill)) if load > 0 else 0
    return max(inp.min_replicas, min(inp.max_replicas, need))


def _hysteresis(now: float, ms: ModelState, current: int, desired: int, cfg: PolicyConfig) -> tuple[ModelState, int]:
    if desired == current:
        return ms.model_copy(update={"scale_want": None, "scale_since": None}), current
    if ms.scale_want is None or (ms.scale_want > current) != (desired > current):
        return ms.model_copy(update={"scale_want": desired, "scale_since": now}), current
    hold = cfg.upscale_after_s if desired > current else cfg.downscale_after_s
    if now - ms.scale_since >= hold:
        return ms.model_copy(update={"scale_want": None, "scale_since": None}), desired
    return ms.model_copy(update={"scale_want": desired}), current


def _closed(inp: ModelPolicyInput) -> tuple[dict[int, int], dict[int, bool]]:
    return {v.n: 0 for v in inp.variants}, {v.n: False for v in inp.variants}


def _scale_active(now: float, view: ModelView, ms: ModelState, obs: dict[int, VariantObservation], load: float,
                  cfg: PolicyConfig) -> ModelStep:
    """No re-pack: the active variant follows load (growth waits for the room check)."""
    inp = view.input
    active = inp.variant(ms.active_n)
    current = obs[active.n].target or obs[active.n].running
    desired = _replicas_for(load, active, inp, cfg)
    ms, target = _hysteresis(now, ms, current, desired, cfg)
    decisions, grow_to = [], None
    if target > current:
        grow_to, target = target, current
    elif target < current:
        decisions.append(_decision(now, inp.model, "scale", active.n, active.n, current, target,
                                   f"load {load:.0f} requests needs {desired} replicas of B={active.max_num_seqs} "
                                   f"at {cfg.target_batch_fill:.0%} fill (held {cfg.downscale_after_s:.0f} s)"))
    targets, accepting = _closed(inp)
    targets[active.n], accepting[active.n] = target, True
    return ModelStep(view=view, state=ms, targets=targets, accepting=accepting, decisions=decisions,
                     grow_n=active.n if grow_to is not None else None, grow_to=grow_to)


def _consider_repack(now: float, inp: ModelPolicyInput, ms: ModelState, obs: dict[int, VariantObservation],
                     load: float, ev: Optional[ShapeEvaluation], cfg: PolicyConfig) -> tuple[ModelState, list[Decision]]:
    clear = {"want_n": None, "want_since": None}
    if ev is None or len(inp.variants) < 2:
        return ms.model_copy(update=clear), []
    if ms.last_repack_end is not None and now - ms.last_repack_end < cfg.repack_cooldown_s:
        return ms.model_copy(update=clear), []
    best_n, gain, why = _best_variant(inp, ms.active_n, ev)
    if best_n == ms.active_n or gain < cfg.repack_min_gain:
        return ms.model_copy(update=clear), []
    if ms.want_n != best_n:
        return ms.model_copy(update={"want_n": best_n, "want_since": now}), []
    if now - ms.want_since < cfg.repack_sustain_s:
        return ms, []
    reason = f"{why}; held {now - ms.want_since:.0f} s"
    replicas = obs[ms.active_n].target or obs[ms.active_n].running
    new_target = _replicas_for(load, inp.variant(best_n), inp, cfg)
    start = _decision(now, inp.model, "repack_start", ms.active_n, best_n, replicas, replicas, reason, gain)
    repack = Repack(from_n=ms.active_n, to_n=best_n, started_at=now, new_target=new_target, reason=reason,
                    predicted_gain=gain)
    return ms.model_copy(update={**clear, "scale_want": None, "scale_since": None, "repack": repack}), [start]


def _best_variant(inp: ModelPolicyInput, active_n: int, ev: ShapeEvaluation) -> tuple[int, float, str]:
    """The variant with the best predicted throughput per device, its gain over the active one, and why."""
    def per_device(n: int) -> float:
        o = ev.option(n)
        return o.predicted_aggregate_tokens_per_s if o is not None and o.fits else 0.0
    ranked = sorted(inp.variants, key=lambda v: (-per_device(v.n), v.n != active_n, v.n))
    best = ranked[0].n
    cur = per_device(active_n)
    shape = f"live shape prompt {ev.shape.prompt_tokens} / output {ev.shape.output_tokens} tokens: B*={ev.b_star}"
    if per_device(best) <= 0:
        return active_n, 0.0, shape + ", no variant fits"
    if cur <= 0:
        return best, math.inf, (f"{shape}; N={active_n} no longer fits ({active_n} x "
                                f"{ev.memory_per_replica_bytes / 2**30:.2f} GiB > {ev.usable_memory_bytes / 2**30:.2f}"
                                f" GiB usable), N={best} predicted {per_device(best):.0f} tok/s per device")
    gain = per_device(best) / cur - 1.0
    return best, gain, (f"{shape}; N={best} predicted {per_device(best):.0f} tok/s per device vs "
                        f"{cur:.0f} for N={active_n} (+{gain:.0%})")


def _advance_repack(now: float, view: ModelView, ms: ModelState, obs: dict[int, VariantObservation], load: float,
                    cfg: PolicyConfig) -> ModelStep:
    """Make-before-break: warm the new variant next to the old, then drain the old and stop it.

    The new variant's target moves with the same hysteresis as a normal scale and grows only
    through the room check (`_grant_growth`); warming ends when the replicas actually applied
    (`Repack.new_target`, after the room check) run, not when an uncapped wish would.
    """
    inp = view.input
    rp = ms.repack
    old, new = inp.variant(rp.from_n), inp.variant(rp.to_n)
    old_obs, new_obs = obs[old.n], obs[new.n]
    old_current = old_obs.target or old_obs.running
    ms, new_target = _hysteresis(now, ms, rp.new_target, _replicas_for(load, new, inp, cfg), cfg)
    grow_to = None
    if new_target > rp.new_target:
        grow_to, new_target = new_target, rp.new_target
    targets, accepting = _closed(inp)
    targets[new.n], accepting[new.n] = new_target, True

    def step(state: ModelState, decisions: list[Decision] = (), grow: bool = True) -> ModelStep:
        return ModelStep(view=view, state=state, targets=targets, accepting=accepting, decisions=list(decisions),
                         grow_n=new.n if grow and grow_to is not None else None,
                         grow_to=grow_to if grow else None)

    if rp.phase == "warming":
        targets[old.n], accepting[old.n] = old_current, True
        if rp.new_target > 0 and new_obs.running >= rp.new_target:
            accepting[old.n] = False
            drain = _decision(now, inp.model, "repack_drain", old.n, new.n, old_current, rp.new_target,
                              f"{new_obs.running} replicas of N={new.n} running: N={old.n} stops taking "
                              f"requests and drains")
            return step(ms.model_copy(update={"repack": rp.model_copy(update={"phase": "draining",
                                                                               "drain_started_at": now})}), [drain])
        if now - rp.started_at > cfg.warm_timeout_s:
            targets[new.n], accepting[new.n] = 0, False
            abort = _decision(now, inp.model, "repack_abort", old.n, new.n, old_current, old_current,
                              f"N={new.n} replicas not running after {cfg.warm_timeout_s:.0f} s; N={old.n} stays")
            return step(ms.model_copy(update={"repack": None, "last_repack_end": now, "scale_want": None,
                                              "scale_since": None}), [abort], grow=False)
        return step(ms)
    # draining: the old variant takes no new requests; scale it down once idle (or after the timeout)
    if new_obs.running == 0 and old_obs.running > 0:
        # the new replicas died before the old ones were gone: the old ones serve again meanwhile,
        # and their drain starts over (with its grace) once the new ones are back
        targets[old.n], accepting[old.n] = old_current, True
        return step(ms.model_copy(update={"repack": rp.model_copy(update={"drain_started_at": None})}))
    if rp.drain_started_at is None:
        rp = rp.model_copy(update={"drain_started_at": now})
        ms = ms.model_copy(update={"repack": rp})
    waited = now - rp.drain_started_at
    idle = old_obs.requests <= 0 and waited >= cfg.drain_grace_s
    cut = None if idle else _drain_cut(waited, old_obs, longest_request_s(inp, old), cfg)
    targets[old.n] = 0 if idle or cut else old_current
    decisions = []
    if cut and not rp.cut:
        rp = rp.model_copy(update={"cut": True})
        ms = ms.model_copy(update={"repack": rp})
        decisions.append(_decision(now, inp.model, "repack_drain", old.n, new.n, old_current, new_target,
                                   f"N={old.n} stopped with {old_obs.requests:.0f} requests in flight after "
                                   f"{waited:.0f} s: {cut}"))
    if targets[old.n] == 0 and old_obs.running == 0:
        done = _decision(now, inp.model, "repack_done", old.n, new.n, 0, new_target,
                         f"N={old.n} drained and stopped; N={new.n} serves ({rp.reason})",
                         rp.predicted_gain, seconds=now - rp.started_at)
        return step(ModelState(active_n=new.n, last_repack_end=now, scale_want=ms.scale_want,
                               scale_since=ms.scale_since), [*decisions, done])
    return step(ms, decisions)


def longest_request_s(inp: ModelPolicyInput, variant: VariantSpec) -> Optional[float]:
    """Seconds the longest request the model allows takes on a replica of `variant`: max_model_len
    steps (prompt tokens counted as steps too: an upper bound) at the profile's step time with the
    variant's batch cap full, times N (a replica on 1/N of the device steps at most N times slower).
    None without a profile or a context length."""
    length = inp.planner.max_model_len
    if inp.profile is None or length is None:
        return None
    step_ms = inp.profile.step_model.step_ms(variant.max_num_seqs, length / 2)  # linear in context: the mean step
    return length * max(step_ms, 0.0) * variant.n / 1000.0


def _drain_cut(waited: float, old: VariantObservation, longest_s: Optional[float], cfg: PolicyConfig) -> str:
    """Why the draining variant is scaled down with requests in flight now; "" while it waits on."""
    if waited < cfg.drain_timeout_s:
        return ""
    if old.tokens_per_s <= 0:
        return f"they made no tokens, and the drain waited drain_timeout_s ({cfg.drain_timeout_s:.0f} s)"
    if longest_s is None:
        return f"no profile bounds a request's length here: the drain waited drain_timeout_s ({cfg.drain_timeout_s:.0f} s)"
    if waited >= longest_s:
        return (f"they still made tokens, but the longest request the model allows takes {longest_s:.0f} s "
                f"(max_model_len steps at the profiled step time)")
    return ""


def _demand(ctx: PolicyContext, targets: dict[str, int]) -> PackInput:
    kind = ctx.devices[0].kind
    return PackInput(devices=ctx.devices, models=[
        ModelDemand(model=v.deployment, kind=kind, replicas=targets.get(v.deployment, 0), share=v.share,
                    memory_per_replica_bytes=v.memory_bytes, device_type=view.input.device_type)
        for view in ctx.models for v in view.input.variants])


def _fits(ctx: PolicyContext, targets: dict[str, int]) -> tuple[bool, str]:
    """Whether the targets fit on the devices (with may_add_devices: plus as many added ones as it takes)."""
    if not ctx.devices:
        return True, ""
    spec = _demand(ctx, targets)
    result = devices_needed(spec).packing if ctx.may_add_devices else pack(spec)
    return (not result.unplaced), "; ".join(f"{u.model}: {u.replicas} replica(s) {u.reason}" for u in result.unplaced)


def _with_added_devices(ctx: PolicyContext, targets: dict[str, int]) -> PolicyContext:
    """With may_add_devices: the context's devices plus the added ones these targets use, and no more to add."""
    needed = _needed(ctx, targets) if ctx.may_add_devices else None
    if needed is None:
        return ctx
    return ctx.model_copy(update={"may_add_devices": False, "devices": [
        d for d in needed.devices if d in ctx.devices or d.name in needed.packing.placement]})


def _needed(ctx: PolicyContext, targets: dict[str, int]) -> Optional[NeededDevices]:
    return devices_needed(_demand(ctx, targets)) if ctx.devices else None


def _all_targets(steps: list[ModelStep]) -> dict[str, int]:
    return {dep: n for s in steps for dep, n in s.deployment_targets().items()}


def _grant_growth(ctx: PolicyContext, steps: list[ModelStep], cfg: PolicyConfig) -> list[ModelStep]:
    """Scale-ups (the active variant, or the new one during a re-pack), one replica at a time
    round-robin, as far as the devices have room."""
    targets = _all_targets(steps)
    growing = [(s, s.view.input.variant(s.grow_n).deployment) for s in steps if s.grow_to is not None]
    progress = True
    while progress:
        progress = False
        for s, dep in growing:
            if targets[dep] < s.grow_to:
                trial = {**targets, dep: targets[dep] + 1}
                if _fits(ctx, trial)[0]:
                    targets[dep] = trial[dep]
                    progress = True
    out = []
    for s in steps:
        if s.grow_to is None:
            out.append(s)
            continue
        inp, n = s.view.input, s.grow_n
        before, after = s.targets[n], targets[inp.variant(n).deployment]
        if after > before:
            capped = "" if after == s.grow_to else f"; capped at {after}: no room on the devices for more"
            d = _decision(ctx.now, inp.model, "scale", n, n, before, after,
                          f"load needs {s.grow_to} replicas of B={inp.variant(n).max_num_seqs} at "
                          f"{cfg.target_batch_fill:.0%} fill (held {cfg.upscale_after_s:.0f} s){capped}")
            out.append(s.model_copy(update={"targets": {**s.targets, n: after}, "decisions": s.decisions + [d]}))
        else:  # nothing granted: keep wishing without re-logging every tick
            out.append(s.model_copy(update={"state": s.state.model_copy(
                update={"scale_want": s.grow_to, "scale_since": ctx.now - cfg.upscale_after_s})}))
    return out


def _check_repack_room(ctx: PolicyContext, steps: list[ModelStep]) -> list[ModelStep]:
    """Make-before-break needs room for the new variant next to the old: bring up fewer, or abort."""
    out = list(steps)
    for i, s in enumerate(out):
        rp = s.state.repack
        if rp is None or rp.phase != "warming":
            continue
        inp = s.view.input
        new, old = inp.variant(rp.to_n), inp.variant(rp.from_n)
        others = {dep: n for j, o in enumerate(out) if j != i for dep, n in o.deployment_targets().items()}
        new_target = s.targets[new.n]
        while new_target > 1 and not _fits(ctx, {**others, **s.deployment_targets(), new.deployment: new_target})[0]:
            new_target -= 1
        ok, why = _fits(ctx, {**others, **s.deployment_targets(), new.deployment: new_target})
        if ok:
            out[i] = s.model_copy(update={"targets": {**s.targets, new.n: new_target}})
            continue
        abort = _decision(ctx.now, inp.model, "repack_abort", old.n, new.n, s.targets[old.n], s.targets[old.n],
                          f"no room for N={new.n} next to N={old.n}: {why}")
        out[i] = s.model_copy(update={
            "targets": {**s.targets, new.n: 0}, "accepting": {**s.accepting, new.n: False, old.n: True},
            "decisions": s.decisions + [abort],
            "state": s.state.model_copy(update={"repack": None, "last_repack_end": ctx.now, "scale_want": None,
                                                "scale_since": None})})
    return out


def _record_new_target(s: ModelStep) -> ModelStep:
    """The state remembers the new variant's applied target: warming compares running replicas with it."""
    rp = s.state.repack
    if rp is None or rp.new_target == s.targets[rp.to_n]:
        return s
    return s.model_copy(update={"state": s.state.model_copy(
        update={"repack": rp.model_copy(update={"new_target": s.targets[rp.to_n]})})})


def _live(inp: ModelPolicyInput, ms: ModelState, obs: dict[int, VariantObservation], ev: Optional[ShapeEvaluation],
          shape: Optional[WorkloadShape], wanted: dict[int, int]) -> LiveModel:
    active = inp.variant(ms.active_n)
    running = obs[active.n].running
    planned = None
    best_n = None
    if ev is not None:
        o = ev.option(active.n)
        if o is not None:
            planned = o.predicted_aggregate_tokens_per_s / active.n * running
        best_n = _best_variant(inp, ms.active_n, ev)[0]
    return LiveModel(
        model=inp.model, active_n=active.n, best_n=best_n, b_star=ev.b_star if ev else active.max_num_seqs,
        shape=shape, planned_tokens_per_s=planned,
        measured_tokens_per_s=sum(o.tokens_per_s for o in obs.values()),
        kv_usage=max((o.kv_usage for o in obs.values() if o.running), default=0.0),
        replicas=dict(wanted), repack=ms.repack,
    )


def _decision(at, model, action, from_n, to_n, replicas_from, replicas_to, reason, gain=None, seconds=None) -> Decision:
    return Decision(at=at, model=model, action=action, from_n=from_n, to_n=to_n, replicas_from=replicas_from,
                    replicas_to=replicas_to, reason=reason, predicted_gain=None if gain is None or math.isinf(gain)
                    else gain, seconds=seconds)
