"""Agent-made errors and their Docker-style JSON body."""
from __future__ import annotations

import json

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.errors import AgentError, bad_gateway_docker, not_found


class AgentErrorTests(SynchronousTestCase):
    def test_body_is_docker_style_json_line(self) -> None:
        body = AgentError(409, "conflict", "already running").body()
        self.assertTrue(body.endswith(b"\n"))
        self.assertEqual(json.loads(body), {"message": "conflict", "details": "already running"})

    def test_details_default_to_the_message(self) -> None:
        self.assertEqual(json.loads(AgentError(400, "bad").body()), {"message": "bad", "details": "bad"})

    def test_non_ascii_is_valid_json(self) -> None:
        body = AgentError(400, 'quote " and é', "tab\t").body()
        self.assertEqual(json.loads(body)["message"], 'quote " and é')

    def test_is_raisable_and_keeps_its_fields(self) -> None:
        try:
            raise not_found("/v2/host/nothing")
        except AgentError as error:
            self.assertEqual((error.status, error.message), (404, "page not found"))
            self.assertIn("/v2/host/nothing", error.details)
            self.assertIn("404", str(error))

    def test_travels_in_a_deferred(self) -> None:
        failure = self.failureResultOf(fail(AgentError(403, "no")), AgentError)
        self.assertEqual(failure.value.status, 403)

    def test_bad_gateway_names_the_socket(self) -> None:
        error = bad_gateway_docker("/var/run/docker.sock", "Connection refused")
        self.assertEqual(error.status, 502)
        self.assertIn("/var/run/docker.sock", error.message)
        self.assertEqual(json.loads(error.body())["details"], "Connection refused")
