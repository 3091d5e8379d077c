"""The HTTP site: request factory, access log, metrics, in-flight tracking for
shutdown. The connection-level rules (head deadline, limits, refusals) are the
channel's, in :mod:`portainer_agent.http.channel`."""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.web import http
from twisted.web.http import _GenericHTTPChannelProtocol
from twisted.web.server import Request, Site

from portainer_agent.http.channel import AgentHTTPChannel
from portainer_agent.http.responses import abort_client
from portainer_agent.http.upload import StreamingUploads
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

