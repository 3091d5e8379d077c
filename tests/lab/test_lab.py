"""The lab on real dockerds: a 3-node Swarm with 2 managers, one agent per node, faults on
demand, and a teardown that leaves nothing behind (checked with ip, iptables and /proc)."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.lab import harness
from portainer_agent.lab.dockerd import _pid_alive
from portainer_agent.lab.harness import Lab, LabError, Leftovers, leftovers, state_path
from portainer_agent.lab.testing import SynchronousLabTestCase, agent_available
from portainer_agent.testing.gates import Need, require
from portainer_agent.testing.polling import wait_for

PROJECT_ROOT = str(Path(harness.__file__).resolve().parents[2])


def tcp_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def what_remains(prefix: str) -> list[str]:
    """Everything of lab ``prefix`` still on the machine, checked independently of the
    harness's own bookkeeping."""
    remains = []
    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith(f"{prefix}-"):
            remains.append(f"netns {line}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for name in re.findall(r"^\d+: ([^:@]+)", links, re.MULTILINE):
        if re.match(rf"^{prefix}(br|v|p)\d+$", name):
            remains.append(f"link {name}")
    rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True).stdout
    remains += [f"iptables {line}" for line in rules.splitlines() if f"{prefix}br0" in line]
    root = f"/tmp/pa-lab-{prefix}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{root}/" in cmdline and int(pid) != os.getpid():
            remains.append(f"process {pid}: {cmdline[:100]}")
    remains += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4].startswith(f"{root}/")]
    if os.path.exists(root):
        remains.append(f"directory {root}")
    if os.path.exists(f"{root}.lock"):
        remains.append(f"lock file {root}.lock")
    return remains


class SwarmLabTests(SynchronousLabTestCase):
    """One 3-node/2-manager lab shared by these tests; every test leaves it as it found it."""

    lab_prefix = "palt"
    lab_subnet = "10.77.50.0/24"
    lab_nodes = 3
    lab_managers = 2

    def tearDown(self) -> None:
        for node in self.lab.nodes:
            self.ensure_agent_running(node)

    def test_every_manager_sees_three_ready_nodes(self) -> None:
        managers = self.lab.manager_nodes
        self.assertEqual([n.name for n in managers], ["node1", "node2"])
        for manager in managers:
            self.assertEqual(self.lab.ready_nodes(manager), {"node1", "node2", "node3"})
            listing = self.lab.docker(manager, "node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}").stdout
            manager_lines = [line for line in listing.splitlines() if line.split()[1:]]
            self.assertEqual(sorted(line.split()[0] for line in manager_lines), ["node1", "node2"])

    def test_every_node_has_its_own_name_address_and_socket(self) -> None:
        for node in self.lab.nodes:
            info = self.lab.docker(node, "info", "--format", "{{.Name}} {{.Swarm.NodeAddr}} {{.Swarm.LocalNodeState}}")
            self.assertEqual(info.stdout.split(), [node.name, node.ip, "active"])
        self.assertEqual(len({node.socket_path for node in self.lab.nodes}), 3)

    def test_busybox_is_on_every_node(self) -> None:
        for node in self.lab.nodes:
            tags = self.lab.docker(node, "image", "inspect", "--format", "{{json .RepoTags}}", "busybox:local").stdout
            self.assertIn("busybox:local", tags, node.name)

    def test_volume_data_is_where_the_node_says(self) -> None:
        name = f"vol-{uuid.uuid4().hex[:8]}"
        node = self.lab.node(2)
        self.lab.docker(node, "volume", "create", name)
        self.addCleanup(self.lab.docker, node, "volume", "rm", "-f", name, check=False)
        self.lab.docker(node, "run", "--rm", "-v", f"{name}:/data", "busybox:local", "sh", "-c",
                        "echo written > /data/file")
        self.assertEqual((node.volume_path(name) / "file").read_text(), "written\n")

    def test_global_service_runs_a_task_on_every_node(self) -> None:
        name = f"global-{uuid.uuid4().hex[:8]}"
        self.lab.docker(1, "service", "create", "--detach", "--no-resolve-image", "--mode", "global",
                        "--name", name, "busybox:local", "sleep", "3600")
        self.addCleanup(self.lab.docker, 1, "service", "rm", name, check=False)

        def running_on() -> set[str]:
            tasks = self.lab.docker(2, "service", "ps", name, "--filter", "desired-state=running",
                                    "--format", "{{.Node}} {{.CurrentState}}").stdout
            return {line.split()[0] for line in tasks.splitlines() if " Running " in f"{line} "}

        self.lab.wait_for(lambda: running_on() == {"node1", "node2", "node3"}, timeout=60,
                          what="a running task on every node")
        for node in self.lab.nodes:  # each node really runs its own container
            ids = self.lab.docker(node, "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={name}").stdout
            self.assertEqual(len(ids.split()), 1, node.name)

    def test_partition_cuts_a_node_off_and_heal_restores_it(self) -> None:
        node = self.lab.node(3)
        port = self.lab.agent_port if self.lab.agents else 7946  # swarm gossip listens on every node
        self.assertTrue(tcp_reachable(node.ip, port))
        self.lab.partition(node)
        self.addCleanup(self.lab.heal, node)
        self.assertFalse(tcp_reachable(node.ip, port))
        self.assertTrue(tcp_reachable(self.lab.node(2).ip, port))
        self.lab.heal(node)
        self.lab.wait_for(lambda: tcp_reachable(node.ip, port), timeout=10, what="node3 reachable again")

    # --- agents ---------------------------------------------------------------------

    def test_every_agent_answers_ping_on_the_same_port(self) -> None:
        self.require_agents()
        for node in self.lab.nodes:
            self.assertEqual(self.lab.agent_status(node), 204, node.name)
            self.assertEqual(self.lab.agent_url(node), f"https://{node.ip}:9001")

    def test_kill_agent_makes_it_unreachable_until_started_again(self) -> None:
        self.require_agents()
        old = self.lab.node(3).agent
        assert old is not None
        self.lab.kill_agent(3)
        self.assertFalse(_pid_alive(old.pid))
        self.assertIsNone(self.lab.node(3).agent)
        self.assertIsNone(self.lab.agent_status(3))
        self.assertEqual(self.lab.agent_status(2), 204)
        self.assertEqual(old.process.returncode if old.process else -9, -signal.SIGKILL)
        self.lab.start_agent(3)
        self.assertEqual(self.lab.agent_status(3), 204)

    def test_stop_agent_lets_it_exit_by_itself(self) -> None:
        self.require_agents()
        old = self.lab.node(2).agent
        assert old is not None
        self.assertTrue(self.lab.stop_agent(2), "the agent needed SIGKILL after SIGTERM")
        self.assertFalse(_pid_alive(old.pid))
        self.assertIsNone(self.lab.agent_status(2))
        self.lab.start_agent(2)
        self.assertEqual(self.lab.agent_status(2), 204)

    def test_restart_agent_gives_a_new_process_that_answers(self) -> None:
        self.require_agents()
        old = self.lab.node(1).agent
        assert old is not None
        new = self.lab.restart_agent(1)
        self.assertNotEqual(new.pid, old.pid)
        self.assertFalse(_pid_alive(old.pid))
        self.assertEqual(self.lab.agent_status(1), 204)

    def test_partition_cuts_the_agent_off_without_stopping_it(self) -> None:
        self.require_agents()
        self.lab.partition(2)
        self.addCleanup(self.lab.heal, 2)
        self.assertIsNone(self.lab.agent_status(2, timeout=1))
        agent = self.lab.node(2).agent
        self.assertTrue(agent is not None and agent.running)
        self.assertEqual(self.lab.agent_status(1), 204)
        self.lab.heal(2)
        self.lab.wait_for(lambda: self.lab.agent_status(2) == 204, timeout=10, what="node2's agent after heal")

    def test_real_docker_cli_and_docker_py_through_an_agent(self) -> None:
        self.require_agents()
        listing = self.lab.agent_docker(2, "node", "ls", "--format", "{{.Hostname}}").stdout
        self.assertEqual(sorted(listing.split()), ["node1", "node2", "node3"])
        config = self.lab.write_docker_config()
        self.assertIn("X-PortainerAgent-Signature", (config / "config.json").read_text())
        version = self.lab.agent_request(1, "/version")
        assert version is not None
        self.assertEqual((version.status, version.json()["ApiVersion"]), (200, "1.41"))
        unsigned = self.lab.agent_request(1, "/version", signed=False)
        self.assertTrue(unsigned is not None and unsigned.status == 403, unsigned)
        client = self.lab.signed_client(3)
        self.addCleanup(client.close)
        self.assertTrue(client.ping())
        # /info is a Swarm-manager operation (spec §6.1): a manager answers, whichever agent is asked
        self.assertTrue(client.info()["Swarm"]["ControlAvailable"])

    def test_state_record_matches_the_running_lab(self) -> None:
        loaded = Lab.load(self.lab.prefix)
        for mine, theirs in zip(self.lab.nodes, loaded.nodes):
            self.assertEqual(theirs.name, mine.name)
            self.assertTrue(theirs.daemon is not None and theirs.daemon.running)
            if self.lab.agents:
                self.assertEqual(theirs.agent.pid if theirs.agent else None, mine.agent.pid if mine.agent else None)


class LabLifecycleTests(SynchronousTestCase):
    """Bring-up and teardown edge cases, each with its own small lab."""

    def setUp(self) -> None:
        require(Need.ROOT, Need.DOCKERD)

    def test_down_leaves_nothing_behind(self) -> None:
        lab = Lab(prefix="palt2", subnet="10.77.51.0/24", nodes_count=2, managers=1, agents=agent_available())
        self.addCleanup(lab.down)
        lab.up()
        lab.docker(1, "service", "create", "--detach", "--no-resolve-image", "--mode", "global", "--name", "g",
                   "busybox:local", "sleep", "3600")
        lab.wait_for(lambda: all(lab.docker(n, "ps", "-q").stdout.strip() for n in lab.nodes), timeout=60,
                     what="a container on each node")
        self.assertTrue(what_remains("palt2"))
        remaining = lab.down()
        self.assertFalse(remaining, remaining.describe())
        self.assertEqual(what_remains("palt2"), [])

    def test_up_cleans_what_a_crashed_run_left(self) -> None:
        crashed = Lab(prefix="palt3", subnet="10.77.52.0/24", nodes_count=2, managers=1, agents=False)
        self.addCleanup(crashed.down)
        crashed.up()
        old_pids = [node.daemon.pid for node in crashed.nodes if node.daemon]
        crashed.release()  # the process "dies": nothing torn down, lock gone
        lab = Lab(prefix="palt3", subnet="10.77.52.0/24", nodes_count=2, managers=1, agents=False)
        self.addCleanup(lab.down)
        lab.up()
        self.assertFalse(any(_pid_alive(pid) for pid in old_pids))
        self.assertEqual(lab.ready_nodes(), {"node1", "node2"})
        lab.down()
        self.assertEqual(what_remains("palt3"), [])

    def test_up_refuses_when_leftovers_cannot_be_removed(self) -> None:
        stubborn = Leftovers(links=("palt4br0",))
        self.patch(harness, "leftovers", lambda prefix: stubborn)
        self.patch(harness, "clean", lambda prefix: stubborn)
        lab = Lab(prefix="palt4", subnet="10.77.53.0/24")
        error = self.assertRaises(LabError, lab.up)
        self.assertIn("palt4br0", str(error))
        self.assertIsNone(lab._lock)  # the lock was given back
        self.assertFalse(lab.root.exists())

    def test_a_prefix_in_use_by_a_live_run_is_not_touched(self) -> None:
        owner = Lab(prefix="palt4", subnet="10.77.53.0/24")
        owner._acquire_lock()
        self.addCleanup(owner._release_lock, True)
        intruder = Lab(prefix="palt4", subnet="10.77.53.0/24", lock_timeout=0)
        error = self.assertRaises(LabError, intruder.up)
        self.assertIn("in use by pid", str(error))

    def test_subnet_already_in_use_is_refused(self) -> None:
        first = Lab(prefix="palt5", subnet="10.77.54.0/24", nodes_count=1, managers=1, agents=False)
        self.addCleanup(first.down)
        first.up()
        second = Lab(prefix="palt6", subnet="10.77.54.0/24", nodes_count=1, managers=1, agents=False)
        self.addCleanup(second.down)
        error = self.assertRaises(LabError, second.up)
        self.assertIn("already used by palt5br0", str(error))
        self.assertEqual(what_remains("palt6"), [])


class CommandLineLabTests(SynchronousTestCase):
    """``portainer-agent-lab up/status/down`` as a user runs them, in separate processes."""

    prefix = "palt7"

    def setUp(self) -> None:
        require(Need.ROOT, Need.DOCKERD)
        self.addCleanup(self.command, "down")

    def command(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
        return subprocess.run([sys.executable, "-m", "portainer_agent.lab", "--prefix", self.prefix, *args],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd="/")

    def test_up_status_down(self) -> None:
        up = self.command("up", "--nodes", "2", "--managers", "1", "--subnet", "10.77.56.0/24",
                          *([] if agent_available() else ["--no-agents"]))
        self.assertEqual(up.returncode, 0, up.stderr)
        for expected in ("node1", "node2", "manager", "worker", "https://10.77.56.11:9001",
                         f"/tmp/pa-lab-{self.prefix}/node2/docker.sock"):
            self.assertIn(expected, up.stdout)
        lab = Lab.load(self.prefix)  # the lab outlived the command
        self.assertTrue(all(node.daemon and node.daemon.running for node in lab.nodes))
        if agent_available():
            self.assertEqual([lab.agent_status(node) for node in lab.nodes], [204, 204])
            example = next(line.strip() for line in up.stdout.splitlines() if "--tls node ls" in line)
            self.assertTrue(example.startswith(f"DOCKER_CONFIG=/tmp/pa-lab-{self.prefix}/docker-config docker -H tcp://"))
            assignment, *docker = shlex.split(example)
            env = dict(os.environ, DOCKER_CONFIG=assignment.split("=", 1)[1])
            listing = subprocess.run(docker, capture_output=True, text=True, env=env, timeout=60)
            self.assertEqual(listing.returncode, 0, listing.stderr)
            self.assertIn("node2", listing.stdout)

        again = self.command("up")
        self.assertEqual(again.returncode, 1)
        self.assertIn("already up", again.stderr)

        status = self.command("status")
        self.assertEqual(status.returncode, 0, status.stderr)
        self.assertIn("Ready", status.stdout)

        down = self.command("down")
        self.assertEqual(down.returncode, 0, down.stderr)
        self.assertEqual(what_remains(self.prefix), [])
        self.assertEqual(self.command("status").returncode, 1)
        self.assertFalse(state_path(self.prefix).exists())

    def test_interrupted_up_tears_down_what_it_built(self) -> None:
        env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
        process = subprocess.Popen(
            [sys.executable, "-m", "portainer_agent.lab", "--prefix", self.prefix, "up", "--nodes", "2",
             "--subnet", "10.77.56.0/24", "--no-agents"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")
        self.addCleanup(lambda: None if process.poll() is not None else process.kill())
        def starting() -> bool:  # some dockerd is starting
            self.assertIsNone(process.poll(), "up finished before it could be interrupted")
            return bool(leftovers(self.prefix).processes)

        wait_for(starting, 60, "a dockerd of the lab to start", interval=0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 1, stderr)
        self.assertIn("interrupted", stderr)
        self.assertEqual(what_remains(self.prefix), [])
