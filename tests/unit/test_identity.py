"""Node identity from Docker's ``GET /info`` (and ``GET /nodes/{id}`` for managers)."""
from __future__ import annotations

import copy
import json
from typing import Any

from portainer_agent.docker.testing import MemoryDocker
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from portainer_agent.docker.identity import NodeIdentity, fetch_identity, identity_from_info

# Trimmed from dockerd 20.10 answers (API 1.41), the fields kept as Docker sends them.
STANDALONE_INFO: dict[str, Any] = {
    "ID": "4VCD:2EJL:QEGU:VKVD:NJYE:WSGF:5AXP:ZDEN:NV2H:6KAI:T3TJ:QHZA",
    "Containers": 3,
    "Images": 12,
    "Driver": "overlay2",
    "DockerRootDir": "/var/lib/docker",
    "Name": "laptop",
    "ServerVersion": "20.10.24",
    "OperatingSystem": "Debian GNU/Linux 12 (bookworm)",
    "OSType": "linux",
    "Architecture": "x86_64",
    "NCPU": 2,
    "Swarm": {
        "NodeID": "",
        "NodeAddr": "",
        "LocalNodeState": "inactive",
        "ControlAvailable": False,
        "Error": "",
        "RemoteManagers": None,
    },
    "Labels": [],
}


def swarm_info(name: str, node_id: str, addr: str, manager: bool) -> dict[str, Any]:
    info = copy.deepcopy(STANDALONE_INFO)
    info["Name"] = name
    info["DockerRootDir"] = "/srv/docker"
    info["Swarm"] = {
        "NodeID": node_id,
        "NodeAddr": addr,
        "LocalNodeState": "active",
        "ControlAvailable": manager,
        "Error": "",
        "RemoteManagers": [{"NodeID": "q1w2e3r4t5y6u7i8o9p0asdfg", "Addr": "10.0.0.2:2377"}],
        "Nodes": 3,
        "Managers": 1,
    }
    if manager:
        info["Swarm"]["Cluster"] = {"ID": "xk0p4qkq3p2ld0r4ccm6w3v2f", "Version": {"Index": 10}}
    return info


WORKER_INFO = swarm_info("worker-1", "6o0ptbdrwcj6uaw5sznwtu8kx", "10.0.0.3", manager=False)
MANAGER_INFO = swarm_info("manager-2", "l2ew4qhmvndx0snr51y1oz3ha", "10.0.0.4", manager=True)
LEADER_INFO = swarm_info("manager-1", "q1w2e3r4t5y6u7i8o9p0asdfg", "10.0.0.2", manager=True)


def node(node_id: str, addr: str, leader: bool) -> dict[str, Any]:
    return {
        "ID": node_id,
        "Spec": {"Role": "manager", "Availability": "active"},
        "Status": {"State": "ready", "Addr": addr},
        "ManagerStatus": {"Leader": leader, "Reachability": "reachable", "Addr": addr + ":2377"}
        if leader
        else {"Reachability": "reachable", "Addr": addr + ":2377"},
    }


class IdentityFromInfoTests(SynchronousTestCase):
    def test_standalone(self) -> None:
        identity = identity_from_info(STANDALONE_INFO)
        self.assertEqual(identity, NodeIdentity(name="laptop", node_id="", role=None, is_leader=False, node_addr="",
                                                docker_root_dir="/var/lib/docker", server_version="20.10.24"))
        self.assertFalse(identity.in_swarm)
        self.assertFalse(identity.is_manager)

    def test_worker(self) -> None:
        identity = identity_from_info(WORKER_INFO)
        self.assertEqual((identity.name, identity.node_id, identity.role, identity.is_leader, identity.node_addr),
                         ("worker-1", "6o0ptbdrwcj6uaw5sznwtu8kx", "worker", False, "10.0.0.3"))
        self.assertTrue(identity.in_swarm)
        self.assertFalse(identity.is_manager)
        self.assertEqual(identity.docker_root_dir, "/srv/docker")

    def test_manager_not_leader(self) -> None:
        identity = identity_from_info(MANAGER_INFO, node("l2ew4qhmvndx0snr51y1oz3ha", "10.0.0.4", leader=False))
        self.assertEqual((identity.role, identity.is_leader, identity.is_manager), ("manager", False, True))

    def test_manager_without_node_answer_is_not_leader(self) -> None:
        self.assertFalse(identity_from_info(MANAGER_INFO).is_leader)

    def test_leader(self) -> None:
        identity = identity_from_info(LEADER_INFO, node("q1w2e3r4t5y6u7i8o9p0asdfg", "10.0.0.2", leader=True))
        self.assertEqual((identity.name, identity.role, identity.is_leader, identity.node_addr),
                         ("manager-1", "manager", True, "10.0.0.2"))

    def test_not_active_states_are_outside_the_swarm(self) -> None:
        for state in ("pending", "error", "locked", "inactive"):
            info = copy.deepcopy(WORKER_INFO)
            info["Swarm"]["LocalNodeState"] = state
            identity = identity_from_info(info)
            self.assertEqual((identity.in_swarm, identity.role), (False, None), state)

    def test_missing_or_null_fields(self) -> None:
        identity = identity_from_info({"Name": "bare", "Swarm": None})
        self.assertEqual(identity, NodeIdentity(name="bare"))
        self.assertEqual(identity_from_info({}).docker_root_dir, "/var/lib/docker")

    def test_round_trips_through_json(self) -> None:
        # What Docker sends is JSON; the pure function must not depend on Python-only values.
        info = json.loads(json.dumps(LEADER_INFO))
        self.assertEqual(identity_from_info(info).role, "manager")


class FakeDockerInfo(Resource):
    isLeaf = True

    def __init__(self, info: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.info, self.nodes = info, nodes
        self.paths: list[bytes] = []

    def render_GET(self, request: Any) -> bytes:
        self.paths.append(request.path)
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/info":
            return json.dumps(self.info).encode()
        node_id = request.path.rsplit(b"/", 1)[-1].decode()
        if request.path.startswith(b"/nodes/") and node_id in self.nodes:
            return json.dumps(self.nodes[node_id]).encode()
        request.setResponseCode(404)
        return b'{"message":"node not found"}'


class FetchIdentityTests(SynchronousTestCase):
    def fetch(self, docker: FakeDockerInfo) -> NodeIdentity:
        client = MemoryDocker(docker)
        d = fetch_identity(client)
        client.flush()
        return self.successResultOf(d)

    def test_leader_asks_for_its_node(self) -> None:
        docker = FakeDockerInfo(LEADER_INFO, {"q1w2e3r4t5y6u7i8o9p0asdfg": node("q1w2e3r4t5y6u7i8o9p0asdfg", "10.0.0.2", True)})
        identity = self.fetch(docker)
        self.assertTrue(identity.is_leader)
        self.assertEqual(docker.paths, [b"/info", b"/nodes/q1w2e3r4t5y6u7i8o9p0asdfg"])

    def test_worker_does_not_ask_for_nodes(self) -> None:
        docker = FakeDockerInfo(WORKER_INFO, {})
        self.assertEqual(self.fetch(docker).role, "worker")
        self.assertEqual(docker.paths, [b"/info"])

    def test_manager_whose_node_is_missing_is_not_leader(self) -> None:
        identity = self.fetch(FakeDockerInfo(MANAGER_INFO, {}))
        self.assertEqual((identity.role, identity.is_leader), ("manager", False))
