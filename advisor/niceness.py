"""Process priority: Ray starts its workers, and what they start, at nice 15 (`RAY_worker_niceness`).

A process on the serving path (an engine, a replica's server, HAProxy, the router, the status board
the router reads) must not run below the engines it serves, or its work waits behind theirs and
tokens arrive in bursts, late, or routing calls time out. A profile measured beside serving
replicas is the opposite: it runs below them (`yield_to_serving`).
"""

from __future__ import annotations

import os
from typing import Optional


def undo_worker_niceness(pid: Optional[int] = None) -> Optional[str]:
    """Ray starts worker processes at nice 15 (`RAY_worker_niceness`); an engine, and the
    processes that relay its tokens, must not be.

    Niceness is per thread on Linux: every thread of process `pid` (default: this one) is
    raised, so the engine processes (which inherit the starting thread's) and the threads that
    carry results back through Ray run at the same priority. Returns a warning when it cannot
    be raised (lowering niceness needs CAP_SYS_NICE), else None.
    """
    current = os.getpriority(os.PRIO_PROCESS, pid or 0)
    if current <= 0:
        return None
    try:
        for tid in _thread_ids(pid):
            try:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
        return None
    except PermissionError:
        return (
            f"process {pid or os.getpid()} runs at nice {current} (Ray's worker niceness), so the "
            "engines it serves preempt it; start Ray with RAY_worker_niceness=0 in its environment"
        )


def _thread_ids(pid: Optional[int] = None) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid or 'self'}/task")]
    except OSError:
        return [pid or 0]


# Below the serving engines (nice 0), so a request's steps win the cores, but not at Ray's 15 or at
# 19: there the idle serving stack's short wake-ups (Ray, Serve, idle engines: ~0.45 of 2 cores)
# preempt the profiling engine's decode steps and its curve reads up to 2-3x slower than the device.
YIELD_NICENESS = 5


def yield_to_serving(niceness: int = YIELD_NICENESS, pid: Optional[int] = None) -> Optional[str]:
    """Run every thread of process `pid` (default: this one), and so the engine processes it starts
    (they inherit the starting thread's niceness), at exactly `niceness`: below the serving engines,
    so a profile measured beside them gives way to their requests, and above Ray's worker niceness
    (15), where it would read the device far slower than it is. Returns a warning when it cannot be
    lowered to `niceness` (that needs CAP_SYS_NICE; it then stays where it was), else None."""
    current = os.getpriority(os.PRIO_PROCESS, pid or 0)
    if current == niceness:
        return None
    try:
        for tid in _thread_ids(pid):
            try:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
        return None
    except PermissionError:
        return (f"process {pid or os.getpid()} runs at nice {current} and may not lower it to {niceness}: the "
                "profile measured beside the serving replicas reads the device slower than it is; start Ray with "
                "RAY_worker_niceness=0 in its environment")
