"""The vLLM side of the advisor: profile and plan a model on the device this process runs on.

`advisor/` owns the sweep, the knee, the fit and the planner; this module supplies the engine (a
`BatchRunner` over a real `AsyncLLM` built through the engine seam: closed batches of exactly B
random token-id prompts, ignore_eos, timing TTFT and every token) and wires them together for
`plateau profile` / `plateau plan` and the Advisor actor's device task. A profile starts only once
the device is quiet (or the wait times out), records its noise, is measured again when it was taken
under interference, and a flagged profile is never reused for a later plan.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import platform
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import psutil
from pydantic import BaseModel, ConfigDict, Field

from advisor.memory import MemoryModel
from advisor.noise import CpuLoadProbe, NoiseConfig, QuietWait, wait_for_quiet
from advisor.noise import summarize as summarize_noise
from advisor.nvml import GpuSelectionError, NvmlDevice, NvmlSampler, cuda_device, cuda_index, gpu_sampler
from advisor.plateau import PlateauRules, ProfilePoint, find_knee
from advisor.planner import (DeviceSpec, GainCheck, PlanError, PlannerConfig, ReplicaPlan, Validation, gain_check,
                             kv_pool_bytes, kv_pool_floor_bytes, plan_replicas)
from advisor.profiler import (
    BatchMeasurement,
    ExecutionMode,
    MeasuredGain,
    Profile,
    SharePoint,
    SweepConfig,
    WorkloadShape,
    build_profile,
    execution_mode,
    measure,
)
from advisor.sharing import SharingDetection, detect_sharing, mps_thread_percentage, probe_sharing
from advisor.store import ProfileStore
from advisor.storage import StoreMissing, StoreUrlError
from deployments.cores import usable_cores
from deployments.engine import cpu_cores_for, start_engine, vllm_version
from deployments.reaper import ensure_reaper
from deployments.replica_stats import ReplicaStats, stat_logger_factory
from deployments.spec import DeviceKind, EngineKwargValue, ReplicaResources, ReplicaSpec

KV_POLL_S = 0.05
# CPU cores an idle serving stack keeps busy (Ray, Serve, the replicas and their idle engines): 0.42-0.45
# of 2 cores measured beside `make run`'s two replicas; a profile beside replicas allows this much more.
SERVING_IDLE_CORES = 0.5
PROFILING_LEN_MARGIN_TOKENS = 16  # max_model_len above the longest profiled sequence


class SweepMemoryRules(BaseModel):
    """How large the profiling engine's KV pool may be."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cpu_kv_bytes: int = Field(4 << 30, gt=0, description="Default KV pool cap on CPU (host memory is shared).")
    cuda_free_share: float = Field(0.9, gt=0, le=1.0, description="Share of the device's free memory (read "
                                   "before the engine starts) the profiling engine may fill.")
    cuda_reserve_bytes: int = Field(3 << 30, ge=0, description="Kept out of the KV pool on CUDA: the engine's "
                                    "activation peak, CUDA graphs and CUDA context.")
    kv_slack: float = Field(1.05, ge=1.0, description="KV pool over the exact need of max_batch sequences.")


SWEEP_MEMORY = SweepMemoryRules()


def cuda_kv_room(free_bytes: int, weight_bytes: int, rules: SweepMemoryRules = SWEEP_MEMORY) -> int:
    """KV bytes a profiling engine can hold on a CUDA device with `free_bytes` free before it starts
    (vLLM does not cap `kv_cache_memory_bytes` by its memory share: a pool that does not fit OOMs)."""
    return int(free_bytes * rules.cuda_free_share) - weight_bytes - rules.cuda_reserve_bytes


def sweep_kv_cap(kind: DeviceKind, user_cap: Optional[int], weight_bytes: int, free_bytes: Optional[int],
                 rules: SweepMemoryRules = SWEEP_MEMORY) -> int:
    """The profiling engine's KV pool cap: the user's, else 4 GiB on CPU; on CUDA never more than
    the free device memory holds after weights and the reserve."""
    if kind == "cpu":
        return user_cap if user_cap is not None else rules.cpu_kv_bytes
    if free_bytes is None:
        raise AdvisorError("no NVIDIA GPU found through NVML to size the profiling KV pool; pass --max-kv-bytes")
    room = cuda_kv_room(free_bytes, weight_bytes, rules)
    if room <= 0:
        raise AdvisorError(
            f"the device has {free_bytes / 2**30:.1f} GiB free: no room for a KV pool after "
            f"{weight_bytes / 2**30:.1f} GiB of weights and a {rules.cuda_reserve_bytes / 2**30:.1f} GiB reserve; "
            "free the device (other engines?) or profile a smaller model"
        )
    return room if user_cap is None else min(user_cap, room)


class DeviceMemory(BaseModel):
    """A CUDA device's free and total memory, read together before an engine starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    free_bytes: int = Field(ge=0)
    total_bytes: int = Field(gt=0)


def cuda_memory_share(free_bytes: int, total_bytes: int, weight_bytes: int, kv_bytes: int, reserve_bytes: int,
                      engines: int = 1, rules: SweepMemoryRules = SWEEP_MEMORY) -> float:
    """`device_memory_fraction` for `engines` engines on one device, each holding its weights, a KV
    pool of `kv_bytes` and `reserve_bytes` (activations, CUDA graphs, CUDA context).

    With an explicit KV size vLLM sizes nothing from its share, but each engine's worker refuses
    to start unless the free memory it sees is at least its share of the WHOLE device (vLLM 0.32
    `vllm/v1/worker/utils.py: request_memory`): a fixed 0.9 fails whenever another tenant holds a
    tenth of the GPU. So each engine asks for what it needs, rounded up to the 4 decimals
    `engine_args` passes, and all of them together must fit `cuda_free_share` of the free memory
    (the rule `cuda_kv_room` sizes the pool by): they start one after another, each seeing its
    predecessors' memory gone, and the margin covers the CUDA context each creates before vLLM
    reads the free memory, and the rounding (at most 1/10000 of the device)."""
    need = weight_bytes + kv_bytes + reserve_bytes
    per_engine = math.ceil(need / total_bytes * 10_000) / 10_000
    room = free_bytes * rules.cuda_free_share
    if engines * need > room:
        gib = 2**30
        raise AdvisorError(
            f"{engines} engine(s) of {need / gib:.1f} GiB each ({weight_bytes / gib:.1f} GiB weights + "
            f"{kv_bytes / gib:.1f} GiB KV pool + {reserve_bytes / gib:.1f} GiB reserve) need "
            f"{engines * need / gib:.1f} GiB, "
            f"but the device has {free_bytes / gib:.1f} of {total_bytes / gib:.1f} GiB free and vLLM starts an engine "
            f"only when its share is free ({rules.cuda_free_share:.0%} of the free memory is usable); free the device "
            f"(other processes hold {(total_bytes - free_bytes) / gib:.1f} GiB), lower --max-kv-bytes or profile a "
            "smaller model"
        )
    return min(1.0, engines * per_engine)


def batch_pool_holds(max_batch: int, pool_bytes: int, per_sequence_bytes: int) -> int:
    """The largest batch (<= max_batch) whose sequences all fit in the KV pool at once: past it
    the sweep would measure KV admission, not the bandwidth plateau."""
    fits = pool_bytes // per_sequence_bytes
    if fits < 1:
        raise AdvisorError(
            f"a KV pool of {pool_bytes / 2**20:.0f} MiB holds no sequence of this workload "
            f"({per_sequence_bytes / 2**20:.1f} MiB each); raise --max-kv-bytes or shorten the prompts"
        )
    return min(max_batch, fits)


def profiling_spec(
    model_path: str, memory: MemoryModel, shape: WorkloadShape, max_batch: int, device_kind: DeviceKind,
    max_kv_bytes: int, dtype: str = "auto", engine_kwargs: Optional[dict[str, EngineKwargValue]] = None,
    sweep: SweepConfig = SweepConfig(), enforce_eager: bool = True, rules: SweepMemoryRules = SWEEP_MEMORY,
    device_memory: Optional[DeviceMemory] = None,
) -> ReplicaSpec:
    """One engine on the whole device, with KV room for `max_batch` sequences of the longest shape
    (the fit points' prompt, `sweep.fit_context_factor` x the workload's); fewer when `max_kv_bytes`
    holds fewer: the batch is clamped to what the pool holds. On CUDA with `device_memory` (read
    just before the engine starts) the pool also fits what that free memory holds (`cuda_kv_room`)
    and the memory share is what the engine needs (`cuda_memory_share`), so it starts next to
    other tenants."""
    longest = int(shape.prompt_tokens * sweep.fit_context_factor) + shape.output_tokens
    max_model_len = min(memory.max_model_len, longest + PROFILING_LEN_MARGIN_TOKENS)
    context = min(longest, max_model_len)
    wanted = kv_pool_bytes(memory.kv_bytes_per_token, memory.kv_block_tokens, max_batch, context, rules.kv_slack - 1.0)
    cuda_memory = device_memory if device_kind == "cuda" else None
    if cuda_memory is not None:
        max_kv_bytes = min(max_kv_bytes, cuda_kv_room(cuda_memory.free_bytes, memory.weight_bytes, rules))
    floor = kv_pool_floor_bytes(memory.kv_bytes_per_token, memory.kv_block_tokens, max_model_len)
    kv = max(floor, min(max_kv_bytes, wanted))
    batch = batch_pool_holds(max_batch, kv, kv_pool_bytes(memory.kv_bytes_per_token, memory.kv_block_tokens, 1, context))
    share = {}
    if cuda_memory is not None:
        share["device_memory_fraction"] = cuda_memory_share(cuda_memory.free_bytes, cuda_memory.total_bytes,
                                                            memory.weight_bytes, kv, rules.cuda_reserve_bytes,
                                                            rules=rules)
    return ReplicaSpec(
        served_name="profile", model_path=model_path, device_kind=device_kind, replicas_per_device=1,
        resources=ReplicaResources(num_cpus=1), max_num_seqs=batch, kv_cache_bytes=kv,
        max_model_len=max_model_len, dtype=dtype, enforce_eager=enforce_eager,
        engine_kwargs=dict(engine_kwargs or {}), **share,
    )


def nvml_engine_bytes(used_before: int, used_after: int) -> int:
    """Device memory an engine holds: NVML's used memory after its start minus before it.

    Read by NVML, not `torch.cuda.mem_get_info()`: that would create a CUDA context in the
    profiling process and count it into every planned replica."""
    return max(0, used_after - used_before)


def non_kv_overhead(engine_bytes: int, weight_bytes: int, kv_bytes: int) -> int:
    """What an engine holds beyond its weights and KV pool (activations, CUDA graphs, context)."""
    return max(0, engine_bytes - weight_bytes - kv_bytes)


def engine_peak_bytes(after_start_bytes: int, used_before: int, points: Sequence[ProfilePoint]) -> int:
    """The most device memory the engine held while it was profiled: its reading right after start,
    or the largest device memory used during a point (`gpu_memory_used_bytes`, NVML's peak over the
    point) minus what was used before the engine started, whichever is larger.

    In CUDA-graph mode vLLM empties its allocator cache around graph capture, so the reading after
    start lacks the prefill activations; the first long prompt allocates them again and the caching
    allocator keeps them, so a planned replica needs room for them. Points without a reading (CPU,
    no NVML, profiles stored before points kept one) leave the after-start reading."""
    sampled = [nvml_engine_bytes(used_before, p.gpu_memory_used_bytes) for p in points
               if p.gpu_memory_used_bytes is not None]
    return max([after_start_bytes, *sampled])


class VllmBatchRunner:
    """Runs closed batches on one AsyncLLM; use as a context manager (shuts the engine down)."""

    def __init__(self, spec: ReplicaSpec, seed: int = 0, cores: Optional[list[int]] = None, yield_cpu: bool = False):
        self.spec = spec
        self.max_batch = spec.max_num_seqs
        self.stats = ReplicaStats()
        if spec.device_kind == "cpu" and cores is None:
            cores = usable_cores()
        self.cores = cores
        # The engine runs on cuda:0 as this process sees it; NVML reads that same device.
        self._device = cuda_device("cuda") if spec.device_kind == "cuda" else None
        self._used_before = self._device.memory_used() if self._device is not None else 0
        # the engine dies with this process, however it ends (a device task cancelled at its time limit)
        ensure_reaper()
        self.engine = start_engine(spec, cores, [stat_logger_factory(self.stats)], yield_cpu=yield_cpu)
        self._loop = asyncio.new_event_loop()
        self._rng = random.Random(seed)
        self.num_kv_blocks = self.engine.vllm_config.cache_config.num_gpu_blocks
        self.kv_block_tokens = self.engine.vllm_config.cache_config.block_size

    def __enter__(self) -> "VllmBatchRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.shutdown()
        # The engine's output-handler task lives on our loop: let it finish before closing.
        pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    @property
    def used_before_bytes(self) -> int:
        """Device memory in use before the engine started (0 on CPU): subtracted from the points'
        NVML readings, which count every process on the device."""
        return self._used_before

    def engine_memory_bytes(self) -> int:
        """Memory the engine holds: RSS of its processes on CPU, device memory used on CUDA."""
        if self.spec.device_kind == "cuda":
            if self._device is None:
                raise AdvisorError("no NVIDIA GPU found through NVML to measure the engine's memory")
            return nvml_engine_bytes(self._used_before, self._device.memory_used())
        children = psutil.Process().children(recursive=True)
        return sum(_rss(p) for p in children if p.name().startswith("VLLM"))

    def run(self, batch: int, shape: WorkloadShape) -> BatchMeasurement:
        return self._loop.run_until_complete(self._run(batch, shape))

    async def _run(self, batch: int, shape: WorkloadShape) -> BatchMeasurement:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=shape.output_tokens, ignore_eos=True, temperature=0.0,
                                detokenize=False, output_kind=RequestOutputKind.DELTA)
        peak = 0.0
        done = asyncio.Event()

        async def watch_kv() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, self.stats.snapshot(time.monotonic()).kv_usage)
                await asyncio.sleep(KV_POLL_S)

        async def one() -> tuple[float, list[tuple[float, int]]]:
            # Distinct random prompts: prefix caching must not turn prefill into a cache hit.
            ids = [self._rng.randrange(100, 10_000) for _ in range(shape.prompt_tokens)]
            t0 = time.perf_counter()
            stamps: list[tuple[float, int]] = []  # (arrival time, new tokens)
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
                stamps.append((time.perf_counter(), len(out.outputs[0].token_ids)))
            return t0, stamps

        watcher = asyncio.create_task(watch_kv())
        start = time.perf_counter()
        results = await asyncio.gather(*[one() for _ in range(batch)])
        wall = time.perf_counter() - start
        done.set()
        await watcher
        return summarize(batch, wall, results, peak)


def summarize(batch: int, wall_s: float, results: list[tuple[float, list[tuple[float, int]]]],
              kv_peak: float) -> BatchMeasurement:
    """Per-request TTFT/TPOT plus the steady-state decode window.

    The window runs from the moment every request has its first token (all prefills done) to the
    moment the first request finishes: exactly B sequences decode in it, with no prefill mixed
    in, so tokens/window is the decode throughput of batch B.
    """
    ttft, tpot = [], []
    for t0, stamps in results:
        first, last = stamps[0][0], stamps[-1][0]
        n = sum(k for _, k in stamps)
        ttft.append((first - t0) * 1000.0)
        tpot.append((last - first) * 1000.0 / max(1, n - 1))
    begin = max(stamps[0][0] for _, stamps in results)
    end = min(stamps[-1][0] for _, stamps in results)
    in_window = sum(k for _, stamps in results for t, k in stamps if begin < t <= end)
    return BatchMeasurement(
        batch=batch, wall_s=wall_s, output_tokens=sum(k for _, stamps in results for _, k in stamps),
        ttft_ms=ttft, tpot_ms=tpot, kv_usage_peak=kv_peak,
        decode_window_s=max(0.0, end - begin), decode_window_tokens=in_window,
    )


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


# ---- profile and plan a model on the device this process runs on ------------------------------
class AdvisorError(ValueError):
    """A user-facing advisor failure: unusable model, no room on the device, impossible SLO."""


class AdvisorRequest(BaseModel):
    """What to profile/plan, and how (the `plateau profile` / `plateau plan` options)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field(description="Embedded name, model folder or hub id.")
    device: str = Field("cpu", description="cpu or cuda[:INDEX].")
    shape: WorkloadShape = Field(default_factory=WorkloadShape)
    max_batch: int = Field(128, ge=2, description="Largest batch the sweep may try.")
    max_points: int = Field(8, ge=3, description="Batch sizes in the main sweep, at most.")
    min_tokens_per_point: int = Field(256, ge=1, description="Small batches repeat until this many tokens per try.")
    max_kv_bytes: Optional[int] = Field(None, gt=0, description="Cap on the profiling engine's KV pool; default "
                                        "4 GiB on CPU, what the free device memory holds on CUDA.")
    enforce_eager: Optional[bool] = Field(None, description="Profile without CUDA graphs / torch.compile; default: "
                                          "as served by default, eager on CPU, CUDA graphs on CUDA.")
    tpot_slo_ms: Optional[float] = Field(None, gt=0, description="TPOT p99 limit that caps B*.")
    dtype: str = "auto"
    dummy: bool = Field(False, description="Random weights (load_format=dummy), token-id prompts.")
    share_point: bool = Field(True, description="CPU: also measure B* on half the cores.")
    store_dir: Optional[str] = Field(None, description="Profile store folder or URL (s3://bucket/prefix); "
                                                       "default $PLATEAU_HOME/profiles.")
    shared_store: bool = Field(False, description="store_dir is the app's profile_store, which every node reads: a "
                                                  "folder not mounted on a node fails there instead of keeping "
                                                  "profiles of its own.")
    device_memory: Optional[int] = Field(None, gt=0, description="Device memory override in bytes.")
    reprofile: bool = Field(False, description="Profile even if a stored profile exists.")
    validate_plan: bool = Field(False, description="Start the planned N replicas and measure them.")
    max_model_len: Optional[int] = Field(None, ge=1, description="Context length the served replicas start with "
                                                                 "(the plan's KV pool holds at least one such sequence).")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Quiet wait, repeat and interference limits.")
    first_start: Literal["profile", "predict"] = Field(
        "profile", description="Without a trusted stored profile: profile first (`profile`), or plan from the "
                               "performance model's prediction for this device at once (`predict`; the profile is "
                               "measured later, beside the serving replicas). A device the model cannot predict "
                               "profiles first either way.")

    @property
    def kind(self) -> DeviceKind:
        if self.device == "cpu":
            return "cpu"
        try:
            cuda_index(self.device)
        except GpuSelectionError:
            raise AdvisorError(f"device {self.device!r}: use cpu or cuda[:INDEX]") from None
        return "cuda"

    @property
    def engine_kwargs(self) -> dict[str, EngineKwargValue]:
        """Random weights and token-id prompts when `dummy`: no checkpoint or tokenizer needed."""
        return {"load_format": "dummy", "skip_tokenizer_init": True} if self.dummy else {}

    @property
    def eager(self) -> bool:
        """The execution mode to profile in: the one the replicas will serve in."""
        return self.enforce_eager if self.enforce_eager is not None else self.kind == "cpu"

    @property
    def mode(self) -> ExecutionMode:
        return execution_mode(self.eager)

    @property
    def measured_key(self) -> str:
        """Where a profile measured beside serving replicas is published for the app's policy (Ray's
        internal KV): one key per request, which the app builder names in the policy's input."""
        return "measured/" + hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:24]

    def store(self) -> ProfileStore:
        """The store named by `store_dir` (a folder is created if missing, unless it is a shared one), else this
        node's own."""
        from deployments.models import plateau_home

        if not self.store_dir:
            return ProfileStore(plateau_home() / "profiles")
        try:
            return ProfileStore(self.store_dir, create=not self.shared_store)
        except (StoreMissing, StoreUrlError) as exc:
            raise AdvisorError(str(exc)) from None


def _device_memory(req: AdvisorRequest) -> Optional[DeviceMemory]:
    """Free and total memory of the request's CUDA device, read once (None on CPU or without NVML)."""
    if req.kind == "cpu":
        return None
    device = _nvml_device(req)
    return DeviceMemory(free_bytes=device.memory_free(), total_bytes=device.memory_total) if device else None


def _kv_cap(req: AdvisorRequest, memory: MemoryModel) -> int:
    """The profiling engine's KV cap for `req`, from the free memory of its device on CUDA."""
    if req.kind == "cpu":
        return sweep_kv_cap("cpu", req.max_kv_bytes, memory.weight_bytes, None)
    device = _device_memory(req)
    return sweep_kv_cap("cuda", req.max_kv_bytes, memory.weight_bytes, device.free_bytes if device else None)


def _nvml_device(req: AdvisorRequest) -> Optional[NvmlDevice]:
    """NVML's view of the request's CUDA device (the one its engine will run on), or None."""
    try:
        return cuda_device(req.device)
    except GpuSelectionError as exc:
        raise AdvisorError(str(exc)) from None


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(req: AdvisorRequest) -> str:
    """Stable name of the device a profile is measured on (a key of the profile store)."""
    if req.kind == "cpu":
        return f"cpu:{cpu_model_name()} x{len(usable_cores())}"
    device = _nvml_device(req)
    return f"cuda:{device.name}" if device else req.device


def _memory(req: AdvisorRequest) -> tuple[Path, MemoryModel]:
    from advisor.memory import ModelConfigError, memory_model
    from deployments.models import ModelNotFound, resolve_model

    try:
        folder = resolve_model(req.model)
        return folder, memory_model(folder, dtype=req.dtype, device_kind=req.kind)
    except (ModelConfigError, ModelNotFound) as exc:
        raise AdvisorError(str(exc)) from None


def engine_pids() -> list[int]:
    """This process and its vLLM engine processes: the CPU time that belongs to the measurement."""
    me = psutil.Process()
    pids = [me.pid]
    for child in me.children(recursive=True):
        try:
            if child.name().startswith("VLLM"):
                pids += [child.pid] + [c.pid for c in child.children(recursive=True)]
        except psutil.Error:
            continue
    return pids


def engine_count() -> int:
    """vLLM engine processes of this process (one `VLLM::EngineCore` per engine: a replica runs its
    one worker in-process, without tensor parallelism). They hold the GPU, and NVML may list them
    under host pids that `engine_pids` cannot match from inside a container."""
    count = 0
    for child in psutil.Process().children(recursive=True):
        try:
            count += child.name().startswith("VLLM")
        except psutil.Error:
            continue
    return count


def gpu_others(sampler: NvmlSampler) -> Callable[[set[int]], int]:
    """Counts the processes on the sampler's GPU that are not `ours` nor one of our engines."""
    return lambda ours: sampler.other_processes(ours, engine_count())


def load_probe(req: AdvisorRequest, cores: Optional[list[int]] = None) -> CpuLoadProbe:
    """Background load on this device: other processes' CPU time, and on a GPU other processes on it."""
    sampler = gpu_sampler(req.device) if req.kind == "cuda" else None
    return CpuLoadProbe(engine_pids, cores, gpu_others(sampler) if sampler else None)


def profile_model(req: AdvisorRequest, log: Callable[[str], None], beside: bool = False) -> tuple[Profile, str]:
    """Wait for a quiet device, run the adaptive sweep on a real engine, measure it again while it
    is flagged as noisy (`noise.profile_retries`), store it with its noise; return it and the path.
    `beside`: serving replicas share the device; the engine runs below them (`yield_cpu`), so their
    load shows as interference and a point taken under it is measured again, and a trusted profile is
    also published for the app's policy (`publish_measured`), which plans with it from then on."""
    asked = req  # the app's policy finds the profile under this request's key
    if beside and req.kind == "cpu":  # the idle serving stack is part of the device's quiet now
        req = req.model_copy(update={"noise": req.noise.model_copy(update={"serving_cores": SERVING_IDLE_CORES})})
    cfg = req.noise
    for attempt in range(1, cfg.profile_retries + 2):
        quiet = wait_for_quiet(load_probe(req), cfg, log)
        profile = _measure_profile(req, log, quiet, yield_cpu=beside)
        sharing = device_sharing(req)
        profile = profile.model_copy(update={"sharing": sharing.mode if sharing else None})
        profile = profile.model_copy(update={"noise": profile.noise.model_copy(update={"attempts": attempt})})
        if not profile.noise.flagged or attempt > cfg.profile_retries:
            break
        log(f"[profile] {profile.noise.reason}: measuring the profile again ({attempt + 1} of {cfg.profile_retries + 1})")
    if profile.noise.flagged:
        if cfg.refuse_noisy:
            raise AdvisorError(f"profile of {req.model} on {req.device} refused: {profile.noise.reason}; stop the "
                               f"other load on the device and profile again")
        log(f"[profile] WARNING: {profile.noise.reason}; stored flagged: it serves this start only, the next "
            f"start profiles again")
    else:
        log(f"[profile] noise: {profile.noise.reason}")
    where = req.store().put_profile(profile)
    if beside and profile.trusted:
        publish_measured(asked, profile)
        log("[profile] measured profile stored and handed to the app's policy, which re-plans with it")
    return profile, where


def publish_measured(req: AdvisorRequest, profile: Profile) -> None:
    from cluster.state_store import RayInternalKV

    RayInternalKV().put(req.measured_key, profile.model_dump_json().encode())


def _measure_profile(req: AdvisorRequest, log: Callable[[str], None], quiet: QuietWait,
                     yield_cpu: bool = False) -> Profile:
    folder, memory = _memory(req)
    rules = PlateauRules(tpot_p99_slo_ms=req.tpot_slo_ms)
    sweep = SweepConfig(max_points=req.max_points, min_tokens_per_point=req.min_tokens_per_point, noise=req.noise)
    spec = profiling_spec(str(folder), memory, req.shape, req.max_batch, req.kind, _kv_cap(req, memory),
                          dtype=memory.dtype, engine_kwargs=req.engine_kwargs, sweep=sweep, enforce_eager=req.eager,
                          device_memory=_device_memory(req))
    sampler = gpu_sampler(req.device) if req.kind == "cuda" else None
    log(f"[profile] starting one engine on {req.device} ({req.mode}, max batch {spec.max_num_seqs}, "
        f"KV {spec.kv_cache_bytes / 2**20:.0f} MiB)")

    def progress(p: ProfilePoint, i: int) -> None:
        bar = "#" * i + "." * max(0, 11 - i)
        log(f"[profile] [{bar}] point {i}: batch {p.batch:4d} ctx {p.context_tokens:6.0f} -> "
            f"{p.tokens_per_s:8.1f} tok/s, TPOT p50 {p.tpot_p50_ms:7.1f} ms, KV {p.kv_usage:5.1%}{_noise_note(p)}")

    with VllmBatchRunner(spec, yield_cpu=yield_cpu) as runner:
        kv_allocated = runner.num_kv_blocks * runner.kv_block_tokens * memory.kv_bytes_per_token
        after_start = runner.engine_memory_bytes()
        try:
            profile = build_profile(
                runner, req.shape, rules, model=req.model, device_name=device_name(req),
                engine_version=vllm_version(), dtype=memory.dtype, weight_bytes=memory.weight_bytes,
                kv_bytes_per_token=memory.kv_bytes_per_token,
                overhead_bytes=non_kv_overhead(after_start, memory.weight_bytes, kv_allocated),
                cfg=sweep, sampler=sampler, progress=progress, probe=load_probe(req, runner.cores), quiet=quiet,
            )
        except ValueError as exc:  # no batch size meets the SLO
            raise AdvisorError(str(exc)) from None
        peak = engine_peak_bytes(after_start, runner.used_before_bytes, profile.points + profile.fit_points)
    overhead = non_kv_overhead(peak, memory.weight_bytes, kv_allocated)
    profile = profile.model_copy(update={"mode": req.mode, "overhead_bytes": overhead})
    if req.kind == "cpu":
        profile = profile.model_copy(update={"cores": len(usable_cores())})
        if req.share_point:
            profile = _with_share_point(profile, spec, req, sweep, progress, log, yield_cpu)
    return profile


def _noise_note(p: ProfilePoint) -> str:
    n = p.noise
    if n is None:
        return ""
    load = f", {n.background_cores:.2f} cores busy elsewhere" if n.background_cores is not None else ""
    return f", CV {n.cv:.1%} ({n.tries} tries{load})" + (f" NOISY: {n.reason}" if n.noisy else "")


def _with_share_point(profile: Profile, spec: ReplicaSpec, req: AdvisorRequest, cfg: SweepConfig, progress,
                      log, yield_cpu: bool = False) -> Profile:
    """On CPU: B* again on half the cores, so the planner knows how throughput scales with cores."""
    cores = usable_cores()
    if len(cores) < 2:
        return profile
    half = cores[: len(cores) // 2]
    log(f"[profile] share point: B*={profile.b_star} on {len(half)} of {len(cores)} cores")
    with VllmBatchRunner(spec, cores=half, yield_cpu=yield_cpu) as runner:
        point = measure(runner, profile.b_star, req.shape, None, cfg, load_probe(req))
    progress(point, len(profile.points) + len(profile.fit_points) + 1)
    measured = profile.points + profile.fit_points + [point]
    noise = summarize_noise([(p.batch, p.noise) for p in measured], cfg.noise, profile.noise.quiet_wait if profile.noise else None)
    return profile.model_copy(update={"share_points": [SharePoint(cores=len(half), point=point)], "noise": noise})


def stored_profile(req: AdvisorRequest, device: Optional[str] = None, sharing: Optional[str] = None) -> Optional[Profile]:
    """The profile `plan_model` would use for `req` on the device named `device` (default: this
    process's device) shared as `sharing` (a plan's `sharing`), if the store has one (no profiling)."""
    _, memory = _memory(req)
    return req.store().find(req.model, device or device_name(req), vllm_version(), memory.dtype, req.shape.bucket,
                            mode=req.mode, sharing=sharing)


def device_sharing(req: AdvisorRequest) -> Optional[SharingDetection]:
    """How engines started from this process would share the request's GPU (None on CPUs)."""
    if req.kind != "cuda":
        return None
    device = _nvml_device(req)
    return detect_sharing(probe_sharing(os.environ, device.nvml if device else None, device.handle if device else None))


def plan_model(req: AdvisorRequest, log: Callable[[str], None],
               profiler: Optional[Callable[[AdvisorRequest, Callable[[str], None]], tuple[Profile, str]]] = None,
               measure_gain: bool = True) -> ReplicaPlan:
    """The plan for req.model on this device: reuse a trusted stored profile (any workload bucket of
    the same model/device/engine/dtype/GPU sharing; the fit covers other shapes) or profile first
    (`profiler`, default `profile_model`). On a GPU whose profile has no measured gain yet, N
    engines against one are measured once (`gain_check`) and kept with the profile; not with
    `measure_gain` False (a task beside serving replicas), which plans from the model."""
    profiler = profiler or profile_model
    folder, memory = _memory(req)
    name = device_name(req)
    sharing = device_sharing(req)
    if sharing is not None:
        log(f"[plan] GPU sharing: {sharing.reason}")
    profile = None if req.reprofile else req.store().find(req.model, name, vllm_version(), memory.dtype,
                                                          req.shape.bucket, mode=req.mode,
                                                          sharing=sharing.mode if sharing else None)
    if profile is not None and not profile.trusted:
        log(f"[plan] not reusing the stored profile: {profile.distrust_reason}; profiling again")
        profile = None
    if profile is None and req.first_start == "predict":
        plan = predicted_first_plan(req, memory, name, log)
        if plan is not None:
            return plan
    if profile is None:
        log("[plan] no stored profile for this model/device/engine/dtype: profiling first")
        profile, _ = profiler(req, log)
    stored = profile
    if req.tpot_slo_ms is not None and req.tpot_slo_ms != profile.rules.tpot_p99_slo_ms:
        rules = profile.rules.model_copy(update={"tpot_p99_slo_ms": req.tpot_slo_ms})
        try:
            profile = profile.model_copy(update={"rules": rules, "knee": find_knee(profile.points, rules)})
        except ValueError as exc:
            raise AdvisorError(str(exc)) from None
    device, cfg = _device_spec(req, name), PlannerConfig(max_model_len=req.max_model_len)
    plan = _plan(profile, device, req.shape, cfg)
    check = gain_check(profile, device, plan, req.shape, cfg)
    if check is not None and not measure_gain:
        plan = plan.model_copy(update={"warnings": plan.warnings + [
            f"the gain of {check.replicas} engines on this GPU is not measured yet, and this plan was made beside "
            "serving replicas (no engine may start there): N comes from the model; a deploy onto a free GPU "
            "measures it"]})
    elif check is not None:
        log(f"[plan] the gain of several engines on this GPU is not measured yet: measuring {check.replicas} engines "
            f"at batch {check.batch} against one (once; kept with the profile)")
        try:
            gain = measured_gain(req, folder, memory, profile, check, log)
        except Exception as exc:  # an engine that does not start or fit: serve on the model's plan, say so
            why = f"{type(exc).__name__}: {exc}"
            log(f"[plan] WARNING: measuring {check.replicas} engines failed ({why}); planned from the model")
            plan = plan.model_copy(update={"warnings": plan.warnings + [
                f"the gain of {check.replicas} engines could not be measured ({why}): N comes from the model; the "
                "next start measures again"]})
        else:
            profile = profile.model_copy(update={"measured_gain": gain})
            if stored.trusted:
                req.store().put_profile(stored.model_copy(update={"measured_gain": gain}))
            plan = _plan(profile, device, req.shape, cfg)
    if profile.noise is not None:
        note = (f"profile noise: {profile.noise.reason}; this plan is provisional: used once, the next start "
                f"profiles again" if profile.noise.flagged else f"profile noise: {profile.noise.reason}")
        plan = plan.model_copy(update={"reasons": plan.reasons + [note], "provisional": profile.noise.flagged})
    if req.validate_plan:
        plan = plan.model_copy(update={"validation": validate(req, folder, memory, profile, plan, log)})
    return plan


PREDICTED_FIRST_REASON = ("provisional: predicted: no measured profile of this model on this device yet, so it serves "
                          "at once on the performance model's plan; the profile is measured beside the replicas while "
                          "load allows, the app's policy plans with it from then on, and the next start serves its plan")


def predicted_first_plan(req: AdvisorRequest, memory: MemoryModel, name: str,
                         log: Callable[[str], None]) -> Optional[ReplicaPlan]:
    """The plan a first start serves on before its profile exists: the performance model's
    prediction for this device (a CPU: its bandwidth measured now, a few seconds), carrying the
    predicted profile it was made from. None where the model cannot predict the device (a GPU not
    in advisor/perf_constants.json): that start profiles first."""
    from advisor.perfmodel import (PerfModelError, engine_for_named_device, load_constants, measure_memory_bandwidth,
                                   predicted_plan, this_cpu)

    if req.kind != "cpu":
        log("[plan] a first start on a GPU profiles first (its prediction is not checked against a measurement yet)")
        return None
    constants = load_constants()
    log("[plan] no stored profile: measuring this CPU's memory bandwidth for a predicted plan (a few seconds)")
    dev = this_cpu(constants.device("cpu"), measure_memory_bandwidth(repeats=8),
                   measure_memory_bandwidth(threads=1, repeats=8))
    eng, source = engine_for_named_device(constants, "cpu", req.store(), lambda *_: memory)
    cfg = PlannerConfig(max_model_len=req.max_model_len)
    try:
        plan, profile = predicted_plan(req.model, memory, name, dev, _device_spec(req, name), eng, source, req.shape,
                                       cfg=cfg, rules=PlateauRules(tpot_p99_slo_ms=req.tpot_slo_ms))
    except (PerfModelError, PlanError) as exc:
        raise AdvisorError(str(exc)) from None
    plan = plan.model_copy(update={"provisional": True, "reasons": [PREDICTED_FIRST_REASON] + plan.reasons,
                                   "profile": profile})
    log(f"[plan] predicted plan: N={plan.replicas_per_device}, max_num_seqs {plan.max_num_seqs} (provisional)")
    return plan


def _plan(profile: Profile, device: DeviceSpec, shape: WorkloadShape, cfg: PlannerConfig) -> ReplicaPlan:
    try:
        return plan_replicas(profile, device, shape, cfg)
    except PlanError as exc:
        raise AdvisorError(str(exc)) from None


def measured_gain(req: AdvisorRequest, folder: Path, memory: MemoryModel, profile: Profile, check: GainCheck,
                  log: Callable[[str], None]) -> MeasuredGain:
    """`check.replicas` engines at once against one engine at the knee, measured on this device."""
    single, aggregate = _measure_replicas(req, folder, memory, profile, check.replicas, check.batch,
                                          check.kv_cache_bytes, log)
    return MeasuredGain(replicas=check.replicas, batch=check.batch, single_tokens_per_s=single,
                        aggregate_tokens_per_s=aggregate)


def validate(req: AdvisorRequest, folder: Path, memory: MemoryModel, profile: Profile, plan: ReplicaPlan,
             log: Callable[[str], None]) -> Validation:
    """Measure the plan: N replicas (CPU: each pinned to its share of the cores) decoding the planned
    batch (`max_num_seqs`: B* or a larger batch still on the plateau) each at the same time, against
    one engine on the whole device at its own knee, same workload."""
    single, aggregate = _measure_replicas(req, folder, memory, profile, plan.replicas_per_device, plan.max_num_seqs,
                                          plan.kv_cache_bytes, log)
    return Validation(single_engine_batch=profile.b_star, single_engine_tokens_per_s=single,
                      replicas=plan.replicas_per_device, aggregate_tokens_per_s=aggregate, gain=aggregate / single - 1,
                      predicted_aggregate_tokens_per_s=plan.predicted_aggregate_tokens_per_s)


def _measure_replicas(req: AdvisorRequest, folder: Path, memory: MemoryModel, profile: Profile, n: int, batch: int,
                      kv_cache_bytes: int, log: Callable[[str], None]) -> tuple[float, float]:
    """(one engine at the knee, `n` engines at `batch` each decoding at once) in tokens/s; under MPS
    each of the n engines gets the SM share the plan would give it."""
    cfg = SweepConfig(min_tokens_per_point=4 * batch * req.shape.output_tokens)
    single_spec = profiling_spec(str(folder), memory, req.shape, profile.b_star, req.kind, _kv_cap(req, memory),
                                 dtype=memory.dtype, engine_kwargs=req.engine_kwargs, enforce_eager=req.eager,
                                 device_memory=_device_memory(req))
    log(f"[validate] single engine at batch {profile.b_star}")
    with VllmBatchRunner(single_spec) as runner:
        single = measure(runner, profile.b_star, req.shape, None, cfg).tokens_per_s
    spec = single_spec.model_copy(update={
        "replicas_per_device": n, "max_num_seqs": batch, "kv_cache_bytes": kv_cache_bytes,
        "device_memory_fraction": _replicas_share(req, memory, profile, kv_cache_bytes, n),
        "mps_thread_percentage": mps_thread_percentage(n) if profile.sharing == "mps" else None,
    })
    cores = usable_cores()
    log(f"[validate] {n} replicas at batch {batch} each, decoding at once")
    runners: list[VllmBatchRunner] = []
    try:
        for i in range(n):  # inside the try: engines already up are shut down when a later one fails to start
            runners.append(VllmBatchRunner(spec, seed=i, cores=cpu_cores_for(i, n, cores) if req.kind == "cpu" else None))
        with ThreadPoolExecutor(max_workers=n) as pool:
            points = list(pool.map(lambda r: measure(r, batch, req.shape, None, cfg), runners))
    finally:
        for r in runners:
            r.close()
    aggregate = sum(p.tokens_per_s for p in points)
    log(f"[validate] single {single:.0f} tok/s, {n} replicas {aggregate:.0f} tok/s ({aggregate / single - 1:+.0%})")
    return single, aggregate


def _replicas_share(req: AdvisorRequest, memory: MemoryModel, profile: Profile, kv_cache_bytes: int, n: int) -> float:
    """`device_memory_fraction` of `n` measured replicas (the spec divides it by n): on CUDA what
    each needs, read from the free memory now (`cuda_memory_share`), so the later replicas pass
    vLLM's start check with the earlier ones' memory gone; 0.9 on CPU."""
    device = _device_memory(req)
    if device is None:
        return 0.9
    return cuda_memory_share(device.free_bytes, device.total_bytes, memory.weight_bytes, kv_cache_bytes,
                             max(profile.overhead_bytes, SWEEP_MEMORY.cuda_reserve_bytes), engines=n)


def _device_spec(req: AdvisorRequest, name: str) -> DeviceSpec:
    if req.device_memory:
        memory_bytes = req.device_memory
    elif req.kind == "cpu":
        memory_bytes = psutil.virtual_memory().total
    else:
        device = _nvml_device(req)
        if device is None:
            raise AdvisorError("no NVIDIA GPU found through NVML; pass --device-memory BYTES")
        memory_bytes = device.memory_total
    cores = len(usable_cores()) if req.kind == "cpu" else 0
    return DeviceSpec(kind=req.kind, name=name, memory_bytes=memory_bytes, cores=cores)
