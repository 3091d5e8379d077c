"""Request bodies streamed upstream as they arrive, with backpressure.

twisted.web reads a request's whole body (to memory under 100 kB, to a temporary file
above) before ``render`` runs, and offers no public way to see it earlier (Twisted
issues #288, #4688, #5511). A 200 MB ``docker cp`` or ``docker load`` would cross the
disk before the first byte reached Docker. :class:`StreamingUploads` (a
``twisted.web.server.Request`` mixin) starts the request as soon as its headers are in
when its body goes to an upstream (Docker or another agent) and is not small: the body
arrives in a :class:`RequestBodyStream`, which upstreams read through
:func:`body_producer` (an ``IBodyProducer``). When the upstream is slow the client's
connection is paused (its transport stops reading), so the agent holds at most about
one read (64 kB) plus :data:`HIGH_WATER` per upload.

The same stream carries the body of a local agent endpoint that reads its body as it
arrives (``/browse/put``, which writes it to the volume). Which bodies stream is the
request class's decision (:meth:`StreamingUploads.body_streams`: the agent's request asks
its route, :mod:`portainer_agent.http.request`). Every other body is read whole before
``render``, in memory and bounded (:class:`InMemoryBody`, :data:`MAX_MEMORY_BODY`): never
twisted.web's temporary file, so no request (an upgrade request's, a misrouted upload)
can write to the agent's disk.

The mixin uses the documented ``Request`` hooks ``gotLength``, ``handleContentChunk``,
``requestReceived`` and ``finish``.
"""
from __future__ import annotations

import io
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from portainer_agent.toolbox.twisted_private import client_gone

#: Bodies smaller than this (with a known length) are read whole before ``render``.
STREAM_THRESHOLD = 64 * 1024
#: Bytes held for an upstream that is not reading before the client is paused.
HIGH_WATER = 64 * 1024
#: Largest body read whole (not streamed) that is kept: an upgrade request's body
#: (``exec``/``attach`` send none in practice) or a local endpoint's JSON. A larger one is
#: dropped as it arrives and refused by its reader (413 for an upgrade request).
MAX_MEMORY_BODY = 1 << 20


class BodyAlreadyConsumed(Exception):
    """A streamed request body can be sent once; this one was already (partly) sent."""


class UploadInterrupted(Exception):
    """The client connection ended before the whole request body arrived."""


@implementer(IBodyProducer)
class BufferedBody:
    """A small body already in memory (``data``); the Docker client writes it together
    with the request head."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":  # noqa: N802
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


class InMemoryBody(io.BytesIO):
    """The body of a request that is read whole before ``render`` (twisted.web's
    ``request.content``), in memory: at most ``limit + 1`` bytes are kept, so a reader
    that reads ``limit + 1`` bytes can tell the body was too large (and answer 413); the
    rest is dropped as it arrives. twisted.web would spool such a body to a temporary file
    of any size."""

    def __init__(self, limit: int = MAX_MEMORY_BODY) -> None:
        super().__init__()
        self.limit = limit
        #: Bytes received, kept or not.
        self.received = 0

    def write(self, data: Any) -> int:
        room = self.limit + 1 - self.received
        self.received += len(data)
        if room > 0:
            super().write(bytes(data[:room]))
        return len(data)

    @property
    def too_large(self) -> bool:
        return self.received > self.limit


class RequestBodyStream:
    """The body of one request, as it arrives from the client, for one upstream reader.

    ``receive``/``end``/``fail`` are fed by the request; ``pause_client``/``resume_client``
    control the client connection's reading.
    """

    def __init__(self, length: int | None, pause_client: Callable[[], None],
                 resume_client: Callable[[], None]) -> None:
        self.length = length
        self._pause_client = pause_client
        self._resume_client = resume_client
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._upstream_paused = False
        self._client_paused = False
        self._discarding = False
        self.ended = False
        self._failure: Failure | None = None
        #: Some bytes went to an upstream: the body cannot be sent again.
        self.consumed = False
        self.received = 0

    # the client side

    def receive(self, data: bytes) -> None:
        self.received += len(data)
        if self._discarding:
            return
        if self._consumer is not None and not self._upstream_paused and not self._buffer:
            self.consumed = True
            self._consumer.write(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._upstream_paused or self._buffered >= HIGH_WATER:
            # Paused again even if something else (twisted.web's own flow control)
            # resumed the connection meanwhile.
            self._client_paused = True
            self._pause_client()

    def end(self) -> None:
        self.ended = True
        self._maybe_done()

    def fail(self, reason: Failure) -> None:
        if self.ended or self._failure is not None:
            return
        self._failure = reason
        self._buffer, self._buffered = [], 0
        done, self._done = self._done, None
        if done is not None:
            done.errback(reason)

    # the upstream side (through _StreamProducer)

    def start(self, consumer: IConsumer) -> "Deferred[None]":
        if self.consumed or self._consumer is not None:
            raise BodyAlreadyConsumed("the request body was already sent to another upstream")
        self._consumer = consumer
        self._done = Deferred()
        done = self._done
        if self._failure is not None:
            self._done = None
            done.errback(self._failure)
            return done
        self._flush()
        return done

    def pause(self) -> None:
        self._upstream_paused = True
        if not self._client_paused:
            self._client_paused = True
            self._pause_client()

    def resume(self) -> None:
        self._upstream_paused = False
        self._flush()

    def stop(self) -> None:
        """The upstream will not read more (it answered, or went away): drop the rest
        of the body as it arrives, so the client can finish sending and read the answer."""
        self._discarding = True
        self._consumer = None
        self._buffer, self._buffered = [], 0
        self._wake_client()
        self._done = None

    def _flush(self) -> None:
        consumer = self._consumer
        while consumer is not None and self._buffer and not self._upstream_paused:
            data = self._buffer.pop(0)
            self._buffered -= len(data)
            self.consumed = True
            consumer.write(data)
        if not self._buffer and not self._upstream_paused:
            self._wake_client()
        self._maybe_done()

    def _wake_client(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self._resume_client()

    def _maybe_done(self) -> None:
        if self.ended and not self._buffer and self._done is not None and self._consumer is not None:
            done, self._done = self._done, None
            done.callback(None)


@implementer(IBodyProducer)
class _StreamProducer:
    """``IBodyProducer`` over a :class:`RequestBodyStream` (one per upstream attempt)."""

    def __init__(self, stream: RequestBodyStream) -> None:
        self._stream = stream
        self.length = stream.length if stream.length is not None else UNKNOWN_LENGTH
        self._started = False

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":  # noqa: N802
        self._started = True
        return self._stream.start(consumer)

    def pauseProducing(self) -> None:  # noqa: N802
        if self._started:
            self._stream.pause()

    def resumeProducing(self) -> None:  # noqa: N802
        if self._started:
            self._stream.resume()

    def stopProducing(self) -> None:  # noqa: N802
        if self._started:
            self._stream.stop()


def body_producer(request: Any) -> IBodyProducer | None:
    """The streamed body of ``request`` as a producer, or None if it is not streamed."""
    stream = getattr(request, "body_stream", None)
    if stream is None:
        return None
    return _StreamProducer(stream)


class StreamingUploads:
    """``twisted.web.server.Request`` mixin: start large uploads before their body is in.

    The request class says which requests qualify (:meth:`body_streams`, asked at
    ``gotLength`` time, when the headers are in); the body of the others is read whole
    before ``render``, into an :class:`InMemoryBody`.
    """

    #: The request's body, while it streams; None for bodies read whole.
    body_stream: RequestBodyStream | None = None
    _finish_pending = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        request: Any = self
        if (length is None or length >= STREAM_THRESHOLD) and self.body_streams():
            channel = request.channel
            transport = IPushProducer(channel.transport)
            request.body_stream = RequestBodyStream(length, transport.pauseProducing, transport.resumeProducing)
            request.content = io.BytesIO()
            expect = request.requestHeaders.getRawHeaders(b"expect")
            if expect and expect[0].lower() == b"100-continue":
                # Sent now, before any answer can be written; the channel must not send
                # it again after ``gotLength`` (it looks at this header).
                request.requestHeaders.removeHeader(b"expect")
                if request.clientproto == b"HTTP/1.1":
                    channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.process()
            return
        # Not twisted.web's ``_getContentFile``: it spools anything large or chunked to a
        # temporary file of any size.
        request.content = InMemoryBody()

    def body_streams(self) -> bool:
        """Whether this request's body is read as it arrives (not asked for bodies smaller
        than :data:`STREAM_THRESHOLD`); a request class overrides it."""
        return False

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        stream = self.body_stream
        if stream is not None:
            stream.receive(data)
            return
        super().handleContentChunk(data)  # type: ignore[misc]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        stream = self.body_stream
        if stream is None:
            super().requestReceived(command, path, version)  # type: ignore[misc]
            return
        # The whole body is in; the request has been processing since its headers.
        stream.end()
        if self._finish_pending:
            self._finish_pending = False
            request: Any = self
            if not request.finished and not client_gone(request):
                super().finish()  # type: ignore[misc]

    def finish(self) -> None:
        stream = self.body_stream
        request: Any = self
        if stream is not None and not stream.ended and not client_gone(request):
            # The answer is complete before the upload: twisted.web must not start
            # reading the next request in the middle of this body. Drop the rest of it
            # as it arrives and finish then.
            if not self._finish_pending:
                self._finish_pending = True
                stream.stop()
            return
        super().finish()  # type: ignore[misc]

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        stream = self.body_stream
        if stream is not None and not stream.ended:
            stream.fail(Failure(UploadInterrupted(reason.getErrorMessage())))
        super().connectionLost(reason)  # type: ignore[misc]
