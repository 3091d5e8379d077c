"""The AMP transport over in-memory connections (twisted.test.iosim): paging past AMP's
64 KiB value limit, the mutual HMAC challenge, and refusal of impostors."""
from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.cluster.commands import (
    MEMBER_FIELDS,
    PAGE_BUDGET,
    AuthenticationFailed,
    Hello,
    NotAuthenticated,
    Ping,
    Prove,
    PushState,
    encode_member,
    paginate,
)
from portainer_agent.cluster.member import MemberState, PeerAddress
from portainer_agent.cluster.simulation import SimNetwork
from portainer_agent.cluster.swim import SwimNode, SwimSettings
from portainer_agent.cluster.transport import AmpPeerTransport, ClusterProtocol

KEY = b"k" * 32
_members = SimNetwork()


def member(index: int, **overrides: Any):
    return _members.make_member(index, **overrides)


class AmpNetwork:
    """SWIM nodes joined by iosim pumps instead of sockets."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.transports: dict[str, AmpPeerTransport] = {}
        self.pumps: list[Any] = []

    def add(self, index: int, key: bytes | None = KEY) -> SwimNode:
        transport = AmpPeerTransport(self.clock, self.connect, key)
        node = SwimNode(member(index), self.clock, transport, SwimSettings(), random.Random(index))
        transport.node = node
        self.transports[node.local.key] = transport
        return node

    def connect(self, peer: PeerAddress, client: ClusterProtocol) -> Deferred:
        target = self.transports.get(peer.key)
        if target is None:
            return fail(ConnectionRefusedError(peer.key))
        server = target.protocol(server=True)
        self.pumps.append(connect(server, makeFakeServer(server), client, makeFakeClient(client), greet=False))
        return succeed(client)

    def flush(self) -> None:
        for _ in range(1000):
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump() or moved
            if not moved:
                return
        raise AssertionError("the pumps never went quiet")


class TransportTests(SynchronousTestCase):
    def test_join_exchanges_state_both_ways(self) -> None:
        net = AmpNetwork()
        a, b = net.add(1), net.add(2)
        joined = a.join([b.local.peer])
        net.flush()
        self.assertEqual(self.successResultOf(joined), 1)
        self.assertEqual({m.key for m in a.live_members()}, {a.local.key, b.local.key})
        self.assertEqual({m.key for m in b.live_members()}, {a.local.key, b.local.key})

    def test_ping_carries_updates_both_ways(self) -> None:
        net = AmpNetwork()
        a, b = net.add(1), net.add(2)
        self.successResultOf(_flushed(net, a.join([b.local.peer])))
        b.update_local(role="manager", is_leader=True)
        acks = net.transports[a.local.key].ping(b.local.peer, [])
        net.flush()
        updates = self.successResultOf(acks)
        self.assertTrue(any(u.member.key == b.local.key and u.member.is_leader for u in updates))

    def test_full_state_of_1000_members_is_paged_under_the_amp_limit(self) -> None:
        records = [member(i) for i in range(1000)]
        one_value = amp.AmpList(MEMBER_FIELDS)
        with self.assertRaises(amp.TooLong):
            whole = one_value.toStringProto([encode_member(m) for m in records], None)
            amp.AmpBox({b"members": whole}).serialize()
        pages = paginate(records)
        self.assertGreater(len(pages), 1)
        for page in pages:
            self.assertLessEqual(len(one_value.toStringProto(page, None)), PAGE_BUDGET)
        self.assertEqual(sum(len(p) for p in pages), 1000)

        net = AmpNetwork()
        a, b = net.add(1001), net.add(1002)
        b.merge_state(records)
        a.merge_state(member(2000 + i) for i in range(1000))
        joined = a.join([b.local.peer])
        net.flush()
        self.assertEqual(self.successResultOf(joined), 1)
        self.assertEqual(len(a.live_members()), 2002)
        self.assertEqual(len(b.live_members()), 2002)

    def test_wrong_key_client_refuses_server_before_sending_state(self) -> None:
        net = AmpNetwork()
        honest = net.add(1)
        impostor = net.add(2, key=b"w" * 32)
        joined = impostor.join([honest.local.peer])
        net.flush()
        self.assertEqual(self.successResultOf(joined), 0)
        self.assertEqual([m.key for m in honest.live_members()], [honest.local.key])
        self.assertEqual([m.key for m in impostor.live_members()], [impostor.local.key])

    def test_keyless_impostor_cannot_join(self) -> None:
        net = AmpNetwork()
        honest = net.add(1)
        impostor = net.add(2, key=None)
        joined = impostor.join([honest.local.peer])
        net.flush()
        self.assertEqual(self.successResultOf(joined), 0)
        self.assertEqual([m.key for m in honest.live_members()], [honest.local.key])
        self.assertEqual([m.key for m in impostor.live_members()], [impostor.local.key])

    def test_unauthenticated_command_is_refused_and_connection_dropped(self) -> None:
        net = AmpNetwork()
        honest = net.add(1)
        server = net.transports[honest.local.key].protocol(server=True)
        client = amp.AMP()
        server_side = makeFakeServer(server)
        pump = connect(server, server_side, client, makeFakeClient(client), greet=False)
        forged = member(66, role="manager", is_leader=True)
        pushed = _outcome(client.callRemote(PushState, members=[encode_member(forged)], join=True))
        pump.flush()
        self.assertIsInstance(pushed[0].value, NotAuthenticated)
        net.clock.advance(0)
        pump.flush()
        self.assertTrue(server_side.disconnecting)
        self.assertIsNone(honest.member(forged.key))

    def test_hello_then_garbage_proof_is_refused(self) -> None:
        net = AmpNetwork()
        honest = net.add(1)
        server = net.transports[honest.local.key].protocol(server=True)
        client = amp.AMP()
        server_side = makeFakeServer(server)
        pump = connect(server, server_side, client, makeFakeClient(client), greet=False)
        hello = client.callRemote(Hello, nonce=b"n" * 32, origin="10.9.9.9:9002", protocol=1)
        pump.flush()
        self.successResultOf(hello)
        proved = _outcome(client.callRemote(Prove, proof=b"\0" * 32))
        pump.flush()
        self.assertIsInstance(proved[0].value, AuthenticationFailed)
        forged = member(67)
        pushed = _outcome(client.callRemote(PushState, members=[encode_member(forged)], join=True))
        net.clock.advance(0)
        pump.flush()
        self.assertTrue(server_side.disconnecting)
        self.assertTrue(not pushed or isinstance(pushed[0], Failure))
        self.assertIsNone(honest.member(forged.key))

    def test_own_address_is_ignored(self) -> None:
        net = AmpNetwork()
        a = net.add(1)
        # Same node reached through another address (e.g. DNS returned our other interface).
        net.transports["10.9.9.9:9002"] = net.transports[a.local.key]
        joined = a.join([PeerAddress("10.9.9.9", 9002)])
        net.flush()
        self.assertEqual(self.successResultOf(joined), 0)

    def test_leave_marks_member_left_at_once(self) -> None:
        net = AmpNetwork()
        a, b = net.add(1), net.add(2)
        self.successResultOf(_flushed(net, a.join([b.local.peer])))
        a.start()
        b.start()
        left = b.leave()
        net.flush()
        self.successResultOf(left)
        self.assertIs(a.member(b.local.key).state, MemberState.LEFT)
        a.stop()

    def test_client_connections_are_capped_without_false_hints(self) -> None:
        net = AmpNetwork()
        a = net.add(1)
        others = [net.add(i) for i in range(2, 6)]
        transport = net.transports[a.local.key]
        transport.max_connections = 2
        self.successResultOf(_flushed(net, a.join([o.local.peer for o in others])))
        for other in others:
            d = transport.ping(other.local.peer, [])
            net.flush()
            self.successResultOf(d)
        self.assertEqual(len(transport._open), 2)
        for node in [a, *others]:
            self.assertEqual(node.counters.get("hinted_probe", 0), 0)

    def test_ping_wire_format(self) -> None:
        client = amp.AMP()
        transport = StringTransport()
        client.makeConnection(transport)
        client.callRemote(Ping, updates=[])
        self.assertIn(b"_command\x00\x04Ping", transport.value())


def _outcome(d: Deferred) -> list:
    """Capture a callRemote outcome *before* pumping (AMP drops the connection on an
    errback nobody handles yet)."""
    box: list = []
    d.addBoth(box.append)
    return box


def _flushed(net: AmpNetwork, d: Deferred) -> Deferred:
    net.flush()
    return d
