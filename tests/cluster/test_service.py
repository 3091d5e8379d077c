"""The membership service over real TLS sockets on loopback addresses (127.0.0.x)."""
from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from portainer_agent.cluster.member import MemberState
from portainer_agent.cluster.service import ClusterService
from portainer_agent.docker.identity import NodeIdentity
from portainer_agent.tls.certs import generate_self_signed
from portainer_agent.tls.server import server_options

PORT = 39_502
KEY = b"test-cluster-key"


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        yield deferLater(reactor, 0.05, lambda: None)
    return condition()


def names(service: ClusterService) -> set[str]:
    return {m.node_name for m in service.view.alive_members()}


class ServiceTests(TestCase):
    timeout = 60

    def start(self, *services: ClusterService) -> None:
        for service in services:
            service.startService()
            self.addCleanup(lambda s=service: s.stopService() if s.running else None)

    @inlineCallbacks
    def test_three_agents_form_one_cluster_and_a_leave_is_seen_at_once(self) -> Any:
        services = [make_service(i) for i in (1, 2, 3)]
        self.start(*services)
        formed = yield wait_for(lambda: all(names(s) == {"node1", "node2", "node3"} for s in services), 10)
        self.assertTrue(formed, [names(s) for s in services])
        for service in services:
            self.assertEqual([m.node_name for m in service.view.managers()], ["node1"])
        started = time.monotonic()
        yield services[2].stopService()
        gone = yield wait_for(lambda: all(names(s) == {"node1", "node2"} for s in services[:2]), 5)
        self.assertTrue(gone)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIs(services[0].node.member(services[2].local.key).state, MemberState.LEFT)

    @inlineCallbacks
    def test_wrong_key_cannot_join_or_inject(self) -> Any:
        honest = [make_service(1), make_service(2)]
        impostors = [make_service(3, key=b"wrong"), make_service(4, key=None)]
        self.start(*honest, *impostors)
        formed = yield wait_for(lambda: all(names(s) == {"node1", "node2"} for s in honest), 10)
        self.assertTrue(formed)
        yield deferLater(reactor, 3.0, lambda: None)
        for service in honest:
            self.assertEqual(names(service), {"node1", "node2"})
        for impostor in impostors:
            self.assertEqual(names(impostor), {impostor.local.node_name})

    @inlineCallbacks
    def test_role_change_spreads(self) -> Any:
        promoted = NodeIdentity(name="node2", node_id="id2", role="manager", is_leader=True, node_addr="127.0.0.22")
        current = {"identity": None}

        def refresh() -> Any:
            from twisted.internet.defer import succeed

            return succeed(current["identity"] or services[1].identity)

        services = [make_service(1), make_service(2, refresh_identity=refresh)]
        self.start(*services)
        yield wait_for(lambda: all(len(names(s)) == 2 for s in services), 10)
        current["identity"] = promoted
        spread = yield wait_for(
            lambda: services[0].view.member_by_name("node2") is not None
            and services[0].view.member_by_name("node2").is_leader, 10)
        self.assertTrue(spread)


class ServiceEdgeTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_invalid_cluster_address_runs_alone(self) -> Any:
        service = make_service(1, join="bad:host:name")
        service.startService()
        self.addCleanup(service.stopService)
        yield wait_for(lambda: service.node is not None and service.node.running, 5)
        self.assertIsNone(service.joiner)
        self.assertEqual(names(service), {"node1"})

    @inlineCallbacks
    def test_stop_right_after_start_leaves_nothing_listening(self) -> Any:
        service = make_service(1)
        service.startService()
        yield service.stopService()
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertIsNone(service.port)
