"""Joining: address parsing, DNS results contacted in full, backoff, periodic re-resolution."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.cluster.joining import (
    ClusterAddress,
    InvalidClusterAddress,
    Joiner,
    parse_cluster_address,
)
from portainer_agent.cluster.member import PeerAddress
from portainer_agent.cluster.simulation import SimNetwork


class ParseTests(SynchronousTestCase):
    def test_forms(self) -> None:
        cases = {
            "tasks.agent": ClusterAddress("tasks.agent", 9002),
            "tasks.agent:9100": ClusterAddress("tasks.agent", 9100),
            "10.0.0.1": ClusterAddress("10.0.0.1", 9002),
            "10.0.0.1:9100": ClusterAddress("10.0.0.1", 9100),
            "[fd00::1]:9100": ClusterAddress("fd00::1", 9100),
            "fd00::1": ClusterAddress("fd00::1", 9002),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_cluster_address(text, 9002), expected, text)

    def test_invalid(self) -> None:
        for text in ("", "a:b:c", "host:0", "host:99999", "[fd00::1", "[fd00::1]x", ":9002"):
            with self.assertRaises(InvalidClusterAddress, msg=text):
                parse_cluster_address(text, 9002)


class FakeNode:
    """Just what the joiner uses: who we are, who is live, and join()."""

    def __init__(self, answering: set[str]) -> None:
        self.local = SimNetwork().make_member(0)
        self.answering = answering
        self.contacted: list[list[str]] = []
        self.members: set[str] = set()

    def cluster_size(self) -> int:
        return 1 + len(self.members)

    def live_members(self) -> list[PeerAddress]:
        # Anything with a ``key`` will do: the joiner only compares keys.
        return [PeerAddress(key.rsplit(":", 1)[0], 9002) for key in self.members]

    def join(self, peers: list[PeerAddress]) -> Any:
        self.contacted.append([p.host for p in peers])
        ok = [p for p in peers if p.host in self.answering]
        self.members |= {p.key for p in ok}
        return succeed(len(ok))


class JoinerTests(SynchronousTestCase):
    def make(self, answering: set[str], records: list[list[str] | Exception],
             jitter: Any = lambda: 0.0) -> tuple[Joiner, FakeNode, Clock]:
        clock = Clock()
        node = FakeNode(answering)
        answers = list(records)

        def resolve(host: str) -> Any:
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            return fail(answer) if isinstance(answer, Exception) else succeed(answer)

        joiner = Joiner(node, ClusterAddress("tasks.agent", 9002), resolve, clock,  # type: ignore[arg-type]
                        jitter=jitter)
        return joiner, node, clock

    def test_contacts_every_address_but_its_own(self) -> None:
        joiner, node, clock = self.make({"10.0.0.2"}, [["10.0.0.1", "10.0.0.2", "10.0.0.3"]])
        joiner.start()
        clock.advance(0)
        self.assertEqual(node.contacted, [["10.0.0.2", "10.0.0.3"]])  # 10.0.0.1 is us
        self.assertTrue(joiner.joined)

    def test_retries_with_backoff_until_someone_answers(self) -> None:
        error = OSError("no such host")
        joiner, node, clock = self.make({"10.0.0.5"}, [error, [], ["10.0.0.4"], ["10.0.0.4", "10.0.0.5"]])
        joiner.start()
        clock.advance(0)
        times = [0.0]
        for _ in range(10):
            if joiner.joined:
                break
            delay = joiner._timer.getTime() - clock.seconds()
            times.append(times[-1] + delay)
            clock.advance(delay)
        self.assertTrue(joiner.joined)
        self.assertEqual(times, [0.0, 1.0, 3.0, 7.0])
        self.assertEqual(node.contacted, [["10.0.0.4"], ["10.0.0.4", "10.0.0.5"]])

    def retry_times(self, joiner: Joiner, clock: Clock, count: int) -> list[float]:
        joiner.start()
        clock.advance(0)
        times = []
        for _ in range(count):
            delay = joiner._timer.getTime() - clock.seconds()
            times.append(delay)
            clock.advance(delay)
        return times

    def test_retries_are_jittered_and_capped(self) -> None:
        draws = iter([0.25, 0.5, 0.75, 0.1, 0.9, 0.3, 0.0])
        joiner, _, clock = self.make(set(), [[]], jitter=lambda: next(draws))
        times = [round(delay, 6) for delay in self.retry_times(joiner, clock, 6)]
        self.assertEqual(times, [1.25, 2.5, 4.75, 8.1, 15.9, 15.3])
        joiner.stop()

    def test_agents_restarted_together_do_not_retry_in_lockstep(self) -> None:
        # The default jitter: ten agents started at once spread their retries.
        firsts = set()
        for _ in range(10):
            joiner, _, clock = self.make(set(), [[]], jitter=None)
            firsts.add(self.retry_times(joiner, clock, 1)[0])
            joiner.stop()
        self.assertGreater(len(firsts), 1)
        self.assertTrue(all(1.0 <= delay < 2.0 for delay in firsts), firsts)

    def test_reresolves_and_merges_a_cluster_formed_apart(self) -> None:
        joiner, node, clock = self.make({"10.0.0.2", "10.0.0.3"}, [["10.0.0.2"], ["10.0.0.2", "10.0.0.3"]])
        joiner.start()
        clock.advance(0)
        self.assertEqual(node.contacted, [["10.0.0.2"]])
        for _ in range(6):
            clock.advance(5)
        self.assertEqual(node.contacted, [["10.0.0.2"], ["10.0.0.3"]])  # only the new one

    def test_alone_again_retries_quickly(self) -> None:
        joiner, node, clock = self.make({"10.0.0.2"}, [["10.0.0.2"]])
        joiner.start()
        clock.advance(0)
        node.members.clear()
        node.answering = set()
        clock.advance(5)
        self.assertEqual(len(node.contacted), 2)
        self.assertFalse(joiner.joined)
        joiner.stop()
