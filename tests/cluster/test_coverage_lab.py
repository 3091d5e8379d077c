"""Nothing missing in silence, on a real 3-node Swarm (node1 and node2 managers, node3 a worker).

A node whose agent is dead stays Ready in the Swarm, and its containers are still there: every
aggregated list must name it for as long as it lasts (before and after membership declares the
agent dead), and the lists answered right after every agent restarts must name what they miss or
say that the node list is not known yet.
"""
from __future__ import annotations

import json
import time
from typing import Any, ClassVar

from tests.cluster import test_routing_lab as routing

UNREACHABLE = "x-portaineragent-unreachable-nodes"
NODE_LIST = "x-portaineragent-node-list"
NODES = {"node1", "node2", "node3"}


def named(response: Any) -> set[str]:
    value = response.headers.get(UNREACHABLE) or ""
    return {name.strip() for name in value.split(",") if name.strip()}


class CoverageLabTests(routing.RoutingBase):
    lab_prefix, lab_subnet = "pahf", "10.77.102.0/24"
    lab_options: ClassVar[dict[str, Any]] = {"secret": "coverage-lab-secret",
                                             "agent_args": ("--aggregate-timeout", "4s", "--peer-timeout", "2s")}

    def setUp(self) -> Any:
        result = super().setUp()
        for node in sorted(NODES):
            self.ensure_agent_running(node)
        self.ensure_cluster()
        return result

    def members_seen_by(self, node: str) -> set[str]:
        response = self.lab.agent_request(node, "/agents")
        if response is None or response.status != 200:
            return set()
        return {m["NodeName"] for m in json.loads(response.body)}

    def assert_named_throughout(self, dead: str, via: str, seconds: float) -> int:
        """Lists through ``via`` name ``dead`` on every poll for ``seconds`` (and at least until
        membership has declared it dead, plus three more polls); returns the number of polls."""
        declared_at: float | None = None
        polls = after = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds or after < 3:
            self.assertLess(time.monotonic() - started, seconds + 60, "membership never declared the agent dead")
            response = self.request(via, "/containers/json")
            self.assertEqual(response.status, 200, response.body[:300])
            items = json.loads(response.body)
            self.assertNotIn(dead, routing.node_names(items))
            self.assertEqual(named(response), {dead}, f"poll {polls} through {via}: {response.headers}")
            polls += 1
            if declared_at is None and dead not in self.members_seen_by(via):
                declared_at = time.monotonic()
            elif declared_at is not None:
                after += 1
            time.sleep(0.3)  # pacing between polls; not a wait for a condition
        print(f"\n{dead} named in {polls} lists through {via} over {time.monotonic() - started:.1f}s "
              f"(membership declared it dead after {(declared_at or 0) - started:.1f}s)")
        return polls

    def test_a_killed_worker_agent_is_named_for_as_long_as_it_is_dead(self) -> None:
        self.lab.kill_agent("node3")
        self.addCleanup(self.ensure_agent_running, "node3")
        self.assertEqual(self.lab.docker("node1", "node", "inspect", "node3", "--format",
                                         "{{.Status.State}}").stdout.strip(), "ready")
        self.assert_named_throughout("node3", "node1", 6.0)
        volumes = self.json_of("node2", "/volumes")
        self.assertTrue(any("node3" in warning and "no agent answering" in warning
                            for warning in volumes["Warnings"] or []), volumes["Warnings"])
        log = self.lab.node("node1").agent_log.read_text()
        self.assertIn("no agent answering on node node3", log)
        self.lab.start_agent("node3", self.lab.node("node3").agent_args)
        self.wait_for(lambda: not named(self.request("node1", "/containers/json")), 60,
                      "node3 no longer named once its agent is back")

    def test_a_killed_manager_agent_is_named_by_the_worker(self) -> None:
        self.lab.kill_agent("node2")
        self.addCleanup(self.ensure_agent_running, "node2")
        # the worker reads the node list from the leader's agent (node1)
        self.assert_named_throughout("node2", "node3", 6.0)
        volumes = self.json_of("node3", "/volumes")
        self.assertTrue(any("node2" in warning for warning in volumes["Warnings"] or []), volumes["Warnings"])

    def test_right_after_every_agent_restarts_no_list_is_a_silent_partial(self) -> None:
        for node in sorted(NODES):
            self.lab.stop_agent(node)
        for node in sorted(NODES):
            self.lab.start_agent(node, self.lab.node(node).agent_args, wait=False)
        self.addCleanup(lambda: [self.ensure_agent_running(n) for n in sorted(NODES)])
        # polled from the first moment each agent answers, before membership has converged
        seen: list[tuple[str, set[str], set[str], str | None]] = []
        started = time.monotonic()
        first: float | None = None
        while first is None or time.monotonic() - first < 8:
            self.assertLess(time.monotonic() - started, 90, "no agent answered after the restart")
            for node in sorted(NODES):
                response = self.lab.agent_request(node, "/containers/json", timeout=10)
                if response is None:
                    continue  # not listening yet
                first = first if first is not None else time.monotonic()
                self.assertEqual(response.status, 200, response.body[:300])
                listed = set(routing.node_names(json.loads(response.body)))
                unknown = response.headers.get(NODE_LIST)
                seen.append((node, listed, named(response), unknown))
                # every node is listed, or named, or the answer says the node list is unknown
                self.assertTrue(listed | named(response) == NODES or unknown == "unknown",
                                f"a silent partial list through {node}: {seen[-1]}")
        partial = [s for s in seen if s[1] != NODES]
        print(f"\n{len(seen)} lists after the restart, {len(partial)} partial (each named what it missed "
              f"or said the node list was unknown): {partial[:6]}")
