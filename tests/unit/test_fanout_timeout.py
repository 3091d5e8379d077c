"""The aggregate's per-node deadline on simulated time: a node that never answers is named
and left out once ``--aggregate-timeout`` has passed, not a moment earlier, and the others'
items are answered. (The lab test shows the same with a real partition; the bound is checked
here, where a loaded machine cannot make it flaky.)"""
from __future__ import annotations

import json
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from portainer_agent.cluster.simulation import SimNetwork
from portainer_agent.proxy.fanout import UNREACHABLE_HEADER, FanOut
from portainer_agent.proxy.local import DockerProxy

from .memory import SOCKET, FakeDocker

TIMEOUT = 4.0


class SilentPeers:
    """Peer agents that never answer (a partitioned node)."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def send(self, request: Request, member: Any) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


class Aggregate(Resource):
    isLeaf = True

    def __init__(self, fanout: FanOut, members: list[Any], local_name: str) -> None:
        super().__init__()
        self.fanout, self.members, self.local_name = fanout, members, local_name

    def render(self, request: Request) -> Any:
        return self.fanout.render(request, self.members, self.local_name)


class FanOutTimeoutTests(SynchronousTestCase):
    def test_a_silent_node_is_named_after_the_timeout_and_the_rest_is_answered(self) -> None:
        clock = Clock()
        cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work), started=True)
        self.addCleanup(cooperator.stop)
        docker = FakeDocker()
        upstream = RequestTraversalAgent(docker)
        local = DockerProxy(upstream, SOCKET, cooperator=cooperator)
        peers = SilentPeers()
        network = SimNetwork()
        members = [network.make_member(1, node_name="node1"), network.make_member(2, node_name="node3")]
        site = Site(Aggregate(FanOut(clock, local, peers, timeout=TIMEOUT), members, "node1"), reactor=clock)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /containers/json HTTP/1.1\r\nHost: agent\r\n\r\n")
        for _ in range(10):
            clock.advance(0)
            upstream.flush()
        self.assertEqual(len(docker.seen), 1, "the local leg went to Docker")
        self.assertEqual(len(peers.pending), 1, "the other leg went to node3's agent")
        clock.advance(TIMEOUT - 0.01)
        self.assertEqual(transport.value(), b"", "answered before the per-node deadline")
        clock.advance(0.02)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(UNREACHABLE_HEADER.lower() + b": node3", head.lower())
        items = json.loads(body)
        self.assertEqual([item["Id"] for item in items], ["abc"])
        self.assertTrue(peers.pending[0].called, "the silent leg was cancelled")
