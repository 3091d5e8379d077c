"""The real FanOut in memory (``task.Clock``): legs that give up stop their upstream, a size cap
per node, a crash answers 500, a client that leaves cancels every leg (the local Docker one too),
dead members and Swarm nodes with no agent are named, and an unknown node list is said."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from portainer_agent.proxy import fanout as fanout_module
from portainer_agent.proxy.fanout import NODE_LIST_HEADER, UNREACHABLE_HEADER
from portainer_agent.proxy.member_gone import MemberGone
from portainer_agent.routing import ClusterSnapshot

from .test_cluster_memory import NODE1, NODE2, NODE3, Cluster, list_of
from .test_swarm_nodes import docker_node, nodes_body


@implementer(IPushProducer)
class UpstreamConnection:
    """The transport a leg's body reader sees; records ``stopProducing`` (the connection closed)."""

    def __init__(self) -> None:
        self.stopped = False
        self.protocol: Any = None

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True
        # As Twisted's client does: the connection closes, the body ends with an error.
        self.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionDone())])))


class StreamingResponse:
    """An upstream answer whose body a test writes piece by piece."""

    version = (b"HTTP", 1, 1)
    phrase = b"OK"
    request = None
    previousResponse = None

    def __init__(self, code: int = 200, length: Any = UNKNOWN_LENGTH) -> None:
        self.code = code
        self.length = length
        self.headers = Headers({b"content-type": [b"application/json"]})
        self.connection = UpstreamConnection()

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        self.connection.protocol = protocol
        protocol.makeConnection(self.connection)

    def send(self, data: bytes) -> None:
        self.connection.protocol.dataReceived(data)

    def end(self) -> None:
        self.connection.protocol.connectionLost(Failure(ResponseDone()))


def with_nodes(answer: Any, body: bytes) -> Any:
    """A fake Docker handler answering ``GET /nodes`` with ``body``, the rest with ``answer``."""
    def handle(request: Request) -> Any:
        if request.path.endswith(b"/nodes"):
            request.setHeader(b"content-type", b"application/json")
            return body
        return answer(request)
    return handle


def hang(request: Request) -> Any:
    return NOT_DONE_YET


class Base(SynchronousTestCase):
    def cluster(self, **kwargs: Any) -> Cluster:
        cluster = Cluster(**kwargs)
        self.addCleanup(cluster.stop)
        return cluster

    def finish(self, cluster: Cluster, d: "Deferred[Any]") -> tuple[Any, bytes]:
        cluster.pump()
        response = self.successResultOf(d)
        body_d = cluster.client.content(response)
        cluster.pump()
        return response, self.successResultOf(body_d)


class LegTests(Base):
    def test_a_leg_that_times_out_while_reading_stops_its_upstream(self) -> None:
        cluster = self.cluster(timeout=10.0)
        upstream = StreamingResponse()
        cluster.network.answers["node1"] = lambda uri: succeed(upstream)
        d = cluster.client.get("http://agent/volumes")
        cluster.pump()
        upstream.send(b'{"Volumes": [')
        cluster.clock.advance(9.9)
        cluster.pump()
        self.assertNoResult(d)
        self.assertFalse(upstream.connection.stopped)
        cluster.clock.advance(0.2)
        response, body = self.finish(cluster, d)
        self.assertTrue(upstream.connection.stopped)
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node1"])
        self.assertIn("node node1 is unreachable, its volumes are missing: no answer within 10s",
                      json.loads(body)["Warnings"])

    def test_an_answer_over_the_cap_names_the_node_and_the_limit_and_closes_its_connection(self) -> None:
        cluster = self.cluster(max_bytes=100)
        upstream = StreamingResponse()
        cluster.network.answers["node1"] = lambda uri: succeed(upstream)
        d = cluster.client.get("http://agent/volumes")
        cluster.pump()
        upstream.send(b"[" + b" " * 60)
        self.assertFalse(upstream.connection.stopped)
        upstream.send(b" " * 60)
        self.assertTrue(upstream.connection.stopped)
        response, body = self.finish(cluster, d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node1"])
        warning = json.loads(body)["Warnings"][0]
        self.assertIn("the answer of node node1 is larger than the limit of 100 bytes", warning)

    def test_an_announced_length_over_the_cap_is_refused_before_reading(self) -> None:
        cluster = self.cluster(max_bytes=100)
        upstream = StreamingResponse(length=101)
        cluster.network.answers["node2"] = lambda uri: succeed(upstream)
        response, _ = self.finish(cluster, cluster.client.get("http://agent/networks"))
        self.assertTrue(upstream.connection.stopped)
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node2"])

    def test_the_local_leg_over_the_cap_closes_its_docker_connection(self) -> None:
        cluster = self.cluster(max_bytes=200)
        self.finish(cluster, cluster.client.get("http://agent/networks"))
        self.assertEqual(len(cluster.local_agent._idle), 1)  # a normal answer: the connection is kept
        cluster.dockers["node3"].handler = lambda request: json.dumps([{"Id": "x" * 300}]).encode()
        response, _ = self.finish(cluster, cluster.client.get("http://agent/networks"))
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node3"])
        self.assertEqual(cluster.local_agent._idle, [])  # closed, not returned to the pool

    def test_a_dead_member_is_named_with_why(self) -> None:
        cluster = self.cluster()
        cluster.network.answers["node2"] = lambda uri: fail(MemberGone("node2"))
        response, body = self.finish(cluster, cluster.client.get("http://agent/volumes"))
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node2"])
        self.assertEqual(json.loads(body)["Warnings"], [
            "node node2 is unreachable, its volumes are missing: the agent on node node2 was declared dead by "
            "cluster membership"])

    def test_every_left_out_node_is_logged_with_a_reason(self) -> None:
        cluster = self.cluster(timeout=10.0)
        cluster.network.hanging.add("node1")
        cluster.network.refused.add("node2")
        with capturedLogs() as events:
            d = cluster.client.get("http://agent/containers/json")
            cluster.pump()
            cluster.clock.advance(10.1)
            self.finish(cluster, d)
        reasons = {e["node"]: e["reason"] for e in events if "left out of the aggregated" in e["log_format"]}
        self.assertEqual(reasons, {"node1": "no answer within 10s", "node2": "connection refused"})

    def test_a_crash_while_answering_is_a_500_and_is_logged(self) -> None:
        cluster = self.cluster()

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("merge broke")

        self.patch(fanout_module.MergeMemo, "merge", broken)
        response, body = self.finish(cluster, cluster.client.get("http://agent/containers/json"))
        self.assertEqual(response.code, 500)
        self.assertEqual(json.loads(body)["message"], "Internal agent error")
        self.assertIn("merge broke", json.loads(body)["details"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ClientGoneTests(Base):
    def test_a_client_that_leaves_cancels_every_leg_the_local_docker_one_included(self) -> None:
        cluster = self.cluster()
        cluster.network.hanging.update({"node1", "node2"})
        lost: list[Any] = []

        def local_hangs(request: Request) -> Any:
            request.notifyFinish().addBoth(lost.append)
            return NOT_DONE_YET

        cluster.dockers["node3"].handler = local_hangs
        d = cluster.client.get("http://agent/containers/json")
        cluster.pump()
        self.assertEqual(lost, [])
        d.cancel()
        cluster.pump()
        self.failureResultOf(d)
        self.assertTrue(all(p.called for p in cluster.network.pending))
        self.assertEqual(len(lost), 1)
        self.assertIsInstance(lost[0], Failure)  # Docker saw its connection go

    def test_a_client_that_leaves_while_bodies_stream_stops_every_upstream(self) -> None:
        cluster = self.cluster()
        upstream = StreamingResponse()
        cluster.network.answers["node1"] = lambda uri: succeed(upstream)
        lost: list[Any] = []

        def local_streams(request: Request) -> Any:
            request.notifyFinish().addBoth(lost.append)
            request.write(b"[")
            return NOT_DONE_YET

        cluster.dockers["node3"].handler = local_streams
        d = cluster.client.get("http://agent/containers/json")
        cluster.pump()
        upstream.send(b"[")
        d.cancel()
        cluster.pump()
        self.failureResultOf(d)
        self.assertTrue(upstream.connection.stopped)
        self.assertEqual(len(lost), 1)
        self.assertIsInstance(lost[0], Failure)


class NodeListTests(Base):
    def test_a_manager_names_swarm_nodes_with_no_live_agent_from_its_own_docker(self) -> None:
        cluster = self.cluster(local=NODE1, node_list=True)
        cluster.dockers["node1"].handler = with_nodes(list_of("node1"), nodes_body(
            docker_node("node1", role="manager"), docker_node("node2", role="manager"), docker_node("node3"),
            docker_node("node4"), docker_node("node5", "down", "drain")))
        response, body = self.finish(cluster, cluster.client.get("http://agent/volumes"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node4, node5"])
        self.assertIsNone(response.headers.getRawHeaders(NODE_LIST_HEADER))
        value = json.loads(body)
        self.assertEqual([v["Name"] for v in value["Volumes"]], ["v-node1", "v-node2", "v-node3"])
        self.assertEqual(value["Warnings"], [
            "node node4 is unreachable, its volumes are missing: no agent answering on node node4 "
            "(node ready in the Swarm)",
            "node node5 is unreachable, its volumes are missing: no agent answering on node node5 "
            "(node down in the Swarm, drained)"])
        self.assertEqual(cluster.network.urls.count(b"https://10.0.0.2:9001/nodes"), 0)  # read locally

    def test_a_worker_reads_the_list_from_the_leaders_agent_with_the_requests_signature(self) -> None:
        cluster = self.cluster(local=NODE3, node_list=True)
        cluster.dockers["node1"].handler = with_nodes(list_of("node1"), nodes_body(
            docker_node("node1"), docker_node("node2"), docker_node("node3"), docker_node("node4")))
        response, _ = self.finish(cluster, cluster.client.get(
            "http://agent/containers/json", headers={"X-PortainerAgent-Signature": "sig",
                                                     "X-PortainerAgent-PublicKey": "pk", "X-Other": "no"}))
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node4"])
        asked = [seen for seen in cluster.dockers["node1"].seen if seen.uri == b"/nodes"]
        self.assertEqual(len(asked), 1)
        self.assertEqual(asked[0].header(b"x-portaineragent-signature"), [b"sig"])
        self.assertEqual(asked[0].header(b"x-portaineragent-publickey"), [b"pk"])
        self.assertEqual(asked[0].header(b"x-portaineragent-target"), [b"node1"])
        self.assertEqual(asked[0].header(b"x-portaineragent-forwarded-by"), [b"node3"])
        self.assertIsNone(asked[0].header(b"x-other"))

    def test_a_failing_manager_is_passed_over_for_the_next(self) -> None:
        cluster = self.cluster(local=NODE3, node_list=True)
        cluster.dockers["node1"].handler = with_nodes(list_of("node1"), b'{"message": "no leader"}')
        cluster.dockers["node2"].handler = with_nodes(list_of("node2"), nodes_body(
            docker_node("node1"), docker_node("node2"), docker_node("node3"), docker_node("node4")))
        response, _ = self.finish(cluster, cluster.client.get("http://agent/networks"))
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node4"])

    def test_the_list_is_read_once_per_max_age_and_a_stale_one_is_used_while_it_refreshes(self) -> None:
        cluster = self.cluster(local=NODE1, node_list=True)
        listed = [nodes_body(docker_node("node1"), docker_node("node2"), docker_node("node3"), docker_node("node4"))]
        cluster.dockers["node1"].handler = lambda request: (
            listed[0] if request.path == b"/nodes" else list_of("node1")(request))
        for _ in range(3):
            self.finish(cluster, cluster.client.get("http://agent/networks"))
        reads = lambda: sum(1 for seen in cluster.dockers["node1"].seen if seen.uri == b"/nodes")  # noqa: E731
        self.assertEqual(reads(), 1)
        listed[0] = nodes_body(docker_node("node1"), docker_node("node2"), docker_node("node3"))  # node4 removed
        cluster.clock.advance(5.1)
        response, _ = self.finish(cluster, cluster.client.get("http://agent/networks"))
        self.assertEqual(reads(), 2)
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node4"])  # the stale list
        response, _ = self.finish(cluster, cluster.client.get("http://agent/networks"))
        self.assertIsNone(response.headers.getRawHeaders(UNREACHABLE_HEADER))  # the fresh one

    def test_with_no_manager_to_ask_the_answer_says_the_list_is_unknown(self) -> None:
        cluster = self.cluster(local=NODE3, node_list=True)
        cluster.snapshot = ClusterSnapshot(NODE3, (NODE3,))
        response, body = self.finish(cluster, cluster.client.get("http://agent/volumes"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(NODE_LIST_HEADER), [b"unknown"])
        self.assertEqual(json.loads(body)["Warnings"], [
            "the Swarm node list is not known yet (no live agent on a manager node to ask): nodes without a live "
            "agent may be missing from this list"])

    def test_an_unknown_list_is_waited_for_a_short_while_then_said_unknown(self) -> None:
        cluster = self.cluster(local=NODE3, node_list=True)
        slow: list[Deferred[Any]] = []

        def manager(node: str) -> Any:
            def answer(uri: bytes) -> Deferred[Any]:
                if uri.endswith(b"/nodes"):
                    slow.append(Deferred())
                    return slow[-1]
                return cluster.network.agents[node].request(b"GET", uri)
            return answer

        cluster.network.answers.update({"node1": manager("node1"), "node2": manager("node2")})
        d = cluster.client.get("http://agent/containers/json")
        cluster.pump()
        cluster.clock.advance(1.9)
        cluster.pump()
        self.assertNoResult(d)  # every leg answered; the node list is still awaited
        cluster.clock.advance(0.2)
        response, body = self.finish(cluster, d)
        self.assertEqual(response.headers.getRawHeaders(NODE_LIST_HEADER), [b"unknown"])
        self.assertEqual(len(json.loads(body)), 6)
        # node1's read times out (5 s), node2 is asked and answers: the next list names node4
        cluster.clock.advance(3.0)
        self.assertEqual(len(slow), 2)
        upstream = StreamingResponse()
        slow[1].callback(upstream)
        upstream.send(nodes_body(docker_node("node1"), docker_node("node2"), docker_node("node3"),
                                 docker_node("node4")))
        upstream.end()
        response, _ = self.finish(cluster, cluster.client.get("http://agent/containers/json"))
        self.assertIsNone(response.headers.getRawHeaders(NODE_LIST_HEADER))
        self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node4"])

    def test_a_node_with_no_agent_is_logged_when_it_goes_missing_and_when_it_is_back(self) -> None:
        cluster = self.cluster(local=NODE1, node_list=True)
        cluster.dockers["node1"].handler = with_nodes(list_of("node1"), nodes_body(
            docker_node("node1"), docker_node("node2"), docker_node("node3")))
        cluster.snapshot = ClusterSnapshot(NODE1, (NODE1, NODE2))
        with capturedLogs() as events:
            for _ in range(3):
                response, _ = self.finish(cluster, cluster.client.get("http://agent/images/json"))
                self.assertEqual(response.headers.getRawHeaders(UNREACHABLE_HEADER), [b"node3"])
            cluster.snapshot = ClusterSnapshot(NODE1, (NODE1, NODE2, NODE3))
            response, _ = self.finish(cluster, cluster.client.get("http://agent/images/json"))
            self.assertIsNone(response.headers.getRawHeaders(UNREACHABLE_HEADER))
        missing = [e for e in events if e.get("log_level").name == "warn" and "reason" in e
                   and "no agent answering on node node3" in e["reason"]]
        back = [e for e in events if "no longer left out" in e["log_format"]]
        self.assertEqual((len(missing), len(back)), (1, 1))


