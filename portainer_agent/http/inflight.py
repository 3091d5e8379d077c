"""Every API request from its arrival to its release, exactly once.

Why a registry of its own: a request can end in three ways that twisted.web does not
unify. A plain answer ends when its last byte is written (``notifyFinish`` fires); a client
that leaves ends it early (``notifyFinish`` errs); but an upgraded request (``exec``,
``attach``, a websocket console) stops being a twisted.web request when its connection is
taken over, and ``notifyFinish`` then never fires at all. Before this registry, every exec
left its request in the site's in-flight set for good (about 12 kB each), was never
counted, and made every shutdown wait its full grace period.

Here each request is *admitted* once (by the site), tagged with its route kind once routing
has decided (by the root), optionally *handed over* to the stream that carries it on, and
*released* exactly once: when twisted.web says it finished, or when the stream that took it
over ends. A release counts the request in the metrics by kind; the drain at shutdown waits
for what is really in flight, streams included, and cuts the rest after the grace period.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.web.server import Request

from portainer_agent.toolbox.responses import abort_client
from portainer_agent.routing import RouteKind

UNROUTED = "unrouted"
#: Every kind a request can have: each is reported, at 0 when none is in flight, so a
#: dashboard's series never vanish.
KINDS = tuple(kind.value for kind in RouteKind) + (UNROUTED,)


class RequestMetrics(Protocol):
    """What a release reports (:class:`portainer_agent.metrics.AgentMetrics`)."""

    def request_finished(self, kind: str, method: bytes | str, status: int | None, duration: float,
                         sent_bytes: int, completed: bool = True) -> None: ...


class Stream(Protocol):
    """A connection that took a request over (a splice end, a console session)."""

    transport: Any


@attrs.define(eq=False)
class _Entry:
    request: Request
    started: float
    kind: str = UNROUTED
    #: Set once the request's connection was taken over by a stream.
    stream: Stream | None = None
    released: bool = False


class InFlight:
    """The requests being served now, by route kind (see the module docstring)."""

    def __init__(self, metrics: RequestMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._entries: dict[Request, _Entry] = {}
        self._idle: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def requests(self) -> list[Request]:
        return list(self._entries)

    def streams(self) -> int:
        """How many requests are carried on by a stream now (hijacked, consoles)."""
        return sum(1 for entry in self._entries.values() if entry.stream is not None)

    def by_kind(self) -> dict[str, int]:
        """Requests in flight by route kind (every kind of :data:`KINDS`, 0 included)."""
        counts = dict.fromkeys(KINDS, 0)
        for entry in self._entries.values():
            counts[entry.kind] = counts.get(entry.kind, 0) + 1
        return counts

    def admit(self, request: Request) -> None:
        """A request arrived (its head is in). Idempotent."""
        if request in self._entries:
            return
        entry = _Entry(request, self._clock())
        self._entries[request] = entry
        request.notifyFinish().addCallbacks(lambda _: self._release(entry, True),
                                            lambda _: self._release(entry, False))

    def routed(self, request: Request, kind: str) -> None:
        """Routing decided what ``request`` is (the metrics' ``kind`` label)."""
        entry = self._entries.get(request)
        if entry is not None:
            entry.kind = kind

    def hand_over(self, request: Request, stream: Stream) -> Callable[[], None]:
        """``request``'s connection is now ``stream``'s (an upgrade answered 101): twisted.web
        will never finish it, so the stream releases it, by calling what is returned, when
        it ends (calling it again does nothing)."""
        entry = self._entries.get(request)
        if entry is None:  # not admitted (a test resource, a request already released)
            return lambda: None
        entry.stream = stream
        return lambda: self._release(entry, True)

    def _release(self, entry: _Entry, completed: bool) -> None:
        if entry.released:
            return
        entry.released = True
        self._entries.pop(entry.request, None)
        request = entry.request
        if self._metrics is not None:
            status = 101 if entry.stream is not None else request.code
            self._metrics.request_finished(entry.kind, request.method, status, self._clock() - entry.started,
                                           request.sentLength, completed)
        if not self._entries:
            waiting, self._idle = self._idle, []
            for waiter in waiting:
                waiter.callback(None)

    def idle(self) -> "Deferred[None]":
        """Fires once no request is in flight (at once if none is)."""
        if not self._entries:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    def abort_all(self) -> None:
        """Cut every request still in flight: its client connection, or its stream's."""
        for entry in list(self._entries.values()):
            if entry.stream is not None:
                transport = entry.stream.transport
                if transport is not None:
                    transport.abortConnection()
                # A stream whose transport is already gone will not tell us again.
                self._release(entry, False)
            else:
                abort_client(entry.request)
