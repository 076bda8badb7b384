"""NVIDIA device counters for the profiler, sampled in a background thread.

On Hopper and newer, NVML GPM gives DRAM bandwidth utilisation (% of peak) and SM utilisation
between two samples; elsewhere only the coarse `nvmlDeviceGetUtilizationRates` (its `.memory` is
the share of time memory was busy, NOT bandwidth, so it is never reported as dram_bw_util).
Without an NVIDIA GPU `gpu_sampler()` returns None and profiles carry no device counters.
"""

from __future__ import annotations

import statistics
import threading
from typing import Optional

from advisor.profiler import DeviceSample

GPM_SM_UTIL = 2
GPM_DRAM_BW_UTIL = 10


class NvmlSampler:
    """`DeviceSampler` over NVML: start() begins sampling, stop() returns the means."""

    def __init__(self, index: int = 0, period_s: float = 0.2):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._period = period_s
        self.gpm = self._gpm_supported()
        self.name = pynvml.nvmlDeviceGetName(self._handle)
        self.memory_total = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bw: list[float] = []
        self._sm: list[float] = []
        self._mem: list[int] = []

    def _gpm_supported(self) -> bool:
        try:
            support = self._nvml.nvmlGpmQueryDeviceSupport(self._handle)
            return bool(getattr(support, "isSupportedDevice", 0))
        except Exception:  # older driver / bindings: no GPM
            return False

    def start(self) -> None:
        self._bw, self._sm, self._mem = [], [], []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> DeviceSample:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        return DeviceSample(
            dram_bw_util=statistics.fmean(self._bw) if self._bw else None,
            sm_util=statistics.fmean(self._sm) if self._sm else None,
            memory_used_bytes=max(self._mem) if self._mem else None,
        )

    def _loop(self) -> None:
        nv = self._nvml
        prev = None
        if self.gpm:
            prev = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(self._handle, prev)
        while not self._stop.wait(self._period):
            self._mem.append(int(nv.nvmlDeviceGetMemoryInfo(self._handle).used))
            if self.gpm:
                cur = nv.nvmlGpmSampleAlloc()
                nv.nvmlGpmSampleGet(self._handle, cur)
                bw, sm = self._gpm_metrics(prev, cur)
                nv.nvmlGpmSampleFree(prev)
                prev = cur
                self._bw.append(bw)
                self._sm.append(sm)
            else:
                self._sm.append(float(nv.nvmlDeviceGetUtilizationRates(self._handle).gpu))
        if prev is not None:
            nv.nvmlGpmSampleFree(prev)

    def other_processes(self, ours: set[int]) -> int:
        """Processes other than `ours` holding this GPU (compute or graphics), for the noise checks."""
        nv = self._nvml
        pids = set()
        for query in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                pids |= {p.pid for p in query(self._handle)}
            except Exception:  # not supported on this device/driver
                continue
        return len(pids - ours)

    def _gpm_metrics(self, s1, s2) -> tuple[float, float]:
        nv = self._nvml
        req = nv.c_nvmlGpmMetricsGet_t()
        req.version = nv.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = 2
        req.sample1, req.sample2 = s1, s2
        req.metrics[0].metricId = GPM_DRAM_BW_UTIL
        req.metrics[1].metricId = GPM_SM_UTIL
        nv.nvmlGpmMetricsGet(req)
        return float(req.metrics[0].value), float(req.metrics[1].value)


def gpu_sampler(index: int = 0) -> Optional[NvmlSampler]:
    """An NVML sampler for GPU `index`, or None where NVML or the GPU is absent."""
    try:
        return NvmlSampler(index)
    except Exception:
        return None
