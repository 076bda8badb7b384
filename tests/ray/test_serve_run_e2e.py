"""End to end: `serve run config.yaml` as `make run` runs it (behind Ray's HAProxy ingress), on a
CPU-only cluster, via the openai client.

The cluster is the test's own (bench/own_cluster.py: its own temp dir and free ports, the shipped
config with only Serve's HTTP port changed), so Ray's default /tmp/ray, port 8000 and a user's
cluster are never touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from bench.fuzz_vs_vllm import fuzz
from bench.own_cluster import OwnCluster, OwnClusterConfig
from bench.vs_vllm import SHIPPED_ENV, shipped_config_on
from tests.ray.conftest import ROOT, ray_session_logs, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]


def _serve_bin() -> str:
    return str(Path(sys.executable).with_name("serve"))


@dataclass(frozen=True)
class Served:
    """`serve run config.yaml` on a Ray head of the test's own: where to reach it and its log."""

    base_url: str  # http_options.port: Ray's HAProxy ingress (the shipped config with only its port changed)
    dashboard: str  # what `serve status --address` takes
    address: str  # the cluster's GCS address, what `plateau status --address` takes
    log: Path
    temp_dir: str  # the cluster's Ray temp dir (session logs)


@pytest.fixture(scope="module")
def served(shipped_profile, tmp_path_factory) -> Served:
    """`serve run config.yaml` answering on a Ray head of the test's own, stopped whole after."""
    work = tmp_path_factory.mktemp("serve-run")
    log = work / "serve-run.log"
    with OwnCluster(OwnClusterConfig(num_cpus=os.cpu_count() or 2, include_dashboard=True, env=SHIPPED_ENV),
                    log_dir=work) as cluster:
        base = f"http://127.0.0.1:{cluster.ports.serve_http}"
        proc = cluster.serve_run(shipped_config_on(cluster.ports.serve_http, work / "config.yaml"), log, cwd=ROOT)

        def ready() -> bool:
            assert proc.poll() is None, f"serve run exited early; log:\n{log.read_text()[-4000:]}"
            try:
                r = httpx.post(f"{base}/v1/completions", timeout=30,
                               json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1})
                return r.status_code == 200
            except httpx.HTTPError:
                return False

        # The Advisor plans from the suite's stored profile (`shipped_profile`), then the replicas start.
        wait_until(ready, 900, "serve run config.yaml to answer", every_s=3)
        yield Served(base_url=base, dashboard=f"http://127.0.0.1:{cluster.ports.dashboard}",
                     address=cluster.address, log=log, temp_dir=cluster.temp_dir)


def test_openai_client_gets_real_text(served):
    api = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="none", max_retries=0, timeout=120)
    out = api.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0,
    )
    assert "Paris" in out.choices[0].message.content
    text = "".join(c.choices[0].text for c in api.completions.create(
        model="smollm2-135m", prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True))
    assert text.strip()


def test_the_port_is_served_by_rays_haproxy_as_make_run_starts_it(served):
    """`make run` sets RAY_SERVE_ENABLE_HA_PROXY=1 (docs/benchmarks.md: Serve's Python proxy was the
    slowest ingress measured): the process listening on http_options.port is HAProxy."""
    port = int(served.base_url.rsplit(":", 1)[1])
    listeners = [c.pid for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid]
    assert listeners, f"nothing listens on {port}"
    assert {psutil.Process(pid).name() for pid in listeners} == {"haproxy"}, listeners


def test_serve_runs_throughput_optimized_with_replica_logs_on_stderr_as_make_run_starts_it(served):
    """`make run` sets RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (bench/path_cost.py: up to twice the
    tokens/s when the engine is fast) but keeps RAY_SERVE_LOG_TO_STDERR=1: Serve's controller says
    which settings it runs with, and the user still sees the replicas' logs in `serve run`'s output."""
    said = ray_session_logs(served.temp_dir)
    assert "Throughput optimized Ray Serve enabled" in said
    for setting in ("gRPC communication enabled", "User code running in main thread",
                    "Router running in main thread"):
        assert setting in said, setting
    assert "Log to stderr disabled" not in said
    assert "replica of smollm2-135m ready" in served.log.read_text(errors="replace")


PATH_COUNTS = """
import json, sys, ray
from ray import serve
from cluster.board import find_board
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
ingress = serve.get_deployment_handle("OpenAIIngress", app_name="plateau").path_counts.remote().result(timeout_s=60)
router = serve.get_deployment_handle("PlateauRouter", app_name="plateau").counts.remote().result(timeout_s=60)
view = ray.get(find_board().data_plane.remote("plateau"), timeout=60)
print(json.dumps({"ingress": ingress, "router": router,
                  "replicas": {r.replica_id: r.model_dump() for r in view.replicas if r.role == "llm"}}))
"""


def _path_counts(served: Served) -> dict:
    """Where requests went: through the ingress, pinned by the router, taken by each LLM replica's server."""
    out = subprocess.run([sys.executable, "-c", PATH_COUNTS, served.address], capture_output=True, text=True,
                         timeout=180, cwd=ROOT, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_streamed_tokens_reach_the_client_from_the_llm_replicas_own_servers(served):
    """The direct data path: HAProxy asks the router, then sends each request to an LLM replica's own
    server, and its chunks come straight back; the ingress replica handles none of them."""
    wait_until(lambda: len(_path_counts(served)["replicas"]) >= 1, 60, "the LLM replicas to report to the routers")
    before = _path_counts(served)
    sent = 6
    for i in range(sent):
        chunks = []
        with httpx.stream("POST", f"{served.base_url}/v1/completions", timeout=120,
                          json={"model": "smollm2-135m", "prompt": f"{i} apples and", "max_tokens": 5,
                                "stream": True}) as r:
            assert r.status_code == 200
            chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert len(chunks) == 5, chunks

    def taken() -> int:
        after = _path_counts(served)["replicas"]
        return sum(r["received"] - before["replicas"].get(rid, {}).get("received", 0) for rid, r in after.items())

    wait_until(lambda: taken() >= sent, 30, f"the replicas' servers to have taken the {sent} requests",
               detail=lambda: json.dumps(_path_counts(served)))
    after = _path_counts(served)
    assert after["ingress"]["data_requests"] == before["ingress"]["data_requests"], (before, after)
    assert after["router"]["pinned"] - before["router"]["pinned"] >= sent, (before, after)


FULL_BATCH = """
import asyncio, json, sys, time
import httpx, ray
from cluster.board import find_board
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
base, tokens = sys.argv[2], int(sys.argv[3])
board = find_board()
replicas = {r.replica_id: r for r in ray.get(board.data_plane.remote("plateau")).replicas if r.role == "llm"}
capacity = sum(r.max_num_seqs for r in replicas.values())
peak = {rid: 0 for rid in replicas}

async def one(client):
    body = {"model": "smollm2-135m", "prompt": "Count: 1, 2, 3,", "max_tokens": tokens, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        assert r.status_code == 200, r.status_code
        async for _ in r.aiter_lines():
            pass

async def sample(stop):
    while not stop.is_set():
        view = await board.data_plane.remote("plateau")
        for r in view.replicas:
            if r.replica_id in peak:
                peak[r.replica_id] = max(peak[r.replica_id], r.engine_running)
        await asyncio.sleep(0.2)

async def main():
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample(stop))
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        await asyncio.gather(*(one(client) for _ in range(capacity)))
    stop.set()
    await sampler

asyncio.run(main())
print(json.dumps({"capacity": capacity, "max_num_seqs": {k: r.max_num_seqs for k, r in replicas.items()},
                  "peak": peak}))
"""


def test_at_the_plans_capacity_every_engine_decodes_a_full_batch(served):
    """As many streams as the running replicas' batches add up to: none waits outside an engine that
    has room (the router spreads them by what each replica holds), so every engine's running batch
    reaches its max_num_seqs."""
    out = subprocess.run([sys.executable, "-c", FULL_BATCH, served.address, served.base_url, "48"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["capacity"] >= 2 and seen["peak"], seen
    assert all(seen["peak"][rid] == b for rid, b in seen["max_num_seqs"].items()), seen


def _status(served: Served) -> dict:
    out = subprocess.run([_serve_bin(), "status", "--address", served.dashboard], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_the_planned_replicas_run_on_the_cpu_only_cluster(served):
    # Engines start one after another (one start lock per device), so a later replica may
    # still be starting when the first one already answers.
    wait_until(lambda: _status(served)["applications"]["plateau"]["status"] == "RUNNING", 180,
               "all replicas to be running", every_s=3)
    deployments = _status(served)["applications"]["plateau"]["deployments"]
    (name,) = [d for d in deployments if d.startswith("LLM:smollm2-135m@n")]  # one variant: no `variants` set
    planned = int(name.split("@n")[1])  # the variant is named by its N (replicas per device; one device here)
    assert 1 <= planned <= 2  # the plan keeps at least one core per replica on this 2-core machine
    assert deployments[name]["replica_states"] == {"RUNNING": planned}
    assert deployments[name]["status"] == "HEALTHY"

    def models_lists_them() -> bool:  # the ingress learns running counts from the status board (refreshed)
        (model,) = httpx.get(f"{served.base_url}/v1/models", timeout=30).json()["data"]
        return model["replicas"] == planned

    def seen() -> str:
        models = httpx.get(f"{served.base_url}/v1/models", timeout=30).text
        policy_lines = [ln for ln in served.log.read_text().splitlines() if "policy" in ln][-30:]
        return (f"/v1/models: {models}\nplateau status:\n{_plateau_status(served)}\n"
                f"serve status:\n{_status(served)}\n"
                "serve run's log, lines naming the policy:\n" + "\n".join(policy_lines))

    wait_until(models_lists_them, 60, f"/v1/models to list {planned} running replicas", every_s=2, detail=seen)


def _plateau_status(served: Served) -> str:
    out = subprocess.run([sys.executable, "-m", "deployments.cli", "status", "--address", served.address], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_plateau_status_shows_the_placement_and_the_policy_running(served):
    def policy_ran() -> bool:
        out = _plateau_status(served)
        return "policy last ran: never" not in out and "smollm2-135m: n" in out and "/cpu" in out

    wait_until(policy_ran, 120, "plateau status to show the app with its policy running", every_s=5,
               detail=lambda: _plateau_status(served))
    # every tick since the start succeeded (two running replicas of one variant once crashed every tick)
    assert "; errors: 0" in _plateau_status(served)


def test_guidellm_completes_a_sweep_with_its_backend_check_on(served, smollm2_path, tmp_path):
    """The vLLM project's benchmark client, out of the box: it probes GET /health first, then sends
    streamed chat requests with max_completion_tokens, ignore_eos and stream_options.include_usage."""
    out = tmp_path / "guidellm.json"
    cmd = [str(Path(sys.executable).with_name("guidellm")), "run",
           "--backend", f"kind=openai_http,target={served.base_url},model=smollm2-135m",
           "--tokenizer", f"kind=huggingface_auto,model={smollm2_path}",
           "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=16",
           "--profile", "kind=concurrent,streams=4", "--constraint", "kind=max_requests,count=16",
           "--output", f"kind=json,path={out}", "--disable-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    totals = report["benchmarks"][0]["metrics"]["request_totals"]
    assert totals["successful"] == 16 and totals["errored"] == 0 and totals["incomplete"] == 0, totals


def test_fan_out_past_vllms_own_limits_is_refused_with_400_and_the_server_keeps_serving(served):
    """The security table (docs/faults-and-security.md): `n` and a completions prompt list are capped by vLLM's own limits
    (VLLM_MAX_N_SEQUENCES 16384, VLLM_MAX_COMPLETION_PROMPTS 1024), checked before anything runs."""
    with httpx.Client(base_url=served.base_url, timeout=120) as http:
        many_n = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1,
                                                    "n": 16385})
        many_prompts = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": ["Hi"] * 1025,
                                                          "max_tokens": 1})
        after = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1})
    assert many_n.status_code == 400 and "error" in many_n.json(), many_n.text[:500]
    assert many_prompts.status_code == 400 and "error" in many_prompts.json(), many_prompts.text[:500]
    assert after.status_code == 200


def test_fuzzing_with_vllms_schema_finds_no_server_error(served, tmp_path):
    """schemathesis drives vLLM's own OpenAPI schema (what /openapi.json serves) against the
    server: no answer >= 500, and a normal request still succeeds afterwards. Token budgets are
    capped by bench/schemathesis_hooks.py (a body without max_tokens generates up to
    max_model_len: minutes per request here)."""
    run = fuzz(served.base_url, tmp_path)
    assert run.returncode == 0, run.output[-4000:]
    assert run.generated >= 20 and run.passed == run.generated, run.output[-2000:]
    ok = httpx.post(f"{served.base_url}/v1/completions", timeout=60,
                    json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


REPLICA = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deployments = serve.status().applications["plateau"].deployments
name = next(d for d, s in deployments.items() if d.startswith("LLM:") and s.replica_states.get("RUNNING"))
info = serve.get_deployment_handle(name, app_name="plateau").info.remote().result(timeout_s=60)
print(json.dumps({"pid": info.pid, "engine_pids": info.engine_pids}))
"""


def test_a_killed_replica_leaves_no_engine_process_behind(served):
    """SIGKILL of a replica actor (what `ray stop --force` or a node-manager restart does): its
    reaper ends the engine processes within seconds (Serve then starts a new replica). After every
    test that counts on each planned replica running; the tests after it kill processes too."""
    from deployments.reaper import alive

    out = subprocess.run([sys.executable, "-c", REPLICA, served.address], capture_output=True, text=True, timeout=180,
                         env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-2000:]
    victim = json.loads(out.stdout.strip().splitlines()[-1])
    engines = [psutil.Process(pid) for pid in victim["engine_pids"]]
    assert engines and all(alive(p) for p in engines)
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in engines), 20, "the killed replica's engine processes to end")


def _llm_replicas(raylet: psutil.Process) -> list[psutil.Process]:
    return [w for w in raylet.children() if "ServeReplica" in _title(w) and "LLM:" in _title(w)]


def _title(p: psutil.Process) -> str:
    try:
        return p.name() + " " + " ".join(p.cmdline()[:1])
    except psutil.Error:
        return ""


def test_a_replica_killed_while_its_engine_starts_leaves_no_engine_behind(served):
    """A replica is killed; Serve starts a new one, which starts its engine; SIGKILL that one as soon
    as its engine process appears (the engine takes tens of seconds to come up here): the engine
    processes it already started end within seconds. Once the reaper started only after the engine
    was up, and such an engine stayed, pinned to the cores (on a GPU, holding the memory) the next
    replica wanted."""
    from bench.own_cluster import processes_of
    from deployments.reaper import alive

    (raylet,) = [p for p in processes_of(temp_dir=served.temp_dir) if p.name() == "raylet"]

    def engines() -> dict[int, tuple[psutil.Process, psutil.Process]]:  # EngineCore pid -> (its replica, it)
        found = {}
        for replica in _llm_replicas(raylet):
            try:
                found.update({c.pid: (replica, c) for c in replica.children(recursive=True) if "EngineCore" in _title(c)})
            except psutil.Error:
                continue
        return found

    wait_until(lambda: bool(engines()), 300, "an LLM replica with its engine")
    before = engines()
    first_replica = next(iter(before.values()))[0]
    first_replica.send_signal(signal.SIGKILL)
    new = {}

    def a_new_engine() -> bool:
        new.update({k: v for k, v in engines().items() if k not in before})
        return bool(new)

    wait_until(a_new_engine, 300, "Serve's new replica to start its engine", every_s=0.2)
    replica, engine = next(iter(new.values()))
    tree = [engine, *engine.children(recursive=True)]
    replica.send_signal(signal.SIGKILL)
    started = time.time() - engine.create_time()
    wait_until(lambda: not any(alive(p) for p in tree), 20,
               f"the engine processes of a replica killed {started:.1f} s into its engine's start to end",
               detail=lambda: "\n".join(f"{p.pid} {_title(p)}" for p in tree if alive(p)))


def test_the_engines_end_with_their_nodes_raylet_and_gcs(served):
    """SIGKILL of the node's raylet and GCS (a node crash, an OOM kill of Ray, `ray stop --force`):
    every engine process under the LLM replicas (vLLM's, by their titles here, and what they started)
    ends within seconds; on a GPU they would hold its memory. Last in the module: it ends the
    cluster; a replica may still be starting its engine."""
    from bench.own_cluster import processes_of
    from deployments.reaper import alive

    ray_procs = {p.name(): p for p in processes_of(temp_dir=served.temp_dir) if p.name() in ("raylet", "gcs_server")}
    assert set(ray_procs) == {"raylet", "gcs_server"}, ray_procs
    started = []

    def an_engine_runs() -> bool:  # the replica killed above is being replaced: wait for its engine's start
        started[:] = []
        for w in _llm_replicas(ray_procs["raylet"]):
            for engine in [c for c in w.children() if "VLLM" in _title(c)]:
                try:
                    started.extend([engine, *engine.children(recursive=True)])
                except psutil.Error:
                    continue
        return any("EngineCore" in _title(p) for p in started)

    wait_until(an_engine_runs, 300, "an LLM replica with its engine")
    for p in ray_procs.values():
        p.send_signal(signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in started), 30, "the engines of the node whose Ray processes died to end",
               detail=lambda: "\n".join(f"{p.pid} {_title(p)}: {_cmdline(p)}" for p in started if alive(p)))


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:300]
    except psutil.Error:
        return ""
