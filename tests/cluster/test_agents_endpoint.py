"""``GET /agents``: the original's keys and types first, 503 on a standalone engine."""
from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.cluster.membership import MembershipView
from portainer_agent.cluster.simulation import SimNetwork
from portainer_agent.http.agents import AgentsResource


class AgentsEndpointTests(SynchronousTestCase):
    def get(self, resource: AgentsResource, method: str = "GET") -> tuple[int, object]:
        client = StubTreq(resource)
        response = self.successResultOf(client.request(method, "http://agent/agents"))
        body = self.successResultOf(response.content())
        return response.code, json.loads(body) if body else None

    def test_standalone_is_503_with_the_original_message(self) -> None:
        code, body = self.get(AgentsResource(None))
        self.assertEqual(code, 503)
        self.assertEqual(body, {
            "message": "Agent management is not available when running the agent on a standalone engine",
            "details": "Agent management is disabled",
        })

    def test_cluster_lists_live_members_with_original_keys_first(self) -> None:
        net = SimNetwork()
        swims = net.build(3)
        newer = net.make_member(7, node_name="node-1", boot=10**12)
        swims[0].merge_state([newer])
        code, body = self.get(AgentsResource(MembershipView(swims[0])))
        self.assertEqual(code, 200)
        assert isinstance(body, list)
        self.assertEqual([entry["NodeName"] for entry in body], ["node-0", "node-1", "node-2"])
        first = body[0]
        self.assertEqual(list(first)[:4], ["IPAddress", "Port", "NodeName", "NodeRole"])
        self.assertEqual(first["Port"], "9001")
        self.assertEqual(first["IPAddress"], "10.0.0.1")
        self.assertEqual(first["NodeRole"], "manager")
        self.assertTrue(first["Leader"])
        self.assertTrue(first["Self"])
        self.assertEqual(first["State"], "alive")
        node1 = body[1]
        self.assertEqual(node1["ClusterAddress"], newer.key)
        self.assertEqual(node1["Conflicts"], [swims[1].local.key])

    def test_other_methods_are_refused(self) -> None:
        code, _ = self.get(AgentsResource(None), "POST")
        self.assertEqual(code, 405)
