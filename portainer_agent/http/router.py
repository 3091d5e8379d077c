"""The route of a request, decided once: when its headers are in.

Why here and not in :mod:`portainer_agent.routing`: ``routing.decide`` is pure (facts and a
snapshot in, a :class:`~portainer_agent.routing.Route` out); the :class:`Router` is its thin
shell at the edge. It reads the facts off a twisted.web request, takes one snapshot of the
live members (the ``cluster`` callable ``tap.py`` gives it), and returns both as a
:class:`Routed` record. The request asks it once, at ``gotLength`` time
(:class:`portainer_agent.http.request.AgentRequest`), so whether the body streams and where the
request goes are decided on the same snapshot; the root then hands the route to whatever
serves it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import attrs
from twisted.web.server import Request

from portainer_agent.toolbox.paths import is_upgrade_request, split_version_prefix
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

#: Routes whose body goes to an upstream (Docker or another agent), as it arrives.
_UPSTREAM_KINDS = frozenset({RouteKind.DOCKER, RouteKind.FORWARD, RouteKind.MANAGER})


@attrs.frozen
class Routed:
    """A request's route and the snapshot facts serving it needs."""

    route: Route
    #: This node's name in the snapshot the route was decided on (None: standalone).
    local_name: str | None = None


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


def streaming_paths(endpoints: Mapping[bytes, Any]) -> frozenset[bytes]:
    """The agent endpoints (by path) that read their body as it arrives (``streams_body``)."""
    return frozenset(path for path, endpoint in endpoints.items() if getattr(endpoint, "streams_body", False))


class Router:
    """Decides requests' routes on a snapshot of the cluster (see the module docstring)."""

    def __init__(self, cluster: Callable[[], ClusterSnapshot | None] | None = None,
                 streaming: Iterable[bytes] = ()) -> None:
        #: Live cluster members now; None (or returning None) on a standalone engine.
        self._cluster = cluster
        #: Agent endpoint paths whose body streams to them (``/browse/put``).
        self._streaming = frozenset(streaming)

    def decide(self, request: Request) -> Routed:
        """The route of ``request`` (its ``method``, ``path`` and headers set)."""
        _, path = split_version_prefix(request.path)
        snapshot = self._cluster() if self._cluster is not None else None
        return Routed(decide(request_facts(request, path), snapshot),
                      snapshot.local.node_name if snapshot is not None else None)

    def body_streams(self, routed: Routed) -> bool:
        """Whether the body of a request so routed is read as it arrives: it goes to an
        upstream (not as an upgraded stream: those read theirs whole), or to a local endpoint
        that writes it away as it comes. Every other body is read whole, bounded."""
        route = routed.route
        if route.kind in _UPSTREAM_KINDS:
            return not route.upgrade
        return route.kind is RouteKind.AGENT and route.path in self._streaming
