"""The Docker client on the wire, in memory: a scripted Docker sees the exact bytes the
client sends and answers with exact bytes (framing, keep-alive, HEAD, trailers, 101,
streamed request bodies with backpressure, retries on a stale kept connection)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH

from portainer_agent.docker.blocking import get_json_blocking
from portainer_agent.docker.client import DockerClient
from portainer_agent.docker.response import DockerResponse
from portainer_agent.docker.upgrade import Upgraded
from portainer_agent.docker.testing import MemoryEndpoint
from portainer_agent.docker.wire import ProtocolError
from portainer_agent.testing.threads import CheckedThread


class ScriptedDocker(Protocol):
    """Records what the client sent; the test writes the answers."""

    def __init__(self, servers: list["ScriptedDocker"]) -> None:
        servers.append(self)
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost = True

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.reason = reason


class Producer:
    """A request body producer the test drives."""

    def __init__(self, length: Any = UNKNOWN_LENGTH) -> None:
        self.length = length
        self.consumer: Any = None
        self.done: Deferred[None] = Deferred()
        self.events: list[str] = []

    def startProducing(self, consumer: Any) -> Deferred[None]:  # noqa: N802
        self.consumer = consumer
        return self.done

    def pauseProducing(self) -> None:  # noqa: N802
        self.events.append("pause")

    def resumeProducing(self) -> None:  # noqa: N802
        self.events.append("resume")

    def stopProducing(self) -> None:  # noqa: N802
        self.events.append("stop")


PING = b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\n\r\nOK"


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.servers: list[ScriptedDocker] = []
        self.endpoint = MemoryEndpoint(Factory.forProtocol(lambda: ScriptedDocker(self.servers)))
        self.clock = Clock()
        self.client = DockerClient(self.clock, self.endpoint)

    def flush(self) -> None:
        self.endpoint.flush()

    def respond(self, d: Deferred[Any], data: bytes, server: int = -1) -> Any:
        self.flush()
        self.servers[server].send(data)
        self.flush()
        return self.successResultOf(d)

    def body(self, response: DockerResponse) -> Body:
        body = Body()
        response.deliverBody(body)
        self.flush()
        return body

    def test_head_and_kept_alive_connection(self) -> None:
        d = self.client.request(b"GET", b"/v1.41/_ping", [(b"User-Agent", b"t")])
        self.flush()
        self.assertEqual(self.servers[0].received, b"GET /v1.41/_ping HTTP/1.1\r\nHost: docker\r\nUser-Agent: t\r\n\r\n")
        response = self.respond(d, PING)
        self.assertEqual((response.code, response.phrase, response.length), (200, b"OK", 2))
        self.assertEqual(response.raw_headers, [(b"Api-Version", b"1.41"), (b"Content-Length", b"2")])
        self.assertEqual(response.headers.getRawHeaders(b"api-version"), [b"1.41"])
        body = self.body(response)
        self.assertEqual(body.data, b"OK")
        assert body.reason is not None
        self.assertIsInstance(body.reason.value, ResponseDone)
        # The second request goes on the same connection.
        second = self.client.request(b"GET", b"/info")
        self.assertEqual(self.body(self.respond(second, PING)).data, b"OK")
        self.assertEqual(len(self.servers), 1)

    def test_head_answer_ends_with_its_head(self) -> None:
        d = self.client.request(b"HEAD", b"/_ping")
        response = self.respond(d, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(self.body(response).data, b"")
        # The connection is reused and the next answer parsed from its first byte.
        second = self.client.request(b"GET", b"/_ping")
        self.assertEqual(self.body(self.respond(second, PING)).data, b"OK")
        self.assertEqual(len(self.servers), 1)

    def test_chunked_body_and_trailers(self) -> None:
        d = self.client.request(b"GET", b"/containers/x/export")
        response = self.respond(d, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n3\r\nabc\r\n")
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body = self.body(response)
        self.assertEqual((body.data, body.reason), (b"abc", None))
        self.servers[0].send(b"2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n")
        self.flush()
        self.assertEqual(body.data, b"abcde")
        self.assertIsNotNone(body.reason)
        self.assertEqual(response.trailers, [(b"X-Sum", b"5")])

    def test_close_delimited_body_ends_at_close_and_the_connection_is_not_kept(self) -> None:
        d = self.client.request(b"GET", b"/version")
        response = self.respond(d, b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nuntil")
        body = self.body(response)
        assert self.servers[0].transport is not None
        self.servers[0].transport.loseConnection()
        self.flush()
        self.assertEqual(body.data, b"until")
        self.assertIsNotNone(body.reason)
        second = self.client.request(b"GET", b"/_ping")
        self.respond(second, PING)
        self.assertEqual(len(self.servers), 2)

    def test_body_is_held_until_delivered_with_the_socket_paused(self) -> None:
        d = self.client.request(b"GET", b"/info")
        response = self.respond(d, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.servers[0].send(b"cd")
        self.flush()
        self.assertEqual(self.body(response).data, b"abcd")

    def test_stale_kept_connection_is_retried_once_on_a_new_one(self) -> None:
        self.body(self.respond(self.client.request(b"GET", b"/_ping"), PING))
        d = self.client.request(b"GET", b"/info")
        self.flush()
        # Docker had closed the kept connection: nothing answered on it.
        assert self.servers[0].transport is not None
        self.servers[0].transport.loseConnection()
        self.flush()
        self.assertEqual(len(self.servers), 2)
        self.assertTrue(self.servers[1].received.startswith(b"GET /info HTTP/1.1\r\n"))
        self.assertEqual(self.respond(d, PING).code, 200)

    def test_upgrade_gives_the_bytes_after_the_101_head(self) -> None:
        d = self.client.upgrade(b"POST", b"/exec/e1/start", [(b"Connection", b"Upgrade"), (b"Upgrade", b"tcp")],
                                b'{"Tty":false}')
        self.flush()
        self.assertTrue(self.servers[0].received.endswith(b'Content-Length: 13\r\n\r\n{"Tty":false}'))
        upgraded = self.respond(d, b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\nfirst")
        self.assertIsInstance(upgraded, Upgraded)
        self.assertEqual((upgraded.code, upgraded.rest), (101, b"first"))
        stream = Body()
        upgraded.hand_over(stream)
        self.servers[0].send(b"then more")
        self.flush()
        self.assertEqual(stream.data, b"then more")

    def test_upgrade_refused_is_a_normal_response(self) -> None:
        d = self.client.upgrade(b"POST", b"/containers/x/attach", [(b"Upgrade", b"tcp")])
        response = self.respond(d, b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual((response.code, self.body(response).data), (404, b"{}"))
        # An upgrade's connection never goes back to the pool, even for a normal answer.
        self.assertTrue(self.servers[0].lost)
        self.respond(self.client.request(b"GET", b"/_ping"), PING)
        self.assertEqual(len(self.servers), 2)

    def test_upgrade_after_a_kept_connection_takes_a_fresh_one(self) -> None:
        self.body(self.respond(self.client.request(b"GET", b"/_ping"), PING))
        d = self.client.upgrade(b"POST", b"/exec/e1/start", [(b"Upgrade", b"tcp")])
        upgraded = self.respond(d, b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
        self.assertIsInstance(upgraded, Upgraded)
        self.assertEqual(len(self.servers), 2)
        self.assertFalse(self.servers[0].lost)

    def test_101_to_a_plain_request_breaks_the_response(self) -> None:
        d = self.client.request(b"GET", b"/_ping")
        response = self.respond(d, b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\nraw")
        body = self.body(response)
        assert body.reason is not None
        self.assertIsInstance(body.reason.value, ResponseFailed)
        self.assertTrue(body.reason.value.reasons[0].check(ProtocolError))
        self.assertTrue(self.servers[0].lost)

    def test_streamed_body_is_chunked_with_backpressure(self) -> None:
        producer = Producer()
        d = self.client.request(b"PUT", b"/containers/x/archive", [], producer)
        self.flush()
        server = self.servers[0]
        self.assertIn(b"Transfer-Encoding: chunked\r\n\r\n", server.received)
        producer.consumer.write(b"tar bytes")
        self.flush()
        self.assertTrue(server.received.endswith(b"9\r\ntar bytes\r\n"))
        # The socket's send buffer is full: the transport pauses the body.
        self.client_transport().producer.pauseProducing()
        self.assertEqual(producer.events, ["pause"])
        producer.done.callback(None)
        self.flush()
        self.assertTrue(server.received.endswith(b"0\r\n\r\n"))
        self.assertEqual(self.respond(d, PING).code, 200)

    def client_transport(self) -> Any:
        pump = self.endpoint.pumps[-1]
        return pump.clientIO

    def test_known_length_body_is_sent_as_is(self) -> None:
        producer = Producer(length=5)
        self.client.request(b"PUT", b"/x", [], producer)
        self.flush()
        producer.consumer.write(b"12345")
        self.flush()
        self.assertTrue(self.servers[0].received.endswith(b"Content-Length: 5\r\n\r\n12345"))

    def test_answer_before_the_body_is_sent_stops_it_and_drops_the_connection(self) -> None:
        producer = Producer()
        d = self.client.request(b"PUT", b"/containers/missing/archive", [], producer)
        response = self.respond(d, b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.body(response).data, b"{}")
        self.assertIn("stop", producer.events)
        self.assertTrue(self.servers[0].lost)

    def test_garbage_is_a_protocol_error(self) -> None:
        d = self.client.request(b"GET", b"/_ping")
        self.flush()
        self.servers[0].send(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.flush()
        self.failureResultOf(d, ProtocolError)

    def test_invalid_method_or_target_is_refused_before_connecting(self) -> None:
        for method, target in ((b"GET", b"/x\x7f"), (b"GET", b"/a b"), (b"G\nET", b"/"), (b"GET", b"")):
            self.assertRaises(ValueError, self.client.request, method, target)
        self.assertEqual(self.servers, [])

    def test_get_json(self) -> None:
        d = self.client.get_json("/info")
        self.flush()
        self.servers[0].send(b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"Name":"n1"}')
        self.flush()
        self.assertEqual(self.successResultOf(d), (200, {"Name": "n1"}))

    def test_cancel_drops_the_connection(self) -> None:
        d = self.client.request(b"GET", b"/events")
        self.flush()
        d.cancel()
        self.flush()
        self.assertTrue(self.servers[0].lost)
        self.failureResultOf(d)


class BlockingGetTests(SynchronousTestCase):
    """The start-up read (before the reactor runs) through the same head and parser."""

    def serve_once(self, answer: bytes) -> str:
        directory = tempfile.mkdtemp(prefix="pa-core-")
        path = os.path.join(directory, "docker.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        self.seen = b""

        def serve() -> None:
            connection, _ = server.accept()
            with connection:
                while b"\r\n\r\n" not in self.seen:
                    self.seen += connection.recv(4096)
                connection.sendall(answer)
            server.close()

        thread = CheckedThread.started(serve)
        self.addCleanup(thread.finish, 10)
        self.addCleanup(shutil.rmtree, directory, True)
        return path

    def test_chunked_json(self) -> None:
        body = json.dumps({"Name": "node-1", "Swarm": {}}).encode()
        path = self.serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                               % (len(body), body))
        self.assertEqual(get_json_blocking(path, "/info", timeout=10), (200, {"Name": "node-1", "Swarm": {}}))
        self.assertTrue(self.seen.startswith(b"GET /info HTTP/1.1\r\nHost: docker\r\n"))

    def test_cut_answer_is_a_protocol_error(self) -> None:
        path = self.serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        self.assertRaises(ProtocolError, get_json_blocking, path, "/info", 10)


class QuietTests(SynchronousTestCase):
    def test_no_factory_log_lines_per_connection(self) -> None:
        # A connection per hijack used to log "Starting factory"/"Stopping factory" at INFO.
        from twisted.python import log

        from portainer_agent.docker.connection import ConnectionFactory

        events: list[dict[str, Any]] = []
        log.addObserver(events.append)
        self.addCleanup(log.removeObserver, events.append)
        factory = ConnectionFactory(Protocol())
        factory.doStart()
        factory.doStop()
        self.assertEqual([e for e in events if "factory" in str(e.get("message", "")).lower()
                          or "factory" in str(e.get("log_format", "")).lower()], [])
