"""CPU cores for engines, planned per node: each engine leases a slice of the node's cores.

A replica's engine on a CPU node is pinned to `cores / N` cores. Which slice it takes cannot come
from its rank inside its deployment: two models, or the old and new variant during a re-pack,
would then pin their engines to the same cores. So every engine on a node takes the slice that
the fewest live engines already hold, whatever deployment they belong to. Leases are small files
under a node-local lock, one per engine process (its pid and start time); a lease whose process
is gone no longer counts, so nothing needs releasing after a crash; a lease that does not parse as
one is stale too (never trusted). Leases live in this user's private lock folder (`node_lock_dir`).
Ray's own processes are not pinned: they float over all cores.

The node's cores are those this process may run on (`sched_getaffinity`) capped by its cgroup's CPU
quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`): in a container limited to 4 CPUs
on a 64-core host, engines sized for 64 threads would be throttled to 4 CPUs' time. A quota says how
much CPU time, not which cores: engines take the first of the allowed cores, so pods that share a
host and see the same affinity still pin the same cores.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import psutil

from advisor.locks import node_lock_dir, read_nofollow, write_nofollow
from deployments.engine import device_start_lock

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def v2_quota_cores(cpu_max: str) -> Optional[float]:
    """The CPUs a cgroup v2 `cpu.max` ("QUOTA PERIOD"; QUOTA "max": no limit) allows; None: no limit."""
    fields = cpu_max.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def v1_quota_cores(quota: str, period: str) -> Optional[float]:
    """The CPUs a cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` pair allows; None: no limit (-1)."""
    try:
        q, p = int(quota.strip()), int(period.strip())
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def effective_cpu_count(affinity: int, quotas: Iterable[Optional[float]]) -> int:
    """The CPUs engines should be sized for: `affinity` cores, capped by the tightest quota (rounded
    up: 1.5 CPUs of time keep two threads busy part of the time), at least one."""
    limits = [q for q in quotas if q is not None]
    if not limits:
        return affinity
    return max(1, min(affinity, math.ceil(min(limits))))


def cgroup_dirs(proc_self_cgroup: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The cgroup folders whose CPU quota limits this process, from `/proc/self/cgroup`'s text: its
    own and every ancestor (a parent's quota limits its children too), for the v2 hierarchy and
    the v1 `cpu` controller. Without a cgroup namespace the path names the host's hierarchy, which a
    container does not see: the root of its own mount is among the folders for that case."""
    dirs: list[Path] = []
    for line in proc_self_cgroup.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hier, controllers, path = fields
        if hier == "0" and controllers == "":
            mounts = [root]
        elif "cpu" in controllers.split(","):
            mounts = list(dict.fromkeys([root / controllers, root / "cpu"]))
        else:
            continue
        parts = [p for p in path.strip().split("/") if p]
        for mount in mounts:
            dirs += [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return list(dict.fromkeys(dirs))


def cpu_quotas(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> list[Optional[float]]:
    """The CPU quotas (in CPUs) of this process's cgroup and its ancestors that can be read here."""
    try:
        text = proc_cgroup.read_text()
    except OSError:
        text = ""
    quotas: list[Optional[float]] = []
    for folder in cgroup_dirs(text, root) or [root]:
        try:
            if (folder / "cpu.max").is_file():
                quotas.append(v2_quota_cores((folder / "cpu.max").read_text()))
            elif (folder / "cpu.cfs_quota_us").is_file():
                quotas.append(v1_quota_cores((folder / "cpu.cfs_quota_us").read_text(),
                                             (folder / "cpu.cfs_period_us").read_text()))
        except OSError:
            continue
    return quotas


def usable_cores(affinity: Optional[Iterable[int]] = None, root: Path = CGROUP_ROOT,
                 proc_cgroup: Path = PROC_CGROUP) -> list[int]:
    """The cores this node's engines are sized for and pinned to: the first `effective_cpu_count`
    of the cores this process may run on (`affinity`, default `sched_getaffinity`)."""
    cores = sorted(affinity if affinity is not None else os.sched_getaffinity(0))
    return cores[:effective_cpu_count(len(cores), cpu_quotas(root, proc_cgroup))]


def slices(available: Sequence[int], width: int) -> list[list[int]]:
    """The node's cores cut into slices of `width` (a short last slice is dropped unless it is the only one)."""
    cores = sorted(available)
    width = max(1, min(width, len(cores)))
    cut = [cores[i:i + width] for i in range(0, len(cores) - width + 1, width)]
    return cut or [cores]


def least_used_slice(available: Sequence[int], width: int, held: Sequence[Sequence[int]]) -> list[int]:
    """The slice whose cores the live leases `held` use least (the lowest such slice on ties)."""
    use = {c: 0 for c in available}
    for lease in held:
        for c in lease:
            if c in use:
                use[c] += 1
    return min(slices(available, width), key=lambda s: (sum(use[c] for c in s), s[0]))


def parse_lease(text: str) -> Optional[dict]:
    """A lease file's record ({pid, created, cores}), or None for anything else: such a file is stale."""
    try:
        lease = json.loads(text)
    except ValueError:
        return None
    if not isinstance(lease, dict):
        return None
    pid, created, cores = lease.get("pid"), lease.get("created"), lease.get("cores")
    if type(pid) is not int or pid <= 0 or type(created) not in (int, float) or not isinstance(cores, list):
        return None
    if not all(type(c) is int for c in cores):
        return None
    return {"pid": pid, "created": created, "cores": cores}


def _alive(lease: dict) -> bool:
    try:
        return psutil.Process(lease["pid"]).create_time() == lease["created"]
    except (psutil.Error, KeyError):
        return False


def claim_cores(width: int, available: Optional[Sequence[int]] = None, lease_dir: Optional[Path] = None,
                pid: Optional[int] = None) -> list[int]:
    """Lease the least-used slice of `width` cores for process `pid` (default: this one) among
    `available` (default: `usable_cores()`)."""
    if lease_dir is not None:
        lease_dir.mkdir(parents=True, exist_ok=True)
    folder = lease_dir or node_lock_dir("cores")
    available = sorted(available if available is not None else usable_cores())
    pid = pid or os.getpid()
    with device_start_lock("cores", folder):
        held = []
        for path in folder.glob("*.json"):
            try:
                lease = parse_lease(read_nofollow(path))
            except OSError:  # a link, or gone meanwhile
                lease = None
            if lease is not None and _alive(lease) and lease["pid"] != pid:
                held.append(lease["cores"])
            elif lease is None or not _alive(lease):
                path.unlink(missing_ok=True)
        chosen = least_used_slice(available, width, held)
        record = {"pid": pid, "created": psutil.Process(pid).create_time(), "cores": chosen}
        write_nofollow(folder / f"{pid}.json", json.dumps(record))
    return chosen
