"""Hijacked connections (``attach``, ``exec start``, ``/session``, ``/grpc``, and
upgrade requests forwarded to another agent).

The upgrade request goes through the Docker client (:meth:`DockerClient.upgrade`),
which parses the answer; on ``101`` the client's connection is taken over (its protocol
replaced at the transport) and the two ends are spliced byte for byte, half-close
included: the CLI ends stdin with a half-close and must still receive the command's
output. Any other status is relayed as a normal, streamed HTTP response.

A splice ends when both directions are done or either side is gone, and then both
connections are closed; a client that left without a TLS close_notify (a bare TCP FIN,
as docker-py's cancel does) gets its TCP connection closed at once instead of a TLS
shutdown that would wait for an answer forever.

A client's half-close means "stdin is over", and is passed on to Docker. But an attach
without ``stdin=1`` has no stdin to end, and over TLS a half-close is a ``close_notify``
(the docker CLI sends one at once when it has no stdin): a bare TCP FIN without it, or a
TCP FIN after it, means the client left (docker-py's ``attach(stream=True)`` cancel closes
its socket that way), and the splice ends at once instead of holding Docker's attach until
the container exits. For the other streams, a client that half-closed and then vanished
is found by TCP keep-alive probes on its connection (:data:`KEEPALIVE`), so no splice
waits forever for a silent container.

Each splice carries on an HTTP request that twisted.web will never finish: it is handed
over to the site's in-flight registry (``hand_over``) and released when the splice ends.

The private Twisted names this needs (the bytes twisted.web read past the request head,
"client gone") are behind :mod:`portainer_agent.toolbox.twisted_private`; the takeover itself
is :func:`portainer_agent.toolbox.takeover.take_over_transport`, shared with the console.
"""
from __future__ import annotations

import socket
from typing import Any, Callable, Protocol as TypingProtocol, cast
from urllib.parse import parse_qs

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from portainer_agent.docker import wire
from portainer_agent.docker.client import DockerClient
from portainer_agent.docker.upgrade import Upgraded
from portainer_agent.docker.wire import DOCKER_HOST
from portainer_agent.errors import AgentError, bad_gateway_docker
from portainer_agent.toolbox.paths import AGENT_RESPONSE_HEADERS
from portainer_agent.toolbox.responses import abort_client, finish_with_error
from portainer_agent.toolbox.takeover import take_over_transport
from portainer_agent.toolbox.teardown import cancel_when_client_leaves, unregister_producer
from portainer_agent.toolbox.twisted_private import client_gone
from portainer_agent.toolbox.upload import MAX_MEMORY_BODY
from portainer_agent.proxy.outgoing import upstream_header_lines
from portainer_agent.proxy.relay import Drop, failure_reason, relay_response
from portainer_agent.routing import Route

log = Logger()

MAX_HIJACK_REQUEST_BODY = MAX_MEMORY_BODY  # kept in memory by the request (toolbox/upload.py), never on disk
#: TCP keep-alive on a spliced client connection: idle seconds, probe interval, probes.
KEEPALIVE = (30, 10, 3)

#: Registers a request whose connection a stream took over; returns its release.
HandOver = Callable[[Request, Any], Callable[[], None]]


class StreamMetrics(TypingProtocol):
    """What a splice reports when it ends (:class:`portainer_agent.metrics.AgentMetrics`)."""

    def hijacked_stream_ended(self, from_client: int, to_client: int, seconds: float) -> None: ...


def half_close_means_departure(path: bytes, query: bytes) -> bool:
    """Pure: whether a client half-closing this upgraded request has left rather than
    ended its stdin: an attach (``/containers/{id}/attach``, any version prefix) that
    did not ask for stdin has no stdin to end."""
    if not path.rstrip(b"/").endswith(b"/attach") or b"/containers/" not in path:
        return False
    values = parse_qs(query.decode("latin-1")).get("stdin", [])
    return not any(value.strip().lower() in ("1", "true") for value in values)


def enable_keepalive(transport: Any, settings: tuple[int, int, int] = KEEPALIVE) -> None:
    """TCP keep-alive probes on the TCP connection under ``transport`` (TLS or not),
    so a peer that vanished without a word is noticed; quietly nothing on other sockets."""
    tcp = getattr(transport, "transport", None) or transport
    get_handle = getattr(tcp, "getHandle", None)
    if get_handle is None:
        return
    try:
        handle = get_handle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = settings
        for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
            if hasattr(socket, option):
                handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except (OSError, AttributeError):
        pass


def upgrade_header_lines(request: Request, extra: dict[bytes, bytes] | None = None) -> list[tuple[bytes, bytes]]:
    """Pure: the header lines of the upstream upgrade request (Docker or a peer agent):
    the client's end-to-end headers, ``extra`` replacing the client's of the same name,
    then ``Connection: Upgrade`` and the client's ``Upgrade`` protocol."""
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade", [b"tcp"])[-1]
    return upstream_header_lines(request, extra) + [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)]


def build_upgrade_head(request: Request, body: bytes, host: bytes = DOCKER_HOST,
                       extra: dict[bytes, bytes] | None = None) -> bytes:
    """Pure: the whole upgrade request as sent upstream (head and body)."""
    return wire.request_head(request.method, request.uri, host, upgrade_header_lines(request, extra),
                             wire.content_length(len(body))) + body


@implementer(IHalfCloseableProtocol)
class SpliceEnd(Protocol):
    """One end of a spliced byte stream; its peer is the other connection.

    The splice ends when both directions are done (each side finished sending) or
    either side is gone; then both connections are closed (:meth:`Splice.end`)."""

    # Both ends are stream connections (the Docker UNIX socket, the client's TCP or
    # TLS connection, a peer agent's TLS connection): narrower than Protocol's ITransport.
    transport: ITCPTransport | None
    peer: "SpliceEnd | None" = None
    splice: "Splice | None" = None
    #: This side finished sending (its read side ended).
    sent_all = False
    #: When this side finishes sending, close the other side entirely rather than
    #: half-closing it (Docker ending the stream means the command is over).
    prefersHalfClose = True
    #: This side's TCP connection ending means it left (a client with no stdin to end);
    #: a TLS close_notify alone is still a half-close.
    departsOnHalfClose = False
    #: Bytes this side sent (for the metrics, read when the splice ends).
    received = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += len(data)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        """This side finished sending: pass the half-close on (or, for a client with no
        stdin whose TCP connection ended, end the stream: it left)."""
        self.sent_all = True
        if self.splice is not None:
            if self.departsOnHalfClose and getattr(self.transport, "tcpFinReceived", False):
                self.splice.end()
            else:
                self.splice.direction_done(self)

    def tcpClosedAfterCloseNotify(self) -> None:  # noqa: N802
        """The TLS shim: TCP ended after this side's close_notify."""
        if self.departsOnHalfClose and self.splice is not None:
            self.splice.end()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if self.splice is not None:
            self.splice.side_gone(self)

    def half_close_write(self) -> None:
        transport = self.transport
        if transport is None:
            return
        loseWrite = getattr(transport, "loseWriteConnection", None)
        if loseWrite is not None and self.prefersHalfClose:
            unregister_producer(transport)
            loseWrite()
        elif self.splice is not None:
            self.splice.end()


def close_connection(transport: Any) -> None:
    """Close ``transport`` (the client's TLS or TCP connection, or Docker's socket), its
    buffered output first. A TLS connection whose peer already closed TCP will never
    answer our close_notify: its TCP connection is closed too instead of waiting."""
    unregister_producer(transport)
    transport.loseConnection()
    inner = getattr(transport, "transport", None)
    if getattr(transport, "tcpFinReceived", False) and inner is not None:
        inner.loseConnection()


class Splice:
    """Two :class:`SpliceEnd` joined: byte for byte, half-close passed on, both closed
    when the stream is over. ``abort_after`` seconds after the end, connections still
    open (a peer that never completes the TLS shutdown) are aborted."""

    def __init__(self, client: SpliceEnd, upstream: SpliceEnd, reactor: Any = None, abort_after: float = 5.0,
                 on_end: Callable[[], None] | None = None) -> None:
        self.client = client
        self.upstream = upstream
        client.peer, upstream.peer = upstream, client
        client.splice = upstream.splice = self
        # Docker ending the stream ends it for the client too.
        client.prefersHalfClose = False
        self._reactor = reactor
        self._abort_after = abort_after
        self._on_end = on_end
        self.ended = False

    def direction_done(self, sender: SpliceEnd) -> None:
        if self.ended:
            return
        if self.client.sent_all and self.upstream.sent_all:
            self.end()
            return
        assert sender.peer is not None
        sender.peer.half_close_write()

    def side_gone(self, side: SpliceEnd) -> None:
        side.transport = None  # closed: nothing more to write there
        self.end()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        open_transports = [end.transport for end in (self.client, self.upstream) if end.transport is not None]
        for transport in open_transports:
            close_connection(transport)
        if self._reactor is not None and open_transports:
            self._reactor.callLater(self._abort_after, _abort_open, open_transports)
        if self._on_end is not None:
            self._on_end()


def _abort_open(transports: list[Any]) -> None:
    for transport in transports:
        if getattr(transport, "connected", 0) or getattr(transport, "disconnecting", False):
            abort = getattr(transport, "abortConnection", None)
            if abort is not None:
                try:
                    abort()
                except Exception:
                    pass


class HijackProxy:
    """Serves upgrade requests by splicing the client and the Docker socket (or, through
    :meth:`open`, another agent)."""

    def __init__(self, docker: DockerClient, hand_over: HandOver | None = None,
                 metrics: StreamMetrics | None = None) -> None:
        self._docker = docker
        self._hand_over = hand_over
        self._metrics = metrics

    def render(self, request: Request, route: Route | None = None) -> Any:
        """Splice ``request`` to the local Docker socket."""
        return self.open(request, None, DOCKER_HOST, None, self._dockerFailed)

    def _dockerFailed(self, failure: Failure) -> AgentError:
        log.warn("Docker socket {socket} failed an upgrade request: {reason}", socket=self._docker.label,
                 reason=failure_reason(failure))
        return bad_gateway_docker(self._docker.label, failure_reason(failure))

    def open(self, request: Request, endpoint: IStreamClientEndpoint | None, host: bytes,
             extra: dict[bytes, bytes] | None, upstream_error: Callable[[Failure], AgentError]) -> Any:
        """Send ``request`` as an upgrade request through ``endpoint`` (None: the Docker
        socket; else a peer agent over TLS) and splice the two connections once it
        answers 101; an unreachable upstream is answered with ``upstream_error(failure)``."""
        content = request.content
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read(MAX_HIJACK_REQUEST_BODY + 1)
        if len(body) > MAX_HIJACK_REQUEST_BODY:
            finish_with_error(request, AgentError(413, "Request body too large for an upgraded request", ""))
            return NOT_DONE_YET
        client = self._docker if endpoint is None else self._docker.elsewhere(endpoint, host)
        try:
            pending = client.upgrade(request.method, request.uri, upgrade_header_lines(request, extra), body)
        except ValueError as error:
            finish_with_error(request, AgentError(400, "Invalid request URL or method", str(error)))
            return NOT_DONE_YET
        cancel_when_client_leaves(request, pending)
        pending.addCallbacks(self._answered, self._failed, callbackArgs=(request,),
                             errbackArgs=(request, upstream_error))
        pending.addErrback(self._bug, request)
        return NOT_DONE_YET

    def _failed(self, failure: Failure, request: Request, upstream_error: Callable[[Failure], AgentError]) -> None:
        if failure.check(CancelledError) or client_gone(request):
            return
        finish_with_error(request, upstream_error(failure))

    def _bug(self, failure: Failure, request: Request) -> None:
        log.failure("splicing an upgraded stream failed", failure)
        if not client_gone(request):
            abort_client(request)

    def _answered(self, answer: Upgraded | Any, request: Request) -> None:
        if isinstance(answer, Upgraded):
            if client_gone(request):
                answer.transport.abortConnection()
                return
            self._splice(request, answer)
            return
        # A non-upgrade answer (404, 409 JSON, or an old-style raw stream): relayed as a
        # normal, streamed response; the connection is not reused.
        if client_gone(request):
            answer.deliverBody(Drop())
            return
        relay_response(answer, request)

    def _splice(self, request: Request, upgraded: Upgraded) -> None:
        client_end = SpliceEnd()
        upstream_end = SpliceEnd()
        path, _, query = request.uri.partition(b"?")
        client_end.departsOnHalfClose = half_close_means_departure(path, query)
        reactor = self._docker.reactor
        release = self._hand_over(request, client_end) if self._hand_over is not None else None
        metrics = self._metrics
        started = reactor.seconds() if metrics is not None and reactor is not None else 0.0

        def ended() -> None:
            if release is not None:
                release()
            if metrics is not None:
                # Counted once, at the end: an int per end, not a metric call per chunk.
                metrics.hijacked_stream_ended(client_end.received, upstream_end.received,
                                              reactor.seconds() - started if reactor is not None else 0.0)

        Splice(client_end, upstream_end, reactor, on_end=ended)
        # Agent headers on the 101 too, exactly once.
        lines = [b"HTTP/1.1 %d %s\r\n" % (upgraded.code, upgraded.phrase)]
        lines += [name + b": " + value + b"\r\n" for name, value in upgraded.raw_headers
                  if name.lower() not in AGENT_RESPONSE_HEADERS]
        lines += [name + b": " + values[0] + b"\r\n"
                  for name, values in request.responseHeaders.getAllRawHeaders()
                  if name.lower() in AGENT_RESPONSE_HEADERS]
        lines.append(b"\r\n")
        upgraded.hand_over(upstream_end)
        client_transport = take_over_transport(request, client_end)
        enable_keepalive(client_transport)
        client_transport.write(b"".join(lines) + upgraded.rest)
        docker_transport = upgraded.transport
        client_transport.registerProducer(docker_transport, True)
        # A Twisted stream connection is also a consumer, which ITCPTransport does not declare.
        cast(IConsumer, docker_transport).registerProducer(client_transport, True)
