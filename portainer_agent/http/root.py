"""The agent's root resource: every request enters here.

In order: agent headers on the response (so every answer carries them, errors and
404s included), Docker API version prefix split off for routing, the public ping,
the request guard (signature check, before any routing or forwarding), then the
routing decision (:func:`portainer_agent.routing.decide`, given the request's facts and a
snapshot of the live cluster members) and the destination it names.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent import AGENT_API_VERSION, AGENT_PLATFORM, __version__
from portainer_agent.errors import AgentError, not_found
from portainer_agent.http.inflight import InFlight
from portainer_agent.httpkit.paths import is_upgrade_request, split_version_prefix
from portainer_agent.httpkit.responses import write_empty, write_error
from portainer_agent.routing import (
    FORWARDED_HEADER,
    MANAGER_OPERATION_HEADER,
    TARGET_HEADER,
    ClusterSnapshot,
    RequestFacts,
    Route,
    RouteKind,
    decide,
)

log = Logger()

AGENT_HEADERS = (
    (b"Portainer-Agent", __version__.encode()),
    (b"Portainer-Agent-Api-Version", AGENT_API_VERSION.encode()),
    (b"Portainer-Agent-Platform", AGENT_PLATFORM.encode()),
)


class RequestGuard(Protocol):
    """Refuses a request by raising :class:`AgentError` (e.g. a bad signature)."""

    def check(self, request: Request) -> None: ...


class Handler(Protocol):
    def render(self, request: Request) -> Any: ...


class Destinations(Protocol):
    """Where routed requests go (:class:`portainer_agent.proxy.dispatch.Destinations`):
    injected, so the HTTP edge does not depend on the proxies behind it."""

    def serve(self, route: Route, request: Request, local_name: str | None) -> Any: ...


def _header_text(request: Request, name: bytes) -> str | None:
    value = request.requestHeaders.getRawHeaders(name)
    if not value:
        return None
    text = value[-1].decode("utf-8", "replace").strip()
    return text or None


def request_facts(request: Request, path: bytes) -> RequestFacts:
    """What routing needs from a request (``path`` without the Docker version prefix)."""
    headers = request.requestHeaders
    upgrade = is_upgrade_request(
        request.method, headers.getRawHeaders(b"connection", []), headers.getRawHeaders(b"upgrade", [])
    )
    return RequestFacts(
        method=request.method,
        path=path,
        upgrade=upgrade,
        target=_header_text(request, TARGET_HEADER),
        manager_operation=headers.hasHeader(MANAGER_OPERATION_HEADER),
        forwarded_by=_header_text(request, FORWARDED_HEADER),
    )


_UPSTREAM_KINDS = frozenset({RouteKind.DOCKER, RouteKind.FORWARD, RouteKind.MANAGER})


class AgentRoot(Resource):
    """Routes every path itself (a leaf): the tree is data in :mod:`routing`."""

    isLeaf = True

    def __init__(
        self,
        destinations: Destinations,
        guard: RequestGuard | None = None,
        endpoints: dict[bytes, IResource | Handler] | None = None,
        cluster: Callable[[], ClusterSnapshot | None] | None = None,
        inflight: InFlight | None = None,
    ) -> None:
        super().__init__()
        #: The site's in-flight registry: told each request's route kind (for its metrics).
        self.inflight = inflight
        self.destinations = destinations
        self.guard = guard
        #: Live cluster members at the time of a request; None (or returning None) on a
        #: standalone engine, where everything is served locally.
        self.cluster = cluster
        #: Agent endpoints by path without ``/v1``/``/v2``: ``b"/agents"``, ``b"/host/info"``...
        self.endpoints: dict[bytes, IResource | Handler] = dict(endpoints or {})

    def render(self, request: Request) -> Any:
        for name, value in AGENT_HEADERS:
            request.responseHeaders.setRawHeaders(name, [value])
        _, path = split_version_prefix(request.path)
        snapshot = self.cluster() if self.cluster is not None else None
        decision = decide(request_facts(request, path), snapshot)
        request.agentRoute = decision  # type: ignore[attr-defined]
        if self.inflight is not None:
            self.inflight.routed(request, decision.kind.value)
        try:
            if decision.kind is RouteKind.PING:
                return write_empty(request, 204)
            if self.guard is not None:
                self.guard.check(request)
            return self._dispatch(decision, request, snapshot)
        except AgentError as error:
            return write_error(request, error)

    def body_goes_upstream(self, request: Request) -> bool:
        """Whether the request's body is for an upstream (Docker or another agent), so it
        may stream as it arrives (:mod:`portainer_agent.httpkit.upload`); asked when the
        headers are in. Local endpoints and upgrade requests read their body whole."""
        _, path = split_version_prefix(request.path)
        snapshot = self.cluster() if self.cluster is not None else None
        kind = decide(request_facts(request, path), snapshot).kind
        return kind in _UPSTREAM_KINDS and not is_upgrade_request(
            request.method, request.requestHeaders.getRawHeaders(b"connection", []),
            request.requestHeaders.getRawHeaders(b"upgrade", []))

    def body_goes_to_endpoint(self, request: Request) -> bool:
        """Whether the request's body is for a local agent endpoint that reads it as it
        arrives (its ``streams_body`` is true: ``/browse/put``); asked like
        :meth:`body_goes_upstream`."""
        _, path = split_version_prefix(request.path)
        snapshot = self.cluster() if self.cluster is not None else None
        decision = decide(request_facts(request, path), snapshot)
        return decision.kind is RouteKind.AGENT and bool(getattr(self.endpoints.get(decision.path), "streams_body", False))

    def _dispatch(self, decision: Route, request: Request, snapshot: ClusterSnapshot | None) -> Any:
        if decision.kind is RouteKind.AGENT:
            endpoint = self.endpoints.get(decision.path)
            if endpoint is None:
                raise not_found(decision.path.decode("latin-1"))
            return endpoint.render(request)
        if decision.kind is RouteKind.REFUSED:
            assert decision.error is not None
            raise decision.error
        return self.destinations.serve(decision, request, snapshot.local.node_name if snapshot else None)


__all__ = ["AgentRoot", "AGENT_HEADERS", "RequestGuard", "NOT_DONE_YET", "request_facts"]
