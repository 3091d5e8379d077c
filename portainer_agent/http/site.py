"""The HTTP site: request factory, access log, in-flight tracking for shutdown."""
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

from portainer_agent.http.responses import abort_client
from portainer_agent.http.upload import StreamingUploads
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


class AgentHTTPChannel(HTTPChannel):
    """HTTPChannel whose answer to an over-long request line or header actually closes.

    Twisted's default (``LineReceiver.lineLengthExceeded``) calls
    ``transport.loseConnection()`` while the channel is still the transport's registered
    producer; over TLS that defers the shutdown forever, so the client hangs until the
    idle timeout. Answer 400 and close the way the channel does for other bad requests.
    """

    closed = False

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
        # Answers go out as the head then the body (the head is flushed early for streams):
        # without TCP_NODELAY the body's last small segment can wait for the client's ACK.
        if inner is not None and hasattr(inner, "setTcpNoDelay"):
            inner.setTcpNoDelay(True)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._respondToBadRequestAndDisconnect()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        super().connectionLost(reason)


class OpenStreams:
    """Hijacked streams still open: no longer twisted.web Requests, so the site cannot
    see them; a graceful stop cuts them after the grace period."""

    def __init__(self) -> None:
        self._streams: set[Any] = set()

    def __bool__(self) -> bool:
        return bool(self._streams)

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
        self.channels.add(channel)
        return _GenericHTTPChannelProtocol(channel)

    def __init__(self, resource: Any, access_log: bool = False, streams: OpenStreams | None = None,
                 **kwargs: Any) -> None:
        # No parsing of multipart/form bodies into request.args: twisted.web would read
        # the whole body into memory (a volume upload is streamed by its handler).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, requestFactory=AgentRequest, **kwargs)
        self._accessLog = access_log
        self.inflight: set[Request] = set()
        self.channels: "weakref.WeakSet[AgentHTTPChannel]" = weakref.WeakSet()
        self.streams = streams if streams is not None else OpenStreams()

    def getResourceFor(self, request: Request) -> Any:
        self.inflight.add(request)
        request.notifyFinish().addBoth(lambda _: self.inflight.discard(request))
        return super().getResourceFor(request)

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

