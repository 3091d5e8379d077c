"""The membership service over real TLS sockets on loopback addresses (127.0.0.x)."""
from __future__ import annotations

import socket
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from portainer_agent.cluster.member import MemberState
from portainer_agent.cluster.service import ClusterService
from portainer_agent.docker.identity import NodeIdentity
from portainer_agent.tls.certs import generate_self_signed
from portainer_agent.tls.server import server_options

KEY = b"test-cluster-key"
HOSTS = [f"127.0.0.{20 + index}" for index in range(1, 5)]


def free_port_on_all(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` (every agent of a cluster uses the same
    cluster port): the kernel picks one on the first, the others are checked."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port: int = first.getsockname()[1]
            others = [socket.socket() for _ in hosts[1:]]
            try:
                for sock, host in zip(others, hosts[1:]):
                    sock.bind((host, port))
            except OSError:
                continue
            finally:
                for sock in others:
                    sock.close()
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


PORT = free_port_on_all(HOSTS)


def make_service(index: int, key: bytes | None = KEY, join: str | None = "127.0.0.21", **kw: Any) -> ClusterService:
    host = f"127.0.0.{20 + index}"
    tls = generate_self_signed([host])
    identity = NodeIdentity(name=f"node{index}", node_id=f"id{index}", role="manager" if index == 1 else "worker",
                            is_leader=index == 1, node_addr=host)
    return ClusterService(
        reactor, identity=identity, api_port=9001, cluster_port=PORT, fingerprint=tls.fingerprint,
        server_tls=server_options(tls), version="test", key=key, cluster_addr=join, advertise_addr=host,
        listen_host=host, **kw,
    )


@inlineCallbacks
def wait_for(condition: Callable[[], bool], timeout: float) -> Any:
    """Poll ``condition`` on the reactor; True as soon as it holds, False at the deadline
    (callers assert on it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        yield deferLater(reactor, 0.05, lambda: None)
    return condition()


def names(service: ClusterService) -> set[str]:
    return {m.node_name for m in service.view.alive_members()}


def is_leader(service: ClusterService, node: str) -> bool:
    member = service.view.member_by_name(node)
    return member is not None and member.is_leader


def stop_if_running(service: ClusterService) -> Any:
    return service.stopService() if service.running else None


class ServiceTests(TestCase):
    timeout = 60

    def start(self, *services: ClusterService) -> None:
        for service in services:
            service.startService()
            self.addCleanup(stop_if_running, service)

    @inlineCallbacks
    def test_three_agents_form_one_cluster_and_a_leave_is_seen_at_once(self) -> Any:
        services = [make_service(i) for i in (1, 2, 3)]
        self.start(*services)
        formed = yield wait_for(lambda: all(names(s) == {"node1", "node2", "node3"} for s in services), 10)
        self.assertTrue(formed, [names(s) for s in services])
        for service in services:
            self.assertEqual([m.node_name for m in service.view.managers()], ["node1"])
        departed: list[tuple[str, MemberState]] = []
        services[0].view.watch_departures(lambda m: departed.append((m.node_name, m.state)))
        yield services[2].stopService()
        gone = yield wait_for(lambda: all(names(s) == {"node1", "node2"} for s in services[:2]), 5)
        self.assertTrue(gone, [names(s) for s in services[:2]])
        # LEFT, not suspect or dead: the leave message told them (failure detection would
        # have taken probe rounds and ended in DEAD). No wall-clock bound needed.
        for service in services[:2]:
            assert service.node is not None
            member = service.node.member(services[2].local.key)
            self.assertIs(member.state if member is not None else None, MemberState.LEFT)
        # The request path heard of it once (it cuts its connections to node3).
        self.assertEqual(departed, [("node3", MemberState.LEFT)])

    @inlineCallbacks
    def test_wrong_key_cannot_join_or_inject(self) -> Any:
        honest = [make_service(1), make_service(2)]
        impostors = [make_service(3, key=b"wrong"), make_service(4, key=None)]
        self.start(*honest, *impostors)
        formed = yield wait_for(lambda: all(names(s) == {"node1", "node2"} for s in honest), 10)
        self.assertTrue(formed)
        # Wait until every impostor has really tried: its join attempts reached the
        # cluster port and were refused, twice (the third attempt has started).
        tried = yield wait_for(lambda: all(i.joiner is not None and i.joiner.attempts >= 3 for i in impostors), 15)
        self.assertTrue(tried, [i.joiner and i.joiner.attempts for i in impostors])
        for service in honest:
            self.assertEqual(names(service), {"node1", "node2"})
        for impostor in impostors:
            self.assertEqual(names(impostor), {impostor.local.node_name})
            assert impostor.joiner is not None
            self.assertFalse(impostor.joiner.joined)

    @inlineCallbacks
    def test_role_change_spreads(self) -> Any:
        promoted = NodeIdentity(name="node2", node_id="id2", role="manager", is_leader=True, node_addr="127.0.0.22")
        current: dict[str, Any] = {"identity": None}

        def refresh() -> Any:
            from twisted.internet.defer import succeed

            return succeed(current["identity"] or services[1].identity)

        services = [make_service(1), make_service(2, refresh_identity=refresh)]
        self.start(*services)
        formed = yield wait_for(lambda: all(len(names(s)) == 2 for s in services), 10)
        self.assertTrue(formed, [names(s) for s in services])
        self.assertFalse(is_leader(services[0], "node2"))
        current["identity"] = promoted
        spread = yield wait_for(lambda: is_leader(services[0], "node2"), 10)
        self.assertTrue(spread)


class ServiceEdgeTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_invalid_cluster_address_runs_alone(self) -> Any:
        service = make_service(1, join="bad:host:name")
        service.startService()
        self.addCleanup(service.stopService)
        running = yield wait_for(lambda: service.node is not None and service.node.running, 5)
        self.assertTrue(running, "the service did not start")
        self.assertIsNone(service.joiner)
        self.assertEqual(names(service), {"node1"})
        self.assertIsNotNone(service.port, "alone, but still listening for agents that join it")
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_stop_right_after_start_leaves_nothing_listening(self) -> Any:
        service = make_service(1)
        service.startService()
        yield service.stopService()
        yield service._started  # a start still under way must not listen afterwards
        self.assertIsNone(service.port)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.21", PORT, timeout=5)
        connecting = connectProtocol(endpoint, Protocol())
        connected = yield connecting.addErrback(lambda failure: failure.trap(ConnectionRefusedError) and None)
        if connected is not None:
            connected.transport.abortConnection()
        self.assertIsNone(connected, f"something still listens on 127.0.0.21:{PORT}")
