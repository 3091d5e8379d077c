"""The agent's root resource: every request enters here.

In order: agent headers on the response (so every answer carries them, errors and
404s included), Docker API version prefix split off for routing, the public ping,
the request guard (signature check, before any routing or forwarding), then the
routing decision (:func:`portainer_agent.routing.route`) and its handler.
"""
from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent import AGENT_API_VERSION, AGENT_PLATFORM, __version__
from portainer_agent.errors import AgentError, not_found
from portainer_agent.http.paths import is_upgrade_request, split_version_prefix
from portainer_agent.http.responses import write_empty, write_error
from portainer_agent.routing import Route, RouteKind, route

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


class AgentRoot(Resource):
    """Routes every path itself (a leaf): the tree is data in :mod:`routing`."""

    isLeaf = True

    def __init__(
        self,
        docker: Handler,
        hijack: Handler,
        guard: RequestGuard | None = None,
        endpoints: dict[bytes, IResource | Handler] | None = None,
    ) -> None:
        super().__init__()
        self._docker = docker
        self._hijack = hijack
        self.guard = guard
        #: Agent endpoints by path without ``/v1``/``/v2``: ``b"/agents"``, ``b"/host/info"``...
        self.endpoints: dict[bytes, IResource | Handler] = dict(endpoints or {})

    def render(self, request: Request) -> Any:
        for name, value in AGENT_HEADERS:
            request.responseHeaders.setRawHeaders(name, [value])
        _, path = split_version_prefix(request.path)
        headers = request.requestHeaders
        upgrade = is_upgrade_request(
            request.method, headers.getRawHeaders(b"connection", []), headers.getRawHeaders(b"upgrade", [])
        )
        decision = route(request.method, path, upgrade)
        request.agentRoute = decision  # type: ignore[attr-defined]
        try:
            if decision.kind is RouteKind.PING:
                return write_empty(request, 204)
            if self.guard is not None:
                self.guard.check(request)
            return self._dispatch(decision, request)
        except AgentError as error:
            return write_error(request, error)

    def _dispatch(self, decision: Route, request: Request) -> Any:
        if decision.kind is RouteKind.AGENT:
            endpoint = self.endpoints.get(decision.path)
            if endpoint is None:
                raise not_found(decision.path.decode("latin-1"))
            return endpoint.render(request)
        if decision.kind is RouteKind.HIJACK:
            return self._hijack.render(request)
        return self._docker.render(request)


__all__ = ["AgentRoot", "AGENT_HEADERS", "RequestGuard", "NOT_DONE_YET"]
