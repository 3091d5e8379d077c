"""Unauthenticated request bodies are dropped as they arrive, not spooled to disk."""
from __future__ import annotations

import io
import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from portainer_agent.errors import AgentError
from portainer_agent.security.body import DiscardUnauthenticatedBody
from portainer_agent.security.guard import SignatureGuard
from portainer_agent.security.notary import Notary
from portainer_agent.testing.signing import PortainerSigner

BODY_SIZE = 300_000  # above twisted.web's 100 kB in-memory limit: would go to a temporary file


class CountingRequest(Request):
    """Records what reaches twisted.web's body storage."""

    stored = 0
    spooled_to_file = False

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        self.spooled_to_file = not isinstance(self.content, io.BytesIO)

    def handleContentChunk(self, data: bytes) -> None:
        self.stored += len(data)
        super().handleContentChunk(data)


class GuardedRequest(DiscardUnauthenticatedBody, CountingRequest):
    pass


class Root(Resource):
    """Stands for AgentRoot: holds ``guard`` and checks it in render."""

    isLeaf = True

    def __init__(self, guard: SignatureGuard) -> None:
        super().__init__()
        self.guard = guard
        self.bodies: list[int] = []

    def render(self, request: Request) -> bytes:
        try:
            self.guard.check(request)
        except AgentError as error:
            request.setResponseCode(error.status)
            return error.body()
        self.bodies.append(len(request.content.read()))
        return b"ok"


class BodyDiscardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.portainer = PortainerSigner.generate()
        self.root = Root(SignatureGuard(Notary()))
        self.site = Site(self.root, requestFactory=GuardedRequest)
        self.requests: list[GuardedRequest] = []
        original = self.site.requestFactory

        def factory(*args, **kwargs):
            request = original(*args, **kwargs)
            # The guard is given to each request (as AgentRequests does), not found on the site.
            request.guard = getattr(self.site.resource, "guard", None)
            self.requests.append(request)
            return request

        self.site.requestFactory = factory

    def send(self, headers: dict[str, str], chunked: bool = False) -> bytes:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000))
        channel.makeConnection(transport)
        head = b"POST /containers/create HTTP/1.1\r\nHost: agent\r\n"
        for name, value in headers.items():
            head += f"{name}: {value}\r\n".encode()
        body = b"x" * BODY_SIZE
        if chunked:
            head += b"Transfer-Encoding: chunked\r\n\r\n"
            payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                               for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
        else:
            head += f"Content-Length: {len(body)}\r\n\r\n".encode()
            payload = body
        channel.dataReceived(head)
        for start in range(0, len(payload), 16384):
            channel.dataReceived(payload[start:start + 16384])
        self.addCleanup(channel.connectionLost, None)
        return transport.value()

    def test_unsigned_body_is_dropped_and_request_refused(self) -> None:
        for chunked in (False, True):
            with self.subTest(chunked=chunked):
                response = self.send({}, chunked=chunked)
                self.assertIn(b"403", response.split(b"\r\n", 1)[0])
                self.assertEqual(json.loads(response.split(b"\r\n\r\n", 1)[1])["message"],
                                 "Missing request signature headers")
                request = self.requests[-1]
                self.assertTrue(request.discarding_body)
                self.assertEqual((request.stored, request.spooled_to_file), (0, False))

    def test_badly_signed_body_is_dropped(self) -> None:
        response = self.send(PortainerSigner.generate().headers("wrong message"))
        self.assertIn(b"403", response.split(b"\r\n", 1)[0])
        self.assertTrue(self.requests[-1].discarding_body)
        self.assertEqual(self.root.bodies, [])

    def test_signed_body_is_kept_whole(self) -> None:
        for chunked in (False, True):
            with self.subTest(chunked=chunked):
                response = self.send(self.portainer.headers(), chunked=chunked)
                self.assertIn(b"200", response.split(b"\r\n", 1)[0])
                request = self.requests[-1]
                self.assertFalse(request.discarding_body)
                self.assertEqual((request.stored, request.spooled_to_file), (BODY_SIZE, True))
        self.assertEqual(self.root.bodies, [BODY_SIZE, BODY_SIZE])

    def test_without_a_guard_nothing_changes(self) -> None:
        plain = Resource()
        plain.isLeaf = True
        plain.render = lambda request: b"%d" % len(request.content.read())  # type: ignore[method-assign]
        self.site.resource = plain
        response = self.send({})
        self.assertTrue(response.endswith(str(BODY_SIZE).encode()))
