"""Which processes on a GPU are foreign to a measurement: NVML lists host-namespace pids while a
container knows its own, and an MPS server holds the GPU on behalf of its clients."""

from __future__ import annotations

from types import SimpleNamespace

from advisor.nvml import GpuProcess, NvmlDevice, NvmlSampler, foreign_gpu_processes
from tests.fake_nvml import FakeNvml, FakeNvmlError

GIB = 1 << 30
MPS = "nvidia-cuda-mps-server"


class ProcessNvml(FakeNvml):
    """FakeNvml that lists processes on the device and names those NVML can see."""

    def __init__(self, compute: list[int], graphics: tuple[int, ...] = (), names: dict[int, str] | None = None):
        super().__init__()
        self.compute, self.graphics, self.names = compute, graphics, names or {}

    def _infos(self, pids):
        return [SimpleNamespace(pid=p, usedGpuMemory=GIB, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
                for p in pids]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self._infos(self.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return self._infos(self.graphics)

    def nvmlSystemGetProcessName(self, pid):
        if pid not in self.names:
            raise FakeNvmlError("Not Found")  # a pid of another pid namespace
        return self.names[pid]


def _sampler(nvml: FakeNvml) -> NvmlSampler:
    return NvmlSampler(NvmlDevice("0", nvml))


def test_same_pid_namespace_counts_by_pid_identity():
    procs = [GpuProcess(pid=10), GpuProcess(pid=11), GpuProcess(pid=99)]
    assert foreign_gpu_processes(procs, ours={1, 10, 11}, our_engines=2) == 1
    assert foreign_gpu_processes(procs, ours={1, 10, 11, 99}, our_engines=2) == 0


def test_in_a_container_our_engine_under_its_host_pid_is_not_foreign():
    # NVML reports the engine as host pid 48213; the container knows it as 57
    procs = [GpuProcess(pid=48213, used_bytes=30 * GIB)]
    assert foreign_gpu_processes(procs, ours={1, 57}, our_engines=1) == 0
    other = procs + [GpuProcess(pid=50000, used_bytes=GIB)]
    assert foreign_gpu_processes(other, ours={1, 57}, our_engines=1) == 1
    assert foreign_gpu_processes(other, ours={1}, our_engines=0) == 2  # before our engine starts


def test_an_mps_server_is_never_foreign_and_an_unnamed_process_is_a_tenant():
    procs = [GpuProcess(pid=7, name=f"/usr/bin/{MPS}"), GpuProcess(pid=10, name="python")]
    assert foreign_gpu_processes(procs, ours={10}, our_engines=1) == 0
    assert foreign_gpu_processes([GpuProcess(pid=7, name=MPS)], ours={1}, our_engines=0) == 0
    assert foreign_gpu_processes([GpuProcess(pid=7)], ours={1}, our_engines=0) == 1


def test_a_process_in_both_lists_counts_once():
    procs = [GpuProcess(pid=99), GpuProcess(pid=99)]
    assert foreign_gpu_processes(procs, ours={1}, our_engines=0) == 1


def test_sampler_reads_nvml_processes_with_names_where_nvml_has_them():
    nvml = ProcessNvml(compute=[48213, 7], graphics=(7,), names={7: MPS})
    sampler = _sampler(nvml)
    assert {(p.pid, p.name, p.used_bytes) for p in sampler.gpu_processes()} == {(48213, None, GIB), (7, MPS, GIB)}
    # container: our engine (host pid 48213) and the MPS server hold the GPU: nothing foreign
    assert sampler.other_processes({1, 57}, our_engines=1) == 0
    assert sampler.other_processes({1}) == 1  # no engine of ours yet: 48213 is someone else's


def test_sampler_survives_a_device_without_process_queries():
    class NoQueries(FakeNvml):
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            raise FakeNvmlError("Not Supported")

        def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
            raise FakeNvmlError("Not Supported")

    assert _sampler(NoQueries()).other_processes({1}, our_engines=1) == 0


def test_the_profiling_probe_tells_the_sampler_how_many_engines_are_ours(monkeypatch):
    import deployments.profiling as profiling

    sampler = _sampler(ProcessNvml(compute=[48213, 50000]))  # container: our engine is host pid 48213
    monkeypatch.setattr(profiling, "engine_count", lambda: 1)
    assert profiling.gpu_others(sampler)({1, 57}) == 1  # only 50000 is someone else's
    monkeypatch.setattr(profiling, "engine_count", lambda: 0)
    assert profiling.gpu_others(sampler)({1}) == 2


def test_under_mps_the_clients_are_read_from_nvmls_mps_list_not_hidden_behind_the_server():
    class MpsNvml(ProcessNvml):
        def __init__(self, clients):
            super().__init__(compute=[7], names={7: MPS})
            self.clients = clients

        def nvmlDeviceGetMPSComputeRunningProcesses(self, handle):
            return self._infos(self.clients)

    # the compute list shows only the MPS server; our engine (pid 10) and a tenant (pid 99) are its clients
    sampler = _sampler(MpsNvml(clients=[10, 99]))
    assert {p.pid for p in sampler.gpu_processes()} == {7, 10, 99}
    assert sampler.other_processes({1, 10}, our_engines=1) == 1
    assert _sampler(MpsNvml(clients=[10])).other_processes({1, 10}, our_engines=1) == 0
