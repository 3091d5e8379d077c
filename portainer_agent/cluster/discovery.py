"""Where this agent is and which cluster it belongs to, when the options do not say.

Inside a Swarm task the container's hostname is its container id, so ``GET
/containers/<hostname>/json`` tells us the service (label ``com.docker.swarm.service.name``,
hence the default cluster address ``tasks.<service>``) and our addresses; the one on a
swarm-scoped, non-ingress network is the address other agents can reach (the Go agent 1.5+
rule). On a host install the inspect answers 404 and we fall back to the Swarm node address.
"""
from __future__ import annotations

import socket
from typing import Any, Generator

import attrs
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

log = Logger(namespace="portainer_agent.cluster")

SERVICE_LABEL = "com.docker.swarm.service.name"


@attrs.frozen
class ContainerFacts:
    """What Docker says about the container we run in (empty when not in a container)."""

    service_name: str | None = None
    swarm_addresses: tuple[str, ...] = ()
    other_addresses: tuple[str, ...] = ()

    @property
    def in_container(self) -> bool:
        return bool(self.swarm_addresses or self.other_addresses or self.service_name)


def default_cluster_address(configured: str | None, facts: ContainerFacts) -> str | None:
    """``--cluster-addr`` if given, else ``tasks.<service>`` for a Swarm task, else None."""
    if configured:
        return configured
    if facts.service_name:
        return f"tasks.{facts.service_name}"
    return None


def choose_advertise_address(configured: str | None, facts: ContainerFacts, node_addr: str) -> str:
    """``--advertise-addr`` if given; in a container its swarm-network address; else the
    Swarm node address; else loopback (a lone agent)."""
    if configured:
        return configured
    if facts.swarm_addresses:
        return facts.swarm_addresses[0]
    if facts.other_addresses:
        return facts.other_addresses[0]
    return node_addr or "127.0.0.1"


@inlineCallbacks
def inspect_own_container(docker: Any, hostname: str | None = None) -> Generator[Any, Any, ContainerFacts]:
    """Read our container's service label and addresses through the Docker client."""
    hostname = hostname or socket.gethostname()
    code, container = yield docker.get_json(f"/containers/{hostname}/json")
    if code != 200 or not isinstance(container, dict):
        return ContainerFacts()
    labels = (container.get("Config") or {}).get("Labels") or {}
    networks = ((container.get("NetworkSettings") or {}).get("Networks")) or {}
    swarm: list[str] = []
    other: list[str] = []
    for name, settings in sorted(networks.items()):
        address = (settings or {}).get("IPAddress")
        if not address:
            continue
        network_id = (settings or {}).get("NetworkID") or name
        scope, ingress = "local", name == "ingress"
        details_code, network = yield docker.get_json(f"/networks/{network_id}")
        if details_code == 200 and isinstance(network, dict):
            scope = network.get("Scope") or scope
            ingress = ingress or bool(network.get("Ingress"))
        if ingress:
            continue
        (swarm if scope == "swarm" else other).append(address)
    return ContainerFacts(labels.get(SERVICE_LABEL) or None, tuple(swarm), tuple(other))
