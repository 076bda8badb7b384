"""A replica whose engine stalls (its EngineCore process stopped with SIGSTOP): vLLM sees no error,
so only the replica's stall watch ends the stream under way, fails the replica and gets it replaced.

One replica of the embedded model with a small KV pool, eager, and the shortest stall limit the
config takes, on a cluster of its own as `make run` starts it (HAProxy: the stream takes the
direct path to the replica's own server).
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psutil
import pytest
from ray import serve
from ray.exceptions import RayActorError

from bench.own_cluster import free_port, own_local_ray
from bench.vs_vllm import SHIPPED_ENV
from deployments.app import build
from deployments.cluster_view import ClusterView
from deployments.config import parse_args
from deployments.engine import replica_deployment_name
from tests.ray.conftest import replica_infos, shipped_model_args, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]

HTTP_PORT = free_port()
APP = "plateau"
MODEL = "smollm2-135m"
BASE = f"http://127.0.0.1:{HTTP_PORT}"
STALL_LIMIT_S = 10.0  # models[].stall_timeout_s: its smallest allowed value is 5
# the limit is at least 10x the engine's longest step (a short prompt's prefill here: well under
# 1 s), then two watch ticks confirm it and vLLM writes the error event
STALL_MARGIN_S = 20.0


@pytest.fixture(scope="module")
def app(smollm2_path):
    env = dict(SHIPPED_ENV, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="2")
    with own_local_ray(env=env, num_cpus=2, num_gpus=1):
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        args = parse_args({"models": [shipped_model_args(
            replicas_per_device=1, max_num_seqs=4, kv_cache_bytes="64MiB", max_model_len=512, enforce_eager=True,
            model=str(smollm2_path), name=MODEL, stall_timeout_s=STALL_LIMIT_S)]})
        serve.run(build(args, ClusterView.from_ray()), name=APP, route_prefix="/")
        yield serve.get_deployment_handle(replica_deployment_name(MODEL, 1), app_name=APP)
        serve.shutdown()


def _only_replica(handle):
    infos = replica_infos(handle, want=1)
    assert len(infos) == 1
    return next(iter(infos.values()))


def test_a_stalled_engines_stream_ends_with_an_error_event_and_the_replica_is_replaced(app):
    victim = _only_replica(app)
    (engine_pid,) = victim.engine_pids
    lines: list[str] = []
    try:
        with httpx.Client(base_url=BASE, timeout=httpx.Timeout(10.0, read=STALL_LIMIT_S + STALL_MARGIN_S + 30)) as http:
            with http.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True,
                "stream": True, "temperature": 0,
            }) as r:
                assert r.status_code == 200
                data = (line for line in r.iter_lines() if line.startswith("data: "))
                lines += [next(data) for _ in range(5)]  # the stream is under way
                os.kill(engine_pid, signal.SIGSTOP)  # the EngineCore makes no step from now on
                stopped_at = time.monotonic()
                lines += list(data)  # ends by itself: the client's read timeout is far longer
                ended_after = time.monotonic() - stopped_at

        assert lines[-1] == "data: [DONE]", lines[-3:]
        errors = [json.loads(line[6:])["error"] for line in lines[:-1] if line.startswith('data: {"error"')]
        assert len(errors) == 1 and lines[-2].startswith('data: {"error"'), lines[-3:]
        assert errors[0]["code"] == 503 and "made no step" in errors[0]["message"], errors
        assert ended_after < STALL_LIMIT_S + STALL_MARGIN_S, f"the stream ended {ended_after:.0f} s after the SIGSTOP"
        assert ended_after >= STALL_LIMIT_S - 1, f"declared stalled after {ended_after:.1f} s, under the limit"

        def replaced() -> bool:
            try:
                ids = set(replica_infos(app, want=1))
            except RayActorError:  # a call that reached the replica while it ended itself
                return False
            return bool(ids) and victim.replica_id not in ids

        wait_until(replaced, 300, "Serve to replace the replica whose engine stalled", every_s=2,
                   detail=lambda: str(serve.status()))
        # the replica's reaper ended the stopped engine process (SIGKILL reaches a stopped process)
        wait_until(lambda: not _alive(engine_pid), 30, f"the stalled engine process {engine_pid} to be ended")
    finally:
        if _alive(engine_pid):  # never leave a stopped engine behind, whatever failed above
            os.kill(engine_pid, signal.SIGKILL)

    with httpx.Client(base_url=BASE, timeout=120) as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    assert _only_replica(app).replica_id != victim.replica_id


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
