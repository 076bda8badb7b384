"""The replica plan for one model on one device: B*, memory per replica, and N.

Memory per replica = weights + the engine's measured overhead + a KV pool that holds B*
sequences at their full length (prompt + output) plus headroom, so the planned batch never
preempts. N is the count with the best predicted aggregate throughput that fits the device's
memory and, where measured, its DRAM bandwidth and cores:
- GPU, by how engines share it (`advisor/sharing.py`): under MPS one engine at B* uses a share u
  of the DRAM bandwidth (NVML GPM) and N replicas add up to at most 1/u of it; time-slicing
  engines never run kernels at once, so N replicas add at most 1/busy (GPM graphics activity)
  and 1/u; an exclusive-process GPU holds one engine. Without the readings no gain is predicted.
  A gain measured on the device (N engines against one, `Profile.measured_gain`) overrides the
  model: the measurement decides.
- CPU: replicas split the cores. The profile's share point (B* on half the cores) gives the
  scaling exponent g of throughput with cores, T(k) ~ k^g; N replicas then give
  T_all * N^(1-g). Without it, scaling is taken as linear (no gain).
A larger N must beat the smaller one by `min_gain`; every choice is explained in `reasons`.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from advisor.memory import KV_BLOCK_TOKENS
from advisor.plateau import plateau_batches
from advisor.profiler import MeasuredGain, Profile, WorkloadShape
from advisor.sharing import Sharing, mps_thread_percentage


class PlanError(ValueError):
    """No plan exists: the model does not fit, or no batch meets the SLO."""


class DeviceSpec(BaseModel):
    """A device replicas are planned onto."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["cuda", "cpu"]
    name: str = Field(description="Device name (profile store key).")
    memory_bytes: int = Field(gt=0, description="Total memory of the device (CPU: of the node).")
    cores: int = Field(0, ge=0, description="CPU cores (CPU devices).")


class PlannerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    device_memory_fraction: float = Field(0.9, gt=0, le=1, description="Share of device memory all replicas may use.")
    kv_headroom: float = Field(0.10, ge=0, description="Extra KV beyond B* full-length sequences.")
    max_replicas: int = Field(8, ge=1, description="Most replicas per device.")
    min_gain: float = Field(0.05, ge=0, description="A larger N must beat a smaller one by this share.")
    vllm_default_fraction: float = Field(0.9, gt=0, le=1, description="vLLM's default single-engine share.")
    max_model_len: Optional[int] = Field(
        None, ge=1, description="Context length the engine starts with; vLLM refuses a KV pool smaller than one "
                                "such sequence, so the pool never goes below it plus a block.")
    admit_plateau: bool = Field(
        True, description="Let each replica batch up to the largest measured batch still on the plateau within the "
                          "latency rules (not only B*) where N such replicas fit: the same throughput, and under "
                          "overload requests decode in the engines instead of waiting in Serve's queue (lower "
                          "TTFT, slower steps). Costs the KV of the extra sequences; false sizes replicas for B*.")


class Validation(BaseModel):
    """A measured check of a plan: N replicas at once against the best single engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    single_engine_batch: int = Field(description="Batch of the single engine (its own knee).")
    single_engine_tokens_per_s: float = Field(description="Measured, one engine on the whole device.")
    replicas: int
    aggregate_tokens_per_s: float = Field(description="Measured, N planned replicas decoding at once.")
    gain: float = Field(description="aggregate / single - 1.")
    predicted_aggregate_tokens_per_s: float


class ReplicaPlan(BaseModel):
    """What `plateau plan` prints and the app builder applies."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    device_name: str
    device_kind: Literal["cuda", "cpu"]
    replicas_per_device: int
    num_gpus_per_replica: float
    num_cpus_per_replica: float
    max_num_seqs: int = Field(description="Batch cap of each replica: B*, or the largest batch still on the plateau.")
    b_star: Optional[int] = Field(None, description="The knee: smallest batch on the plateau (None: an older plan).")
    kv_cache_bytes: int
    memory_per_replica_bytes: int
    context_tokens: int = Field(description="Prompt + output tokens a sequence may hold.")
    predicted_tokens_per_s_per_replica: float
    predicted_aggregate_tokens_per_s: float
    single_engine_tokens_per_s: float = Field(description="Best single engine on the whole device (measured).")
    memory_freed_bytes: int = Field(description="vs vLLM's default single engine at gpu_memory_utilization 0.9.")
    reasons: list[str]
    validation: Optional[Validation] = Field(None, description="Set by `plateau plan --validate`.")
    provisional: bool = Field(False, description="Made from a profile flagged as noisy, or predicted: used until a "
                              "measured profile replaces it, never cached.")
    predicted: bool = Field(False, description="Made from the performance model's predicted curve, not a measured "
                            "profile (a first start serves on it while the profile is measured).")
    profile: Optional[Profile] = Field(None, exclude=True, description="A first start's predicted profile, which "
                                       "the app plans and re-packs with until the measured one is stored (a measured "
                                       "profile is read from the store instead).")
    sharing: Optional[Sharing] = Field(None, description="How the replicas share their GPU (None on CPUs or where "
                                       "the profile did not record it).")
    mps_thread_percentage: Optional[int] = Field(None, description="Each replica's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE "
                                                 "(MPS, N > 1).")
    measured_gain: Optional[MeasuredGain] = Field(None, description="N engines against one, measured on the GPU "
                                                  "(the profile's); it decided N.")
    warnings: list[str] = Field(default_factory=list, description="Reasons an operator should act on (no GPM "
                                "readings, no MPS), logged as warnings and shown by `plateau status`.")


class ReplicaOption(BaseModel):
    """What N replicas per device would give for one workload shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    replicas_per_device: int
    fits: bool = Field(description="N replicas, each with KV for B* full-length sequences, fit the device.")
    predicted_aggregate_tokens_per_s: float


class ShapeEvaluation(BaseModel):
    """B*, memory per replica and every N's predicted throughput for one shape (pure, cheap)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    shape: WorkloadShape
    b_star: int
    kv_cache_bytes: int
    memory_per_replica_bytes: int
    usable_memory_bytes: int
    context_tokens: int
    options: list[ReplicaOption] = Field(description="N = 1 .. the replica cap, fitting or not.")
    reasons: list[str]
    warnings: list[str] = Field(default_factory=list, description="The reasons an operator should act on.")

    def option(self, n: int) -> Optional[ReplicaOption]:
        return next((o for o in self.options if o.replicas_per_device == n), None)


def kv_pool_bytes(kv_bytes_per_token: int, block_tokens: int, sequences: int, context_tokens: int,
                  headroom: float = 0.0, max_model_len: Optional[int] = None) -> int:
    """The one KV pool sizing rule: `sequences` sequences of `context_tokens` in whole blocks, plus
    `headroom`, and never less than one `max_model_len` sequence plus a block (vLLM refuses to
    start an engine whose pool cannot hold one full-length sequence)."""
    blocks = math.ceil(context_tokens / block_tokens) * sequences
    pool = int(math.ceil(blocks * (1 + headroom)) * block_tokens * kv_bytes_per_token)
    return max(pool, kv_pool_floor_bytes(kv_bytes_per_token, block_tokens, max_model_len))


def kv_pool_floor_bytes(kv_bytes_per_token: int, block_tokens: int, max_model_len: Optional[int]) -> int:
    """One `max_model_len` sequence plus a block, in whole blocks (0 without a max_model_len)."""
    if max_model_len is None:
        return 0
    return (math.ceil(max_model_len / block_tokens) + 1) * block_tokens * kv_bytes_per_token


def evaluate_shape(profile: Profile, device: DeviceSpec, shape: Optional[WorkloadShape] = None,
                   cfg: PlannerConfig = PlannerConfig()) -> ShapeEvaluation:
    """Predicted aggregate throughput of each N for `shape`; the planner and the re-pack policy share it."""
    shape = shape or profile.shape
    reasons: list[str] = []
    b_star, t_star = _b_star(profile, shape, reasons)

    block = KV_BLOCK_TOKENS[device.kind]
    context = shape.kv_tokens_per_sequence
    kv = kv_pool_bytes(profile.kv_bytes_per_token, block, b_star, context, cfg.kv_headroom, cfg.max_model_len)
    per_replica = profile.weight_bytes + profile.overhead_bytes + kv
    usable = int(device.memory_bytes * cfg.device_memory_fraction)
    if shape.output_tokens_cv == 0:
        sized = f"+{cfg.kv_headroom:.0%} headroom, so the planned batch never preempts"
    else:
        sized = (f"+{cfg.kv_headroom:.0%} headroom; outputs spread (cv {shape.output_tokens_cv:.2f}): a batch of "
                 f"mostly long requests can still preempt")
    reasons.append(
        f"memory per replica {_gib(per_replica)}: weights {_gib(profile.weight_bytes)} + engine overhead "
        f"{_gib(profile.overhead_bytes)} + KV {_gib(kv)} ({b_star} sequences x {context} tokens, {sized})"
    )
    if kv == kv_pool_floor_bytes(profile.kv_bytes_per_token, block, cfg.max_model_len) and \
            kv > kv_pool_bytes(profile.kv_bytes_per_token, block, b_star, context, cfg.kv_headroom):
        reasons.append(
            f"KV pool raised to {_gib(kv)}: one max_model_len {cfg.max_model_len}-token sequence plus a "
            f"{block}-token block (vLLM refuses to start with less); lower max_model_len to size the pool by B*"
        )
    limits = {"memory": int(usable // per_replica), "max_replicas": cfg.max_replicas}
    if device.kind == "cpu":
        limits["cores"] = max(1, device.cores)
    if device.kind == "cuda" and profile.sharing == "exclusive":
        limits["exclusive-process GPU"] = 1
    n_cap = min(limits.values())
    reasons.append("replica limits: " + ", ".join(f"{k} {v}" for k, v in limits.items()))
    warnings: list[str] = []
    predict = _aggregate_model(profile, device, t_star, reasons, warnings)
    options = [ReplicaOption(replicas_per_device=n, fits=n <= n_cap, predicted_aggregate_tokens_per_s=predict(n))
               for n in range(1, cfg.max_replicas + 1)]
    return ShapeEvaluation(shape=shape, b_star=b_star, kv_cache_bytes=kv, memory_per_replica_bytes=per_replica,
                           usable_memory_bytes=usable, context_tokens=context, options=options, reasons=reasons,
                           warnings=warnings)


def plan_replicas(profile: Profile, device: DeviceSpec, shape: Optional[WorkloadShape] = None,
                  cfg: PlannerConfig = PlannerConfig()) -> ReplicaPlan:
    ev = evaluate_shape(profile, device, shape, cfg)
    reasons = list(ev.reasons)
    per_replica, usable, context = ev.memory_per_replica_bytes, ev.usable_memory_bytes, ev.context_tokens
    fitting = [o for o in ev.options if o.fits]
    if not fitting:
        raise PlanError(
            f"{profile.model} does not fit on {device.name}: one replica needs {_gib(per_replica)} but "
            f"{cfg.device_memory_fraction:.0%} of the device is {_gib(usable)}; shorten the context "
            f"(prompt+output {context} tokens), lower the batch, or use a larger device"
        )
    best = fitting[0]
    for o in fitting[1:]:
        if o.predicted_aggregate_tokens_per_s > best.predicted_aggregate_tokens_per_s * (1 + cfg.min_gain):
            best = o
    best_n, best_t = best.replicas_per_device, best.predicted_aggregate_tokens_per_s
    reasons.append(f"N={best_n}: predicted aggregate {best_t:.0f} tok/s "
                   f"(N=1: {fitting[0].predicted_aggregate_tokens_per_s:.0f}; a larger N must gain >= {cfg.min_gain:.0%})")
    batch, kv = ev.b_star, ev.kv_cache_bytes
    if cfg.admit_plateau and _profiled(profile, ev.shape):
        batch, kv = _admission_batch(profile, device, ev, best_n, cfg, reasons)
        per_replica = profile.weight_bytes + profile.overhead_bytes + kv
    default_engine = int(device.memory_bytes * cfg.vllm_default_fraction)
    used = best_n * per_replica
    return ReplicaPlan(
        model=profile.model, device_name=device.name, device_kind=device.kind, replicas_per_device=best_n,
        num_gpus_per_replica=round(1.0 / best_n, 6) if device.kind == "cuda" else 0.0,
        num_cpus_per_replica=round(device.cores / best_n, 4) if device.kind == "cpu" else 1.0,
        max_num_seqs=batch, b_star=ev.b_star, kv_cache_bytes=kv, memory_per_replica_bytes=per_replica,
        context_tokens=context, predicted_tokens_per_s_per_replica=best_t / best_n,
        predicted_aggregate_tokens_per_s=best_t,
        single_engine_tokens_per_s=max(p.tokens_per_s for p in profile.points),
        memory_freed_bytes=max(0, default_engine - used), reasons=reasons,
        sharing=profile.sharing if device.kind == "cuda" else None,
        mps_thread_percentage=mps_thread_percentage(best_n) if profile.sharing == "mps" and best_n > 1 else None,
        measured_gain=profile.measured_gain if device.kind == "cuda" else None, warnings=ev.warnings,
    )


class GainCheck(BaseModel):
    """What to measure on a GPU before the plan is trusted: `replicas` engines at `batch` each,
    each with a `kv_cache_bytes` pool, against one engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    replicas: int = Field(ge=2)
    batch: int = Field(ge=1)
    kv_cache_bytes: int = Field(gt=0)


def gain_check(profile: Profile, device: DeviceSpec, plan: ReplicaPlan, shape: Optional[WorkloadShape] = None,
               cfg: PlannerConfig = PlannerConfig()) -> Optional[GainCheck]:
    """The measurement a GPU plan still needs, or None: on a GPU whose profile has no measured gain
    yet (the gain model rests on readings and a sharing mode nothing else confirms), the planned N
    (at least 2, so a plan of one engine is checked too) at B*; none on CPUs, on an
    exclusive-process GPU, or where two replicas do not fit."""
    if device.kind != "cuda" or profile.measured_gain is not None or profile.sharing == "exclusive":
        return None
    ev = evaluate_shape(profile, device, shape, cfg)
    n = max(2, plan.replicas_per_device)
    option = ev.option(n)
    if option is None or not option.fits:
        return None
    if n == plan.replicas_per_device:
        return GainCheck(replicas=n, batch=plan.max_num_seqs, kv_cache_bytes=plan.kv_cache_bytes)
    return GainCheck(replicas=n, batch=ev.b_star, kv_cache_bytes=ev.kv_cache_bytes)


def _admission_batch(profile: Profile, device: DeviceSpec, ev: ShapeEvaluation, n: int, cfg: PlannerConfig,
                     reasons: list[str]) -> tuple[int, int]:
    """The largest measured batch past B* on the plateau whose KV pool lets `n` replicas still fit
    (`cfg.admit_plateau`), and that pool; B* and its pool where none is."""
    block = KV_BLOCK_TOKENS[device.kind]
    larger = [b for b in plateau_batches(profile.points, profile.rules) if b > ev.b_star]
    for b in reversed(larger):
        kv = kv_pool_bytes(profile.kv_bytes_per_token, block, b, ev.context_tokens, cfg.kv_headroom, cfg.max_model_len)
        if n * (profile.weight_bytes + profile.overhead_bytes + kv) <= ev.usable_memory_bytes:
            at = next(p.tokens_per_s for p in profile.points if p.batch == b)
            reasons.append(
                f"max_num_seqs {b} (B*={ev.b_star}): batch {b} measured {at:.0f} tok/s, still on the plateau within "
                f"the latency rules, so a replica admits {b} requests at the same throughput instead of queueing "
                f"them in Serve; KV {_gib(kv)} for {b} sequences, memory per replica "
                f"{_gib(profile.weight_bytes + profile.overhead_bytes + kv)} (PlannerConfig.admit_plateau=False keeps B*)"
            )
            return b, kv
    if larger:
        reasons.append(f"max_num_seqs {ev.b_star} (B*): the KV of batch {larger[0]} (still on the plateau) would not "
                       f"fit {n} replicas")
    return ev.b_star, ev.kv_cache_bytes


def _profiled(profile: Profile, shape: WorkloadShape) -> bool:
    """Whether `shape` is the workload `profile` measured (its knee is measured, not predicted)."""
    return shape.bucket == profile.shape.bucket and shape.output_tokens_cv == profile.shape.output_tokens_cv


def _b_star(profile: Profile, shape: WorkloadShape, reasons: list[str]) -> tuple[int, float]:
    if _profiled(profile, shape):
        reasons.append(f"measured knee: {profile.knee.reason}")
        return profile.knee.b_star, profile.knee.tokens_per_s_at_b_star
    m = profile.step_model
    largest = max(p.batch for p in profile.points)
    per_seq = m.per_sequence_ms(shape.context_tokens)
    fit = (f"step model t(B,ctx)={m.a_ms:.2f}+{m.b_ms:.4f}B+{m.c_ms:.6f}B*ctx ms at ctx {shape.context_tokens:.0f}, "
           f"fit error {m.mape:.1f}%")
    if per_seq <= 0:
        # A launch-bound engine: the fit sees no cost per sequence, so throughput never flattens in
        # the model (B* infinite). Take the largest batch the data supports and its measured rate.
        b = 2 * largest
        t = max(p.tokens_per_s for p in profile.points)
        reasons.append(
            f"workload {_workload(shape)} differs from the profiled {_workload(profile.shape)}, and the fitted cost per "
            f"sequence b + c*ctx = {per_seq:.4f} ms is <= 0 ({fit}): throughput does not flatten within the "
            f"measured batches, so B*={b} (2x the largest measured batch) at the best measured {t:.0f} tok/s; "
            f"profile this workload (plateau profile --prompt-tokens/--output-tokens) for a measured knee"
        )
        return b, t
    predicted = m.b_star(shape.context_tokens, profile.rules.plateau_fraction)
    b = max(1, min(int(predicted), 2 * largest))
    # a fit with a negative fixed cost can predict a step <= 0 ms at small B: use the measured rate
    t = m.tokens_per_s(b, shape.context_tokens) if m.step_ms(b, shape.context_tokens) > 0 else \
        max(p.tokens_per_s for p in profile.points)
    reasons.append(
        f"workload {_workload(shape)} differs from the profiled {_workload(profile.shape)}: B*={b} predicted by the "
        f"{fit} ({t:.0f} tok/s)"
    )
    return b, t


def _workload(shape: WorkloadShape) -> str:
    return shape.bucket + (f" (output spread cv {shape.output_tokens_cv:.2f})" if shape.output_tokens_cv else "")


def _aggregate_model(profile: Profile, device: DeviceSpec, t_star: float, reasons: list[str], warnings: list[str]):
    if device.kind == "cuda":
        ratio = _gpu_ratio(profile, reasons, warnings)
        return lambda n: t_star * ratio(n)
    g = profile.cpu_scaling_exponent
    if g is None:
        reasons.append("no CPU share point in the profile: throughput assumed linear in cores (no gain)")
        g = 1.0
    else:
        reasons.append(f"throughput scales with cores as k^{g:.2f} (share point): N replicas give N^{1 - g:.2f}x")
    return lambda n: t_star * n ** (1.0 - g)


NO_GPM = ("NVML GPM gave no readings on this GPU (it needs a Hopper or newer GPU and, in a container, the "
          "profiling capability; `plateau doctor` checks both)")


def _gpu_ratio(profile: Profile, reasons: list[str], warnings: list[str]):
    """N engines' aggregate over one engine's on a GPU: the sharing mode's bound, then the gain
    measured on the device where there is one."""
    bound = _gpu_gain_bound(profile, reasons, warnings)
    measured = profile.measured_gain
    if measured is None:
        if bound is None:
            return lambda n: 1.0
        return lambda n: min(n, bound)
    m, r = measured.replicas, max(1.0, 1.0 + measured.gain)
    mode = profile.sharing or "sharing not recorded"
    reasons.append(
        f"measured on the device ({mode}): {m} engines at batch {measured.batch} decoded "
        f"{measured.aggregate_tokens_per_s:.0f} tok/s against one engine's {measured.single_tokens_per_s:.0f} "
        f"({measured.gain:+.0%}); the measurement decides: only N=1 and N={m} are measured, so no other N is "
        "credited with more than the one below it"
    )
    return lambda n: r if n >= m else 1.0


def _gpu_gain_bound(profile: Profile, reasons: list[str], warnings: list[str]) -> Optional[float]:
    """The most N engines can give over one (x), from the profile's GPM readings at B* under its
    sharing mode; None where the readings it needs are missing (no gain is then predicted). What
    an operator can fix (no readings, no MPS) also goes to `warnings`."""
    at_knee = next((p for p in profile.points if p.batch == profile.knee.b_star), None)
    u = at_knee.dram_bw_util / 100.0 if at_knee is not None and at_knee.dram_bw_util else None
    busy = at_knee.gpu_busy / 100.0 if at_knee is not None and at_knee.gpu_busy else None
    sharing = profile.sharing
    if sharing == "exclusive":
        reasons.append("the GPU's compute mode is EXCLUSIVE_PROCESS without MPS: one engine per GPU")
        warnings.append(reasons[-1] + "; start MPS (docs/gpu-clusters.md) to pack several")
        return 1.0
    if sharing == "time-slice":
        if busy is None:
            reasons.append(
                f"time-slicing (no MPS) and no GPU busy reading: {NO_GPM}; no gain predicted from the model: a "
                "measured run of two engines against one decides")
            warnings.append(reasons[-1])
            return None
        bound = 1.0 / min(1.0, max(busy, u or 0.0))
        reasons.append(
            f"time-slicing (no MPS): kernels of different engines never run at once; one engine at B* keeps the GPU "
            f"busy {busy:.0%} of the time (GPM graphics activity"
            + (f", DRAM bandwidth {u:.0%}" if u is not None else "") + f"): N replicas add up to {bound:.2f}x; "
            "start MPS for concurrent kernels")
        warnings.append(reasons[-1])
        return bound
    where = "MPS" if sharing == "mps" else "sharing mode not recorded with this profile, taken as MPS"
    if u is None:
        reasons.append(f"{where}: no DRAM bandwidth reading: {NO_GPM}; no gain predicted from the model: a measured "
                       "run of two engines against one decides")
        warnings.append(reasons[-1])
        return None
    u = min(1.0, u)
    reasons.append(f"{where}: one engine at B* uses {u:.0%} of DRAM bandwidth (GPM): N replicas add up to {1 / u:.2f}x")
    return 1.0 / u


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
