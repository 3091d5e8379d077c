"""The HTTP site: request factory, access log, metrics, in-flight tracking for
shutdown. The connection-level rules (head deadline, limits, refusals) are the
channel's, in :mod:`portainer_agent.http.channel`."""
from __future__ import annotations

import time
import weakref
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import Request, Site

from portainer_agent.http.channel import AgentHTTPChannel
from portainer_agent.toolbox.twisted_private import channel_protocol
from portainer_agent.http.inflight import InFlight
from portainer_agent.http.request import AgentRequests
from portainer_agent.metrics import AgentMetrics

log = Logger(namespace="portainer_agent.access")


class AgentSite(Site):
    """A Site that logs one structured access line per request at DEBUG (method,
    path without the query string, status, bytes, duration) and admits every request
    into the in-flight registry (:class:`~portainer_agent.http.inflight.InFlight`), which
    counts it when it is released and tells a graceful stop what is still running."""

    noisy = False

    def protocol(self) -> Any:  # type: ignore[override]
        # HTTPFactory builds Twisted's protocol wrapper around a plain HTTPChannel, with no
        # public seam for the channel class; this is the same, with our channel.
        channel = AgentHTTPChannel()
        channel.head_timeout = self.head_timeout
        if self.metrics is not None:
            channel.on_cut = self.metrics.connection_cut
        self.channels.add(channel)
        return channel_protocol(channel)

    def __init__(self, resource: Any, requests: AgentRequests | None = None, access_log: bool = False,
                 inflight: InFlight | None = None, metrics: AgentMetrics | None = None,
                 head_timeout: float | None = None, **kwargs: Any) -> None:
        """``requests`` builds each request with the router and the guard (without one, requests
        are not routed before ``render`` and keep every body); ``timeout`` (a Site argument) is
        the idle timeout of kept-alive connections."""
        # No parsing of multipart/form bodies into request.args: twisted.web would read
        # the whole body into memory (a volume upload is streamed by its handler).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, requestFactory=requests or AgentRequests(), **kwargs)
        self._accessLog = access_log
        self.channels: "weakref.WeakSet[AgentHTTPChannel]" = weakref.WeakSet()
        #: Shared with whoever routes (the kind) and takes connections over (hijack, console).
        self.inflight = inflight if inflight is not None else InFlight(metrics)
        self.metrics = metrics
        self.head_timeout = head_timeout
        if metrics is not None:
            metrics.watch_connections(self.open_connections, self.inflight.streams)
            metrics.watch_inflight(self.inflight.by_kind)

    def open_connections(self) -> int:
        return sum(1 for channel in list(self.channels) if not channel.closed and channel.transport is not None)

    def getResourceFor(self, request: Request) -> Any:
        # twisted.web announces "TwistedWeb/<version>"; the original agent (Go) sends no
        # Server header, and the version helps only an attacker. Proxied answers carry
        # Docker's own.
        request.responseHeaders.removeHeader(b"server")
        self.inflight.admit(request)
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
        """Wait up to ``grace`` seconds for what is in flight (plain requests and the
        streams that took requests over), then cut the rest."""
        done: Deferred[None] = Deferred()

        def cut(_: Any = None) -> None:
            if timer.active():
                timer.cancel()
            self.inflight.abort_all()
            if not done.called:
                done.callback(None)

        timer = clock.callLater(grace, cut)
        self.inflight.idle().addCallback(cut)
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

