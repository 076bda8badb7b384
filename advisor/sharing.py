"""How engines on one GPU share it, which the replica plan depends on.

- `mps`: an NVIDIA MPS control daemon serves the GPU and the engines reach it (its pipe directory
  is visible to them). Kernels of several engines run at once; N engines gain up to what the DRAM
  bandwidth of one engine leaves unused. Each engine's SM share is capped with
  `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` (`mps_thread_percentage`).
- `time-slice`: no MPS. Contexts of different processes take turns on the GPU: kernels of two
  engines never run at once, so N engines gain at most what one engine leaves the GPU idle
  (GPM graphics activity), and vLLM's async scheduling leaves little of that.
- `exclusive`: the GPU's compute mode admits one process (EXCLUSIVE_PROCESS without MPS): one
  engine per GPU.

The CUDA driver connects a process to MPS when the control daemon answers on its socket under
`CUDA_MPS_PIPE_DIRECTORY` (default /tmp/nvidia-mps); otherwise it runs without MPS, silently.
Detection therefore looks where an engine started from this process's environment would look.
Everything here is pure over a `SharingProbe`; `probe_sharing` reads the host.
"""

from __future__ import annotations

import errno
import math
import os
import socket
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field

Sharing = Literal["mps", "time-slice", "exclusive"]
MPS_PIPE_DIRECTORY_ENV = "CUDA_MPS_PIPE_DIRECTORY"
MPS_DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"
MPS_CONTROL_PIPE = "control"  # the control daemon's UNIX socket inside the pipe directory
MPS_SERVER_PROCESS = "nvidia-cuda-mps-server"
MPS_THREAD_PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 3
NVML_COMPUTEMODE_PROHIBITED = 2
START_MPS_HINT = ("start MPS on the GPU node (`nvidia-cuda-mps-control -d`, as the user the engines run as; "
                  "docs/gpu-clusters.md)")


class SharingProbe(BaseModel):
    """What the host shows about GPU sharing, as seen from the process that starts engines."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pipe_directory: str = Field(description="CUDA_MPS_PIPE_DIRECTORY, or the default the driver uses.")
    control_pipe: bool = Field(description="The MPS control daemon's socket exists in the pipe directory.")
    control_answers: Optional[bool] = Field(None, description="A connection to that socket was accepted (False: a "
                                            "socket left by a daemon that is gone; None: not tried).")
    mps_server_on_device: bool = Field(False, description="NVML lists an nvidia-cuda-mps-server on the GPU.")
    compute_mode: Optional[int] = Field(None, description="NVML compute mode (0 default, 2 prohibited, "
                                        "3 exclusive process); None where unreadable.")


class SharingDetection(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Sharing
    reason: str


def mps_pipe_directory(env: Mapping[str, str]) -> str:
    return env.get(MPS_PIPE_DIRECTORY_ENV) or MPS_DEFAULT_PIPE_DIRECTORY


def detect_sharing(probe: SharingProbe) -> SharingDetection:
    """The sharing mode engines started with the probed environment get, and why."""
    pipes = probe.pipe_directory
    if probe.control_pipe and probe.control_answers is False:
        return SharingDetection(mode="time-slice", reason=(
            f"time-slicing: {pipes}/{MPS_CONTROL_PIPE} is there but no MPS control daemon answers on it (it "
            "stopped or crashed), and CUDA then runs without MPS; restart it (`nvidia-cuda-mps-control -d`) or "
            "remove the directory"))
    if probe.control_pipe:
        return SharingDetection(mode="mps", reason=(
            f"MPS: the control daemon's pipe is in {pipes}, so engines started here run under MPS "
            "(kernels of several engines at once)"))
    if probe.compute_mode == NVML_COMPUTEMODE_EXCLUSIVE_PROCESS:
        return SharingDetection(mode="exclusive", reason=(
            f"compute mode EXCLUSIVE_PROCESS and no MPS control pipe in {pipes}: one process per GPU, so one "
            f"engine per GPU; {START_MPS_HINT} to pack several"))
    if probe.mps_server_on_device:
        return SharingDetection(mode="time-slice", reason=(
            f"an MPS server holds this GPU, but its control pipe is not in {pipes}: engines started here do not "
            f"reach it and time-slice; set {MPS_PIPE_DIRECTORY_ENV} to the daemon's pipe directory (mounted into "
            "the container, if any) on the Ray nodes"))
    return SharingDetection(mode="time-slice", reason=(
        f"time-slicing: no MPS control pipe in {pipes}, so kernels of different engines take turns on the GPU "
        f"and N engines gain only what one leaves idle; {START_MPS_HINT}"))


def mps_thread_percentage(replicas_per_device: int) -> int:
    """Each engine's cap on the GPU's SMs under MPS: an equal share, rounded up, so one engine's
    prefill cannot take every SM while the others decode (the MPS default lets each use all)."""
    if replicas_per_device < 1:
        raise ValueError(f"replicas_per_device {replicas_per_device}: must be >= 1")
    return min(100, math.ceil(100 / replicas_per_device))


def probe_sharing(env: Optional[Mapping[str, str]] = None, nvml: Any = None, handle: Any = None) -> SharingProbe:
    """Read the host: the pipe directory of this environment and, given an NVML handle, the GPU's
    compute mode and whether an MPS server holds it. NVML failures leave those fields unknown."""
    env = os.environ if env is None else env
    pipes = mps_pipe_directory(env)
    path = Path(pipes, MPS_CONTROL_PIPE)
    control = path.exists()
    answers = control_socket_answers(path) if control else None
    server, mode = False, None
    if nvml is not None and handle is not None:
        try:
            mode = int(nvml.nvmlDeviceGetComputeMode(handle))
        except Exception:  # not supported on this device or driver
            mode = None
        server = any(name == MPS_SERVER_PROCESS for name in gpu_process_names(nvml, handle))
    return SharingProbe(pipe_directory=pipes, control_pipe=control, control_answers=answers,
                        mps_server_on_device=server, compute_mode=mode)


def control_socket_answers(path: Path, timeout_s: float = 1.0) -> bool:
    """Whether the MPS control daemon accepts a connection on its socket (a connect and close,
    what its own client does first). A socket nobody listens on refuses (ECONNREFUSED)."""
    for kind in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM):
        try:
            with socket.socket(socket.AF_UNIX, kind) as sock:
                sock.settimeout(timeout_s)
                sock.connect(str(path))
                return True
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:  # the other socket type
                continue
            return False
    return False


def gpu_process_names(nvml: Any, handle: Any) -> list[str]:
    """Base names of the processes NVML lists on the GPU (compute and graphics); a process whose
    name NVML cannot read (another pid namespace) is left out."""
    names = []
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nvml, query)(handle)
        except Exception:  # not supported on this device or driver
            continue
        for p in procs:
            try:
                name = nvml.nvmlSystemGetProcessName(p.pid)
            except Exception:
                continue
            name = name.decode() if isinstance(name, bytes) else str(name)
            names.append(os.path.basename(name))
    return names
