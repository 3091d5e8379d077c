"""Every request released, end to end, on a real 3-node Swarm (node1, node2 managers, node3
the worker), through the agents as Portainer would reach them:

* 1,000 execs and attaches, local and remote, after which each agent's RSS, descriptors and
  in-flight count return to where they were after a warm-up round;
* a frozen (SIGSTOP) leader agent does not hold a manager operation: the worker's agent
  answers ``GET /nodes`` from the other manager in under 10 s;
* a client that cancels an attach stream (TCP closed mid-stream, the container printing
  nothing and never exiting) gets its connection closed by the agent: no CLOSE-WAIT left.

Plus the lab's own chaos primitives (freeze/thaw, demote/promote, the /proc and /metrics
readers) that these tests and ``bench/soak.py`` use.
"""
from __future__ import annotations

import json
import subprocess
import time
import unittest
from typing import Any, Callable, ClassVar

from portainer_agent.lab.client import TARGET, AgentConnection, HijackedStream, docker_payload, hijack
from portainer_agent.lab.harness import Lab, LabError
from portainer_agent.lab.testing import SynchronousLabTestCase

METRICS_PORT = 9003
INFLIGHT = "portainer_agent_inflight_requests"
#: How long an agent may take to let go of a connection or a descriptor.
RELEASE_DEADLINE = 30.0
#: RSS an agent may still hold after 1,000 execs and attaches, over its post-warm-up level
#: (the leak this guards against is ~12 kB per exec: 12 MB over the run). A fixed agent still
#: grows a few MB over its first couple of thousand streams (allocator arenas, caches filling)
#: and then stays flat (measured: +3.6, +1.4, +0.9, +0.0, +0.0 MB per 600 streams), so the
#: second half of the run is held to a tighter bound than the whole.
RSS_SLACK = 8 << 20
#: RSS the second 500 streams may add (a 12 kB-per-stream leak adds 6 MB there; a settled
#: agent still takes the odd allocator step of 1-2 MB, then stays there).
RSS_SLACK_SECOND_HALF = 4 << 20
#: Descriptors an agent may hold over its baseline: a few pooled, kept-alive connections to
#: another agent or to Docker, never one per stream.
FD_SLACK = 4
FAILOVER_BOUND = 10.0


def poll(condition: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """The first truthy value of ``condition`` within ``timeout``, else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class LifecycleLabTests(SynchronousLabTestCase):
    lab_prefix, lab_subnet = "pahs", "10.77.105.0/24"
    lab_nodes, lab_managers = 3, 2
    lab_options: ClassVar[dict[str, Any]] = {"metrics_port": METRICS_PORT}
    lab: ClassVar[Lab]
    containers: ClassVar[dict[str, str]] = {}
    worker = "node3"

    def setUp(self) -> Any:
        result = super().setUp()
        self.require_agents()
        for node in ("node1", "node2", "node3"):
            self.ensure_agent_running(node)
        lab = self.lab

        def converged() -> bool:
            for node in ("node1", "node2", "node3"):
                response = lab.agent_request(node, "/agents")
                if response is None or response.status != 200 or len(json.loads(response.body)) != 3:
                    return False
            return True

        Lab.wait_for(converged, 60, "every agent to list 3 members")
        for node in ("node1", "node3"):
            if node not in self.containers:
                # Prints one line at start (what a logs-only attach reads), then nothing, forever.
                self.containers[node] = lab.docker(
                    node, "run", "-d", "-i", "busybox:local", "sh", "-c", "echo hello; exec sleep 1000000",
                ).stdout.strip()
        return result

    # -- helpers -------------------------------------------------------------------------

    def connection(self, via: str) -> AgentConnection:
        connection = AgentConnection(self.lab.node(via).ip, self.lab.agent_port, self.lab.signed_headers(),
                                     timeout=30)
        self.addCleanup(connection.close)
        return connection

    def stream(self, via: str, path: str, target: str, body: Any = None) -> HijackedStream:
        headers = {**self.lab.signed_headers(), TARGET: target}
        return hijack(self.lab.node(via).ip, self.lab.agent_port, path, headers, body, timeout=30)

    def exec_once(self, connection: AgentConnection, via: str, target: str) -> None:
        created = connection.request("POST", f"/containers/{self.containers[target]}/exec", {
            "AttachStdout": True, "AttachStderr": True, "Tty": False, "Cmd": ["echo", "exec-ok"]},
            headers={TARGET: target})
        self.assertEqual(created.status, 201, created.body[:300])
        exec_id = created.json()["Id"]
        stream = self.stream(via, f"/exec/{exec_id}/start", target, {"Detach": False, "Tty": False})
        try:
            self.assertEqual(docker_payload(stream.read_to_end()), b"exec-ok\n")
        finally:
            stream.close()

    def attach_once(self, via: str, target: str) -> None:
        # logs=1&stream=0: Docker writes what the container printed and ends the stream.
        stream = self.stream(via, f"/containers/{self.containers[target]}/attach?logs=1&stream=0&stdout=1&stderr=1",
                             target)
        try:
            self.assertEqual(docker_payload(stream.read_to_end()), b"hello\n")
        finally:
            stream.close()

    def readings(self) -> dict[str, tuple[int, int]]:
        return {node: (self.lab.agent_rss_bytes(node), self.lab.agent_fd_count(node))
                for node in ("node1", "node2", "node3")}

    def inflight(self, node: str) -> float | None:
        metrics = self.lab.agent_metrics(node)
        if metrics is None or INFLIGHT not in metrics.names():
            return None
        return metrics.total(INFLIGHT)

    def settled_inflight(self, node: str) -> float | None:
        """The node's in-flight gauge once it reads 0 (or at the deadline); None without one."""
        poll(lambda: self.inflight(node) in (0, None), RELEASE_DEADLINE)
        return self.inflight(node)

    def peer_sockets(self, node: str, peer_port: int) -> list[str]:
        """States of the sockets in the node's netns whose peer is the root namespace's
        ``peer_port`` (the lab client's end of one connection)."""
        peer = f"{self.lab.gateway}:{peer_port}"
        result = subprocess.run(["ip", "netns", "exec", self.lab.node(node).netns, "ss", "-Htan"],
                                capture_output=True, text=True, timeout=30, check=True)
        return [line.split()[0] for line in result.stdout.splitlines()
                if len(line.split()) >= 5 and line.split()[4] == peer]

    # -- (a) execs and attaches ------------------------------------------------------------

    def test_thousand_execs_and_attaches_return_rss_descriptors_and_inflight_to_baseline(self) -> None:
        via = self.worker
        connection = self.connection(via)
        plan = [(kind, target) for kind in ("exec", "attach") for target in (via, "node1")]

        def run(rounds: int) -> None:
            for _ in range(rounds):
                for kind, target in plan:
                    if kind == "exec":
                        self.exec_once(connection, via, target)
                    else:
                        self.attach_once(via, target)

        # A short warm-up (pools, TLS state, lazily imported modules). A fixed agent's RSS
        # still grows a few MB over its first ~1,500 streams (the allocator's working set:
        # tracemalloc shows Python's own memory flat long before) and then stays flat; the
        # 30-minute soak (bench/soak.py) is the evidence for that. Here the bounds are set to
        # catch the leak this guards against (~12 kB per stream: 12 MB over the run).
        run(60)  # 240 streams
        connection.close()
        baseline = self.readings()
        started = time.monotonic()
        run(125)  # 4 x 250 = 1,000: exec and attach, on node3 itself and on node1 through it
        halfway = self.readings()
        run(125)
        elapsed = time.monotonic() - started
        connection.close()
        slack = {node: FD_SLACK for node in baseline}

        def descriptors_back() -> bool:
            return all(self.lab.agent_fd_count(node) <= baseline[node][1] + slack[node] for node in baseline)

        poll(descriptors_back, RELEASE_DEADLINE)
        final = self.readings()
        inflight = {node: self.settled_inflight(node) for node in baseline}
        summary = ", ".join(
            f"{node}: RSS {baseline[node][0] / 2**20:.1f} -> {halfway[node][0] / 2**20:.1f} -> "
            f"{final[node][0] / 2**20:.1f} MB, "
            f"fds {baseline[node][1]} -> {final[node][1]}, in flight {inflight[node]}" for node in baseline)
        print(f"\n1,000 execs and attaches in {elapsed:.1f}s; {summary}")
        problems = []
        for node in baseline:
            if final[node][1] > baseline[node][1] + slack[node]:
                problems.append(f"{node}'s agent holds {final[node][1]} descriptors, baseline {baseline[node][1]} "
                                f"(+{slack[node]} allowed) {RELEASE_DEADLINE}s after the last stream")
            grown = final[node][0] - baseline[node][0]
            if grown > RSS_SLACK:
                problems.append(f"{node}'s agent RSS grew by {grown / 1024:.0f} kB over 1,000 streams "
                                f"(~{grown / 1000:.0f} B each; {RSS_SLACK >> 20} MB allowed)")
            late = final[node][0] - halfway[node][0]
            if late > RSS_SLACK_SECOND_HALF:
                problems.append(f"{node}'s agent RSS still grew by {late / 1024:.0f} kB over the last 500 streams "
                                f"({RSS_SLACK_SECOND_HALF >> 20} MB allowed): not flat")
            if inflight[node]:
                problems.append(f"{node}'s agent still counts {inflight[node]:g} requests in flight")
        if problems:
            self.fail("; ".join(problems) + f" [{summary}]")
        if any(value is None for value in inflight.values()):
            raise unittest.SkipTest(f"RSS and descriptors came back ({summary}), but the agents export no "
                                    f"{INFLIGHT} gauge on /metrics, so the in-flight count was not checked")

    # -- (b) a frozen leader ---------------------------------------------------------------

    def test_frozen_leader_agent_manager_operation_answered_by_the_other_manager(self) -> None:
        leader = self.lab.leader()
        self.assertIn(leader, ("node1", "node2"))
        connection = self.connection(self.worker)
        warm = connection.request("GET", "/nodes")  # the worker's agent has its peers' connections up
        self.assertEqual(warm.status, 200, warm.body[:300])
        self.lab.freeze_agent(leader)
        self.addCleanup(self.lab.thaw_agent, leader)
        started = time.monotonic()
        try:
            response = connection.request("GET", "/nodes", timeout=40)
        except OSError as error:
            self.fail(f"GET /nodes through {self.worker}'s agent, with {leader}'s (the leader's) agent frozen: "
                      f"no answer after {time.monotonic() - started:.1f}s ({error!r})")
        elapsed = time.monotonic() - started
        print(f"\nGET /nodes with the leader's agent ({leader}) frozen: {response.status} in {elapsed:.2f}s")
        self.assertEqual(response.status, 200, response.body[:300])
        self.assertEqual(len(response.json()), 3)
        self.assertLess(elapsed, FAILOVER_BOUND,
                        f"the manager operation waited {elapsed:.1f}s for a frozen leader agent")

    # -- (c) a cancelled attach -------------------------------------------------------------

    def assert_cancelled_attach_released(self, target: str) -> None:
        via = self.worker
        silent = self.lab.docker(target, "run", "-d", "busybox:local", "sleep", "1000000").stdout.strip()
        self.addCleanup(self.lab.docker, target, "rm", "-f", silent, check=False)
        self.attach_once(via, via)  # warm-up
        nodes = sorted({via, target})
        baseline = {node: self.lab.agent_fd_count(node) for node in nodes}
        # docker-py's attach(stream=True): no stdin, so the client's close reaches Docker only
        # if the agent closes its attach connection.
        stream = self.stream(via, f"/containers/{silent}/attach?logs=1&stream=1&stdout=1&stderr=1", target)
        port = stream.local_port
        self.assertEqual(self.peer_sockets(via, port), ["ESTAB"])
        poll(lambda: False, 0.5)  # mid-stream: the attach is up on both sides, nothing printed
        stream.cancel()
        left = poll(lambda: not any(state in ("CLOSE-WAIT", "ESTAB") for state in self.peer_sockets(via, port))
                    or None, RELEASE_DEADLINE)
        states = self.peer_sockets(via, port)
        fds_back = poll(lambda: all(self.lab.agent_fd_count(n) <= baseline[n] + 1 for n in nodes), RELEASE_DEADLINE)
        fds = {node: self.lab.agent_fd_count(node) for node in nodes}
        print(f"\ncancelled attach to {target} via {via}: client socket states {states or 'gone'}, "
              f"fds {baseline} -> {fds}")
        self.assertTrue(left, f"{RELEASE_DEADLINE}s after the client closed TCP, {via}'s agent still has the "
                              f"connection from port {port}: {states}")
        self.assertTrue(fds_back, f"{RELEASE_DEADLINE}s after the client closed TCP, agents hold {fds} descriptors, "
                                  f"baseline {baseline} (the Docker attach connection kept open?)")

    def test_cancelled_attach_local_is_closed_by_the_agent(self) -> None:
        self.assert_cancelled_attach_released(self.worker)

    def test_cancelled_attach_remote_is_closed_by_the_agent(self) -> None:
        self.assert_cancelled_attach_released("node1")

    # -- the lab's chaos primitives ----------------------------------------------------------

    def test_lab_freeze_accepts_tcp_but_answers_nothing_then_thaw_answers(self) -> None:
        node = "node2"
        self.lab.freeze_agent(node)
        self.addCleanup(self.lab.thaw_agent, node)
        self.assertTrue(self.lab.agent_frozen(node))
        self.assertIsNone(self.lab.agent_status(node, timeout=1.0))
        self.lab.thaw_agent(node)
        self.assertFalse(self.lab.agent_frozen(node))
        self.lab.wait_agent_ready(node)

    def test_lab_demote_the_leader_and_promote_it_back(self) -> None:
        leader = self.lab.demote_leader()

        def restore() -> None:
            if self.role_of(leader) != "manager":
                self.lab.promote(leader)

        self.addCleanup(restore)
        new_leader = poll(lambda: self.safe_leader(exclude=leader), 60)
        self.assertIn(new_leader, ("node1", "node2"))
        self.assertNotEqual(new_leader, leader)
        self.assertEqual(self.role_of(leader), "worker")
        self.lab.promote(leader)
        self.assertEqual(self.role_of(leader), "manager")

    def role_of(self, node: str) -> str:
        manager = next(n for n in ("node1", "node2") if self.lab.docker(
            n, "node", "ls", "-q", check=False, timeout=30).returncode == 0)
        return self.lab.docker(manager, "node", "inspect", node, "--format", "{{.Spec.Role}}").stdout.strip()

    def safe_leader(self, exclude: str) -> str | None:
        try:
            leader = self.lab.leader()
        except (LabError, subprocess.SubprocessError):
            return None
        return leader if leader != exclude else None

    def test_lab_reads_rss_descriptors_and_metrics(self) -> None:
        for node in ("node1", "node2", "node3"):
            self.assertGreater(self.lab.agent_rss_bytes(node), 10 << 20)
            self.assertGreater(self.lab.agent_fd_count(node), 3)
            metrics = self.lab.agent_metrics(node)
            self.assertIsNotNone(metrics, f"{node}'s agent serves no /metrics on port {METRICS_PORT}")
            assert metrics is not None
            self.assertEqual(metrics.get("portainer_agent_cluster_members", state="alive"), 3.0)
