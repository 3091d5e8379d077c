"""The SWIM state machine alone: a task.Clock and a scripted transport, no network."""
from __future__ import annotations

import math
import random
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.cluster.dissemination import BroadcastQueue, Update, retransmit_limit
from portainer_agent.cluster.member import Member, MemberState, PeerAddress, supersedes
from portainer_agent.cluster.membership import MembershipView
from portainer_agent.cluster.simulation import SimNetwork
from portainer_agent.cluster.swim import SwimNode, SwimSettings

_factory = SimNetwork()


def member(index: int, **overrides: Any) -> Member:
    return _factory.make_member(index, **overrides)


class ScriptedTransport:
    """Records every outgoing message with a Deferred the test settles by hand."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any, Deferred]] = []

    def _record(self, kind: str, peer: PeerAddress, payload: Any) -> Deferred:
        d: Deferred = Deferred()
        self.sent.append((kind, peer.key, payload, d))
        return d

    def ping(self, peer: PeerAddress, updates: Any) -> Deferred:
        return self._record("ping", peer, list(updates))

    def ping_request(self, helper: PeerAddress, target: PeerAddress, updates: Any) -> Deferred:
        return self._record("ping_request", helper, target.key)

    def gossip(self, peer: PeerAddress, updates: Any) -> None:
        self._record("gossip", peer, list(updates))

    def exchange_state(self, peer: PeerAddress, members: Any, join: bool) -> Deferred:
        return self._record("state", peer, join)

    def leave(self, peer: PeerAddress, member: Member) -> Deferred:
        return self._record("leave", peer, member)

    def take(self, kind: str) -> list[tuple[str, str, Any, Deferred]]:
        taken = [s for s in self.sent if s[0] == kind]
        self.sent = [s for s in self.sent if s[0] != kind]
        return taken


def run(clock: Clock, seconds: float, step: float = 0.01) -> None:
    """Advance in small steps: one big ``advance`` looks like a reactor stall to the node."""
    for _ in range(round(seconds / step)):
        clock.advance(step)


def until_ping(clock: Clock, transport: "ScriptedTransport", limit: float = 5.0) -> tuple:
    """Step until the node sends its next direct probe (first probes have a random phase)."""
    for _ in range(round(limit / 0.01)):
        pings = transport.take("ping")
        if pings:
            assert len(pings) == 1, pings
            return pings[0]
        clock.advance(0.01)
    raise AssertionError("no probe was sent")


def make_node(peers: int, settings: SwimSettings = SwimSettings()) -> tuple[SwimNode, Clock, ScriptedTransport, list[Member]]:
    clock = Clock()
    transport = ScriptedTransport()
    node = SwimNode(member(0), clock, transport, settings, random.Random(0))
    others = [member(i) for i in range(1, peers + 1)]
    node.merge_state(others)
    node.broadcasts.clear()
    return node, clock, transport, others


class MergeRuleTests(SynchronousTestCase):
    def test_incarnation_and_state_order(self) -> None:
        alive = member(1, incarnation=3)
        self.assertTrue(supersedes(alive.with_state(MemberState.SUSPECT), alive))
        self.assertFalse(supersedes(alive, alive.with_state(MemberState.SUSPECT)))
        self.assertTrue(supersedes(alive.with_state(MemberState.ALIVE, 4), alive.with_state(MemberState.SUSPECT)))
        self.assertTrue(supersedes(alive.with_state(MemberState.DEAD), alive.with_state(MemberState.SUSPECT)))
        self.assertFalse(supersedes(alive.with_state(MemberState.DEAD), None))

    def test_new_generation_supersedes_its_tombstone(self) -> None:
        dead = member(1, incarnation=9, state=MemberState.DEAD, boot=1000)
        restarted = member(1, incarnation=0, boot=2000)
        self.assertTrue(supersedes(restarted, dead))
        self.assertFalse(supersedes(dead, restarted))


class ProbeTests(SynchronousTestCase):
    def test_acked_probe_keeps_member_alive(self) -> None:
        node, clock, transport, _ = make_node(3)
        node.start()
        _, key, _, d = until_ping(clock, transport)
        d.callback([])
        for _ in range(500):
            clock.advance(0.01)
            for _, _, _, d in transport.take("ping"):
                d.callback([])
        self.assertIs(node.member(key).state, MemberState.ALIVE)
        node.stop()

    def test_silent_member_is_probed_indirectly_then_suspected_then_dead(self) -> None:
        node, clock, transport, _ = make_node(5)
        node.start()
        _, target, _, _ = until_ping(clock, transport)
        run(clock, 0.5)  # probe timeout: ask k=3 others
        requests = transport.take("ping_request")
        self.assertEqual(len(requests), 3)
        self.assertNotIn(target, [r[1] for r in requests])
        for _, _, asked, d in requests:
            self.assertEqual(asked, target)
            d.callback(False)  # nacks: the helpers are fine, the target is not
        self.assertIs(node.member(target).state, MemberState.SUSPECT)
        self.assertTrue(any(u.member.key == target for u in node.broadcasts.pending()))
        # n=6, k=3 expected confirmations, none came: the maximum timeout applies.
        minimum = 2.0 * max(1.0, math.log10(6)) * 1.0
        run(clock, minimum * 3 - 0.01)
        self.assertIs(node.member(target).state, MemberState.SUSPECT)
        run(clock, 0.02)
        self.assertIs(node.member(target).state, MemberState.DEAD)
        node.stop()

    def test_confirmations_shorten_suspicion(self) -> None:
        node, clock, _, others = make_node(9)
        suspect = others[0].with_state(MemberState.SUSPECT)
        node.apply_updates([Update(suspect, others[1].key)])
        for origin in others[2:4]:
            node.apply_updates([Update(suspect, origin.key)])
        run(clock, 2.0 * 1.0 + 0.01)  # 3 confirmations: minimum timeout (n=10 -> log10=1)
        self.assertIs(node.member(suspect.key).state, MemberState.DEAD)

    def test_refutation_by_incarnation_cancels_suspicion(self) -> None:
        node, clock, _, others = make_node(3)
        target = others[0]
        node.apply_updates([Update(target.with_state(MemberState.SUSPECT), others[1].key)])
        run(clock, 1.0)
        node.apply_updates([Update(target.with_state(MemberState.ALIVE, target.incarnation + 1), target.key)])
        run(clock, 30)
        self.assertIs(node.member(target.key).state, MemberState.ALIVE)

    def test_rumour_about_self_is_refuted(self) -> None:
        node, _, _, others = make_node(3)
        rumour = node.local.with_state(MemberState.SUSPECT)
        node.apply_updates([Update(rumour, others[0].key)])
        self.assertIs(node.local.state, MemberState.ALIVE)
        self.assertEqual(node.local.incarnation, 1)
        self.assertIn(node.local, [u.member for u in node.broadcasts.pending()])
        self.assertEqual(node.health.score, 1)

    def test_tombstone_from_a_clock_ahead_starts_a_later_generation(self) -> None:
        node, _, _, others = make_node(2)
        ghost = attrs.evolve(node.local, boot=node.local.boot + 10_000, incarnation=4, state=MemberState.DEAD)
        node.apply_updates([Update(ghost, others[0].key)])
        self.assertIs(node.local.state, MemberState.ALIVE)
        self.assertEqual(node.local.boot, ghost.boot + 1)
        self.assertTrue(supersedes(node.local, ghost))

    def test_suspicion_timeout_grows_with_log_n(self) -> None:
        def timeout_for(n: int) -> float:
            node, clock, _, others = make_node(n - 1, SwimSettings(indirect_checks=0))
            node.apply_updates([Update(others[0].with_state(MemberState.SUSPECT), others[1].key)])
            start = clock.seconds()
            for _ in range(10_000):
                run(clock, 0.05)
                if node.member(others[0].key).state is MemberState.DEAD:
                    return clock.seconds() - start
            raise AssertionError("never died")

        small, large = timeout_for(10), timeout_for(1000)
        self.assertLess(abs(small - 2.0), 0.1)
        self.assertLess(abs(large - 6.0), 0.1)

    def test_refused_connection_skips_the_timeout(self) -> None:
        node, clock, transport, _ = make_node(1)
        node.start()
        _, target, _, d = until_ping(clock, transport)
        d.errback(ConnectionRefusedError(target))
        self.assertIs(node.member(target).state, MemberState.SUSPECT)
        node.stop()

    def test_connection_lost_triggers_an_immediate_probe(self) -> None:
        node, clock, transport, others = make_node(3)
        node.start()
        node.peer_connection_lost(others[1].key)
        [(_, key, _, _)] = transport.take("ping")
        self.assertEqual(key, others[1].key)
        node.peer_connection_lost(others[1].key)  # rate-limited
        self.assertEqual(transport.take("ping"), [])
        node.stop()

    def test_late_timeout_is_inconclusive(self) -> None:
        """A stalled reactor fires the probe timeout late; the ack read right after the
        stall must win, and the local health score must rise."""
        node, clock, transport, _ = make_node(3)
        node.start()
        _, target, _, d = until_ping(clock, transport)
        clock.advance(0.8)  # one late tick: timeout (due at +0.5) runs 0.3 s late
        self.assertEqual(transport.take("ping_request"), [])
        self.assertGreaterEqual(node.health.score, 1)
        d.callback([])  # the ack that queued during the stall
        for _ in range(1000):  # then a healthy cluster: every later probe is answered
            clock.advance(0.01)
            for _, _, _, pending in transport.take("ping"):
                pending.callback([])
        self.assertIs(node.member(target).state, MemberState.ALIVE)
        self.assertEqual(node.counters.get("suspected", 0), 0)
        node.stop()

    def test_local_health_scales_probe_timeout(self) -> None:
        node, clock, transport, _ = make_node(3)
        node.health.adjust(+2)
        node.start()
        until_ping(clock, transport, limit=4.0)  # interval x3
        run(clock, 1.45)
        self.assertEqual(transport.take("ping_request"), [])
        run(clock, 0.1)  # 0.5 x 3 = 1.5 s
        self.assertEqual(len(transport.take("ping_request")), 2)
        node.stop()


class DisseminationTests(SynchronousTestCase):
    def test_retransmit_bound(self) -> None:
        queue = BroadcastQueue()
        update = Update(member(1), "x")
        queue.enqueue(update)
        limit = retransmit_limit(4, 100)
        self.assertEqual(limit, 12)
        sent = sum(len(queue.select(10, limit)) for _ in range(100))
        self.assertEqual(sent, limit)

    def test_least_sent_first_and_bounded_size(self) -> None:
        queue = BroadcastQueue()
        for i in range(30):
            queue.enqueue(Update(member(i), "x"))
        first = queue.select(10, 5)
        second = queue.select(10, 5)
        self.assertEqual(len(first), 10)
        self.assertFalse({u.member.key for u in first} & {u.member.key for u in second})

    def test_local_update_bumps_incarnation_and_is_broadcast(self) -> None:
        node, _, _, _ = make_node(2)
        self.assertTrue(node.update_local(role="worker", is_leader=False))
        self.assertEqual(node.local.incarnation, 1)
        self.assertFalse(node.local.is_leader)
        self.assertFalse(node.update_local(role="worker", is_leader=False))
        self.assertEqual([u.member for u in node.broadcasts.pending()], [node.local])

    def test_leave_is_sent_to_every_live_peer(self) -> None:
        node, clock, transport, others = make_node(3)
        node.start()
        done = node.leave()
        leaves = transport.take("leave")
        self.assertEqual({key for _, key, _, _ in leaves}, {m.key for m in others})
        self.assertIs(leaves[0][2].state, MemberState.LEFT)
        run(clock, 1.0)
        self.successResultOf(done)


class ViewTests(SynchronousTestCase):
    def test_duplicate_node_names_route_to_newest(self) -> None:
        node, _, _, _ = make_node(2)
        old = member(7, node_name="node-1", boot=1000)
        new = member(8, node_name="node-1", boot=5000)
        node.merge_state([old, new])
        view = MembershipView(node)
        names = [m.node_name for m in view.alive_members()]
        self.assertEqual(names.count("node-1"), 1)
        self.assertEqual(view.member_by_name("node-1").key, new.key)
        [conflict] = view.conflicts()
        self.assertEqual(conflict.routed.key, new.key)
        self.assertEqual({m.key for m in conflict.shadowed}, {old.key, member(1).key})

    def test_dead_and_left_are_not_alive(self) -> None:
        node, _, _, others = make_node(3)
        node.apply_updates([Update(others[0].with_state(MemberState.LEFT, 1), others[0].key)])
        node.apply_updates([Update(others[1].with_state(MemberState.DEAD), "x")])
        view = MembershipView(node)
        self.assertEqual({m.key for m in view.alive_members()}, {node.local.key, others[2].key})
        self.assertEqual([m.node_name for m in view.managers()], ["node-0"])
        self.assertIs(view.local, node.local)


class DepartureTests(SynchronousTestCase):
    """What the view tells the request path when a member stops being live."""

    def test_is_alive_is_per_agent_generation(self) -> None:
        node, _, _, others = make_node(3)
        view = MembershipView(node)
        self.assertTrue(view.is_alive(others[0]))
        restarted = attrs.evolve(others[0], boot=others[0].boot + 1)
        self.assertFalse(view.is_alive(restarted), "another process behind the same address")
        node.apply_updates([Update(others[0].with_state(MemberState.DEAD), "x")])
        self.assertFalse(view.is_alive(others[0]))
        self.assertTrue(view.is_alive(others[1]))

    def test_watchers_hear_each_departure_and_one_failing_does_not_hide_the_others(self) -> None:
        node, _, _, others = make_node(3)
        view = MembershipView(node)
        heard: list[str] = []

        def broken(member: Member) -> None:
            raise RuntimeError("bug")

        view.watch_departures(broken)
        view.watch_departures(lambda m: heard.append(m.key))
        view.member_departed(others[1])
        self.assertEqual(heard, [others[1].key])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
