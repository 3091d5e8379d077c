"""Agent-made errors and their Docker-style JSON body."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request, Site

from portainer_agent.errors import AgentError, bad_gateway_docker, not_found
from portainer_agent.toolbox.responses import finish_with_error

from .memory import HeldOpen


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

    def test_raised_through_inline_callbacks_keeps_its_fields(self) -> None:
        # Re-raising from a Failure sets __traceback__ on the (frozen attrs) exception.
        @inlineCallbacks
        def handler() -> Any:
            yield succeed(None)
            raise AgentError(403, "no", "why")

        @inlineCallbacks
        def caller() -> Any:
            try:
                yield handler()
            except AgentError as error:
                return error
            return None

        error = self.successResultOf(caller())
        self.assertEqual((error.status, error.message, error.details), (403, "no", "why"))
        self.assertIsNotNone(error.__traceback__)

    def test_bad_gateway_names_the_socket(self) -> None:
        error = bad_gateway_docker("/var/run/docker.sock", "Connection refused")
        self.assertEqual(error.status, 502)
        self.assertIn("/var/run/docker.sock", error.message)
        self.assertEqual(json.loads(error.body())["details"], "Connection refused")


class FinishWithErrorTests(SynchronousTestCase):
    """``finish_with_error``: how an error found after ``render`` returned reaches the client."""

    def open_request(self) -> tuple[Request, StringTransport]:
        resource = HeldOpen()
        protocol = Site(resource, reactor=Clock()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: agent\r\n\r\n")
        [request] = resource.requests
        return request, transport

    def test_status_json_and_length(self) -> None:
        request, transport = self.open_request()
        finish_with_error(request, AgentError(502, "docker gone", "refused"))
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertIn(b"\r\nContent-Type: application/json", head)
        self.assertIn(b"\r\nContent-Length: %d" % len(body), head)
        self.assertEqual(json.loads(body), {"message": "docker gone", "details": "refused"})
        self.assertTrue(request.finished)

    def test_after_the_headers_went_out_the_connection_is_cut(self) -> None:
        request, transport = self.open_request()
        request.write(b"partial")
        finish_with_error(request, AgentError(502, "docker gone", "refused"))
        self.assertNotIn(b"docker gone", transport.value())
        self.assertTrue(transport.disconnected, "aborted: a truncated body must not look complete")

    def test_nothing_happens_when_the_client_left(self) -> None:
        request, transport = self.open_request()
        request.channel.connectionLost(Failure(ConnectionDone()))
        before = transport.value()
        finish_with_error(request, AgentError(502, "docker gone", "refused"))
        self.assertEqual(transport.value(), before)
        self.assertEqual(self.flushLoggedErrors(), [])
