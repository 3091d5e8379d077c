"""The suite's own helpers: held ports, the ports file, the poll loop, checked threads and the skip gate."""
from __future__ import annotations

import os
import socket
import unittest
from pathlib import Path
from unittest import mock

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from portainer_agent.listening import BoundPorts
from portainer_agent.testing.gates import Need, missing, require
from portainer_agent.testing.polling import wait_for, wait_for_deferred
from portainer_agent.testing.ports import bound_ports, reserve_port, wait_for_bound_port
from portainer_agent.testing.threads import CheckedThread

from .tempdirs import temp_dir


class PortReservationTests(SynchronousTestCase):
    def test_held_port_refuses_other_binds_and_connections_but_lets_the_listener_in(self) -> None:
        with reserve_port() as reserved:
            with socket.socket() as intruder, self.assertRaises(OSError):
                intruder.bind(("127.0.0.1", reserved.port))
            with socket.socket() as client:
                self.assertNotEqual(client.connect_ex(("127.0.0.1", reserved.port)), 0, "nothing listens yet")
            port = reactor.listenTCP(reserved.port, _factory(), interface="127.0.0.1")  # SO_REUSEADDR
            self.addCleanup(port.stopListening)
            self.assertEqual(port.getHost().port, reserved.port)

    def test_release_frees_the_port(self) -> None:
        reserved = reserve_port()
        reserved.release()
        reserved.release()  # idempotent
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", reserved.port))

    def test_one_port_on_several_addresses(self) -> None:
        hosts = ["127.0.0.31", "127.0.0.32", "127.0.0.33"]
        with reserve_port(hosts) as reserved:
            for host in hosts:
                with socket.socket() as intruder, self.assertRaises(OSError):
                    intruder.bind((host, reserved.port))


class BoundPortsFileTests(SynchronousTestCase):
    """Reading an agent's ``--ports-file``."""

    def test_nothing_before_the_file_then_the_port_it_names(self) -> None:
        path: Path = temp_dir(self) / "ports.json"
        self.assertEqual(bound_ports(path), {})
        BoundPorts(path).record("api", 40001)
        self.assertEqual(wait_for_bound_port(path, "api", 1), 40001)
        self.assertRaises(AssertionError, wait_for_bound_port, path, "metrics", 0.1)

    def test_an_exited_agent_stops_the_wait_at_once(self) -> None:
        def exited() -> None:
            raise RuntimeError("agent exited 1")

        error = self.assertRaises(RuntimeError, wait_for_bound_port, temp_dir(self) / "ports.json", "api", 60, exited)
        self.assertIn("exited", str(error))


def _factory():  # type: ignore[no-untyped-def]
    from twisted.internet.protocol import Factory, Protocol

    return Factory.forProtocol(Protocol)


class WaitForTests(SynchronousTestCase):
    def test_returns_the_first_true_value(self) -> None:
        values = iter([0, None, "yes"])
        self.assertEqual(wait_for(lambda: next(values), 5, "a value", interval=0), "yes")

    def test_times_out_naming_what_and_the_state(self) -> None:
        error = self.assertRaises(AssertionError, wait_for, lambda: False, 0, "the moon", describe=lambda: "dark")
        self.assertEqual(str(error), "timed out after 0s waiting for the moon: dark")

    def test_an_error_in_the_condition_propagates_at_once(self) -> None:
        def broken() -> bool:
            raise KeyError("boom")

        self.assertRaises(KeyError, wait_for, broken, 60, "never")


class WaitForDeferredTests(TestCase):
    def test_polls_on_the_reactor(self) -> object:
        ticks: list[int] = []
        reactor.callLater(0, ticks.append, 1)
        return wait_for_deferred(lambda: ticks, 5, "the reactor to run").addCallback(self.assertEqual, [1])

    def test_times_out(self) -> object:
        return self.assertFailure(wait_for_deferred(lambda: False, 0, "nothing"), AssertionError)


class CheckedThreadTests(SynchronousTestCase):
    def test_an_exception_is_raised_by_finish(self) -> None:
        def fail() -> None:
            raise ValueError("in the helper")

        thread = CheckedThread.started(fail)
        self.assertRaises(ValueError, thread.finish, 10)

    def test_a_thread_still_running_fails(self) -> None:
        import threading

        stop = threading.Event()
        thread = CheckedThread.started(stop.wait, 30)
        self.addCleanup(stop.set)
        self.assertRaises(AssertionError, thread.finish, 0.01)


class GateTests(SynchronousTestCase):
    def test_deploy_tests_are_opt_in_and_say_how(self) -> None:
        with mock.patch.dict(os.environ, {"PA_DEPLOY_TESTS": ""}):
            self.assertIn("PA_DEPLOY_TESTS=1", missing(Need.DEPLOY) or "")
            self.assertRaises(unittest.SkipTest, require, Need.DEPLOY)

    def test_root_is_said(self) -> None:
        with mock.patch("os.geteuid", return_value=1000):
            self.assertIn("needs root", missing(Need.ROOT, Need.DOCKERD) or "")
        with mock.patch("os.geteuid", return_value=0):
            self.assertIsNone(missing(Need.ROOT))
