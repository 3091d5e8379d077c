"""The pure parts of "nothing missing in silence": the Swarm node list, which nodes an
aggregate names and why, and the reasons given for failed legs."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from portainer_agent.cluster.member import Member
from portainer_agent.cluster.swarm_nodes import (
    InvalidNodeList,
    NodeListState,
    SwarmNode,
    absence_reason,
    node_list_sources,
    parse_node_list,
    uncovered_nodes,
    unknown_list_warning,
)
from portainer_agent.toolbox.whole_body import BodyTooLarge
from portainer_agent.proxy.member_gone import MemberGone
from portainer_agent.proxy.merge import NodeAnswer, NodeFailure, merge_answers
from portainer_agent.proxy.reasons import upstream_failure_reason


def docker_node(name: str, state: str = "ready", availability: str = "active", role: str = "worker",
                node_id: str | None = None) -> dict[str, Any]:
    """One item of Docker's ``GET /nodes`` answer (the fields that matter, plus some that do not)."""
    return {"ID": node_id or f"id-{name}", "Version": {"Index": 9},
            "Spec": {"Labels": {}, "Role": role, "Availability": availability},
            "Description": {"Hostname": name, "Platform": {"Architecture": "x86_64", "OS": "linux"},
                            "Engine": {"EngineVersion": "20.10.24"}},
            "Status": {"State": state, "Addr": "10.0.0.9"}}


def nodes_body(*nodes: dict[str, Any]) -> bytes:
    return json.dumps(list(nodes)).encode()


def member(name: str, role: str = "worker", leader: bool = False) -> Member:
    return Member(node_name=name, node_id=name, role=role, is_leader=leader, api_addr="10.0.0.1", api_port=9001,
                  cluster_addr=name, cluster_port=9002, version="1", cert_fingerprint="00")


class NodeListParsingTests(SynchronousTestCase):
    def test_dockers_node_list_becomes_one_record_per_node_sorted_by_name(self) -> None:
        nodes = parse_node_list(nodes_body(docker_node("node2", role="manager"),
                                           docker_node("node1", "down", "drain")))
        self.assertEqual(nodes, (SwarmNode("node1", "down", "drain", "worker", "id-node1"),
                                 SwarmNode("node2", "ready", "active", "manager", "id-node2")))

    def test_a_node_that_rejoined_is_one_name_with_its_best_state(self) -> None:
        nodes = parse_node_list(nodes_body(docker_node("node3", "down", node_id="old"),
                                           docker_node("node3", "ready", node_id="new"),
                                           docker_node("node3", "down", node_id="older")))
        self.assertEqual([(n.name, n.state, n.node_id) for n in nodes], [("node3", "ready", "new")])

    def test_missing_fields_take_dockers_defaults_and_nameless_nodes_are_skipped(self) -> None:
        nodes = parse_node_list(b'[{"ID": "x", "Description": {"Hostname": "n"}}, {"ID": "y"}]')
        self.assertEqual(nodes, (SwarmNode("n", "unknown", "active", "worker", "x"),))

    def test_anything_but_a_node_list_is_refused(self) -> None:
        for body in (b'{"message": "This node is not a swarm manager."}', b"[", b'[{"Status": 3}]'):
            self.assertRaises(InvalidNodeList, parse_node_list, body)


class CoverageTests(SynchronousTestCase):
    def test_every_swarm_node_without_a_live_agent_is_named_whatever_its_state(self) -> None:
        nodes = parse_node_list(nodes_body(docker_node("node1"), docker_node("node2"),
                                           docker_node("node3", "down"), docker_node("node4", availability="drain"),
                                           docker_node("node5", "disconnected", "pause")))
        self.assertEqual(uncovered_nodes(nodes, ["node1", "node2", "node9"]), [
            ("node3", "no agent answering on node node3 (node down in the Swarm)"),
            ("node4", "no agent answering on node node4 (node ready in the Swarm, drained)"),
            ("node5", "no agent answering on node node5 (node disconnected from the Swarm, paused)"),
        ])

    def test_nothing_is_named_when_every_node_has_an_agent(self) -> None:
        nodes = parse_node_list(nodes_body(docker_node("node1"), docker_node("node2")))
        self.assertEqual(uncovered_nodes(nodes, ["node2", "node1"]), [])

    def test_an_unusual_state_is_still_a_reason(self) -> None:
        self.assertEqual(absence_reason(SwarmNode("n", "", "active", "worker")),
                         "no agent answering on node n (node state unknown in the Swarm)")

    def test_the_list_is_read_from_this_manager_first_then_other_managers_leader_first(self) -> None:
        members = [member("a", "manager"), member("b", "manager", leader=True), member("c"), member("d", "manager")]
        self.assertEqual([m.node_name for m in node_list_sources(members, "d")], ["d", "b", "a"])
        self.assertEqual([m.node_name for m in node_list_sources(members, "c")], ["b", "a", "d"])
        self.assertEqual(node_list_sources([member("c")], "c"), [])

    def test_an_unknown_list_has_a_reason(self) -> None:
        self.assertEqual(NodeListState().unknown_reason(), "not read yet")
        self.assertEqual(NodeListState(error="boom").unknown_reason(), "boom")
        self.assertIn("may be missing", unknown_list_warning("boom"))

    def test_volumes_carry_the_notes_after_the_nodes_warnings(self) -> None:
        body, _ = merge_answers(b"/volumes", [NodeAnswer("n1", b'{"Volumes": [], "Warnings": ["w"]}')],
                                [NodeFailure("n2", "why")], ["note"])
        self.assertEqual(json.loads(body)["Warnings"],
                         ["w", "node n2 is unreachable, its volumes are missing: why", "note"])


class ReasonTests(SynchronousTestCase):
    def test_timeouts_and_cancellations_say_what_happened(self) -> None:
        self.assertEqual(upstream_failure_reason(Failure(TimeoutError()), 10.0), "no answer within 10s")
        self.assertEqual(upstream_failure_reason(Failure(CancelledError()), 2.5), "no answer within 2.5s")
        self.assertEqual(upstream_failure_reason(Failure(CancelledError())), "no answer in time")

    def test_a_dead_member_and_a_large_answer_name_the_node(self) -> None:
        self.assertEqual(upstream_failure_reason(Failure(MemberGone("node3"))),
                         "the agent on node node3 was declared dead by cluster membership")
        reason = upstream_failure_reason(Failure(BodyTooLarge("node node2", 1024)))
        self.assertIn("node2", reason)
        self.assertIn("1024 bytes", reason)

    def test_connection_failures_wrapped_by_the_client_are_unwrapped(self) -> None:
        self.assertEqual(upstream_failure_reason(Failure(ConnectionRefusedError())), "connection refused")
        self.assertEqual(upstream_failure_reason(Failure(ResponseNeverReceived([Failure(ConnectionDone())]))),
                         "connection closed before any answer")
        self.assertEqual(upstream_failure_reason(Failure(ResponseFailed([Failure(ConnectionDone())]))),
                         "connection closed while reading the answer")

    def test_a_reason_is_never_empty(self) -> None:
        class Quiet(Exception):
            pass

        self.assertEqual(upstream_failure_reason(Failure(Quiet())), "Quiet")
        self.assertEqual(upstream_failure_reason(Failure(ResponseNeverReceived([Failure(Quiet())]))),
                         "Quiet before any answer")
