"""Canaries for the private Twisted names in :mod:`portainer_agent.toolbox.twisted_private`:
if a Twisted release changes one, these fail with its name instead of the proxy
misbehaving somewhere else. One test (at least) per function or class there."""
from __future__ import annotations

import inspect
import signal
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from portainer_agent.toolbox.twisted_private import (
    RefusalHookChannel,
    answering,
    channel_protocol,
    client_gone,
    forget_exit_signal,
    head_received,
    quiet_pool,
    request_line,
    take_unread,
    tls_factory_clock,
)

from .memory import HeldOpen


def channel_for(resource: Resource, request_factory: Any = Request) -> tuple[Any, StringTransport]:
    site = Site(resource, reactor=Clock())
    site.requestFactory = request_factory
    channel: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


class PrivateNamesTests(SynchronousTestCase):
    def test_request_line_is_on_the_channel_at_gotLength(self) -> None:
        seen: list[tuple[bytes, bytes, bytes]] = []

        class Spy(Request):
            def gotLength(self, length: int | None) -> None:  # noqa: N802
                seen.append(request_line(self.channel))
                super().gotLength(length)

        channel, _ = channel_for(HeldOpen(), Spy)
        channel.dataReceived(b"PUT /v1.41/x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n")
        self.assertEqual(seen, [(b"PUT", b"/v1.41/x?y=1", b"HTTP/1.1")])

    def test_unread_bytes_after_a_request_in_progress(self) -> None:
        hold = HeldOpen()
        channel, _ = channel_for(hold)
        channel.dataReceived(b"POST /exec/1/start HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nstdin bytes")
        [request] = hold.requests
        self.assertEqual(take_unread(request.channel), b"stdin bytes")
        self.assertEqual(take_unread(request.channel), b"")

    def test_client_gone(self) -> None:
        hold = HeldOpen()
        channel, _ = channel_for(hold)
        channel.dataReceived(b"GET /events HTTP/1.1\r\nHost: a\r\n\r\n")
        [request] = hold.requests
        self.assertFalse(client_gone(request))
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(client_gone(request))

    def test_quiet_pool(self) -> None:
        pool = quiet_pool(HTTPConnectionPool(Clock()))
        self.assertFalse(pool._factory.noisy)

    def test_pool_connections_are_built_by_our_factory_without_nagle(self) -> None:
        pool = quiet_pool(HTTPConnectionPool(Clock()))
        quiescent: list[object] = []
        factory = pool._factory(quiescent.append, None)  # as HTTPConnectionPool._newConnection builds it
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        delays: list[bool] = []
        transport.setTcpNoDelay = delays.append  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        self.assertEqual(delays, [True])
        # the pool's quiescent callback reaches the protocol (a private attribute of the factory)
        self.assertIs(protocol._quiescentCallback.__self__, quiescent)  # type: ignore[attr-defined]


class ChannelPrivateNamesTests(SynchronousTestCase):
    """The names :mod:`portainer_agent.http.channel` and :mod:`portainer_agent.http.site` use."""

    def test_channel_protocol_carries_our_channel(self) -> None:
        hold = HeldOpen()

        class OurChannel(RefusalHookChannel):
            pass

        class OurSite(Site):
            def protocol(self) -> Any:  # type: ignore[override]
                return channel_protocol(OurChannel())

        site = OurSite(hold, reactor=Clock())
        protocol: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        [request] = hold.requests
        self.assertIsInstance(request.channel, OurChannel)
        self.assertIs(request.channel.site, site)

    def test_every_parser_refusal_reaches_the_hook(self) -> None:
        refused: list[bytes] = []

        class Hooked(RefusalHookChannel):
            def refuse_bad_request(self) -> None:
                refused.append(b"refused")
                self.loseConnection()

        for head in (b"NOT A REQUEST LINE\r\n\r\n",
                     b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
                     b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"):
            refused.clear()
            site = Site(HeldOpen(), reactor=Clock())
            channel = Hooked()
            channel.site, channel.requestFactory = site, Request  # type: ignore[attr-defined]
            channel.makeConnection(StringTransport())
            channel.dataReceived(head)
            self.assertEqual(refused, [b"refused"], head)

    def test_the_default_hook_is_twisteds_bare_400(self) -> None:
        channel = RefusalHookChannel()
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"NOT A REQUEST LINE\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request"))

    def test_head_received_counts_bytes_and_lines(self) -> None:
        seen: list[tuple[int, int]] = []

        class Counting(RefusalHookChannel):
            def lineReceived(self, line: bytes) -> None:  # noqa: N802
                super().lineReceived(line)
                seen.append(head_received(self))

        hold = HeldOpen()
        channel = Counting()
        channel.site, channel.requestFactory = Site(hold, reactor=Clock()), Request  # type: ignore[attr-defined]
        channel.makeConnection(StringTransport())
        lines = [b"GET / HTTP/1.1", b"Host: a", b"X-Two: bb", b"X-Three: c"]
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n")
        # bytes: every line so far, CRLF excluded; header lines: counted once the next
        # line shows they are not folded
        self.assertEqual(seen, [(14, 0), (21, 0), (30, 1), (40, 2)])
        channel.dataReceived(b"\r\n")
        self.assertEqual(len(hold.requests), 1)
        self.assertEqual(head_received(channel), (0, 0))  # reset for the next request

    def test_answering_while_a_request_is_handled(self) -> None:
        hold = HeldOpen()
        protocol, _ = channel_for(hold)
        channel = protocol._channel
        self.assertFalse(answering(channel))
        protocol.dataReceived(b"GET /events HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(answering(channel))
        hold.requests[0].finish()
        self.assertFalse(answering(channel))


class TLSFactoryClockTests(SynchronousTestCase):
    """:mod:`portainer_agent.tls.server`: the handshake deadline runs on Twisted's TLS clock."""

    def test_the_clock_given_is_the_clock_kept(self) -> None:
        from twisted.internet.protocol import Factory
        from twisted.protocols.tls import TLSMemoryBIOFactory

        clock = Clock()
        factory = TLSMemoryBIOFactory(CertificateOptions(), False, Factory(), clock)
        self.assertIs(tls_factory_clock(factory), clock)

    def test_without_a_clock_it_is_the_reactor(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory
        from twisted.protocols.tls import TLSMemoryBIOFactory

        self.assertIs(tls_factory_clock(TLSMemoryBIOFactory(CertificateOptions(), False, Factory())), reactor)

    def test_buffered_tls_writes_are_flushed_on_that_clock(self) -> None:
        """The clock matters beyond our deadline: Twisted schedules its write aggregation
        on it, so a ``task.Clock`` given to the server drives both."""
        from twisted.protocols import tls

        self.assertIn("factory._clock", inspect.getsource(tls.BufferingTLSTransport.__init__))


class TwistdPrivateNamesTests(SynchronousTestCase):
    """:mod:`portainer_agent.twistd`: exit 0 after a graceful stop on SIGTERM."""

    def test_forget_exit_signal_clears_what_twistd_reraises(self) -> None:
        from twisted.application import app

        class Reactor:
            _exitSignal: int | None = signal.SIGTERM

        reactor = Reactor()
        forget_exit_signal(reactor)
        self.assertIsNone(reactor._exitSignal)
        forget_exit_signal(object())  # a reactor without it (not a signal-handling one): nothing to do
        runner = app.ApplicationRunner({"profile": None, "profiler": "cprofile", "debug": False})
        self.assertIn("reactor._exitSignal", inspect.getsource(runner.startReactor))

