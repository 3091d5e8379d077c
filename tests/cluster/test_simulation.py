"""Whole clusters of real SWIM state machines on one fake clock (no sockets): join
convergence and failure detection at 100 and 500 members with message loss, Lifeguard under
a 300 ms reactor stall, partitions that heal."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.cluster.member import MemberState
from portainer_agent.cluster.simulation import SimNetwork
from portainer_agent.cluster.swim import SwimNode


def false_dead(net: SimNetwork, excluded: set[str] = frozenset()) -> int:
    """Members some running node believes dead although they run."""
    running = {n.key for n in net.running_nodes()}
    return sum(
        1
        for node in net.running_nodes()
        for m in node.swim.members()
        if not m.is_live and m.key in running and m.key not in excluded
    )


def join_and_kill(test: SynchronousTestCase, size: int, loss: float, seed: int) -> tuple[float, float]:
    net = SimNetwork(seed=seed, loss=loss)
    swims = net.build(size)
    net.run(3)
    newcomer = net.add(net.make_member(size))
    test.successResultOf(_run_deferred(net, newcomer.join([swims[0].local.peer])))
    key = newcomer.local.key
    joined = net.run_until(lambda: all(net.sees_live(n, key) for n in net.running_nodes()), 10)
    test.assertIsNotNone(joined, "the newcomer never became visible everywhere")
    victim = swims[size // 2].local.key
    net.kill(victim, refuse=False)  # silent: the worst case (no reset hint)
    detected = net.run_until(lambda: all(not net.sees_live(n, victim) for n in net.running_nodes()), 60)
    test.assertIsNotNone(detected, "the dead member was never removed everywhere")
    test.assertEqual(false_dead(net), 0)
    return joined, detected


def _run_deferred(net: SimNetwork, d):
    net.run(1)
    return d


class ScaleTests(SynchronousTestCase):
    def test_100_members_with_5_percent_loss(self) -> None:
        joined, detected = join_and_kill(self, 100, 0.05, seed=7)
        self.assertLessEqual(joined, 2.0)
        # probe (<~1 s) + suspicion (2 * log10(101) = 4 s, up to 3x without confirmations)
        self.assertLessEqual(detected, 14.0)

    def test_500_members_with_5_percent_loss(self) -> None:
        joined, detected = join_and_kill(self, 500, 0.05, seed=11)
        self.assertLessEqual(joined, 2.5)
        self.assertLessEqual(detected, 20.0)


class SmallClusterTests(SynchronousTestCase):
    def test_killed_agent_detected_within_3_seconds_at_3_nodes(self) -> None:
        for seed in range(10):
            net = SimNetwork(seed=seed)
            swims = net.build(3)
            net.run(3 + seed * 0.1)
            victim = swims[seed % 3].local.key
            net.kill(victim)  # SIGKILL: refused + reset connections
            detected = net.run_until(lambda: all(not net.sees_live(n, victim) for n in net.running_nodes()), 10)
            self.assertIsNotNone(detected)
            self.assertLessEqual(detected, 3.0, f"seed {seed}")

    def test_300ms_stall_causes_no_false_dead(self) -> None:
        for seed in range(5):
            net = SimNetwork(seed=seed, loss=0.0)
            swims = net.build(10)
            net.run(3)
            for round_ in range(20):
                net.stall(swims[0].local.key, 0.3)
                net.run(2.0 + 0.137 * round_)
            self.assertEqual(false_dead(net), 0, f"seed {seed}")
            self.assertEqual(sum(s.counters.get("declared_dead", 0) for s in swims), 0)

    def test_stalled_node_does_not_kill_others_at_3_nodes(self) -> None:
        net = SimNetwork(seed=3)
        swims = net.build(3)
        net.run(2)
        for round_ in range(30):
            net.stall(swims[round_ % 3].local.key, 0.3)
            net.run(1.0 + 0.071 * round_)
        self.assertEqual(false_dead(net), 0)

    def test_partition_heals(self) -> None:
        net = SimNetwork(seed=5)
        swims = net.build(5)
        net.run(2)
        lonely = swims[4].local.key
        others = [s.local.key for s in swims[:4]]
        net.partition([lonely], others)
        dead_everywhere = net.run_until(
            lambda: all(not net.sees_live(net.nodes[k], lonely) for k in others), 30
        )
        self.assertIsNotNone(dead_everywhere)
        net.heal()
        healed = net.run_until(
            lambda: all(
                len([m for m in n.swim.members() if m.state is MemberState.ALIVE]) == 5 for n in net.running_nodes()
            ),
            30,
        )
        self.assertIsNotNone(healed, "the partition never healed")

    def test_clusters_formed_apart_merge_after_one_exchange(self) -> None:
        net = SimNetwork(seed=4, loss=0.02)
        left = [net.add(net.make_member(i)) for i in range(20)]
        right = [net.add(net.make_member(i)) for i in range(20, 40)]
        for group in (left, right):
            for swim in group:
                swim.merge_state([s.local for s in group])
                swim.broadcasts.clear()
        net.run(2)
        self.assertEqual(left[0].cluster_size(), 20)
        left[5].join([right[7].local.peer])  # what a periodic re-resolution does
        merged = net.run_until(lambda: all(n.swim.cluster_size() == 40 for n in net.running_nodes()), 10)
        self.assertIsNotNone(merged)
        self.assertLessEqual(merged, 5.0)

    def test_restarted_agent_rejoins_over_its_tombstone(self) -> None:
        net = SimNetwork(seed=9)
        swims = net.build(3)
        net.run(2)
        victim = swims[2].local
        net.kill(victim.key)
        net.run(5)
        self.assertFalse(net.sees_live(net.nodes[swims[0].local.key], victim.key))
        reborn: SwimNode = net.add(net.make_member(2))  # same address, new generation
        reborn.join([swims[0].local.peer])
        back = net.run_until(lambda: all(net.sees_live(n, victim.key) for n in net.running_nodes()), 3)
        self.assertIsNotNone(back)

    def test_traffic_per_node_is_constant_in_cluster_size(self) -> None:
        rates = []
        for size in (10, 100):
            net = SimNetwork(seed=1)
            net.build(size)
            net.run(2)
            before = sum(n.sent for n in net.nodes.values())
            net.run(10)
            rates.append((sum(n.sent for n in net.nodes.values()) - before) / size / 10)
        self.assertLess(abs(rates[0] - rates[1]), 0.5, rates)
        self.assertLess(rates[1], 3.0, rates)
