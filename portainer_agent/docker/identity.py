"""Who this node is, from Docker's point of view (``GET /info``).

The pure part (:func:`identity_from_info`) turns Docker's JSON into a
:class:`NodeIdentity`; two thin shells fetch it: a blocking one used once at start
(so a missing Docker fails the start with a clear message before anything listens)
and a Deferred one for periodic refresh (role changes, leadership).
"""
from __future__ import annotations

from typing import Any, Generator

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks

from portainer_agent.docker.blocking import get_json_blocking
from portainer_agent.docker.wire import ProtocolError


class DockerUnavailable(Exception):
    """The Docker socket does not answer (or answers nonsense)."""


@attrs.frozen
class NodeIdentity:
    name: str
    node_id: str = ""
    role: str | None = None  # "manager" / "worker" in a swarm, None otherwise
    is_leader: bool = False
    node_addr: str = ""
    docker_root_dir: str = "/var/lib/docker"
    server_version: str = ""

    @property
    def in_swarm(self) -> bool:
        return bool(self.node_id)

    @property
    def is_manager(self) -> bool:
        return self.role == "manager"


def identity_from_info(info: dict[str, Any], node: dict[str, Any] | None = None) -> NodeIdentity:
    """Pure: ``GET /info`` (and, for managers, ``GET /nodes/{id}``) -> NodeIdentity."""
    swarm = info.get("Swarm") or {}
    node_id = swarm.get("NodeID") or ""
    # A node that left or is joining reports a NodeID only when its state is active.
    if swarm.get("LocalNodeState") not in (None, "active"):
        node_id = ""
    role = None
    if node_id:
        role = "manager" if swarm.get("ControlAvailable") else "worker"
    leader = bool(((node or {}).get("ManagerStatus") or {}).get("Leader"))
    return NodeIdentity(
        name=str(info.get("Name") or ""),
        node_id=node_id,
        role=role,
        is_leader=leader,
        node_addr=str(swarm.get("NodeAddr") or ""),
        docker_root_dir=str(info.get("DockerRootDir") or "/var/lib/docker"),
        server_version=str(info.get("ServerVersion") or ""),
    )


def node_path(info: dict[str, Any]) -> str | None:
    """Pure: ``/nodes/{id}`` to read the leader flag from, for a manager; else None."""
    swarm = info.get("Swarm") or {}
    if swarm.get("ControlAvailable") and swarm.get("NodeID"):
        return f"/nodes/{swarm['NodeID']}"
    return None


def _get_json_blocking(socket_path: str, path: str, timeout: float) -> Any:
    code, body = get_json_blocking(socket_path, path, timeout)
    if code != 200 or body is None:
        raise DockerUnavailable(f"Docker at {socket_path} answered {code} to GET {path}")
    return body


def fetch_identity_blocking(socket_path: str, timeout: float = 10.0) -> NodeIdentity:
    """Read the identity once, synchronously (start-up only)."""
    try:
        info = _get_json_blocking(socket_path, "/info", timeout)
        node = None
        path = node_path(info)
        if path is not None:
            try:
                node = _get_json_blocking(socket_path, path, timeout)
            except (DockerUnavailable, OSError, ProtocolError):
                node = None
    except (OSError, ProtocolError) as error:
        raise DockerUnavailable(f"cannot reach Docker at {socket_path}: {error}") from error
    return identity_from_info(info, node)


@inlineCallbacks
def fetch_identity(docker: Any) -> Generator[Deferred[Any], Any, NodeIdentity]:
    """Read the identity through the Docker client (``get_json``)."""
    code, info = yield docker.get_json("/info")
    if code != 200 or not isinstance(info, dict):
        raise DockerUnavailable(f"Docker answered {code} to GET /info")
    node = None
    path = node_path(info)
    if path is not None:
        node_code, node_info = yield docker.get_json(path)
        if node_code == 200 and isinstance(node_info, dict):
            node = node_info
    return identity_from_info(info, node)
