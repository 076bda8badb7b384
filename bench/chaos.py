"""Fault injection under load: one fault at a time on a live `serve run`, and what it cost.

    python bench/chaos.py                           # all faults, ~35 minutes here; stdout's last line is JSON
    python bench/chaos.py --faults engine_core,status_board --concurrency 8

Load is closed-loop streaming `/v1/completions` (128-token prompts of token ids, exactly 64 output
tokens) sent with vLLM's own benchmark client request function (`vllm.benchmarks.lib.
endpoint_request_func.async_request_openai_completions`). A request counts as succeeded only when
its stream carried all 64 tokens; one with no answer within 2 minutes counts as hung.

Faults (each SIGKILLs one process, found by its Ray actor, never by name matching):
- on the embedded model, started on N=2 (two replicas share the node: the shipped model entry with
  `variants: [1, 2]`, `start_variant: 2`, two replicas, no re-pack): `engine_core` (one replica's vLLM
  EngineCore), `replica` (one Serve replica actor), `status_board`, `advisor`, `serve_controller`;
- in the middle of a live re-pack (the two-model scenario of `bench/repack.py`, a fresh cluster per
  fault, killed right after the policy's `repack_start`): `engine_core_in_repack` and
  `replica_in_repack`, on the replica of the variant being drained, which serves the traffic then.

Per fault: requests sent, succeeded, failed (split into those in flight when the process died and
those sent later), hung, the in-flight count Serve reported for the killed replica just before
the kill, seconds back to full capacity (every deployment healthy with its replicas running, the
killed replica replaced or the killed actor answering again from a new process), and engine
processes left with no live replica above them 10 s later. Target: failed <= in flight on the
killed process, none sent after the kill failed, 0 hung, 0 leftovers, full capacity within 2 minutes.
Every cluster is its own (`bench/own_cluster.py`), stopped whole on exit, error or SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable, Literal, Optional

import psutil
import yaml
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parents[1]
APP = "plateau"
PROMPT_TOKENS, OUTPUT_TOKENS = 128, 64
HANG_S = 120.0  # a request with no full answer by then is hung
RECOVERY_LIMIT_S = 360.0  # stop waiting for full capacity (the target is 120 s)
SETTLE_S = 15.0  # load kept on after full capacity, counted with the fault
LEFTOVER_GRACE_S = 10.0  # the reaper ends an orphaned engine within a few seconds
SHIPPED_FAULTS = ("engine_core", "replica", "status_board", "advisor", "serve_controller")
REPACK_FAULTS = ("engine_core_in_repack", "replica_in_repack")
FaultName = Literal["engine_core", "replica", "status_board", "advisor", "serve_controller",
                    "engine_core_in_repack", "replica_in_repack"]


def log(msg: str) -> None:
    print(f"[chaos] {msg}", file=sys.stderr, flush=True)


# ---- what happened to the requests: pure, unit-tested -------------------------------------------

class Outcome(BaseModel):
    """One request as the client saw it (monotonic seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    start: float
    end: float
    ok: bool
    tokens: int
    error: str = ""

    @property
    def hung(self) -> bool:
        return not self.ok and self.end - self.start >= HANG_S - 1.0


class RequestCounts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sent: int = Field(description="Requests that ended between this kill and the next one.")
    succeeded: int
    failed: int = Field(description="Failed or hung.")
    failed_in_flight: int = Field(description="Failed and sent before the kill: possibly on the killed process.")
    failed_sent_after_kill: int = Field(description="Failed though sent after the kill: nothing may fail this way.")
    hung: int
    in_flight_at_kill: int = Field(description="Requests in flight on the whole server when the process died.")
    errors: list[str] = Field(default_factory=list, description="The first few failures, as the client saw them.")


def count_requests(outcomes: list[Outcome], kill_at: float, next_kill: Optional[float] = None) -> RequestCounts:
    """The requests of the fault killed at `kill_at`: those that ended after it and before the next
    fault's kill (a request in flight at a kill belongs to that kill), sorted by what happened to them."""
    mine = [o for o in outcomes if o.end >= kill_at and (next_kill is None or o.end < next_kill)]
    failed = [o for o in mine if not o.ok]
    return RequestCounts(
        sent=len(mine), succeeded=len(mine) - len(failed), failed=len(failed),
        failed_in_flight=sum(o.start < kill_at for o in failed),
        failed_sent_after_kill=sum(o.start >= kill_at for o in failed),
        hung=sum(o.hung for o in failed),
        in_flight_at_kill=sum(o.start < kill_at < o.end for o in outcomes),
        errors=[f"{o.error[-300:]}" for o in failed[:5]],
    )


def leftover_engines(engines: dict[int, int], replica_pids: set[int]) -> list[int]:
    """EngineCore pids (pid -> parent pid) whose parent is no live replica: engines nobody owns."""
    return sorted(pid for pid, parent in engines.items() if parent not in replica_pids)


class FaultResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fault: FaultName
    target: str = Field(description="The process killed: its actor and pid.")
    in_flight_on_target: Optional[int] = Field(description="Serve's in-flight count of the killed replica just "
                                                           "before the kill (None: not a replica).")
    requests: RequestCounts
    seconds_to_full_capacity: Optional[float] = Field(description="None: not back within the limit.")
    leftover_engine_pids: list[int]
    repack: Optional[str] = Field(None, description="In-repack faults: how the re-pack ended.")
    problems: list[str] = Field(default_factory=list, description="Targets missed; empty when all hold.")


def problems_of(r: FaultResult) -> list[str]:
    """The targets this fault's run missed (empty when it held all of them)."""
    out = []
    q = r.requests
    allowed = r.in_flight_on_target or 0  # an actor that is no replica carries no request: none may fail
    if q.failed_in_flight > allowed:
        out.append(f"{q.failed_in_flight} requests in flight failed, more than the {allowed} on the killed process")
    if q.failed_sent_after_kill:
        out.append(f"{q.failed_sent_after_kill} requests sent after the kill failed")
    if q.hung:
        out.append(f"{q.hung} requests hung (no answer in {HANG_S:.0f} s)")
    if r.leftover_engine_pids:
        out.append(f"engine processes left without a replica: {r.leftover_engine_pids}")
    if r.seconds_to_full_capacity is None:
        out.append(f"not back to full capacity within {RECOVERY_LIMIT_S:.0f} s")
    elif r.seconds_to_full_capacity > 120:
        out.append(f"full capacity after {r.seconds_to_full_capacity:.0f} s, over 2 minutes")
    return out


# ---- load: vLLM's benchmark client request function in a closed loop ------------------------------

class Load:
    """`workers` streams, each sending its next request when the last one ended."""

    def __init__(self, base_url: str, model: str, workers: int, prompt_tokens: int = PROMPT_TOKENS):
        self.url, self.model, self.workers, self.prompt_tokens = f"{base_url}/v1/completions", model, workers, prompt_tokens
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> "Load":
        self._thread.start()
        return self

    def stop(self) -> None:
        """No new requests; waits for those in flight (at most HANG_S)."""
        self._stop.set()
        self._thread.join(timeout=HANG_S + 30)

    async def _main(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=HANG_S)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(self._worker(session, i) for i in range(self.workers)))

    async def _worker(self, session, seed: int) -> None:
        from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, async_request_openai_completions

        rng = random.Random(seed)
        while not self._stop.is_set():
            prompt = [rng.randrange(1000, 40000) for _ in range(self.prompt_tokens)]
            req = RequestFuncInput(prompt=prompt, api_url=self.url, prompt_len=len(prompt), output_len=OUTPUT_TOKENS,
                                   model=self.model, ignore_eos=True, extra_body={"temperature": 0})
            start = time.monotonic()
            out = await async_request_openai_completions(req, session)
            end = time.monotonic()
            full = out.success and out.output_tokens == OUTPUT_TOKENS
            chunks = len(out.itl) + 1 if out.ttft else 0
            error = out.error or ("" if full else f"{chunks} chunks, then the stream ended without the usage of "
                                                  f"{OUTPUT_TOKENS} tokens (an error status or a cut stream); "
                                                  f"text: {out.generated_text[-60:]!r}")
            self.outcomes.append(Outcome(start=start, end=end, ok=full, tokens=out.output_tokens or 0, error=error))
            if not full:
                await asyncio.sleep(0.2)  # a failing server is not hammered


# ---- the cluster as the driver sees it -----------------------------------------------------------

def _with_timeout(fn: Callable, timeout_s: float = 10.0):
    """fn() or None when it raised or did not return in time (a dead controller blocks calls)."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn).result(timeout=timeout_s)
    except (FutureTimeout, Exception):
        return None
    finally:
        pool.shutdown(wait=False)


def replica_actors(deployment_prefix: str = "") -> dict[str, object]:
    """Live Serve replica actors of the app by their full id (SERVE_REPLICA::app#deployment#id)."""
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if name.startswith(f"SERVE_REPLICA::{APP}#{deployment_prefix}"):
            try:
                out[name] = ray.get_actor(name, namespace=a["namespace"])
            except ValueError:
                continue
    return out


def actor_pid(handle) -> Optional[int]:
    import ray

    return _with_timeout(lambda: ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=10))


def engine_core_of(pid: int) -> Optional[int]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return None
    return next((k.pid for k in kids if _is_engine_core(k)), None)


def _is_engine_core(p: psutil.Process) -> bool:
    try:
        return "EngineCore" in p.name() + " " + " ".join(p.cmdline()[:2])
    except psutil.Error:
        return False


class ServeView(BaseModel):
    """The app as Serve's controller reports it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    healthy: bool = Field(description="The app RUNNING and every deployment HEALTHY.")
    running: dict[str, int] = Field(description="Running replicas per model (its variant deployments "
                                                "`LLM:<model>@n<N>` summed) and of the ingress.")


def serve_view() -> Optional[ServeView]:
    """None while the controller does not answer."""
    from ray import serve

    status = _with_timeout(serve.status)
    app = status.applications.get(APP) if status else None
    if app is None:
        return None
    running: dict[str, int] = {}
    for name, dep in app.deployments.items():
        model = name.rsplit("@n", 1)[0]
        running[model] = running.get(model, 0) + int(dep.replica_states.get("RUNNING", 0))
    healthy = app.status == "RUNNING" and all(d.status == "HEALTHY" for d in app.deployments.values())
    return ServeView(healthy=healthy, running=running)


def named_actor(name: str, namespace: str):
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


ACTORS = {  # fault -> (actor name, namespace)
    "status_board": ("plateau-status", "plateau"),
    "advisor": ("plateau-advisor", "plateau"),
    "serve_controller": ("SERVE_CONTROLLER_ACTOR", "serve"),
}


class Kill(BaseModel):
    """A process picked for a fault, and what the cluster looked like just before."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pid: int
    label: str
    replica: Optional[str] = Field(None, description="The replica's full id for replica and engine faults.")
    actor: Optional[tuple[str, str]] = None
    in_flight: Optional[int] = None
    before: dict[str, int] = Field(description="Running replicas per model (and the ingress) before the kill.")
    replicas_before: list[str] = Field(default_factory=list, description="Live replica ids before the kill.")
    replacement_expected: bool = Field(True, description="Serve must start a new replica in the killed one's place "
                                                         "(not in a re-pack, where the new variant may take over).")


def pick(fault: str, deployment_prefix: str, replacement_expected: bool = True) -> Kill:
    import ray

    view = serve_view()
    before = view.running if view else {}
    if fault in ACTORS:
        name, ns = ACTORS[fault]
        handle = named_actor(name, ns)
        pid = actor_pid(handle) if handle is not None else None
        if pid is None:
            raise RuntimeError(f"{fault}: actor {ns}/{name} not found or not answering")
        return Kill(pid=pid, label=f"{name} (pid {pid})", actor=(name, ns), before=before)
    everyone = sorted(replica_actors())
    replicas = replica_actors(deployment_prefix)
    if not replicas:
        raise RuntimeError(f"{fault}: no live replica of {deployment_prefix or 'the app'}")
    name, handle = sorted(replicas.items())[0]
    pid = actor_pid(handle)
    if pid is None:
        raise RuntimeError(f"{fault}: replica {name} does not answer")
    in_flight = _with_timeout(lambda: ray.get(handle.get_num_ongoing_requests.remote(), timeout=5))
    if fault.startswith("engine_core"):
        core = engine_core_of(pid)
        if core is None:
            raise RuntimeError(f"{fault}: replica {name} (pid {pid}) has no EngineCore child")
        return Kill(pid=core, label=f"EngineCore (pid {core}) of {name}", replica=name, in_flight=in_flight,
                    before=before, replicas_before=everyone, replacement_expected=replacement_expected)
    return Kill(pid=pid, label=f"{name} (pid {pid})", replica=name, in_flight=in_flight, before=before,
                replicas_before=everyone, replacement_expected=replacement_expected)


def recovered(kill: Kill, view: Optional[ServeView], replicas_now: set[str], actor_pid_now: Optional[int]) -> bool:
    """Full capacity again after `kill`: the app healthy with as many running replicas per model as
    before, and the killed replica replaced (or the killed actor answering from a new process).
    Serve drops a dead replica's name at once but counts it running until a health check fails, and
    starts its replacement only after that: so a replica is back when a new name is there and the
    counts are full."""
    if view is None or not view.healthy or any(view.running.get(d, 0) < n for d, n in kill.before.items()):
        return False
    if kill.replica is not None:
        replaced = bool(replicas_now - set(kill.replicas_before)) or not kill.replacement_expected
        return kill.replica not in replicas_now and replaced
    return actor_pid_now is not None and actor_pid_now != kill.pid


def back_to_full(kill: Kill) -> bool:
    view = serve_view()
    if kill.actor is None:
        return recovered(kill, view, set(replica_actors()), None)
    handle = named_actor(*kill.actor)
    return recovered(kill, view, set(), actor_pid(handle) if handle is not None else None)


def wait_full(kill: Kill, killed_at: float, extra: Callable[[], bool] = lambda: True) -> Optional[float]:
    while time.monotonic() - killed_at < RECOVERY_LIMIT_S:
        if back_to_full(kill) and extra():
            return time.monotonic() - killed_at
        time.sleep(1.0)
    return None


def leftovers(cluster) -> list[int]:
    replica_pids = {p for h in replica_actors().values() if (p := actor_pid(h)) is not None}
    engines = {}
    for p in cluster.processes():
        if _is_engine_core(p):
            try:
                engines[p.pid] = p.ppid()
            except psutil.Error:
                continue
    return leftover_engines(engines, replica_pids)


class Injected(BaseModel):
    """One fault as it was done; its requests are counted once every request has ended."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fault: FaultName
    kill: Kill
    killed_at: float
    seconds_to_full_capacity: Optional[float]
    leftover_engine_pids: list[int]
    repack: Optional[str] = None


def inject(fault: FaultName, cluster, deployment_prefix: str = "", extra: Callable[[], bool] = lambda: True,
           replacement_expected: bool = True) -> Injected:
    """Kill the fault's process, wait for full capacity (and `extra`), then SETTLE_S more under load."""
    kill = pick(fault, deployment_prefix, replacement_expected)
    log(f"{fault}: SIGKILL {kill.label} (in flight there: {kill.in_flight})")
    killed_at = time.monotonic()
    os.kill(kill.pid, signal.SIGKILL)
    seconds = wait_full(kill, killed_at, extra)
    log(f"{fault}: " + (f"full capacity after {seconds:.1f} s" if seconds is not None else "not back to full capacity"))
    time.sleep(LEFTOVER_GRACE_S)
    left = leftovers(cluster)
    time.sleep(max(0.0, SETTLE_S - LEFTOVER_GRACE_S))
    return Injected(fault=fault, kill=kill, killed_at=killed_at,
                    seconds_to_full_capacity=seconds, leftover_engine_pids=left)


def finish(done: Injected, outcomes: list[Outcome], next_kill: Optional[float] = None) -> FaultResult:
    result = FaultResult(fault=done.fault, target=done.kill.label, in_flight_on_target=done.kill.in_flight,
                         requests=count_requests(outcomes, done.killed_at, next_kill),
                         seconds_to_full_capacity=done.seconds_to_full_capacity,
                         leftover_engine_pids=done.leftover_engine_pids, repack=done.repack)
    result.problems = problems_of(result)
    return result


# ---- the two apps ---------------------------------------------------------------------------------

def shipped_config(path: Path, http_port: int) -> Path:
    """config.yaml's app and model entry, started on N=2 with two replicas and no re-pack."""
    from bench.vs_vllm import shipped_config_doc

    doc = shipped_config_doc(http_port)
    args = doc["applications"][0]["args"]
    args["models"][0].update({"variants": [1, 2], "start_variant": 2, "min_replicas": 2, "max_replicas": 2})
    args["policy"] = {"repack_min_gain": 1000.0}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def wait_answers(base_url: str, models: list[str], proc, serve_log: Path, timeout_s: float = 900) -> None:
    from bench.repack import wait_ready

    if models == ["alpha", "beta"]:
        return wait_ready(base_url, proc, serve_log, timeout_s)
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited early:\n{serve_log.read_text()[-3000:]}")
        try:
            if all(httpx.post(f"{base_url}/v1/completions", timeout=60,
                              json={"model": m, "prompt": "Hi", "max_tokens": 1}).status_code == 200 for m in models):
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    raise RuntimeError(f"the app did not answer in {timeout_s:.0f} s:\n{serve_log.read_text()[-3000:]}")


def connect(address: str) -> None:
    import ray
    from ray.serve.context import _set_global_client

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    # Serve caches the controller's handle per job id, and this driver gets the same job id on each
    # fresh cluster: without this, `serve.status()` would ask the previous cluster's controller
    _set_global_client(None)


def run_shipped(faults: list[str], concurrency: int, work: Path) -> list[FaultResult]:
    from bench.own_cluster import OwnCluster, OwnClusterConfig
    from bench.vs_vllm import shipped_model

    model = shipped_model().name
    with OwnCluster(OwnClusterConfig(num_cpus=os.cpu_count() or 2), log_dir=work) as cluster:
        cfg = shipped_config(work / "shipped.yaml", cluster.ports.serve_http)
        proc = cluster.serve_run(cfg, work / "serve-shipped.log", cwd=ROOT)
        base = f"http://127.0.0.1:{cluster.ports.serve_http}"
        wait_answers(base, [model], proc, work / "serve-shipped.log")
        connect(cluster.address)
        deadline = time.monotonic() + 300
        while (view := serve_view()) is None or not view.healthy or view.running.get(f"LLM:{model}", 0) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not reach 2 running replicas: {view}")
            time.sleep(2)
        log(f"shipped model on N=2 ready: {view.running}; load: {concurrency} streams")
        load = Load(base, model, concurrency).start()
        time.sleep(20)
        done: list[Injected] = []
        try:
            for fault in faults:
                done.append(inject(fault, cluster, deployment_prefix="LLM:"))
        finally:
            load.stop()
    next_kills = [d.killed_at for d in done[1:]] + [None]
    return [finish(d, load.outcomes, nxt) for d, nxt in zip(done, next_kills)]


def run_in_repack(fault: str, work: Path) -> FaultResult:
    """A fresh two-model app (bench/repack.py's scenario); kill the draining variant's replica (or its
    engine) right after the policy decides to re-pack alpha from N=2 to N=1."""
    from bench.own_cluster import OwnCluster, OwnClusterConfig
    from bench.repack import LONG, SHORT, Shift, board_status, ensure_profile, plan_scenario, wait_start_placement, write_config

    cfg = Shift(short_phase_s=20.0)
    profile = ensure_profile("smollm2-135m", cfg.dtype, cfg.plan_shape, log=log)
    scenario = plan_scenario(profile, cores=profile.cores or 4, fraction=cfg.memory_fraction)
    with OwnCluster(OwnClusterConfig(num_cpus=4, num_gpus=2), log_dir=work) as cluster:
        config = write_config(work / f"{fault}.yaml", "smollm2-135m", scenario.device_memory_bytes, cfg,
                              cluster.ports.serve_http)
        serve_log = work / f"serve-{fault}.log"
        proc = cluster.serve_run(config, serve_log, cwd=ROOT)
        base = f"http://127.0.0.1:{cluster.ports.serve_http}"
        wait_answers(base, ["alpha", "beta"], proc, serve_log, cfg.ready_timeout_s)
        connect(cluster.address)
        failure = wait_start_placement(cluster.address)
        if failure:
            raise RuntimeError(failure)
        load = Load(base, "alpha", cfg.workers, prompt_tokens=SHORT).start()
        try:
            time.sleep(cfg.short_phase_s)
            load.prompt_tokens = LONG
            switched = time.time()
            log(f"{fault}: {LONG}-token prompts; waiting for the policy's repack_start")

            def decisions():
                status = board_status(cluster.address)
                return [d for d in (status.decisions if status else []) if d.model == "alpha" and d.at >= switched]

            deadline = time.monotonic() + cfg.repack_timeout_s
            while not any(d.action == "repack_start" for d in decisions()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no re-pack of alpha started within {cfg.repack_timeout_s:.0f} s of the switch")
                time.sleep(1)

            def ended() -> bool:
                return any(d.action in ("repack_done", "repack_abort") for d in decisions())

            # the new variant may take over from the killed replica: no replacement is required
            done = inject(fault, cluster, deployment_prefix="LLM:alpha@n2#", extra=ended, replacement_expected=False)
            end = next((d for d in decisions() if d.action in ("repack_done", "repack_abort")), None)
            done = done.model_copy(update={"repack": f"{end.action}: {end.reason}" if end else "not ended"})
        finally:
            load.stop()
        return finish(done, load.outcomes)


def table(results: list[FaultResult]) -> str:
    rows = ["| fault | sent | ok | failed (in flight / after) | in flight on killed | hung | full capacity s | leftovers |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        q = r.requests
        back = f"{r.seconds_to_full_capacity:.0f}" if r.seconds_to_full_capacity is not None else "never"
        rows.append(f"| {r.fault} | {q.sent} | {q.succeeded} | {q.failed} ({q.failed_in_flight} / "
                    f"{q.failed_sent_after_kill}) | {r.in_flight_on_target if r.in_flight_on_target is not None else '-'}"
                    f" | {q.hung} | {back} | {len(r.leftover_engine_pids)} |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    from bench.machine import write_result
    from deployments.models import pull

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", default=",".join(SHIPPED_FAULTS + REPACK_FAULTS),
                    help=f"comma-separated, of: {', '.join(SHIPPED_FAULTS + REPACK_FAULTS)}")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop streams on the shipped model")
    ns = ap.parse_args(argv)
    faults = [f.strip() for f in ns.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(SHIPPED_FAULTS + REPACK_FAULTS))
    if unknown:
        ap.error(f"unknown faults {unknown}; known: {', '.join(SHIPPED_FAULTS + REPACK_FAULTS)}")
    pull("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="plateau-chaos-"))
    log(f"logs in {work}")
    results: list[FaultResult] = []
    failure = None
    try:
        shipped = [f for f in faults if f in SHIPPED_FAULTS]
        if shipped:
            from bench.repack import ensure_profile

            ensure_profile("smollm2-135m", "float32", (PROMPT_TOKENS, OUTPUT_TOKENS), log=log)
            results += run_shipped(shipped, ns.concurrency, work)
        for fault in (f for f in faults if f in REPACK_FAULTS):
            results.append(run_in_repack(fault, work))
    except Exception as exc:  # the scenario did not happen: say why, keep what was measured
        failure = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {failure}")
    if results:
        path = write_result("chaos", {"concurrency": ns.concurrency, "prompt_tokens": PROMPT_TOKENS,
                                      "output_tokens": OUTPUT_TOKENS, "hang_s": HANG_S,
                                      "results": [r.model_dump() for r in results], "failure": failure})
        log(f"recorded {path}\n{table(results)}")
    missed = {r.fault: r.problems for r in results if r.problems}
    print(json.dumps({"faults": [r.fault for r in results], "missed": missed, "failure": failure}), flush=True)
    return 0 if not missed and failure is None and len(results) == len(faults) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the cluster is already stopped (bench/own_cluster.py)
        log("interrupted")
        sys.exit(128 + 2)
