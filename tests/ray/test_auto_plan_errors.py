"""`replicas_per_device: auto` with a model the advisor cannot plan fails with a config error."""

from __future__ import annotations

import json

import pytest

from bench.own_cluster import own_local_ray
from deployments.app import build
from deployments.cluster_view import ClusterView
from deployments.config import AppConfigError, parse_args

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    with own_local_ray(num_cpus=2):
        yield


def test_unplannable_model_is_a_config_error_naming_the_model(cluster, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    args = parse_args({"models": [{"model": str(tmp_path), "name": "odd", "replicas_per_device": "auto"}]})
    with pytest.raises(AppConfigError) as err:
        build(args, ClusterView(gpus=0, cpus_per_node=2, engine_device="cpu"))
    assert "model 'odd': no replica plan" in str(err.value)
    assert "'mamba'" in str(err.value) and "supported" in str(err.value)


def test_min_replicas_beyond_the_clusters_devices_fail_at_startup(cluster):
    # The real inventory path: Ray's nodes, an NVML probe task (nothing to read on this machine).
    args = parse_args({"models": [{"name": "big", "replicas_per_device": 1, "min_replicas": 2, "max_replicas": 4,
                                   "kv_cache_bytes": "256MiB"}], "device": "cpu"})
    with pytest.raises(AppConfigError) as err:
        build(args, ClusterView(gpus=0, cpus_per_node=2, engine_device="cpu"))
    msg = str(err.value)
    assert "model 'big': 1 of its 2 min_replicas (N=1: share 1" in msg
    assert "/cpu (CPU node," in msg  # the one device this cluster has, named
