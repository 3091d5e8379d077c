"""The agent's root resource: every request enters here.

In order: agent headers on the response (so every answer carries them, errors and
404s included), the request's route (decided once, when its headers came in:
:mod:`portainer_agent.http.router`), the public ping, the request guard (signature check,
before any forwarding), then the destination the route names, given the route: an agent
endpoint (a :class:`~portainer_agent.proxy.dispatch.Handler`) or the
:class:`~portainer_agent.proxy.dispatch.Destinations` (both injected).
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent import AGENT_API_VERSION, AGENT_PLATFORM, __version__
from portainer_agent.errors import AgentError, not_found
from portainer_agent.http.inflight import InFlight
from portainer_agent.http.router import Routed, Router
from portainer_agent.toolbox.responses import write_empty, write_error
from portainer_agent.proxy.dispatch import Destinations, Handler
from portainer_agent.routing import RouteKind

log = Logger()

AGENT_HEADERS = (
    (b"Portainer-Agent", __version__.encode()),
    (b"Portainer-Agent-Api-Version", AGENT_API_VERSION.encode()),
    (b"Portainer-Agent-Platform", AGENT_PLATFORM.encode()),
)


class RequestGuard(Protocol):
    """Refuses a request by raising :class:`AgentError` (e.g. a bad signature)."""

    def check(self, request: Request) -> None: ...


class AgentRoot(Resource):
    """Routes every path itself (a leaf): the tree is data in :mod:`routing`."""

    isLeaf = True

    def __init__(
        self,
        destinations: Destinations,
        router: Router | None = None,
        guard: RequestGuard | None = None,
        endpoints: Mapping[bytes, Handler] | None = None,
        inflight: InFlight | None = None,
    ) -> None:
        super().__init__()
        self.destinations = destinations
        #: The site's router: asked here only for a request that was not routed when its
        #: headers came in (one not built by :class:`~portainer_agent.http.request.AgentRequests`).
        self.router = router if router is not None else Router()
        self.guard = guard
        #: Agent endpoints by path without ``/v1``/``/v2``: ``b"/agents"``, ``b"/host/info"``...
        self.endpoints: Mapping[bytes, Handler] = dict(endpoints or {})
        #: The site's in-flight registry: told each request's route kind (for its metrics).
        self.inflight = inflight

    def render(self, request: Request) -> Any:
        for name, value in AGENT_HEADERS:
            request.responseHeaders.setRawHeaders(name, [value])
        routed: Routed | None = getattr(request, "routed", None)
        if routed is None:
            routed = self.router.decide(request)
        route = routed.route
        if self.inflight is not None:
            self.inflight.routed(request, route.kind.value)
        try:
            if route.kind is RouteKind.PING:
                return write_empty(request, 204)
            if self.guard is not None:
                self.guard.check(request)
            return self._dispatch(routed, request)
        except AgentError as error:
            return write_error(request, error)

    def _dispatch(self, routed: Routed, request: Request) -> Any:
        route = routed.route
        if route.kind is RouteKind.AGENT:
            endpoint = self.endpoints.get(route.path)
            if endpoint is None:
                raise not_found(route.path.decode("latin-1"))
            return endpoint.render(request, route)
        if route.kind is RouteKind.REFUSED:
            assert route.error is not None
            raise route.error
        return self.destinations.serve(route, request, routed.local_name)


__all__ = ["AgentRoot", "AGENT_HEADERS", "RequestGuard", "NOT_DONE_YET"]
