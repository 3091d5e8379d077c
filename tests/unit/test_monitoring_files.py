"""What ``deploy/`` ships for monitoring: the Grafana dashboard's structure, every metric name
in it, in the alert rules and in the README's Metrics table being one the agent exposes, and
(with Prometheus installed) ``promtool check config``/``check rules``/``test rules``."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.metrics import AgentMetrics
from portainer_agent.testing.gates import Need, require

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "portainer-agent.json"
README = DEPLOY.parent / "README.md"
DATASOURCE = "${DS_PROMETHEUS}"
#: Metric names as they appear in queries (histogram series and counters with their suffix).
METRIC = re.compile(r"\bportainer_agent_[a-z_]+")


def exposed_names() -> set[str]:
    """Every sample name the agent can expose (families and their _total/_bucket/... series)."""
    metrics = AgentMetrics()
    metrics.watch_members(lambda: [])
    metrics.watch_inflight(lambda: {})
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count", "_sum", "_created"))
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in all_panels(dashboard()) for target in panel.get("targets", [])]


class DashboardTests(SynchronousTestCase):
    def test_schema_essentials(self) -> None:
        board = dashboard()
        for key, kind in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list),
                          ("templating", dict), ("time", dict)):
            self.assertIsInstance(board.get(key), kind, key)
        self.assertIn({"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "", "type": "datasource",
                       "pluginId": "prometheus", "pluginName": "Prometheus"}, board["__inputs"])

    def test_panels_have_unique_ids_grid_positions_and_queries(self) -> None:
        panels = all_panels(dashboard())
        ids = [panel["id"] for panel in panels]
        self.assertEqual(len(ids), len(set(ids)), "panel ids are unique")
        kinds = {panel["type"] for panel in panels}
        self.assertTrue({"row", "timeseries", "stat", "table"} >= kinds, kinds)
        for panel in panels:
            grid = panel["gridPos"]
            self.assertTrue(0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"])
            if panel["type"] == "row":
                continue
            self.assertEqual(panel["datasource"], {"type": "prometheus", "uid": DATASOURCE}, panel["title"])
            self.assertTrue(panel["targets"], panel["title"])
            refs = [target["refId"] for target in panel["targets"]]
            self.assertEqual(len(refs), len(set(refs)), panel["title"])
            for target in panel["targets"]:
                self.assertTrue(target["expr"].strip(), panel["title"])
                self.assertEqual(target["datasource"]["uid"], DATASOURCE, panel["title"])

    def test_the_views_asked_for_are_there(self) -> None:
        rows = [panel["title"] for panel in dashboard()["panels"] if panel["type"] == "row"]
        self.assertEqual(rows, ["Cluster", "Per node", "Route kinds", "Errors", "Latency", "Membership"])

    def test_variables_used_are_defined(self) -> None:
        board = dashboard()
        defined = {variable["name"] for variable in board["templating"]["list"]}
        builtin = {"__rate_interval", "__interval", "__range"}
        for expr in dashboard_queries():
            for name in re.findall(r"\$(\w+)", expr):
                self.assertIn(name, defined | builtin, expr)

    def test_every_metric_queried_is_exposed(self) -> None:
        names = exposed_names()
        for expr in dashboard_queries():
            for name in METRIC.findall(expr):
                self.assertIn(name, names, expr)


class RulesAndReadmeTests(SynchronousTestCase):
    def test_every_metric_in_the_alert_rules_is_exposed(self) -> None:
        names = exposed_names()
        used = METRIC.findall((PROMETHEUS_DIR / "alerts.yml").read_text())
        self.assertTrue(used)
        for name in used:
            self.assertIn(name, names)

    def test_every_alert_has_a_unit_test_and_a_runbook_line(self) -> None:
        alerts = re.findall(r"^\s*- alert: (\w+)$", (PROMETHEUS_DIR / "alerts.yml").read_text(), re.M)
        self.assertEqual(len(alerts), 6)
        tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "alerts_test.yml").read_text()))
        runbook = (DEPLOY / "README.md").read_text()
        for alert in alerts:
            self.assertIn(alert, tested)
            self.assertTrue(f"| `{alert}` |" in runbook, f"no runbook line for {alert} in deploy/README.md")

    def test_the_readme_metrics_table_lists_every_metric(self) -> None:
        readme = README.read_text()
        metrics = AgentMetrics()
        metrics.watch_members(lambda: [])
        metrics.watch_inflight(lambda: {})
        for family in metrics.registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            self.assertIn(f"| `{name}` |", readme)


class PromtoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        require(Need.PROMETHEUS)

    def promtool(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)

    def test_check_config(self) -> None:
        for name in ("prometheus.yml", "prometheus-dns.yml"):
            done = self.promtool("check", "config", name)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_check_rules(self) -> None:
        done = self.promtool("check", "rules", "alerts.yml")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("6 rules found", done.stdout)

    def test_unit_tests_of_every_alert(self) -> None:
        done = self.promtool("test", "rules", "alerts_test.yml")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_a_broken_rule_fails_the_check(self) -> None:
        """The checks can fail: an alert whose unit test no longer matches is caught."""
        copy = Path(self.mktemp()).resolve()
        copy.mkdir()
        (copy / "alerts.yml").write_text((PROMETHEUS_DIR / "alerts.yml").read_text().replace("> 4", "> 40"))
        (copy / "alerts_test.yml").write_text((PROMETHEUS_DIR / "alerts_test.yml").read_text())
        done = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=copy, capture_output=True,
                              text=True, timeout=120)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("PortainerAgentMembershipFlapping", done.stdout + done.stderr)
