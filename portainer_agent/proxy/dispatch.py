"""Acting on a routing decision: hand the request to the destination the route names."""
from __future__ import annotations

from typing import Any, Protocol

from twisted.web.server import Request

from portainer_agent.routing import Route, RouteKind


class Handler(Protocol):
    """Serves a request: the local Docker proxy and splice here, and every agent endpoint at
    the edge, which is also given the route that chose it (the legacy
    ``/v1/browse/{volumeID}/...`` paths carry the volume in the route)."""

    def render(self, request: Request, route: Route | None = None) -> Any: ...


class Destinations:
    """The places a routed request can go: local Docker (plain or spliced), a peer agent
    (plain or spliced), a manager (first reachable), every node (fan-out)."""

    def __init__(self, docker: Handler, hijack: Handler, peers: Any = None, fanout: Any = None) -> None:
        self.docker = docker
        self.hijack = hijack
        #: :class:`~portainer_agent.proxy.peer.PeerForwarder` (None on a standalone engine).
        self.peers = peers
        #: :class:`~portainer_agent.proxy.fanout.FanOut` (None on a standalone engine).
        self.fanout = fanout

    def serve(self, route: Route, request: Request, local_name: str | None) -> Any:
        kind = route.kind
        if kind is RouteKind.DOCKER:
            return self.docker.render(request)
        if kind is RouteKind.HIJACK:
            return self.hijack.render(request)
        if kind is RouteKind.FORWARD:
            member = route.members[0]
            if route.upgrade:
                return self.peers.open_stream(request, member)
            return self.peers.render(request, member)
        if kind is RouteKind.MANAGER:
            if route.upgrade:
                return self.peers.open_stream(request, route.members[0])
            return self.peers.render_first(request, route.members)
        if kind is RouteKind.AGGREGATE:
            return self.fanout.render(request, route.path, route.members, local_name or "")
        raise ValueError(f"not a destination route: {route.kind}")
