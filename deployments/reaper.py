"""Engine processes die with the replica that owns them.

vLLM runs each engine in child processes (EngineCore and its workers). When Ray kills a replica
hard (SIGKILL, `ray stop --force`, a node-manager restart), nothing ends those children: they
keep the engine's memory (on a GPU, the device memory) and its cores. So each replica starts a
small reaper process once its engine is up: it watches the replica and, when the replica is
gone, ends the engine processes it was given (checking each one's start time, so a reused pid
is never hit), then exits. It also exits when the engines are gone on their own.

    python -m deployments.reaper OWNER_PID OWNER_CREATED PID:CREATED [PID:CREATED ...]
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Sequence

import psutil

POLL_S = 0.5
TERM_GRACE_S = 3.0


def _same(pid: int, created: float) -> bool:
    try:
        return psutil.Process(pid).create_time() == created
    except psutil.Error:
        return False


def start_reaper(engine_pids: Sequence[int]) -> subprocess.Popen:
    """Start the reaper for this process and its engine processes `engine_pids`."""
    me = psutil.Process()
    args = [str(me.pid), repr(me.create_time())]
    for pid in engine_pids:
        try:
            args.append(f"{pid}:{psutil.Process(pid).create_time()!r}")
        except psutil.Error:
            continue
    # Its own session: a signal to the replica's process group must not take the reaper with it.
    return subprocess.Popen([sys.executable, "-m", "deployments.reaper", *args], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def descendants() -> set[int]:
    """The pids of this process's children, grandchildren and so on."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def engine_processes(before: set[int]) -> list[int]:
    """This process's vLLM engine processes: every descendant that is not in `before` (taken just
    before the engine started), i.e. what the engine start spawned (its EngineCore, the workers
    under it, multiprocessing's helpers). Found by parentage, not by vLLM's process titles: once
    an engine's processes kept the plain `python` title, and a reaper that looked for
    `VLLM::EngineCore` found nothing to protect."""
    return sorted(descendants() - before)


def reap(owner: tuple[int, float], targets: list[tuple[int, float]], poll_s: float = POLL_S) -> list[int]:
    """Wait until the owner is gone, then end the targets still running; returns the pids ended."""
    while _same(*owner):
        if not any(_same(*t) for t in targets):
            return []
        time.sleep(poll_s)
    alive = [psutil.Process(pid) for pid, created in targets if _same(pid, created)]
    stop_processes(alive, TERM_GRACE_S)
    return [p.pid for p in alive]


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_processes(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """SIGTERM every process, SIGKILL those still there after `grace_s`; returns the survivors.
    psutil refuses to signal a pid that was reused by another process since `procs` was taken."""
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(left, timeout=5)
    return [p for p in left if alive(p)]


def main(argv: Sequence[str]) -> int:
    owner = (int(argv[0]), float(argv[1]))
    targets = []
    for item in argv[2:]:
        pid, created = item.split(":", 1)
        targets.append((int(pid), float(created)))
    reap(owner, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
