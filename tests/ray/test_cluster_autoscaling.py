"""`cluster_autoscaling: true` against Ray's own autoscaler: the cluster grows to fit the placement.

The head declares one logical GPU of type `small`; Ray's autoscaler (its fake multi-node provider,
which starts real raylets on this machine) may add one more node of that type. The app asks for
two replicas of the shipped model at one per device, so the start placement needs a device the
cluster does not have: the builder packs the second replica onto an added device and asks Ray's
autoscaler for both (`ray.autoscaler.sdk.request_resources`); the autoscaler starts a node; the
second replica starts there and serves. Without `cluster_autoscaling` the same start fails naming
the shortfall (unit-tested in tests/unit/test_layout.py). Two engines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from bench.own_cluster import AutoscaledNodeType, OwnCluster, OwnClusterConfig
from bench.vs_vllm import shipped_config_doc
from tests.ray.conftest import ROOT, plateau_cli, replica_nodes, shipped_model_args, cluster_client_env, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]

SMALL = {"accelerator_type:small": 1}
NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL  # what request_resources writes (v1)
from ray.experimental.internal_kv import _internal_kv_get
asked = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
print(json.dumps({"nodes": [{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]],
                  "asked": json.loads(asked) if asked else None}))
"""


def _config(path: Path, port: int) -> Path:
    doc = shipped_config_doc(port)
    args = doc["applications"][0]["args"]
    # a fixed plan (no profile): one replica per device, two devices' worth from the start
    args["models"] = [shipped_model_args(name="m", device_type="small", replicas_per_device=1, devices=2,
                                         min_replicas=2, max_replicas=2, max_num_seqs=8, kv_cache_bytes="256MiB")]
    args.update(cluster_autoscaling=True, device_memory="4GiB")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _cluster_state(address: str) -> dict:
    """The alive nodes and what Ray's autoscaler was last asked for."""
    out = subprocess.run([sys.executable, "-c", NODES, address], capture_output=True, text=True, timeout=180,
                         env=cluster_client_env())
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status(address: str) -> dict:
    out = plateau_cli("status", "--address", address, "--json", timeout_s=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["plateau"]


def test_the_start_placement_asks_rays_autoscaler_for_a_device_and_serves_from_the_node_it_adds(suite_home,
                                                                                                   tmp_path):
    cfg = OwnClusterConfig(num_cpus=1, num_gpus=1, resources=SMALL,
                           autoscaled=[AutoscaledNodeType(name="small", num_cpus=1, num_gpus=1, resources=SMALL)])
    with OwnCluster(cfg, log_dir=tmp_path) as cluster:
        head = _cluster_state(cluster.address)
        assert len(head["nodes"]) == 1 and head["asked"] is None  # the autoscaler adds nothing before something asks
        base = f"http://127.0.0.1:{cluster.ports.serve_http}"
        log = tmp_path / "serve.log"
        proc = cluster.serve_run(_config(tmp_path / "config.yaml", cluster.ports.serve_http), log, cwd=ROOT)

        def two_replicas() -> bool:
            text = log.read_text()
            assert proc.poll() is None, f"serve run exited early; log:\n{text[-4000:]}"
            assert "Exception importing application" not in text, f"the app failed to build; log:\n{text[-6000:]}"
            try:
                models = httpx.get(f"{base}/v1/models", timeout=30).json()["data"]
            except (httpx.HTTPError, ValueError):
                return False
            return [(m["id"], m["replicas"]) for m in models] == [("m", 2)]

        wait_until(two_replicas, 900, "model m to run two replicas, one on a node Ray's autoscaler adds", every_s=3,
                   detail=lambda: log.read_text()[-3000:])

        # the builder asked for both devices the placement uses, one of them beyond the cluster's (the
        # ingress sends the placement to the status board as it starts, not before it answers)
        wait_until(lambda: plateau_cli("status", "--address", cluster.address, timeout_s=120).returncode == 0, 120,
                   "the status board to hold the placement")
        requested = _status(cluster.address)["placement"]["requested"]
        assert requested is not None, "the builder did not ask Ray's autoscaler"
        assert [(m["device_type"], m["count"]) for m in requested["missing"]] == [("small", 1)]
        assert len(requested["bundles"]) == 2
        assert all(b.get("GPU") == 1 and "accelerator_type:small" in b for b in requested["bundles"])

        # the request reached Ray's autoscaler; it added one node of the type; a replica runs on each node
        state = _cluster_state(cluster.address)
        assert state["asked"] == requested["bundles"]
        head_id = head["nodes"][0]["id"]
        added = [n for n in state["nodes"] if n["id"] != head_id]
        assert len(added) == 1 and added[0]["resources"].get("accelerator_type:small") == 1, state["nodes"]
        assert sorted(replica_nodes(cluster.address).values()) == sorted([head_id, added[0]["id"]]), state

        r = httpx.post(f"{base}/v1/completions", timeout=120,
                       json={"model": "m", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
