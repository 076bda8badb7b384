"""The documented stop for `make run` in the background: `plateau stop`.

`serve run config.yaml` runs as `make run` starts it (the Makefile's variables; Ray's default
authentication: a local cluster with token auth, the token written to ~/.ray/auth_token), in the
background (SIGINT ignored, as `&` and nohup leave it). Once the app answers, `plateau status` must
read it and `plateau stop` must delete the app, end `serve run` and with it the local Ray instance
and every vLLM engine: no process it started is left. Every process here sees a private HOME (the
token) and RAY_TMPDIR (Ray's default temp dir): nobody else's token or cluster is read or touched.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from bench.own_cluster import ClusterPorts, stop_ray_processes
from bench.vs_vllm import shipped_config_on
from tests.ray.conftest import ROOT, started_under, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]

READY_TIMEOUT_S = 600  # a plan from the suite's stored profile, then the engines start one after another


def _makefile_run_env() -> dict[str, str]:
    """The variables the Makefile's `run` target sets for `serve run` (read from it: this test follows it)."""
    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if "bin/serve run" in ln)
    words = shlex.split(line)
    return dict(w.split("=", 1) for w in words[:next(i for i, w in enumerate(words) if w.endswith("bin/serve"))])


def _describe(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:160] or p.name()
    except psutil.Error:
        return ""


@pytest.fixture
def private(tmp_path):
    """A HOME and a RAY_TMPDIR of the test's own; whatever still runs under them at the end is stopped."""
    home = tmp_path / "home"
    home.mkdir()
    default_tmp = tempfile.mkdtemp(prefix="pl-stop-", dir="/tmp")  # short: Ray's socket paths live under it
    yield home, default_tmp
    stop_ray_processes(started_under(default_tmp), grace_s=10)
    shutil.rmtree(default_tmp, ignore_errors=True)


def test_plateau_stop_ends_a_background_make_run_with_ray_token_auth(shipped_profile, private, tmp_path):
    home, default_tmp = private
    env = dict(os.environ, HOME=str(home), RAY_TMPDIR=default_tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               VLLM_CACHE_ROOT=os.environ.get("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "vllm")),
               **_makefile_run_env())
    for name in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)  # Ray's defaults, as for a user: token auth on for the cluster serve run starts
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # the Makefile's variables were found
    port = ClusterPorts.pick().serve_http
    config = shipped_config_on(port, tmp_path / "config.yaml")
    log = tmp_path / "serve-run.log"
    bin_dir = Path(sys.executable).parent
    with open(log, "w") as sink:
        serve = subprocess.Popen([str(bin_dir / "serve"), "run", str(config)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                 stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as `&` leaves it

    def answers() -> bool:
        assert serve.poll() is None, f"serve run exited {serve.returncode}:\n{log.read_text()[-4000:]}"
        try:
            return httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                              json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1}).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, READY_TIMEOUT_S, "the app to answer", every_s=3, detail=lambda: log.read_text()[-3000:])
        assert (home / ".ray" / "auth_token").exists()  # the cluster runs with Ray's token auth
        engines = [p for p in started_under(default_tmp) if "EngineCore" in _describe(p)]
        assert engines, "\n".join(_describe(p) for p in started_under(default_tmp))
        # SIGINT, what Ctrl-C would send, does nothing to a background serve run
        serve.send_signal(signal.SIGINT)
        assert answers()

        # `plateau status` joins the token cluster too
        status = subprocess.run([str(bin_dir / "plateau"), "status"], env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and "smollm2-135m" in status.stdout, status.stdout + status.stderr

        stop = subprocess.run([str(bin_dir / "plateau"), "stop"], env=env, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "deleted plateau" in stop.stdout and f"(pid {serve.pid}):" in stop.stdout, stop.stdout
        assert serve.wait(timeout=60) is not None
    finally:
        if serve.poll() is None:
            serve.kill()

    wait_until(lambda: not started_under(default_tmp), 60, "every process of serve run's local Ray instance to end",
               detail=lambda: "\n".join(_describe(p) for p in started_under(default_tmp)))
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10,
                   json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1})
