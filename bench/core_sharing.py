"""Two vLLM engines on one CPU node: each on cores of its own, or both on all of them.

plateau-serve pins the N engines of a CPU node to disjoint cores (`deployments/engine.py`). A lone
request then decodes on 1/N of the node (vLLM's own server, by default, binds its engine to all
but one core, which it keeps for its engine-core process: on 2 cores, one). Would engines that
share every core (the OS splits them under load, a lone request gets them all) keep the aggregate
and give the lone request the whole node? This runs two of vLLM's own OpenAI servers on the shipped model (no Serve, so only the
core binding differs) for each binding, rounds interleaved:
- `disjoint`: `VLLM_CPU_OMP_THREADS_BIND` 0 and 1 (what plateau-serve does)
- `shared`: both `0,1` (OpenMP's default wait policy: threads spin at barriers)
- `shared-passive`: both `0,1`, `OMP_WAIT_POLICY=PASSIVE` (threads sleep at barriers)
and measures a lone request on one server (the other idle), then both loaded at once
(`--concurrency` each), with vLLM's benchmark client as `bench/vs_vllm.py` drives it.

    python bench/core_sharing.py [--rounds 2] [--concurrency 32]   # ~10 minutes a round here
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_result  # noqa: E402
from bench.vs_vllm import BASE_ENV, Side, run_point, shipped_model, vllm_side  # noqa: E402

BINDINGS: dict[str, list[dict[str, str]]] = {
    "disjoint": [{"VLLM_CPU_OMP_THREADS_BIND": "0"}, {"VLLM_CPU_OMP_THREADS_BIND": "1"}],
    "shared": [{"VLLM_CPU_OMP_THREADS_BIND": "0,1"}] * 2,
    "shared-passive": [{"VLLM_CPU_OMP_THREADS_BIND": "0,1", "OMP_WAIT_POLICY": "PASSIVE"}] * 2,
}
PROMPT_TOKENS = 128
LONE_REQUESTS = 8


def measure_binding(name: str, concurrency: int, work: Path) -> dict:
    """Start the two servers with `name`'s binding, measure, stop them."""
    model = shipped_model()
    sides: list[Side] = []
    try:
        for i, binding in enumerate(BINDINGS[name]):
            env = {**os.environ, **BASE_ENV, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", **binding}
            logs = work / f"{name}-server{i}"
            logs.mkdir(exist_ok=True)
            side = vllm_side(model, env, logs, extra=["--max-num-seqs", "64"], name=f"{name}-{i}")  # logs/vllm.log
            sides.append(side)
            side.wait_ready(model.name, 600)
        out_dir = work / f"{name}-{int(time.time())}"
        out_dir.mkdir()
        lone = run_point(sides[0].port, model.name, model.folder, 1, PROMPT_TOKENS, LONE_REQUESTS, out_dir)

        def load(i: int) -> dict:
            folder = out_dir / f"server{i}"
            folder.mkdir()
            return run_point(sides[i].port, model.name, model.folder, concurrency, PROMPT_TOKENS, 3 * concurrency,
                             folder)

        with ThreadPoolExecutor(len(sides)) as pool:  # both servers loaded at once; a client's failure is raised
            both = list(pool.map(load, range(len(sides))))
        return {"binding": name, "lone_tokens_per_s": lone["output_tokens_per_s"],
                "lone_itl_p50_ms": lone["itl_p50_ms"],
                "both_tokens_per_s": sum(r["output_tokens_per_s"] for r in both),
                "both_itl_p50_ms": [r["itl_p50_ms"] for r in both],
                "failed": lone["failed"] + sum(r["failed"] for r in both)}
    finally:
        for side in sides:
            side.stop()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32, help="concurrency on each server when both are loaded")
    ap.add_argument("--bindings", default=",".join(BINDINGS))
    ns = ap.parse_args(argv)
    names = ns.bindings.split(",")
    work = Path(tempfile.mkdtemp(prefix="plateau-core-sharing-"))
    rows = []
    for r in range(ns.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # interleaved: no binding always runs first
            row = {"round": r, **measure_binding(name, ns.concurrency, work)}
            print(row, flush=True)
            rows.append(row)
    path = write_result("core_sharing", {"concurrency_each": ns.concurrency, "prompt_tokens": PROMPT_TOKENS,
                                         "client": "vllm.benchmarks.serve (random, ignore_eos, streaming)",
                                         "rows": rows})
    print(f"[core_sharing] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
