"""How noisy a measurement is, and waiting for a quiet device before measuring.

A profile point is trusted only when its repeated rounds agree (coefficient of variation of the
per-round decode tokens/s at most `max_cv`) and nothing else ran on the device meanwhile
(`BackgroundLoad`: CPU time of processes that are not the profiling engine, and on a GPU other
processes holding it). The rules are pure functions over `NoiseConfig`; `CpuLoadProbe` reads the
load with psutil (system-wide busy CPU time minus our own processes' CPU time), so the logic is
tested with fakes and the probe with a real busy loop.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable, Iterable, Optional, Protocol

from pydantic import BaseModel, ConfigDict, Field


class NoiseConfig(BaseModel):
    """Thresholds of the noise checks (a profile that breaks them is flagged, never reused)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_cv: float = Field(0.10, gt=0, description="Largest coefficient of variation (stdev/mean) of a point's "
                                                   "per-round decode tokens/s that counts as a clean point.")
    max_tries: int = Field(3, ge=1, description="Measurements of one point, at most, until it is clean.")
    rounds_per_try: int = Field(2, ge=2, description="Closed batches per try, at least (the CV needs two).")
    max_background_share: float = Field(
        0.15, ge=0, description="Largest share of the device's cores that other processes may keep busy while a "
                                "point is measured (0.15 = 0.3 of 2 cores).")
    max_gpu_processes: int = Field(0, ge=0, description="Other processes allowed on the GPU while measuring.")
    serving_cores: float = Field(0.0, ge=0, description="Cores other processes may keep busy on top of "
                                 "max_background_share: the idle load of the serving stack (Ray, Serve, idle engines) "
                                 "that a profile measured beside serving replicas always shares the device with.")
    quiet_window_s: float = Field(3.0, gt=0, description="Window over which the background load is read.")
    quiet_timeout_s: float = Field(180.0, ge=0, description="Longest wait for a quiet device before profiling.")
    quiet_log_every_s: float = Field(15.0, gt=0, description="Progress line interval while waiting.")
    profile_retries: int = Field(1, ge=0, description="Whole-profile re-measurements after a flagged profile.")
    refuse_noisy: bool = Field(False, description="Refuse (error) a profile still flagged after its retries; "
                                                  "false: use it for this start only, stored flagged, never reused.")


class BackgroundLoad(BaseModel):
    """What competed with the profiling engine during one window."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cpu_cores: float = Field(ge=0, description="Cores kept busy by processes other than ours (mean over the window).")
    cores: int = Field(ge=1, description="Cores of the device the load is measured on.")
    gpu_processes: int = Field(0, ge=0, description="Other processes holding the GPU (NVML).")

    @property
    def cpu_share(self) -> float:
        return self.cpu_cores / self.cores


class PointNoise(BaseModel):
    """A measured point's own noise record."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cv: float = Field(ge=0, description="Coefficient of variation of per-round decode tokens/s in the kept try.")
    rounds: int = Field(ge=1, description="Closed batches in the kept try.")
    tries: int = Field(ge=1, description="Tries measured (each `rounds` batches).")
    background_cores: Optional[float] = Field(None, description="Cores busy with other processes in the kept try.")
    gpu_processes: int = Field(0, ge=0, description="Other GPU processes seen in the kept try.")
    noisy: bool = Field(description="True when even the best try broke a noise limit.")
    reason: str = Field("", description="Which limit the kept try broke (empty when clean).")


class QuietWait(BaseModel):
    """The wait for a quiet device before the profile."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    quiet: bool = Field(description="The device was quiet before the timeout.")
    waited_s: float = Field(ge=0, description="Seconds spent waiting (windows included).")
    load: Optional[BackgroundLoad] = Field(None, description="The last window's load.")


class ProfileNoise(BaseModel):
    """A profile's noise: stored with it, so a noisy profile is never reused."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    limits: NoiseConfig = Field(description="The thresholds it was judged by.")
    worst_cv: float = Field(ge=0, description="Largest per-point CV.")
    max_background_cores: Optional[float] = Field(None, description="Largest background load seen at any point.")
    noisy_batches: list[int] = Field(default_factory=list, description="Batches still noisy after their tries.")
    quiet_wait: Optional[QuietWait] = Field(None, description="The wait for a quiet device before the sweep.")
    attempts: int = Field(1, ge=1, description="Whole-profile measurements made.")
    flagged: bool = Field(description="The profile was taken under interference: never reuse it.")
    reason: str = Field(description="Why it is flagged, or a one-line summary of its noise.")


class LoadProbe(Protocol):
    def start(self) -> None: ...

    def stop(self) -> BackgroundLoad: ...


def coefficient_of_variation(values: Iterable[float]) -> float:
    xs = [float(v) for v in values]
    if len(xs) < 2:
        return 0.0
    mean = statistics.fmean(xs)
    return math.inf if mean <= 0 else statistics.stdev(xs) / mean


def too_busy(load: Optional[BackgroundLoad], cfg: NoiseConfig) -> Optional[str]:
    """Why `load` is too much background for a measurement, or None."""
    if load is None:
        return None
    if (load.cpu_cores - cfg.serving_cores) / load.cores > cfg.max_background_share:
        allowed = cfg.max_background_share * load.cores + cfg.serving_cores
        serving = f", {cfg.serving_cores:.2f} of them allowed to the idle serving stack" if cfg.serving_cores else ""
        return (f"other processes kept {load.cpu_cores:.2f} of {load.cores} cores busy "
                f"({load.cpu_share:.0%} > limit {allowed / load.cores:.0%}{serving})")
    if load.gpu_processes > cfg.max_gpu_processes:
        return f"{load.gpu_processes} other process(es) on the GPU (limit {cfg.max_gpu_processes})"
    return None


def judge_try(cv: float, load: Optional[BackgroundLoad], cfg: NoiseConfig) -> str:
    """Why one try of a point is noisy ('' when clean)."""
    why = []
    if cv > cfg.max_cv:
        why.append(f"rounds disagree: CV {cv:.1%} > limit {cfg.max_cv:.0%}")
    busy = too_busy(load, cfg)
    if busy:
        why.append(busy)
    return "; ".join(why)


def summarize(points: list[tuple[int, PointNoise]], cfg: NoiseConfig, quiet: Optional[QuietWait] = None,
              attempts: int = 1) -> ProfileNoise:
    """The profile's noise from its points' records: flagged when any point stayed noisy."""
    noisy = [(b, n) for b, n in points if n.noisy]
    loads = [n.background_cores for _, n in points if n.background_cores is not None]
    worst = max((n.cv for _, n in points), default=0.0)
    top = max(loads) if loads else None
    if noisy:
        b, n = max(noisy, key=lambda x: x[1].cv)
        reason = (f"taken under interference: {len(noisy)} of {len(points)} point(s) still noisy after "
                  f"{cfg.max_tries} tries (batch {b}: {n.reason})")
    else:
        load = f", background load at most {top:.2f} cores" if top is not None else ""
        reason = f"clean: every point within CV {cfg.max_cv:.0%} (worst {worst:.1%}){load}"
    return ProfileNoise(limits=cfg, worst_cv=worst, max_background_cores=top, noisy_batches=sorted({b for b, _ in noisy}),
                        quiet_wait=quiet, attempts=attempts, flagged=bool(noisy), reason=reason)


def wait_for_quiet(probe: LoadProbe, cfg: NoiseConfig, log: Callable[[str], None],
                   sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> QuietWait:
    """Read the background load window by window until it is under the limit or the wait times out."""
    t0 = clock()
    last_log = -math.inf
    while True:
        probe.start()
        sleep(cfg.quiet_window_s)
        load = probe.stop()
        waited = clock() - t0
        busy = too_busy(load, cfg)
        if busy is None:
            if waited > cfg.quiet_window_s * 1.5:
                log(f"[profile] device quiet after {waited:.0f} s ({load.cpu_cores:.2f} cores busy elsewhere)")
            return QuietWait(quiet=True, waited_s=waited, load=load)
        if waited >= cfg.quiet_timeout_s:
            log(f"[profile] device still busy after {waited:.0f} s ({busy}); profiling anyway, every point "
                f"checks its own noise")
            return QuietWait(quiet=False, waited_s=waited, load=load)
        if waited - last_log >= cfg.quiet_log_every_s:
            log(f"[profile] waiting for a quiet device: {busy}; {waited:.0f} of {cfg.quiet_timeout_s:.0f} s")
            last_log = waited


class CpuLoadProbe:
    """Background CPU load on `cores`: their busy time minus the CPU time of `ours()` processes.

    `ours` names the processes that belong to the measurement (this process and its engine);
    everything else that runs on the cores, short-lived processes included, counts as background.
    `gpu_others`, when given, counts other processes on the GPU at stop().
    """

    def __init__(self, ours: Callable[[], list[int]], cores: Optional[list[int]] = None,
                 gpu_others: Optional[Callable[[set[int]], int]] = None):
        self._ours = ours
        self._cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
        self._gpu_others = gpu_others
        self._t0 = 0.0
        self._busy0 = 0.0
        self._own0: dict[int, float] = {}

    def _busy(self) -> float:
        import psutil

        per_cpu = psutil.cpu_times(percpu=True)
        return sum(busy_seconds(per_cpu[c]) for c in self._cores if c < len(per_cpu))

    def _own(self) -> dict[int, float]:
        return process_cpu_seconds(self._ours())

    def start(self) -> None:
        self._own0 = self._own()
        self._busy0 = self._busy()
        self._t0 = time.monotonic()

    def stop(self) -> BackgroundLoad:
        busy = self._busy() - self._busy0
        wall = max(1e-6, time.monotonic() - self._t0)
        own1 = self._own()
        own = sum(max(0.0, own1[p] - t) for p, t in self._own0.items() if p in own1)
        others = self._gpu_others(set(own1)) if self._gpu_others else 0
        return BackgroundLoad(cpu_cores=max(0.0, (busy - own) / wall), cores=len(self._cores), gpu_processes=others)


def process_cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """User + system CPU seconds of each of `pids` still running (psutil)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


def busy_seconds(t) -> float:
    """Busy CPU seconds of one core, or of all (psutil's cpu_times: everything but idle and iowait)."""
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))

