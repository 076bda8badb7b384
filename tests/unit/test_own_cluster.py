"""bench/own_cluster.py without Ray: which processes belong to a cluster, how they are stopped, the
`ray start` command it runs, and Ray's default current-cluster file it leaves as it was found."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench import own_cluster
from bench.own_cluster import (TAG_VAR, ClusterPorts, Interrupted, OwnCluster, OwnClusterConfig, processes_of,
                               stop_processes, stop_ray_processes)

# a parent that starts a child and both sleep: the shape of a Ray worker and its vLLM engine process
TREE = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"


@pytest.fixture
def spawn():
    started = []

    def run(env_extra=None, args=()):
        env = dict(os.environ, **(env_extra or {}))
        proc = subprocess.Popen([sys.executable, "-c", TREE, *args], env=env)
        started.append(proc)
        return proc

    yield run
    for proc in started:  # only what this test started
        for p in psutil.Process(proc.pid).children(recursive=True) if psutil.pid_exists(proc.pid) else []:
            p.kill()
        proc.kill()
        proc.wait()


def _children(proc, n=1):
    parent = psutil.Process(proc.pid)
    for _ in range(200):
        kids = parent.children(recursive=True)
        if len(kids) >= n:
            return kids
        psutil.wait_procs(kids, timeout=0.05)
    raise AssertionError("the child process did not start")


def test_tagged_processes_and_their_children_are_found_and_stopped_others_are_not(spawn):
    ours = spawn({TAG_VAR: "abc"})
    other = spawn({TAG_VAR: "other"})
    untagged = spawn()
    (child,) = _children(ours)
    _children(other), _children(untagged)

    found = {p.pid for p in processes_of(tag="abc")}
    assert found == {ours.pid, child.pid}

    assert stop_processes(processes_of(tag="abc"), grace_s=5) == []
    ours.wait(timeout=5)
    assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
    assert other.poll() is None and untagged.poll() is None


# a raylet stand-in: takes a moment to exit on SIGTERM, as a raylet shutting down does
RAYLET = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.5), sys.exit(0))); time.sleep(120)"
# a GCS stand-in, named as Ray's: on SIGTERM it writes whether the raylet (pid argv[1]) still runs
GCS = """
import signal, sys, time
open("/proc/self/comm", "w").write("gcs_server")
def on_term(*_):
    try:
        state = open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:  # ended and reaped
        state = "Z"
    open(sys.argv[2], "w").write("raylet up" if state != "Z" else "raylet gone")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[2], "w").write("ready")
time.sleep(120)
"""


def test_a_clusters_gcs_is_stopped_after_every_other_process(tmp_path):
    """The raylet and workers get SIGTERM while the GCS still runs (with it gone they wait on it until
    SIGKILL); the GCS gets it once they have ended."""
    seen = tmp_path / "seen"
    raylet = subprocess.Popen([sys.executable, "-c", RAYLET])
    gcs = subprocess.Popen([sys.executable, "-c", GCS, str(raylet.pid), str(seen)])
    try:
        for _ in range(200):
            if seen.exists() and seen.read_text() == "ready":
                break
            psutil.wait_procs([psutil.Process(gcs.pid)], timeout=0.05)
        assert psutil.Process(gcs.pid).name() == "gcs_server"
        procs = [psutil.Process(gcs.pid), psutil.Process(raylet.pid)]  # the GCS first, as processes_of may list it
        assert stop_ray_processes(procs, grace_s=5) == []
        assert seen.read_text() == "raylet gone"
    finally:
        for proc in (gcs, raylet):
            proc.kill()
            proc.wait()


def test_processes_are_found_by_the_temp_dir_on_their_command_line_not_by_a_longer_name(spawn, tmp_path):
    temp = str(tmp_path / "plateau-ray-x")
    ours = spawn(args=(f"--temp-dir={temp}",))
    sibling = spawn(args=(f"--temp-dir={temp}y",))
    _children(ours), _children(sibling)
    assert ours.pid in {p.pid for p in processes_of(temp_dir=temp)}
    assert sibling.pid not in {p.pid for p in processes_of(temp_dir=temp)}


def test_this_process_and_its_ancestors_are_never_in_the_set():
    me = psutil.Process()
    marker = me.cmdline()[0]  # the interpreter as this process was started: it is on its own command line
    found = {p.pid for p in processes_of(temp_dir=marker)}
    assert me.pid not in found and not found & {p.pid for p in me.parents()}


def test_the_head_gets_its_own_temp_dir_and_every_port_and_never_ray_stop(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    cluster = OwnCluster(OwnClusterConfig(num_gpus=2), log_dir=tmp_path)
    cmd = cluster.start_command()
    assert cmd[1:3] == ["start", "--head"] and "stop" not in cmd
    assert f"--temp-dir={cluster.temp_dir}" in cmd and len(cluster.temp_dir) < 40
    ports = cluster.ports.model_dump()
    assert len(set(ports.values())) == len(ports)
    for flag in ("port", "node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-port",
                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port"):
        assert any(a.startswith(f"--{flag}=") and int(a.split("=")[1]) in ports.values() for a in cmd), flag
    env = cluster.env()
    assert env[TAG_VAR] == cluster.tag and "RAY_ADDRESS" not in env
    assert cluster.address == f"127.0.0.1:{cluster.ports.gcs}"
    assert not any(a.startswith(("--memory", "--resources")) for a in cmd)
    os.rmdir(cluster.temp_dir)


def test_worker_nodes_join_the_head_with_their_own_temp_dir_ports_memory_and_resources():
    import json

    from bench.own_cluster import NodeConfig

    cfg = OwnClusterConfig(num_gpus=1, resources={"accelerator_type:small": 1}, memory_bytes=3 << 30,
                           workers=[NodeConfig(num_gpus=1, memory_bytes=8 << 30, resources={"accelerator_type:large": 1},
                                               env={"PLATEAU_HOME": "/elsewhere"})])
    cluster = OwnCluster(cfg)
    head = cluster.start_command()
    assert f"--memory={3 << 30}" in head and '--resources={"accelerator_type:small": 1.0}' in head
    worker = cluster.worker_command(0)
    assert worker[1:3] == ["start", f"--address={cluster.address}"] and "--head" not in worker
    assert f"--temp-dir={cluster.temp_dir}/w0" in worker and f"--memory={8 << 30}" in worker
    resources = next(a for a in worker if a.startswith("--resources="))
    assert json.loads(resources.split("=", 1)[1]) == {"accelerator_type:large": 1}
    head_ports = set(cluster.ports.model_dump().values())
    worker_ports = [int(a.split("=")[1]) for a in worker if a.split("=")[0].endswith("-port") and "worker-port" not in a]
    assert len(worker_ports) == 6 and not head_ports & set(worker_ports)
    os.rmdir(cluster.temp_dir)

def test_autoscaled_node_types_start_rays_autoscaler_with_the_head_as_declared_and_the_fake_provider():
    import json

    from bench.own_cluster import AutoscaledNodeType

    small = {"accelerator_type:small": 1}
    cfg = OwnClusterConfig(num_cpus=1, num_gpus=1, resources=small,
                           autoscaled=[AutoscaledNodeType(name="small", num_gpus=1, resources=small, max_workers=2)])
    cluster = OwnCluster(cfg)
    flag = next(a for a in cluster.start_command() if a.startswith("--autoscaling-config="))
    doc = json.loads(Path(flag.split("=", 1)[1]).read_text())
    assert doc["provider"]["type"] == "fake_multinode" and doc["provider"]["gcs_address"] == cluster.address
    types = doc["available_node_types"]
    assert types["ray.head.default"]["resources"] == {"CPU": 1, "GPU": 1, "accelerator_type:small": 1}
    assert types["small"] == {"resources": {"CPU": 1, "GPU": 1, "accelerator_type:small": 1}, "node_config": {},
                              "min_workers": 0, "max_workers": 2}
    assert doc["max_workers"] == 2 and doc["head_node_type"] == "ray.head.default"
    assert cluster.env()["RAY_FAKE_CLUSTER"] == "1"  # the provider refuses to run without it

    plain = OwnCluster(OwnClusterConfig())
    assert not any(a.startswith("--autoscaling-config") for a in plain.start_command())
    assert "RAY_FAKE_CLUSTER" not in plain.env()
    shutil.rmtree(cluster.temp_dir)
    os.rmdir(plain.temp_dir)



def test_the_configured_environment_reaches_the_head_and_serve_run_but_never_replaces_the_tag(tmp_path):
    # workers inherit the head's environment, not `serve run`'s: PLATEAU_HOME must be set on both
    cluster = OwnCluster(OwnClusterConfig(env={"PLATEAU_HOME": "/data/home", TAG_VAR: "someone-else"}),
                         log_dir=tmp_path)
    env = cluster.env()
    assert env["PLATEAU_HOME"] == "/data/home" and env[TAG_VAR] == cluster.tag
    os.rmdir(cluster.temp_dir)


def test_the_shipped_config_changes_only_the_http_port(tmp_path):
    import yaml

    from bench.vs_vllm import ROOT, shipped_config_on

    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    written = yaml.safe_load(shipped_config_on(18123, tmp_path / "c.yaml").read_text())
    assert written["http_options"]["port"] == 18123 and shipped["http_options"]["port"] != 18123
    written["http_options"]["port"] = shipped["http_options"]["port"]
    assert written == shipped


def test_what_benchmarks_and_tests_set_for_serve_run_is_what_make_run_sets():
    from bench.vs_vllm import ROOT, SHIPPED_ENV

    lines = (ROOT / "Makefile").read_text().splitlines()
    recipe = lines[lines.index("run: setup") + 1]
    assert "serve run $(CONFIG)" in recipe
    import shlex

    assert all(f"{k}={v}" in shlex.split(recipe) for k, v in SHIPPED_ENV.items()), recipe


def test_ports_are_distinct_and_free():
    ports = ClusterPorts.pick().model_dump()
    assert len(set(ports.values())) == len(ports) and all(p > 0 for p in ports.values())


@pytest.mark.parametrize("before", [None, "10.0.0.9:6379"])
def test_the_default_current_cluster_file_is_put_back_when_ours_overwrote_it(monkeypatch, tmp_path, before):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    path = own_cluster.default_address_file()
    assert path == tmp_path / "ray" / "ray_current_cluster"
    if before is not None:
        path.write_text(before)
    cluster = OwnCluster(OwnClusterConfig(stop_rounds=1), log_dir=tmp_path)
    path.write_text(f"192.168.1.5:{cluster.ports.gcs}")  # what a `ray start` without --temp-dir would leave
    cluster.stop()
    assert (path.read_text() if path.exists() else None) == before
    assert not os.path.exists(cluster.temp_dir)


def test_a_file_someone_else_wrote_meanwhile_is_left_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    cluster = OwnCluster(OwnClusterConfig(stop_rounds=1), log_dir=tmp_path)
    path = own_cluster.default_address_file()
    path.write_text("10.0.0.7:6379")
    cluster.stop()
    assert path.read_text() == "10.0.0.7:6379"


def test_sigterm_inside_the_block_stops_the_cluster_and_exits_non_zero(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    stopped = []
    monkeypatch.setattr(OwnCluster, "_start", lambda self: None)
    monkeypatch.setattr(OwnCluster, "stop", lambda self: (setattr(self, "_stopping", True), stopped.append(self)))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught:
        with OwnCluster(log_dir=tmp_path) as cluster:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("the handler did not raise")
    assert caught.value.code == 128 + signal.SIGTERM
    assert stopped == [cluster]
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back
    os.rmdir(cluster.temp_dir)


def test_cleanup_stops_the_clusters_whose_owner_is_gone_and_leaves_owned_ones(spawn, tmp_path):
    from bench.own_cluster import OWNER_FILE, TEMP_PREFIX, Owner, cleanup_orphans

    dead_owner = subprocess.run([sys.executable, "-c", "import os, psutil; p = psutil.Process(); "
                                 "print(p.pid, p.create_time())"], capture_output=True, text=True).stdout.split()
    orphan_dir, owned_dir = tmp_path / f"{TEMP_PREFIX}a", tmp_path / f"{TEMP_PREFIX}b"
    orphan_dir.mkdir(), owned_dir.mkdir()
    (orphan_dir / OWNER_FILE).write_text(Owner(pid=int(dead_owner[0]), create_time=float(dead_owner[1]),
                                               tag="orphan").model_dump_json())
    me = psutil.Process()
    (owned_dir / OWNER_FILE).write_text(Owner(pid=me.pid, create_time=me.create_time(), tag="owned").model_dump_json())
    orphan, owned = spawn({TAG_VAR: "orphan"}), spawn({TAG_VAR: "owned"})
    _children(orphan), _children(owned)

    assert cleanup_orphans(str(tmp_path), grace_s=5) == 2  # the orphan and its child
    assert orphan.wait(timeout=5) is not None and owned.poll() is None
    assert not orphan_dir.exists() and owned_dir.exists()


def test_sigint_inside_the_block_is_a_keyboard_interrupt_after_which_the_cluster_is_stopped(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    stopped = []
    monkeypatch.setattr(OwnCluster, "_start", lambda self: None)
    monkeypatch.setattr(OwnCluster, "stop", lambda self: stopped.append(self))
    with pytest.raises(KeyboardInterrupt):
        with OwnCluster(log_dir=tmp_path) as cluster:
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("the handler did not raise")
    assert stopped == [cluster]
    os.rmdir(cluster.temp_dir)
