"""The list cache across agents, on the shared two-node lab (real dockerds, a real Swarm):
read-your-writes through two different agents, unchanged peers answering 304, Swarm tasks
showing up, a node's socket and the agents agreeing."""
from __future__ import annotations

import json
import uuid
from typing import Any

from portainer_agent.lab.testing import LabTestCase
from portainer_agent.testing.polling import wait_for

LIST = "/v1.41/containers/json?all=1"


class ListCacheLabTests(LabTestCase):
    lab_shared = "two-nodes"

    def setUp(self) -> Any:
        result = super().setUp()

        def converged() -> bool:
            response = self.lab.agent_request("node2", "/agents")
            return response is not None and response.status == 200 and len(json.loads(response.body)) == 2

        wait_for(converged, 30, "both agents to list 2 members", interval=0.2)
        return result

    def request(self, node: str, path: str, method: str = "GET", **kwargs: Any) -> tuple[int, Any, bytes]:
        response = self.lab.agent_request(node, path, method=method, timeout=30, **kwargs)
        self.assertIsNotNone(response, f"{node}'s agent did not answer {method} {path}")
        return response.status, response.headers, response.body

    def aggregated_ids(self, node: str) -> dict[str, str]:
        """Container ID -> node name, from an aggregated list asked of ``node``'s agent."""
        status, headers, body = self.request(node, LIST)
        self.assertEqual(status, 200, body[:300])
        self.assertFalse(_header(headers, "X-PortainerAgent-Unreachable-Nodes"), "a node was left out")
        return {item["Id"]: item["Portainer"]["Agent"]["NodeName"] for item in json.loads(body)}

    def create(self, via: str, on: str) -> str:
        status, _, body = self.request(via, "/containers/create", method="POST",
                                       headers={"Content-Type": "application/json",
                                                "X-PortainerAgent-Target": on},
                                       body=json.dumps({"Image": "busybox:local", "Cmd": ["true"]}).encode())
        self.assertEqual(status, 201, body)
        return json.loads(body)["Id"]

    def remove(self, via: str, on: str, ident: str) -> None:
        status, _, body = self.request(via, f"/containers/{ident}", method="DELETE",
                                       headers={"X-PortainerAgent-Target": on})
        self.assertEqual(status, 204, body)

    def test_a_write_through_one_agent_shows_at_once_in_a_list_through_the_other(self) -> None:
        stale = []
        for round_ in range(6):
            writer, reader = ("node1", "node2") if round_ % 2 == 0 else ("node2", "node1")
            for on in ("node1", "node2"):
                self.aggregated_ids(reader)  # both lists kept (and the peers' copies) before the write
                ident = self.create(writer, on)
                if self.aggregated_ids(reader).get(ident) != on:
                    stale.append(("created", writer, reader, on))
                self.remove(writer, on, ident)
                if ident in self.aggregated_ids(reader):
                    stale.append(("removed", writer, reader, on))
        self.assertEqual(stale, [])

    def test_unchanged_peers_are_not_asked_again_and_the_merge_is_the_same(self) -> None:
        def unchanged() -> float:
            """Legs node1 answered 304, and legs not sent at all (node1 announced no change)."""
            metrics = self.lab.agent_metrics("node2")
            assert metrics is not None
            return sum(metrics.get(name, node="node1") or 0.0 for name in (
                "portainer_agent_aggregate_not_modified_total", "portainer_agent_aggregate_from_memory_total"))

        first = self.aggregated_ids("node2")
        before = unchanged()
        for _ in range(3):
            self.assertEqual(self.aggregated_ids("node2"), first)
        self.assertGreaterEqual(unchanged() - before, 2, "node1's kept list was merged for the later legs")

    def test_a_swarm_task_shows_in_the_list_as_soon_as_the_socket_has_it(self) -> None:
        name = f"palc{uuid.uuid4().hex[:6]}"
        self.aggregated_ids("node2")
        self.lab.docker("node1", "service", "create", "--detach", "--no-resolve-image", "--name", name,
                        "--mode", "global", "busybox:local", "sleep", "3600")
        self.addCleanup(self.lab.docker, "node1", "service", "rm", name, check=False)

        def on_socket(node: str) -> set[str]:
            out = self.lab.docker(node, "ps", "-aq", "--no-trunc", "--filter",
                                  f"label=com.docker.swarm.service.name={name}").stdout.split()
            return set(out)

        for node in ("node1", "node2"):
            tasks = wait_for(lambda: on_socket(node), 60, f"a task of {name} on {node}'s socket", interval=0.2)
            wait_for(lambda: tasks <= set(self.aggregated_ids("node2")), 1.0,
                     f"{node}'s task to show through the agent", interval=0.02)


def _header(headers: Any, name: str) -> str | None:
    if hasattr(headers, "get"):
        return headers.get(name) or headers.get(name.lower())
    for key, value in headers:
        if key.lower() == name.lower():
            return value
    return None
