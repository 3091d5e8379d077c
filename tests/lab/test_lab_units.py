"""The lab's pure parts: names, commands, the state record, the busybox image, the CLI's
preconditions. No root, no dockerd."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.lab import cli, harness
from portainer_agent.lab.dockerd import (
    BUSYBOX_APPLETS,
    DockerCommandError,
    DockerDaemon,
    busybox_tar,
    processes_under,
)
from portainer_agent.lab.harness import Lab, LabError, Leftovers
from portainer_agent.lab.testing import default_prefix_and_subnet
from portainer_agent.testing.gates import Need, require
from portainer_agent.testing.polling import wait_for
from portainer_agent.testing.signing import placeholder_ca_pem


class NamingTests(SynchronousTestCase):
    def test_nodes_get_names_addresses_namespaces_and_roles_from_prefix_and_subnet(self) -> None:
        lab = Lab(prefix="pax", subnet="10.77.42.0/24", nodes_count=3, managers=2)
        self.assertEqual([n.name for n in lab.nodes], ["node1", "node2", "node3"])
        self.assertEqual([n.ip for n in lab.nodes], ["10.77.42.11", "10.77.42.12", "10.77.42.13"])
        self.assertEqual([n.netns for n in lab.nodes], ["pax-n1", "pax-n2", "pax-n3"])
        self.assertEqual([n.veth for n in lab.nodes], ["paxv1", "paxv2", "paxv3"])
        self.assertEqual([n.role for n in lab.nodes], ["manager", "manager", "worker"])
        self.assertEqual(lab.bridge, "paxbr0")
        self.assertEqual(lab.gateway, "10.77.42.1")
        self.assertEqual(lab.agent_url("node2"), "https://10.77.42.12:9001")
        self.assertEqual(lab.agent_docker_host(3), "tcp://10.77.42.13:9001")
        self.assertEqual(lab.node(2).socket_path, "/tmp/pa-lab-pax/node2/docker.sock")

    def test_interface_names_fit_the_kernel_limit(self) -> None:
        lab = Lab(prefix="a123456789", nodes_count=12)
        for name in [lab.bridge] + [n.veth for n in lab.nodes]:
            self.assertLessEqual(len(name), 15, name)

    def test_bad_prefix_or_counts_are_refused(self) -> None:
        for prefix in ("", "x", "Upper", "has-dash", "1abc", "toolongprefix"):
            self.assertRaises(LabError, Lab, prefix=prefix)
        self.assertRaises(LabError, Lab, managers=0)
        self.assertRaises(LabError, Lab, nodes_count=2, managers=3)
        self.assertRaises(LabError, Lab, subnet="10.77.0.0/29")

    def test_node_lookup_by_object_name_and_index(self) -> None:
        lab = Lab(prefix="pax")
        node = lab.nodes[1]
        self.assertIs(lab.node(node), node)
        self.assertIs(lab.node("node2"), node)
        self.assertIs(lab.node(2), node)
        self.assertRaises(LabError, lab.node, "node9")

    def test_test_classes_get_stable_distinct_prefixes(self) -> None:
        first = default_prefix_and_subnet(NamingTests)
        self.assertEqual(first, default_prefix_and_subnet(NamingTests))
        self.assertNotEqual(first, default_prefix_and_subnet(CommandTests))
        harness.check_prefix(first[0])


class CommandTests(SynchronousTestCase):
    def test_agent_runs_in_the_node_namespace_with_its_hostname_socket_and_join_address(self) -> None:
        lab = Lab(prefix="pax", subnet="10.77.42.0/24", secret="s3cret", agent_args=("--probe-interval", "2s"))
        command = lab.agent_command("node2", ["--keep-cert", "1"])
        self.assertEqual(command[:5], ["nsenter", "--net=/var/run/netns/pax-n2", "unshare", "--uts", "sh"])
        script = command[-1]
        self.assertTrue(script.startswith("hostname node2 && exec "))
        for expected in ("-m portainer_agent", "--host 0.0.0.0", "--port 9001",
                         "--docker-host unix:///tmp/pa-lab-pax/node2/docker.sock",
                         "--data-dir /tmp/pa-lab-pax/node2/agent", "--advertise-addr 10.77.42.12",
                         "--cluster-addr 10.77.42.11", "--cluster-port 9002", "--log-level DEBUG",
                         "--log-format json", "--secret s3cret", "--probe-interval 2s", "--keep-cert 1"):
            self.assertIn(expected, script)
        self.assertIn(sys.executable, script)

    def test_metrics_listener_on_the_node_address_when_asked(self) -> None:
        self.assertNotIn("--metrics-addr", Lab(prefix="pax", subnet="10.77.42.0/24").agent_command(2)[-1])
        lab = Lab(prefix="pax", subnet="10.77.42.0/24", metrics_port=9003)
        self.assertIn("--metrics-addr 10.77.42.12:9003", lab.agent_command(2)[-1])

    def test_cluster_address_is_configurable(self) -> None:
        lab = Lab(prefix="pax", cluster_addr="10.77.0.12:9002")
        self.assertIn("--cluster-addr 10.77.0.12:9002", lab.agent_command(1)[-1])

    def test_dockerd_in_anonymous_or_named_namespace(self) -> None:
        anonymous = DockerDaemon.command(Path("/tmp/pa-x"), "node1")
        self.assertEqual(anonymous[:5], ["unshare", "--net", "--uts", "sh", "-c"])
        named = DockerDaemon.command(Path("/tmp/pa-x"), "node1", netns="pax-n1")
        self.assertEqual(named[:4], ["nsenter", "--net=/var/run/netns/pax-n1", "unshare", "--uts"])
        for command in (anonymous, named):
            script = command[-1]
            self.assertIn("hostname node1", script)
            for expected in ("--data-root /tmp/pa-x/data", "--exec-root /tmp/pa-x/exec", "--pidfile /tmp/pa-x/pid",
                             "-H unix:///tmp/pa-x/docker.sock", "--storage-driver vfs"):
                self.assertIn(expected, script)

    def test_docker_command_error_shows_stderr(self) -> None:
        error = DockerCommandError(1, ["docker", "node", "ls"], "", "this node is not a swarm manager\n")
        self.assertIn("this node is not a swarm manager", str(error))


class StateTests(SynchronousTestCase):
    def test_state_record_round_trips(self) -> None:
        lab = Lab(prefix="pax", subnet="10.77.42.0/24", managers=2, secret="s", cluster_addr="10.77.42.12",
                  metrics_port=9003)
        lab.nodes[0].agent = harness.Agent(pid=4242, log_path=lab.nodes[0].agent_log)
        lab.nodes[0].agent_args = ("--keep-cert", "1")
        path = Path(tempfile.mkdtemp(prefix="pa-unit-")) / "lab.json"
        self.addCleanup(shutil.rmtree, path.parent, True)
        self.patch(harness, "state_path", lambda prefix: path)
        lab.save()
        self.assertEqual(oct(path.stat().st_mode & 0o777), "0o600")
        loaded = Lab.load("pax")
        self.assertEqual(loaded.to_json(), lab.to_json())
        self.assertEqual(loaded.metrics_port, 9003)
        agent = loaded.node(1).agent
        self.assertEqual(agent.pid if agent else None, 4242)
        self.assertFalse(loaded.down_at_exit)

    def test_loading_a_missing_lab_says_so(self) -> None:
        self.patch(harness, "state_path", lambda prefix: Path("/nonexistent/pa-unit/lab.json"))
        self.assertRaises(LabError, Lab.load, "pax")

    def test_leftovers_describe_themselves(self) -> None:
        self.assertFalse(Leftovers())
        found = Leftovers(netns=("pax-n1",), processes=(12,), directory="/tmp/pa-lab-pax")
        self.assertTrue(found)
        self.assertIn("pax-n1", found.describe())
        self.assertIn("12", found.describe())


class ImageTests(SynchronousTestCase):
    def test_busybox_image_has_the_applets_linked(self) -> None:
        require(Need.BUSYBOX)  # and nothing else skips
        data = busybox_tar()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = {member.name: member for member in tar.getmembers()}
        self.assertTrue(names["bin/busybox"].isfile())
        for applet in ("sh", "sleep", "cat", "echo", "ls", "top", "wc", "head", "tail", "dd", "yes", "env", "id",
                       "hostname", "mkdir", "rm", "tr", "seq", "true", "false", "printf", "grep", "tee"):
            self.assertIn(applet, BUSYBOX_APPLETS)
            self.assertEqual(names[f"bin/{applet}"].linkname, "busybox")
        self.assertTrue(names["tmp"].isdir())

    def test_placeholder_ca_is_a_pem_certificate(self) -> None:
        self.assertTrue(placeholder_ca_pem().startswith(b"-----BEGIN CERTIFICATE-----"))


class ProcessMatchingTests(SynchronousTestCase):
    def test_processes_under_matches_whole_directory_names_only(self) -> None:
        base = tempfile.mkdtemp(prefix="pa-unit-")
        self.addCleanup(os.rmdir, base)
        sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
        process = subprocess.Popen([*sleeper, f"{base}/inside"])
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        neighbour = subprocess.Popen([*sleeper, f"{base}x/other"])
        self.addCleanup(neighbour.wait)
        self.addCleanup(neighbour.kill)
        # until both have exec'd
        wait_for(lambda: process.pid in processes_under(base), 10, "the sleeper to exec", interval=0.01)
        wait_for(lambda: f"{base}x/other".encode() in Path(f"/proc/{neighbour.pid}/cmdline").read_bytes(), 10,
                 "the neighbour to exec", interval=0.01)
        found = processes_under(base)
        self.assertIn(process.pid, found)
        self.assertNotIn(neighbour.pid, found)
        self.assertNotIn(os.getpid(), processes_under(base))


class CommandLineTests(SynchronousTestCase):
    def test_not_root_exits_2_with_a_clear_message(self) -> None:
        self.patch(os, "geteuid", lambda: 1000)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.assertEqual(cli.main(["up"]), 2)
        self.assertIn("needs root", stderr.getvalue())

    def test_missing_dockerd_names_the_packages(self) -> None:
        self.patch(os, "geteuid", lambda: 0)
        self.patch(cli, "missing_tools", lambda: ["dockerd"])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.assertEqual(cli.main(["up", "--nodes", "3", "--managers", "2"]), 2)
        self.assertIn("apt-get install -y docker.io busybox-static iproute2 iptables", stderr.getvalue())
        self.assertIn("--install", stderr.getvalue())

    def test_prefix_is_accepted_before_or_after_the_command(self) -> None:
        self.assertEqual(cli.parse_args(["--prefix", "pay", "down"]).prefix, "pay")
        self.assertEqual(cli.parse_args(["status", "--prefix", "pay"]).prefix, "pay")
        self.assertEqual(cli.parse_args(["down"]).prefix, os.environ.get("PA_LAB_PREFIX", "palab"))

    def test_bad_prefix_exits_2(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.assertEqual(cli.main(["--prefix", "Bad-Prefix", "status"]), 2)


class ProcessFaultTests(SynchronousTestCase):
    """Freeze/thaw and the /proc readers, on a child process standing in for an agent."""

    def setUp(self) -> None:
        self.lab = Lab(prefix="pax", subnet="10.77.42.0/24")
        child = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(child.wait, 10)
        self.addCleanup(child.kill)
        self.addCleanup(self.lab.stop_agent, "node1")  # thaws first, so a failed test leaves nothing stopped
        self.assertEqual(child.stdout.readline(), b"ready\n")  # type: ignore[union-attr]
        self.addCleanup(child.stdout.close)  # type: ignore[union-attr]
        self.child = child
        self.lab.nodes[0].agent = harness.Agent(pid=child.pid, log_path=self.lab.nodes[0].agent_log, process=child)

    def wait_state(self, frozen: bool) -> None:
        wait_for(lambda: self.lab.agent_frozen("node1") is frozen, 10,
                 f"the state of {self.child.pid} to become {'stopped' if frozen else 'running'}", interval=0.01)

    def test_freeze_stops_and_thaw_continues_the_agent(self) -> None:
        self.assertFalse(self.lab.agent_frozen("node1"))
        self.lab.freeze_agent("node1")
        self.wait_state(True)
        self.lab.thaw_agent("node1")
        self.wait_state(False)

    def test_killing_a_frozen_agent_does_not_wait_for_the_grace(self) -> None:
        self.lab.freeze_agent("node1")
        self.wait_state(True)
        # SIGTERM honoured within the deadline: thawed first (a stopped process holds it)
        self.assertTrue(self.lab.stop_agent("node1", timeout=30))
        self.assertIsNone(self.lab.node("node1").agent)
        self.assertIsNotNone(self.child.poll())

    def test_rss_and_descriptor_readers_follow_the_process(self) -> None:
        self.assertGreater(self.lab.agent_rss_bytes("node1"), 1 << 20)
        before = self.lab.agent_fd_count("node1")
        self.assertEqual(before, len(os.listdir(f"/proc/{self.child.pid}/fd")))
        self.assertGreaterEqual(before, 3)

    def test_a_node_without_agent_is_named(self) -> None:
        with self.assertRaises(LabError) as caught:
            self.lab.agent_fd_count("node2")
        self.assertIn("node2", str(caught.exception))

    def test_metrics_need_a_metrics_port(self) -> None:
        self.assertRaises(LabError, self.lab.agent_metrics, "node1")


class MetricsParsingTests(SynchronousTestCase):
    TEXT = """# HELP portainer_agent_inflight_requests Requests in flight
# TYPE portainer_agent_inflight_requests gauge
portainer_agent_inflight_requests{kind="hijack"} 2.0
portainer_agent_inflight_requests{kind="local"} 1.0
# HELP portainer_agent_open_connections API connections open now
# TYPE portainer_agent_open_connections gauge
portainer_agent_open_connections 5.0
"""

    def test_samples_by_name_and_labels(self) -> None:
        metrics = harness.Metrics.parse(self.TEXT)
        self.assertEqual(metrics.get("portainer_agent_open_connections"), 5.0)
        self.assertEqual(metrics.get("portainer_agent_inflight_requests", kind="hijack"), 2.0)
        self.assertEqual(metrics.total("portainer_agent_inflight_requests"), 3.0)
        self.assertIsNone(metrics.total("portainer_agent_nope"))
        self.assertIn("portainer_agent_inflight_requests", metrics.names())
