"""``ListenerService`` on port 0: the port the kernel chose is the one logged, recorded in
``BoundPorts`` (and its file) and handed to whoever waits for it; a failure to bind names
the configured address and fails the waiters."""
from __future__ import annotations

import json
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from portainer_agent.listening import BoundPorts, ListenerService

from .tempdirs import temp_dir


class ListenerOnPortZeroTests(TestCase):
    def listener(self, port: int, ports: BoundPorts | None = None, fatal: list[str] | None = None) -> ListenerService:
        return ListenerService(TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), Factory.forProtocol(Protocol),
                               "127.0.0.1", port, what="test API", scheme="https", name="api", ports=ports,
                               on_fatal=None if fatal is None else fatal.append)

    def logged(self) -> list[LogEvent]:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_the_bound_port_is_logged_recorded_and_written(self) -> None:
        events = self.logged()
        path = temp_dir(self) / "ports.json"
        ports = BoundPorts(path)
        service = self.listener(0, ports)
        waiting = service.when_bound()
        service.startService()
        self.addCleanup(service.stopService)
        bound = self.successResultOf(waiting)
        assert service.port is not None
        self.assertEqual(bound, service.port.getHost().port)  # type: ignore[attr-defined]
        self.assertNotEqual(bound, 0)
        self.assertEqual(service.bound_port, bound)
        self.assertEqual(self.successResultOf(service.when_bound()), bound)  # at once, now
        self.assertEqual(ports.ports, {"api": bound})
        self.assertEqual(json.loads(path.read_text()), {"api": bound})
        [line] = [e for e in events if e.get("log_format") == "{what} listening on {url}"]
        self.assertEqual((line["url"], line["port"], line["listener"]), (f"https://127.0.0.1:{bound}", bound, "api"))

    def test_the_file_gathers_every_listener_and_is_replaced_whole(self) -> None:
        path = temp_dir(self) / "ports.json"
        ports = BoundPorts(path)
        ports.record("api", 40001)
        ports.record("metrics", 40002)
        self.assertEqual(json.loads(path.read_text()), {"api": 40001, "metrics": 40002})
        self.assertEqual([p.name for p in path.parent.iterdir()], ["ports.json"])  # no temporary left behind

    def test_a_failed_bind_names_the_configured_port_and_fails_the_waiters(self) -> None:
        first = self.listener(0)
        first.startService()
        self.addCleanup(first.stopService)
        taken = self.successResultOf(first.when_bound())
        fatal: list[str] = []
        ports = BoundPorts()
        second = self.listener(taken, ports, fatal)
        waiting = second.when_bound()
        second.startService()
        self.failureResultOf(waiting)
        [message] = fatal
        self.assertTrue(message.startswith(f"cannot listen on 127.0.0.1:{taken}: "), message)
        self.assertEqual(ports.ports, {})
        self.flushLoggedErrors()

