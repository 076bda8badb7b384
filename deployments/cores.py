"""CPU cores for engines, planned per node: each engine leases a slice of the node's cores.

A replica's engine on a CPU node is pinned to `cores / N` cores. Which slice it takes cannot come
from its rank inside its deployment: two models, or the old and new variant during a re-pack,
would then pin their engines to the same cores. So every engine on a node takes the slice that
the fewest live engines already hold, whatever deployment they belong to. Leases are small files
under a node-local lock, one per engine process (its pid and start time); a lease whose process
is gone no longer counts, so nothing needs releasing after a crash. Ray's own processes are not
pinned: they float over all cores.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import psutil

from deployments.engine import device_start_lock

LEASE_DIR = Path(tempfile.gettempdir()) / "plateau-locks" / "cores"


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


def _alive(lease: dict) -> bool:
    try:
        return psutil.Process(lease["pid"]).create_time() == lease["created"]
    except (psutil.Error, KeyError):
        return False


def claim_cores(width: int, available: Optional[Sequence[int]] = None, lease_dir: Optional[Path] = None,
                pid: Optional[int] = None) -> list[int]:
    """Lease the least-used slice of `width` cores for process `pid` (default: this one)."""
    folder = lease_dir or LEASE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    available = sorted(available if available is not None else os.sched_getaffinity(0))
    pid = pid or os.getpid()
    with device_start_lock("cores", folder):
        held = []
        for path in folder.glob("*.json"):
            try:
                lease = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if _alive(lease) and lease["pid"] != pid:
                held.append(lease["cores"])
            elif not _alive(lease):
                path.unlink(missing_ok=True)
        chosen = least_used_slice(available, width, held)
        record = {"pid": pid, "created": psutil.Process(pid).create_time(), "cores": chosen}
        (folder / f"{pid}.json").write_text(json.dumps(record))
    return chosen
