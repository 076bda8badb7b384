"""Does every query of a Grafana dashboard have data, and every metric docs/observability.md names a series?
Run each one against a live Prometheus.

    python -m bench.dashboard_check --prometheus http://127.0.0.1:9090 [--dashboard dashboards/plateau-serve.json]
        [--since-s 900] [--cpu-only]

Every panel target, every annotation and every template-variable query of the dashboard is sent
to Prometheus' HTTP API the way Grafana sends it (dashboard variables set to "All", i.e. `.*`;
panels and annotations as range queries over the last `--since-s` seconds; `label_values(...)`
variables as a series lookup) and must return at least one series carrying every label its legend
(`{{label}}`) or its variable names. Panels that can only have data on a GPU are listed in
`GPU_ONLY_PANELS` by title (their description in the dashboard says so too) and skipped with
`--cpu-only`. Exit code 1 when a query came back empty or without its labels; the table printed
names each one. `readme_metrics()` lists the `ray_plateau_*` series a page (docs/observability.md) promises
(`GPU_ONLY_METRICS` exist only on GPUs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import httpx
from pydantic import BaseModel, ConfigDict

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "plateau-serve.json"
# Panels with data only where a GPU (NVML GPM) is present; named here, and marked in their description.
GPU_ONLY_PANELS = ("GPU DRAM bandwidth utilisation (NVML GPM, GPUs only)",)
GPU_ONLY_MARK = "GPU only"
GPU_ONLY_METRICS = ("ray_plateau_replica_device_dram_bw_util",)
_PROMISED_METRIC = re.compile(r"\bray_plateau_[a-z0-9_]*[a-z0-9]\b(?!\*)")
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),\s*)?(\w+)\)\s*$", re.S)


class DashboardQuery(BaseModel):
    """One query Grafana would send for the dashboard."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["panel", "annotation", "variable"]
    source: str  # the panel title, annotation name or variable name
    expr: str  # PromQL with the dashboard variables set to match everything
    labels: tuple[str, ...]  # labels each returned series must carry (the legend's, or the variable's)
    gpu_only: bool = False


class QueryCheck(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    query: DashboardQuery
    series: int  # series returned
    missing_labels: tuple[str, ...]  # legend labels no returned series carries
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.series > 0 and not self.missing_labels


def with_all_selected(expr: str, variables: set[str]) -> str:
    """`expr` with each dashboard variable (`$app`, `${model}`) set to "All" (`.*`, as Grafana's
    regex-matched multi-value variables send it); Grafana's own `$__...` variables are left alone."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return ".*" if name in variables else m.group(0)

    return _VARIABLE.sub(sub, expr)


def legend_labels(legend: Optional[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_LEGEND_LABEL.findall(legend or "")))


def readme_metrics(text: str) -> list[str]:
    """The full `ray_plateau_*` series names `text` mentions (a `ray_plateau_model_*` family is not one)."""
    return sorted(set(_PROMISED_METRIC.findall(text)))


def missing_series(client: httpx.Client, prometheus: str, names: list[str], start: float, end: float) -> list[str]:
    """Those of `names` with no series in Prometheus over [start, end]."""
    missing = []
    for name in names:
        r = _series_lookup(client, prometheus, name, start, end)
        if r.status_code != 200 or not r.json().get("data"):
            missing.append(name)
    return missing


def _series_lookup(client: httpx.Client, prometheus: str, match: str, start: float, end: float) -> httpx.Response:
    """Prometheus' series API: the label sets of the series `match` selects over [start, end]."""
    return client.get(f"{prometheus}/api/v1/series", params={"match[]": match, "start": start, "end": end})


def dashboard_queries(dashboard: dict) -> list[DashboardQuery]:
    """Every Prometheus query of `dashboard` (a Grafana dashboard JSON model)."""
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    queries: list[DashboardQuery] = []
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        raw = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
        m = _LABEL_VALUES.match(raw)
        if m is None:
            raise ValueError(f"variable {v['name']!r}: only label_values(metric, label) queries are checked, got {raw!r}")
        metric, label = m.group(1), m.group(2)
        if not metric:
            raise ValueError(f"variable {v['name']!r}: label_values needs a metric to check against, got {raw!r}")
        queries.append(DashboardQuery(kind="variable", source=v["name"], expr=with_all_selected(metric, variables),
                                      labels=(label,)))
    for a in dashboard.get("annotations", {}).get("list", []):
        if a.get("expr"):
            queries.append(DashboardQuery(kind="annotation", source=a["name"], expr=with_all_selected(a["expr"], variables),
                                          labels=legend_labels(a.get("titleFormat"))))
    for p in dashboard.get("panels", []):
        for t in p.get("targets", []):
            if t.get("expr"):
                queries.append(DashboardQuery(kind="panel", source=p["title"], expr=with_all_selected(t["expr"], variables),
                                              labels=legend_labels(t.get("legendFormat")),
                                              gpu_only=p["title"] in GPU_ONLY_PANELS))
    return queries


def _series(result: list[dict]) -> list[dict]:
    return [r.get("metric", r) for r in result]


def run_query(client: httpx.Client, prometheus: str, q: DashboardQuery, start: float, end: float,
              step_s: float) -> QueryCheck:
    """The series Prometheus returns for `q` over [start, end] (for a variable: series of its metric)."""
    try:
        if q.kind == "variable":
            r = _series_lookup(client, prometheus, q.expr, start, end)
        else:
            r = client.get(f"{prometheus}/api/v1/query_range",
                           params={"query": q.expr, "start": start, "end": end, "step": step_s})
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            return QueryCheck(query=q, series=0, missing_labels=(), error=body.get("error", r.text[:300]))
    except (httpx.HTTPError, ValueError) as exc:
        return QueryCheck(query=q, series=0, missing_labels=(), error=f"{type(exc).__name__}: {exc}")
    data = body["data"]
    series = _series(data if q.kind == "variable" else data["result"])
    missing = tuple(lab for lab in q.labels if not any(lab in s for s in series)) if series else ()
    return QueryCheck(query=q, series=len(series), missing_labels=missing)


def check_dashboard(prometheus: str, dashboard: dict, start: float, end: float, step_s: float = 10.0,
                    cpu_only: bool = False) -> list[QueryCheck]:
    with httpx.Client(timeout=30) as client:
        return [run_query(client, prometheus, q, start, end, step_s)
                for q in dashboard_queries(dashboard) if not (cpu_only and q.gpu_only)]


def report(checks: list[QueryCheck]) -> str:
    lines = []
    for c in checks:
        state = "ok" if c.ok else "EMPTY" if not c.series and c.error is None else "ERROR" if c.error else "LABELS"
        extra = c.error or (f"missing labels {', '.join(c.missing_labels)}" if c.missing_labels else "")
        lines.append(f"{state:<6} {c.series:>4} series  {c.query.kind:<10} {c.query.source}: {c.query.expr}"
                     + (f"  ({extra})" if extra else ""))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("--since-s", type=float, default=900.0, help="range queried, ending now (seconds)")
    ap.add_argument("--cpu-only", action="store_true", help=f"skip the GPU-only panels: {', '.join(GPU_ONLY_PANELS)}")
    args = ap.parse_args(argv)
    end = time.time()
    checks = check_dashboard(args.prometheus.rstrip("/"), json.loads(args.dashboard.read_text()), end - args.since_s, end,
                             cpu_only=args.cpu_only)
    print(report(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
