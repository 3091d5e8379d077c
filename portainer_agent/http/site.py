"""The HTTP site: request factory, access log, metrics, in-flight tracking for
shutdown, and the request-head deadline (a client that drips header bytes is cut off;
Twisted's idle timeout is reset by every byte, so it alone never fires for one)."""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Request, Site

from portainer_agent.errors import AgentError
from portainer_agent.http.responses import abort_client
from portainer_agent.http.upload import StreamingUploads
from portainer_agent.http.root import AGENT_HEADERS
from portainer_agent.metrics import UNROUTED, AgentMetrics
from portainer_agent.security.body import DiscardUnauthenticatedBody

log = Logger(namespace="portainer_agent.access")


class AgentRequest(DiscardUnauthenticatedBody, StreamingUploads, Request):
    """Never parses form bodies into memory (the proxy streams them as they are), drops
    the body of a request without valid signature headers instead of spooling it, and
    streams large bodies bound for an upstream as they arrive (:mod:`..upload`)."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)
        self.startedAt = time.monotonic()


#: Limits on a request head; above them the agent answers 414 or 431 and closes.
MAX_LINE_LENGTH = 16384  # the request line, and each header line
MAX_HEAD_SIZE = 32768  # the request line plus all headers
MAX_HEADERS = 100


def refusal_response(status: int, message: str, details: str) -> bytes:
    """A complete HTTP/1.1 answer for a request the parser refused: agent headers,
    Docker-style JSON, ``Connection: close``."""
    body = AgentError(status, message, details).body()
    head = [b"HTTP/1.1 %d %s" % (status, http.RESPONSES.get(status, b"Error")),
            b"Content-Type: application/json", b"Content-Length: %d" % len(body), b"Connection: close",
            b"Date: " + http.datetimeToString()]
    head += [name + b": " + value for name, value in AGENT_HEADERS]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class AgentHTTPChannel(HTTPChannel):
    """HTTPChannel with the agent's limits and its own answer to a refused request.

    * A request the parser refuses (a malformed request line or header, both
      ``Content-Length`` and ``Transfer-Encoding``, two ``Content-Length`` values, a bare
      LF...) gets a Docker-style JSON 400 with the agent headers, not Twisted's bare
      28-byte ``400 Bad Request``; an over-long request line a 414, too many or too
      large headers a 431; then the connection closes.
    * An over-long line actually closes: Twisted's default
      (``LineReceiver.lineLengthExceeded``) calls ``transport.loseConnection()`` while
      the channel is still the transport's registered producer, which over TLS defers
      the shutdown forever.
    * The request head must complete within ``head_timeout`` of its first byte.

    ``_respondToBadRequestAndDisconnect`` is private Twisted API, the one place all
    parser refusals go through (covered by the refusal tests).
    """

    MAX_LENGTH = MAX_LINE_LENGTH
    totalHeadersSize = MAX_HEAD_SIZE
    maxHeaders = MAX_HEADERS

    closed = False
    #: Seconds a request line and its headers may take from their first byte (None: no limit).
    head_timeout: float | None = None
    #: Called with a reason when a deadline cuts the connection (metrics).
    on_cut: Callable[[str], None] | None = None
    _awaiting_head = True
    _head_timer: Any = None
    #: Why the next refusal happens, when the parser would only say "bad request".
    _refusal: tuple[int, str, str] | None = None
    _line_count = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        # Read the client's TCP connection 256 kB at a time (Twisted's default: 64 kB), as
        # the Docker socket is: an upload then crosses TLS, the channel and the Docker
        # client in a quarter of the slices (measured: -22% CPU per GB uploaded, +25%
        # upload throughput, bench/README.md). ``transport.transport`` is the TCP
        # connection under TLS; ``bufferSize`` is public on it.
        inner = getattr(self.transport, "transport", None)
        if inner is not None and hasattr(inner, "bufferSize"):
            inner.bufferSize = 256 * 1024

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._line_count == 0:
            self._refusal = (414, "Request-URI Too Long",
                             f"the request line is longer than {self.MAX_LENGTH} bytes")
        else:
            self._refusal = (431, "Request Header Fields Too Large",
                             f"a header line is longer than {self.MAX_LENGTH} bytes")
        self._respondToBadRequestAndDisconnect()

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refusal = (431, "Request Header Fields Too Large",
                             f"the request head is larger than {self.totalHeadersSize} bytes")
        self._line_count += 1
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refusal = (431, "Request Header Fields Too Large", f"more than {self.maxHeaders} headers")
        return super().headerReceived(line)

    def _respondToBadRequestAndDisconnect(self) -> None:
        status, message, details = self._refusal or (
            400, "Bad request", "the request could not be parsed: malformed request line or header, or "
                                "conflicting Content-Length/Transfer-Encoding")
        if self.transport is not None and not self.closed:
            self.transport.write(refusal_response(status, message, details))
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        # The head deadline starts with the first byte of a request (an idle kept-alive
        # connection is the idle timeout's business) and ends with its last header.
        # A request being handled (a stream such as ``logs -f``) is never timed here.
        if self._awaiting_head and self._head_timer is None and self.head_timeout and not self._handlingRequest:
            self._head_timer = self.callLater(self.head_timeout, self._head_timed_out)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._line_count = 0
        self._cancel_head_timer()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        self._awaiting_head = True  # before super(): it may parse a pipelined head at once
        super().requestDone(request)

    def _cancel_head_timer(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.closed or self.transport is None:
            return
        log.debug("cut a connection whose request head took over {timeout}s", timeout=self.head_timeout)
        if self.on_cut is not None:
            self.on_cut("header_timeout")
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._cancel_head_timer()
        super().connectionLost(reason)


class OpenStreams:
    """Hijacked streams still open: no longer twisted.web Requests, so the site cannot
    see them; a graceful stop cuts them after the grace period."""

    def __init__(self) -> None:
        self._streams: set[Any] = set()

    def __bool__(self) -> bool:
        return bool(self._streams)

    def __len__(self) -> int:
        return len(self._streams)

    def track(self, stream: Any) -> Callable[[], None]:
        """Register ``stream`` (a protocol with a transport); returns its remover."""
        self._streams.add(stream)
        return lambda: self._streams.discard(stream)

    def abort_all(self) -> None:
        for stream in list(self._streams):
            if stream.transport is not None:
                stream.transport.abortConnection()


class AgentSite(Site):
    """A Site that logs one structured access line per request at DEBUG (method,
    path without the query string, status, bytes, duration) and knows which requests
    and hijacked streams are still running, for a graceful stop."""

    requestFactory = AgentRequest
    noisy = False

    def protocol(self) -> _GenericHTTPChannelProtocol:  # type: ignore[override]
        # HTTPFactory builds ``_GenericHTTPChannelProtocol(HTTPChannel())`` with no
        # public seam for the channel class; this is the same, with our channel.
        channel = AgentHTTPChannel()
        channel.head_timeout = self.head_timeout
        if self.metrics is not None:
            channel.on_cut = self.metrics.connection_cut
        self.channels.add(channel)
        return _GenericHTTPChannelProtocol(channel)

    def __init__(self, resource: Any, access_log: bool = False, streams: OpenStreams | None = None,
                 metrics: AgentMetrics | None = None, head_timeout: float | None = None,
                 **kwargs: Any) -> None:
        """``timeout`` (a Site argument) is the idle timeout of kept-alive connections."""
        # No parsing of multipart/form bodies into request.args: twisted.web would read
        # the whole body into memory (a volume upload is streamed by its handler).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, requestFactory=AgentRequest, **kwargs)
        self._accessLog = access_log
        self.inflight: set[Request] = set()
        self.channels: "weakref.WeakSet[AgentHTTPChannel]" = weakref.WeakSet()
        self.streams = streams if streams is not None else OpenStreams()
        self.metrics = metrics
        self.head_timeout = head_timeout
        if metrics is not None:
            metrics.watch_connections(self.open_connections, lambda: len(self.streams))

    def open_connections(self) -> int:
        return sum(1 for channel in list(self.channels) if not channel.closed and channel.transport is not None)

    def getResourceFor(self, request: Request) -> Any:
        # twisted.web announces "TwistedWeb/<version>"; the original agent (Go) sends no
        # Server header, and the version helps only an attacker. Proxied answers carry
        # Docker's own.
        request.responseHeaders.removeHeader(b"server")
        self.inflight.add(request)
        request.notifyFinish().addBoth(lambda _: self.inflight.discard(request))
        if self.metrics is not None:
            request.notifyFinish().addCallbacks(lambda _: self._measure(request, True),
                                                lambda _: self._measure(request, False))
        return super().getResourceFor(request)

    def _measure(self, request: Request, completed: bool) -> None:
        """Count a finished request under its route kind (set by the root resource)."""
        assert self.metrics is not None
        route = getattr(request, "agentRoute", None)
        kind = route.kind.value if route is not None else UNROUTED
        started = getattr(request, "startedAt", None)
        duration = time.monotonic() - started if started is not None else 0.0
        self.metrics.request_finished(kind, request.method, request.code, duration, request.sentLength, completed)

    def log(self, request: http.Request) -> None:
        if not self._accessLog:
            return
        log.debug(
            "{method} {path} {status} {bytes}B {duration_ms}ms",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status=request.code,
            bytes=request.sentLength,
            duration_ms=round((time.monotonic() - getattr(request, "startedAt", time.monotonic())) * 1000, 2),
        )

    def drain(self, clock: Any, grace: float) -> "Deferred[None]":
        """Wait up to ``grace`` seconds for running requests, then cut the rest."""
        pending = [req.notifyFinish() for req in list(self.inflight)]
        done: Deferred[None] = Deferred()

        def cut() -> None:
            for req in list(self.inflight):
                abort_client(req)
            self.streams.abort_all()
            if not done.called:
                done.callback(None)

        if not pending and not self.streams:
            done.callback(None)
        else:
            timer = clock.callLater(grace, cut)

            def finished(_: Any) -> None:
                if timer.active():
                    timer.cancel()
                cut()

            if pending:
                DeferredList(pending, consumeErrors=True).addBoth(finished)
        # Kept-alive connections are closed cleanly in every case, idle ones included.
        return done.addCallback(lambda _: self._closeConnections(clock))

    def _closeConnections(self, clock: Any, timeout: float = 1.0) -> "Deferred[None]":
        """Close kept-alive client connections cleanly (flushing buffered TLS data,
        e.g. the end of the last response) and wait, briefly, until they are gone."""
        open_channels = [c for c in list(self.channels) if not c.closed and c.transport is not None]
        for channel in open_channels:
            channel.loseConnection()
        done: Deferred[None] = Deferred()
        deadline = clock.seconds() + timeout

        def poll() -> None:
            if all(c.closed for c in open_channels) or clock.seconds() >= deadline:
                done.callback(None)
            else:
                clock.callLater(0.02, poll)

        poll()
        return done

