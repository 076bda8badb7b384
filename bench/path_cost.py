"""What the serving path costs when the engine is fast: plateau-serve against vLLM's own server on a
model small enough that the engine makes tokens at a GPU's pace on this CPU.

    python bench/path_cost.py [--points 16,64] [--replicas 1,2] [--prompts-per-slot 8]
                              [--also NAME:K=V[,K=V] ...]

On the embedded SmolLM2 a CPU engine makes 100-200 tokens/s, so every streamed token's trip through
Ray (engine -> replica -> ingress -> HAProxy -> client) hides behind a decode step of 50-200 ms.
On a GPU the same step takes a few ms and the serving path is what is left. This benchmark makes that
case here: SmolLM2's tokenizer and config cut to 2 layers of width 64 (random weights,
`load_format=dummy`, no checkpoint), so one engine steps a batch of 64 in a few ms.

Sides, one after the other on 127.0.0.1: vLLM's own OpenAI server on that model (`--load-format
dummy`) with its defaults (`vllm`: its engine on one core, the other kept for its front end) and
with its engine on both cores (`vllm-tuned`, the setup of a plateau replica that has the whole
machine), then `serve run config.yaml` as `make run` starts it but for its model list: the tiny
model at a fixed N replicas per device (no profile) for each N in --replicas, and again with each
`--also` variant's variables set over `make run`'s (e.g. `before:RAY_SERVE_THROUGHPUT_OPTIMIZED=0`).
Load: vLLM's benchmark client as in bench/vs_vllm.py (128-token prompts, 64 output tokens,
streaming), `--prompts-per-slot` x concurrency requests per point. Per side and point: output
tokens/s, TTFT, ITL; ratios against vLLM. Result in bench/results/path_cost-*.json; the last
stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_result  # noqa: E402
from bench.vs_vllm import (BASE_ENV, CLIENTS, SHORT_PROMPT, TUNED_ENV, ServeRunSide, Shipped, Side,  # noqa: E402
                           StreamClient, measure, parse_variant, ratios, run_sides, shipped_model, vllm_side)

NAME = "tiny-path"
TINY = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "tie_word_embeddings": True}
KEEP = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
        "special_tokens_map.json")
KV_CACHE_BYTES = 256 << 20
MAX_NUM_SEQS = 128


def tiny_model_folder(src: Path, dst: Path) -> Path:
    """`src`'s tokenizer files and its config.json with the TINY shape, in `dst` (no weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(TINY)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in KEEP:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst


def plateau_model(folder: Path, replicas: int, dtype: str) -> dict:
    """The model entry for config.yaml: the tiny model at a fixed N, random weights."""
    return {"model": str(folder), "name": NAME, "replicas_per_device": replicas, "max_num_seqs": MAX_NUM_SEQS,
            "kv_cache_bytes": KV_CACHE_BYTES, "max_model_len": 2048, "dtype": dtype, "enforce_eager": True,
            "engine_kwargs": {"load_format": "dummy"}}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="16,64")
    ap.add_argument("--replicas", default="1,2", help="N replicas per device for each plateau side")
    ap.add_argument("--prompts-per-slot", type=int, default=8)
    ap.add_argument("--also", action="append", default=[], metavar="NAME:K=V[,K=V]",
                    help="for each N, one more plateau side `plateau-n<N>-NAME` with these variables over make run's")
    ap.add_argument("--client", choices=("vllm", "stream"), default="vllm",
                    help="vllm: vLLM's benchmark client, --prompts-per-slot x concurrency requests a point; stream: "
                         "bench/stream_load.py, a steady closed loop of --seconds after --warmup-s")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup-s", type=float, default=15.0)
    ns = ap.parse_args(argv)
    client = StreamClient(ns.seconds, ns.warmup_s) if ns.client == "stream" else None
    points = [int(x) for x in ns.points.split(",")]
    work = Path(tempfile.mkdtemp(prefix="plateau-path-cost-"))
    print(f"[path_cost] logs and raw client results under {work}", file=sys.stderr, flush=True)
    shipped = shipped_model()
    folder = tiny_model_folder(Path(shipped.folder), work / "model")
    dtype = str(shipped.cfg.get("dtype", "auto"))
    model = Shipped(cfg={"dtype": dtype, "max_model_len": 2048, "enforce_eager": True}, name=NAME, folder=str(folder))
    variants = {"": {}, **dict(parse_variant(v) for v in ns.also)}
    plateau = {f"plateau-n{n}{'-' + name if name else ''}": (int(n), env)
               for n in ns.replicas.split(",") for name, env in variants.items()}
    sides = ["vllm", "vllm-tuned", *plateau]

    def start(side_name: str) -> Side:
        if side_name in ("vllm", "vllm-tuned"):
            env = {**os.environ, **BASE_ENV, **(TUNED_ENV if side_name == "vllm-tuned" else {})}
            (work / side_name).mkdir(exist_ok=True)
            return vllm_side(model, env, work / side_name, name=side_name,
                             extra=["--load-format", "dummy", "--max-num-seqs", str(MAX_NUM_SEQS)])
        n, extra_env = plateau[side_name]
        env = {**BASE_ENV, "PLATEAU_HOME": str(work / "plateau-home"), **extra_env}
        return ServeRunSide(side_name, env, work, models=[plateau_model(folder, n, dtype)])

    def measure_side(side: Side) -> list[dict]:
        side.wait_ready(NAME, 900)
        plan = [(c, SHORT_PROMPT, ns.prompts_per_slot * c) for c in points]
        return measure(side, NAME, str(folder), plan, work / side.name, client)

    results, failed = run_sides(sides, start, measure_side)

    summary = {"sides": list(results), "failed_sides": failed, "ratios": ratios(results)}
    path = write_result("path_cost", {"model": {"shape": TINY, "tokenizer_of": shipped.name, "dtype": dtype,
                                                "load_format": "dummy"},
                                      "prompt_tokens": SHORT_PROMPT, "prompts_per_slot": ns.prompts_per_slot,
                                      "client": CLIENTS[ns.client],
                                      **({"seconds": ns.seconds, "warmup_s": ns.warmup_s} if client else {}),
                                      "results": results, "summary": summary})
    print(f"[path_cost] wrote {path}", file=sys.stderr, flush=True)
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
