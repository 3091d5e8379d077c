"""Peer TLS over real loopback sockets: pinning by SPKI fingerprint, the unauthenticated
fallback (logged once), and the handshake deadline."""
from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
import treq
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Site

from portainer_agent.proxy.peer import PeerPinMissing, PeerTLSPolicy
from portainer_agent.tls.certs import generate_self_signed
from portainer_agent.tls.server import TLSServerEndpoint, server_options


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


class PeerTLSTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def setUp(self) -> Any:
        self.identity = generate_self_signed(["127.0.0.1"])
        endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
                                     server_options(self.identity))
        site = Site(Hello())
        site.noisy = False
        self.port = yield endpoint.listen(site)
        self.addCleanup(self.port.stopListening)
        self.url = b"https://127.0.0.1:%d/" % self.port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def agent(self, policy: PeerTLSPolicy) -> Agent:
        return Agent(reactor, contextFactory=policy, pool=self.pool)

    @inlineCallbacks
    def test_the_announced_fingerprint_is_accepted(self) -> Any:
        asked: list[tuple[str, int]] = []

        def pin_for(host: str, port: int) -> str:
            asked.append((host, port))
            return self.identity.fingerprint

        response = yield self.agent(PeerTLSPolicy(pin_for, authenticated=True)).request(b"GET", self.url)
        self.assertEqual((yield treq.content(response)), b"hello")
        self.assertEqual(asked, [("127.0.0.1", self.port.getHost().port)])

    @inlineCallbacks
    def test_another_certificate_is_refused(self) -> Any:
        other = generate_self_signed(["127.0.0.1"]).fingerprint
        d = self.agent(PeerTLSPolicy(lambda h, p: other, authenticated=True)).request(b"GET", self.url)
        failure = yield self.assertFailure(d, ResponseNeverReceived)
        self.assertIn("certificate verify failed", str(failure.reasons[0].value))

    def test_authenticated_membership_without_a_pin_refuses_to_connect(self) -> None:
        policy = PeerTLSPolicy(lambda h, p: None, authenticated=True)
        self.assertRaises(PeerPinMissing, policy.creatorForNetloc, b"127.0.0.1", 9001)

    @inlineCallbacks
    def test_unauthenticated_membership_connects_unverified_and_says_so_once(self) -> Any:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        policy = PeerTLSPolicy(lambda h, p: "not-the-pin", authenticated=False)
        for _ in range(3):
            response = yield self.agent(policy).request(b"GET", self.url)
            self.assertEqual((yield treq.content(response)), b"hello")
        warnings = [e for e in events if "not verified" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    @inlineCallbacks
    def test_a_peer_that_never_answers_the_handshake_is_cut_at_the_deadline(self) -> Any:
        silent = Factory.forProtocol(Protocol)
        silent.noisy = False
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(silent)
        self.addCleanup(port.stopListening)
        policy = PeerTLSPolicy(lambda h, p: self.identity.fingerprint, authenticated=True, clock=reactor,
                               handshake_timeout=0.2)
        d = self.agent(policy).request(b"GET", b"https://127.0.0.1:%d/" % port.getHost().port)
        yield self.assertFailure(d, ResponseNeverReceived)
