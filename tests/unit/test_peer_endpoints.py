"""Peer endpoints: a connection only to an address where a live member serves its agent."""
from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI

from portainer_agent.proxy.peer import PeerTLSPolicy, failed_before_sending
from portainer_agent.proxy.peer_endpoints import NoLiveAgent, PeerEndpoints


class PeerEndpointsTests(SynchronousTestCase):
    def endpoints(self, live: set[tuple[str, int]]) -> tuple[PeerEndpoints, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        policy = PeerTLSPolicy(lambda host, port: None, authenticated=False)
        return PeerEndpoints(reactor, policy, 5.0, lambda host, port: (host, port) in live), reactor

    def test_an_address_with_no_live_member_is_refused_without_dialling(self) -> None:
        endpoints, reactor = self.endpoints(set())
        endpoint = endpoints.endpointForURI(URI.fromBytes(b"https://10.0.0.1:9001/nodes"))
        failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Protocol)), NoLiveAgent)
        self.assertIn("10.0.0.1:9001", failure.getErrorMessage())
        self.assertTrue(failed_before_sending(failure), "nothing was sent: another manager may take it")
        self.assertEqual(reactor.tcpClients, [])

    def test_a_live_member_is_dialled_with_the_connect_timeout(self) -> None:
        endpoints, reactor = self.endpoints({("10.0.0.1", 9001)})
        endpoint = endpoints.endpointForURI(URI.fromBytes(b"https://10.0.0.1:9001/nodes"))
        self.assertNoResult(endpoint.connect(Factory.forProtocol(Protocol)))
        reactor.advance(0)  # HostnameEndpoint dials after resolving the literal address
        # (MemoryReactor's resolver answers 127.0.0.1 for any name)
        [(_, port, _, timeout, _)] = reactor.tcpClients
        self.assertEqual((port, timeout), (9001, 5.0))

    def test_liveness_is_checked_at_each_attempt(self) -> None:
        live: set[tuple[str, int]] = {("10.0.0.1", 9001)}
        reactor = MemoryReactorClock()
        policy = PeerTLSPolicy(lambda host, port: None, authenticated=False)
        endpoint = PeerEndpoints(reactor, policy, 5.0, lambda h, p: (h, p) in live).endpointForURI(
            URI.fromBytes(b"https://10.0.0.1:9001/"))
        live.clear()  # declared dead after the endpoint was made (the pool's retry reuses it)
        self.failureResultOf(endpoint.connect(Factory.forProtocol(Protocol)), NoLiveAgent)
