"""The Swarm's node list, and which nodes an aggregated list must account for (pure).

Membership knows the agents that are alive; the Swarm knows every node. An aggregated list
asks the live agents, and every node the Swarm lists with no live agent is *named* (the
``X-PortainerAgent-Unreachable-Nodes`` header, ``/volumes``' ``Warnings``, the log), so a
user never mistakes missing containers for gone ones.

Which Swarm nodes count: all of them, whatever their availability (a drained or paused node
still runs plain containers, and Docker lists them) and their state (a Down node's containers
are missing too; its reason says it is down in the Swarm). A node that left and joined again
appears twice in Docker's list under one name: it is named once, with its best state.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import attrs
import msgspec

from portainer_agent.cluster.member import Member


class InvalidNodeList(ValueError):
    """The answer to ``GET /nodes`` is not Docker's node list."""


@attrs.frozen
class SwarmNode:
    """One node as the Swarm lists it (``GET /nodes``)."""

    #: ``Description.Hostname``: the name agents go by (``docker info`` ``.Name``).
    name: str
    #: ``Status.State``: ready, down, disconnected or unknown.
    state: str
    #: ``Spec.Availability``: active, pause or drain.
    availability: str
    #: ``Spec.Role``: manager or worker.
    role: str
    node_id: str = ""


class _Status(msgspec.Struct):
    State: str = "unknown"


class _Spec(msgspec.Struct):
    Availability: str = "active"
    Role: str = "worker"


class _Description(msgspec.Struct):
    Hostname: str = ""


class _Node(msgspec.Struct):
    ID: str = ""
    Status: _Status = msgspec.field(default_factory=_Status)
    Spec: _Spec = msgspec.field(default_factory=_Spec)
    Description: _Description = msgspec.field(default_factory=_Description)


_decode_nodes = msgspec.json.Decoder(list[_Node]).decode

#: The best first, when one name appears more than once.
_STATE_RANK = {"ready": 0, "unknown": 1, "disconnected": 2, "down": 3}


def parse_node_list(body: bytes) -> tuple[SwarmNode, ...]:
    """Docker's ``GET /nodes`` answer -> one record per node name (sorted by name)."""
    try:
        raw = _decode_nodes(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise InvalidNodeList(f"not a Docker node list: {error}") from None
    best: dict[str, SwarmNode] = {}
    for node in raw:
        if not node.Description.Hostname:
            continue  # Docker always sets it; a node without a name cannot be named
        record = SwarmNode(node.Description.Hostname, node.Status.State.lower(), node.Spec.Availability.lower(),
                           node.Spec.Role.lower(), node.ID)
        current = best.get(record.name)
        if current is None or _STATE_RANK.get(record.state, 9) < _STATE_RANK.get(current.state, 9):
            best[record.name] = record
    return tuple(best[name] for name in sorted(best))


_STATE_TEXT = {
    "ready": "node ready in the Swarm",
    "down": "node down in the Swarm",
    "disconnected": "node disconnected from the Swarm",
}
_AVAILABILITY_TEXT = {"drain": "drained", "pause": "paused"}


def absence_reason(node: SwarmNode) -> str:
    """Why ``node``'s items are missing: no agent answers there, and what the Swarm says of it."""
    where = _STATE_TEXT.get(node.state, f"node state {node.state or 'unknown'} in the Swarm")
    availability = _AVAILABILITY_TEXT.get(node.availability)
    if availability:
        where += f", {availability}"
    return f"no agent answering on node {node.name} ({where})"


def uncovered_nodes(nodes: Sequence[SwarmNode], asked: Iterable[str]) -> list[tuple[str, str]]:
    """The Swarm nodes no live agent answers for: ``(name, reason)``, by name."""
    covered = set(asked)
    return [(node.name, absence_reason(node)) for node in nodes if node.name not in covered]


def node_list_sources(members: Sequence[Member], local_name: str) -> list[Member]:
    """Where to read the node list, in order: this node's own Docker when it is a manager,
    then the other live managers' agents, the leader first (a worker's Docker cannot list
    nodes)."""
    local = [m for m in members if m.node_name == local_name and m.is_manager]
    others = sorted((m for m in members if m.is_manager and m.node_name != local_name),
                    key=lambda m: (not m.is_leader, m.node_name))
    return local + others


@attrs.frozen
class NodeListState:
    """What is known of the Swarm's node list at one time."""

    #: None until a list was read once.
    nodes: tuple[SwarmNode, ...] | None = None
    #: When it was read (clock seconds).
    read_at: float | None = None
    #: Why the last attempt failed (None when it succeeded or none was made).
    error: str | None = None

    @property
    def known(self) -> bool:
        return self.nodes is not None

    def unknown_reason(self) -> str:
        return self.error or "not read yet"


def unknown_list_warning(reason: str) -> str:
    """The ``Warnings`` line (and log text) for an aggregate answered without a node list."""
    return (f"the Swarm node list is not known yet ({reason}): nodes without a live agent may be missing "
            "from this list")


__all__: list[Any] = ["SwarmNode", "NodeListState", "InvalidNodeList", "parse_node_list", "absence_reason",
                      "uncovered_nodes", "node_list_sources", "unknown_list_warning"]
