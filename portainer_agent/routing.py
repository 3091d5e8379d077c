"""The one routing decision point: request facts and a cluster snapshot in, a :class:`Route` out.

Pure (no I/O, no reactor): the root resource gathers the facts (method, path without the
Docker API version prefix, upgrade, the ``X-PortainerAgent-*`` headers) and a snapshot of
live members, and acts on the decision (:mod:`portainer_agent.proxy.dispatch`).

The rules are the original agent's (spec §6.1) with its known faults fixed (§14):

* standalone engine (no cluster): everything is local, the target header is ignored;
* ``X-PortainerAgent-ManagerOperation`` present -> a manager;
* ``GET`` ``/containers/json``, ``/images/json``, ``/volumes``, ``/networks`` -> every node
  (aggregate), unless the target header names a node: then that node alone (the original
  answered with the receiving node's list unless the header named itself);
* ``/services``, ``/tasks``, ``/secrets``, ``/configs``, ``/swarm``, ``/nodes``, ``/info``
  (whole path segments: ``/infoX`` is not ``/info``) -> a manager;
* anything else, hijacked streams and one-node agent endpoints included -> the node named by
  the target header, or local when it is absent or names this node;
* a request another agent already forwarded (marked with :data:`FORWARDED_HEADER`) is served
  here if it is for this node and refused otherwise: it is never forwarded twice.
"""
from __future__ import annotations

import enum
from typing import Any, Sequence

import attrs

from portainer_agent.cluster.member import Member
from portainer_agent.errors import AgentError

#: Request headers that steer routing (matched case-insensitively by twisted.web).
TARGET_HEADER = b"X-PortainerAgent-Target"
MANAGER_OPERATION_HEADER = b"X-PortainerAgent-ManagerOperation"
#: Set by an agent on every request it forwards to another agent (value: its node name).
FORWARDED_HEADER = b"X-PortainerAgent-Forwarded-By"


class RouteKind(enum.Enum):
    PING = "ping"  # public liveness probe
    AGENT = "agent"  # one of the agent's own endpoints, served here
    DOCKER = "local"  # proxied to the local Docker engine
    HIJACK = "hijack"  # proxied to the local Docker engine as an upgraded, spliced stream
    FORWARD = "forward"  # to the one peer agent in ``members`` (HTTP, or spliced if ``upgrade``)
    MANAGER = "manager"  # to the first reachable of ``members`` (managers, leader first)
    AGGREGATE = "aggregate"  # to every node in ``members`` at once, answers merged
    REFUSED = "refused"  # answered here with ``error``


#: Agent API namespaces: paths here never reach Docker.
AGENT_NAMESPACES = (b"/agents", b"/host/", b"/browse/", b"/websocket/")
#: Agent endpoints served by the receiving agent whatever the target header says.
CLUSTER_WIDE_ENDPOINTS = frozenset({b"/agents"})
#: Docker lists every node has its own copy of (GET only).
AGGREGATED_PATHS = frozenset({b"/containers/json", b"/images/json", b"/volumes", b"/networks"})
#: Swarm-manager API roots (whole path segments).
MANAGER_ROOTS = (b"/services", b"/tasks", b"/secrets", b"/configs", b"/swarm", b"/nodes", b"/info")


@attrs.frozen
class ClusterSnapshot:
    """Live members (one per node name, self included) at the time of a request."""

    local: Member
    members: tuple[Member, ...]

    @classmethod
    def of(cls, view: Any) -> "ClusterSnapshot":
        """From a :class:`~portainer_agent.cluster.membership.MembershipView` (or alike)."""
        return cls(view.local, tuple(view.alive_members()))

    def member_named(self, name: str) -> Member | None:
        return next((m for m in self.members if m.node_name == name), None)

    def manager_candidates(self) -> tuple[Member, ...]:
        """Live managers other than this node, the leader first, then by node name."""
        others = [m for m in self.members if m.is_manager and m.node_name != self.local.node_name]
        return tuple(sorted(others, key=lambda m: (not m.is_leader, m.node_name)))


@attrs.frozen
class RequestFacts:
    """What routing needs to know of a request."""

    method: bytes
    #: The path without the Docker API version prefix (``/v1.41``), agent prefix kept.
    path: bytes
    upgrade: bool = False
    #: ``X-PortainerAgent-Target`` (None when absent or empty).
    target: str | None = None
    manager_operation: bool = False
    #: The node name in :data:`FORWARDED_HEADER`, when another agent forwarded this request.
    forwarded_by: str | None = None


@attrs.frozen
class Route:
    kind: RouteKind
    #: For AGENT routes: the endpoint path without ``/v1``/``/v2`` (``/agents``,
    #: ``/host/info``, ``/browse/ls``...). For the others: the path as routed, without
    #: the Docker version prefix (the upstream always receives the client's original URI).
    path: bytes
    #: The agent API version prefix the client used (``b"v1"``, ``b"v2"`` or None).
    agent_api: bytes | None = None
    #: FORWARD: the one peer; MANAGER: candidates in order; AGGREGATE: every node, by name.
    members: tuple[Member, ...] = ()
    #: The request asks for an upgraded stream (spliced rather than relayed as HTTP).
    upgrade: bool = False
    #: REFUSED: the answer.
    error: AgentError | None = None
    #: Legacy ``/v1/browse/{volumeID}/{action}``: the volume named in the path (raw bytes).
    volume_id: bytes | None = None

    @property
    def is_public(self) -> bool:
        return self.kind is RouteKind.PING


def unknown_target(name: str) -> AgentError:
    """The original's answer (spec §6.1), in Docker JSON form."""
    return AgentError(500, "The agent was unable to contact any other agent",
                      f"Unable to find the targeted agent {name!r}")


def no_manager() -> AgentError:
    return AgentError(500, "The agent was unable to contact any other agent located on a manager node",
                      "Unable to find an agent on any manager node")


def forwarding_loop(target: str | None, sender: str, local: str) -> AgentError:
    return AgentError(
        508, "Refusing to forward a request another agent already forwarded",
        f"agent {local!r} received a request forwarded by {sender!r} for node {target or '(none)'!r}",
    )


def _agent_endpoint(path: bytes) -> bool:
    return path == b"/agents" or path == b"/agents/" or any(
        path.startswith(ns) for ns in AGENT_NAMESPACES if ns.endswith(b"/")
    )


LEGACY_BROWSE_ACTIONS = (b"ls", b"get", b"put", b"rename", b"delete")


def legacy_browse(agent_api: bytes | None, inner: bytes) -> tuple[bytes, bytes] | None:
    """``/v1/browse/{volumeID}/{action}`` -> ``(b"/browse/{action}", volumeID)``, else None."""
    if agent_api != b"v1" or not inner.startswith(b"/browse/"):
        return None
    parts = inner[len(b"/browse/"):].rstrip(b"/").split(b"/")
    if len(parts) == 2 and parts[0] and parts[1] in LEGACY_BROWSE_ACTIONS:
        return b"/browse/" + parts[1], parts[0]
    return None


def _under(path: bytes, roots: Sequence[bytes]) -> bool:
    return any(path == root or path.startswith(root + b"/") for root in roots)


def route(
    method: bytes,
    path: bytes,
    upgrade: bool = False,
    *,
    target: str | None = None,
    manager_operation: bool = False,
    forwarded_by: str | None = None,
    cluster: ClusterSnapshot | None = None,
) -> Route:
    """Decide where a request goes. ``path`` has no Docker version prefix."""
    return decide(RequestFacts(method, path, upgrade, target or None, manager_operation, forwarded_by), cluster)


def decide(facts: RequestFacts, cluster: ClusterSnapshot | None) -> Route:
    """:func:`route` on a :class:`RequestFacts` record."""
    path = facts.path
    agent_api: bytes | None = None
    inner = path
    for prefix in (b"/v1", b"/v2"):
        if path.startswith(prefix + b"/"):
            agent_api, inner = prefix[1:], path[len(prefix):]
            break
    if inner == b"/ping" and facts.method in (b"GET", b"HEAD") and agent_api != b"v1":
        return Route(RouteKind.PING, inner, agent_api)

    if _agent_endpoint(inner):
        endpoint = inner.rstrip(b"/") or inner
        local = Route(RouteKind.AGENT, endpoint, agent_api, upgrade=facts.upgrade)
        legacy = legacy_browse(agent_api, inner)
        if legacy is not None:
            local = attrs.evolve(local, path=legacy[0], volume_id=legacy[1])
        if cluster is None or endpoint in CLUSTER_WIDE_ENDPOINTS:
            return local
        return _to_target(facts, cluster, local)

    local = Route(RouteKind.HIJACK if facts.upgrade else RouteKind.DOCKER, path, upgrade=facts.upgrade)
    if cluster is None:
        return local
    if facts.forwarded_by is not None:
        # The sender already chose this node; serve it here or refuse, never forward again.
        return _to_target(facts, cluster, local)
    if facts.manager_operation or _under(path, MANAGER_ROOTS):
        return _to_manager(facts, cluster, local)
    if facts.method == b"GET" and path in AGGREGATED_PATHS and not facts.upgrade:
        if facts.target is None:
            return Route(RouteKind.AGGREGATE, path, members=cluster.members)
        return _to_target(facts, cluster, local)
    return _to_target(facts, cluster, local)


def _to_target(facts: RequestFacts, cluster: ClusterSnapshot, local: Route) -> Route:
    """The target rule: local when the header is absent or names this node."""
    me = cluster.local.node_name
    if facts.target is None or facts.target == me:
        return local
    if facts.forwarded_by is not None:
        return Route(RouteKind.REFUSED, local.path, local.agent_api,
                     error=forwarding_loop(facts.target, facts.forwarded_by, me))
    member = cluster.member_named(facts.target)
    if member is None:
        return Route(RouteKind.REFUSED, local.path, local.agent_api, error=unknown_target(facts.target))
    return Route(RouteKind.FORWARD, local.path, local.agent_api, members=(member,), upgrade=facts.upgrade)


def _to_manager(facts: RequestFacts, cluster: ClusterSnapshot, local: Route) -> Route:
    """A manager serves manager operations itself; a worker forwards to one (leader first)."""
    if cluster.local.is_manager:
        return local
    candidates = cluster.manager_candidates()
    if not candidates:
        return Route(RouteKind.REFUSED, local.path, error=no_manager())
    return Route(RouteKind.MANAGER, local.path, members=candidates, upgrade=facts.upgrade)
