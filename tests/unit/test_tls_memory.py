"""The TLS half-close shim (``HalfCloseTLSProtocol``) and ``AgentSite`` over it, in memory.

A real TLS handshake and real TLS records between a stock Twisted TLS client and the
agent's server side, moved by ``twisted.test.iosim`` (no sockets, a ``task.Clock``).
End to end, the docker CLI over TLS covers the same (tests/integration).
"""
from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from portainer_agent.http.site import AgentSite
from portainer_agent.tls.certs import generate_self_signed
from portainer_agent.tls.server import HalfCloseTLSFactory, HalfCloseTLSProtocol, server_options

IDENTITY = generate_self_signed(["127.0.0.1"])


class Collecting(Protocol):
    """Keeps what it receives and how its connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Collecting):
    """Stands for the hijack splice: it can be told the peer finished sending."""

    def __init__(self) -> None:
        super().__init__()
        self.read_closed = 0
        self.write_closed = 0

    def readConnectionLost(self) -> None:
        self.read_closed += 1

    def writeConnectionLost(self) -> None:
        self.write_closed += 1


class Pair:
    """A TLS client and the agent's TLS server side around ``server_protocol`` (or the
    protocol ``app_factory`` builds: the site, as the agent serves it)."""

    def __init__(self, server_protocol: Protocol | None = None, app_factory: Any = None,
                 clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.client_app = Collecting()
        if app_factory is None:
            app_factory = Factory.forProtocol(lambda: server_protocol)
        server_factory = HalfCloseTLSFactory(server_options(IDENTITY), False, app_factory, clock=self.clock)
        client_factory = TLSMemoryBIOFactory(ssl.CertificateOptions(), True,
                                             Factory.forProtocol(lambda: self.client_app), clock=self.clock)
        address = IPv4Address("TCP", "127.0.0.1", 9001)
        self.server = server_factory.buildProtocol(address)
        self.client = client_factory.buildProtocol(address)
        self.server_tcp = FakeTransport(self.server, isServer=True)
        self.client_tcp = FakeTransport(self.client, isServer=False)
        self.pump: IOPump = connect(self.server, self.server_tcp, self.client, self.client_tcp, clock=self.clock)
        self.server_app = self.server.wrappedProtocol

    def flush(self) -> None:
        self.pump.flush()


class HalfCloseTests(SynchronousTestCase):
    def test_server_side_is_the_shim(self) -> None:
        pair = Pair(HalfCloseable())
        self.assertIsInstance(pair.server, HalfCloseTLSProtocol)

    def test_close_notify_half_closes_a_hijacked_stream_and_output_still_flows(self) -> None:
        # docker exec/attach over TLS: the CLI sends stdin, then close_notify, then waits
        # for the command's output.
        stream = HalfCloseable()
        pair = Pair(stream)
        pair.client.write(b"stdin bytes")
        pair.client.loseConnection()  # sends close_notify
        pair.flush()
        self.assertEqual(stream.received, b"stdin bytes")
        self.assertEqual(stream.read_closed, 1)
        self.assertIsNone(stream.lost, "the stream must stay open for its output")
        assert stream.transport is not None
        stream.transport.write(b"command output")
        pair.flush()
        self.assertEqual(pair.client_app.received, b"command output")
        stream.transport.loseConnection()  # the command ended: our close_notify, then TCP
        pair.flush()
        self.assertIsNotNone(stream.lost)
        self.assertIsNotNone(pair.client_app.lost)
        self.assertEqual(stream.read_closed, 1, "told once")

    def test_close_notify_closes_an_ordinary_connection(self) -> None:
        app = Collecting()
        pair = Pair(app)
        pair.client.write(b"hello")
        pair.client.loseConnection()
        pair.flush()
        self.assertEqual(app.received, b"hello")
        self.assertIsNotNone(app.lost, "the stock TLS shutdown: the connection ends")
        self.assertIsNotNone(pair.client_app.lost)

    def test_a_fin_after_close_notify_is_told_to_a_stream_that_asks(self) -> None:
        stream = HalfCloseable()
        fins: list[bool] = []
        stream.tcpClosedAfterCloseNotify = lambda: fins.append(True)  # type: ignore[attr-defined]
        pair = Pair(stream)
        pair.client.loseConnection()  # close_notify
        pair.flush()
        self.assertEqual((stream.read_closed, fins), (1, []))
        self.assertFalse(pair.server.tcpFinReceived, "a half-close by close_notify is not a FIN")
        pair.server.readConnectionLost()  # then TCP ends
        self.assertEqual((stream.read_closed, fins), (1, [True]))
        self.assertTrue(pair.server.tcpFinReceived)

    def test_fin_without_close_notify_half_closes_a_hijacked_stream(self) -> None:
        stream = HalfCloseable()
        pair = Pair(stream)
        pair.server.readConnectionLost()  # what the reactor calls on a TCP FIN
        pair.server.readConnectionLost()
        self.assertEqual(stream.read_closed, 1)
        self.assertFalse(pair.server_tcp.disconnecting)
        assert stream.transport is not None
        stream.transport.write(b"still writing")
        pair.flush()
        self.assertEqual(pair.client_app.received, b"still writing")

    def test_fin_without_close_notify_closes_tcp_for_an_ordinary_connection(self) -> None:
        # The peer left without close_notify and will never answer ours: waiting for it
        # leaked the connection (and what was spliced to it) for good.
        app = Collecting()
        pair = Pair(app)
        pair.server.readConnectionLost()
        self.assertTrue(pair.server_tcp.disconnecting, "the TCP connection is closed at once")

    def test_write_side_close_is_passed_on(self) -> None:
        stream = HalfCloseable()
        pair = Pair(stream)
        pair.server.writeConnectionLost()
        self.assertEqual(stream.write_closed, 1)


class Hello(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"hello"


class SiteOverTLSTests(SynchronousTestCase):
    """``AgentSite`` behind the shim, as the agent serves it."""

    def site_pair(self) -> Pair:
        clock = Clock()
        site = AgentSite(Hello(), reactor=clock)
        pair = Pair(app_factory=site, clock=clock)
        pair.site = site  # type: ignore[attr-defined]
        return pair

    def test_request_over_tls(self) -> None:
        pair = self.site_pair()
        pair.client.write(b"GET /x HTTP/1.1\r\nHost: agent\r\n\r\n")
        pair.flush()
        self.assertTrue(pair.client_app.received.startswith(b"HTTP/1.1 200 OK\r\n"), pair.client_app.received)
        self.assertTrue(pair.client_app.received.endswith(b"\r\n\r\nhello"))
        self.assertIsNone(pair.client_app.lost, "keep-alive")

    def test_over_long_request_line_is_answered_and_closed_over_tls(self) -> None:
        # Twisted's own answer (loseConnection while the channel is the TLS transport's
        # producer) never closed over TLS: the client hung until the idle timeout.
        pair = self.site_pair()
        pair.client.write(b"GET /" + b"a" * 20_000)
        pair.flush()
        self.assertTrue(pair.client_app.received.startswith(b"HTTP/1.1 414 "), pair.client_app.received)
        self.assertIsNotNone(pair.client_app.lost, "the connection was closed")

    def test_drain_closes_an_idle_tls_connection_cleanly(self) -> None:
        pair = self.site_pair()
        pair.client.write(b"GET /x HTTP/1.1\r\nHost: agent\r\n\r\n")
        pair.flush()
        drained = pair.site.drain(pair.clock, 5.0)  # type: ignore[attr-defined]
        pair.flush()
        pair.clock.advance(0.02)
        self.successResultOf(drained)
        self.assertIsNotNone(pair.client_app.lost)
        self.assertTrue(pair.client_app.received.endswith(b"hello"))
