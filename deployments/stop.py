"""`plateau stop`'s second half: find the `serve run` processes that drive a cluster and end them.

A `serve run` in the background ignores SIGINT (the shell started it so), and it stays after its
apps are deleted. On SIGTERM it exits through Ray's exit hook, which stops the local Ray instance it
started itself (GCS, raylet, dashboard); a `serve run` that joined a cluster someone else started
leaves that cluster running. The drivers come from the GCS job table (pid and node address of each
live driver), so only processes of this cluster on this machine are touched.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Optional

import psutil
from pydantic import BaseModel, ConfigDict, Field

from deployments.reaper import alive, running_after, stop_processes


class Driver(BaseModel):
    """A live `serve run` process of the cluster, on this machine."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pid: int
    command: str


class JobRow(BaseModel):
    """What the GCS job table says of one driver."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pid: int
    ip: str
    dead: bool


def serve_run_command(cmdline: list[str]) -> Optional[str]:
    """`serve run ...` (from the `serve` console script, directly or through `python`) as typed; None for
    any other command line."""
    for i, arg in enumerate(cmdline[:-1]):
        if os.path.basename(arg) == "serve" and cmdline[i + 1] == "run":
            return " ".join(["serve", *cmdline[i + 1:]])
    return None


def pick_drivers(jobs: list[JobRow], local_ips: set[str], own_pid: int,
                 cmdline_of: Callable[[int], Optional[list[str]]]) -> list[Driver]:
    """The live drivers of `jobs` on this machine that are `serve run` processes (`cmdline_of` gives a
    pid's command line, None when no such process exists here)."""
    found = []
    for job in jobs:
        if job.dead or job.ip not in local_ips or job.pid == own_pid or any(d.pid == job.pid for d in found):
            continue
        command = serve_run_command(cmdline_of(job.pid) or [])
        if command:
            found.append(Driver(pid=job.pid, command=command))
    return found


def _cmdline(pid: int) -> Optional[list[str]]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return None


def serve_run_drivers() -> list[Driver]:
    """The `serve run` drivers of the connected cluster that run on this machine."""
    import ray
    from ray._private.state import state

    jobs = [JobRow(pid=j["DriverPid"], ip=j["DriverIPAddress"], dead=j["IsDead"]) for j in state.job_table()]
    return pick_drivers(jobs, {ray.util.get_node_ip_address(), "127.0.0.1"}, os.getpid(), _cmdline)


class Ended(BaseModel):
    """How a driver ended, and what of its process tree (its local Ray, the engines) is left."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pid: int
    killed: bool = Field(description="It did not end on SIGTERM within the timeout and got SIGKILL.")
    left: list[int] = Field(description="Pids of its tree still running after SIGTERM and SIGKILL.")


def end_drivers(drivers: list[Driver], timeout_s: float, grace_s: float = 10.0) -> list[Ended]:
    """SIGTERM each driver (its exit hook stops the local Ray it started) and wait up to `timeout_s`;
    SIGKILL a driver still there. Then whatever of its process tree (taken before the signals, and
    again before a SIGKILL) still runs gets SIGTERM, and SIGKILL after `grace_s`: a driver stuck in
    its exit must not leave its cluster or its engines behind."""
    procs, trees = [], {}
    for d in drivers:
        try:
            p = psutil.Process(d.pid)
            trees[d.pid] = {c.pid: c for c in p.children(recursive=True)}
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.NoSuchProcess:
            continue
    stuck = running_after(procs, timeout_s)
    for p in stuck:
        try:
            trees[p.pid].update({c.pid: c for c in p.children(recursive=True)})
            p.kill()
        except psutil.NoSuchProcess:
            pass
    running_after(stuck, 5.0)
    killed = {p.pid for p in stuck}
    ended = []
    for p in procs:
        left = stop_processes([c for c in trees[p.pid].values() if alive(c)], grace_s)
        ended.append(Ended(pid=p.pid, killed=p.pid in killed,
                           left=sorted([c.pid for c in left] + ([p.pid] if alive(p) else []))))
    return ended

