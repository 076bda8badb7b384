"""A Ray head that belongs to one benchmark or test, and a stop that ends exactly what it started.

    with OwnCluster(OwnClusterConfig(num_cpus=4, num_gpus=2), log_dir=work) as cluster:
        cluster.serve_run(work / "config.yaml", work / "serve.log", cwd=ROOT)
        ...  # cluster.address, cluster.ports.serve_http, cluster.ports.metrics_export

The head gets its own `--temp-dir` and free ports of its own (GCS, node manager, object manager,
Ray client, dashboard, dashboard agent, runtime-env agent, metrics export, and one for Serve's
HTTP proxy that a config can use). Leaving the `with` block stops the cluster: on normal exit, on
an exception, and on SIGINT/SIGTERM (handlers installed for the block raise KeyboardInterrupt on
SIGINT and `Interrupted` (exit code 143) on SIGTERM, so the stop runs on the way out; a second
signal during the stop is ignored). The GCS is stopped after everything else (`stop_ray_processes`).
`ray stop` is never used: it ends every Ray cluster on the machine, other people's included.

With `autoscaled` node types the head also runs Ray's autoscaler over its fake multi-node provider
(`RAY_FAKE_CLUSTER=1`): a resource request or pending demand makes it start nodes of those types
on this machine (as a cloud provider would start machines), and they belong to the cluster like
the rest. Ray's own `AutoscalingCluster` test helper does the same but runs `ray stop --force`.

What belongs to the cluster: every process whose environment carries its tag (`PLATEAU_OWN_CLUSTER`,
set on `ray start` and `serve run` and inherited by the GCS, the raylet, the workers and the vLLM
engine processes they spawn), every process whose command line names its temp dir, and their
children. Ray's default "current cluster" file (`/tmp/ray/ray_current_cluster`, which a later
`serve run config.yaml` reads) is left as it was found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Optional
from unittest import mock

import psutil

from deployments.reaper import alive as _alive, stop_processes
from pydantic import BaseModel, ConfigDict, Field

TAG_VAR = "PLATEAU_OWN_CLUSTER"
TEMP_PREFIX = "plateau-ray-"
OWNER_FILE = "plateau-owner.json"
# Ray puts Unix sockets under <temp dir>/session_<date>_<pid>/sockets/: keep the temp dir short (107-byte limit)
MAX_TEMP_BASE_CHARS = 20


class ClusterStartError(RuntimeError):
    """`ray start` failed; the message names the log to read."""


class ClusterStopError(RuntimeError):
    """Processes of the cluster survived SIGKILL; the message names them."""


class Interrupted(SystemExit):
    """SIGINT or SIGTERM arrived while a cluster was up; its code is 128 + the signal number."""


class ClusterPorts(BaseModel):
    """The ports of one cluster, each picked free on this machine when the cluster starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    gcs: int = Field(description="GCS server (`--port`): the cluster's address is 127.0.0.1:<gcs>.")
    node_manager: int = Field(description="Raylet's node manager (`--node-manager-port`).")
    object_manager: int = Field(description="Object manager (`--object-manager-port`).")
    ray_client_server: int = Field(description="Ray client server (`--ray-client-server-port`).")
    dashboard: int = Field(description="Dashboard (`--dashboard-port`), used when the dashboard is on.")
    dashboard_agent_listen: int = Field(description="Dashboard agent HTTP (`--dashboard-agent-listen-port`).")
    dashboard_agent_grpc: int = Field(description="Dashboard agent gRPC (`--dashboard-agent-grpc-port`).")
    runtime_env_agent: int = Field(description="Runtime-env agent (`--runtime-env-agent-port`).")
    metrics_export: int = Field(description="Prometheus export of Ray and Serve metrics (`--metrics-export-port`).")
    serve_http: int = Field(description="Free port for Serve's HTTP proxy: the caller puts it in its Serve config.")

    @classmethod
    def pick(cls) -> "ClusterPorts":
        """Distinct ports the OS reports free now (all sockets are held until every port is picked)."""
        held = []
        try:
            for _ in cls.model_fields:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("", 0))
                held.append(s)
            return cls(**{name: s.getsockname()[1] for name, s in zip(cls.model_fields, held)})
        finally:
            for s in held:
                s.close()


class Owner(BaseModel):
    """Who started a cluster (written into its temp dir): `cleanup` stops clusters whose owner is gone."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pid: int = Field(description="The process that started the cluster.")
    create_time: float = Field(description="Its start time (psutil), so a reused pid is not taken for it.")
    tag: str = Field(description="The cluster's tag (PLATEAU_OWN_CLUSTER) in its processes' environment.")

    def alive(self) -> bool:
        try:
            p = psutil.Process(self.pid)
            return abs(p.create_time() - self.create_time) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


class NodeConfig(BaseModel):
    """A worker node of the cluster on this machine: what it declares and its own variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    num_cpus: int = Field(1, ge=1, description="CPUs it declares (`--num-cpus`).")
    num_gpus: int = Field(0, ge=0, description="GPUs it declares (`--num-gpus`); logical ones on a CPU machine.")
    memory_bytes: Optional[int] = Field(None, gt=0, description="Memory it declares (`--memory`): a logical GPU's "
                                        "memory is the node's split evenly.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources (`--resources`), e.g. "
                                        "accelerator_type:<T>.")
    env: dict[str, str] = Field(default_factory=dict, description="Variables of this node only (over the cluster's), "
                                "e.g. a PLATEAU_HOME of its own as if it were another machine.")


class AutoscaledNodeType(BaseModel):
    """A node type Ray's autoscaler may start on this machine (Ray's fake multi-node provider): the
    nodes it adds run in the autoscaler's process tree, in the head's temp dir, with the head's
    variables. Ray refuses `memory` among a fake node's resources, so such a node declares none."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1, description="The node type's name in the autoscaling config.")
    num_cpus: int = Field(1, ge=1, description="CPUs each node declares.")
    num_gpus: int = Field(0, ge=0, description="GPUs each node declares; logical ones on a CPU machine.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources, e.g. "
                                        "accelerator_type:<T>.")
    max_workers: int = Field(1, ge=1, description="At most this many nodes of the type.")


class OwnClusterConfig(BaseModel):
    """What the head (and any worker nodes) declare and how the cluster is stopped."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    num_cpus: int = Field(2, ge=1, description="CPUs the head declares (`--num-cpus`).")
    num_gpus: int = Field(0, ge=0, description="GPUs the head declares (`--num-gpus`); logical ones on a CPU machine.")
    memory_bytes: Optional[int] = Field(None, gt=0, description="Memory the head declares (`--memory`).")
    resources: dict[str, float] = Field(default_factory=dict, description="The head's custom resources (`--resources`).")
    workers: list[NodeConfig] = Field(default_factory=list, description="Worker nodes started on this machine after "
                                      "the head, each with its own temp dir (under the head's) and ports.")
    autoscaled: list[AutoscaledNodeType] = Field(default_factory=list, description="Node types Ray's autoscaler may "
                                                 "add (none at start); empty: no autoscaler runs.")
    include_dashboard: bool = Field(False, description="Start the dashboard (on its own port).")
    stop_grace_s: float = Field(10.0, gt=0, description="Wait after SIGTERM before SIGKILL, once for the "
                               "cluster's other processes and once more for its GCS (stop_ray_processes).")
    stop_rounds: int = Field(3, ge=1, description="Look for processes again this often (teardown may spawn some).")
    keep_temp_dir: bool = Field(False, description="Keep the temp dir (Ray's session logs) after the stop.")
    start_attempts: int = Field(2, ge=1, description="`ray start` tries: on a loaded machine the raylet may miss "
                                                     "Ray's fixed 30 s registration wait; a failed try is stopped first.")
    env: dict[str, str] = Field(default_factory=dict, description="Variables set for the head (so every worker and "
                                "engine inherits them) and for `serve_run`, e.g. PLATEAU_HOME or PYTHONPATH.")


def default_address_file() -> Path:
    """Ray's "current cluster" file that `ray.init()` / `serve run` without an address read."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def free_port() -> int:
    """A TCP port the OS reports free now (for one more listener next to a cluster's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_temp_dir() -> str:
    """A fresh Ray temp dir (never Ray's default /tmp/ray, where a user's cluster keeps its session),
    short enough for the Unix sockets Ray puts under it."""
    base = tempfile.gettempdir()
    return tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=base if len(base) <= MAX_TEMP_BASE_CHARS else "/tmp")


def write_owner(temp_dir: str, tag: str) -> None:
    """Marks `temp_dir` as this process's: `cleanup_orphans` stops what runs there once it is gone."""
    me = psutil.Process()
    Path(temp_dir, OWNER_FILE).write_text(Owner(pid=me.pid, create_time=me.create_time(), tag=tag).model_dump_json())


@contextmanager
def own_local_ray(env: Optional[dict[str, str]] = None, **init_kwargs):
    """`ray.init` of a fresh local cluster with a temp dir of its own (Ray's default /tmp/ray, where a
    user's cluster keeps its session, is never touched; Ray picks free ports itself, no dashboard),
    marked as this process's so `python -m bench.own_cluster cleanup` stops it after a SIGKILL;
    shut down and removed on leaving. Yields the temp dir. `env`: variables the cluster's processes
    start with (Ray's, Serve's controller and replicas inherit them), as `ray start` in a shell with
    them set; this process keeps its own environment (Serve read its settings when it was imported)."""
    import ray

    temp = own_temp_dir()
    write_owner(temp, uuid.uuid4().hex[:12])
    with mock.patch.dict(os.environ, env or {}):  # Ray's processes start inside ray.init and inherit it
        ray.init(address="local", _temp_dir=temp, include_dashboard=False, log_to_driver=False, **init_kwargs)
    try:
        yield temp
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def stop_ray_processes(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """`stop_processes` for a Ray cluster's processes, its GCS last. Signalled together, the raylet, its
    workers, agents and dashboard find the GCS gone while they shut down and wait on it until SIGKILL
    (the whole `grace_s` each time, measured here); with the GCS still up they exit within ~2 s, then
    the GCS does (~4 s in all). Returns the survivors."""
    def is_gcs(p: psutil.Process) -> bool:
        try:
            return p.name() == "gcs_server"
        except psutil.Error:  # ended, or not ours to read: stopped with the rest
            return False

    gcs = [p for p in procs if is_gcs(p)]
    rest = [p for p in procs if p not in gcs]
    return stop_processes(rest, grace_s) + stop_processes(gcs, grace_s)


def _names(arg: str, temp_dir: str) -> bool:
    return re.search(re.escape(temp_dir) + r"(?=$|[/\s,;:])", arg) is not None


def processes_of(tag: Optional[str] = None, temp_dir: Optional[str] = None) -> list[psutil.Process]:
    """Live processes that carry `tag` in their environment or name `temp_dir` on their command line,
    with all their children; never this process or its ancestors."""
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline", "environ", "status"], ad_value=None):
        info = p.info
        if p.pid in spared or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        tagged = tag is not None and (info["environ"] or {}).get(TAG_VAR) == tag
        named = temp_dir is not None and any(_names(a, temp_dir) for a in info["cmdline"] or [])
        if tagged or named:
            found[p.pid] = p
    for p in list(found.values()):
        try:
            for child in p.children(recursive=True):
                if child.pid not in spared:
                    found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
    return [p for p in found.values() if _alive(p)]




class OwnCluster:
    """One private Ray head; use it as a context manager (see the module docstring)."""

    def __init__(self, cfg: OwnClusterConfig = OwnClusterConfig(), log_dir: Optional[Path] = None,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True)):
        self.cfg = cfg
        self.tag = uuid.uuid4().hex[:12]
        self.temp_dir = own_temp_dir()
        self.log_dir = Path(log_dir) if log_dir is not None else Path(self.temp_dir)
        self.ports = ClusterPorts.pick()
        self.address = f"127.0.0.1:{self.ports.gcs}"
        self._log = log
        self._children: list[subprocess.Popen] = []
        self._workers_started = 0
        self._address_file = default_address_file()
        self._address_file_before = _read(self._address_file)
        self._stopping = False
        self._stopped = False
        self._exit = ExitStack()

    # ---- environment and commands ------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment of every command that belongs to this cluster: its tag, no foreign address,
        token auth off (a test cluster; the `serve` CLI then reaches it without a token)."""
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        env.update(self.cfg.env)
        env[TAG_VAR] = self.tag
        env.pop("RAY_ADDRESS", None)
        if self.cfg.autoscaled:  # Ray's fake multi-node provider; its autoscaler checks every second
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        return env

    def start_command(self) -> list[str]:
        p = self.ports
        cmd = [_bin("ray"), "start", "--head", f"--temp-dir={self.temp_dir}", f"--port={p.gcs}",
               f"--node-manager-port={p.node_manager}", f"--object-manager-port={p.object_manager}",
               f"--ray-client-server-port={p.ray_client_server}", f"--dashboard-port={p.dashboard}",
               f"--dashboard-agent-listen-port={p.dashboard_agent_listen}",
               f"--dashboard-agent-grpc-port={p.dashboard_agent_grpc}", f"--runtime-env-agent-port={p.runtime_env_agent}",
               f"--metrics-export-port={p.metrics_export}",
               "--min-worker-port=0", "--max-worker-port=0",  # workers bind random free ports
               f"--num-cpus={self.cfg.num_cpus}", f"--num-gpus={self.cfg.num_gpus}",
               f"--include-dashboard={str(self.cfg.include_dashboard).lower()}", "--disable-usage-stats",
               *_declared(self.cfg.memory_bytes, self.cfg.resources)]
        if self.cfg.autoscaled:
            cmd.append(f"--autoscaling-config={self._autoscaling_config_file()}")
        return cmd

    def autoscaling_config(self) -> dict:
        """Ray's cluster config for its fake multi-node provider (`ray/autoscaler/_private/fake_multi_node`):
        the head as it is declared, the autoscaled node types, nodes up until idle for 5 minutes."""
        head = {"CPU": self.cfg.num_cpus, "GPU": self.cfg.num_gpus, **self.cfg.resources}
        if self.cfg.memory_bytes:
            head["memory"] = self.cfg.memory_bytes
        types = {"ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0}}
        for t in self.cfg.autoscaled:
            types[t.name] = {"resources": {"CPU": t.num_cpus, "GPU": t.num_gpus, **t.resources}, "node_config": {},
                             "min_workers": 0, "max_workers": t.max_workers}
        return {"cluster_name": f"plateau-{self.tag}", "max_workers": sum(t.max_workers for t in self.cfg.autoscaled),
                "provider": {"type": "fake_multinode", "gcs_address": self.address, "use_node_id_as_ip": True,
                             "disable_node_updaters": True, "disable_launch_config_check": True},
                "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
                "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {}, "initialization_commands": [],
                "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
                "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
                "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
                "rsync_filter": []}

    def _autoscaling_config_file(self) -> Path:
        path = Path(self.temp_dir, "autoscaling.json")
        path.write_text(json.dumps(self.autoscaling_config()))
        return path

    def worker_command(self, i: int, node: Optional[NodeConfig] = None) -> list[str]:
        """`ray start` of worker node `i` (`node`, default the config's i-th): joins the head, its temp dir
        under the head's, ports of its own."""
        node = self.cfg.workers[i] if node is None else node
        head = set(self.ports.model_dump().values())
        p = ClusterPorts.pick()  # distinct ports, all held while picked; none of the head's (serve_http is not bound yet)
        while head & set(p.model_dump().values()):
            p = ClusterPorts.pick()
        return [_bin("ray"), "start", f"--address={self.address}", f"--temp-dir={self.temp_dir}/w{i}",
                f"--node-manager-port={p.node_manager}", f"--object-manager-port={p.object_manager}",
                f"--dashboard-agent-listen-port={p.dashboard_agent_listen}",
                f"--dashboard-agent-grpc-port={p.dashboard_agent_grpc}",
                f"--runtime-env-agent-port={p.runtime_env_agent}", f"--metrics-export-port={p.metrics_export}",
                "--min-worker-port=0", "--max-worker-port=0",
                f"--num-cpus={node.num_cpus}", f"--num-gpus={node.num_gpus}", "--disable-usage-stats",
                *_declared(node.memory_bytes, node.resources)]

    def serve_run(self, config: Path, log: Path, cwd: Optional[Path] = None) -> subprocess.Popen:
        """`serve run <config>` against this cluster, its output to `log`; stopped with the cluster."""
        with open(log, "w") as out:
            proc = subprocess.Popen([_bin("serve"), "run", "--address", self.address, str(config)], cwd=cwd,
                                    env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._children.append(proc)
        return proc

    def processes(self) -> list[psutil.Process]:
        return processes_of(tag=self.tag, temp_dir=self.temp_dir)

    # ---- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> "OwnCluster":
        self._install_signal_handlers()
        try:
            self._start()
        except BaseException:
            self.stop()
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._exit.close()

    def _start(self) -> None:
        write_owner(self.temp_dir, self.tag)
        for attempt in range(1, self.cfg.start_attempts + 1):
            log = self.log_dir / f"ray-start-{attempt}.log"
            with open(log, "w") as out:
                done = subprocess.run(self.start_command(), env=self.env(), stdout=out, stderr=subprocess.STDOUT)
            if done.returncode == 0:
                break
            failed = f"`ray start` exited {done.returncode} (try {attempt} of {self.cfg.start_attempts}); see {log}"
            if attempt == self.cfg.start_attempts:
                raise ClusterStartError(f"{failed}:\n{log.read_text()[-2000:]}")
            self._log(f"[cluster] {failed}; stopping what it started and trying again")
            stop_ray_processes(self.processes(), self.cfg.stop_grace_s)
        self._log(f"[cluster] Ray head at {self.address} (temp dir {self.temp_dir}, Serve HTTP port "
                  f"{self.ports.serve_http}, metrics port {self.ports.metrics_export})")
        for node in self.cfg.workers:
            self.add_worker(node)

    def add_worker(self, node: NodeConfig) -> None:
        """Start one more worker node; on a running cluster it joins as a machine added by hand would."""
        i = self._workers_started
        log = self.log_dir / f"ray-start-worker{i}.log"
        with open(log, "w") as out:
            done = subprocess.run(self.worker_command(i, node), env={**self.env(), **node.env}, stdout=out,
                                  stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise ClusterStartError(f"`ray start` of worker node {i} exited {done.returncode}; see {log}:\n"
                                    f"{log.read_text()[-2000:]}")
        self._workers_started += 1
        self._log(f"[cluster] worker node {i} joined ({node.num_cpus} CPU, {node.num_gpus} GPU, "
                  f"resources {node.resources})")

    def stop(self) -> None:
        """End every process of this cluster, then put Ray's default current-cluster file back."""
        if self._stopped:
            return
        self._stopping = True
        self._disconnect_driver()
        survivors: list[psutil.Process] = []
        for _ in range(self.cfg.stop_rounds):
            procs = self.processes()
            if not procs:
                survivors = []
                break
            survivors = stop_ray_processes(procs, self.cfg.stop_grace_s)
        for child in self._children:  # reap our own children so they leave no zombie
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._restore_address_file()
        if not self.cfg.keep_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._stopped = True
        left = [p for p in survivors if _alive(p)] + [p for p in self.processes() if _alive(p)]
        if left:
            raise ClusterStopError(f"processes of the cluster at {self.address} survived SIGKILL: "
                                   + ", ".join(sorted({f"{p.pid}" for p in left})))
        self._log(f"[cluster] stopped the Ray head at {self.address} and everything it started")

    def _disconnect_driver(self) -> None:
        """A driver of this process connected to the cluster disconnects first (no errors from a dying GCS)."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        try:
            connected = ray.get_runtime_context().gcs_address
        except Exception:
            connected = ""
        if connected.endswith(f":{self.ports.gcs}"):
            ray.shutdown()

    def _restore_address_file(self) -> None:
        now = _read(self._address_file)
        if now == self._address_file_before or now is None or not now.strip().endswith(f":{self.ports.gcs}"):
            return  # unchanged, or someone else's cluster wrote it since: not ours to touch
        if self._address_file_before is None:
            self._address_file.unlink(missing_ok=True)
        else:
            self._address_file.write_text(self._address_file_before)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, self._on_signal)
            self._exit.callback(signal.signal, sig, previous)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            self._log(f"[cluster] {name} while stopping the cluster at {self.address}: still stopping")
            return
        self._log(f"[cluster] {name}: stopping the cluster at {self.address}, then exiting")
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # as Python's own handler (pytest stops its session on it)
        raise Interrupted(128 + signum)


def cleanup_orphans(base: Optional[str] = None, grace_s: float = 10.0,
                    log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> int:
    """Stop the clusters of benchmarks and tests that were killed outright (SIGKILL, OOM): those whose
    temp dir under `base` names an owner process that is gone. Clusters still owned are left alone.
    Returns how many processes were stopped."""
    stopped = 0
    for folder in sorted(Path(base or tempfile.gettempdir()).glob(TEMP_PREFIX + "*")):
        try:
            owner = Owner.model_validate_json((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not started by this helper, or still starting
        if owner.alive():
            continue
        procs = processes_of(tag=owner.tag, temp_dir=str(folder))
        left = stop_ray_processes(procs, grace_s)
        stopped += len(procs) - len(left)
        log(f"[cluster] {folder}: owner {owner.pid} is gone; stopped {len(procs) - len(left)} processes"
            + (f", {len(left)} survived: {[p.pid for p in left]}" if left else ""))
        if not left:
            shutil.rmtree(folder, ignore_errors=True)
    return stopped


def _declared(memory_bytes: Optional[int], resources: dict[str, float]) -> list[str]:
    """`ray start` flags for a node's declared memory and custom resources (none when unset)."""
    flags = [f"--memory={memory_bytes}"] if memory_bytes else []
    return flags + ([f"--resources={json.dumps(resources)}"] if resources else [])


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


if __name__ == "__main__":
    # python -m bench.own_cluster cleanup: after a benchmark or test was killed with SIGKILL
    if sys.argv[1:] != ["cleanup"]:
        sys.exit("usage: python -m bench.own_cluster cleanup")
    cleanup_orphans()
