"""The membership service over real TLS sockets on loopback addresses (127.0.0.x)."""
from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from portainer_agent.cluster.member import MemberState
from portainer_agent.cluster.service import ClusterService
from portainer_agent.docker.identity import NodeIdentity
from portainer_agent.testing.polling import wait_for_deferred
from portainer_agent.testing.ports import reserve_port
from portainer_agent.tls.certs import generate_self_signed
from portainer_agent.tls.server import server_options

KEY = b"test-cluster-key"
HOSTS = [f"127.0.0.{20 + index}" for index in range(1, 5)]


def make_service(index: int, port: int, key: bytes | None = KEY, join: str | None = "127.0.0.21",
                 api_port: Any = 9001, **kw: Any) -> ClusterService:
    host = f"127.0.0.{20 + index}"
    tls = generate_self_signed([host])
    identity = NodeIdentity(name=f"node{index}", node_id=f"id{index}", role="manager" if index == 1 else "worker",
                            is_leader=index == 1, node_addr=host)
    return ClusterService(
        reactor, identity=identity, api_port=api_port, cluster_port=port, fingerprint=tls.fingerprint,
        server_tls=server_options(tls), version="test", key=key, cluster_addr=join, advertise_addr=host,
        listen_host=host, **kw,
    )


def names(service: ClusterService) -> set[str]:
    return {m.node_name for m in service.view.alive_members()}


def is_leader(service: ClusterService, node: str) -> bool:
    member = service.view.member_by_name(node)
    return member is not None and member.is_leader


def stop_if_running(service: ClusterService) -> Any:
    return service.stopService() if service.running else None


class ClusterPortCase(TestCase):
    """A cluster port held for the whole test (``reserve_port``): the service listens beside
    the reservation, and once it stops, the port cannot be reused by anyone else before the
    test checks that nothing listens there."""

    def setUp(self) -> None:
        reserved = reserve_port(HOSTS)
        self.addCleanup(reserved.release)
        self.port = reserved.port

    def service(self, index: int, **kw: Any) -> ClusterService:
        return make_service(index, self.port, **kw)


class ServiceTests(TestCase):
    """Each service binds cluster port 0 and advertises the port it got; the others join
    node1 at its bound port."""

    timeout = 60

    def setUp(self) -> None:
        self.seed: ClusterService | None = None

    def service(self, index: int, **kw: Any) -> ClusterService:
        if index == 1:
            self.seed = make_service(1, 0, join=None, **kw)
            return self.seed
        assert self.seed is not None and self.seed.port is not None, "start node1 first"
        return make_service(index, 0, join=f"127.0.0.21:{self.seed.cluster_port}", **kw)

    def start(self, *services: ClusterService) -> None:
        for service in services:
            service.startService()
            self.addCleanup(stop_if_running, service)

    def started(self, *indexes: int, options: dict[int, dict[str, Any]] | None = None) -> list[ClusterService]:
        """Services ``indexes`` (node1 first, then those that join it at its bound port), started."""
        services = []
        for index in indexes:
            service = self.service(index, **(options or {}).get(index, {}))
            self.start(service)
            services.append(service)
        return services

    @inlineCallbacks
    def test_three_agents_form_one_cluster_and_a_leave_is_seen_at_once(self) -> Any:
        services = self.started(1, 2, 3)
        for service in services:  # each advertises the port it bound
            assert service.port is not None
            self.assertEqual(service.local.cluster_port, service.port.getHost().port)  # type: ignore[attr-defined]
        yield wait_for_deferred(lambda: all(names(s) == {"node1", "node2", "node3"} for s in services), 10,
                                "one cluster of three", describe=lambda: repr([names(s) for s in services]))
        for service in services:
            self.assertEqual([m.node_name for m in service.view.managers()], ["node1"])
        departed: list[tuple[str, MemberState]] = []
        services[0].view.watch_departures(lambda m: departed.append((m.node_name, m.state)))
        yield services[2].stopService()
        yield wait_for_deferred(lambda: all(names(s) == {"node1", "node2"} for s in services[:2]), 5,
                                "node3's leave to be seen", describe=lambda: repr([names(s) for s in services[:2]]))
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
        honest = self.started(1, 2)
        impostors = self.started(3, 4, options={3: dict(key=b"wrong"), 4: dict(key=None)})
        yield wait_for_deferred(lambda: all(names(s) == {"node1", "node2"} for s in honest), 10,
                                "the honest pair to form", describe=lambda: repr([names(s) for s in honest]))
        # Wait until every impostor has really tried: its join attempts reached the
        # cluster port and were refused, twice (the third attempt has started).
        yield wait_for_deferred(lambda: all(i.joiner is not None and i.joiner.attempts >= 3 for i in impostors), 15,
                                "three join attempts by each impostor",
                                describe=lambda: repr([i.joiner and i.joiner.attempts for i in impostors]))
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

        services = self.started(1, 2, options={2: dict(refresh_identity=refresh, refresh_interval=0.5)})
        yield wait_for_deferred(lambda: all(len(names(s)) == 2 for s in services), 10, "a cluster of two",
                                describe=lambda: repr([names(s) for s in services]))
        self.assertFalse(is_leader(services[0], "node2"))
        current["identity"] = promoted
        yield wait_for_deferred(lambda: is_leader(services[0], "node2"), 10, "node1 to see node2 lead")


class ServiceEdgeTests(ClusterPortCase):
    timeout = 30

    @inlineCallbacks
    def test_invalid_cluster_address_runs_alone(self) -> Any:
        service = self.service(1, join="bad:host:name")
        service.startService()
        self.addCleanup(service.stopService)
        yield wait_for_deferred(lambda: service.node is not None and service.node.running, 5, "the service to start")
        self.assertIsNone(service.joiner)
        self.assertEqual(names(service), {"node1"})
        self.assertIsNotNone(service.port, "alone, but still listening for agents that join it")
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_stop_right_after_start_leaves_nothing_listening(self) -> Any:
        service = self.service(1)
        service.startService()
        yield service.stopService()
        yield service._started  # a start still under way must not listen afterwards
        self.assertIsNone(service.port)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.21", self.port, timeout=5)
        connecting = connectProtocol(endpoint, Protocol())
        connected = yield connecting.addErrback(lambda failure: failure.trap(ConnectionRefusedError) and None)
        if connected is not None:
            connected.transport.abortConnection()
        self.assertIsNone(connected, f"something still listens on 127.0.0.21:{self.port}")

    @inlineCallbacks
    def test_port_0_advertises_the_bound_ports(self) -> Any:
        """``--port 0 --cluster-port 0``: the member others learn names the ports bound."""
        from twisted.internet.defer import Deferred

        api_bound: Deferred[int] = Deferred()
        recorded: dict[str, int] = {}

        class Ports:
            def record(self, name: str, port: int) -> None:
                recorded[name] = port

        service = make_service(1, 0, join=None, api_port=lambda: api_bound, ports=Ports())
        service.startService()
        self.addCleanup(stop_if_running, service)
        self.assertIsNone(service.node, "not advertised before the API port is known")
        api_bound.callback(40123)
        yield wait_for_deferred(lambda: service.node is not None and service.node.running, 5, "the service to start")
        assert service.port is not None
        bound = service.port.getHost().port  # type: ignore[attr-defined]
        self.assertNotEqual(bound, 0)
        self.assertEqual((service.local.api_port, service.local.cluster_port), (40123, bound))
        self.assertEqual(recorded, {"cluster": bound})

    @inlineCallbacks
    def test_port_0_with_a_join_address_without_a_port_runs_alone(self) -> Any:
        service = make_service(1, 0, join="127.0.0.22")
        service.startService()
        self.addCleanup(stop_if_running, service)
        yield wait_for_deferred(lambda: service.node is not None and service.node.running, 5, "the service to start")
        self.assertIsNone(service.joiner)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
