"""Canaries for the private Twisted names in :mod:`portainer_agent.httpkit.twisted_private`:
if a Twisted release changes one, these fail with its name instead of the proxy
misbehaving somewhere else."""
from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from portainer_agent.httpkit.twisted_private import client_gone, quiet_pool, request_line, take_unread

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
