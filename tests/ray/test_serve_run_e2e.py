"""End to end: `serve run config.yaml` as a user runs it, on a CPU-only cluster, via the openai client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.ray.conftest import ROOT, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]


def _serve_bin() -> str:
    return str(Path(sys.executable).with_name("serve"))


@pytest.fixture(scope="module")
def served(smollm2_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-run") / "serve-run.log"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [_serve_bin(), "run", "--address", "local", "config.yaml"], cwd=ROOT, env=env,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def ready() -> bool:
        assert proc.poll() is None, f"serve run exited early; log:\n{log.read_text()[-4000:]}"
        try:
            r = httpx.post("http://127.0.0.1:8000/v1/completions", timeout=30,
                           json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1})
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    try:
        # First start: the Advisor profiles SmolLM2 here (~3 min), then the replicas start.
        wait_until(ready, 600, "serve run config.yaml to answer", every_s=3)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)  # serve run tears the app and its local cluster down on Ctrl-C
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_openai_client_gets_real_text(served):
    api = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none", max_retries=0, timeout=120)
    out = api.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0,
    )
    assert "Paris" in out.choices[0].message.content
    text = "".join(c.choices[0].text for c in api.completions.create(
        model="smollm2-135m", prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True))
    assert text.strip()


def _status() -> dict:
    out = subprocess.run([_serve_bin(), "status"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_the_planned_replicas_run_on_the_cpu_only_cluster(served):
    # Engines start one after another (one start lock per device), so a later replica may
    # still be starting when the first one already answers.
    wait_until(lambda: _status()["applications"]["plateau"]["status"] == "RUNNING", 180,
               "all replicas to be running", every_s=3)
    (model,) = httpx.get("http://127.0.0.1:8000/v1/models", timeout=30).json()["data"]
    planned = model["replicas"]
    assert 1 <= planned <= 2  # the plan keeps at least one core per replica on this 2-core machine
    deployments = _status()["applications"]["plateau"]["deployments"]
    (name,) = [d for d in deployments if d.startswith("LLM:smollm2-135m@n")]  # one variant: no `variants` set
    assert deployments[name]["replica_states"] == {"RUNNING": planned}
    assert deployments[name]["status"] == "HEALTHY"


def test_plateau_status_shows_the_placement_and_the_policy_running(served):
    def policy_ran() -> bool:
        out = subprocess.run([sys.executable, "-m", "deployments.cli", "status"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
        assert out.returncode == 0, out.stderr
        return "policy last ran: never" not in out.stdout and "smollm2-135m: n" in out.stdout and "/cpu" in out.stdout

    wait_until(policy_ran, 120, "plateau status to show the app with its policy running", every_s=5)
