"""Connection hardening in memory (task.Clock, StringTransport): the request-head
deadline, the idle keep-alive timeout, streams never cut by either, the TLS handshake
deadline, the connection cap and its once-a-minute log, the open-file limit."""
from __future__ import annotations

import resource
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from portainer_agent.connections import RefusalLog, connection_cap, raise_open_file_limit
from portainer_agent.http.site import AgentSite
from portainer_agent.metrics import AgentMetrics
from portainer_agent.tls.certs import load_or_generate
from portainer_agent.tls.server import HalfCloseTLSFactory, server_options

from .memory import HeldOpen
from .tempdirs import temp_dir

ADDRESS = IPv4Address("TCP", "10.0.0.1", 40000)


class Connection:
    def __init__(self, site: Site) -> None:
        self.protocol = site.buildProtocol(ADDRESS)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def cut(self) -> bool:
        return self.transport.disconnecting


class HeadDeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = AgentMetrics()
        self.root = HeldOpen({b"/stream"}, first=b"first line\n")
        self.site = AgentSite(self.root, reactor=self.clock, head_timeout=30, timeout=60, metrics=self.metrics)

    def cuts(self) -> float:
        return self.metrics.registry.get_sample_value("portainer_agent_connections_cut_total",
                                                      {"reason": "header_timeout"}) or 0

    def test_a_dripping_head_is_cut_at_the_deadline(self) -> None:
        conn = Connection(self.site)
        conn.send(b"GET /x HTTP/1.1\r\n")
        for _ in range(29):  # one byte a second resets the idle timeout every time
            self.clock.advance(1)
            conn.send(b"X")
        self.assertFalse(conn.cut)
        self.clock.advance(1)
        self.assertTrue(conn.cut)
        self.assertTrue(conn.transport.disconnected)  # aborted, not a polite close
        self.assertEqual(self.cuts(), 1)

    def test_a_complete_head_stops_the_deadline(self) -> None:
        conn = Connection(self.site)
        conn.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"ok", conn.transport.value())
        self.clock.advance(59)
        self.assertFalse(conn.cut)
        self.assertEqual(self.cuts(), 0)

    def test_the_deadline_restarts_for_the_next_request(self) -> None:
        conn = Connection(self.site)
        conn.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(50)  # idle, within the idle timeout
        conn.send(b"GET /x HTTP/1.1\r\n")
        self.clock.advance(29)
        conn.send(b"H")
        self.assertFalse(conn.cut)
        self.clock.advance(1)
        self.assertTrue(conn.cut)

    def test_idle_kept_alive_connection_closes_after_the_idle_timeout(self) -> None:
        conn = Connection(self.site)
        conn.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(59.9)
        self.assertFalse(conn.cut)
        self.clock.advance(0.2)
        self.assertTrue(conn.cut)
        self.assertEqual(self.cuts(), 0)  # an idle close, not a head timeout

    def test_a_stream_is_never_cut_by_either_timer(self) -> None:
        conn = Connection(self.site)
        conn.send(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        for _ in range(100):
            self.clock.advance(60)
            self.root.held[0].write(b"tick\n")
        self.assertFalse(conn.cut)
        self.assertIn(b"tick", conn.transport.value())
        # a pipelined head arriving during the stream is not timed until it is read
        conn.send(b"GET /x HT")
        self.clock.advance(300)
        self.assertFalse(conn.cut)
        self.root.held[0].finish()
        self.assertFalse(conn.cut)

    def test_closed_connection_leaves_no_timer(self) -> None:
        conn = Connection(self.site)
        conn.send(b"GET /x HTTP/1.1\r\n")
        conn.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [c for c in self.clock.getDelayedCalls() if not c.active()])


class RefusalLogTests(SynchronousTestCase):
    def test_logs_once_per_minute_with_the_count(self) -> None:
        events: list[dict[str, Any]] = []
        observer = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        clock, counted = Clock(), []
        refusals = RefusalLog(clock, cap=10, on_refused=lambda: counted.append(1))
        for _ in range(500):
            refusals.refused()
            clock.advance(0.1)  # 50 s
        clock.advance(10)
        refusals.refused()
        lines = [e for e in events if e.get("log_namespace") == "portainer_agent.connections"]
        self.assertEqual([(e["log_level"], e["count"]) for e in lines], [(LogLevel.warn, 1), (LogLevel.warn, 500)])
        self.assertEqual((refusals.total, len(counted)), (501, 501))


class OpenFileLimitTests(SynchronousTestCase):
    def test_soft_limit_raised_to_hard(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        now = raise_open_file_limit()
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], now)
        if hard != resource.RLIM_INFINITY:
            self.assertEqual(now, hard)

    def test_cap_fits_the_limit(self) -> None:
        self.assertEqual(connection_cap(4096, 1048576), 4096)
        self.assertEqual(connection_cap(4096, 1024), (1024 - 64) // 2)
        self.assertEqual(connection_cap(4096, 10), 1)


class TLSLimitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        identity = load_or_generate(temp_dir(self), ["127.0.0.1"], None, None)
        self.options = server_options(identity)
        self.clock = Clock()
        self.cuts: list[str] = []
        self.refusals = RefusalLog(self.clock, cap=2)
        self.factory = HalfCloseTLSFactory(self.options, False, Factory.forProtocol(Protocol), clock=self.clock,
                                           max_connections=2, refusals=self.refusals, on_cut=self.cuts.append)

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(ADDRESS)
        transport = StringTransport()
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def test_handshake_deadline(self) -> None:
        protocol, transport = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.cuts, ["tls_handshake_timeout"])

    def test_handshake_timer_gone_with_the_connection(self) -> None:
        protocol, transport = self.connect()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse([c for c in self.clock.getDelayedCalls() if c.active()])

    def test_cap_refuses_then_accepts_after_a_close(self) -> None:
        first, _ = self.connect()
        self.connect()
        refused, _ = self.connect()
        self.assertIsNone(refused)
        self.assertEqual(self.refusals.total, 1)
        first.connectionLost(Failure(ConnectionDone()))
        again, _ = self.connect()
        self.assertIsNotNone(again)


class ParserRefusalTests(SynchronousTestCase):
    """Requests twisted.web's parser refuses are answered like every other agent error."""

    def refused(self, raw: bytes) -> tuple[int, dict[bytes, bytes], dict[str, str], Connection]:
        import json

        conn = Connection(AgentSite(HeldOpen({b"/stream"}, first=b"first line\n"), reactor=Clock()))
        conn.send(raw)
        head, _, body = conn.transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        self.assertTrue(conn.cut, "the connection stays open")
        return int(lines[0].split()[1]), headers, json.loads(body), conn

    def assertAgentError(self, raw: bytes, status: int, message: str) -> None:
        code, headers, body, _ = self.refused(raw)
        self.assertEqual(code, status, body)
        self.assertEqual(body["message"], message)
        self.assertTrue(body["details"])
        self.assertEqual(headers[b"Portainer-Agent-Api-Version"], b"2")
        self.assertEqual(headers[b"Portainer-Agent-Platform"], b"1")
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(headers[b"Connection"], b"close")
        self.assertNotIn(b"Server", headers)

    def test_conflicting_framing_and_malformed_headers_are_json_400(self) -> None:
        cases = [
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Bad: a\nb\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            b"NOT-A-REQUEST-LINE\r\n\r\n",
        ]
        for raw in cases:
            self.assertAgentError(raw, 400, "Bad request")

    def test_oversize_heads_are_414_and_431(self) -> None:
        self.assertAgentError(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414, "Request-URI Too Long")
        self.assertAgentError(b"GET /" + b"a" * 20000, 414, "Request-URI Too Long")  # no line end yet
        self.assertAgentError(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431,
                              "Request Header Fields Too Large")
        many = b"".join(b"X-%d: v\r\n" % i for i in range(101))
        self.assertAgentError(b"GET / HTTP/1.1\r\n" + many + b"\r\n", 431, "Request Header Fields Too Large")
        large = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(40))
        self.assertAgentError(b"GET / HTTP/1.1\r\n" + large + b"\r\n", 431, "Request Header Fields Too Large")

    def test_limits_leave_normal_requests_alone(self) -> None:
        conn = Connection(AgentSite(HeldOpen({b"/stream"}, first=b"first line\n"), reactor=Clock()))
        headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 200) for i in range(99))
        conn.send(b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
        self.assertTrue(conn.transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertNotIn(b"\r\nServer:", conn.transport.value())
        self.assertFalse(conn.cut)
