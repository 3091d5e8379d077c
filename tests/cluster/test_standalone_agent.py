"""A real agent on a standalone engine (no Swarm): membership is off, ``/agents`` is 503."""
from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.testing.gates import Need, require

from tests.integration.support import AgentProcess, shared_daemon


class StandaloneAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        require(Need.ROOT, Need.DOCKERD)
        self.agent = AgentProcess.start(shared_daemon().socket_path)
        self.addCleanup(self.agent.cleanup)

    def test_agents_is_503_with_the_original_message(self) -> None:
        for path in ("/agents", "/v1/agents", "/v2/agents"):
            status, _, body = self.agent.request("GET", path)
            self.assertEqual(status, 503, path)
            self.assertEqual(json.loads(body), {
                "message": "Agent management is not available when running the agent on a standalone engine",
                "details": "Agent management is disabled",
            })
        self.assertIn("cluster membership is off", self.agent.log_text)

    def test_agents_requires_a_signature(self) -> None:
        status, _, _ = self.agent.request("GET", "/agents", signed=False)
        self.assertEqual(status, 403)
