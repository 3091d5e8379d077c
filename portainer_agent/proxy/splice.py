"""Hijacked Docker connections (``attach``, ``exec start``, ``/session``, ``/grpc``).

``twisted.web.client.Agent`` ignores 1xx replies, so it cannot carry Docker's
``101 UPGRADED`` stream. Instead a raw protocol sends the request head to the Docker
socket; on ``101`` the client's connection is taken over (its protocol replaced at
the transport) and the two ends are spliced byte for byte, half-close included:
the CLI ends stdin with a half-close and must still receive the command's output.
Any other status is parsed and answered as a normal HTTP response.
"""
from __future__ import annotations

from typing import Any, Callable, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import _ChunkedTransferDecoder
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from portainer_agent.errors import AgentError, bad_gateway_docker
from portainer_agent.http.paths import forwardable_request_headers, forwardable_response_headers
from portainer_agent.http.responses import finish_with_error

log = Logger()

MAX_HIJACK_REQUEST_BODY = 1 << 20
MAX_RESPONSE_HEAD = 64 * 1024


def build_upgrade_head(request: Request, body: bytes, host: bytes = b"docker",
                       extra: dict[bytes, bytes] | None = None) -> bytes:
    """Pure: the raw HTTP/1.1 head for the upstream (Docker or a peer agent), from the
    client's request; ``extra`` headers replace the client's of the same name."""
    raw = request.requestHeaders
    lines = [b"%s %s HTTP/1.1" % (request.method, request.uri), b"Host: " + host]
    replaced = {name.lower() for name in (extra or {})}
    for name, values in forwardable_request_headers(raw.getAllRawHeaders(), raw.getRawHeaders(b"connection", [])):
        if name.lower() in replaced:
            continue
        for value in values:
            lines.append(name + b": " + value)
    for name, value in (extra or {}).items():
        lines.append(name + b": " + value)
    upgrade = raw.getRawHeaders(b"upgrade", [b"tcp"])[-1]
    lines += [b"Connection: Upgrade", b"Upgrade: " + upgrade, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse_response_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Pure: ``HTTP/1.1 101 UPGRADED\\r\\nName: value...`` -> (code, phrase, headers)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    code = int(parts[1])
    phrase = parts[2] if len(parts) > 2 else b""
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    return code, phrase, headers


@implementer(IHalfCloseableProtocol)
class SpliceEnd(Protocol):
    """One end of a spliced byte stream; its peer is the other connection."""

    # Both ends are stream connections (the Docker UNIX socket, the client's TCP or
    # TLS connection): narrower than Protocol's ITransport.
    transport: ITCPTransport | None
    peer: "SpliceEnd | None" = None
    onClose: Callable[[], None] | None = None
    _closed = False

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def readConnectionLost(self) -> None:
        """This side finished sending: pass the half-close on."""
        if self.peer is not None:
            self.peer.halfCloseWrite()

    def halfCloseWrite(self) -> None:
        transport = self.transport
        if transport is None:
            return
        _unregister(transport)
        loseWrite = getattr(transport, "loseWriteConnection", None)
        if loseWrite is not None and self.prefersHalfClose:
            loseWrite()
        else:
            transport.loseConnection()

    prefersHalfClose = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if self.transport is not None:
            _unregister(self.transport)
        if self.peer is not None and self.peer.transport is not None:
            # A registered producer keeps a TLS transport from shutting down.
            _unregister(self.peer.transport)
            self.peer.transport.loseConnection()
        if self.onClose is not None:
            self.onClose()


def _unregister(transport: Any) -> None:
    try:
        transport.unregisterProducer()
    except Exception:
        pass


class DockerUpgradeClient(SpliceEnd):
    """Talks to the Docker socket: sends the head, waits for the status."""

    def __init__(self, head: bytes) -> None:
        self._head = head
        self._buffer = b""
        self.status: Deferred[tuple[int, bytes, list[tuple[bytes, bytes]], bytes, bytes]] = Deferred()
        self._headDone = False
        self._bodyMode: Callable[[bytes], None] | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None  # set by makeConnection
        self.transport.write(self._head)

    def dataReceived(self, data: bytes) -> None:
        if self._headDone:
            if self._bodyMode is not None:
                self._bodyMode(data)
            else:
                SpliceEnd.dataReceived(self, data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_RESPONSE_HEAD:
                assert self.transport is not None  # connected: data is arriving
                self.transport.abortConnection()
            return
        self._headDone = True
        rawHead, rest = self._buffer[: end + 4], self._buffer[end + 4:]
        self._buffer = b""
        try:
            code, phrase, headers = parse_response_head(rawHead[:-4])
        except ValueError as error:
            self.status.errback(Failure(error))
            assert self.transport is not None  # connected: data is arriving
            self.transport.abortConnection()
            return
        self.status.callback((code, phrase, headers, rawHead, rest))

    def readConnectionLost(self) -> None:
        if self._bodyMode is not None:
            assert self.transport is not None  # set by makeConnection
            self.transport.loseConnection()
            return
        SpliceEnd.readConnectionLost(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._headDone:
            self._headDone = True
            self.status.errback(reason or Failure(ConnectionError("Docker closed the connection")))
            return
        if self._bodyMode is not None:
            self._bodyMode(b"")  # end of body
            self._bodyMode = None
        SpliceEnd.connectionLost(self, reason)


def take_over_transport(request: Request, protocol: Protocol) -> Any:
    """Detach the client connection from twisted.web and hand it to ``protocol``.

    Replaces the protocol at the transport (TLS wrapper or TCP), so the new protocol
    also receives half-closes, which twisted.web's own websocket upgrade does not
    pass on. Returns the transport.
    """
    channel = request.channel
    # The concrete connection (TLS wrapper or TCP): its protocol attribute is swapped,
    # which no transport interface declares.
    transport: Any = channel.transport
    buffered = b"".join(getattr(channel, "_dataBuffer", []))
    channel._dataBuffer = []
    channel.setTimeout(None)
    try:
        transport.unregisterProducer()
    except Exception:
        pass
    if hasattr(transport, "wrappedProtocol"):
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    channel.transport = None
    protocol.makeConnection(transport)
    transport.resumeProducing()
    if buffered:
        protocol.dataReceived(buffered)
    return transport


class HijackProxy:
    """Serves upgrade requests by splicing the client and the Docker socket."""

    def __init__(self, reactor: Any, socket_path: str, track: Callable[[Any], Callable[[], None]] | None = None) -> None:
        self._reactor = reactor
        self._socket_path = socket_path
        self._track = track

    def render(self, request: Request) -> Any:
        """Splice ``request`` to the local Docker socket."""
        endpoint = UNIXClientEndpoint(self._reactor, self._socket_path, timeout=10)
        return self.open(request, endpoint, b"docker", None, self._dockerFailed)

    def _dockerFailed(self, failure: Failure) -> AgentError:
        log.warn("Docker socket {socket} failed an upgrade request: {reason}", socket=self._socket_path,
                 reason=failure.getErrorMessage())
        return bad_gateway_docker(self._socket_path, failure.getErrorMessage())

    def open(self, request: Request, endpoint: IStreamClientEndpoint, host: bytes,
             extra: dict[bytes, bytes] | None, upstream_error: Callable[[Failure], AgentError]) -> Any:
        """Send ``request`` as an upgrade request through ``endpoint`` (the Docker socket,
        or a peer agent over TLS) and splice the two connections once it answers 101;
        an unreachable upstream is answered with ``upstream_error(failure)``."""
        content = request.content
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read(MAX_HIJACK_REQUEST_BODY + 1)
        if len(body) > MAX_HIJACK_REQUEST_BODY:
            finish_with_error(request, AgentError(413, "Request body too large for an upgraded request", ""))
            return NOT_DONE_YET
        upstream = DockerUpgradeClient(build_upgrade_head(request, body, host, extra))
        connecting = connectProtocol(endpoint, upstream)
        connecting.addErrback(self._connectFailed, request, upstream)
        upstream.status.addCallbacks(self._gotStatus, self._statusFailed, callbackArgs=(request, upstream),
                                     errbackArgs=(request, upstream_error))
        request.notifyFinish().addErrback(self._clientLost, upstream)
        return NOT_DONE_YET

    def _clientLost(self, failure: Failure, upstream: DockerUpgradeClient) -> None:
        """The client went away: drop the upstream connection too."""
        if upstream.transport is not None:
            upstream.transport.abortConnection()

    def _connectFailed(self, failure: Failure, request: Request, upstream: DockerUpgradeClient) -> None:
        if not upstream.status.called:
            upstream._headDone = True
            upstream.status.errback(failure)

    def _statusFailed(self, failure: Failure, request: Request,
                      upstream_error: Callable[[Failure], AgentError]) -> None:
        finish_with_error(request, upstream_error(failure))

    def _gotStatus(self, result: tuple[int, bytes, list[tuple[bytes, bytes]], bytes, bytes], request: Request, upstream: DockerUpgradeClient) -> None:
        code, phrase, headers, rawHead, rest = result
        if request._disconnected:
            assert upstream.transport is not None  # connected: Docker just answered
            upstream.transport.abortConnection()
            return
        if code == 101:
            self._splice(request, upstream, rawHead, rest)
        else:
            self._answer(request, upstream, code, phrase, headers, rest)

    def _splice(self, request: Request, upstream: DockerUpgradeClient, rawHead: bytes, rest: bytes) -> None:
        downstream = SpliceEnd()
        # When Docker ends the stream the command is over: close the client fully.
        downstream.prefersHalfClose = False
        downstream.peer = upstream
        upstream.peer = downstream
        # Agent headers on the 101 too, exactly once.
        agentHeaders = b"".join(
            name + b": " + value + b"\r\n"
            for name, values in request.responseHeaders.getAllRawHeaders()
            if name.lower().startswith(b"portainer-agent")
            for value in values[:1]
        )
        head = _strip_agent_headers(rawHead[:-2]) + agentHeaders + b"\r\n"
        if self._track is not None:
            downstream.onClose = self._track(downstream)
        clientTransport = take_over_transport(request, downstream)
        clientTransport.write(head + rest)
        clientTransport.registerProducer(upstream.transport, True)
        # A Twisted stream connection is also a consumer, which ITCPTransport does not declare.
        cast(IConsumer, upstream.transport).registerProducer(clientTransport, True)

    def _answer(self, request: Request, upstream: DockerUpgradeClient, code: int, phrase: bytes,
                headers: list[tuple[bytes, bytes]], rest: bytes) -> None:
        """A non-upgrade answer (404, 409 JSON...): relay it as a normal response."""
        request.setResponseCode(code, phrase)
        length = None
        chunked = False
        connection = []
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif lower == b"connection":
                connection.append(value)
        for name, values in forwardable_response_headers(((n, [v]) for n, v in headers), connection):
            request.responseHeaders.addRawHeader(name, values[0])
        received = bytearray()
        state = {"done": False}

        def finish() -> None:
            if state["done"]:
                return
            state["done"] = True
            if not request._disconnected:
                request.setHeader(b"content-length", b"%d" % len(received))
                request.write(bytes(received))
                request.finish()
            if upstream.transport is not None:
                upstream.transport.loseConnection()

        if chunked:
            decoder = _ChunkedTransferDecoder(received.extend, lambda extra: finish())
            feed = lambda data: decoder.dataReceived(data) if data else finish()  # noqa: E731
        else:
            def feed(data: bytes) -> None:
                if not data:
                    finish()
                    return
                received.extend(data)
                if length is not None and len(received) >= length:
                    del received[length:]
                    finish()
        upstream._bodyMode = feed
        if length == 0 or code in (204, 304):
            finish()
        elif rest:
            feed(rest)


def _strip_agent_headers(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    kept = [line for line in lines if not line.lower().startswith(b"portainer-agent")]
    return b"\r\n".join(kept)
