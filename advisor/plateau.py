"""Where the throughput plateau is: knee detection, the step-time fit, and predictions.

Decode step time is modelled as `t(B, ctx) = a + b*B + c*B*ctx` (ms): `a` reads the weights once
per step, `b` is per-sequence work, `c` reads each sequence's KV cache. Throughput is then
`T(B) = 1000*B / t(B, ctx)`, rising toward `1000 / (b + c*ctx)`; the smallest batch reaching a
fraction f of that asymptote is `B* = f/(1-f) * a / (b + c*ctx)`, for any context length.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from advisor.noise import PointNoise


class ProfilePoint(BaseModel):
    """One measured batch size."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    batch: int = Field(ge=1, description="Concurrent requests (B).")
    context_tokens: float = Field(description="Mean tokens per sequence during decode (prompt + half the output; "
                                              "a predicted point of mixed lengths: WorkloadShape.context_tokens).")
    tokens_per_s: float = Field(description="Decode tokens per second, all sequences together (sum of 1/TPOT).")
    e2e_tokens_per_s: Optional[float] = Field(None, description="Output tokens / wall time, prefill included.")
    tpot_p50_ms: float = Field(description="Median time per output token.")
    tpot_p99_ms: float = Field(description="99th percentile time per output token.")
    ttft_ms: float = Field(description="Mean time to first token.")
    kv_usage: float = Field(description="Peak share of the KV pool in use.")
    dram_bw_util: Optional[float] = Field(None, description="Mean DRAM bandwidth use, % of peak (NVML GPM).")
    sm_util: Optional[float] = Field(None, description="Mean SM utilisation, % (NVML).")
    gpu_busy: Optional[float] = Field(None, description="Mean share of time any kernel ran on the GPU, % (NVML GPM "
                                      "graphics activity): what time-slicing engines cannot overlap.")
    gpu_memory_used_bytes: Optional[int] = Field(None, description="Device memory used (NVML).")
    noise: Optional[PointNoise] = Field(None, description="Spread of its repeated rounds and the background load.")


class PlateauRules(BaseModel):
    """Thresholds of the knee and the sweep (defaults follow and tighten the BCA paper's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    plateau_fraction: float = Field(0.9, gt=0.0, lt=1.0, description="B* reaches this share of peak throughput.")
    doubling_gain_eps: float = Field(0.1, ge=0.0, description="Stop doubling when T(2B)/T(B) - 1 falls below this.")
    tpot_growth_limit: float = Field(5.0, gt=1.0, description="Latency rule: TPOT(B) <= this x TPOT at batch 1.")
    tpot_p99_slo_ms: Optional[float] = Field(None, gt=0.0, description="Latency SLO on TPOT p99 (ms), if any.")


class StepModel(BaseModel):
    """Least-squares fit of decode step time `t(B, ctx) = a + b*B + c*B*ctx` in ms."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    a_ms: float = Field(description="Per-step cost independent of batch (weights read once).")
    b_ms: float = Field(description="Per-sequence cost per step.")
    c_ms: float = Field(description="Per-sequence, per-context-token cost per step (KV read).")
    mape: float = Field(description="Mean absolute % error of the fit on its own points.")
    points: int = Field(description="Points fitted.")

    def step_ms(self, batch: float, context_tokens: float) -> float:
        return self.a_ms + self.b_ms * batch + self.c_ms * batch * context_tokens

    def tokens_per_s(self, batch: float, context_tokens: float) -> float:
        return 1000.0 * batch / self.step_ms(batch, context_tokens)

    def per_sequence_ms(self, context_tokens: float) -> float:
        """Cost one more sequence adds to a step; <= 0 for a launch-bound fit (no plateau in the model)."""
        return self.b_ms + self.c_ms * context_tokens

    def asymptote_tokens_per_s(self, context_tokens: float) -> float:
        per_seq = self.per_sequence_ms(context_tokens)
        return math.inf if per_seq <= 0 else 1000.0 / per_seq

    def b_star(self, context_tokens: float, fraction: float) -> float:
        """The plateau batch; math.inf when `per_sequence_ms` <= 0 (callers must check it first)."""
        per_seq = self.per_sequence_ms(context_tokens)
        if per_seq <= 0:
            return math.inf
        return fraction / (1.0 - fraction) * max(self.a_ms, 0.0) / per_seq


class Knee(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    b_star: int = Field(description="Chosen batch size.")
    peak_tokens_per_s: float = Field(description="Highest throughput measured.")
    tokens_per_s_at_b_star: float
    limited_by: str = Field(description="throughput | latency_growth | tpot_slo")
    reason: str


def fit_step_model(points: list[ProfilePoint]) -> StepModel:
    """Fit step time from measured points (step = B / tokens_per_s)."""
    if len(points) < 2:
        raise ValueError("the step model needs at least 2 measured batch sizes")
    B = np.array([p.batch for p in points], dtype=float)
    ctx = np.array([p.context_tokens for p in points], dtype=float)
    t = 1000.0 * B / np.array([p.tokens_per_s for p in points], dtype=float)
    one_context = np.ptp(ctx) < 1e-6 * max(1.0, float(ctx.mean()))
    if one_context:
        # b and c are not separable from one context length: attribute per-sequence cost to c
        # only if ctx > 0 would be a guess, so keep it in b and leave c at 0.
        X = np.column_stack([np.ones_like(B), B])
        coef, *_ = np.linalg.lstsq(X, t, rcond=None)
        a, b, c = float(coef[0]), float(coef[1]), 0.0
    else:
        X = np.column_stack([np.ones_like(B), B, B * ctx])
        coef, *_ = np.linalg.lstsq(X, t, rcond=None)
        a, b, c = (float(x) for x in coef)
    pred = a + b * B + c * B * ctx
    mape = float(np.mean(np.abs(pred - t) / t) * 100.0)
    return StepModel(a_ms=a, b_ms=b, c_ms=c, mape=mape, points=len(points))


def _allowed_and_sustained(points: list[ProfilePoint], rules: PlateauRules) -> tuple[list[ProfilePoint], list[float], str]:
    """The points before the first that breaks a latency rule, each one's sustained level (the lower
    of it and its next neighbour: two neighbouring batch sizes must both reach a level), and which
    rule cut the curve (`throughput` when none did)."""
    if not points:
        raise ValueError("no profile points")
    pts = sorted(points, key=lambda p: p.batch)
    base_tpot = pts[0].tpot_p50_ms
    allowed: list[ProfilePoint] = []
    limited = "throughput"
    for p in pts:
        if p.tpot_p50_ms > rules.tpot_growth_limit * base_tpot:
            limited = "latency_growth"
            break
        if rules.tpot_p99_slo_ms is not None and p.tpot_p99_ms > rules.tpot_p99_slo_ms:
            limited = "tpot_slo"
            break
        allowed.append(p)
    if not allowed:
        raise ValueError(
            f"no batch size meets the latency rules: TPOT p99 at batch {pts[0].batch} is "
            f"{pts[0].tpot_p99_ms:.1f} ms (SLO {rules.tpot_p99_slo_ms} ms); raise the TPOT SLO or use a faster device"
        )
    sustained = [min(p.tokens_per_s, q.tokens_per_s) for p, q in zip(allowed, allowed[1:])]
    sustained.append(allowed[-1].tokens_per_s)
    return allowed, sustained, limited


def plateau_batches(points: list[ProfilePoint], rules: PlateauRules) -> list[int]:
    """Every measured batch from B* up that keeps the latency rules and whose own throughput is still
    `plateau_fraction` of the sustained peak, ascending (B* first). A batch past B* on a flat
    curve costs no throughput: it admits more requests at once, each step a little slower."""
    allowed, sustained, _ = _allowed_and_sustained(points, rules)
    target = rules.plateau_fraction * max(sustained)
    first = next(k for k, level in enumerate(sustained) if level >= target)
    out = [allowed[first].batch]
    for p in allowed[first + 1:]:
        if p.tokens_per_s < target:
            break
        out.append(p.batch)
    return out


def find_knee(points: list[ProfilePoint], rules: PlateauRules) -> Knee:
    """The smallest batch at `plateau_fraction` of peak throughput that keeps the latency rules.

    Robust to noise: a level counts only when two neighbouring batch sizes both reach it
    (`sustained`), so one lucky sample neither sets the peak nor becomes the knee. Latency
    rules cut the curve first and can only lower B*.
    """
    allowed, sustained, limited = _allowed_and_sustained(points, rules)
    pts = sorted(points, key=lambda p: p.batch)
    peak = max(sustained)
    target = rules.plateau_fraction * peak
    i = next(k for k, level in enumerate(sustained) if level >= target)
    chosen = allowed[i]
    if limited == "throughput":
        why = f"smallest batch reaching {rules.plateau_fraction:.0%} of the sustained peak {peak:.0f} tok/s"
    else:
        rule = (f"TPOT growth limit x{rules.tpot_growth_limit:g} vs batch {pts[0].batch}"
                if limited == "latency_growth" else f"TPOT p99 SLO {rules.tpot_p99_slo_ms:g} ms")
        why = (f"smallest batch reaching {rules.plateau_fraction:.0%} of the best {peak:.0f} tok/s "
               f"within the {rule} (batch {pts[len(allowed)].batch} breaks it)")
    return Knee(
        b_star=chosen.batch, peak_tokens_per_s=peak, tokens_per_s_at_b_star=chosen.tokens_per_s,
        limited_by=limited, reason=f"B*={chosen.batch} ({chosen.tokens_per_s:.0f} tok/s): {why}",
    )
