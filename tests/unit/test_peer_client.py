"""The client between agents sends through treq exactly what it is given and hands back
exactly what the peer answered (:mod:`portainer_agent.proxy.peer_client`).

A recording ``IAgent`` stands where the pinned agent on the pool would be, under the treq
client, and sees the request line, headers and body producer that would go on the wire.
"""
from __future__ import annotations

from io import BytesIO
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from zope.interface import implementer

from portainer_agent.cluster.member import Member
from portainer_agent.proxy.peer import PeerForwarder, PeerTLSPolicy, peer_base_url
from portainer_agent.proxy.peer_client import PeerClient

#: URIs treq (hyperlink) would change: an encoded JSON filter (kept), an encoded slash in a
#: path, an empty query, raw brackets and braces in a query, an IPv6 literal host.
VERBATIM_URIS = [
    b"https://10.0.0.1:9001/v1.41/containers/json?all=1&filters=%7B%22label%22%3A%5B%22a%3Db%22%5D%7D",
    b"https://10.0.0.1:9001/v1.41/volumes/a%2Fb/../c//d?x=%2f&y=a+b&z=%41",
    b"https://10.0.0.1:9001/v1.41/containers/json?",
    b"https://10.0.0.1:9001/v1.41/containers/json?filters={\"label\":[\"a=b\"]}&x=[1]|^`",
    b"https://[fd00::7]:9001/v1.41/info?",
]


class FakeResponse:
    code = 200
    phrase = b"OK"
    version = (b"HTTP", 1, 1)
    length: Any = UNKNOWN_LENGTH
    request = None
    previousResponse = None

    def __init__(self, headers: dict[bytes, list[bytes]] | None = None) -> None:
        self.headers = Headers(headers or {})

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        raise AssertionError("not read in these tests")


@implementer(IAgent)
class RecordingAgent:
    """Records what would go on the wire; answers when told to."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, Headers | None, Any]] = []
        self.pending: list[Deferred[Any]] = []
        self.cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> "Deferred[Any]":  # noqa: N803
        self.sent.append((method, uri, headers, bodyProducer))

        def cancel(d: "Deferred[Any]") -> None:
            self.cancelled += 1

        pending: Deferred[Any] = Deferred(cancel)
        self.pending.append(pending)
        return pending


def headers_of(headers: Headers | None) -> list[tuple[bytes, list[bytes]]]:
    return sorted((name.lower(), values) for name, values in (headers or Headers()).getAllRawHeaders())


class PeerClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.agent = RecordingAgent()
        self.client = PeerClient(cast(IAgent, self.agent), Clock())

    def test_uri_reaches_the_agent_byte_for_byte(self) -> None:
        for uri in VERBATIM_URIS:
            self.client.request(b"GET", uri)
            self.assertEqual(self.agent.sent[-1][1], uri)

    def test_method_headers_and_body_producer_go_as_given(self) -> None:
        headers = Headers({b"X-Registry-Auth": [b"abc"], b"accept-encoding": [b"identity"],
                           b"Content-Type": [b"application/x-tar"]})
        body = FileBodyProducer(BytesIO(b"tar bytes"))
        self.client.request(b"post", VERBATIM_URIS[0], headers, body)
        method, _, sent_headers, sent_body = self.agent.sent[-1]
        self.assertEqual(method, b"post")
        self.assertIs(sent_body, body)
        # No Accept-Encoding: gzip, no Content-Type of treq's, no Cookie.
        self.assertEqual(headers_of(sent_headers), headers_of(headers))

    def test_no_headers_stay_no_headers(self) -> None:
        self.client.request(b"GET", VERBATIM_URIS[1])
        self.assertEqual(headers_of(self.agent.sent[-1][2]), [])

    def test_the_peer_response_comes_back_untouched(self) -> None:
        plain, gzipped = FakeResponse(), FakeResponse({b"Content-Encoding": [b"gzip"], b"Content-Length": [b"42"]})
        for response in (plain, gzipped):
            before = headers_of(response.headers)
            answers: list[Any] = []
            self.client.request(b"GET", VERBATIM_URIS[0]).addCallback(answers.append)
            self.agent.pending[-1].callback(response)
            # The very object (not decoded, not wrapped), headers as received (no empty
            # Content-Encoding added).
            self.assertIs(answers[0], response)
            self.assertEqual(headers_of(response.headers), before)

    def test_a_cookie_a_peer_sets_is_never_sent(self) -> None:
        self.client.request(b"GET", VERBATIM_URIS[0])
        self.agent.pending[-1].callback(FakeResponse({b"Set-Cookie": [b"session=secret; Path=/"]}))
        self.client.request(b"GET", VERBATIM_URIS[0])
        self.assertEqual(headers_of(self.agent.sent[-1][2]), [])

    def test_cancelling_cancels_the_agent_request(self) -> None:
        pending = self.client.request(b"GET", VERBATIM_URIS[0])
        pending.cancel()
        self.assertEqual(self.agent.cancelled, 1)
        self.failureResultOf(pending, CancelledError)

    def test_a_uri_the_agent_refuses_raises_at_once(self) -> None:
        client = PeerClient(_Refusing(), Clock())
        self.assertRaises(ValueError, client.request, b"GET", b"https://10.0.0.1:9001/a b")


@implementer(IAgent)
class _Refusing:
    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:  # noqa: N803
        raise ValueError(f"invalid URI {uri!r}")


class ForwardedURITests(SynchronousTestCase):
    """What :class:`PeerForwarder` sends: the peer's base URL and the client's URI as it came."""

    def test_forwarded_uri_is_the_clients_byte_for_byte(self) -> None:
        agent = RecordingAgent()
        peers = PeerForwarder(Clock(), PeerTLSPolicy(lambda h, p: "00", authenticated=True), cast(Any, None),
                              lambda: "node3", cast(Any, None), agent=cast(IAgent, agent))
        member = Member(node_name="node1", node_id="id1", role="manager", is_leader=False, api_addr="fd00::7",
                        api_port=9001, cluster_addr="fd00::7", cluster_port=7946, version="test",
                        cert_fingerprint="00")
        for uri in (b"/v1.41/containers/json?all=1&filters=%7B%22label%22%3A%5B%22a%3Db%22%5D%7D",
                    b"/v1.41/volumes/a%2Fb?", b"/v1.41/containers/json?filters={\"x\":[1]}"):
            request = Request(DummyChannel())
            request.method, request.uri = b"GET", uri
            request.content = BytesIO()
            peers.send(request, member)
            method, sent, headers, body = agent.sent[-1]
            self.assertEqual(sent, peer_base_url(member) + uri)
            self.assertIsNone(body)
            self.assertNotIn(b"accept-encoding", dict(headers_of(headers)))
