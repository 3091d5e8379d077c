"""The real server classes in memory: ``AgentSite`` with its ``AgentHTTPChannel`` and
``AgentRequest``, the access log, in-flight tracking, and the drain a graceful stop runs
(``ApiListenerService.stopService``), all over ``StringTransport`` and ``task.Clock``.
The same classes run end to end in tests/integration (real sockets, real TLS)."""
from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from portainer_agent.http.request import AgentRequest
from portainer_agent.http.site import AgentHTTPChannel, AgentSite

from .memory import HeldOpen

GRACE = 5.0


class Connection:
    """One client connection to the site, over a transport that reports its own close."""

    def __init__(self, site: AgentSite, closes: bool = True) -> None:
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport: Any = cast(Any, StringTransportWithDisconnection() if closes else StringTransport())
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def wire(self) -> bytes:
        return self.transport.value()

    @property
    def open(self) -> bool:
        return bool(getattr(self.transport, "connected", True)) and not self.transport.disconnecting


def get(path: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: agent\r\n\r\n" % path


class SiteTestCase(SynchronousTestCase):
    def make_site(self, **kwargs: Any) -> tuple[AgentSite, HeldOpen, Clock]:
        clock = Clock()
        resource = HeldOpen({b"/slow"}, first=b"started,")
        site = AgentSite(resource, reactor=clock, **kwargs)
        return site, resource, clock


class ChannelAndRequestTests(SiteTestCase):
    def test_site_serves_with_its_own_channel_and_request_classes(self) -> None:
        site, resource, _ = self.make_site()
        connection = Connection(site)
        connection.send(get(b"/containers/json"))
        self.assertTrue(connection.wire.startswith(b"HTTP/1.1 200 OK\r\n"), connection.wire)
        self.assertTrue(connection.wire.endswith(b"\r\n\r\nok"), connection.wire)
        [request] = resource.requests
        [(channel, _)] = resource.seen
        self.assertIsInstance(request, AgentRequest)
        self.assertIsInstance(channel, AgentHTTPChannel)
        self.assertEqual(list(site.channels), [channel])
        self.assertTrue(connection.open, "keep-alive: the connection stays open after the answer")

    def test_form_bodies_are_not_parsed(self) -> None:
        # The proxy streams bodies as they are; twisted.web would otherwise read a form
        # body into request.args (and consume it).
        site, resource, _ = self.make_site()
        body = b"a=1&b=2"
        Connection(site).send(b"POST /build?q=x HTTP/1.1\r\nHost: agent\r\n"
                              b"Content-Type: application/x-www-form-urlencoded\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        [request] = resource.requests
        self.assertEqual(request.args, {b"q": [b"x"]})
        self.assertEqual(resource.seen[0][1], body)

    def test_over_long_request_line_gets_a_414_and_a_close(self) -> None:
        site, resource, _ = self.make_site()
        connection = Connection(site)
        connection.send(b"GET /" + b"a" * 20_000)
        self.assertTrue(connection.wire.startswith(b"HTTP/1.1 414 "), connection.wire)
        self.assertIn(b'"message": "Request-URI Too Long"', connection.wire)
        self.assertFalse(connection.open)
        self.assertEqual(resource.requests, [])

    def test_over_long_header_gets_a_431_and_a_close(self) -> None:
        site, resource, _ = self.make_site()
        connection = Connection(site)
        connection.send(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 20_000 + b"\r\n")
        self.assertTrue(connection.wire.startswith(b"HTTP/1.1 431 "), connection.wire)
        self.assertFalse(connection.open)

    def test_channel_knows_when_its_connection_is_gone(self) -> None:
        site, _, _ = self.make_site()
        connection = Connection(site)
        [channel] = list(site.channels)
        self.assertFalse(channel.closed)
        connection.transport.loseConnection()
        self.assertTrue(channel.closed)

    def test_requests_are_in_flight_until_they_finish(self) -> None:
        site, resource, _ = self.make_site()
        connection = Connection(site)
        connection.send(get(b"/slow"))
        [request] = resource.requests
        self.assertEqual(site.inflight.requests(), [request])
        request.write(b"end")
        request.finish()
        self.assertEqual(site.inflight.requests(), [])
        self.assertIn(b"started,", connection.wire)

    def test_a_request_whose_client_left_is_no_longer_in_flight(self) -> None:
        site, resource, _ = self.make_site()
        connection = Connection(site)
        connection.send(get(b"/slow"))
        connection.transport.loseConnection()
        self.assertEqual(site.inflight.requests(), [])


class AccessLogTests(SiteTestCase):
    def capture(self) -> list[LogEvent]:
        events: list[LogEvent] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") == "portainer_agent.access":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    def test_one_structured_line_per_request_without_the_query(self) -> None:
        events = self.capture()
        site, _, _ = self.make_site(access_log=True)
        Connection(site).send(get(b"/containers/json?filters=secret"))
        [event] = events
        self.assertEqual((event["method"], event["path"], event["status"], event["bytes"]),
                         ("GET", "/containers/json", 200, 2))
        self.assertGreaterEqual(event["duration_ms"], 0)
        self.assertEqual(event["log_level"].name, "debug")

    def test_off_by_default(self) -> None:
        events = self.capture()
        site, _, _ = self.make_site()
        Connection(site).send(get(b"/containers/json"))
        self.assertEqual(events, [])


class DrainTests(SiteTestCase):
    """``AgentSite.drain``: what a graceful stop waits for, and what it cuts."""

    def test_idle_keep_alive_connections_are_closed_at_once(self) -> None:
        site, _, clock = self.make_site()
        connection = Connection(site)
        connection.send(get(b"/fast"))
        self.successResultOf(site.drain(clock, GRACE))
        self.assertFalse(connection.open)
        self.assertTrue(connection.wire.endswith(b"ok"), "the answer went out before the close")

    def test_waits_for_a_request_that_finishes_within_the_grace_period(self) -> None:
        site, resource, clock = self.make_site()
        connection = Connection(site)
        connection.send(get(b"/slow"))
        drained = site.drain(clock, GRACE)
        clock.advance(GRACE - 1)
        self.assertNoResult(drained)
        self.assertTrue(connection.open)
        [request] = resource.requests
        request.write(b"the end")
        request.finish()
        self.successResultOf(drained)
        self.assertTrue(connection.wire.endswith(b"7\r\nthe end\r\n0\r\n\r\n"), connection.wire)
        self.assertFalse(connection.open)
        self.assertFalse(connection.transport.disconnected, "a finished response ends with a clean close")

    def test_cuts_a_request_still_running_after_the_grace_period(self) -> None:
        site, resource, clock = self.make_site()
        connection = Connection(site)
        connection.send(get(b"/slow"))
        drained = site.drain(clock, GRACE)
        clock.advance(GRACE - 0.01)
        self.assertNoResult(drained)
        clock.advance(0.02)
        self.successResultOf(drained)
        self.assertTrue(connection.transport.disconnected, "cut: aborted, not closed cleanly")
        [request] = resource.requests
        self.assertTrue(request._disconnected)

    def handed_over(self, site: AgentSite, resource: HeldOpen) -> tuple[Any, Any]:
        """A request taken over by a stream (as a hijack does): (stream, its release)."""
        Connection(site).send(get(b"/slow"))

        class Stream:
            transport = StringTransport()

        stream = Stream()
        return stream, site.inflight.hand_over(resource.requests[-1], stream)

    def test_cuts_hijacked_streams_after_the_grace_period(self) -> None:
        site, resource, clock = self.make_site()
        stream, _ = self.handed_over(site, resource)
        drained = site.drain(clock, GRACE)
        clock.advance(GRACE - 0.01)
        self.assertNoResult(drained)
        self.assertFalse(stream.transport.disconnected)
        clock.advance(0.02)
        self.successResultOf(drained)
        self.assertTrue(stream.transport.disconnected)

    def test_an_ended_stream_is_not_waited_for(self) -> None:
        site, resource, clock = self.make_site()
        _, release = self.handed_over(site, resource)
        self.assertEqual(site.inflight.streams(), 1)
        release()
        self.assertEqual(site.inflight.streams(), 0)
        self.assertEqual(len(site.inflight), 0)
        self.successResultOf(site.drain(clock, GRACE))

    def test_a_connection_that_does_not_close_delays_the_stop_one_second_at_most(self) -> None:
        site, _, clock = self.make_site()
        connection = Connection(site, closes=False)  # its close is never reported
        connection.send(get(b"/fast"))
        drained = site.drain(clock, GRACE)
        self.assertTrue(connection.transport.disconnecting, "asked to close")
        clock.advance(0.9)
        self.assertNoResult(drained)
        clock.advance(0.2)
        self.successResultOf(drained)


class ListenerStopTests(SiteTestCase):
    """``ApiListenerService.stopService``: stop accepting first, then drain."""

    def test_stop_closes_the_port_then_drains(self) -> None:
        from portainer_agent.tap import ApiListenerService

        class Port:
            stopped = False

            def getHost(self) -> IPv4Address:
                return IPv4Address("TCP", "127.0.0.1", 40001)

            def stopListening(self) -> Any:
                self.stopped = True
                return succeed(None)

        class Endpoint:
            port = Port()

            def listen(self, factory: Any) -> Any:
                return succeed(self.port)

        site, resource, clock = self.make_site()
        endpoint = Endpoint()
        service = ApiListenerService(endpoint, site, clock, GRACE, "127.0.0.1", 0)  # type: ignore[arg-type]
        service.startService()
        self.assertIs(service.port, endpoint.port)
        connection = Connection(site)
        connection.send(get(b"/slow"))
        stopping = service.stopService()
        self.assertTrue(endpoint.port.stopped)
        self.assertNoResult(stopping)
        [request] = resource.requests
        request.finish()
        self.successResultOf(stopping)
        self.assertFalse(connection.open)
