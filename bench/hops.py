"""Where the CPU goes on the serving path under streaming load: each hop's cores and hottest code.

    python bench/hops.py [--concurrency 32] [--seconds 30] [--plateau-home DIR] [--tiny-replicas N]

Starts `serve run config.yaml` (as shipped but for Serve's HTTP port) on a Ray head of its own
(bench/own_cluster.py), sends closed-loop streaming `/v1/completions` with vLLM's own benchmark
request function (bench/chaos.py's `Load`: 128-token prompts, 64 output tokens), and once the load
has run 20 s measures every process on the path, first their CPU for `--seconds` with nothing
attached, then their stacks for another `--seconds`: Serve's HTTP proxy, the ingress
replica, each LLM replica (vLLM's OpenAI layer and AsyncLLM's output handling run there), each vLLM
engine core and its worker, Serve's controller, the status board, the Ray daemons, and this
process (the load client). Per process: CPU cores used (psutil CPU times over the first window;
the machine's busy cores beside them) and, from py-spy (`record --nonblocking`, 50 Hz, running
threads only, second window: py-spy's own CPU slows the rest then), its hottest functions by self
samples. The result goes to bench/results/hops-*.json; the last stdout line is a JSON summary.
PLATEAU_HOME defaults to the usual one: the first start there profiles the model (~12 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import psutil
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advisor.noise import busy_seconds, process_cpu_seconds  # noqa: E402
from bench.machine import write_result  # noqa: E402

RATE_HZ = 50
TOP = 8


class Hop(BaseModel):
    """One process on the serving path during the measuring window."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    role: str = Field(description="proxy, ingress, replica <deployment>, engine core, engine worker, ...")
    pid: int
    cores: float = Field(description="CPU cores used on average over the window (user + system time).")
    samples: int = Field(description="py-spy samples of running threads (0 where py-spy could not attach).")
    top_self: list[tuple[str, float]] = Field(description="Functions by share of the process's samples "
                                                          "spent in them (not in their callees).")


def top_functions(collapsed: str, top: int = TOP) -> tuple[int, list[tuple[str, float]]]:
    """py-spy's raw (collapsed) output -> (samples, the `top` leaf functions by share of samples)."""
    leaves: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        leaves[leaf] += int(count)
        total += int(count)
    return total, [(name, round(n / total, 3)) for name, n in leaves.most_common(top)] if total else []


def role_of(proc: psutil.Process) -> Optional[str]:
    """What a process that is no named actor does on the path (None: not on it)."""
    try:
        name = proc.name() + " " + " ".join(proc.cmdline()[:2])
    except psutil.Error:
        return None
    for marker, role in (("EngineCore", "engine core"), ("VLLM::Worker", "engine worker"),
                         ("HAProxyManager", "haproxy manager"), ("haproxy", "haproxy"),
                         ("gcs_server", "ray gcs"), ("raylet", "ray raylet"), ("dashboard", "ray dashboard")):
        if marker in name:
            return role
    return None


def actor_roles() -> dict[int, str]:
    """pid -> role for the Serve actors and plateau's own actors of the connected cluster."""
    import ray

    from bench.chaos import actor_pid

    roles = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if name.startswith("SERVE_REPLICA::"):
            deployment = name.split("#")[1]
            role = "ingress" if deployment == "OpenAIIngress" else f"replica {deployment}"
        elif name.startswith("SERVE_PROXY_ACTOR"):
            role = "proxy"
        elif name == "SERVE_CONTROLLER_ACTOR":
            role = "serve controller"
        elif name.startswith("plateau-"):
            role = name
        else:
            continue
        pid = actor_pid(ray.get_actor(name, namespace=a["namespace"]))
        if pid is not None:
            roles[pid] = role
    return roles


def cpu_cores(procs: dict[int, str], seconds: float) -> tuple[dict[int, float], float]:
    """CPU cores each process used over `seconds` (user + system time), and the whole machine's."""
    before, machine_before, started = process_cpu_seconds(procs), psutil.cpu_times(), time.monotonic()
    time.sleep(seconds)
    after, machine_after, wall = process_cpu_seconds(procs), psutil.cpu_times(), time.monotonic() - started
    busy = busy_seconds(machine_after) - busy_seconds(machine_before)
    return {pid: round((after[pid] - before[pid]) / wall, 3) for pid in after if pid in before}, round(busy / wall, 3)


def sample_stacks(procs: dict[int, str], seconds: float, work: Path) -> dict[int, tuple[int, list]]:
    """py-spy on every process at once for `seconds` -> pid: (samples, hottest functions)."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    spies = [subprocess.Popen([spy, "record", "--nonblocking", "-r", str(RATE_HZ), "-d", str(int(seconds)),
                               "-f", "raw", "-o", str(work / f"{pid}.txt"), "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in procs]
    for p in spies:
        try:
            p.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            p.kill()
    found = {}
    for pid in procs:
        out = work / f"{pid}.txt"
        found[pid] = top_functions(out.read_text()) if out.exists() else (0, [])
    return found


def measure(procs: dict[int, str], seconds: float, work: Path) -> tuple[list[Hop], float]:
    """CPU first, with nothing else attached (py-spy itself takes CPU), then the stacks."""
    cores, machine = cpu_cores(procs, seconds)
    stacks = sample_stacks(procs, seconds, work)
    hops = [Hop(role=role, pid=pid, cores=cores[pid], samples=stacks[pid][0], top_self=stacks[pid][1])
            for pid, role in procs.items() if pid in cores]
    return sorted(hops, key=lambda h: -h.cores), machine


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--plateau-home", help="PLATEAU_HOME for the app (default: the usual one)")
    ap.add_argument("--tiny-replicas", type=int, help="serve bench/path_cost.py's tiny random-weight model at this "
                                                      "many replicas instead of the shipped one: the engine at a GPU's pace")
    ns = ap.parse_args(argv)

    from bench.chaos import Load, connect, wait_answers
    from bench.own_cluster import OwnCluster, OwnClusterConfig
    from bench.path_cost import NAME, plateau_model, tiny_model_folder
    from bench.vs_vllm import SHIPPED_ENV, shipped_config_on, shipped_model

    shipped = shipped_model()
    work = Path(tempfile.mkdtemp(prefix="plateau-hops-"))
    model, models = shipped.name, None
    if ns.tiny_replicas:
        folder = tiny_model_folder(Path(shipped.folder), work / "model")
        model, models = NAME, [plateau_model(folder, ns.tiny_replicas, str(shipped.cfg.get("dtype", "auto")))]
    env = {**SHIPPED_ENV, **({"PLATEAU_HOME": ns.plateau_home} if ns.plateau_home else {})}
    with OwnCluster(OwnClusterConfig(num_cpus=os.cpu_count() or 2, env=env), log_dir=work) as cluster:
        log = work / "serve.log"
        config = shipped_config_on(cluster.ports.serve_http, work / "config.yaml", models=models)
        proc = cluster.serve_run(config, log, cwd=ROOT)
        base = f"http://127.0.0.1:{cluster.ports.serve_http}"
        wait_answers(base, [model], proc, log, timeout_s=1800)
        connect(cluster.address)
        time.sleep(20)  # every planned replica up (engines start one after another)
        roles = actor_roles()
        for p in cluster.processes():
            if p.pid not in roles and (role := role_of(p)) is not None:
                roles[p.pid] = role
        roles[os.getpid()] = "load client (this process)"
        load = Load(base, model, ns.concurrency).start()
        try:
            time.sleep(20)
            window = time.monotonic()
            hops, machine_cores = measure(roles, ns.seconds, work)
        finally:
            load.stop()
        ok = sum(o.ok for o in load.outcomes)
        tokens_per_s = sum(o.tokens for o in load.outcomes if window <= o.end <= window + ns.seconds) / ns.seconds
    total = round(sum(h.cores for h in hops), 2)
    for h in hops:
        top = ", ".join(f"{name} {share:.0%}" for name, share in h.top_self[:4])
        print(f"{h.role:>28} pid {h.pid:>7}: {h.cores:5.2f} cores, {h.samples:6d} samples; {top}", file=sys.stderr)
    summary = {"model": model, "concurrency": ns.concurrency, "seconds": ns.seconds,
               "tokens_per_s": round(tokens_per_s, 1),
               "machine_cores_busy": machine_cores, "path_cores": total,
               "cores": [[h.role, h.cores] for h in hops]}
    path = write_result("hops", {**summary, "rate_hz": RATE_HZ, "requests_ok": ok, "requests": len(load.outcomes),
                                 "hops": [h.model_dump() for h in hops]})
    print(f"[hops] {tokens_per_s:.1f} tok/s in the CPU window; machine {machine_cores:.2f} cores busy, the listed "
          f"processes {total:.2f}; wrote {path}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
