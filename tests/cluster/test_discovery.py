"""Default cluster and advertise addresses from our own container (a fake Docker in memory)."""
from __future__ import annotations

import json
from typing import Any

from portainer_agent.docker.testing import MemoryDocker
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from portainer_agent.cluster.discovery import (
    ContainerFacts,
    choose_advertise_address,
    default_cluster_address,
    inspect_own_container,
)

CONTAINER = {
    "Config": {"Labels": {"com.docker.swarm.service.name": "portainer_agent"}},
    "NetworkSettings": {"Networks": {
        "ingress": {"IPAddress": "10.0.0.5", "NetworkID": "ing"},
        "bridge_local": {"IPAddress": "172.17.0.3", "NetworkID": "loc"},
        "portainer_agent_network": {"IPAddress": "10.0.9.7", "NetworkID": "ovl"},
    }},
}
NETWORKS = {
    "ing": {"Scope": "swarm", "Ingress": True},
    "loc": {"Scope": "local"},
    "ovl": {"Scope": "swarm"},
}


class FakeDocker(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        parts = request.path.decode().strip("/").split("/")
        if parts[0] == "containers" and parts[1] == "abc123":
            return json.dumps(CONTAINER).encode()
        if parts[0] == "networks" and parts[1] in NETWORKS:
            return json.dumps(NETWORKS[parts[1]]).encode()
        request.setResponseCode(404)
        return b'{"message": "no such object"}'


class DiscoveryTests(SynchronousTestCase):
    def inspect(self, hostname: str) -> Any:
        client = MemoryDocker(FakeDocker())
        d = inspect_own_container(client, hostname)
        client.flush()
        return self.successResultOf(d)

    def test_swarm_task_facts(self) -> None:
        facts = self.inspect("abc123")
        self.assertEqual(facts, ContainerFacts("portainer_agent", ("10.0.9.7",), ("172.17.0.3",)))
        self.assertEqual(default_cluster_address(None, facts), "tasks.portainer_agent")
        self.assertEqual(default_cluster_address("10.1.1.1:9100", facts), "10.1.1.1:9100")
        self.assertEqual(choose_advertise_address(None, facts, "192.168.1.10"), "10.0.9.7")
        self.assertEqual(choose_advertise_address("10.2.2.2", facts, "192.168.1.10"), "10.2.2.2")

    def test_host_install_runs_alone_on_the_node_address(self) -> None:
        facts = self.inspect("my-laptop")
        self.assertFalse(facts.in_container)
        self.assertIsNone(default_cluster_address(None, facts))
        self.assertEqual(choose_advertise_address(None, facts, "192.168.1.10"), "192.168.1.10")
