"""The one HTTP/1.1 client for the Docker socket (and the upgrade leg to a peer agent).

Everything the agent says to Docker goes through :class:`DockerClient`: the proxied
requests (:mod:`portainer_agent.proxy.local`, the aggregator's local leg), the node
identity and container facts (``get_json``), and the ``Upgrade: tcp`` hijack
(:meth:`DockerClient.upgrade`, spliced by :mod:`portainer_agent.proxy.splice`).

- Connections are ``UNIXClientEndpoint`` connections, kept alive in a small LIFO pool;
  a request on a kept connection that Docker closed meanwhile is retried once on a
  new one when nothing of it can have been consumed (no body, or a buffered one).
- Request bodies: none, bytes (one write with the head), or any ``IBodyProducer``
  (a request body still arriving from the client): registered with the socket as a
  streaming producer, so a slow Docker pauses it; ``Content-Length`` when known,
  chunked otherwise.
- Responses are parsed by llhttp (:mod:`portainer_agent.docker.wire`); the raw header
  list is kept as it came (``raw_headers``) so the relay copies it once, filtered, and
  the body is delivered to an ``IProtocol`` whose transport pauses the socket
  (``IResponse.deliverBody`` semantics, so treq's ``content``/``json`` work on it).

Only Twisted's public API is used here.
"""
from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IProtocol, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from portainer_agent.docker import wire
from portainer_agent.docker.wire import DOCKER_HOST, ProtocolError

log = Logger()

#: Bytes per read of the Docker socket (Twisted's default is 64 kB): big bodies cross
#: the parser, the relay and TLS in a quarter of the slices (-19% CPU per GB exported).
READ_SIZE = 256 * 1024

__all__ = ["DOCKER_HOST", "DockerClient", "DockerResponse", "Upgraded", "ProtocolError", "read_body", "read_json"]


#: One Failure for every normal end of a body: building one per response costs more than
#: the rest of the end-of-response work (body protocols only ``check`` it).
_RESPONSE_DONE = Failure(ResponseDone())


class DockerResponse:
    """A response from the client: what ``IResponse`` offers (``code``, ``phrase``,
    ``headers``, ``length``, ``deliverBody``) plus ``raw_headers`` as received."""

    version = (b"HTTP", 1, 1)
    previousResponse = None
    request = None

    def __init__(self, code: int, phrase: bytes, raw_headers: list[tuple[bytes, bytes]],
                 connection: "_Connection") -> None:
        self.code = code
        self.phrase = phrase
        self.raw_headers = raw_headers
        self.trailers: list[tuple[bytes, bytes]] = []
        self._connection = connection
        self._headers: Headers | None = None
        length: Any = UNKNOWN_LENGTH
        if code in (204, 304):
            length = 0
        else:
            for name, value in raw_headers:
                if name.lower() == b"content-length" and value.isdigit():
                    length = int(value)
        self.length = length
        self._protocol: IProtocol | None = None
        self._buffer: list[bytes] = []
        self._ended: Failure | None = None
        self._held = False

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            headers = Headers()
            for name, value in self.raw_headers:
                headers.addRawHeader(name, value)
            self._headers = headers
        return self._headers

    def setPreviousResponse(self, response: Any) -> None:  # noqa: N802 (IResponse)
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:  # noqa: N802 (IResponse)
        """Give the body to ``protocol``: its transport pauses/resumes/stops the socket."""
        if self._protocol is not None:
            raise RuntimeError("the body of a response can be delivered once")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self._connection))  # type: ignore[arg-type]
        buffered, self._buffer = self._buffer, []
        for data in buffered:
            protocol.dataReceived(data)
        if self._held:
            self._held = False
            self._connection.resume()
        if self._ended is not None:
            protocol.connectionLost(self._ended)

    # from the exchange

    def _data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
            return
        # Nobody reads yet: hold the bytes and stop reading the socket.
        self._buffer.append(data)
        if not self._held:
            self._held = True
            self._connection.pause()

    def _end(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        if self._protocol is not None:
            self._protocol.connectionLost(reason)


@implementer(IPushProducer)
class _BodyTransport:
    """The transport a body protocol sees: flow control of the Docker socket."""

    def __init__(self, connection: "_Connection") -> None:
        self._connection = connection

    def pauseProducing(self) -> None:  # noqa: N802
        self._connection.pause()

    def resumeProducing(self) -> None:  # noqa: N802
        self._connection.resume()

    def stopProducing(self) -> None:  # noqa: N802
        """The reader is gone (client left an endless stream): drop the connection."""
        self._connection.abort()


class Upgraded:
    """A ``101`` answer: its head as received, the bytes that followed it, and the
    connection, now a raw byte stream for :meth:`hand_over`."""

    def __init__(self, code: int, phrase: bytes, raw_headers: list[tuple[bytes, bytes]], rest: bytes,
                 connection: "_Connection") -> None:
        self.code = code
        self.phrase = phrase
        self.raw_headers = raw_headers
        self.rest = rest
        self._connection = connection

    @property
    def transport(self) -> Any:
        return self._connection.transport

    def hand_over(self, protocol: IProtocol) -> None:
        """From now on ``protocol`` receives the connection's bytes and its (half-)close."""
        self._connection.delegate(protocol)


class _BodyWriter:
    """The consumer a request body producer writes to: the socket, framed."""

    def __init__(self, transport: Any, chunked: bool) -> None:
        self._transport = transport
        self._chunked = chunked
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self._transport.write(wire.chunk(data) if self._chunked else data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:  # noqa: N802
        self._transport.unregisterProducer()


class _Exchange:
    """One request and its response on one connection (a :class:`wire.ResponseSink`)."""

    def __init__(self, client: "DockerClient", method: bytes, target: bytes, headers: wire.Headers,
                 body: Any, upgrade: bool) -> None:
        self._client = client
        self.method = method
        self._target = target
        self._headers = headers
        self._body = body
        self._upgrade = upgrade
        self.result: Deferred[Any] = Deferred(self._cancel)
        self._connection: _Connection | None = None
        self._reader: wire.ResponseReader | None = None
        self._response: DockerResponse | None = None
        self._keep_alive = False
        self._sending_body = False
        self._body_stopped = False
        self._writer: _BodyWriter | None = None
        self.replayable = body is None or isinstance(body, bytes) or hasattr(body, "data")

    def start(self, connection: "_Connection") -> None:
        self._connection = connection
        connection.exchange = self
        reader = connection.reader
        if reader is None:
            reader = connection.reader = wire.ResponseReader(self, head_only=self.method == b"HEAD")
        else:
            reader.reset(self, head_only=self.method == b"HEAD")
        self._reader = reader
        # A stream connection: also a consumer (registerProducer), which ITransport omits.
        transport: Any = connection.transport
        headers = self._headers
        body = self._body
        data = body if isinstance(body, bytes) else getattr(body, "data", None)
        if body is None:
            transport.write(wire.request_head(self.method, self._target, self._client.host, headers))
        elif data is not None:
            head = wire.request_head(self.method, self._target, self._client.host, headers,
                                     wire.content_length(len(data)))
            transport.write(head + data if len(data) < 65536 else head)
            if len(data) >= 65536:
                transport.write(data)
        else:
            length = body.length
            chunked = length is UNKNOWN_LENGTH
            framing = wire.CHUNKED if chunked else wire.content_length(length)
            transport.write(wire.request_head(self.method, self._target, self._client.host, headers, framing))
            self._writer = _BodyWriter(transport, chunked)
            self._sending_body = True
            transport.registerProducer(body, True)
            body.startProducing(self._writer).addCallbacks(self._body_sent, self._body_failed)

    # the request body

    def _body_sent(self, _: Any) -> None:
        if not self._sending_body:
            return
        self._sending_body = False
        connection = self._connection
        assert connection is not None and self._writer is not None
        transport: Any = connection.transport
        if transport is not None:
            transport.unregisterProducer()
            if self._writer._chunked:
                transport.write(wire.LAST_CHUNK)
        self._writer.closed = True
        if self._reader is not None and self._reader.done and not self._upgrade:
            self._finished()

    def _body_failed(self, failure: Failure) -> None:
        if not self._sending_body:
            return
        self._sending_body = False
        if self._writer is not None:
            self._writer.closed = True
        if self._body_stopped:
            return
        # The client's upload broke: Docker must not take a truncated body as whole.
        log.debug("request body for {method} {target} failed: {reason}", method=self.method, target=self._target,
                  reason=failure.getErrorMessage())
        if self._connection is not None:
            self._connection.abort()

    def _stop_body(self) -> None:
        if self._sending_body:
            self._body_stopped = True
            self._sending_body = False
            if self._writer is not None:
                self._writer.closed = True
            transport: Any = self._connection.transport if self._connection is not None else None
            if transport is not None:
                transport.unregisterProducer()
            self._body.stopProducing()

    # wire.ResponseSink

    def head(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self._keep_alive = keep_alive
        if code == 101 and self._upgrade:
            self._upgrade_head = (code, phrase, headers)
            return
        assert self._connection is not None
        self._response = DockerResponse(code, phrase, headers, self._connection)
        if not self.result.called:
            self.result.callback(self._response)

    def body(self, data: bytes) -> None:
        if self._response is not None:
            self._response._data(data)

    def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        response = self._response
        if response is None:
            return
        response.trailers = trailers
        if self._sending_body:
            # Docker answered before reading the whole body (an error, typically):
            # stop sending; the connection cannot carry another request.
            self._keep_alive = False
            self._stop_body()
        self._finished()
        response._end(_RESPONSE_DONE)

    def upgraded(self, rest: bytes) -> None:
        code, phrase, headers = self._upgrade_head
        assert self._connection is not None
        connection, self._connection = self._connection, None
        connection.exchange = None
        if not self.result.called:
            self.result.callback(Upgraded(code, phrase, headers, rest, connection))
        else:
            connection.abort()

    # the connection

    def _finished(self) -> None:
        connection = self._connection
        if connection is None or connection.exchange is not self:
            return
        connection.exchange = None
        if self._keep_alive and not self._upgrade and not self._sending_body:
            self._client._release(connection)
        else:
            connection.close()

    def data_received(self, data: bytes) -> None:
        assert self._reader is not None
        try:
            self._reader.feed(data)
        except ProtocolError as error:
            self._broken(Failure(error))

    def _broken(self, failure: Failure) -> None:
        connection = self._connection
        if connection is not None:
            connection.exchange = None
            connection.abort()
        self._stop_body()
        if not self.result.called:
            self.result.errback(failure)
        elif self._response is not None:
            self._response._end(Failure(ResponseFailed([failure])))

    def connection_lost(self, reason: Failure, reused: bool) -> None:
        """The connection ended while this exchange owned it."""
        self._connection = None
        reader = self._reader
        if self._sending_body:
            self._body_stopped = True
            self._sending_body = False
            self._body.stopProducing()
        if reader is None or not reader.started:
            if self.result.called:
                return
            if reused and self.replayable:
                # A kept connection Docker had closed: try once on a fresh one.
                self.replayable = False
                self._client._start(self, fresh=True)
                return
            self.result.errback(Failure(ResponseNeverReceived([reason])))
            return
        if reader.done:
            return
        if reader.eof():
            assert self._response is not None
            self._response._end(Failure(PotentialDataLoss()))
            return
        if self._response is not None:
            self._response._end(Failure(ResponseFailed([reason])))

    def _cancel(self, _: Deferred[Any]) -> None:
        connection = self._connection
        self._connection = None
        if connection is not None:
            connection.exchange = None
            connection.abort()
        self._stop_body()


@implementer(IHalfCloseableProtocol)
class _Connection(Protocol):
    """One socket to Docker: carries exchanges one at a time; after a 101 it is a raw
    byte stream handed to the splice (:meth:`delegate`)."""

    def __init__(self, client: "DockerClient") -> None:
        self._client = client
        self.exchange: _Exchange | None = None
        self.used = 0
        self._delegate: IProtocol | None = None
        self._paused = 0
        self.connected_ = False
        self.idle_since = 0.0
        #: The connection's response parser, reused from one exchange to the next.
        self.reader: wire.ResponseReader | None = None

    def connectionMade(self) -> None:  # noqa: N802
        self.connected_ = True
        transport: Any = self.transport
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = READ_SIZE

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        exchange = self.exchange
        if exchange is None:
            # Bytes nobody asked for on an idle connection: it cannot be trusted.
            self.abort()
            return
        exchange.data_received(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        delegate = self._delegate
        if delegate is not None:
            half = IHalfCloseableProtocol(delegate, None)
            if half is not None:
                half.readConnectionLost()
            else:
                self.close()
            return
        self.close()

    def writeConnectionLost(self) -> None:  # noqa: N802
        delegate = self._delegate
        if delegate is not None:
            half = IHalfCloseableProtocol(delegate, None)
            if half is not None:
                half.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802
        self.connected_ = False
        self._client._lost(self)
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
            return
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connection_lost(reason, self.used > 1)

    def delegate(self, protocol: IProtocol) -> None:
        self._delegate = protocol
        while self._paused:
            self.resume()
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]

    def pause(self) -> None:
        self._paused += 1
        if self._paused == 1 and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self._paused == 0:
            return
        self._paused -= 1
        if self._paused == 0 and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def reset_flow(self) -> None:
        while self._paused:
            self.resume()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None and self.connected_:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _ConnectionFactory(Factory):
    """Builds the one protocol a connect attempt is for; quiet: no "Starting factory"
    INFO line per connection."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:  # noqa: N802
        return self._protocol


class DockerClient:
    """HTTP/1.1 to one upstream endpoint (the Docker socket) with a keep-alive pool.

    ``request`` and ``upgrade`` take the method, the request-target (path and query
    as the client sent it), header lines (``(name, value)`` pairs; ``Host`` and the
    body framing are added here) and a body (None, bytes, or an ``IBodyProducer``).
    """

    def __init__(self, reactor: Any, endpoint: IStreamClientEndpoint, host: bytes = DOCKER_HOST,
                 max_idle: int = 16, idle_timeout: float = 120.0, label: str = "") -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self.host = host
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._sweeper: Any = None
        self._all: set[_Connection] = set()
        #: What this client talks to, for error messages (the socket path).
        self.label = label

    @property
    def reactor(self) -> Any:
        return self._reactor

    def elsewhere(self, endpoint: IStreamClientEndpoint, host: bytes) -> "DockerClient":
        """A client for another upstream that speaks the same HTTP/1.1 (a peer agent's
        TLS endpoint, for a spliced stream), without a pool."""
        return DockerClient(self._reactor, endpoint, host, max_idle=0, label=host.decode("latin-1"))

    @classmethod
    def for_socket(cls, reactor: Any, socket_path: str, **kwargs: Any) -> "DockerClient":
        return cls(reactor, UNIXClientEndpoint(reactor, socket_path, timeout=10), label=socket_path, **kwargs)

    def request(self, method: bytes, target: bytes, headers: wire.Headers = (), body: Any = None
                ) -> "Deferred[DockerResponse]":
        """Send a request; fires with the response once its head is in. Raises
        ValueError at once for a method or target that cannot go on the wire."""
        wire.check_request_line(method, target)
        exchange = _Exchange(self, method, target, headers, _as_body(body), upgrade=False)
        self._start(exchange)
        return exchange.result

    def upgrade(self, method: bytes, target: bytes, headers: wire.Headers, body: bytes = b""
                ) -> "Deferred[Upgraded | DockerResponse]":
        """Send an upgrade request (``headers`` carry ``Upgrade``) on a fresh connection;
        fires with :class:`Upgraded` on 101, else with the (normal) response."""
        wire.check_request_line(method, target)
        exchange = _Exchange(self, method, target, headers, body, upgrade=True)
        self._start(exchange, fresh=True)
        return exchange.result

    def get_json(self, path: str) -> "Deferred[tuple[int, Any]]":
        """``GET path``: (status, the parsed JSON body, or None if it is not JSON)."""
        return self.request(b"GET", path.encode("ascii")).addCallback(read_json)

    def close_idle(self) -> "Deferred[None]":
        """Close the kept-alive connections (on stop)."""
        idle, self._idle = self._idle, []
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for connection in idle:
            connection.close()
        return succeed(None)

    # pool

    def _start(self, exchange: _Exchange, fresh: bool = False) -> None:
        while self._idle and not fresh:
            connection = self._idle.pop()
            if connection.connected_ and connection.transport is not None:
                connection.used += 1
                exchange.start(connection)
                return
        connection = _Connection(self)
        connection.used = 1
        connecting = self._endpoint.connect(_ConnectionFactory(connection))

        def connected(_: Any) -> None:
            self._all.add(connection)
            if exchange.result.called:  # cancelled while connecting
                connection.close()
                return
            exchange.start(connection)

        def failed(failure: Failure) -> None:
            if not exchange.result.called:
                exchange.result.errback(failure)

        connecting.addCallbacks(connected, failed)
        exchange.result.addErrback(_cancel_connect, connecting)

    def _release(self, connection: _Connection) -> None:
        connection.reset_flow()
        if len(self._idle) >= self._max_idle or not connection.connected_:
            connection.close()
            return
        connection.idle_since = self._reactor.seconds()
        self._idle.append(connection)
        if self._sweeper is None:
            # One timer for the pool, not one per request.
            self._sweeper = self._reactor.callLater(self._idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than the idle timeout."""
        self._sweeper = None
        now = self._reactor.seconds()
        for connection in [c for c in self._idle if now - c.idle_since >= self._idle_timeout]:
            self._idle.remove(connection)
            connection.close()
        if self._idle:
            oldest = min(c.idle_since for c in self._idle)
            self._sweeper = self._reactor.callLater(max(0.0, oldest + self._idle_timeout - now), self._sweep)

    def _lost(self, connection: _Connection) -> None:
        self._all.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)


def _cancel_connect(failure: Failure, connecting: Deferred[Any]) -> Failure:
    if failure.check(CancelledError) and not connecting.called:
        connecting.cancel()
    return failure


def _as_body(body: Any) -> Any:
    if body is None or isinstance(body, bytes):
        return body
    if not IBodyProducer.providedBy(body) and not hasattr(body, "startProducing"):
        raise TypeError(f"not a request body: {body!r}")
    return body


def read_body(response: Any) -> "Deferred[bytes]":
    """Read a whole (small) response body."""
    collected: list[bytes] = []
    done: Deferred[None] = Deferred()

    class _Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            collected.append(data)

        def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802
            if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
                done.callback(None)
            else:
                done.errback(reason)

    response.deliverBody(_Collect())
    return done.addCallback(lambda _: b"".join(collected))


def read_json(response: Any) -> "Deferred[tuple[int, Any]]":
    """Read a whole (small) response: (status, parsed JSON or None)."""
    def parse(body: bytes) -> tuple[int, Any]:
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, None

    return read_body(response).addCallback(parse)


class _Collected:
    """A whole response, for the blocking reader (a :class:`wire.ResponseSink`)."""

    def __init__(self) -> None:
        self.code = 0
        self.chunks: list[bytes] = []

    def head(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.code = code

    def body(self, data: bytes) -> None:
        self.chunks.append(data)

    def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        pass

    def upgraded(self, rest: bytes) -> None:
        raise ProtocolError("unexpected 101 to a plain request")


def get_json_blocking(socket_path: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    """``GET path`` on the Docker socket, synchronously: (status, parsed JSON or None).

    For start-up only (before the reactor runs), so that a missing Docker fails the
    start with a clear message before anything listens. Same request head and parser
    as :class:`DockerClient`; raises OSError or :class:`ProtocolError`."""
    collected = _Collected()
    reader = wire.ResponseReader(collected)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(wire.request_head(b"GET", path.encode("ascii"), DOCKER_HOST, [(b"Connection", b"close")]))
        while not reader.done:
            data = sock.recv(READ_SIZE)
            if not data:
                if not reader.eof():
                    raise ProtocolError(f"Docker closed the connection during GET {path}")
                break
            reader.feed(data)
    try:
        return collected.code, json.loads(b"".join(collected.chunks))
    except ValueError:
        return collected.code, None
