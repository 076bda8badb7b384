"""NVIDIA devices through NVML: which physical GPU a CUDA device is, its memory, and counters
sampled in a background thread.

NVML numbers devices physically and ignores `CUDA_VISIBLE_DEVICES`; CUDA (and so vLLM's engine)
numbers the visible ones. `physical_entry` turns `cuda:i` into the visible-devices entry CUDA
uses for it and `nvml_handle` turns that entry (an index, a `GPU-`/`MIG-` UUID or a unique
prefix of a GPU UUID) into the NVML handle of the same device, as vLLM's own
`CudaPlatform.device_control_id_to_physical_device_id` does (integer: NVML index, else UUID).
Everything here talks to NVML only: it never initialises CUDA in the calling process, so a
process that uses it can still fork a CUDA engine.

On Hopper and newer, NVML GPM gives DRAM bandwidth utilisation (% of peak), SM utilisation and
graphics activity (the share of time any kernel ran: what engines that time-slice cannot overlap)
between two samples; elsewhere only the coarse `nvmlDeviceGetUtilizationRates` (its `.memory` is
the share of time memory was busy, NOT bandwidth, so it is never reported as dram_bw_util).
GPM is probed once per sampler; a sample or metric that fails at run time (vGPU guests, MIG) is
not recorded, the sampler backs off and, after repeated failures, stops using GPM.
Without an NVIDIA GPU `gpu_sampler()` returns None and profiles carry no device counters.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
from typing import Any, Mapping, MutableMapping, Optional

from pydantic import BaseModel, ConfigDict, Field

from advisor.profiler import DeviceSample

logger = logging.getLogger(__name__)

NVML_SUCCESS = 0
GPM_GRAPHICS_UTIL = 1  # share of time any kernel ran
GPM_SM_UTIL = 2
GPM_DRAM_BW_UTIL = 10
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


class GpuSelectionError(ValueError):
    """A CUDA device name or visible-devices entry that names no NVIDIA device."""


class SamplerConfig(BaseModel):
    """How often the sampler reads NVML and how it backs off when GPM fails at run time."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    period_s: float = Field(0.2, gt=0, description="Seconds between two readings.")
    gpm_max_failures: int = Field(5, ge=1, description="Consecutive GPM failures after which GPM is given up.")
    gpm_max_backoff_periods: int = Field(16, ge=1, description="Most periods skipped after one GPM failure.")


# ---- which device ---------------------------------------------------------------------------
def visible_entries(cuda_visible_devices: Optional[str]) -> Optional[list[str]]:
    """`CUDA_VISIBLE_DEVICES` as a list of entries; None when unset (every device is visible)."""
    if cuda_visible_devices is None:
        return None
    value = cuda_visible_devices.strip()
    if value in ("", "NoDevFiles"):  # Ray writes NoDevFiles for a GPU-less task on a GPU node
        return []
    return [e.strip() for e in value.split(",") if e.strip()]


def raylet_visible_devices() -> Optional[str]:
    """`CUDA_VISIBLE_DEVICES` as this node's raylet has it (its entries are what Ray's GPU ids index).

    A Ray worker records it when it starts (`original_visible_accelerator_ids`, through which
    `ray.get_gpu_ids()` maps ids); a task without GPUs usually sees the same value in its
    environment, but not with RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1, which blanks it. Outside a
    worker, or if Ray no longer records it, the environment is all there is."""
    try:
        from ray._private.worker import global_worker

        ids = global_worker.original_visible_accelerator_ids.get("GPU")
    except (ImportError, AttributeError):
        return os.environ.get(CUDA_VISIBLE_DEVICES)
    return None if ids is None else ",".join(str(i) for i in ids)


def restore_raylet_devices(environ: MutableMapping[str, str]) -> None:
    """Give a Ray task that holds no GPU the node's visible devices back: with
    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 Ray blanks its `CUDA_VISIBLE_DEVICES`, and every NVML
    reading of the node's GPUs (device name, memory) would then find none."""
    if environ.get(CUDA_VISIBLE_DEVICES) != "":
        return
    value = raylet_visible_devices()
    if value:
        environ[CUDA_VISIBLE_DEVICES] = value
    else:  # the raylet had it unset: every GPU visible
        environ.pop(CUDA_VISIBLE_DEVICES, None)


def cuda_index(device: str) -> int:
    """The index of `cuda` / `cuda:N` (0 for plain `cuda`)."""
    head, _, tail = device.partition(":")
    if head != "cuda" or (tail and not tail.isdigit()):
        raise GpuSelectionError(f"device {device!r}: use cuda or cuda:INDEX (e.g. cuda:1)")
    return int(tail) if tail else 0


def physical_entry(index: int, cuda_visible_devices: Optional[str]) -> str:
    """The `CUDA_VISIBLE_DEVICES` entry CUDA calls `cuda:index` (the index itself when unset)."""
    entries = visible_entries(cuda_visible_devices)
    if entries is None:
        return str(index)
    if index >= len(entries):
        raise GpuSelectionError(
            f"cuda:{index}: CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} makes only {len(entries)} device(s) "
            f"visible; use cuda:0..cuda:{max(0, len(entries) - 1)} or widen CUDA_VISIBLE_DEVICES"
        )
    return entries[index]


def nvml_handle(nvml: Any, entry: str) -> Any:
    """NVML handle of the device one `CUDA_VISIBLE_DEVICES` entry names."""
    if entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry))
    try:
        return nvml.nvmlDeviceGetHandleByUUID(entry)  # GPU-<uuid> and MIG-<uuid> alike
    except nvml.NVMLError:
        pass
    # CUDA also accepts a unique prefix of a GPU UUID.
    matches = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        if _text(nvml.nvmlDeviceGetUUID(handle)).startswith(entry):
            matches.append(handle)
    if len(matches) != 1:
        raise GpuSelectionError(
            f"CUDA_VISIBLE_DEVICES entry {entry!r}: {'no' if not matches else len(matches)} NVML device(s) have "
            "this UUID; use an index, a full GPU-/MIG- UUID (`nvidia-smi -L` lists them) or a unique prefix"
        )
    return matches[0]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _load_nvml() -> Any:
    import pynvml

    return pynvml


class NvmlDevice:
    """One NVIDIA device (a whole GPU or a MIG instance), found from its visible-devices entry."""

    def __init__(self, entry: str, nvml: Any = None):
        self.nvml = nvml if nvml is not None else _load_nvml()
        self.nvml.nvmlInit()
        self.entry = entry
        self.handle = nvml_handle(self.nvml, entry)
        self.name = _text(self.nvml.nvmlDeviceGetName(self.handle))
        self.memory_total = int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).total)

    def memory_used(self) -> int:
        """Device memory in use by every process (bytes), as nvidia-smi shows it."""
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def memory_free(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).free)


def cuda_device(device: str = "cuda", env: Optional[Mapping[str, str]] = None, nvml: Any = None) -> Optional[NvmlDevice]:
    """The NVML view of `cuda:N` as this process's CUDA sees it; None without NVML or a GPU.

    A bad device name or visible-devices entry is an error, not a silent None.
    """
    env = os.environ if env is None else env
    entry = physical_entry(cuda_index(device), env.get(CUDA_VISIBLE_DEVICES))
    try:
        return NvmlDevice(entry, nvml)
    except GpuSelectionError:
        raise
    except Exception:  # no driver / no library / no such index: no NVIDIA device here
        return None


def gpu_uuid(device: str = "cuda", env: Optional[Mapping[str, str]] = None, nvml: Any = None) -> Optional[str]:
    """NVML's UUID of `cuda:N` as a process with `env` sees it: one string for one device whether
    `CUDA_VISIBLE_DEVICES` names it by index, UUID or UUID prefix, or is unset (a MIG instance,
    with memory of its own, has its own MIG- UUID). None where NVML is unavailable or does not
    know the entry's index (the engine's own start then says so).

    NVML is shut down again afterwards, as `cuda_device_count` does."""
    env = os.environ if env is None else env
    entry = physical_entry(cuda_index(device), env.get(CUDA_VISIBLE_DEVICES))
    try:
        nvml = nvml if nvml is not None else _load_nvml()
        nvml.nvmlInit()
    except Exception:  # no NVML library or driver
        return None
    try:
        return _text(nvml.nvmlDeviceGetUUID(nvml_handle(nvml, entry)))
    except nvml.NVMLError:
        return None
    finally:
        nvml.nvmlShutdown()


def cuda_device_count(env: Optional[Mapping[str, str]] = None, nvml: Any = None) -> int:
    """CUDA devices this process would see, from NVML alone (no CUDA initialisation).

    `torch.cuda.is_available()` / `device_count()` call into the CUDA runtime, after which a
    forked vLLM engine process cannot use CUDA; vLLM's own platform detection uses NVML too.
    """
    env = os.environ if env is None else env
    try:
        nvml = nvml if nvml is not None else _load_nvml()
        nvml.nvmlInit()
    except Exception:  # no NVML library or driver
        return 0
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError:
        return 0
    finally:
        nvml.nvmlShutdown()  # leaves this process as it found it (vLLM's own check does the same)
    entries = visible_entries(env.get(CUDA_VISIBLE_DEVICES))
    return count if entries is None else min(count, len(entries))


# ---- processes on a device ------------------------------------------------------------------
MPS_SERVER = "nvidia-cuda-mps-server"


class GpuProcess(BaseModel):
    """One process NVML lists on a device (compute or graphics)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pid: int = Field(description="NVML's pid: the host's pid namespace, not a container's.")
    name: Optional[str] = Field(None, description="NVML's name for the pid (`nvmlSystemGetProcessName`); None "
                                                  "where NVML cannot resolve it (a pid of another pid namespace).")
    used_bytes: Optional[int] = Field(None, description="Device memory it holds; None where NVML does not say.")


def is_mps_server(process: GpuProcess) -> bool:
    """An MPS control server holds the GPU on behalf of its clients: it is never a tenant itself."""
    return process.name is not None and process.name.rsplit("/", 1)[-1] == MPS_SERVER


def foreign_gpu_processes(processes: list[GpuProcess], ours: set[int], our_engines: int) -> int:
    """Processes on the GPU that belong to someone else.

    MPS servers are left out. When any of `ours` appears among NVML's pids, this process and NVML
    share a pid namespace and pids identify our processes. When none does, NVML lists pids of
    another namespace (a container sees its own pids, NVML the host's), so our `our_engines`
    engine processes on the device are there under pids we cannot match: every process beyond
    that many is foreign."""
    tenants = {p.pid for p in processes if not is_mps_server(p)}
    if tenants & ours:
        return len(tenants - ours)
    return max(0, len(tenants) - our_engines)


def _process_name(nvml: Any, pid: int) -> Optional[str]:
    try:
        return _text(nvml.nvmlSystemGetProcessName(pid))
    except Exception:  # NVMLError (not found: another pid namespace), or older bindings without it
        return None


# ---- counters -------------------------------------------------------------------------------
class NvmlSampler:
    """`DeviceSampler` over NVML: start() begins sampling, stop() returns the means."""

    def __init__(self, device: NvmlDevice, config: SamplerConfig = SamplerConfig()):
        self.device = device
        self.config = config
        self._nvml = device.nvml
        self.name = device.name
        self.memory_total = device.memory_total
        self.gpm = self._probe_gpm()
        self._failures = 0
        self._skip = 0
        self._prev = None  # the last GPM sample, owned by the sampling thread
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bw: list[float] = []
        self._sm: list[float] = []
        self._busy: list[float] = []
        self._mem: list[int] = []

    def _probe_gpm(self) -> bool:
        """GPM only when the device says so AND one sample can really be taken (not in every
        vGPU guest or MIG instance that reports support)."""
        nv = self._nvml
        try:
            if not getattr(nv.nvmlGpmQueryDeviceSupport(self.device.handle), "isSupportedDevice", 0):
                return False
        except Exception:  # older driver / bindings: no GPM
            return False
        sample = None
        try:
            sample = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(self.device.handle, sample)
            return True
        except nv.NVMLError as exc:
            logger.info("NVML GPM reported but unusable on %s (%s): no DRAM bandwidth readings", self.name, exc)
            return False
        finally:
            self._free(sample)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return  # the last loop is still inside an NVML call: it owns the GPM sample
        self._bw, self._sm, self._busy, self._mem = [], [], [], []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> DeviceSample:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        return self.reading()

    def reading(self) -> DeviceSample:
        """Means of what was sampled since start()."""
        return DeviceSample(
            dram_bw_util=statistics.fmean(self._bw) if self._bw else None,
            sm_util=statistics.fmean(self._sm) if self._sm else None,
            gpu_busy=statistics.fmean(self._busy) if self._busy else None,
            memory_used_bytes=max(self._mem) if self._mem else None,
        )

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.config.period_s):
                self.sample_once()
        finally:
            self.release()

    def gpu_processes(self) -> list[GpuProcess]:
        """Processes holding this GPU (compute, graphics and MPS clients), named where NVML can name
        them. Under MPS the compute list shows only the MPS server; its clients (engines, other
        tenants) are NVML's MPS list."""
        nv = self._nvml
        out = []
        queries = ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses",
                   "nvmlDeviceGetMPSComputeRunningProcesses")
        for name in queries:
            try:
                infos = getattr(nv, name)(self.device.handle)
            except Exception:  # not supported on this device/driver/bindings
                continue
            out += [GpuProcess(pid=int(p.pid), name=_process_name(nv, int(p.pid)),
                               used_bytes=getattr(p, "usedGpuMemory", None)) for p in infos]
        return out

    def other_processes(self, ours: set[int], our_engines: int = 0) -> int:
        """Processes on this GPU that are not `ours` (`our_engines` of which hold it), for the noise checks."""
        return foreign_gpu_processes(self.gpu_processes(), ours, our_engines)

    def release(self) -> None:
        """Free the GPM sample held between ticks (the loop does this when it ends)."""
        prev, self._prev = self._prev, None
        self._free(prev)

    def sample_once(self) -> None:
        """One reading: memory, then GPM (or the coarse utilisation where GPM is off)."""
        nv = self._nvml
        try:
            self._mem.append(self.device.memory_used())
        except nv.NVMLError:
            pass
        if self.gpm:
            self._gpm_tick()
            return
        try:
            self._sm.append(float(nv.nvmlDeviceGetUtilizationRates(self.device.handle).gpu))
        except nv.NVMLError:
            pass

    def _gpm_tick(self) -> None:
        if self._skip > 0:
            self._skip -= 1
            return
        nv = self._nvml
        cur = None
        try:
            cur = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(self.device.handle, cur)
            ok = True
            if self._prev is not None:
                bw, sm, busy = self._gpm_metrics(self._prev, cur)
                for values, value in ((self._bw, bw), (self._sm, sm), (self._busy, busy)):
                    if value is not None:
                        values.append(value)
                ok = bw is not None and sm is not None
            self._free(self._prev)
            self._prev, cur = cur, None
            if ok:
                self._failures = 0
            else:
                self._gpm_failed("a metric returned an error")
        except nv.NVMLError as exc:
            self.release()  # the next interval starts from a fresh sample
            self._gpm_failed(str(exc))
        finally:
            self._free(cur)

    def _gpm_failed(self, why: str) -> None:
        self._failures += 1
        if self._failures >= self.config.gpm_max_failures:
            logger.warning("NVML GPM failed %d times in a row on %s (%s): DRAM bandwidth readings stop",
                           self._failures, self.name, why)
            self.gpm = False
            self.release()
            return
        self._skip = min(self.config.gpm_max_backoff_periods, 2 ** (self._failures - 1))

    def _gpm_metrics(self, s1, s2) -> tuple[Optional[float], Optional[float], Optional[float]]:
        """(DRAM bandwidth %, SM %, graphics activity %) between two samples; None for a metric
        whose own return code is an error (the call as a whole can succeed while one metric fails)."""
        nv = self._nvml
        ids = (GPM_DRAM_BW_UTIL, GPM_SM_UTIL, GPM_GRAPHICS_UTIL)
        req = nv.c_nvmlGpmMetricsGet_t()
        req.version = nv.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = len(ids)
        req.sample1, req.sample2 = s1, s2
        for i, metric in enumerate(ids):
            req.metrics[i].metricId = metric
        nv.nvmlGpmMetricsGet(req)
        return tuple(  # type: ignore[return-value]
            float(req.metrics[i].value) if int(req.metrics[i].nvmlReturn) == NVML_SUCCESS else None
            for i in range(len(ids))
        )

    def _free(self, sample) -> None:
        if sample is None:
            return
        try:
            self._nvml.nvmlGpmSampleFree(sample)
        except self._nvml.NVMLError:
            pass


def gpu_sampler(device: str = "cuda", env: Optional[Mapping[str, str]] = None) -> Optional[NvmlSampler]:
    """An NVML sampler on `cuda:N` as this process's CUDA sees it, or None where NVML or the
    GPU is absent."""
    nvml_device = cuda_device(device, env)
    return NvmlSampler(nvml_device) if nvml_device is not None else None
