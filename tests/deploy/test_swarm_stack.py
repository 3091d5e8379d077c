"""The image and the stack file, for real: build with ``scripts/build-image-offline`` onto the
three dockerds of a lab (no registry, nothing pulled), ``docker stack deploy`` of
``deploy/portainer-agent-stack.yml`` (agents only: ``PORTAINER_REPLICAS=0``), then check from
containers on the stack's overlay network what a Portainer server relies on.

Opt-in (about 5 minutes on 2 cores with the vfs storage driver; the first run also needs the
Debian mirror for debootstrap, about 75 s more)::

    PA_DEPLOY_TESTS=1 .venv/bin/python -m twisted.trial tests.deploy

Lab nodes share one filesystem, so each node's engine socket is at its own path. The stack file
takes the bind-mount sources from ``DOCKER_SOCKET``/``DOCKER_VOLUMES``, and Swarm expands the
``{{.Node.Hostname}}`` template in a mount source on each node, so one *global* service (exactly
Portainer's shape) mounts every node's own socket.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

from portainer_agent.lab.testing import SynchronousLabTestCase
from portainer_agent.testing.gates import Need, require

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-image-offline"
STACK = ROOT / "deploy" / "portainer-agent-stack.yml"
PROBE = Path(__file__).with_name("probe_agents.py")
TAG = "portainer-agent:py"
STACK_NAME = "portainer"
NETWORK = f"{STACK_NAME}_agent_network"
SERVICE = f"{STACK_NAME}_agent"
NAMES = {"node1", "node2", "node3"}
# In the image: the modules that must not be there (prints them, exits 1 when any is).
IMAGE_PROBE = ("import importlib.util as u; found = [m for m in ('portainer_agent.lab', 'portainer_agent.testing', "
               "'portainer_agent.tools', 'pip', 'setuptools') if u.find_spec(m)]; print(found); raise SystemExit(bool(found))")



class SwarmStackTests(SynchronousLabTestCase):
    lab_prefix, lab_subnet = "padep", "10.77.80.0/24"
    lab_nodes, lab_managers = 3, 1
    lab_agents = False

    build_seconds: ClassVar[float]
    deploy_seconds: ClassVar[float]
    _ready: ClassVar[bool] = False
    _failed: ClassVar[str | None] = None
    _prober: ClassVar[str]

    @classmethod
    def setUpClass(cls) -> None:
        require(Need.DEPLOY)
        super().setUpClass()

    def setUp(self) -> Any:
        require(Need.DEPLOY)
        result = super().setUp()
        cls = type(self)
        if cls._failed:
            self.fail(f"deployment failed earlier: {cls._failed}")
        if not cls._ready:
            try:
                cls._build_and_deploy()
            except BaseException as error:
                cls._failed = f"{type(error).__name__}: {error}"
                raise
            cls._ready = True
        return result

    # --- the deployment (once per class) ----------------------------------------------

    @classmethod
    def _build_and_deploy(cls) -> None:
        lab = cls.lab
        hosts = [arg for node in lab.nodes for arg in ("--docker-host", node.docker_host)]
        started = time.monotonic()
        build = subprocess.run([str(SCRIPT), *hosts, "--tag", TAG], capture_output=True, text=True,
                               timeout=1500, stdin=subprocess.DEVNULL)
        cls.build_seconds = time.monotonic() - started
        if build.returncode != 0:
            raise AssertionError(f"build-image-offline exited {build.returncode}:\n{build.stderr[-4000:]}")
        print(f"\nbuild-image-offline: {cls.build_seconds:.0f}s\n{build.stderr}")
        started = time.monotonic()
        env = {
            "DOCKER_SOCKET": str(lab.root / "{{.Node.Hostname}}" / "docker.sock"),
            "DOCKER_VOLUMES": str(lab.root / "{{.Node.Hostname}}" / "data" / "volumes"),
            "PORTAINER_REPLICAS": "0",
            "AGENT_IMAGE": TAG,
            "AGENT_METRICS_ADDR": "0.0.0.0:9003",
        }
        lab.docker("node1", "stack", "deploy", "--resolve-image", "never", "-c", str(STACK), STACK_NAME, env=env)
        lab.wait_for(lambda: cls._healthy_nodes() == NAMES, timeout=420, interval=3,
                     what=f"a healthy {SERVICE} task on every node")
        cls.deploy_seconds = time.monotonic() - started
        print(f"stack deploy -> 3 healthy tasks: {cls.deploy_seconds:.0f}s")
        # A long-lived container on the overlay network (not an agent) to send requests from.
        cls._prober = lab.docker("node2", "run", "-d", "--network", NETWORK, "--entrypoint", "python3", TAG,
                                 "-c", "import time; time.sleep(1800)", timeout=300).stdout.strip()

    @classmethod
    def _healthy_nodes(cls) -> set[str]:
        healthy = set()
        for node in cls.lab.nodes:
            status = cls.lab.docker(node, "ps", "--filter", f"name={SERVICE}.", "--format", "{{.Status}}",
                                    check=False, timeout=30).stdout
            if "(healthy)" in status:
                healthy.add(node.name)
        return healthy

    def probe(self) -> dict[str, Any]:
        """Run probe_agents.py in the prober container: every tasks.agent address, /ping,
        signed /agents and signed /v1.41/info."""
        result = self.lab.docker("node2", "exec", "-i", "-e", f"PROBE_HEADERS={json.dumps(self.lab.signed_headers())}",
                                 "-e", "PROBE_METRICS_PORT=9003", type(self)._prober, "python3", "-", input=PROBE.read_text(), timeout=120)
        return json.loads(result.stdout)

    def agent_log_tails(self) -> str:
        tails = []
        for node in self.lab.nodes:
            ids = self.lab.docker(node, "ps", "-aq", "--filter", f"name={SERVICE}.", check=False).stdout.split()
            for container in ids[:1]:
                logs = self.lab.docker(node, "logs", "--tail", "15", container, check=False)
                tails.append(f"--- {node.name}\n{logs.stdout}{logs.stderr}")
        return "\n".join(tails)

    # --- the checks -------------------------------------------------------------------

    def test_tasks_running_and_healthy(self) -> None:
        lines = self.lab.docker("node1", "service", "ps", SERVICE, "--filter", "desired-state=running",
                                "--format", "{{.Node}} {{.CurrentState}}").stdout.splitlines()
        self.assertEqual({line.split()[0] for line in lines}, NAMES, lines)
        for line in lines:
            self.assertIn(" Running ", f" {line} ", lines)
        self.assertEqual(self._healthy_nodes(), NAMES)

    def test_every_agent_pings_and_lists_all_nodes(self) -> None:
        deadline = time.monotonic() + 90
        while True:
            report = self.probe()
            addresses = report["addresses"]
            listed = {address: sorted(member["NodeName"] for member in checks["agents"].get("body") or []
                                      if isinstance(member, dict))
                      for address, checks in report["agents"].items()}
            if len(addresses) == 3 and all(names == sorted(NAMES) for names in listed.values()):
                break
            if time.monotonic() > deadline:
                self.fail(f"/agents did not list all 3 nodes on every agent: {listed}\n"
                          f"{json.dumps(report, indent=1)[:3000]}\n{self.agent_log_tails()}")
            time.sleep(3)
        seen_nodes = set()
        for address, checks in report["agents"].items():
            self.assertEqual(checks["ping"]["status"], 204, checks)
            self.assertEqual(checks["agents"]["status"], 200, checks)
            members = checks["agents"]["body"]
            self.assertEqual({m["IPAddress"] for m in members}, set(addresses))
            self.assertEqual([m["IPAddress"] for m in members if m.get("Self")], [address])
            # /info is answered by a manager, whichever agent is asked (routing).
            self.assertEqual(checks["docker_info"]["status"], 200, checks)
            self.assertTrue(checks["docker_info"]["ControlAvailable"], checks)
            self.assertEqual(checks["docker_info"]["DockerRootDir"],
                             str(self.lab.node(checks["docker_info"]["Name"]).data_root))
            # A node operation for the agent's own node reaches that node's engine: every
            # node's socket mount is right (its containers carry its Swarm node ID).
            own = checks["own_node"]
            self.assertEqual(own["status"], 200, checks)
            self.assertEqual(own["container_node_ids"], [own["NodeID"]], checks)
            seen_nodes.add(own["NodeName"])
            self.assertEqual(checks["unsigned_info_status"], 403)
        self.assertEqual(seen_nodes, NAMES)

    def test_metrics_on_every_agent(self) -> None:
        """AGENT_METRICS_ADDR: each agent serves /metrics (plain HTTP) on the overlay network,
        counting the probe's own requests and the 3 alive members."""
        report = self.probe()
        self.assertEqual(len(report["agents"]), 3, report)
        for address, checks in report["agents"].items():
            metrics = checks["metrics"]
            self.assertEqual(metrics.get("status"), 200, (address, metrics))
            self.assertIn('portainer_agent_requests_total{kind="ping",method="GET",status="2xx"}',
                          " ".join(metrics["lines"]), address)
            self.assertIn('portainer_agent_cluster_members{state="alive"} 3.0', metrics["lines"], address)

    def test_healthcheck_command_in_the_image(self) -> None:
        """The image's HEALTHCHECK is ``portainer-agent healthcheck``; run it by hand too."""
        node = self.lab.node("node1")
        container = self.lab.docker(node, "ps", "-q", "--filter", f"name={SERVICE}.").stdout.split()[0]
        inspect = json.loads(self.lab.docker(node, "inspect", container).stdout)[0]
        self.assertEqual(inspect["Config"]["Healthcheck"]["Test"], ["CMD", "portainer-agent", "healthcheck"])
        self.assertEqual(inspect["State"]["Health"]["Status"], "healthy")
        result = self.lab.docker(node, "exec", container, "portainer-agent", "healthcheck", check=False)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "healthy"), result.stderr)
        broken = self.lab.docker(node, "exec", "-e", "DOCKER_HOST=unix:///nonexistent.sock", container,
                                 "portainer-agent", "healthcheck", check=False)
        self.assertEqual(broken.returncode, 1)
        self.assertIn("Docker at unix:///nonexistent.sock", broken.stderr)

    def test_image_is_the_runtime_only(self) -> None:
        """The image weighs at most 150 MB (Dockerfile: a builder stage, then a pruned tree FROM
        scratch), runs as UID 10001, and carries neither the lab, the test helpers nor pip."""
        node = self.lab.node("node1")
        image = json.loads(self.lab.docker(node, "image", "inspect", TAG).stdout)[0]
        self.assertLessEqual(image["Size"], 150_000_000)
        self.assertEqual(image["Config"]["User"], "10001:10001")
        result = self.lab.docker(node, "run", "--rm", "--entrypoint", "python3", TAG, "-c", IMAGE_PROBE,
                                 check=False)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "[]"), result.stderr)

    def test_volumes_mount_is_the_nodes(self) -> None:
        node = self.lab.node("node3")
        self.lab.docker(node, "volume", "create", "deploycheck")
        node.volume_path("deploycheck").joinpath("marker.txt").write_text("from node3\n")
        container = self.lab.docker(node, "ps", "-q", "--filter", f"name={SERVICE}.").stdout.split()[0]
        content = self.lab.docker(node, "exec", container, "cat",
                                  "/var/lib/docker/volumes/deploycheck/_data/marker.txt").stdout
        self.assertEqual(content, "from node3\n")

    def _docker_cli_in_overlay(self, script: str) -> subprocess.CompletedProcess:
        """Run ``script`` (sh) in a busybox container on the overlay network with this machine's
        docker CLI (a static binary) at /docker and DOCKER_CONFIG sending the lab's signature."""
        require(Need.STATIC_DOCKER_CLI)
        cli = shutil.which("docker")
        assert cli is not None
        config = self.lab.write_docker_config()
        return self.lab.docker("node2", "run", "--rm", "--network", NETWORK, "-v", f"{cli}:/docker:ro",
                               "-v", f"{config}:/cfg:ro", "-e", "DOCKER_CONFIG=/cfg", "busybox:local",
                               "sh", "-c", script, check=False, timeout=300)

    def test_docker_cli_through_tasks_agent(self) -> None:
        """What Portainer does with ``-H tcp://tasks.agent:9001 --tlsskipverify``."""
        result = self._docker_cli_in_overlay(
            "for i in 1 2 3 4 5 6; do /docker -H tcp://tasks.agent:9001 --tls info --format '{{.Name}}' || exit 1; done; "
            "/docker -H tcp://tasks.agent:9001 --tls version --format 'api={{.Server.APIVersion}}'")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.split()
        self.assertTrue(set(lines[:6]) <= NAMES, lines)
        self.assertEqual(lines[6], "api=1.41")

    def test_swarm_management_through_tasks_agent(self) -> None:
        """Portainer sends Swarm management calls (node ls, service ls) to tasks.agent, i.e.
        to any agent; the Go agent forwards them to a manager's agent."""
        result = self._docker_cli_in_overlay(
            "for i in 1 2 3 4 5 6; do /docker -H tcp://tasks.agent:9001 --tls node ls -q | wc -l; done")
        self.assertEqual(result.stdout.split(), ["3"] * 6, result.stderr)
