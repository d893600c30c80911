"""deploy/prometheus/alerts.yml and deploy/grafana/tensorwire.json against the real tools and the
real metrics: `promtool check rules` accepts the rules, `promtool test rules` shows each alert
firing when it should (deploy/prometheus/alerts_test.yml), every dashboard query is valid
PromQL (checked by promtool as recording rules), and every metric either names is one the
daemons expose. promtool is Debian's "prometheus" package, installed by
tests/ops/install_tools.sh when missing."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]
from prometheus_client import REGISTRY, generate_latest

import fl.cli_ops
import fl.status
import transport.metrics
from fl.fedavg import RoundReport
from tests.ops.running_job import ROOT, require_tool

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "tensorwire.json"
ALERTS = {
    "TensorwireNoRoundProgress",
    "TensorwireSiteLost",
    "TensorwireTransferStalled",
    "TensorwireMemoryNearLimit",
}
# Importing them registers every metric a daemon exposes, on the default registry.
DAEMON_METRICS = (fl.cli_ops, fl.status, transport.metrics)
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [require_tool("promtool"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_alert_rules() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == ALERTS


def test_each_alert_fires_when_it_should_and_not_before() -> None:
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if check["exp_alerts"]
    }
    assert fired == ALERTS


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(queries) >= 15
    return queries


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for number, query in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        rules.append({"record": f"tensorwire:dashboard_query_{number}", "expr": query})
    as_rules = tmp_path / "dashboard_rules.yml"
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", str(as_rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_lays_out_on_grafanas_grid() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        place = panel["gridPos"]
        assert place["x"] + place["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def exposed_names() -> set[str]:
    """Every sample name the daemons' registry can expose (families with no sample yet too)."""
    # The round metrics register at a daemon's first round end: end one here.
    fl.cli_ops.record_round(RoundReport(0, ["site-1"], ["site-1"], {}, 1, 1, 1.0))
    suffixes = {
        "counter": ("", "_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "summary": ("_sum", "_count", "_created"),
    }
    names = set()
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.update(name + suffix for suffix in suffixes.get(kind, ("",)))
    return names


def test_the_dashboard_and_alerts_use_metrics_the_daemons_expose() -> None:
    text = RULES.read_text() + "\n".join(dashboard_queries())
    used = set(re.findall(r"\b(?:tensorwire|process)_[a-z_]+\b", text)) - {"process_resident"}
    assert len(used) > 20
    missing = used - exposed_names()
    assert not missing, f"not exposed by any tensorwire daemon: {sorted(missing)}"
