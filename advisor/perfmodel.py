"""A calibrated performance model: throughput, B*, memory and N-replica gains on devices we lack.

Per decode step of B sequences at context c (seconds):

    t(B, c) = t_fixed + B*t_seq + device(B, c)
    device  = combine(bytes / BW_eff, flops / F_eff)      max on GPUs, sum on CPUs
    bytes   = weights / eff_w + B*c*kv_bytes_per_token / eff_kv   (over the datasheet bandwidth)
    flops   = B * (2*params + 4*c*layers*heads*head_dim)

`t_fixed + B*t_seq` is the engine's CPU work per step (scheduler, input preparation, output
processing), serial with the device work inside one engine. Each request also pays a prefill
(prompt FLOPs) on the device, amortised over its output tokens. N engines on one device share
its bandwidth and compute but overlap their CPU work: on a time-shared GPU one engine's device
phase runs while the others do CPU work, so the aggregate is N*B / max(Z + D, N*D) (Z = CPU,
D = device time of one step); on a CPU each engine is pinned to cores/N, so it gets 1/N of the
device and its CPU work runs on its own cores: N*B / (Z + D(1/N)).

Device datasheet figures and every fitted constant, with its source, live in
`perf_constants.json` next to this file. `fit_engine` turns measured points into recalibrated
constants (pure); `CalibrationFile` keeps them beside a profile store. `predicted_profile` turns
a prediction into a `Profile`, so the existing planner sizes memory and N from it unchanged.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from advisor.memory import KV_BLOCK_TOKENS, MemoryModel
from advisor.plateau import PlateauRules, ProfilePoint, find_knee, fit_step_model
from advisor.planner import DeviceSpec, PlannerConfig, ReplicaPlan, kv_pool_bytes, plan_replicas
from advisor.profiler import PREDICTED_ENGINE_VERSION, Profile, SharePoint, WorkloadShape
from advisor.sharing import Sharing
from advisor.store import ProfileStore, StoreKey

CONSTANTS_FILE = Path(__file__).resolve().with_name("perf_constants.json")
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
# Peak FLOP/s of float32 against the FP16/BF16 figure: TF32 tensor cores on NVIDIA GPUs and
# AVX-512 FP32 FMA against BF16 dot products on CPUs both run at half rate.
FLOAT32_PEAK_RATIO = 0.5


class PerfModelError(ValueError):
    """An unknown device or engine, or a prediction that cannot be made."""


class DeviceFigures(BaseModel):
    """A device's datasheet figures (the `cpu` entry: this machine, bandwidth measured)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["cuda", "cpu"]
    memory_bytes: int = Field(gt=0, description="Memory an engine can see (NVML total on GPUs).")
    dram_bandwidth_bytes_per_s: float = Field(gt=0, description="Datasheet (or measured, cpu) DRAM bandwidth.")
    peak_flops: float = Field(gt=0, description="Dense FP16/BF16 peak (tensor cores on GPUs), FLOP/s.")
    cores: int = Field(0, ge=0, description="CPU cores (cpu only): replicas are pinned to cores/N each.")
    core_bandwidth_bytes_per_s: Optional[float] = Field(
        None, gt=0, description="cpu only: bandwidth one core draws (measured); None = the full bandwidth.")
    nvml_names: list[str] = Field(default_factory=list, description="NVML names that mean this device.")
    source: str = Field(description="Where the figures come from.")


class EngineConstants(BaseModel):
    """An engine's fitted costs on a kind of device."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    t_fixed_s: float = Field(ge=0, description="CPU time per decode step, independent of batch.")
    t_seq_s: float = Field(ge=0, description="CPU time per sequence per decode step.")
    weight_bw_efficiency: float = Field(gt=0, le=1, description="Share of DRAM bandwidth reached reading weights.")
    kv_bw_efficiency: float = Field(gt=0, le=1, description="Share of DRAM bandwidth reached reading the KV cache.")
    flops_efficiency: float = Field(gt=0, le=1, description="Share of peak FLOP/s reached by decode and prefill.")
    overhead_bytes: int = Field(ge=0, description="Engine memory beyond weights and KV (activations, graphs).")
    overlap_memory_and_compute: bool = Field(
        description="Device time = max(memory, compute) (GPUs) or their sum (CPUs: the same cores do both).")
    source: str = Field(description="What the constants were fitted on, and how.")


class PerfConstants(BaseModel):
    """The data file: devices, engines, and which engine predicts which device kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    devices: dict[str, DeviceFigures]
    engines: dict[str, EngineConstants]
    engine_for_kind: dict[str, str] = Field(description="Device kind -> engine constants used by default.")
    notes: list[str] = Field(default_factory=list, description="Free text: assumptions behind the numbers.")

    def device(self, name: str) -> DeviceFigures:
        if name not in self.devices:
            raise PerfModelError(f"device {name!r} is not in {CONSTANTS_FILE.name}; known: {', '.join(sorted(self.devices))}")
        return self.devices[name]

    def engine_for(self, device: DeviceFigures) -> EngineConstants:
        return self.engines[self.engine_for_kind[device.kind]]


def load_constants(path: Path = CONSTANTS_FILE) -> PerfConstants:
    return PerfConstants.model_validate_json(Path(path).read_text())


class StepPrediction(BaseModel):
    """One decode step of one engine, split into its parts (seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    batch: int
    context_tokens: float
    cpu_s: float = Field(description="t_fixed + B*t_seq.")
    memory_s: float = Field(description="Bytes read / effective bandwidth.")
    compute_s: float = Field(description="FLOPs / effective peak.")
    device_s: float = Field(description="max or sum of memory_s and compute_s, plus prefill amortised per step.")
    step_s: float = Field(description="cpu_s + device_s: the time per output token (TPOT).")
    bound: Literal["memory", "compute", "overhead"]

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s


def _bandwidth(dev: DeviceFigures, share: float) -> float:
    """Bandwidth one engine draws alone on `share` of the device: a GPU engine time-shares the whole
    device; a CPU engine on k cores draws at most k x one core's bandwidth."""
    if dev.kind != "cpu" or dev.core_bandwidth_bytes_per_s is None:
        return dev.dram_bandwidth_bytes_per_s
    cores = max(1.0, dev.cores * share)
    return min(dev.dram_bandwidth_bytes_per_s, dev.core_bandwidth_bytes_per_s * cores)


def _flops(dev: DeviceFigures, eng: EngineConstants, mem: MemoryModel) -> float:
    ratio = FLOAT32_PEAK_RATIO if mem.dtype == "float32" else 1.0
    return dev.peak_flops * ratio * eng.flops_efficiency


def decode_flops_per_token(mem: MemoryModel, context_tokens: float) -> float:
    """2 FLOPs per parameter plus attention over the context (QK^T and AV)."""
    a = mem.architecture
    return 2.0 * mem.parameters + 4.0 * context_tokens * a.num_layers * a.num_attention_heads * a.head_dim


def prefill_flops(mem: MemoryModel, prompt_tokens: int) -> float:
    a = mem.architecture
    return 2.0 * mem.parameters * prompt_tokens + 2.0 * prompt_tokens**2 * a.num_layers * a.num_attention_heads * a.head_dim


def step(mem: MemoryModel, dev: DeviceFigures, eng: EngineConstants, batch: int, shape: WorkloadShape,
         share: float = 1.0, prefill: bool = True) -> StepPrediction:
    """One engine's decode step on `share` of the device (1/N when replicas partition it)."""
    ctx = shape.context_tokens
    bw = _bandwidth(dev, share)
    flops_s = _flops(dev, eng, mem) * share
    memory_s = mem.weight_bytes / (bw * eng.weight_bw_efficiency) + batch * ctx * mem.kv_bytes_per_token / (bw * eng.kv_bw_efficiency)
    compute_s = batch * decode_flops_per_token(mem, ctx) / flops_s
    device_s = max(memory_s, compute_s) if eng.overlap_memory_and_compute else memory_s + compute_s
    if prefill:
        # batch/output requests finish per step on average; each new one pays its prompt's FLOPs.
        device_s += batch / shape.output_tokens * prefill_flops(mem, shape.prompt_tokens) / flops_s
    cpu_s = eng.t_fixed_s + batch * eng.t_seq_s
    bound = "overhead" if cpu_s > device_s else ("memory" if memory_s >= compute_s else "compute")
    return StepPrediction(batch=batch, context_tokens=ctx, cpu_s=cpu_s, memory_s=memory_s, compute_s=compute_s,
                          device_s=device_s, step_s=cpu_s + device_s, bound=bound)


def aggregate_tokens_per_s(mem: MemoryModel, dev: DeviceFigures, eng: EngineConstants, batch: int,
                           shape: WorkloadShape, replicas: int, prefill: bool = True) -> float:
    """Output tokens/s of `replicas` engines, each at `batch`, decoding at once on one device.

    GPU: the device is time-shared in whole steps (one CUDA graph per step), so engines fall into
    turn: N*B / max(Z + D, N*D). CPU: each engine owns cores/N (its CPU work and compute run
    there) and all share the memory bus, which they hit at fine grain and at random: mean-value
    analysis of N engines over one shared station (the bus, busy bytes/BW per step).
    """
    if dev.kind != "cpu":
        s = step(mem, dev, eng, batch, shape, prefill=prefill)
        return replicas * batch / max(s.step_s, replicas * s.device_s)
    s = step(mem, dev, eng, batch, shape, share=1.0 / replicas, prefill=prefill)
    bus = step(mem, dev, eng, batch, shape, prefill=prefill).memory_s  # bus busy time per step, any share
    own = s.step_s - bus  # CPU work, compute on its cores, and any bandwidth a core cannot draw
    queue, cycles_per_s = 0.0, 0.0
    for n in range(1, replicas + 1):
        wait = bus * (1.0 + queue)
        cycles_per_s = n / (own + wait)
        queue = cycles_per_s * wait
    return cycles_per_s * batch


def fits(mem: MemoryModel, dev: DeviceFigures, eng: EngineConstants, batch: int, shape: WorkloadShape,
         replicas: int = 1, cfg: Optional[PlannerConfig] = None) -> bool:
    """`replicas` engines, each with KV for `batch` full-length sequences plus the planner's headroom,
    fit the planner's share of the device (a batch outside this set could never be planned)."""
    cfg = cfg or PlannerConfig()
    kv = kv_pool_bytes(mem.kv_bytes_per_token, KV_BLOCK_TOKENS[dev.kind], batch, shape.kv_tokens_per_sequence,
                       cfg.kv_headroom, cfg.max_model_len)
    return replicas * (mem.weight_bytes + eng.overhead_bytes + kv) <= dev.memory_bytes * cfg.device_memory_fraction


# ---- fitting constants to measured points ---------------------------------------------------
class MeasuredPoint(BaseModel):
    """One measured throughput: `tokens_per_s` output tokens/s of `replicas` engines at `batch` each."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    batch: int = Field(ge=1)
    shape: WorkloadShape
    tokens_per_s: float = Field(gt=0, description="Output tokens/s (all replicas together).")
    replicas: int = Field(1, ge=1)
    prefill: bool = Field(True, description="The measurement includes prefill (False: decode window only).")


EFFICIENCY_FLOOR = 1e-3  # the smallest efficiency a fit considers
GOLDEN_SECTION_STEPS = 80  # shrinks a search interval by 0.618^80: far below any measurement's noise
FITTABLE = ("t_fixed_s", "t_seq_s", "flops_efficiency", "kv_bw_efficiency", "weight_bw_efficiency")


def fit_engine(points: list[MeasuredPoint], mem: MemoryModel, dev: DeviceFigures, base: EngineConstants,
               free: tuple[str, ...] = ("t_fixed_s", "t_seq_s"), source: str = "") -> EngineConstants:
    """Constants that best predict `points` (least squares on relative error), the rest kept from `base`.

    t_fixed and t_seq enter linearly and are solved exactly (non-negative); an efficiency in
    `free` is searched on a log scale in (0, 1], at most one at a time so the fit stays identifiable.
    """
    unknown = [f for f in free if f not in FITTABLE]
    if unknown:
        raise PerfModelError(f"cannot fit {unknown}; fittable constants: {', '.join(FITTABLE)}")
    effs = [f for f in free if f.endswith("efficiency")]
    if len(effs) > 1:
        raise PerfModelError(f"fit one efficiency at a time, not {effs}: they are not separable from throughput alone")
    linear = [f for f in free if f in ("t_fixed_s", "t_seq_s")]
    if len(points) < len(free):
        raise PerfModelError(f"{len(points)} points cannot fit {len(free)} constants {list(free)}")

    def solve(eff: Optional[float]) -> tuple[float, EngineConstants]:
        c = base if eff is None else base.model_copy(update={effs[0]: eff})
        c = _fit_linear(points, mem, dev, c, linear)
        return _rel_error(points, mem, dev, c), c

    if not effs:
        _, best = solve(None)
    else:
        log_eff = _golden_section(lambda x: solve(math.exp(x))[0], math.log(EFFICIENCY_FLOOR), 0.0)
        _, best = solve(math.exp(log_eff))
    return best.model_copy(update={"source": source or best.source})


def fit_output_cv(points: list[MeasuredPoint], mem: MemoryModel, dev: DeviceFigures, eng: EngineConstants,
                  upper: float = 3.0) -> float:
    """The output-length spread (`WorkloadShape.output_tokens_cv`) that best explains `points`, measured
    on a mixed-length workload (e.g. ShareGPT) whose means their shapes give, with `eng` held.

    Engine constants fitted on fixed-length points cannot see a workload's spread; it only enters
    through the running batch's mean context. Golden section on [0, upper] (the error is unimodal in cv).
    """
    def error(cv: float) -> float:
        with_cv = [p.model_copy(update={"shape": p.shape.model_copy(update={"output_tokens_cv": cv})}) for p in points]
        return _rel_error(with_cv, mem, dev, eng)

    return _golden_section(error, 0.0, upper)


def _golden_section(f: Callable[[float], float], lo: float, hi: float) -> float:
    """The x in [lo, hi] where a unimodal `f` is smallest (GOLDEN_SECTION_STEPS narrowings)."""
    for _ in range(GOLDEN_SECTION_STEPS):
        m1, m2 = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)
        if f(m1) <= f(m2):
            hi = m2
        else:
            lo = m1
    return (lo + hi) / 2


def _fit_linear(points: list[MeasuredPoint], mem: MemoryModel, dev: DeviceFigures, c: EngineConstants,
                names: list[str]) -> EngineConstants:
    """t_fixed and t_seq from one-engine points: step - device time = t_fixed + B*t_seq."""
    names = list(names)
    rows = [p for p in points if p.replicas == 1]
    while names and rows:
        zero = c.model_copy(update={n: 0.0 for n in names})
        a, y = [], []
        for p in rows:
            measured_step = p.batch / p.tokens_per_s
            rest = step(mem, dev, zero, p.batch, p.shape, prefill=p.prefill).step_s
            w = 1.0 / measured_step  # relative error
            a.append([w * (1.0 if n == "t_fixed_s" else float(p.batch)) for n in names])
            y.append(w * (measured_step - rest))
        sol = _lstsq(a, y)
        negative = [n for n, v in zip(names, sol) if v < 0]
        if not negative:
            return c.model_copy(update=dict(zip(names, sol)))
        c = c.model_copy(update={negative[0]: 0.0})
        names.remove(negative[0])
    return c


def _lstsq(a: list[list[float]], y: list[float]) -> list[float]:
    import numpy as np

    sol, *_ = np.linalg.lstsq(np.array(a, dtype=float), np.array(y, dtype=float), rcond=None)
    return [float(v) for v in sol]


def _rel_error(points: list[MeasuredPoint], mem: MemoryModel, dev: DeviceFigures, c: EngineConstants) -> float:
    err = 0.0
    for p in points:
        pred = aggregate_tokens_per_s(mem, dev, c, p.batch, p.shape, p.replicas, prefill=p.prefill)
        err += (pred / p.tokens_per_s - 1.0) ** 2
    return err


class CalibrationFile:
    """Recalibrated engine constants per device name, kept as JSON beside a profile store's tables
    (in its folder or under its URL)."""

    NAME = "calibrations.json"

    def __init__(self, store: ProfileStore):
        self.files = store.files
        self.path = self.files.name(self.NAME)

    def read(self) -> dict[str, EngineConstants]:
        data = self.files.read(self.NAME)
        if data is None:
            return {}
        return {k: EngineConstants.model_validate(v) for k, v in json.loads(data).items()}

    def put(self, device_name: str, constants: EngineConstants) -> str:
        with self.files.writer():
            body = {k: v.model_dump() for k, v in self.read().items()}
            body[device_name] = constants.model_dump()
            self.files.write(self.NAME, json.dumps(body, indent=2).encode())
        return self.path


def measured_points(profile: Profile) -> list[MeasuredPoint]:
    """A stored profile's points as fit input (decode-window throughput, no prefill)."""
    out = []
    for p in profile.points + profile.fit_points:
        # the point's context, with the shape's output part (its length spread included) kept
        ctx_prompt = max(1, round(p.context_tokens - (profile.shape.context_tokens - profile.shape.prompt_tokens)))
        shape = profile.shape.model_copy(update={"prompt_tokens": ctx_prompt})
        out.append(MeasuredPoint(batch=p.batch, shape=shape, tokens_per_s=p.tokens_per_s, prefill=False))
    return out


# ---- the prediction `plateau predict` prints ------------------------------------------------
class PredictedPoint(BaseModel):
    """One batch size of a predicted curve."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    batch: int
    tokens_per_s: float = Field(description="Output tokens/s of one engine, prefill included.")
    decode_tokens_per_s: float = Field(description="Output tokens/s while decoding only (what a profile measures).")
    tpot_ms: float = Field(description="Time per decode step.")
    bound: Literal["memory", "compute", "overhead"]
    cpu_ms: float = Field(description="Engine CPU time per step (t_fixed + B*t_seq).")
    device_ms: float = Field(description="Device time per step (bandwidth/compute, prefill amortised).")


class Prediction(BaseModel):
    """What `plateau predict` prints."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    device: str
    dtype: str
    memory_bytes: int
    dram_bandwidth_bytes_per_s: float
    peak_flops: float
    shape: WorkloadShape
    engine: EngineConstants = Field(description="Constants the prediction used.")
    points: list[PredictedPoint]
    b_star: int = Field(description="Knee of the predicted decode curve (decode_tokens_per_s, as a measured "
                                    "profile's knee) by advisor/plateau.py find_knee with the default PlateauRules.")
    knee_reason: str
    memory_per_replica_bytes: int = Field(description="The planner's sizing at B* (weights + overhead + KV + headroom).")
    replicas: Optional[int] = None
    replica_batch: Optional[int] = Field(None, description="Batch per replica of the best N-replica configuration.")
    aggregate_tokens_per_s: Optional[float] = None
    replication_gain: Optional[float] = Field(None, description="aggregate / best single engine - 1.")
    sharing: Optional[Sharing] = Field(None, description="How the N engines share the GPU (GPUs only).")
    notes: list[str] = Field(default_factory=list)


SHARING_NOTES: dict[str, str] = {
    "mps": ("MPS: N engines take turns on the device's bandwidth and overlap their CPU work, calibrated on the BCA "
            "paper's MPS runs (gains within 8 points); where one engine's kernels leave bandwidth unused, concurrent "
            "kernels under MPS can gain more than predicted (the paper's 4 x 96)"),
    "time-slice": ("time-slicing: kernels of different engines never run at once, as this model assumes, and each "
                   "switch between the engines' contexts costs time NVIDIA does not publish and the model does not "
                   "count: an upper bound; vLLM's async scheduling already overlaps most CPU work within one engine. "
                   "The two-engine run on the device decides"),
    "exclusive": "exclusive-process compute mode without MPS: one engine per GPU, no N-engine prediction",
}


def predict_points(mem: MemoryModel, dev: DeviceFigures, eng: EngineConstants, shape: WorkloadShape,
                   batches: list[int]) -> list[PredictedPoint]:
    out = []
    for b in batches:
        s = step(mem, dev, eng, b, shape)
        d = step(mem, dev, eng, b, shape, prefill=False)
        out.append(PredictedPoint(batch=b, tokens_per_s=s.tokens_per_s, decode_tokens_per_s=d.tokens_per_s,
                                  tpot_ms=d.step_s * 1e3, bound=s.bound, cpu_ms=s.cpu_s * 1e3,
                                  device_ms=s.device_s * 1e3))
    return out


def _profile_point(mem: MemoryModel, dev: DeviceFigures, eng: EngineConstants, batch: int,
                   shape: WorkloadShape, share: float = 1.0) -> ProfilePoint:
    s = step(mem, dev, eng, batch, shape, share=share, prefill=False)
    prefill_ms = prefill_flops(mem, shape.prompt_tokens) * batch / (_flops(dev, eng, mem) * share) * 1e3
    return ProfilePoint(
        batch=batch, context_tokens=shape.context_tokens, tokens_per_s=s.tokens_per_s,
        e2e_tokens_per_s=step(mem, dev, eng, batch, shape, share=share).tokens_per_s,
        tpot_p50_ms=s.step_s * 1e3, tpot_p99_ms=s.step_s * 1e3, ttft_ms=prefill_ms + s.step_s * 1e3, kv_usage=0.0,
        # The device's busy share: the planner's GPU rules N <= 1/u (MPS) and N <= 1/busy (time-slicing)
        # then equal this model's N*B/max(Z+D, N*D).
        dram_bw_util=100.0 * s.device_s / s.step_s if dev.kind == "cuda" else None,
        gpu_busy=100.0 * s.device_s / s.step_s if dev.kind == "cuda" else None,
    )


def predicted_profile(model: str, mem: MemoryModel, device_name: str, dev: DeviceFigures, eng: EngineConstants,
                      shape: WorkloadShape, batches: list[int], rules: PlateauRules = PlateauRules(),
                      fit_context_factor: float = 4.0, sharing: Optional[Sharing] = None) -> Profile:
    """A `Profile` built from predicted points, for the planner (engine_version 'predicted')."""
    usable = [b for b in batches if fits(mem, dev, eng, b, shape)]
    if not usable:
        raise PerfModelError(
            f"{model} does not fit on {device_name} even at batch {min(batches)}: weights {mem.weight_bytes / 2**30:.1f} GiB "
            f"+ overhead {eng.overhead_bytes / 2**30:.1f} GiB + KV > 90% of {dev.memory_bytes / 2**30:.1f} GiB; "
            "use a larger device or a smaller dtype"
        )
    points = [_profile_point(mem, dev, eng, b, shape) for b in usable]
    knee = find_knee(points, rules)
    long = shape.model_copy(update={"prompt_tokens": int(shape.prompt_tokens * fit_context_factor)})
    extra = [_profile_point(mem, dev, eng, b, long) for b in sorted({max(1, knee.b_star // 2), max(2, knee.b_star)})]
    shares = []
    cores = dev.cores if dev.kind == "cpu" else 0
    if cores >= 2:
        shares = [SharePoint(cores=cores // 2, point=_profile_point(mem, dev, eng, knee.b_star, shape,
                                                                    share=(cores // 2) / cores))]
    return Profile(
        model=model, device_name=device_name, engine_version=PREDICTED_ENGINE_VERSION, dtype=mem.dtype, shape=shape,
        rules=rules, points=points, fit_points=extra, knee=knee, step_model=fit_step_model(points + extra),
        weight_bytes=mem.weight_bytes, kv_bytes_per_token=mem.kv_bytes_per_token, overhead_bytes=eng.overhead_bytes,
        seconds=0.0, cores=cores, share_points=shares, sharing=sharing if dev.kind == "cuda" else None,
    )


def predict(model: str, mem: MemoryModel, device_name: str, dev: DeviceFigures, eng: EngineConstants,
            shape: WorkloadShape, batches: Sequence[int] = DEFAULT_BATCHES, replicas: Optional[int] = None,
            rules: PlateauRules = PlateauRules(), sharing: Sharing = "mps") -> Prediction:
    """The curve, its knee, the planner's memory per replica, and optionally N replicas' aggregate
    on a GPU shared as `sharing` (`SHARING_NOTES`: what each mode's number rests on)."""
    from advisor.planner import evaluate_shape

    notes = []
    batches = list(batches)
    too_big = [b for b in batches if not fits(mem, dev, eng, b, shape)]
    if too_big:
        notes.append(f"batches {too_big} left out: one engine's KV for them does not fit 90% of the device")
    usable = [b for b in batches if b not in too_big]
    profile = predicted_profile(model, mem, device_name, dev, eng, shape, batches, rules)
    spec = DeviceSpec(kind=dev.kind, name=device_name, memory_bytes=dev.memory_bytes, cores=dev.cores)
    ev = evaluate_shape(profile, spec, shape)
    points = predict_points(mem, dev, eng, shape, usable)
    out = dict(model=model, device=device_name, dtype=mem.dtype, memory_bytes=dev.memory_bytes,
               dram_bandwidth_bytes_per_s=dev.dram_bandwidth_bytes_per_s, peak_flops=dev.peak_flops, shape=shape,
               engine=eng, points=points, b_star=ev.b_star, knee_reason=profile.knee.reason,
               memory_per_replica_bytes=ev.memory_per_replica_bytes, notes=notes,
               sharing=sharing if dev.kind == "cuda" else None)
    if replicas is not None and dev.kind == "cuda":
        notes.append(SHARING_NOTES[sharing])
    if replicas is not None and replicas > 1 and dev.kind == "cuda" and sharing == "exclusive":
        out.update(notes=notes)
        return Prediction(**out)
    if replicas is not None:
        best_single = max(p.tokens_per_s for p in points)
        options = [(aggregate_tokens_per_s(mem, dev, eng, b, shape, replicas), b) for b in usable
                   if fits(mem, dev, eng, b, shape, replicas)]
        if not options:
            notes.append(f"{replicas} replicas do not fit the device at any batch")
        else:
            agg, b = max(options)
            out.update(replicas=replicas, replica_batch=b, aggregate_tokens_per_s=agg,
                       replication_gain=agg / best_single - 1.0)
    return Prediction(**out)


# ---- this machine -----------------------------------------------------------------------------
def this_cpu(figures: DeviceFigures, bandwidth: float, core_bandwidth: float) -> DeviceFigures:
    """The data file's `cpu` entry with this machine's memory, cores and measured bandwidths."""
    import psutil

    cores = len(os.sched_getaffinity(0))
    bandwidth = max(bandwidth, core_bandwidth)  # all cores never draw less than one: a lower reading is noise
    return figures.model_copy(update={
        "memory_bytes": int(psutil.virtual_memory().total), "cores": cores,
        "peak_flops": figures.peak_flops / max(1, figures.cores) * cores,
        "dram_bandwidth_bytes_per_s": bandwidth, "core_bandwidth_bytes_per_s": core_bandwidth,
        "source": f"this machine, measured now: {bandwidth / 1e9:.1f} GB/s on all cores, {core_bandwidth / 1e9:.1f} GB/s on one",
    })


def measure_memory_bandwidth(array_bytes: int = 128 << 20, repeats: int = 20, threads: Optional[int] = None) -> float:
    """Bytes/s of numpy copies on every core at once (read + write counted), best of `repeats`.

    Best, not mean: on a shared machine other work only ever lowers the reading (~4 s here)."""
    import numpy as np

    n = threads or len(os.sched_getaffinity(0))
    pairs = [(np.ones(array_bytes // 8), np.empty(array_bytes // 8)) for _ in range(n)]
    best = 0.0
    for _ in range(repeats):
        barrier = threading.Barrier(n + 1)

        def copy(src, dst) -> None:
            barrier.wait()
            np.copyto(dst, src)

        workers = [threading.Thread(target=copy, args=p) for p in pairs]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        best = max(best, 2 * array_bytes * n / (time.perf_counter() - t0))
    return best


# ---- devices named in the data file: a real profile wins, measured points recalibrate ----------
def nvml_device_names(dev: DeviceFigures) -> set[str]:
    """Profile-store device names that mean `dev` (`cuda:<NVML name>`, as deployments/profiling.py keys them)."""
    return {f"cuda:{n}" for n in dev.nvml_names}


def stored_profiles_on(store: ProfileStore, dev: DeviceFigures) -> list[Profile]:
    """Real (not predicted) profiles measured on `dev`, newest first."""
    df = store.profiles()
    if df.empty:
        return []
    df = df[df.device_name.isin(nvml_device_names(dev)) & (df.engine_version != PREDICTED_ENGINE_VERSION)]
    keys = [StoreKey(**row) for row in df[list(StoreKey.model_fields)].to_dict("records")]
    return [p for p in (store.get_profile(k) for k in reversed(keys)) if p is not None]


def recalibrate(profile: Profile, mem: MemoryModel, dev: DeviceFigures, base: EngineConstants) -> EngineConstants:
    """Engine constants fitted to a real profile's points. With two context lengths (the profiler's
    fit points) the KV-read efficiency separates from the per-sequence CPU time and is fitted too."""
    pts = measured_points(profile)
    contexts = {p.context_tokens for p in profile.points + profile.fit_points}
    free = ("t_fixed_s", "t_seq_s", "kv_bw_efficiency") if len(contexts) > 1 else ("t_fixed_s", "t_seq_s")
    return fit_engine(pts, mem, dev, base, free=free, source=(
        f"recalibrated on the measured profile of {profile.model} on {profile.device_name} "
        f"(vLLM {profile.engine_version}, {len(pts)} points, fitted {', '.join(free)})"))


def engine_for_named_device(constants: PerfConstants, device_name: str, store: Optional[ProfileStore],
                            mem_for: Callable[[str, str], MemoryModel]) -> tuple[EngineConstants, str]:
    """The engine constants to predict `device_name` with, and where they come from: recalibrated on
    the newest real profile measured on that device (any model; stored in the store's
    calibrations.json), else an earlier recalibration, else the data file's."""
    dev = constants.device(device_name)
    default = constants.engine_for(dev), f"{CONSTANTS_FILE.name} ({constants.engine_for_kind[dev.kind]})"
    if store is None:
        return default
    for ref in stored_profiles_on(store, dev):
        try:
            mem = mem_for(ref.model, ref.dtype)
        except ValueError:  # the profiled model's config is no longer reachable: try an older one
            continue
        eng = recalibrate(ref, mem, dev, default[0])
        CalibrationFile(store).put(device_name, eng)
        return eng, f"recalibrated on the measured profile of {ref.model} on {ref.device_name}"
    calibrations = CalibrationFile(store)
    earlier = calibrations.read().get(device_name)
    return (earlier, calibrations.path) if earlier is not None else default


def plan_on_named_device(model: str, mem: MemoryModel, device_name: str, constants: PerfConstants,
                         shape: WorkloadShape, store: Optional[ProfileStore],
                         mem_for: Callable[[str, str], MemoryModel], batches: Sequence[int] = DEFAULT_BATCHES,
                         cfg: Optional[PlannerConfig] = None) -> ReplicaPlan:
    """`plateau plan MODEL --device NAME` for a device named in the data file.

    A stored real profile of this model on that device wins. Otherwise the plan comes from the
    predicted curve, with the constants of `engine_for_named_device`.
    """
    dev = constants.device(device_name)
    spec = DeviceSpec(kind=dev.kind, name=device_name, memory_bytes=dev.memory_bytes, cores=dev.cores)
    cfg = cfg or PlannerConfig()
    own = next((p for p in (stored_profiles_on(store, dev) if store is not None else [])
                if p.model == model and p.dtype == mem.dtype), None)
    if own is not None:
        plan = plan_replicas(own, spec, shape, cfg)
        why = f"measured profile of {model} on {own.device_name} found in the store: planned from it, not from the prediction"
        return plan.model_copy(update={"reasons": [why] + plan.reasons})
    eng, source = engine_for_named_device(constants, device_name, store, mem_for)
    return predicted_plan(model, mem, device_name, dev, spec, eng, source, shape, batches, cfg)[0]


def predicted_plan(model: str, mem: MemoryModel, device_name: str, dev: DeviceFigures, spec: DeviceSpec,
                   eng: EngineConstants, source: str, shape: WorkloadShape, batches: Sequence[int] = DEFAULT_BATCHES,
                   cfg: Optional[PlannerConfig] = None, sharing: Optional[Sharing] = None,
                   rules: PlateauRules = PlateauRules()) -> tuple[ReplicaPlan, Profile]:
    """The plan the predicted curve of `model` on `dev` gives (`predicted` set; its first reason says
    where the figures and constants come from), and that predicted profile."""
    cfg = cfg or PlannerConfig()
    profile = predicted_profile(model, mem, device_name, dev, eng, shape, list(batches), rules=rules, sharing=sharing)
    # a predicted curve plans B*: only a measured batch past the knee sets the cap (PlannerConfig.admit_plateau)
    plan = plan_replicas(profile, spec, shape, cfg.model_copy(update={"admit_plateau": False}))
    bound = step(mem, dev, eng, profile.b_star, shape).bound
    figures = (f"{dev.dram_bandwidth_bytes_per_s / 1e9:.1f} GB/s" if dev.kind == "cpu" else
               f"{dev.dram_bandwidth_bytes_per_s / 1e12:.2f} TB/s, {dev.peak_flops / 1e12:.0f} TFLOP/s")
    why = (f"predicted, not measured: no profile of {model} on a {device_name} here; curve from the performance "
           f"model with {dev.source.split(':')[0]} figures ({figures}) and engine constants from {source} "
           f"(at B*={profile.b_star}: {bound} bound)")
    return plan.model_copy(update={"reasons": [why] + [_predicted_wording(r) for r in plan.reasons],
                                   "predicted": True}), profile


def _predicted_wording(reason: str) -> str:
    """The planner words its reasons for measured profiles; say what is predicted instead."""
    return (reason.replace("measured knee:", "knee of the predicted curve:")
            .replace("of DRAM bandwidth (GPM)", "of the device's time (predicted: device time / step time)"))
