"""The reaper ends a dead owner's engine processes, and nothing else."""

from __future__ import annotations

import subprocess
import sys

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
