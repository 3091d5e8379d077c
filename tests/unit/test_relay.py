"""Relaying an upstream response: backpressure, client disconnects, broken upstreams.

The upstream here is a scripted ``IAgent`` whose response body is delivered by the
test, through a transport that records pause/resume/stop, so flow control between the
client connection and the upstream is observable.
"""
from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from .memory import Memory, raw_request


class UpstreamTransport:
    """What ``deliverBody`` hands the body protocol: the upstream connection's producer."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


@attrs.define
class ScriptedResponse:
    code: int = 200
    phrase: bytes = b"OK"
    headers: Headers = attrs.field(factory=lambda: Headers({b"content-type": [b"application/json"]}))
    length: Any = UNKNOWN_LENGTH
    version: tuple[bytes, int, int] = (b"HTTP", 1, 1)
    protocol: Any = None
    transport: UpstreamTransport = attrs.field(factory=UpstreamTransport)

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class ScriptedAgent:
    def __init__(self, response: ScriptedResponse | None = None) -> None:
        self.response = response
        self.pending: list[Deferred[Any]] = []
        self.cancelled = 0
        self.body_producers: list[Any] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.body_producers.append(bodyProducer)
        if self.response is not None:
            return succeed(self.response)

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.pending.append(d)
        return d


class RelayTests(SynchronousTestCase):
    def memory(self, upstream: ScriptedAgent) -> Memory:
        memory = Memory(upstream=upstream)
        self.addCleanup(memory.stop)
        return memory

    def test_slow_client_pauses_the_upstream(self) -> None:
        response = ScriptedResponse()
        wire = self.memory(ScriptedAgent(response)).raw(raw_request(b"GET", b"/containers/abc/logs?follow=1"))
        self.assertTrue(wire.status().startswith(b"HTTP/1.1 200"), wire.data)
        # The client's socket buffer is full: twisted.web pauses its channel's producers.
        wire.transport.producer.pauseProducing()
        self.assertEqual(response.transport.events, ["pause"])
        wire.transport.producer.resumeProducing()
        self.assertEqual(response.transport.events, ["pause", "resume"])
        response.protocol.dataReceived(b"line\n")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertTrue(wire.data.endswith(b"5\r\nline\n\r\n0\r\n\r\n"), wire.data)
        self.assertFalse(wire.transport.disconnecting)

    def test_client_gone_stops_an_endless_upstream(self) -> None:
        response = ScriptedResponse()
        wire = self.memory(ScriptedAgent(response)).raw(raw_request(b"GET", b"/events"))
        response.protocol.dataReceived(b'{"status":"start"}\n')
        wire.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn("stop", response.transport.events)
        # Late data and the end of the upstream are harmless.
        response.protocol.dataReceived(b'{"status":"die"}\n')
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertNotIn(b"die", wire.data)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_gone_before_docker_answers_cancels_the_request(self) -> None:
        upstream = ScriptedAgent()
        wire = self.memory(upstream).raw(raw_request(b"POST", b"/containers/abc/wait"))
        self.assertEqual(len(upstream.pending), 1)
        wire.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(upstream.cancelled, 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_upstream_broken_mid_body_cuts_the_client_response(self) -> None:
        response = ScriptedResponse(length=100)
        wire = self.memory(ScriptedAgent(response)).raw(raw_request(b"GET", b"/containers/abc/export"))
        self.assertEqual(wire.values(b"content-length"), [b"100"])
        response.protocol.dataReceived(b"x" * 40)
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost("docker died"))])))
        self.assertTrue(wire.transport.disconnecting)
        self.assertEqual(wire.body(), b"x" * 40)

    def test_upstream_broken_mid_chunked_body_never_sends_the_last_chunk(self) -> None:
        response = ScriptedResponse()
        wire = self.memory(ScriptedAgent(response)).raw(raw_request(b"GET", b"/images/get?names=busybox"))
        response.protocol.dataReceived(b"tar bytes")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost("docker died"))])))
        self.assertTrue(wire.transport.disconnecting)
        self.assertFalse(wire.data.endswith(b"0\r\n\r\n"), wire.data)

    def test_close_delimited_upstream_body_ends_normally(self) -> None:
        response = ScriptedResponse()
        wire = self.memory(ScriptedAgent(response)).raw(raw_request(b"GET", b"/version"))
        response.protocol.dataReceived(b"{}")
        response.protocol.connectionLost(Failure(PotentialDataLoss()))
        self.assertTrue(wire.data.endswith(b"2\r\n{}\r\n0\r\n\r\n"), wire.data)
        self.assertFalse(wire.transport.disconnecting)

    def upload_after_an_early_answer(self, size: int) -> None:
        """Docker answers (and the client request finishes) before the upload is read."""
        response = ScriptedResponse(length=2)
        upstream = ScriptedAgent(response)
        memory = self.memory(upstream)
        body = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
        wire = memory.raw(raw_request(b"PUT", b"/containers/missing/archive?path=/", [], body))
        response.protocol.dataReceived(b"{}")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertTrue(wire.data.endswith(b"\r\n\r\n{}"), wire.data)
        # Only now does the upstream connection ask for the body.
        [producer] = upstream.body_producers
        received: list[bytes] = []
        consumer = type("Consumer", (), {"write": lambda self, data: received.append(data)})()
        done = producer.startProducing(consumer)
        for _ in range(size // 65536 + 3):
            memory.clock.advance(0)
        self.successResultOf(done)
        self.assertEqual(b"".join(received), body)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_small_upload_outlives_an_early_answer(self) -> None:
        self.upload_after_an_early_answer(1000)

    def test_spooled_upload_outlives_an_early_answer(self) -> None:
        self.upload_after_an_early_answer(300_000)
