"""The one routing decision point: request facts in, a :class:`Route` out.

Pure (no I/O): the root resource gathers the facts (method, path without the Docker
API version prefix, upgrade headers) and acts on the decision. Cluster routing
(target header, manager operations, aggregation) extends this same function.
"""
from __future__ import annotations

import enum

import attrs


class RouteKind(enum.Enum):
    PING = "ping"  # public liveness probe
    AGENT = "agent"  # one of the agent's own endpoints
    DOCKER = "docker"  # proxied to the local Docker engine
    HIJACK = "hijack"  # proxied to Docker as an upgraded, spliced stream


#: Agent API namespaces: paths here never reach Docker.
AGENT_NAMESPACES = (b"/agents", b"/host/", b"/browse/", b"/websocket/")


@attrs.frozen
class Route:
    kind: RouteKind
    #: For AGENT routes: the endpoint path without ``/v1``/``/v2`` (``/agents``,
    #: ``/host/info``, ``/browse/ls``...). For the others: the path Docker sees,
    #: without the version prefix.
    path: bytes
    #: The agent API version prefix the client used (``b"v1"``, ``b"v2"`` or None).
    agent_api: bytes | None = None

    @property
    def is_public(self) -> bool:
        return self.kind is RouteKind.PING


def _agent_endpoint(path: bytes) -> bool:
    return path == b"/agents" or path == b"/agents/" or any(
        path.startswith(ns) for ns in AGENT_NAMESPACES if ns.endswith(b"/")
    )


def route(method: bytes, path: bytes, upgrade: bool = False) -> Route:
    """Decide where a request goes. ``path`` has no Docker version prefix."""
    agent_api: bytes | None = None
    inner = path
    for prefix in (b"/v1", b"/v2"):
        if path.startswith(prefix + b"/"):
            agent_api, inner = prefix[1:], path[len(prefix):]
            break
    if inner == b"/ping" and method in (b"GET", b"HEAD") and agent_api != b"v1":
        return Route(RouteKind.PING, inner, agent_api)
    if _agent_endpoint(inner):
        return Route(RouteKind.AGENT, inner.rstrip(b"/") or inner, agent_api)
    if upgrade:
        return Route(RouteKind.HIJACK, path)
    return Route(RouteKind.DOCKER, path)
