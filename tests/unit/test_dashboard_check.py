import json

import httpx
import pytest

from bench.dashboard_check import (DASHBOARD, GPU_ONLY_MARK, GPU_ONLY_PANELS, DashboardQuery, dashboard_queries,
                                   legend_labels, run_query, with_all_selected)


def shipped() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_variables_become_match_all_and_grafanas_own_stay():
    expr = 'rate(x{app=~"$app", model=~"${model}"}[$__rate_interval])'
    assert with_all_selected(expr, {"app", "model"}) == 'rate(x{app=~".*", model=~".*"}[$__rate_interval])'


def test_legend_labels_are_read_in_order_once():
    assert legend_labels("{{model}}@{{variant}} {{ model }}") == ("model", "variant")
    assert legend_labels("p99") == () and legend_labels(None) == ()


def test_every_panel_of_the_shipped_dashboard_has_a_checked_query_and_only_named_panels_are_gpu_only():
    d = shipped()
    queries = dashboard_queries(d)
    assert {q.source for q in queries if q.kind == "panel"} == {p["title"] for p in d["panels"]}
    assert {q.source for q in queries if q.kind == "variable"} == {"app", "model"}
    assert any(q.kind == "annotation" and q.labels == ("model", "action") for q in queries)
    gpu = {p["title"]: p for p in d["panels"] if p["title"] in GPU_ONLY_PANELS}
    assert set(gpu) == set(GPU_ONLY_PANELS)  # a renamed panel must be renamed here too
    assert all(GPU_ONLY_MARK in p["description"] for p in gpu.values())
    assert {q.source for q in queries if q.gpu_only} == set(GPU_ONLY_PANELS)
    assert not any("$app" in q.expr or "$model" in q.expr for q in queries)


def test_a_variable_query_it_cannot_check_is_an_error_naming_the_variable():
    d = {"templating": {"list": [{"name": "node", "type": "query", "query": "query_result(up)"}]}}
    with pytest.raises(ValueError, match="'node'"):
        dashboard_queries(d)


def _prometheus(result: list[dict], status: int = 200):
    def handler(request: httpx.Request) -> httpx.Response:
        if status != 200:
            return httpx.Response(status, json={"status": "error", "error": "parse error at char 3"})
        if request.url.path.endswith("/series"):
            return httpx.Response(200, json={"status": "success", "data": [r["metric"] for r in result]})
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": result}})
    return httpx.Client(transport=httpx.MockTransport(handler))


PANEL = DashboardQuery(kind="panel", source="Replicas per packing variant", expr="x", labels=("model", "variant"))


def test_a_query_passes_only_with_series_that_carry_its_legend_labels():
    ok = run_query(_prometheus([{"metric": {"model": "a", "variant": "n2"}, "values": []}]), "http://prom", PANEL, 0, 60, 10)
    assert ok.ok and ok.series == 1
    empty = run_query(_prometheus([]), "http://prom", PANEL, 0, 60, 10)
    assert not empty.ok and empty.series == 0
    unlabelled = run_query(_prometheus([{"metric": {"model": "a"}, "values": []}]), "http://prom", PANEL, 0, 60, 10)
    assert not unlabelled.ok and unlabelled.missing_labels == ("variant",)
    bad = run_query(_prometheus([], status=400), "http://prom", PANEL, 0, 60, 10)
    assert not bad.ok and "parse error" in bad.error


def test_a_variable_is_checked_against_the_series_of_its_metric():
    var = DashboardQuery(kind="variable", source="app", expr="m", labels=("app",))
    assert run_query(_prometheus([{"metric": {"__name__": "m", "app": "plateau"}}]), "http://prom", var, 0, 60, 10).ok
    assert not run_query(_prometheus([{"metric": {"__name__": "m"}}]), "http://prom", var, 0, 60, 10).ok


def test_readme_metric_names_are_full_names_not_families():
    from bench.dashboard_check import readme_metrics

    text = "the `ray_plateau_model_*` series, `ray_plateau_variant_replicas` and ray_plateau_decisions_total."
    assert readme_metrics(text) == ["ray_plateau_decisions_total", "ray_plateau_variant_replicas"]
