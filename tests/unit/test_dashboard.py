"""The Grafana dashboard: it parses, shows what operators need, and queries only real metrics.

A real Prometheus evaluating every expression is tests/integration/test_observability_prometheus.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from consumer.metrics import Metrics, exposed_names
from tests.conftest import missing
from tests.support import dashboard
from tests.support.dashboard import concrete, metric_names

DATASOURCES = dashboard.REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool missing (Debian package prometheus; make test installs it)")
    return path


def test_the_extractor_finds_metric_names_and_nothing_else() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{code="x y"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert metric_names("sum(rate(a_total[5m] offset 1m)) / ignoring(code) sum(b) > bool 1e3") == {
        "a_total",
        "b",
    }
    assert metric_names("max by (topic, partition) (lag) or vector(0)") == {"lag"}
    assert metric_names("count(up == 1) and on(instance) c:recorded") == {"up", "c:recorded"}


def test_the_dashboard_parses_and_every_panel_uses_the_provisioned_datasource() -> None:
    doc = dashboard.load()
    assert doc["uid"] and doc["title"]
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {ds["uid"] for ds in provisioned if ds["type"] == "prometheus"}
    panels = dashboard.panels(doc)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    assert len({p["title"] for p in panels}) == len(panels), "panel titles must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] in uids, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_every_metric_the_dashboard_queries_exists_in_the_consumer_registry() -> None:
    exposed = exposed_names(Metrics().registry)
    missing = {
        str(query): sorted(metric_names(query.expr) - exposed) for query in dashboard.queries()
    }
    assert not {k: v for k, v in missing.items() if v}, missing
    used = set().union(*(metric_names(q.expr) for q in dashboard.queries()))
    assert used, "no metric found in the dashboard"


def _panel_exprs(title: str) -> str:
    for panel in dashboard.panels(dashboard.load()):
        if panel["title"] == title:
            return "\n".join(t["expr"] for t in panel["targets"])
    raise AssertionError(f"no panel titled {title!r}")


@pytest.mark.parametrize(
    ("title", "needles"),
    [
        ("Throughput", ["rate(svd_requests_received_total", "rate(svd_requests_succeeded_total"]),
        (
            "End-to-end latency",
            [
                "histogram_quantile(0.5,",
                "histogram_quantile(0.99,",
                "svd_end_to_end_seconds_bucket",
            ],
        ),
        ("Errors by code", ["by (code)", "svd_requests_failed_total"]),
        ("Lag per partition", ["by (topic, partition)", "svd_consumer_lag_messages"]),
        ("Lag in seconds of compute", ["svd_consumer_lag_seconds"]),
        ("In-flight requests vs limit", ["svd_inflight_requests)", "svd_inflight_requests_limit"]),
        ("In-flight bytes vs budget", ["svd_inflight_bytes)", "svd_inflight_bytes_limit"]),
        ("Paused partitions", ["svd_paused_partitions"]),
        ("Pool workers", ["svd_pool_workers_alive", "svd_pool_size"]),
        (
            "Dead letters, retries, expired",
            ["svd_dead_letters_total", "svd_requests_retried_total", "svd_requests_expired_total"],
        ),
        ("Queue wait and compute", ["svd_queue_wait_seconds_bucket", "svd_compute_seconds_bucket"]),
    ],
)
def test_the_dashboard_shows_what_the_issue_asks_for(title: str, needles: list[str]) -> None:
    exprs = _panel_exprs(title)
    for needle in needles:
        assert needle in exprs, f"{title}: {needle!r} not in\n{exprs}"


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule: a syntax error fails here, offline."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": concrete(q.expr)}
                    for i, q in enumerate(dashboard.queries())
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
