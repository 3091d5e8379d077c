"""Cluster routing through the real root, forwarder and fan-out, in memory.

Every node's Docker is a :class:`FakeDocker`; the local leg goes through the real
``DockerProxy``, peer legs through the real ``PeerForwarder`` whose HTTPS agent is replaced by
one that hands each request to the peer node's fake Docker (so what a peer receives — URI,
headers, body — is recorded), and time is a ``task.Clock``.
"""
from __future__ import annotations

import json
from typing import Any, cast

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionAborted, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.internet.task import Clock, Cooperator
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.cluster.member import Member
from portainer_agent.http.root import AgentRoot
from portainer_agent.http.router import Router
from portainer_agent.metrics import AgentMetrics
from portainer_agent.docker.testing import MemoryDocker
from portainer_agent.proxy.dispatch import Destinations
from portainer_agent.listcache.peer_states import PeerListStates
from portainer_agent.proxy.fanout import DEFAULT_MAX_BYTES, UNREACHABLE_HEADER, FanOut
from portainer_agent.proxy.node_list import SwarmNodeList
from portainer_agent.proxy.local import DockerProxy
from portainer_agent.proxy.peer import PeerConnections, PeerForwarder, PeerTLSPolicy
from portainer_agent.routing import ClusterSnapshot

from .memory import SOCKET, FakeDocker, RecordingHandler


def member(name: str, address: str, role: str = "worker", leader: bool = False) -> Member:
    return Member(node_name=name, node_id=name, role=role, is_leader=leader, api_addr=address, api_port=9001,
                  cluster_addr=address, cluster_port=9002, version="1.2.1", cert_fingerprint="00")


NODE1 = member("node1", "10.0.0.1", "manager", leader=True)
NODE2 = member("node2", "10.0.0.2", "manager")
NODE3 = member("node3", "10.0.0.3")


def list_of(node: str) -> Any:
    def answer(request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path.endswith(b"/volumes"):
            return json.dumps({"Volumes": [{"Name": f"v-{node}"}], "Warnings": None}).encode()
        return json.dumps([{"Id": f"{node}-a"}, {"Id": f"{node}-b"}]).encode()
    return answer


class PeerNetwork:
    """An IAgent standing in for HTTPS to peer agents: routes by host to each fake Docker,
    or fails / hangs as a test says."""

    def __init__(self, dockers: dict[str, FakeDocker], connections: PeerConnections | None = None) -> None:
        self.connections = connections
        self.cancelled: list[Deferred[Any]] = []
        self.open_connections: list[_HangingConnection] = []
        self.agents = {name: RequestTraversalAgent(docker) for name, docker in dockers.items()}
        self.by_address = {"10.0.0.1": "node1", "10.0.0.2": "node2", "10.0.0.3": "node3"}
        self.refused: set[str] = set()
        self.hanging: set[str] = set()
        self.pending: list[Deferred[Any]] = []
        self.urls: list[bytes] = []
        #: node -> a function of the request's URI giving the answer's Deferred (a test's own upstream).
        self.answers: dict[str, Any] = {}

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.urls.append(uri)
        host = uri.split(b"//", 1)[1].split(b":", 1)[0].decode()
        node = self.by_address[host]
        if node in self.refused:
            return fail(ConnectionRefusedError(host))
        if node in self.answers:
            answer: Deferred[Any] = self.answers[node](uri)
            return answer
        if node in self.hanging:
            d: Deferred[Any] = Deferred(canceller=self.cancelled.append)
            self.pending.append(d)
            if self.connections is not None:
                # As a real pooled connection would be: known to the policy by address.
                # (held here: the registry holds connections weakly, the reactor holds real ones)
                self.open_connections.append(_HangingConnection(d))
                self.connections.add(host, 9001, self.open_connections[-1])
            return d
        return self.agents[node].request(method, uri, headers, bodyProducer)

    def flush(self) -> None:
        for agent in self.agents.values():
            agent.flush()


class _HangingConnection:
    """A connection whose request never gets an answer; aborting it fails the request as
    twisted.web.client does."""

    def __init__(self, pending: Deferred[Any]) -> None:
        self.pending = pending
        self.transport: Any = object()

    def abortConnection(self) -> None:
        self.transport = None
        if not self.pending.called:
            self.pending.errback(ResponseNeverReceived([Failure(ConnectionAborted())]))


class Cluster:
    """The agent of ``local`` in a 3-node cluster, all in memory."""

    def __init__(self, local: Member = NODE3, timeout: float = 10.0, max_bytes: int = DEFAULT_MAX_BYTES,
                 node_list: bool = False, response_timeout: float = 120.0, peer_copies: Any = None,
                 peer_states: bool = False) -> None:
        #: Node names membership has declared dead.
        self.dead: set[str] = set()
        self.metrics = AgentMetrics()
        self.clock = Clock()
        self.cooperator = Cooperator(scheduler=lambda work: self.clock.callLater(0, work), started=True)
        self.dockers = {name: FakeDocker(list_of(name)) for name in ("node1", "node2", "node3")}
        self.local_agent = MemoryDocker(self.dockers[local.node_name], self.clock)
        policy = PeerTLSPolicy(lambda host, port: "00", authenticated=True)
        self.network = PeerNetwork({n: d for n, d in self.dockers.items() if n != local.node_name},
                                   policy.connections)
        docker = DockerProxy(cast(Any, self.local_agent), SOCKET, cooperator=self.cooperator)
        self.peers = PeerForwarder(self.clock, policy, cast(Any, None), lambda: local.node_name,
                                   cast(Any, RecordingHandler()), cooperator=self.cooperator,
                                   agent=cast(IAgent, self.network), metrics=self.metrics,
                                   alive=lambda m: m.node_name not in self.dead, response_timeout=response_timeout)
        self.snapshot = ClusterSnapshot(local, (NODE1, NODE2, NODE3))
        #: The Swarm node list (only when asked for: the older tests cover live members alone).
        self.node_list = SwarmNodeList(self.clock, self.local_agent, self.peers.client,
                                       timeout=5.0, wait=2.0) if node_list else None
        #: The peers' list cache states, as membership would report them (list cache tests).
        self.peer_states = PeerListStates(self.clock) if peer_states else None
        self.fanout = FanOut(self.clock, docker, self.peers, timeout, max_bytes=max_bytes, node_list=self.node_list,
                             metrics=self.metrics, peer_copies=peer_copies, peer_states=self.peer_states)
        destinations = Destinations(docker, RecordingHandler(), self.peers, self.fanout)
        self.root = AgentRoot(destinations, Router(lambda: self.snapshot))
        self.client: Any = StubTreq(self.root)

    def stop(self) -> None:
        self.cooperator.stop()

    def declare_dead(self, member: Member) -> None:
        """What the membership service does when it declares ``member`` dead."""
        self.dead.add(member.node_name)
        self.peers.member_departed(member)

    def pump(self) -> None:
        for _ in range(30):
            self.client.flush()
            self.clock.advance(0)
            self.local_agent.flush()
            self.network.flush()
        self.client.flush()

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET",
            data: bytes | None = None) -> tuple[Any, bytes]:
        d = self.client.request(method, "http://agent" + path, headers=headers, data=data)
        self.pump()
        response = self_result(d)
        body_d = self.client.content(response)
        self.pump()
        return response, self_result(body_d)


def self_result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError("no result yet")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


class AggregationTests(SynchronousTestCase):
    def cluster(self, **kwargs: Any) -> Cluster:
        cluster = Cluster(**kwargs)
        self.addCleanup(cluster.stop)
        return cluster

    def test_every_node_is_asked_concurrently_and_the_answers_merged_in_node_order(self) -> None:
        cluster = self.cluster()
        response, body = cluster.get("/v1.41/containers/json?all=1&size=1",
                                     headers={"X-PortainerAgent-Signature": "sig"})
        self.assertEqual(response.code, 200)
        items = json.loads(body)
        self.assertEqual([(i["Id"], i["Portainer"]["Agent"]["NodeName"]) for i in items], [
            ("node1-a", "node1"), ("node1-b", "node1"), ("node2-a", "node2"), ("node2-b", "node2"),
            ("node3-a", "node3"), ("node3-b", "node3")])
        self.assertIsNone(response.headers.getRawHeaders(UNREACHABLE_HEADER))
        for name in ("node1", "node2"):
            seen = cluster.dockers[name].seen[-1]
            self.assertEqual(seen.uri, b"/v1.41/containers/json?all=1&size=1")
            self.assertIn(b"https://10.0.0.%s:9001/v1.41/containers/json?all=1&size=1" % name[-1].encode(),
                          cluster.network.urls)
            self.assertEqual(seen.header(b"x-portaineragent-target"), [name.encode()])
            self.assertEqual(seen.header(b"x-portaineragent-forwarded-by"), [b"node3"])
            self.assertEqual(seen.header(b"x-portaineragent-signature"), [b"sig"])
        local = cluster.dockers["node3"].seen[-1]
        self.assertEqual(local.uri, b"/v1.41/containers/json?all=1&size=1")
        self.assertIsNone(local.header(b"x-portaineragent-forwarded-by"))

    def test_a_refused_node_is_named_and_the_others_answer(self) -> None:
        cluster = self.cluster()
        cluster.network.refused.add("node2")
        response, body = cluster.get("/containers/json")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node2"])
        self.assertEqual({i["Portainer"]["Agent"]["NodeName"] for i in json.loads(body)}, {"node1", "node3"})

    def test_a_slow_node_cannot_hold_the_answer_past_the_timeout(self) -> None:
        cluster = self.cluster(timeout=10.0)
        cluster.network.hanging.add("node1")
        d = cluster.client.get("http://agent/volumes")
        cluster.pump()
        self.assertNoResult(d)
        cluster.clock.advance(9.9)
        cluster.pump()
        self.assertNoResult(d)
        cluster.clock.advance(0.2)
        cluster.pump()
        response = self.successResultOf(d)
        body_d = cluster.client.content(response)
        cluster.pump()
        value = json.loads(self.successResultOf(body_d))
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node1"])
        self.assertEqual([v["Name"] for v in value["Volumes"]], ["v-node2", "v-node3"])
        self.assertEqual(len(value["Warnings"]), 1)
        self.assertIn("node1", value["Warnings"][0])
        self.assertIn("no answer within 10s", value["Warnings"][0])
        self.assertTrue(cluster.network.pending[0].called)  # cancelled, not left running

    def test_every_node_failing_is_a_502(self) -> None:
        cluster = self.cluster(local=NODE3)
        cluster.network.refused.update({"node1", "node2"})
        cluster.dockers["node3"].handler = lambda request: _status(request, 500, b'{"message":"boom"}')
        response, body = cluster.get("/images/json")
        self.assertEqual(response.code, 502)
        error = json.loads(body)
        self.assertEqual(error["message"], "Unable to retrieve the list from any node")
        for node in ("node1", "node2", "node3"):
            self.assertIn(node, error["details"])

    def test_every_node_refusing_the_query_passes_dockers_error_on(self) -> None:
        cluster = self.cluster()
        for docker in cluster.dockers.values():
            docker.handler = lambda request: _status(request, 400, b'{"message":"invalid filter"}')
        response, body = cluster.get("/containers/json?filters=bad")
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body), {"message": "invalid filter"})

    def test_a_target_header_fetches_that_nodes_list_from_that_node(self) -> None:
        cluster = self.cluster()
        response, body = cluster.get("/containers/json", headers={"X-PortainerAgent-Target": "node1"})
        self.assertEqual(json.loads(body), [{"Id": "node1-a"}, {"Id": "node1-b"}])
        self.assertEqual(cluster.dockers["node2"].seen, [])
        self.assertEqual(cluster.dockers["node3"].seen, [])

    def test_a_client_that_leaves_cancels_the_legs(self) -> None:
        cluster = self.cluster()
        cluster.network.hanging.update({"node1", "node2"})
        d = cluster.client.get("http://agent/networks")
        cluster.pump()
        d.cancel()
        cluster.pump()
        self.failureResultOf(d)
        self.assertTrue(all(p.called for p in cluster.network.pending))


class ForwardingTests(SynchronousTestCase):
    def cluster(self, **kwargs: Any) -> Cluster:
        cluster = Cluster(**kwargs)
        self.addCleanup(cluster.stop)
        return cluster

    def test_a_targeted_request_and_its_body_reach_the_peer_with_the_marks(self) -> None:
        cluster = self.cluster()
        cluster.dockers["node2"].handler = lambda request: _status(request, 201, b'{"Id":"x"}')
        response, body = cluster.get("/v1.24/containers/create?name=a", method="POST", data=b'{"Image":"i"}',
                                     headers={"X-PortainerAgent-Target": "node2", "Connection": "keep-alive, X-Drop",
                                              "X-Drop": "1", "X-PortainerAgent-PublicKey": "pk"})
        self.assertEqual((response.code, body), (201, b'{"Id":"x"}'))
        seen = cluster.dockers["node2"].seen[-1]
        self.assertEqual(cluster.network.urls, [b"https://10.0.0.2:9001/v1.24/containers/create?name=a"])
        self.assertEqual(seen.body, b'{"Image":"i"}')
        self.assertEqual(seen.header(b"x-portaineragent-target"), [b"node2"])
        self.assertEqual(seen.header(b"x-portaineragent-publickey"), [b"pk"])
        self.assertIsNone(seen.header(b"x-drop"))

    def test_an_unreachable_peer_is_a_502_naming_the_node(self) -> None:
        cluster = self.cluster()
        cluster.network.refused.add("node1")
        response, body = cluster.get("/containers/x/json", headers={"X-PortainerAgent-Target": "node1"})
        self.assertEqual(response.code, 502)
        self.assertIn("node1", json.loads(body)["message"])

    def test_manager_operations_go_to_the_leader_then_fail_over(self) -> None:
        cluster = self.cluster()
        response, _ = cluster.get("/services")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(cluster.dockers["node1"].seen), 1)  # the leader first
        cluster.network.refused.add("node1")
        response, body = cluster.get("/services")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(cluster.dockers["node2"].seen), 1)
        cluster.network.refused.add("node2")
        response, body = cluster.get("/nodes")
        self.assertEqual(response.code, 502)
        error = json.loads(body)
        self.assertEqual(error["message"], "Unable to reach any agent on a manager node")
        self.assertIn("node1", error["details"])
        self.assertIn("node2", error["details"])

    def test_forwards_and_their_failures_are_counted_per_node(self) -> None:
        cluster = self.cluster()
        cluster.get("/containers/x/json", headers={"X-PortainerAgent-Target": "node1"})
        cluster.get("/networks")
        cluster.network.refused.add("node2")
        cluster.get("/containers/x/json", headers={"X-PortainerAgent-Target": "node2"})
        cluster.get("/services")  # node1 is the leader: it answers
        value = cluster.metrics.registry.get_sample_value
        self.assertEqual(value("portainer_agent_forwarded_requests_total", {"node": "node1", "kind": "forward"}), 1)
        self.assertEqual(value("portainer_agent_forwarded_requests_total", {"node": "node1", "kind": "aggregate"}), 1)
        self.assertEqual(value("portainer_agent_forwarded_requests_total", {"node": "node1", "kind": "manager"}), 1)
        self.assertEqual(value("portainer_agent_forward_errors_total", {"node": "node2", "reason": "connect"}), 1)
        self.assertEqual(value("portainer_agent_forward_duration_seconds_count", {"kind": "forward"}), 1)

    def test_failovers_are_counted_by_the_manager_that_failed(self) -> None:
        cluster = self.cluster()
        value = cluster.metrics.registry.get_sample_value
        cluster.get("/services")
        self.assertIsNone(value("portainer_agent_manager_failovers_total", {"from_node": "node1"}))
        cluster.network.refused.add("node1")
        response, _ = cluster.get("/services")
        self.assertEqual(response.code, 200)
        self.assertEqual(value("portainer_agent_manager_failovers_total", {"from_node": "node1"}), 1)
        cluster.network.refused.add("node2")
        cluster.get("/services")  # node1 fails over to node2, which fails too: no manager left
        self.assertEqual(value("portainer_agent_manager_failovers_total", {"from_node": "node1"}), 2)
        self.assertIsNone(value("portainer_agent_manager_failovers_total", {"from_node": "node2"}))

    def test_nodes_left_out_of_aggregates_are_counted_and_the_last_gauged(self) -> None:
        cluster = self.cluster()
        value = cluster.metrics.registry.get_sample_value
        cluster.network.refused.add("node2")
        cluster.get("/networks")
        cluster.get("/volumes")
        self.assertEqual(value("portainer_agent_aggregate_unreachable_nodes_total", {"node": "node2"}), 2)
        self.assertIsNone(value("portainer_agent_aggregate_unreachable_nodes_total", {"node": "node1"}))
        self.assertEqual(value("portainer_agent_aggregate_last_unreachable_nodes", {}), 1)
        cluster.network.refused.clear()
        cluster.get("/networks")
        self.assertEqual(value("portainer_agent_aggregate_last_unreachable_nodes", {}), 0)
        self.assertEqual(value("portainer_agent_aggregate_unreachable_nodes_total", {"node": "node2"}), 2)

    def test_a_forwarded_request_for_another_node_is_refused_not_forwarded(self) -> None:
        cluster = self.cluster()
        response, body = cluster.get("/containers/x/json", headers={
            "X-PortainerAgent-Target": "node1", "X-PortainerAgent-Forwarded-By": "node2"})
        self.assertEqual(response.code, 508)
        self.assertEqual(cluster.dockers["node1"].seen, [])


def _status(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return body


__all__ = ["NOT_DONE_YET"]


class MembershipDeadlineTests(SynchronousTestCase):
    """Requests in flight to a member that membership declares dead fail at once; manager
    operations fail over when that is safe; response heads have a deadline."""

    def cluster(self, **kwargs: Any) -> Cluster:
        cluster = Cluster(**kwargs)
        self.addCleanup(cluster.stop)
        return cluster

    def answer(self, cluster: Cluster, d: Deferred[Any]) -> tuple[Any, bytes]:
        cluster.pump()
        response = self.successResultOf(d)
        body_d = cluster.client.content(response)
        cluster.pump()
        return response, self.successResultOf(body_d)

    def test_a_get_manager_operation_in_flight_to_a_dead_leader_goes_to_the_next_manager(self) -> None:
        cluster = self.cluster()
        cluster.network.hanging.add("node1")
        cluster.dockers["node2"].handler = lambda request: _status(request, 200, b'[{"ID":"n"}]')
        d = cluster.client.get("http://agent/nodes")
        cluster.pump()
        self.assertNoResult(d)
        cluster.declare_dead(NODE1)
        response, body = self.answer(cluster, d)
        self.assertEqual((response.code, body), (200, b'[{"ID":"n"}]'))
        self.assertEqual(cluster.network.urls, [b"https://10.0.0.1:9001/nodes", b"https://10.0.0.2:9001/nodes"])
        self.assertEqual(cluster.clock.seconds(), 0, "no deadline was waited for")

    def test_a_change_in_flight_to_a_dead_manager_is_a_502_naming_it_and_not_resent(self) -> None:
        cluster = self.cluster()
        cluster.network.hanging.add("node1")
        d = cluster.client.post("http://agent/services/create", data=b'{"Name":"web"}')
        cluster.pump()
        cluster.declare_dead(NODE1)
        response, body = self.answer(cluster, d)
        self.assertEqual(response.code, 502)
        error = json.loads(body)
        self.assertIn("node1", error["message"])
        self.assertIn("declared dead", error["details"])
        self.assertIn("may have been applied", error["details"])
        self.assertEqual(len(cluster.network.urls), 1, "never sent to a second manager")

    def test_a_dead_manager_is_skipped_when_failing_over(self) -> None:
        cluster = self.cluster(local=NODE3)
        cluster.network.refused.add("node1")
        cluster.dead.add("node2")  # still in the route's snapshot, already dead
        response, body = cluster.get("/nodes")
        self.assertEqual(response.code, 502)
        self.assertEqual(cluster.network.urls, [b"https://10.0.0.1:9001/nodes"])

    def test_an_aggregate_leg_to_a_dead_member_is_named_at_once(self) -> None:
        cluster = self.cluster(timeout=10.0)
        cluster.network.hanging.add("node1")
        d = cluster.client.get("http://agent/volumes")
        cluster.pump()
        self.assertNoResult(d)
        cluster.declare_dead(NODE1)
        response, body = self.answer(cluster, d)
        self.assertEqual(cluster.clock.seconds(), 0, "the aggregate timeout was not waited for")
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node1"])
        warnings = json.loads(body)["Warnings"]
        self.assertIn("declared dead by cluster membership", warnings[0])

    def test_a_client_leaving_a_manager_operation_cancels_the_attempt_in_flight(self) -> None:
        cluster = self.cluster()
        cluster.network.hanging.add("node1")
        d = cluster.client.get("http://agent/nodes")
        cluster.pump()
        d.cancel()
        cluster.pump()
        self.failureResultOf(d)
        self.assertEqual(cluster.network.cancelled, cluster.network.pending, "the request to node1 is cancelled")
        self.assertEqual(len(cluster.network.urls), 1, "and not sent to another manager")

    def test_a_late_response_head_fails_with_the_response_deadline(self) -> None:
        cluster = self.cluster(response_timeout=30.0)
        cluster.network.hanging.add("node2")
        d = cluster.client.get("http://agent/containers/abc/json", headers={"X-PortainerAgent-Target": "node2"})
        cluster.pump()
        cluster.clock.advance(29.9)
        cluster.pump()
        self.assertNoResult(d)
        cluster.clock.advance(0.2)
        response, body = self.answer(cluster, d)
        self.assertEqual(response.code, 502)
        self.assertIn("no response from the agent within 30s", json.loads(body)["details"])
        self.assertEqual(cluster.network.cancelled, cluster.network.pending)

    def test_a_late_get_manager_operation_goes_to_the_next_manager(self) -> None:
        cluster = self.cluster(response_timeout=30.0)
        cluster.network.hanging.add("node1")
        d = cluster.client.get("http://agent/services")
        cluster.pump()
        cluster.clock.advance(30.1)
        response, _ = self.answer(cluster, d)
        self.assertEqual(response.code, 200)
        self.assertEqual(cluster.network.urls[-1], b"https://10.0.0.2:9001/services")


class PeerConnectionsTests(SynchronousTestCase):
    def test_abort_cuts_every_open_connection_to_one_address_only(self) -> None:
        connections = PeerConnections()
        first, second, other = [_HangingConnection(Deferred()) for _ in range(3)]
        connections.add("10.0.0.1", 9001, first)
        connections.add("10.0.0.1", 9001, second)
        connections.add("10.0.0.2", 9001, other)
        self.assertEqual(connections.open_to("10.0.0.1", 9001), 2)
        self.assertEqual(connections.abort("10.0.0.1", 9001), 2)
        self.failureResultOf(first.pending, ResponseNeverReceived)
        self.failureResultOf(second.pending, ResponseNeverReceived)
        self.assertNoResult(other.pending)
        self.assertEqual(connections.abort("10.0.0.1", 9001), 0)
        self.assertEqual(connections.open_to("10.0.0.2", 9001), 1)


class DemotedManagerTests(SynchronousTestCase):
    """A manager demoted meanwhile (membership learns it within its identity refresh)."""

    NOT_A_MANAGER = (b'{"message":"This node is not a swarm manager. Worker nodes can\'t be used to view or '
                     b'modify cluster state."}')

    def cluster(self) -> Cluster:
        cluster = Cluster()
        self.addCleanup(cluster.stop)
        cluster.dockers["node1"].handler = lambda request: _status(request, 503, self.NOT_A_MANAGER)
        cluster.dockers["node2"].handler = lambda request: _status(request, 200, b'[{"ID":"n"}]')
        return cluster

    def test_a_get_refused_by_a_demoted_manager_goes_to_the_next_manager(self) -> None:
        cluster = self.cluster()
        response, body = cluster.get("/nodes")
        self.assertEqual((response.code, body), (200, b'[{"ID":"n"}]'))
        self.assertEqual(cluster.network.urls, [b"https://10.0.0.1:9001/nodes", b"https://10.0.0.2:9001/nodes"])

    def test_a_change_refused_by_a_demoted_manager_is_passed_on_not_resent(self) -> None:
        cluster = self.cluster()
        response, body = cluster.get("/services/create", method="POST", data=b"{}")
        self.assertEqual(response.code, 503)
        self.assertIn(b"not a swarm manager", body)
        self.assertEqual(len(cluster.network.urls), 1)

    def test_the_last_manager_s_503_is_passed_on(self) -> None:
        cluster = self.cluster()
        cluster.dockers["node2"].handler = lambda request: _status(request, 503, self.NOT_A_MANAGER)
        response, body = cluster.get("/nodes")
        self.assertEqual(response.code, 503)
        self.assertEqual(len(cluster.network.urls), 2)
