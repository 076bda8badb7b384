"""Serve's HTTP ingress, A/B: the same `serve run config.yaml` behind Serve's Python proxy, Ray's
HAProxy ingress, or the ingress replica's own HTTP server (Ray's direct ingress, no proxy at all).

    python bench/ingress_ab.py [--variants proxy,haproxy,direct] [--starts 2] [--reps 3]
                               [--concurrency 32] [--plateau-home DIR]

Each start is a Ray head of its own (bench/own_cluster.py) started with the variant's variables
(`proxy`: none; `haproxy`: RAY_SERVE_ENABLE_HA_PROXY=1; `direct`: RAY_SERVE_ENABLE_DIRECT_INGRESS=1,
requests sent to the port the ingress replica listens on), then `serve run config.yaml` as shipped
but for Serve's HTTP port, reusing the stored profile (PLATEAU_HOME: the usual one unless given),
25 s for every planned replica to run, then `--reps` points of vLLM's own benchmark client
(bench/vs_vllm.py's `run_point`: 128-token prompts, 64 output tokens, 3 x concurrency requests).
Starts interleave (proxy, haproxy, direct, proxy, ...) so that a drift of the machine hits every
variant alike; what differs between two starts of one variant shows how far one start can be
trusted. Per start: tokens/s, TTFT and ITL of each rep; per variant: the mean over all reps and the
range of the per-start means. Result in bench/results/ingress_ab-*.json; the last stdout line is a
JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_result  # noqa: E402

VARIANTS = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "direct": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
}
DIRECT_PORTS = range(30000, 31001)  # Ray's default RAY_SERVE_DIRECT_INGRESS_{MIN,MAX}_HTTP_PORT
SETTLE_S = 25.0


def direct_port(procs: list[psutil.Process]) -> int:
    """The port in Ray's direct-ingress range that one of the cluster's processes listens on."""
    for p in procs:
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr.port in DIRECT_PORTS:
                    return c.laddr.port
        except psutil.Error:
            continue
    raise RuntimeError(f"no process of the cluster listens on a port in {DIRECT_PORTS.start}-{DIRECT_PORTS.stop - 1}")


def one_start(variant: str, reps: int, concurrency: int, home: Optional[str], work: Path) -> dict:
    from bench.chaos import wait_answers
    from bench.own_cluster import OwnCluster, OwnClusterConfig
    from bench.vs_vllm import run_point, shipped_config_on, shipped_model

    model = shipped_model()
    env = {**VARIANTS[variant], **({"PLATEAU_HOME": home} if home else {})}
    with OwnCluster(OwnClusterConfig(num_cpus=os.cpu_count() or 2, env=env), log_dir=work) as cluster:
        log = work / "serve.log"
        proc = cluster.serve_run(shipped_config_on(cluster.ports.serve_http, work / "config.yaml"), log, cwd=ROOT)
        wait_answers(f"http://127.0.0.1:{cluster.ports.serve_http}", [model.name], proc, log, timeout_s=1800)
        time.sleep(SETTLE_S)
        port = direct_port(cluster.processes()) if variant == "direct" else cluster.ports.serve_http
        points = []
        for rep in range(reps):
            row = run_point(port, model.name, model.folder, concurrency, 128, 3 * concurrency, work)
            print(f"[{variant}] rep {rep}: {row['output_tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
                  f"ITL p50 {row['itl_p50_ms']:.1f} ms, failed {row['failed']}", file=sys.stderr, flush=True)
            points.append(row)
    return {"variant": variant, "port": port, "points": points}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="proxy,haproxy,direct")
    ap.add_argument("--starts", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--plateau-home", help="PLATEAU_HOME for the app (default: the usual one)")
    ns = ap.parse_args(argv)
    variants = ns.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    starts = []
    for i in range(ns.starts):
        for v in variants:
            work = Path(tempfile.mkdtemp(prefix=f"plateau-ingress-ab-{v}-"))
            starts.append(one_start(v, ns.reps, ns.concurrency, ns.plateau_home, work))
    summary = {}
    for v in variants:
        mine = [s for s in starts if s["variant"] == v]
        per_start = [statistics.fmean(p["output_tokens_per_s"] for p in s["points"]) for s in mine]
        summary[v] = {"tokens_per_s_mean": round(statistics.fmean(per_start), 1),
                      "per_start_means": [round(x, 1) for x in per_start],
                      "failed": sum(p["failed"] for s in mine for p in s["points"])}
    path = write_result("ingress_ab", {"concurrency": ns.concurrency, "reps": ns.reps, "env": VARIANTS,
                                       "summary": summary, "starts": starts})
    print(f"[ingress_ab] wrote {path}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
