"""Decode throughput through (a) bare AsyncLLM, (b) a DeploymentHandle, (c) the HTTP API.

Same model (SmolLM2-135M), same engine settings, one replica on the whole machine. Each point
sends exactly B concurrent requests (fixed prompt, OUTPUT tokens each, ignore_eos) and reports
generated tokens / wall time, best of ROUNDS. Prints a table and writes bench/results/*.json.
Target on the 2-core CPU machine: handle >= 95% and HTTP >= 90% of bare at batch 32.

    python bench/serve_overhead.py [--batches 1 8 32] [--output-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.machine import write_result  # noqa: E402
from bench.own_cluster import free_port, own_local_ray  # noqa: E402
from deployments.models import pull  # noqa: E402
from deployments.spec import ReplicaResources, ReplicaSpec  # noqa: E402

PROMPT = "Write a story about a robot learning to paint."


def make_spec(path: Path, max_num_seqs: int) -> ReplicaSpec:
    return ReplicaSpec(
        served_name="smollm2-135m", model_path=str(path), device_kind="cpu", replicas_per_device=1,
        resources=ReplicaResources(num_cpus=1), max_num_seqs=max_num_seqs, kv_cache_bytes=512 << 20,
        max_model_len=1024, dtype="bfloat16", enforce_eager=True,
    )


async def timed(batch: int, one) -> float:
    t0 = time.perf_counter()
    counts = await asyncio.gather(*[one() for _ in range(batch)])
    return sum(counts) / (time.perf_counter() - t0)


async def sweep(label: str, one, batches: list[int], rounds: int) -> dict[int, float]:
    await timed(2, one)  # warm-up
    out = {}
    for b in batches:
        out[b] = max([await timed(b, one) for _ in range(rounds)])
        print(f"  {label:7s} batch {b:3d}: {out[b]:8.1f} tok/s", flush=True)
    return out


def bare(path: Path, batches: list[int], out_tokens: int, rounds: int) -> dict[int, float]:
    from vllm import SamplingParams

    from deployments.engine import start_engine

    engine = start_engine(make_spec(path, max(batches)), cores=sorted(os.sched_getaffinity(0)))
    params = SamplingParams(max_tokens=out_tokens, ignore_eos=True, temperature=0)

    async def one() -> int:
        final = None
        async for final in engine.generate(PROMPT, params, uuid.uuid4().hex):
            pass
        return len(final.outputs[0].token_ids)

    try:
        return asyncio.run(sweep("bare", one, batches, rounds))
    finally:
        engine.shutdown()


def served(path: Path, batches: list[int], out_tokens: int, rounds: int, port: int) -> tuple[dict, dict]:
    from ray import serve

    with own_local_ray(num_cpus=2):  # its own temp dir and ports, removed on the way out
        try:
            return _served(path, batches, out_tokens, rounds, port)
        finally:
            serve.shutdown()


def _served(path: Path, batches: list[int], out_tokens: int, rounds: int, port: int) -> tuple[dict, dict]:
    from ray import serve

    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from deployments.app import build
    from deployments.cluster_view import ClusterView
    from deployments.config import AppArgs, ModelConfig

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    spec = make_spec(path, max(batches))
    args = AppArgs(models=[ModelConfig(model=str(path), name="smollm2-135m", replicas_per_device=1,
                                       max_num_seqs=spec.max_num_seqs, kv_cache_bytes=spec.kv_cache_bytes,
                                       max_model_len=spec.max_model_len, dtype=spec.dtype, enforce_eager=True)])
    serve.run(build(args, ClusterView.from_ray()), name="bench", route_prefix="/")
    handle = serve.get_app_handle("bench")  # the ingress's Python API: routed like HTTP

    async def via_handle() -> int:
        req = CompletionRequest(model="smollm2-135m", prompt=PROMPT, max_tokens=out_tokens,
                                ignore_eos=True, temperature=0)
        res = await handle.completions.remote(req)
        return res.usage.completion_tokens

    h = asyncio.run(sweep("handle", via_handle, batches, rounds))

    async def http_sweep():
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits) as http:
            async def via_http() -> int:
                r = await http.post("/v1/completions", json={
                    "model": "smollm2-135m", "prompt": PROMPT, "max_tokens": out_tokens,
                    "ignore_eos": True, "temperature": 0})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

            return await sweep("http", via_http, batches, rounds)

    return h, asyncio.run(http_sweep())


def run_phase(phase: str, ns: argparse.Namespace) -> dict:
    """Each phase runs in a fresh process so one engine's leftovers cannot touch the other."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "phase.json"
        cmd = [sys.executable, __file__, "--phase", phase, "--phase-out", str(out), "--port", str(ns.port),
               "--output-tokens", str(ns.output_tokens), "--rounds", str(ns.rounds), "--batches",
               *map(str, ns.batches)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, help="Serve's HTTP port (default: a free one)")
    ap.add_argument("--phase", choices=["bare", "served"], help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    ns.port = ns.port or free_port()
    path = pull("smollm2-135m")
    if ns.phase == "bare":
        Path(ns.phase_out).write_text(json.dumps({"bare": bare(path, ns.batches, ns.output_tokens, ns.rounds)}))
        return
    if ns.phase == "served":
        h, w = served(path, ns.batches, ns.output_tokens, ns.rounds, ns.port)
        Path(ns.phase_out).write_text(json.dumps({"handle": h, "http": w}))
        return
    print("bare AsyncLLM ...", flush=True)
    a = {int(k): v for k, v in run_phase("bare", ns)["bare"].items()}
    print("Ray Serve (handle, then HTTP) ...", flush=True)
    served_res = run_phase("served", ns)
    h = {int(k): v for k, v in served_res["handle"].items()}
    w = {int(k): v for k, v in served_res["http"].items()}
    rows = [{"batch": b, "bare_tok_s": round(a[b], 1), "handle_tok_s": round(h[b], 1), "http_tok_s": round(w[b], 1),
             "handle_vs_bare": round(h[b] / a[b], 3), "http_vs_bare": round(w[b] / a[b], 3)} for b in ns.batches]
    print(f"\n{'batch':>5} {'bare':>9} {'handle':>9} {'http':>9} {'handle/bare':>12} {'http/bare':>10}")
    for r in rows:
        print(f"{r['batch']:5d} {r['bare_tok_s']:9.1f} {r['handle_tok_s']:9.1f} {r['http_tok_s']:9.1f} "
              f"{r['handle_vs_bare']:12.1%} {r['http_vs_bare']:10.1%}")
    path_out = write_result("serve_overhead", {
        "settings": {"output_tokens": ns.output_tokens, "rounds": ns.rounds, "dtype": "bfloat16",
                     "enforce_eager": True, "replicas": 1, "prompt": PROMPT},
        "rows": rows,
        "targets": {"handle_vs_bare_at_32": 0.95, "http_vs_bare_at_32": 0.90},
    })
    print(f"\nwrote {path_out}")


if __name__ == "__main__":
    main()
