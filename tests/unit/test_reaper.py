"""The reaper ends a dead owner's engine processes, and nothing else."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from deployments.reaper import reap


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _ident(p: subprocess.Popen) -> tuple[int, float]:
    return p.pid, psutil.Process(p.pid).create_time()


def test_targets_die_when_the_owner_dies():
    owner, engine, bystander = _sleeper(), _sleeper(), _sleeper()
    try:
        owner.kill()
        owner.wait()
        ended = reap((owner.pid, 0.0), [_ident(engine)], poll_s=0.05)
        assert ended == [engine.pid]
        assert engine.wait(timeout=10) is not None
        assert bystander.poll() is None  # not ours to end
    finally:
        for p in (owner, engine, bystander):
            p.kill()
            p.wait()


def test_a_reused_pid_is_never_hit():
    victim = _sleeper()
    try:
        pid, created = _ident(victim)
        assert reap((10**7, 0.0), [(pid, created + 1.0)], poll_s=0.05) == []
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_the_reaper_leaves_when_the_engines_are_gone_first():
    owner, engine = _sleeper(), _sleeper()
    try:
        ident = _ident(engine)
        engine.kill()
        engine.wait()
        assert reap(_ident(owner), [ident], poll_s=0.05) == []
        assert owner.poll() is None
    finally:
        for p in (owner, engine):
            p.kill()
            p.wait()


def test_the_engine_processes_are_what_the_engine_start_spawned_whatever_their_titles():
    """vLLM names its processes `VLLM::EngineCore` / `VLLM::Worker`, but once an engine's kept the
    plain `python` title and a title-based search left it unprotected; parentage cannot miss it."""
    from deployments.reaper import descendants, engine_processes

    earlier = _sleeper()  # a child this process had before the engine started: not the engine's
    try:
        before = descendants()
        engine = subprocess.Popen([sys.executable, "-c",  # a plain-titled "engine" with a worker child
                                   "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                                   "'import time; time.sleep(120)']); time.sleep(120)"])
        try:
            for _ in range(100):  # its worker starts a moment later
                if len(engine_processes(before)) == 2:
                    break
                time.sleep(0.05)
            found = engine_processes(before)
            worker = [c.pid for c in psutil.Process(engine.pid).children()]
            assert found == sorted([engine.pid, *worker]) and earlier.pid not in found
        finally:
            for pid in engine_processes(before):
                psutil.Process(pid).kill()
            engine.wait(timeout=10)
    finally:
        earlier.kill()
        earlier.wait()
