"""Hijacked Docker connections: the upgrade head, the status parser, and the proxy
driven in memory (client on a StringTransport, Docker socket on a MemoryReactor)."""
from __future__ import annotations

import json

from typing import Any, cast

from hypothesis import given, settings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from portainer_agent import __version__
from portainer_agent.docker.client import DockerClient
from portainer_agent.docker.wire import ProtocolError, ResponseReader
from portainer_agent.proxy.splice import (
    MAX_HIJACK_REQUEST_BODY,
    HijackProxy,
    build_upgrade_head,
    enable_keepalive,
    half_close_means_departure,
)
from portainer_agent.http.inflight import InFlight
from portainer_agent.http.root import AgentRoot
from portainer_agent.http.site import AgentSite
from portainer_agent.http.request import AgentRequests
from portainer_agent.metrics import AgentMetrics
from portainer_agent.proxy.dispatch import Destinations

from .memory import SOCKET, RecordingHandler, raw_request


def dummy(method: bytes, uri: bytes, headers: list[tuple[bytes, bytes]]) -> Request:
    request = DummyRequest([])
    request.method, request.uri = method, uri
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    return cast(Request, request)


def head_lines(head: bytes) -> tuple[list[bytes], bytes]:
    top, _, body = head.partition(b"\r\n\r\n")
    return top.split(b"\r\n"), body


class HalfCloseMeaningTests(SynchronousTestCase):
    def test_an_attach_without_stdin_departs(self) -> None:
        for path, query in ((b"/v1.41/containers/abc/attach", b"stream=1&stdout=1"),
                            (b"/containers/abc/attach", b""),
                            (b"/containers/abc/attach", b"stdin=0&stream=1"),
                            (b"/containers/abc/attach", b"stdin=false")):
            self.assertTrue(half_close_means_departure(path, query), (path, query))

    def test_streams_with_stdin_half_close(self) -> None:
        for path, query in ((b"/v1.41/containers/abc/attach", b"stream=1&stdin=1"),
                            (b"/containers/abc/attach", b"stdin=true"),
                            (b"/exec/e1/start", b""),
                            (b"/session", b""),
                            (b"/attach", b"")):
            self.assertFalse(half_close_means_departure(path, query), (path, query))


class BuildUpgradeHeadTests(SynchronousTestCase):
    def test_exec_start_head(self) -> None:
        body = b'{"Detach":false,"Tty":false}'
        request = dummy(b"POST", b"/v1.41/exec/4f1c/start?x=1", [
            (b"Host", b"agent:9001"),
            (b"Connection", b"Upgrade, X-Hop"),
            (b"Upgrade", b"tcp"),
            (b"Content-Length", b"999"),
            (b"Content-Type", b"application/json"),
            (b"User-Agent", b"Docker-Client/28.2.2 (linux)"),
            (b"X-PortainerAgent-Target", b"node-1"),
            (b"X-Hop", b"secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"Expect", b"100-continue"),
            (b"Accept", b"a"),
            (b"Accept", b"b"),
        ])
        lines, sent_body = head_lines(build_upgrade_head(request, body))
        self.assertEqual(lines[0], b"POST /v1.41/exec/4f1c/start?x=1 HTTP/1.1")
        self.assertEqual(sent_body, body)
        names = [line.partition(b":")[0].lower() for line in lines[1:]]
        for name in (b"host", b"connection", b"upgrade", b"content-length"):
            self.assertEqual(names.count(name), 1, name)
        for name in (b"x-hop", b"keep-alive", b"proxy-authorization", b"expect"):
            self.assertNotIn(name, names)
        self.assertIn(b"Host: docker", lines)
        self.assertIn(b"Connection: Upgrade", lines)
        self.assertIn(b"Upgrade: tcp", lines)
        self.assertIn(b"Content-Length: %d" % len(body), lines)
        lower = [line.lower() for line in lines]
        self.assertIn(b"x-portaineragent-target: node-1", lower)
        self.assertIn(b"content-type: application/json", lower)
        self.assertEqual([line for line in lower if line.startswith(b"accept:")], [b"accept: a", b"accept: b"])

    def test_upgrade_protocol_is_kept(self) -> None:
        request = dummy(b"POST", b"/session", [(b"Connection", b"Upgrade"), (b"Upgrade", b"h2c")])
        lines, _ = head_lines(build_upgrade_head(request, b""))
        self.assertIn(b"Upgrade: h2c", lines)
        self.assertIn(b"Content-Length: 0", lines)


class _Head:
    def __init__(self) -> None:
        self.seen: tuple[int, bytes, list[tuple[bytes, bytes]]] | None = None

    def head(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.seen = (code, phrase, headers)

    def body(self, data: bytes) -> None:
        pass

    def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        pass

    def upgraded(self, rest: bytes) -> None:
        pass


def parse_response_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The status and headers the wire parser reads from ``head`` (ValueError if none)."""
    sink = _Head()
    try:
        ResponseReader(sink).feed(head + b"\r\n\r\n")
    except ProtocolError as error:
        raise ValueError(str(error)) from None
    if sink.seen is None:
        raise ValueError("no complete head")
    return sink.seen


class ParseResponseHeadTests(SynchronousTestCase):
    def test_docker_101(self) -> None:
        head = (b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\n"
                b"Upgrade: tcp\r\nApi-Version: 1.41\r\nDate: Wed, 25 Nov 2026 18:00:00 GMT")
        code, phrase, headers = parse_response_head(head)
        self.assertEqual((code, phrase), (101, b"UPGRADED"))
        self.assertEqual(headers[0], (b"Content-Type", b"application/vnd.docker.raw-stream"))
        self.assertEqual(headers[-1], (b"Date", b"Wed, 25 Nov 2026 18:00:00 GMT"))

    def test_phrase_with_spaces_and_missing_phrase(self) -> None:
        self.assertEqual(parse_response_head(b"HTTP/1.1 404 Not Found")[:2], (404, b"Not Found"))
        self.assertEqual(parse_response_head(b"HTTP/1.1 200")[:2], (200, b""))

    def test_bad_status_lines(self) -> None:
        for head in (b"", b"garbage", b"HTTP/1.1", b"HTTP/1.1 abc OK", b"ICY 200 OK", b"HTTP/1.1 2000 OK"):
            self.assertRaises(ValueError, parse_response_head, head)

    def test_interim_answers_are_skipped(self) -> None:
        head = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nX: y"
        self.assertEqual(parse_response_head(head), (201, b"Created", [(b"X", b"y")]))

    def test_empty_lines_before_the_status_line_are_skipped(self) -> None:
        # llhttp follows RFC 9112 §2.2 (ignore empty lines before the start line).
        self.assertEqual(parse_response_head(b"\r\nHTTP/1.1 200 OK")[:2], (200, b"OK"))

    @settings(max_examples=200, deadline=None)
    @given(
        st.integers(100, 599).filter(lambda code: code not in (100, 102, 103)),
        st.from_regex(rb"\A[A-Za-z][A-Za-z ]{0,20}\Z"),
        st.lists(st.tuples(st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z"),
                           st.from_regex(rb"\A[!-~]([ -~]{0,30}[!-~])?\Z")), max_size=8),
    )
    def test_round_trip(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        head = b"HTTP/1.1 %d %s" % (code, phrase) + b"".join(b"\r\n" + n + b": " + v for n, v in headers)
        self.assertEqual(parse_response_head(head), (code, phrase, headers))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=80))
    def test_arbitrary_bytes_parse_or_raise_value_error(self, head: bytes) -> None:
        try:
            code, _, headers = parse_response_head(head)
        except ValueError:
            return
        self.assertIsInstance(code, int)
        self.assertIsInstance(headers, list)


class HalfCloseTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class HijackInMemory:
    """A client connection to the agent, and the Docker socket connection it makes."""

    def __init__(self, request: bytes) -> None:
        self.reactor = MemoryReactorClock()
        self.docker_handler = RecordingHandler()
        # Wired as tap.py wires the agent: one in-flight registry for the site, the root
        # (route kinds) and the hijack (hand-over).
        self.metrics = AgentMetrics()
        self.inflight = InFlight(self.metrics)
        hijack = HijackProxy(DockerClient.for_socket(self.reactor, SOCKET), hand_over=self.inflight.hand_over,
                             metrics=self.metrics)
        self.root = AgentRoot(Destinations(self.docker_handler, hijack), guard=None, inflight=self.inflight)
        self.clock = Clock()
        self.site = AgentSite(self.root, AgentRequests(self.root.router), reactor=self.clock, inflight=self.inflight, metrics=self.metrics)
        self.client: Any = HalfCloseTransport()
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        self.channel.makeConnection(self.client)
        self.channel.dataReceived(request)
        self.upstream = HalfCloseTransport()
        self.docker: Any = None
        self.address = ""

    def connect_docker(self) -> bytes:
        """Let the socket connection succeed; return what the proxy sent Docker."""
        address, factory, _, _ = self.reactor.unixClients[-1]
        self.address = address
        self.docker = factory.buildProtocol(None)
        self.docker.makeConnection(self.upstream)
        return self.upstream.value()

    def refuse(self, reason: str) -> None:
        _, factory, _, _ = self.reactor.unixClients[-1]
        factory.clientConnectionFailed(None, Failure(ConnectError(string=reason)))

    def docker_sends(self, data: bytes) -> None:
        self.docker.dataReceived(data)

    def upgrade(self) -> None:
        """Docker answers 101: the splice starts."""
        self.connect_docker()
        self.docker_sends(b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
                          b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n")

    def counted(self, kind: str, status: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "portainer_agent_requests_total", {"kind": kind, "method": "POST", "status": status})
        return value or 0.0

    def response(self) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
        head, _, body = self.client.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines[1:])]
        if (b"transfer-encoding", b"chunked") in headers:
            body = dechunk(body)
        return lines[0], headers, body


def dechunk(data: bytes) -> bytes:
    """The payload of a complete chunked body (the test fails on a truncated one)."""
    payload = b""
    while True:
        size, _, data = data.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            assert data == b"\r\n", data
            return payload
        payload, data = payload + data[:length], data[length + 2:]


ATTACH = raw_request(b"POST", b"/v1.41/containers/abc/attach?stream=1&stdin=1&stdout=1",
                     [(b"Connection", b"Upgrade"), (b"Upgrade", b"tcp"), (b"Content-Type", b"text/plain")])


class HijackProxyTests(SynchronousTestCase):
    def values(self, headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
        return [v for n, v in headers if n == name]

    def test_head_goes_to_the_docker_socket(self) -> None:
        hijack = HijackInMemory(ATTACH)
        sent = hijack.connect_docker()
        self.assertEqual(hijack.address, SOCKET)
        lines, body = head_lines(sent)
        self.assertEqual(lines[0], b"POST /v1.41/containers/abc/attach?stream=1&stdin=1&stdout=1 HTTP/1.1")
        self.assertIn(b"Upgrade: tcp", lines)
        self.assertEqual(body, b"")
        self.assertEqual(hijack.docker_handler.requests, [])

    def test_exec_start_body_is_sent(self) -> None:
        body = b'{"Detach":false,"Tty":true}'
        hijack = HijackInMemory(raw_request(b"POST", b"/exec/e1/start",
                                            [(b"Connection", b"Upgrade"), (b"Upgrade", b"tcp")], body))
        lines, sent = head_lines(hijack.connect_docker())
        self.assertEqual(sent, body)
        self.assertIn(b"Content-Length: %d" % len(body), lines)

    def test_101_is_spliced_with_agent_headers_once(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.connect_docker()
        hijack.docker_sends(b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
                            b"Connection: Upgrade\r\nUpgrade: tcp\r\nPortainer-Agent: 0.0.1\r\n\r\n"
                            b"\x01\x00\x00\x00\x00\x00\x00\x06hello\n")
        status, headers, rest = hijack.response()
        self.assertEqual(status, b"HTTP/1.1 101 UPGRADED")
        self.assertEqual(self.values(headers, b"portainer-agent"), [__version__.encode()])
        self.assertEqual(len(self.values(headers, b"portainer-agent-api-version")), 1)
        self.assertEqual(self.values(headers, b"upgrade"), [b"tcp"])
        self.assertEqual(rest, b"\x01\x00\x00\x00\x00\x00\x00\x06hello\n")

        # Both ways, byte for byte, half-close passed on.
        hijack.upstream.clear()
        hijack.client.protocol.dataReceived(b"stdin bytes")
        self.assertEqual(hijack.upstream.value(), b"stdin bytes")
        hijack.docker_sends(b"\x02\x00\x00\x00\x00\x00\x00\x04err\n")
        self.assertTrue(hijack.client.value().endswith(b"\x02\x00\x00\x00\x00\x00\x00\x04err\n"))
        hijack.client.protocol.readConnectionLost()
        self.assertTrue(hijack.upstream.write_closed)
        self.assertFalse(hijack.upstream.disconnecting)
        hijack.docker_sends(b"\x01\x00\x00\x00\x00\x00\x00\x05late\n")
        self.assertTrue(hijack.client.value().endswith(b"late\n"))
        # Docker ends the stream: the client connection closes.
        hijack.docker.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(hijack.client.disconnecting)

    def test_non_101_answer_with_length_is_relayed(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.connect_docker()
        body = b'{"message":"No such container: abc"}\n'
        hijack.docker_sends(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nApi-Version: 1.41\r\n"
                            b"Portainer-Agent: 0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        self.assertTrue(hijack.client.value().endswith(body[:10]))  # streamed as it arrives
        hijack.docker_sends(body[10:])
        status, headers, sent = hijack.response()
        self.assertEqual(status, b"HTTP/1.1 404 Not Found")
        self.assertEqual(sent, body)
        self.assertEqual(self.values(headers, b"content-length"), [b"%d" % len(body)])
        self.assertEqual(self.values(headers, b"content-type"), [b"application/json"])
        self.assertEqual(self.values(headers, b"api-version"), [b"1.41"])
        self.assertEqual(self.values(headers, b"portainer-agent"), [__version__.encode()])
        self.assertEqual(self.values(headers, b"transfer-encoding"), [])
        self.assertTrue(hijack.upstream.disconnecting)

    def test_non_101_chunked_answer_is_decoded(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.connect_docker()
        hijack.docker_sends(b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mes")
        hijack.docker_sends(b"\r\n1a\r\nsage\":\"container stopped\"}\r\n0\r\n\r\n")
        status, headers, sent = hijack.response()
        self.assertEqual(status, b"HTTP/1.1 409 Conflict")
        self.assertEqual(json.loads(sent), {"message": "container stopped"})
        self.assertEqual(self.values(headers, b"transfer-encoding"), [b"chunked"])  # relayed as it came

    def test_non_101_answer_ended_by_close(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.connect_docker()
        hijack.docker_sends(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\nraw output")
        hijack.docker.connectionLost(Failure(ConnectionDone()))
        status, _, sent = hijack.response()
        self.assertEqual((status, sent), (b"HTTP/1.1 200 OK", b"raw output"))

    def test_socket_failure_is_a_502_naming_the_socket(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.refuse("No such file or directory")
        status, headers, body = hijack.response()
        self.assertTrue(status.startswith(b"HTTP/1.1 502"), status)
        error = json.loads(body)
        self.assertIn(SOCKET, error["message"])
        self.assertEqual(self.values(headers, b"portainer-agent"), [__version__.encode()])
        self.flushLoggedErrors(ConnectError)

    def test_garbage_status_line_is_a_502(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.connect_docker()
        hijack.docker_sends(b"SSH-2.0-OpenSSH\r\n\r\n")
        status, _, body = hijack.response()
        self.assertTrue(status.startswith(b"HTTP/1.1 502"), status)
        self.assertIn(SOCKET, json.loads(body)["message"])

    def test_oversized_body_is_refused_before_connecting(self) -> None:
        hijack = HijackInMemory(raw_request(b"POST", b"/exec/e1/start",
                                            [(b"Connection", b"Upgrade"), (b"Upgrade", b"tcp")],
                                            b"x" * (MAX_HIJACK_REQUEST_BODY + 1)))
        status, _, _ = hijack.response()
        self.assertTrue(status.startswith(b"HTTP/1.1 413"), status)
        self.assertEqual(hijack.reactor.unixClients, [])

    def test_a_spliced_stream_is_in_flight_until_it_ends_then_released_once(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.upgrade()
        self.assertEqual({k: n for k, n in hijack.inflight.by_kind().items() if n}, {"hijack": 1})
        self.assertEqual(hijack.inflight.streams(), 1)
        hijack.docker.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(hijack.inflight), 0)
        self.assertEqual(hijack.counted("hijack", "1xx"), 1)
        # The client's connection closing afterwards does not count it again.
        hijack.client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(hijack.counted("hijack", "1xx"), 1)
        self.assertEqual(hijack.counted("hijack", "aborted"), 0)

    def test_stream_bytes_both_ways_and_duration_are_counted_when_it_ends(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.upgrade()
        value = hijack.metrics.registry.get_sample_value
        hijack.client.protocol.dataReceived(b"ls\n")
        hijack.docker_sends(b"0123456789")
        hijack.reactor.advance(7)
        hijack.docker_sends(b"abc")
        self.assertEqual(value("portainer_agent_hijacked_stream_duration_seconds_count", {}), 0)
        hijack.docker.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(value("portainer_agent_hijacked_stream_bytes_total", {"direction": "from_client"}), 3)
        self.assertEqual(value("portainer_agent_hijacked_stream_bytes_total", {"direction": "to_client"}), 13)
        self.assertEqual(value("portainer_agent_hijacked_stream_duration_seconds_count", {}), 1)
        self.assertEqual(value("portainer_agent_hijacked_stream_duration_seconds_sum", {}), 7)
        hijack.client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(value("portainer_agent_hijacked_stream_duration_seconds_count", {}), 1, "counted once")

    def test_the_client_leaving_mid_stream_releases_the_request(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.upgrade()
        hijack.client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(hijack.upstream.disconnecting, "Docker's connection is closed too")
        self.assertEqual(len(hijack.inflight), 0)
        self.assertEqual(hijack.counted("hijack", "1xx"), 1)

    def test_drain_waits_for_a_stream_only_until_it_ends(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.upgrade()
        drained = hijack.site.drain(hijack.clock, 5.0)
        hijack.clock.advance(1)
        self.assertNoResult(drained)
        hijack.docker.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(drained)
        self.assertEqual(hijack.clock.seconds(), 1, "no wait for the grace period")

    def test_drain_cuts_a_stream_still_open_after_the_grace_period(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.upgrade()
        drained = hijack.site.drain(hijack.clock, 5.0)
        hijack.clock.advance(5.01)
        self.successResultOf(drained)
        self.assertTrue(hijack.client.disconnected, "the stream's client connection is aborted")
        self.assertEqual(len(hijack.inflight), 0)

    def attach_without_stdin(self) -> HijackInMemory:
        hijack = HijackInMemory(raw_request(b"POST", b"/v1.41/containers/abc/attach?stream=1&stdout=1&stderr=1",
                                            [(b"Connection", b"Upgrade"), (b"Upgrade", b"tcp")]))
        hijack.upgrade()
        return hijack

    def test_an_attach_without_stdin_ends_when_the_clients_tcp_ends(self) -> None:
        # docker-py's attach(stream=True) cancel: a bare TCP FIN, no TLS close_notify;
        # Docker's attach would otherwise stay open until the container exits.
        hijack = self.attach_without_stdin()
        hijack.client.tcpFinReceived = True  # what the TLS shim records for a FIN
        hijack.client.protocol.readConnectionLost()
        self.assertTrue(hijack.upstream.disconnecting, "Docker's attach connection is closed")
        self.assertFalse(hijack.upstream.write_closed, "not a half-close: the stream is over")
        self.assertTrue(hijack.client.disconnecting)
        self.assertEqual(len(hijack.inflight), 0)

    def test_an_attach_without_stdin_keeps_streaming_after_a_close_notify(self) -> None:
        # The docker CLI (docker run, docker attach) sends close_notify at once when it has
        # no stdin, and reads the output until the container ends.
        hijack = self.attach_without_stdin()
        hijack.client.protocol.readConnectionLost()
        self.assertTrue(hijack.upstream.write_closed, "the half-close is passed on")
        self.assertFalse(hijack.upstream.disconnecting)
        hijack.docker_sends(b"\x01\x00\x00\x00\x00\x00\x00\x03hi\n")
        self.assertTrue(hijack.client.value().endswith(b"hi\n"))
        self.assertEqual(len(hijack.inflight), 1)
        # Its TCP connection ending afterwards (the CLI killed) is the client leaving.
        hijack.client.protocol.tcpClosedAfterCloseNotify()
        self.assertTrue(hijack.upstream.disconnecting)
        self.assertEqual(len(hijack.inflight), 0)

    def test_an_exec_keeps_streaming_after_a_bare_fin(self) -> None:
        hijack = HijackInMemory(raw_request(b"POST", b"/exec/e1/start", [(b"Connection", b"Upgrade"),
                                                                        (b"Upgrade", b"tcp")], b"{}"))
        hijack.upgrade()
        hijack.client.tcpFinReceived = True
        hijack.client.protocol.readConnectionLost()
        self.assertTrue(hijack.upstream.write_closed, "stdin ends, the output still flows")
        self.assertFalse(hijack.upstream.disconnecting)
        hijack.client.protocol.tcpClosedAfterCloseNotify()
        self.assertFalse(hijack.upstream.disconnecting, "only a stream with no stdin ends on it")

    def test_client_gone_before_docker_answers_aborts_the_socket(self) -> None:
        hijack = HijackInMemory(ATTACH)
        hijack.connect_docker()
        hijack.channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(hijack.upstream.disconnecting)


class KeepAliveTests(SynchronousTestCase):
    def test_probes_are_set_on_the_tcp_socket_under_tls(self) -> None:
        import socket

        sock = socket.socket()
        self.addCleanup(sock.close)

        class TCP:
            def getHandle(self) -> socket.socket:  # noqa: N802
                return sock

        class TLS:
            transport = TCP()

        enable_keepalive(TLS(), (30, 10, 3))
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 30)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), 10)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT), 3)

    def test_a_transport_without_a_socket_is_left_alone(self) -> None:
        enable_keepalive(StringTransport())  # no getHandle: nothing to do, no error
