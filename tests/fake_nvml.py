"""A stand-in for the part of the `pynvml` module the project calls, injected by constructor:
two H100s (physical indices 0 and 1, different memory in use) and one MIG instance of the second,
GPM samples whose allocations are tracked so a test sees every leak or double free."""

from __future__ import annotations

from types import SimpleNamespace

from advisor.nvml import GPM_DRAM_BW_UTIL, GPM_GRAPHICS_UTIL, GPM_SM_UTIL

GIB = 1 << 30


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """The part of pynvml the project calls. Two H100s plus one MIG instance of the second."""

    NVMLError = FakeNvmlError
    NVML_GPM_METRICS_GET_VERSION = 1

    def __init__(self, gpm_supported: bool = True, failing_sample_gets: int = 0,
                 metric_codes: dict[int, int] | None = None, init_fails: bool = False):
        self.uuids = ["GPU-5a1f0c3e-0000-0000-0000-000000000000", "GPU-9b7e2d41-1111-1111-1111-111111111111"]
        self.migs = {"MIG-c0ffee00-2222-2222-2222-222222222222": 1}
        self.used = {0: 10 * GIB, 1: 2 * GIB, "mig": 1 * GIB}
        self.gpm_supported = gpm_supported
        self.failing_sample_gets = failing_sample_gets  # -1: every call fails
        self.metric_codes = metric_codes or {}
        self.init_fails = init_fails
        self.live: set[int] = set()
        self.allocs = 0
        self.sample_gets = 0

    # devices
    def nvmlInit(self):
        if self.init_fails:
            raise FakeNvmlError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index):
        if index >= len(self.uuids):
            raise FakeNvmlError("Invalid Argument")
        return ("gpu", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid in self.uuids:
            return ("gpu", self.uuids.index(uuid))
        if uuid in self.migs:
            return ("mig", self.migs[uuid])
        raise FakeNvmlError("Not Found")

    def nvmlDeviceGetUUID(self, handle):
        return self.uuids[handle[1]].encode()

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3" if handle[0] == "gpu" else b"NVIDIA H100 MIG 1g.10gb"

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = self.used[handle[1]] if handle[0] == "gpu" else self.used["mig"]
        total = 80 * GIB if handle[0] == "gpu" else 10 * GIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=37, memory=12)

    # GPM
    def nvmlGpmQueryDeviceSupport(self, handle):
        return SimpleNamespace(isSupportedDevice=int(self.gpm_supported))

    def nvmlGpmSampleAlloc(self):
        self.allocs += 1
        self.live.add(self.allocs)
        return self.allocs

    def nvmlGpmSampleFree(self, sample):
        self.live.remove(sample)  # a double free raises KeyError and fails the test

    def nvmlGpmSampleGet(self, handle, sample):
        self.sample_gets += 1
        if self.failing_sample_gets != 0:
            self.failing_sample_gets -= 1
            raise FakeNvmlError("Not Supported")
        return sample

    def c_nvmlGpmMetricsGet_t(self):
        return SimpleNamespace(version=0, numMetrics=0, sample1=None, sample2=None,
                               metrics=[SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(8)])

    def nvmlGpmMetricsGet(self, req):
        assert req.sample1 in self.live and req.sample2 in self.live
        values = {GPM_DRAM_BW_UTIL: 61.5, GPM_SM_UTIL: 42.0, GPM_GRAPHICS_UTIL: 88.0}
        for m in req.metrics[: req.numMetrics]:
            m.nvmlReturn = self.metric_codes.get(m.metricId, 0)
            m.value = 0.0 if m.nvmlReturn else values[m.metricId]
        return req
