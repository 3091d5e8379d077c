"""Metrics: names and labels in isolated registries, the site's per-request recording,
the membership hooks and the /metrics resource, all in memory."""
from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from portainer_agent.cluster.member import MemberState
from portainer_agent.http.metrics_endpoint import MetricsResource
from portainer_agent.http.inflight import InFlight
from portainer_agent.http.site import AgentSite
from portainer_agent.metrics import AgentMetrics, TimedPings, signature_refusal_reason
from portainer_agent.routing import RouteKind


def samples(metrics: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.exposition()
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class FakeMember:
    def __init__(self, state: MemberState, node_name: str = "node2") -> None:
        self.state = state
        self.node_name = node_name


class AgentMetricsTests(SynchronousTestCase):
    def test_registries_are_isolated(self) -> None:
        one, two = AgentMetrics(), AgentMetrics()
        one.request_finished("ping", b"GET", 204, 0.001, 0)
        self.assertEqual(samples(one)[("portainer_agent_requests_total",
                                       (("kind", "ping"), ("method", "GET"), ("status", "2xx")))], 1)
        self.assertNotIn(("portainer_agent_requests_total", (("kind", "ping"), ("method", "GET"), ("status", "2xx"))),
                         samples(two))

    def test_build_info(self) -> None:
        import platform

        from portainer_agent import AGENT_API_VERSION, __version__

        found = samples(AgentMetrics())
        self.assertEqual(found[("portainer_agent_build_info", (("api_version", AGENT_API_VERSION),
                                                              ("python", platform.python_version()),
                                                              ("version", __version__)))], 1)

    def test_new_recorders_are_no_ops_without_metrics(self) -> None:
        from portainer_agent.metrics import NoMetrics

        none = NoMetrics()
        self.assertIsNone(none.aggregate_answered(["node1"]))
        self.assertIsNone(none.manager_failover("node1"))
        self.assertIsNone(none.hijacked_stream_ended(1, 2, 3.0))

    def test_labels_are_bounded(self) -> None:
        metrics = AgentMetrics()
        metrics.request_finished("local", b"BREW", 418, 0.2, 10)
        metrics.request_finished("local", b"GET", 200, 0.2, 5, completed=False)
        found = samples(metrics)
        self.assertEqual(found[("portainer_agent_requests_total",
                                (("kind", "local"), ("method", "other"), ("status", "4xx")))], 1)
        self.assertEqual(found[("portainer_agent_requests_total",
                                (("kind", "local"), ("method", "GET"), ("status", "aborted")))], 1)
        self.assertEqual(found[("portainer_agent_response_bytes_total", (("kind", "local"),))], 15)
        self.assertEqual(found[("portainer_agent_request_duration_seconds_count", (("kind", "local"),))], 2)

    def test_signature_reasons(self) -> None:
        cases = {("Missing request signature headers", "Unauthorized"): "missing",
                 ("Invalid request signature", "Invalid public key: not hexadecimal"): "bad_public_key",
                 ("Invalid request signature", "Invalid signature: wrong length"): "bad_signature_encoding",
                 ("Invalid request signature", "Unauthorized"): "unauthorized",
                 ("Invalid request signature", "API closed by the security shutdown"): "api_closed"}
        for (message, details), reason in cases.items():
            self.assertEqual(signature_refusal_reason(message, details), reason)

    def test_membership_by_state_and_transitions(self) -> None:
        metrics = AgentMetrics()
        members = [FakeMember(MemberState.ALIVE), FakeMember(MemberState.ALIVE), FakeMember(MemberState.SUSPECT)]
        metrics.watch_members(lambda: members)
        metrics.member_changed(FakeMember(MemberState.ALIVE), FakeMember(MemberState.SUSPECT))
        metrics.member_changed(FakeMember(MemberState.SUSPECT), FakeMember(MemberState.DEAD))
        metrics.member_changed(FakeMember(MemberState.ALIVE), FakeMember(MemberState.ALIVE))  # not a transition
        metrics.member_changed(FakeMember(MemberState.ALIVE, "node3"), FakeMember(MemberState.SUSPECT, "node3"))
        found = samples(metrics)
        self.assertEqual(found[("portainer_agent_cluster_members", (("state", "alive"),))], 2)
        self.assertEqual(found[("portainer_agent_cluster_members", (("state", "suspect"),))], 1)
        self.assertEqual(found[("portainer_agent_cluster_members", (("state", "dead"),))], 0)
        changes = "portainer_agent_cluster_state_changes_total"
        self.assertEqual(found[(changes, (("node", "node2"), ("state", "suspect")))], 1)
        self.assertEqual(found[(changes, (("node", "node2"), ("state", "dead")))], 1)
        self.assertEqual(found[(changes, (("node", "node3"), ("state", "suspect")))], 1)
        members.append(FakeMember(MemberState.DEAD))
        self.assertEqual(samples(metrics)[("portainer_agent_cluster_members", (("state", "dead"),))], 1)

    def test_probe_round_trip_is_timed(self) -> None:
        metrics, clock = AgentMetrics(), Clock()

        class Transport:
            node = None

            def ping(self, peer: Any, updates: Any) -> Any:
                clock.advance(0.003)
                return succeed(["ack"])

        timed = TimedPings(Transport(), metrics, clock.seconds)
        self.assertEqual(self.successResultOf(timed.ping("peer", [])), ["ack"])
        self.assertIsNone(timed.node)  # everything else is the transport's
        found = samples(metrics)
        self.assertEqual(found[("portainer_agent_cluster_probe_rtt_seconds_count", ())], 1)
        self.assertEqual(found[("portainer_agent_cluster_probe_rtt_seconds_bucket", (("le", "0.005"),))], 1)
        self.assertEqual(found[("portainer_agent_cluster_probe_rtt_seconds_bucket", (("le", "0.0025"),))], 0)

    def test_forward_metrics_for_the_router(self) -> None:
        metrics = AgentMetrics()
        metrics.forwarded("node2", "forwarded", 0.04)
        metrics.forward_error("node3", "connect")
        found = samples(metrics)
        self.assertEqual(found[("portainer_agent_forwarded_requests_total", (("kind", "forwarded"), ("node", "node2")))], 1)
        self.assertEqual(found[("portainer_agent_forward_errors_total", (("node", "node3"), ("reason", "connect")))], 1)
        self.assertEqual(found[("portainer_agent_forward_duration_seconds_count", (("kind", "forwarded"),))], 1)


class RoutedRoot(Resource):
    """Tells the in-flight registry each route kind as the real root does; /stream stays open."""

    isLeaf = True

    def __init__(self, inflight: InFlight) -> None:
        super().__init__()
        self.open: list[Any] = []
        self.inflight = inflight

    def render(self, request: Any) -> Any:
        if request.path == b"/stream":
            self.inflight.routed(request, RouteKind.DOCKER.value)
            request.write(b"x" * 10)
            self.open.append(request)
            return NOT_DONE_YET
        if request.path == b"/unrouted":
            return b"plain"
        self.inflight.routed(request, RouteKind.PING.value)
        request.setResponseCode(204)
        return b""


class SiteRecordingTests(SynchronousTestCase):
    def connect(self, site: AgentSite) -> tuple[Any, StringTransport]:
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_requests_counted_by_route_kind_and_connections_gauged(self) -> None:
        metrics, clock = AgentMetrics(), Clock()
        inflight = InFlight(metrics)
        root = RoutedRoot(inflight)
        site = AgentSite(root, metrics=metrics, reactor=clock, inflight=inflight)
        protocol, transport = self.connect(site)
        other, other_transport = self.connect(site)
        self.assertEqual(samples(metrics)[("portainer_agent_open_connections", ())], 2)
        protocol.dataReceived(b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\nGET /unrouted HTTP/1.1\r\nHost: a\r\n\r\n")
        other.dataReceived(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        found = samples(metrics)
        self.assertEqual(found[("portainer_agent_requests_total", (("kind", "ping"), ("method", "GET"), ("status", "2xx")))], 1)
        self.assertEqual(found[("portainer_agent_requests_total", (("kind", "unrouted"), ("method", "GET"), ("status", "2xx")))], 1)
        self.assertEqual(found.get(("portainer_agent_requests_total", (("kind", "local"), ("method", "GET"), ("status", "aborted")))), None)
        self.assertEqual(found[("portainer_agent_inflight_requests", (("kind", "local"),))], 1)
        other.connectionLost(Failure(ConnectionDone()))  # the client of the stream leaves
        found = samples(metrics)
        self.assertEqual(found[("portainer_agent_requests_total", (("kind", "local"), ("method", "GET"), ("status", "aborted")))], 1)
        self.assertEqual(found[("portainer_agent_open_connections", ())], 1)
        self.assertEqual(found[("portainer_agent_inflight_requests", (("kind", "local"),))], 0)
        self.assertEqual(found[("portainer_agent_inflight_requests", (("kind", "hijack"),))], 0, "every kind reported")


class MetricsResourceTests(SynchronousTestCase):
    def test_scrape_unknown_path_and_method(self) -> None:
        metrics = AgentMetrics()
        metrics.connection_refused()
        client = StubTreq(MetricsResource(metrics))
        response = self.successResultOf(client.get("http://m/metrics"))
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4"))
        body = self.successResultOf(response.content())
        self.assertIn(b'portainer_agent_connections_refused_total{reason="max_connections"} 1.0', body)
        self.assertEqual(self.successResultOf(client.get("http://m/other")).code, 404)
        self.assertEqual(self.successResultOf(client.post("http://m/metrics")).code, 405)
        openmetrics = self.successResultOf(client.get("http://m/metrics", headers={
            "Accept": "application/openmetrics-text; version=1.0.0"}))
        self.assertIn(b"openmetrics", openmetrics.headers.getRawHeaders(b"content-type")[0])
