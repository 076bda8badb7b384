"""`replicas_per_device: auto` with a model the advisor cannot plan fails with a config error."""

from __future__ import annotations

import json

import pytest
import ray

from deployments.app import AppConfigError, ClusterView, build, parse_args

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_unplannable_model_is_a_config_error_naming_the_model(cluster, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    args = parse_args({"models": [{"model": str(tmp_path), "name": "odd", "replicas_per_device": "auto"}]})
    with pytest.raises(AppConfigError) as err:
        build(args, ClusterView(gpus=0, cpus_per_node=2, engine_device="cpu"))
    assert "model 'odd': no replica plan" in str(err.value)
    assert "'mamba'" in str(err.value) and "supported" in str(err.value)
