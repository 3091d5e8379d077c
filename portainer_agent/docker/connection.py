"""One socket to Docker and the one exchange (request, then response) it carries at a time.

The pool (:mod:`portainer_agent.docker.client`) hands a :class:`Connection` to an
:class:`Exchange`; the exchange writes the request and feeds the connection's bytes to
its response parser (:mod:`portainer_agent.docker.wire`), whose events become a streamed
:class:`~portainer_agent.docker.response.DockerResponse`. When the response ends, the
exchange gives the connection back to the pool (kept alive) or closes it. An upgrade is
an exchange too (:class:`~portainer_agent.docker.upgrade.UpgradeExchange`); after its
``101`` the connection is a raw byte stream delegated to whoever splices it.

- Request bodies: none, bytes (one write with the head), or any ``IBodyProducer`` (a
  request body still arriving from the client): registered with the socket as a
  streaming producer, so a slow Docker pauses it; ``Content-Length`` when known, chunked
  otherwise.
- A request on a kept connection that Docker closed meanwhile is started again once on a
  new connection when nothing of it can have been consumed (no body, or a buffered one).

This is the proxy's hot path: keep per-request work out of it (the parser, for one, is
reset and reused from one exchange to the next).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from portainer_agent.docker import wire
from portainer_agent.docker.response import RESPONSE_DONE, DockerResponse
from portainer_agent.docker.wire import READ_SIZE, ProtocolError

if TYPE_CHECKING:
    from portainer_agent.docker.client import DockerClient

log = Logger()

__all__ = ["Connection", "ConnectionFactory", "Exchange"]


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


class Exchange:
    """One request and its response on one connection (a :class:`wire.ResponseSink`)."""

    #: Whether the connection leaves the pool whatever the answer (an upgrade's does).
    upgrade = False

    def __init__(self, client: "DockerClient", method: bytes, target: bytes, headers: wire.Headers,
                 body: Any) -> None:
        self._client = client
        self.method = method
        self._target = target
        self._headers = headers
        self._body = body
        self.result: Deferred[Any] = Deferred(self._cancel)
        self._connection: Connection | None = None
        self._reader: wire.ResponseReader | None = None
        self._response: DockerResponse | None = None
        self._keep_alive = False
        self._sending_body = False
        self._body_stopped = False
        self._writer: _BodyWriter | None = None
        self.replayable = body is None or isinstance(body, bytes) or hasattr(body, "data")

    def start(self, connection: "Connection") -> None:
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
        if self._reader is not None and self._reader.done and not self.upgrade:
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
        response._end(RESPONSE_DONE)

    def upgraded(self, rest: bytes) -> None:
        """A ``101`` to a request that did not ask for an upgrade: the connection is broken
        (:meth:`data_received` turns this into :meth:`_broken`)."""
        raise ProtocolError("unexpected 101 to a plain request")

    # the connection

    def _finished(self) -> None:
        connection = self._connection
        if connection is None or connection.exchange is not self:
            return
        connection.exchange = None
        if self._keep_alive and not self.upgrade and not self._sending_body:
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
class Connection(Protocol):
    """One socket to Docker: carries exchanges one at a time; after a 101 it is a raw
    byte stream handed to the splice (:meth:`delegate`)."""

    def __init__(self, client: "DockerClient") -> None:
        self._client = client
        self.exchange: Exchange | None = None
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


class ConnectionFactory(Factory):
    """Builds the one protocol a connect attempt is for; quiet: no "Starting factory"
    INFO line per connection."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:  # noqa: N802
        return self._protocol
