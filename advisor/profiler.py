"""The adaptive profiling sweep: closed batches of exactly B requests, B doubling to the plateau.

The engine is injected as a `BatchRunner` (deployments/profiling.py wraps vLLM's AsyncLLM for
CPU and CUDA alike), device counters as an optional `DeviceSampler` (advisor/nvml.py), so the
sweep logic is tested without vLLM. Doubling stops when a doubling gains less than eps; then
the knee is bisected between the last two batch sizes; at most `max_points` points in all.
Two extra points at a longer context separate the per-sequence and per-KV-token costs of the
step-time fit. Every point is measured in repeated rounds until they agree and nothing else
competed for the device (advisor/noise.py); the profile carries that noise record.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Literal, Optional, Protocol

from pydantic import BaseModel, ConfigDict, Field

from advisor.noise import (LoadProbe, NoiseConfig, PointNoise, ProfileNoise, QuietWait, coefficient_of_variation,
                           judge_try, summarize)
from advisor.sharing import Sharing
from advisor.plateau import Knee, PlateauRules, ProfilePoint, StepModel, find_knee, fit_step_model


# How the engine executes decode steps: "eager" (vLLM's enforce_eager) or "graphs" (vLLM's default:
# torch.compile and CUDA graphs). Step times, the knee and memory differ between the two.
ExecutionMode = Literal["eager", "graphs"]


def execution_mode(enforce_eager: bool) -> ExecutionMode:
    return "eager" if enforce_eager else "graphs"


PREDICTED_ENGINE_VERSION = "predicted"  # the engine_version of a profile the performance model built


class WorkloadShape(BaseModel):
    """Prompt and output lengths of the requests a profile is measured with."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prompt_tokens: int = Field(128, ge=1, description="Prompt tokens per request.")
    output_tokens: int = Field(64, ge=2, description="Generated tokens per request.")
    output_tokens_cv: float = Field(
        0.0, ge=0, le=10, description="Spread of the output lengths: their standard deviation over their mean (0: all "
                                      "requests generate output_tokens; ~1-1.5: chat traffic such as ShareGPT).")

    @property
    def context_tokens(self) -> float:
        """Mean tokens a sequence of a running batch holds while it decodes.

        A running batch is length-biased: a request that generates twice as many tokens stays in
        it twice as long, so the batch's mean output-so-far is E[O^2] / (2 E[O]) =
        output * (1 + cv^2) / 2 (renewal theory's mean residual life), not output / 2.
        """
        return self.prompt_tokens + self.output_tokens * (1.0 + self.output_tokens_cv ** 2) / 2

    @property
    def kv_tokens_per_sequence(self) -> int:
        """Tokens of KV to plan per running sequence: a whole request (prompt + output), or the
        length-biased mean context where outputs spread so much that it is larger (cv > 1)."""
        return max(self.prompt_tokens + self.output_tokens, math.ceil(self.context_tokens))

    @property
    def bucket(self) -> str:
        """Coarse key for stored profiles: prompt and output rounded to powers of two."""
        return f"p{_pow2(self.prompt_tokens)}-o{_pow2(self.output_tokens)}"


def _pow2(n: int) -> int:
    return 1 << max(0, round(math.log2(max(1, n))))


class BatchMeasurement(BaseModel):
    """What a runner measured for one closed batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    batch: int
    wall_s: float
    output_tokens: int
    ttft_ms: list[float]
    tpot_ms: list[float]
    kv_usage_peak: float
    rounds: int = Field(1, description="Closed batches merged into this measurement.")
    decode_window_s: float = Field(0.0, ge=0, description="Time all B sequences decoded together (no prefill).")
    decode_window_tokens: int = Field(0, ge=0, description="Tokens generated inside that window.")

    @property
    def decode_tokens_per_s(self) -> float:
        """Steady-state decode rate of batch B; falls back to sum(1/TPOT) when the window is too
        short to measure (outputs barely longer than the prefill phase)."""
        if self.decode_window_tokens >= 4 * self.batch and self.decode_window_s > 0:
            return self.decode_window_tokens / self.decode_window_s
        return sum(1000.0 / t for t in self.tpot_ms if t > 0) / max(1, self.rounds)


class DeviceSample(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    dram_bw_util: Optional[float] = None
    sm_util: Optional[float] = None
    gpu_busy: Optional[float] = None
    memory_used_bytes: Optional[int] = None


class BatchRunner(Protocol):
    max_batch: int

    def run(self, batch: int, shape: WorkloadShape) -> BatchMeasurement: ...


class DeviceSampler(Protocol):
    def start(self) -> None: ...

    def stop(self) -> DeviceSample: ...


class SweepConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    max_points: int = Field(8, ge=3, description="Batch sizes measured in the main sweep, at most.")
    min_tokens_per_point: int = Field(256, ge=1, description="Small batches repeat until this many tokens.")
    fit_context_factor: float = Field(4.0, gt=1.0, description="Prompt length multiplier of the fit points.")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Repeat and interference limits per point.")


class SharePoint(BaseModel):
    """B* measured on a share of the device (CPU: fewer cores) to learn how throughput scales."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cores: int = Field(ge=1, description="Cores the engine was pinned to.")
    point: ProfilePoint


class MeasuredGain(BaseModel):
    """N engines decoding at once on one device against one engine on all of it, same workload."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    replicas: int = Field(ge=2)
    batch: int = Field(ge=1, description="Batch of each of the N engines.")
    single_tokens_per_s: float = Field(gt=0, description="One engine at its knee, on the whole device.")
    aggregate_tokens_per_s: float = Field(ge=0, description="The N engines together.")

    @property
    def gain(self) -> float:
        return self.aggregate_tokens_per_s / self.single_tokens_per_s - 1.0


class Profile(BaseModel):
    """A model's throughput curve on one device, its knee and its step-time fit."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field(description="Model reference (name or path).")
    device_name: str = Field(description="Device the profile was measured on.")
    engine_version: str = Field(description="vLLM version.")
    dtype: str
    shape: WorkloadShape
    rules: PlateauRules
    points: list[ProfilePoint] = Field(description="Main sweep, by batch.")
    fit_points: list[ProfilePoint] = Field(description="Extra points at a longer context, for the fit.")
    knee: Knee
    step_model: StepModel
    weight_bytes: int = Field(description="Weights in memory (memory model).")
    kv_bytes_per_token: int
    overhead_bytes: int = Field(description="Non-KV, non-weight memory of the engine, measured at profile time.")
    seconds: float = Field(description="Wall time of the sweep.")
    cores: int = Field(0, ge=0, description="CPU cores the main sweep ran on (0 on GPUs).")
    share_points: list[SharePoint] = Field(default_factory=list, description="B* on fewer cores (CPU).")
    mode: ExecutionMode = Field("eager", description="Execution mode the engine was profiled in (eager: "
                                "enforce_eager; graphs: CUDA graphs / torch.compile). Older profiles: eager.")
    noise: Optional[ProfileNoise] = Field(None, description="The profile's own noise; None: measured before noise "
                                                            "was recorded (not trusted for reuse).")
    sharing: Optional[Sharing] = Field(None, description="How engines share the GPU it was measured on (CUDA: mps, "
                                       "time-slice or exclusive; None on CPUs).")
    measured_gain: Optional[MeasuredGain] = Field(None, description="N engines at once against one, measured on the "
                                                  "device (CUDA); the planner's gain model yields to it.")

    @property
    def predicted(self) -> bool:
        """Built by the performance model (advisor/perfmodel.py), not measured."""
        return self.engine_version == PREDICTED_ENGINE_VERSION

    @property
    def trusted(self) -> bool:
        """Safe to reuse: its noise was recorded and it was not taken under interference."""
        return self.noise is not None and not self.noise.flagged

    @property
    def distrust_reason(self) -> str:
        if self.noise is None:
            return "the stored profile carries no noise record (made before noise was measured)"
        return f"the stored profile was {self.noise.reason}" if self.noise.flagged else ""

    @property
    def b_star(self) -> int:
        return self.knee.b_star

    @property
    def cpu_scaling_exponent(self) -> Optional[float]:
        """g in T(cores) ~ cores^g at B*, from the share point; None without one."""
        full = next((p for p in self.points if p.batch == self.knee.b_star), None)
        shares = [s for s in self.share_points if 0 < s.cores < self.cores]
        if full is None or not shares:
            return None
        s = shares[0]
        g = math.log(full.tokens_per_s / s.point.tokens_per_s) / math.log(self.cores / s.cores)
        return min(1.5, max(0.0, g))


def to_point(m: BatchMeasurement, shape: WorkloadShape, sample: Optional[DeviceSample]) -> ProfilePoint:
    tpot = sorted(m.tpot_ms)
    return ProfilePoint(
        batch=m.batch,
        context_tokens=shape.context_tokens,
        tokens_per_s=m.decode_tokens_per_s,
        e2e_tokens_per_s=m.output_tokens / m.wall_s,
        tpot_p50_ms=_quantile(tpot, 0.5),
        tpot_p99_ms=_quantile(tpot, 0.99),
        ttft_ms=sum(m.ttft_ms) / len(m.ttft_ms),
        kv_usage=m.kv_usage_peak,
        dram_bw_util=sample.dram_bw_util if sample else None,
        sm_util=sample.sm_util if sample else None,
        gpu_busy=sample.gpu_busy if sample else None,
        gpu_memory_used_bytes=sample.memory_used_bytes if sample else None,
    )


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def measure(runner: BatchRunner, batch: int, shape: WorkloadShape, sampler: Optional[DeviceSampler],
            cfg: SweepConfig, probe: Optional[LoadProbe] = None) -> ProfilePoint:
    """One point: tries of `rounds` closed batches until their decode rates agree (CV) and the
    background load stays under the limit, at most `max_tries`; keeps the first clean try, else the
    least spread one, marked noisy."""
    noise = cfg.noise
    rounds = max(noise.rounds_per_try, math.ceil(cfg.min_tokens_per_point / (batch * shape.output_tokens)))
    tries = []
    for _ in range(noise.max_tries):
        if sampler:
            sampler.start()
        if probe:
            probe.start()
        runs = [runner.run(batch, shape) for _ in range(rounds)]
        load = probe.stop() if probe else None
        sample = sampler.stop() if sampler else None
        cv = coefficient_of_variation(r.decode_tokens_per_s for r in runs)
        why = judge_try(cv, load, noise)
        tries.append((why != "", cv, runs, sample, load, why))
        if not why:
            break
    _, cv, runs, sample, load, why = min(tries, key=lambda t: (t[0], t[1]))
    record = PointNoise(cv=cv, rounds=rounds, tries=len(tries), background_cores=load.cpu_cores if load else None,
                        gpu_processes=load.gpu_processes if load else 0, noisy=bool(why), reason=why)
    return _merge(runs, batch, shape, sample).model_copy(update={"noise": record})


def _merge(runs: list[BatchMeasurement], batch: int, shape: WorkloadShape, sample: Optional[DeviceSample]) -> ProfilePoint:
    merged = BatchMeasurement(
        batch=batch,
        wall_s=sum(r.wall_s for r in runs),
        output_tokens=sum(r.output_tokens for r in runs),
        ttft_ms=[x for r in runs for x in r.ttft_ms],
        tpot_ms=[x for r in runs for x in r.tpot_ms],
        kv_usage_peak=max(r.kv_usage_peak for r in runs),
        rounds=len(runs),
        decode_window_s=sum(r.decode_window_s for r in runs),
        decode_window_tokens=sum(r.decode_window_tokens for r in runs),
    )
    return to_point(merged, shape, sample)


def sweep(runner: BatchRunner, shape: WorkloadShape, rules: PlateauRules, cfg: SweepConfig = SweepConfig(),
          sampler: Optional[DeviceSampler] = None,
          progress: Callable[[ProfilePoint, int], None] = lambda p, i: None,
          probe: Optional[LoadProbe] = None) -> list[ProfilePoint]:
    """Doubling then bisection; returns the points sorted by batch."""
    points: dict[int, ProfilePoint] = {}

    def take(b: int) -> ProfilePoint:
        p = measure(runner, b, shape, sampler, cfg, probe)
        points[b] = p
        progress(p, len(points))
        return p

    b, prev = 1, None
    budget = cfg.max_points
    while b <= runner.max_batch and len(points) < budget:
        p = take(b)
        slow = p.tpot_p50_ms > rules.tpot_growth_limit * points[1].tpot_p50_ms
        over_slo = rules.tpot_p99_slo_ms is not None and p.tpot_p99_ms > rules.tpot_p99_slo_ms
        if prev is not None and (p.tokens_per_s / prev.tokens_per_s - 1 < rules.doubling_gain_eps or slow or over_slo):
            break
        prev, b = p, b * 2
    # Bisect the knee: between the largest batch below the target and the first one at it.
    while len(points) < budget:
        knee = find_knee(list(points.values()), rules)
        below = [x for x in sorted(points) if x < knee.b_star]
        if not below:
            break
        lo, hi = below[-1], knee.b_star
        mid = (lo + hi) // 2
        if mid in points or mid <= lo:
            break
        take(mid)
    return [points[k] for k in sorted(points)]


def fit_points(runner: BatchRunner, shape: WorkloadShape, b_star: int, sampler: Optional[DeviceSampler],
               cfg: SweepConfig, probe: Optional[LoadProbe] = None) -> tuple[WorkloadShape, list[ProfilePoint]]:
    """Two points at a longer prompt (B*/2 and B*) so the fit can tell KV reads from other work."""
    long = shape.model_copy(update={"prompt_tokens": int(shape.prompt_tokens * cfg.fit_context_factor)})
    batches = sorted({max(1, b_star // 2), max(2, b_star)})
    return long, [measure(runner, min(b, runner.max_batch), long, sampler, cfg, probe) for b in batches]


def build_profile(
    runner: BatchRunner, shape: WorkloadShape, rules: PlateauRules, *, model: str, device_name: str,
    engine_version: str, dtype: str, weight_bytes: int, kv_bytes_per_token: int, overhead_bytes: int,
    cfg: SweepConfig = SweepConfig(), sampler: Optional[DeviceSampler] = None,
    progress: Callable[[ProfilePoint, int], None] = lambda p, i: None, clock: Callable[[], float] = time.monotonic,
    probe: Optional[LoadProbe] = None, quiet: Optional[QuietWait] = None,
) -> Profile:
    """Sweep, knee, fit points and step-time fit: everything `plateau profile` reports."""
    if shape.output_tokens_cv:
        raise ValueError(f"output_tokens_cv {shape.output_tokens_cv}: a profile sends requests of exactly "
                         f"{shape.output_tokens} output tokens; profile with 0 (the planner predicts other spreads)")
    t0 = clock()
    points = sweep(runner, shape, rules, cfg, sampler, progress, probe)
    knee = find_knee(points, rules)
    _, extra = fit_points(runner, shape, knee.b_star, sampler, cfg, probe)
    for i, p in enumerate(extra, start=len(points) + 1):
        progress(p, i)
    return Profile(
        model=model, device_name=device_name, engine_version=engine_version, dtype=dtype, shape=shape,
        rules=rules, points=points, fit_points=extra, knee=knee, step_model=fit_step_model(points + extra),
        weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes_per_token, overhead_bytes=overhead_bytes,
        seconds=clock() - t0, noise=summarize([(p.batch, p.noise) for p in points + extra], cfg.noise, quiet),
    )
