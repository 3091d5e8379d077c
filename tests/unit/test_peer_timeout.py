"""A peer agent that cannot be reached within ``--peer-timeout``, on a memory reactor: the
connect is bounded by the option, and its failure is a 502 naming the node. (The routing
lab shows the same with a real partition and only measures the time.)"""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import TimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from portainer_agent.cluster.simulation import SimNetwork
from portainer_agent.proxy.peer import PeerForwarder, PeerTLSPolicy
from portainer_agent.tls.certs import generate_self_signed

PEER_TIMEOUT = 2.0


class Forward(Resource):
    isLeaf = True

    def __init__(self, forwarder: PeerForwarder, member: Any) -> None:
        super().__init__()
        self.forwarder, self.member = forwarder, member

    def render(self, request: Request) -> Any:
        return self.forwarder.render(request, self.member)


class PeerConnectTimeoutTests(SynchronousTestCase):
    def test_connect_is_bounded_by_the_peer_timeout_and_its_failure_names_the_node(self) -> None:
        reactor = MemoryReactorClock()
        pin = generate_self_signed(["10.0.0.3"]).fingerprint
        policy = PeerTLSPolicy(lambda host, port: pin, authenticated=True)
        forwarder = PeerForwarder(reactor, policy, HTTPConnectionPool(reactor, persistent=False), lambda: "node1",
                                  hijack=None, connect_timeout=PEER_TIMEOUT)  # type: ignore[arg-type]
        node3 = SimNetwork().make_member(2, node_name="node3")
        protocol = Site(Forward(forwarder, node3), reactor=reactor).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /containers/x/json HTTP/1.1\r\nHost: agent\r\n\r\n")
        reactor.advance(0)
        # (MemoryReactor's resolver answers 127.0.0.1 for any name, node3's address included.)
        [(_, port, factory, timeout, _)] = reactor.tcpClients
        self.assertEqual(port, node3.api_port)
        self.assertEqual(timeout, PEER_TIMEOUT, "the connect to a peer is bounded by --peer-timeout")
        self.assertEqual(transport.value(), b"")
        # What the reactor's connector does at the deadline:
        factory.clientConnectionFailed(None, Failure(TimeoutError()))  # type: ignore[arg-type]
        reactor.advance(1.0)  # HostnameEndpoint notices the failed attempt on its next round
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertIn("node3", json.loads(body)["message"])
