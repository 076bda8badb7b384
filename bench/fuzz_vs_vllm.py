"""The same schemathesis fuzz against vLLM's own OpenAI server and against `serve run config.yaml`.

Both sides get vLLM's own OpenAPI schema (each serves it at /openapi.json; vLLM's lists many more
paths, so both runs are cut to the four POST operations plateau-serve forwards: /v1/completions,
/v1/chat/completions, /tokenize, /detokenize), the same deterministic generation, the
`not_a_server_error` check and the token-budget hook (bench/schemathesis_hooks.py). A side passes
when no generated request got an answer >= 500. Sides run one after the other; the plateau side
reuses the stored profile unless --plateau-home points elsewhere. The JSON result goes to
bench/results/fuzz_vs_vllm-*.json.

    python bench/fuzz_vs_vllm.py [--sides vllm,plateau] [--max-examples 15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
OPERATIONS = r"^/(v1/(chat/)?completions|tokenize|detokenize)$"


@dataclass
class FuzzRun:
    returncode: int
    generated: int
    passed: int
    output: str

    def summary(self) -> dict:
        return {"ok": self.returncode == 0, "generated": self.generated, "passed": self.passed,
                "errored_or_failed": self.generated - self.passed}


def fuzz(base_url: str, report_dir: Path, max_examples: int = 15, timeout_s: float = 900) -> FuzzRun:
    """schemathesis on `base_url`/openapi.json, the operations we forward (all POST), answers >= 500 fail.

    Only the path filter: schemathesis joins filters of different kinds with OR (`--include-method POST`
    next to it selected 15 of vLLM's 23 operations)."""
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{base_url}/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", str(max_examples), "--phases", "examples,fuzzing",
           "--request-timeout", "120", "--include-path-regex", OPERATIONS,
           "--generation-deterministic", "--report", "ndjson", "--report-dir", str(report_dir)]
    env = dict(os.environ, SCHEMATHESIS_HOOKS=str(HOOKS))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=report_dir, env=env)
    cases = re.search(r"(\d+) generated, (\d+) passed", run.stdout)  # schemathesis' summary line
    generated, passed = (int(cases[1]), int(cases[2])) if cases else (0, 0)
    return FuzzRun(run.returncode, generated, passed, run.stdout + run.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    from bench.machine import write_result
    from bench.vs_vllm import BASE_ENV, ServeRunSide, shipped_model, vllm_side

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sides", default="vllm,plateau")
    ap.add_argument("--max-examples", type=int, default=15)
    ap.add_argument("--plateau-home", help="PLATEAU_HOME for the plateau side (default: the usual one)")
    ns = ap.parse_args(argv)

    model = shipped_model()
    work = Path(tempfile.mkdtemp(prefix="plateau-fuzz-"))
    print(f"[fuzz] logs and reports under {work}", file=sys.stderr, flush=True)
    plateau_env = {**BASE_ENV, **({"PLATEAU_HOME": ns.plateau_home} if ns.plateau_home else {})}
    results = {}
    for side_name in ns.sides.split(","):
        if side_name == "vllm":
            side = vllm_side(model, {**os.environ, **BASE_ENV}, work)
        else:
            side = ServeRunSide(side_name, plateau_env, work)  # a Ray head of its own, a free HTTP port
        try:
            side.wait_ready(model.name, 1800)
            report = work / side_name
            report.mkdir()
            run = fuzz(f"http://127.0.0.1:{side.port}", report, ns.max_examples)
        finally:
            side.stop()
        results[side_name] = run.summary()
        print(f"[fuzz] {side_name}: {json.dumps(results[side_name])}", file=sys.stderr, flush=True)
        if run.returncode != 0:
            print(run.output[-3000:], file=sys.stderr, flush=True)
    path = write_result("fuzz_vs_vllm", {"model": model.name, "max_examples": ns.max_examples, "operations": OPERATIONS,
                                         "results": results})
    print(f"[fuzz] wrote {path}", file=sys.stderr, flush=True)
    print(json.dumps(results))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
