"""A real Prometheus scraping three lab agents with the shipped rules (``deploy/prometheus``):
when an agent is killed, ``PortainerAgentDown`` and ``PortainerAgentNodeUnreachable`` fire
within their ``for`` durations; then every query of the Grafana dashboard
(``deploy/grafana``) returns data from it.

What is adapted for the lab, and why:

* discovery: the lab agents are plain processes in network namespaces, not Swarm tasks, so
  the shipped job's ``dockerswarm_sd_configs`` and its relabelling are replaced by static
  targets (``<node ip>:9003``) carrying what the relabelling gives, ``instance=<node name>``;
  the job name, metrics path and rule file are the shipped ones;
* time: the scrape and evaluation intervals are 2 s (not 15 s), every ``for`` is 10 s and
  every range window 30 s (not minutes), so the alerts fire in a test's time; the
  expressions, labels and thresholds are the shipped ones, read from ``alerts.yml``.

Prometheus listens on loopback on a port held by ``reserve_port`` until it is ready; the
agents' metrics listeners are on the lab's addresses. Nothing else is reached.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from portainer_agent.lab.harness import Lab
from portainer_agent.lab.testing import SynchronousLabTestCase
from portainer_agent.testing.gates import Need, require
from portainer_agent.testing.polling import wait_for
from portainer_agent.testing.ports import reserve_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRICS_PORT = 9003
#: The lab's timing (see the module docstring).
INTERVAL = "2s"
FOR = 10.0
WINDOW = "30s"
#: What may pass, besides ``for``, between the kill and an alert firing: a scrape and an
#: evaluation (2 s each), the range window filling with the new series (30 s), membership
#: declaring the agent dead, and a loaded 2-core machine.
ALERT_SLACK = 90.0


def lab_rules(shipped: str) -> str:
    """The shipped rules with the lab's ``for`` durations and range windows."""
    rules = re.sub(r"(?m)^(\s+for: )\S+$", rf"\g<1>{int(FOR)}s", shipped)
    return re.sub(r"\[\d+m\]", f"[{WINDOW}]", rules)


def lab_config(shipped: str, targets: list[tuple[str, str]]) -> str:
    """The shipped scrape configuration with the lab's intervals and static targets
    (``(address, node name)``) in place of the Swarm discovery and its relabelling."""
    assert "job_name: portainer-agent" in shipped and "- alerts.yml" in shipped, "shipped config changed shape"
    config = re.sub(r"(?m)^(\s+(?:scrape|evaluation)_interval: )\S+$", rf"\g<1>{INTERVAL}", shipped)
    head, found, _ = config.partition("    dockerswarm_sd_configs:")
    assert found, "the shipped config has no dockerswarm_sd_configs"
    static = "".join(f"      - targets: ['{address}']\n        labels: {{instance: {name}}}\n"
                     for address, name in targets)
    return head + "    static_configs:\n" + static


class Prometheus:
    """A Prometheus process of our own (not the Debian service) on a loopback port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with reserve_port() as reserved:  # held until Prometheus is ready
            self.port = reserved.port
            log = open(self.directory / "prometheus.log", "wb")
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={self.directory / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, start_new_session=True)
            log.close()
            wait_for(self.ready, 60, "Prometheus to be ready", interval=0.2, describe=self.log_tail)

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited {self.process.returncode}: {self.log_tail()}")
        try:
            return self._get("/-/ready", raw=True) is not None
        except OSError:
            return False

    def log_tail(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")[-3000:]

    def _get(self, path: str, raw: bool = False) -> Any:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            body = response.read()
        return body if raw else json.loads(body)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def firing(self, alert: str) -> list[dict[str, str]]:
        alerts = self._get("/api/v1/alerts")["data"]["alerts"]
        return [a["labels"] for a in alerts if a["labels"]["alertname"] == alert and a["state"] == "firing"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads((DEPLOY / "grafana" / "portainer-agent.json").read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def grafana_variables(expr: str) -> str:
    """What Grafana substitutes before sending a query (all agents, 30 s windows)."""
    return expr.replace("$__rate_interval", WINDOW).replace("$__range", WINDOW).replace("$instance", ".*")


class PrometheusLabTests(SynchronousLabTestCase):
    lab_prefix, lab_subnet = "paho", "10.77.112.0/24"
    lab_nodes, lab_managers = 3, 1
    lab_options: ClassVar[dict[str, Any]] = {"metrics_port": METRICS_PORT}
    lab: ClassVar[Lab]
    prometheus: ClassVar[Prometheus | None] = None
    workdir: ClassVar[Path | None] = None

    @classmethod
    def setUpClass(cls) -> None:
        require(Need.PROMETHEUS)  # before the lab: nothing to bring up without it
        super().setUpClass()
        cls.workdir = Path(tempfile.mkdtemp(prefix="pa-prometheus-"))
        shipped = DEPLOY / "prometheus"
        (cls.workdir / "alerts.yml").write_text(lab_rules((shipped / "alerts.yml").read_text()))
        targets = [(f"{node.ip}:{METRICS_PORT}", node.name) for node in cls.lab.nodes]
        (cls.workdir / "prometheus.yml").write_text(lab_config((shipped / "prometheus.yml").read_text(), targets))
        check = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=cls.workdir,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        cls.prometheus = Prometheus(cls.workdir)
        cls.prometheus.start()

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            if cls.prometheus is not None:
                cls.prometheus.stop()
                cls.prometheus = None
            if cls.workdir is not None:
                shutil.rmtree(cls.workdir, ignore_errors=True)
                cls.workdir = None
        finally:
            super().tearDownClass()

    def aggregate(self) -> None:
        """One aggregated list through node1's agent (what names an unreachable node)."""
        self.lab.agent_request("node1", "/containers/json?all=1", timeout=15)

    def test_alerts_fire_when_an_agent_is_killed_and_every_dashboard_query_has_data(self) -> None:
        self.require_agents()
        prometheus = self.prometheus
        assert prometheus is not None

        def all_up() -> bool:
            self.aggregate()
            return len(prometheus.query('up{job="portainer-agent"} == 1')) == 3

        wait_for(all_up, 60, "Prometheus to scrape the 3 agents", interval=0.5, describe=prometheus.log_tail)
        self.assertEqual(prometheus.firing("PortainerAgentDown"), [])
        self.assertEqual(prometheus.firing("PortainerAgentNodeUnreachable"), [])

        self.lab.kill_agent("node3")
        killed = time.monotonic()
        fired: dict[str, float] = {}

        def both_fired() -> bool:
            self.aggregate()
            for alert, labels in (("PortainerAgentDown", {"instance": "node3"}),
                                  ("PortainerAgentNodeUnreachable", {"node": "node3"})):
                if alert not in fired and any(labels.items() <= found.items() for found in prometheus.firing(alert)):
                    fired[alert] = time.monotonic() - killed
            return len(fired) == 2

        wait_for(both_fired, FOR + ALERT_SLACK, "PortainerAgentDown and PortainerAgentNodeUnreachable for node3",
                 interval=0.5, describe=lambda: f"fired so far: {fired}")
        for alert, after in fired.items():
            self.assertGreaterEqual(after, FOR, f"{alert} fired before its `for` ({after:.1f}s)")
        # Only node3 is down.
        self.assertEqual([a["instance"] for a in prometheus.firing("PortainerAgentDown")], ["node3"])
        self.assertEqual([a["node"] for a in prometheus.firing("PortainerAgentNodeUnreachable")], ["node3"])

        empty = [(title, expr) for title, expr in dashboard_queries() if not prometheus.query(grafana_variables(expr))]
        self.assertEqual(empty, [], "dashboard queries with no data")
