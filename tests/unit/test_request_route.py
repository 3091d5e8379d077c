"""A request is routed once, when its headers are in, and the route is handed along.

The request asks the router it was built with (``AgentRequests``); the root serves what the
request decided, on the same cluster snapshot, and gives the endpoint that very route."""
from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from portainer_agent.http.request import AgentRequests
from portainer_agent.http.root import AgentRoot
from portainer_agent.http.router import Routed, Router
from portainer_agent.http.site import AgentSite
from portainer_agent.proxy.dispatch import Destinations

from .memory import RecordingHandler


class CountingRouter(Router):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decided: list[Routed] = []

    def decide(self, request: Request) -> Routed:
        routed = super().decide(request)
        self.decided.append(routed)
        return routed


class Endpoint:
    def __init__(self, streams_body: bool) -> None:
        self.streams_body = streams_body
        self.seen: list[tuple[Any, bool]] = []

    def render(self, request: Request, route: Any) -> bytes:
        self.seen.append((route, getattr(request, "body_stream", None) is not None))
        return b"{}"


class RouteOnceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.put, self.ls = Endpoint(True), Endpoint(False)
        endpoints = {b"/browse/put": self.put, b"/browse/ls": self.ls}
        self.router = CountingRouter(streaming=[b"/browse/put"])
        self.docker = RecordingHandler()
        root = AgentRoot(Destinations(self.docker, RecordingHandler()), self.router, endpoints=endpoints)
        site = AgentSite(root, AgentRequests(self.router), reactor=Clock())
        self.channel: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.client = StringTransport()
        self.channel.makeConnection(self.client)

    def test_a_streamed_upload_is_routed_once_and_served_on_that_route(self) -> None:
        body = b"p" * 200_000
        self.channel.dataReceived(b"POST /v2/browse/put HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                                  % len(body) + body)
        [routed] = self.router.decided
        self.assertEqual(self.put.seen, [(routed.route, True)])  # the same route, and the body streamed

    def test_a_plain_request_is_routed_once(self) -> None:
        self.channel.dataReceived(b"GET /browse/ls?path=/ HTTP/1.1\r\nHost: a\r\n\r\n")
        self.channel.dataReceived(b"GET /containers/json HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual([r.route.path for r in self.router.decided], [b"/browse/ls", b"/containers/json"])
        self.assertEqual(self.ls.seen, [(self.router.decided[0].route, False)])
        self.assertEqual(len(self.docker.requests), 1)

    def test_a_request_not_built_by_the_factory_is_routed_by_the_root(self) -> None:
        site = AgentSite(AgentRoot(Destinations(self.docker, RecordingHandler()), self.router,
                                   endpoints={b"/browse/ls": self.ls}), reactor=Clock())
        channel: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET /browse/ls?path=/ HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(self.router.decided), 1)
        self.assertEqual(self.ls.seen, [(self.router.decided[0].route, False)])
