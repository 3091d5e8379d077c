"""Request bodies streamed to Docker as they arrive, through the agent's real site
(``AgentSite``/``AgentRequest``, root, proxy, Docker client) in memory: the client writes
raw bytes, a scripted Docker sees exactly what reaches it and when."""
from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from portainer_agent.docker.client import DockerClient
from portainer_agent.docker.testing import MemoryEndpoint
from portainer_agent.errors import AgentError
from portainer_agent.http.root import AgentRoot
from portainer_agent.http.site import AgentSite
from portainer_agent.http.request import AgentRequests
from portainer_agent.http.router import Router, streaming_paths
from portainer_agent.toolbox.upload import BodyAlreadyConsumed
from portainer_agent.proxy.dispatch import Destinations
from portainer_agent.proxy.local import DockerProxy
from portainer_agent.proxy.outgoing import request_body_producer

from .memory import RecordingHandler
from .test_docker_client import ScriptedDocker

MB = 1 << 20


def head(method: bytes, target: bytes, length: int | None, *extra: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, target), b"Host: agent", b"Content-Type: application/x-tar", *extra]
    lines.append(b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Refuse:
    """A guard whose signature check fails (``authenticates`` is what the body mixin asks)."""

    def authenticates(self, request: Request) -> bool:
        return False

    def check(self, request: Request) -> None:
        raise AgentError(403, "Unauthorized", "no signature")


class Agent:
    def __init__(self, guard: Any = None, endpoints: dict[bytes, Any] | None = None) -> None:
        self.servers: list[ScriptedDocker] = []
        self.endpoint = MemoryEndpoint(Factory.forProtocol(lambda: ScriptedDocker(self.servers)))
        self.clock = Clock()
        proxy = DockerProxy(DockerClient(self.clock, self.endpoint), "/docker.sock")
        router = Router(streaming=streaming_paths(endpoints or {}))
        self.root = AgentRoot(Destinations(proxy, RecordingHandler()), router, guard=guard, endpoints=endpoints)
        self.site = AgentSite(self.root, AgentRequests(router, guard), reactor=self.clock)
        self.channel: Any = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.client = StringTransport()
        self.channel.makeConnection(self.client)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)
        self.endpoint.flush()

    @property
    def docker(self) -> ScriptedDocker:
        return self.servers[-1]

    def docker_answers(self, data: bytes) -> None:
        self.docker.send(data)
        self.endpoint.flush()

    def docker_received_body(self) -> bytes:
        return self.docker.received.partition(b"\r\n\r\n")[2]

    def docker_socket(self) -> Any:
        """The agent's end of the Docker connection (an in-memory transport)."""
        return self.endpoint.pumps[-1].clientIO


class StreamingUploadTests(SynchronousTestCase):
    def test_body_reaches_docker_while_the_client_is_still_sending(self) -> None:
        agent = Agent()
        agent.send(head(b"PUT", b"/v1.41/containers/c1/archive?path=/tmp", 3 * MB))
        # Docker has the request before any of the body.
        self.assertTrue(agent.docker.received.startswith(b"PUT /v1.41/containers/c1/archive?path=/tmp HTTP/1.1\r\n"))
        self.assertIn(b"Content-Length: %d\r\n" % (3 * MB), agent.docker.received)
        agent.send(b"a" * MB)
        self.assertEqual(agent.docker_received_body(), b"a" * MB)
        agent.send(b"b" * MB)
        agent.send(b"c" * MB)
        self.assertEqual(agent.docker_received_body(), b"a" * MB + b"b" * MB + b"c" * MB)
        agent.docker_answers(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(agent.client.value().startswith(b"HTTP/1.1 200 OK\r\n"), agent.client.value()[:200])

    def test_slow_docker_pauses_the_client(self) -> None:
        agent = Agent()
        agent.send(head(b"POST", b"/v1.41/images/load", 4 * MB) + b"x" * 100_000)
        self.assertEqual(agent.client.producerState, "producing")
        # Docker's socket buffer is full: its transport pauses the body, which pauses the client.
        agent.docker_socket().producer.pauseProducing()
        self.assertEqual(agent.client.producerState, "paused")
        # What still arrives (already read by the kernel) is held, not sent, and bounded.
        agent.send(b"y" * 65536)
        self.assertEqual(len(agent.docker_received_body()), 100_000)
        self.assertEqual(agent.client.producerState, "paused")
        agent.docker_socket().producer.resumeProducing()
        agent.endpoint.flush()
        self.assertEqual(agent.docker_received_body(), b"x" * 100_000 + b"y" * 65536)
        self.assertEqual(agent.client.producerState, "producing")

    def test_chunked_body_streams_chunked(self) -> None:
        agent = Agent()
        agent.send(head(b"POST", b"/v1.41/build?t=x", None) + b"5\r\nhello\r\n")
        self.assertIn(b"Transfer-Encoding: chunked\r\n", agent.docker.received)
        self.assertTrue(agent.docker.received.endswith(b"5\r\nhello\r\n"))
        agent.send(b"6\r\n world\r\n0\r\n\r\n")
        self.assertTrue(agent.docker.received.endswith(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"))

    def test_expect_100_continue_is_answered_once_and_not_forwarded(self) -> None:
        agent = Agent()
        agent.send(head(b"PUT", b"/containers/c1/archive?path=/", 200_000, b"Expect: 100-continue"))
        self.assertEqual(agent.client.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertNotIn(b"expect", agent.docker.received.lower())
        agent.send(b"q" * 200_000)
        agent.docker_answers(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(agent.client.value().count(b"100 Continue"), 1)
        self.assertIn(b"HTTP/1.1 200 OK\r\n", agent.client.value())

    def test_early_answer_drops_the_rest_and_keeps_the_connection(self) -> None:
        agent = Agent()
        agent.send(head(b"PUT", b"/containers/missing/archive?path=/", MB) + b"a" * 100_000)
        agent.docker_answers(b'HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}')
        # The answer is out, the Docker connection (mid-body) is closed, the client still sends.
        self.assertTrue(agent.client.value().startswith(b"HTTP/1.1 404 Not Found\r\n"))
        self.assertTrue(agent.docker.lost)
        self.assertEqual(agent.client.producerState, "producing")
        agent.send(b"b" * (MB - 100_000))
        # The rest was dropped, and the connection serves the next request.
        agent.client.clear()
        agent.send(b"GET /_ping HTTP/1.1\r\nHost: agent\r\n\r\n")
        agent.docker_answers(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
        self.assertTrue(agent.client.value().startswith(b"HTTP/1.1 200 OK\r\n"), agent.client.value())
        self.assertTrue(agent.client.value().endswith(b"OK"))

    def test_client_gone_mid_upload_aborts_the_docker_request(self) -> None:
        agent = Agent()
        agent.send(head(b"POST", b"/images/load", MB) + b"a" * 100_000)
        agent.channel.connectionLost(Failure(ConnectionDone()))
        agent.endpoint.flush()
        # Docker must not take a truncated body for a whole one.
        self.assertTrue(agent.docker.lost)

    def test_small_body_is_read_whole_and_sent_with_the_head(self) -> None:
        agent = Agent()
        agent.send(head(b"POST", b"/containers/create", 13))
        self.assertEqual(agent.servers, [])
        agent.send(b'{"Image":"x"}')
        self.assertTrue(agent.docker.received.endswith(b'Content-Length: 13\r\n\r\n{"Image":"x"}'))

    def test_unauthenticated_upload_never_reaches_docker(self) -> None:
        agent = Agent(guard=Refuse())
        agent.send(head(b"PUT", b"/containers/c1/archive?path=/", MB) + b"a" * MB)
        self.assertEqual(agent.servers, [])
        self.assertTrue(agent.client.value().startswith(b"HTTP/1.1 403"), agent.client.value()[:100])

    def test_local_agent_endpoints_read_their_body_whole(self) -> None:
        seen: list[bytes] = []

        class Endpoint:
            def render(self, request: Request, route: Any) -> bytes:
                assert request.content is not None
                seen.append(request.content.read())
                return b"{}"

        agent = Agent(endpoints={b"/browse/put": Endpoint()})
        agent.send(head(b"POST", b"/browse/put", 100_000) + b"p" * 100_000)
        self.assertEqual(seen, [b"p" * 100_000])
        self.assertEqual(agent.servers, [])


class BodyOnceTests(SynchronousTestCase):
    """A streamed body goes to one upstream; a failover may retry only before any byte left."""

    def streaming_request(self) -> Any:
        captured: list[Any] = []

        class Capture:
            def render(self, request: Request) -> Any:
                captured.append(request)
                from twisted.web.server import NOT_DONE_YET
                return NOT_DONE_YET

        agent = Agent()
        agent.root.destinations.docker = Capture()
        agent.send(head(b"PUT", b"/containers/c1/archive?path=/", MB) + b"a" * 1000)
        [request] = captured
        return request

    def consumer(self) -> Any:
        received: list[bytes] = []
        return type("Consumer", (), {"write": lambda self, data: received.append(data),
                                     "received": received})()

    def test_second_producer_works_if_the_first_never_started(self) -> None:
        request = self.streaming_request()
        request_body_producer(request)  # a first attempt whose connection was refused
        second = request_body_producer(request)
        consumer = self.consumer()
        second.startProducing(consumer)
        self.assertEqual(b"".join(consumer.received), b"a" * 1000)

    def test_second_producer_fails_once_bytes_left(self) -> None:
        request = self.streaming_request()
        request_body_producer(request).startProducing(self.consumer())
        second = request_body_producer(request)
        self.assertRaises(BodyAlreadyConsumed, second.startProducing, self.consumer())
