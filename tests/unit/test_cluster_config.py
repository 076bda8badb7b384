"""config.cluster.yaml, the multi-node GPU example, parses the way `serve run` and `plateau config check` parse it."""

from pathlib import Path

import yaml

from deployments.app import check_policy_configured
from deployments.autoscale import POLICY_FUNCTION
from deployments.config import parse_args

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config.cluster.yaml"


def _app() -> dict:
    doc = yaml.safe_load(CONFIG.read_text())
    (app,) = [a for a in doc["applications"] if a["import_path"] == "deployments.app:build_app"]
    return app


def test_both_models_are_planned_by_the_advisor_and_elastic():
    args = parse_args(_app()["args"])
    assert [m.served_name for m in args.models] == ["qwen2.5-7b", "qwen2.5-1.5b"]
    for m in args.models:
        assert m.replicas_per_device == "auto" and m.variants and m.elastic
        assert m.min_replicas <= m.max_replicas


def test_the_plateau_policy_is_configured_for_the_elastic_models():
    app = _app()
    assert app["autoscaling_policy"]["policy_function"] == POLICY_FUNCTION
    raw = app["args"]
    check_policy_configured(parse_args(raw), raw, [app])  # what the builder checks against Serve's stored config


def test_the_cluster_settings_are_set():
    doc = yaml.safe_load(CONFIG.read_text())
    assert doc["http_options"]["host"] == "0.0.0.0"  # HAProxy on the head reaches replicas on other nodes
    args = parse_args(_app()["args"])
    assert args.device == "cuda" and args.cluster_autoscaling
    assert args.profile_store.startswith("s3://")
    assert args.api_key_env == "PLATEAU_API_KEY" and args.api_key is None


def test_plateau_config_check_accepts_it(capsys):
    from deployments.cli import main

    assert main(["config", "check", str(CONFIG)]) == 0
    assert "qwen2.5-1.5b" in capsys.readouterr().out
