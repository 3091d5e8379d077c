"""An in-memory network of SWIM nodes on one fake clock: the testing seam for membership.

Shipped with the package (like ``treq.testing``) so tests and ``bench/membership.py`` drive
hundreds of real :class:`~portainer_agent.cluster.swim.SwimNode` state machines without
sockets. The network models latency, message loss, partitions, killed processes (connection
refused plus a reset hint, like a SIGKILL) and silent hosts, and reactor stalls: a stalled
node runs none of its timers and reads none of its messages until the stall ends, and then
(like a real reactor) runs its overdue timers *before* it reads the queued I/O.
"""
from __future__ import annotations

import heapq
import random
from typing import Any, Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionRefusedError

from portainer_agent.cluster.dissemination import Update
from portainer_agent.cluster.member import Member, PeerAddress
from portainer_agent.cluster.swim import SwimNode, SwimSettings

# Overdue I/O after a stall is read this long after the overdue timers ran.
IO_AFTER_TIMERS = 1e-6


class _HeapCall:
    __slots__ = ("time", "seq", "function", "args", "kwargs", "cancelled", "called")

    def __init__(self, time: float, seq: int, function: Callable[..., object], args: tuple, kwargs: dict) -> None:
        self.time, self.seq, self.function, self.args, self.kwargs = time, seq, function, args, kwargs
        self.cancelled = False
        self.called = False

    def __lt__(self, other: "_HeapCall") -> bool:
        return (self.time, self.seq) < (other.time, other.seq)

    def active(self) -> bool:
        return not (self.cancelled or self.called)

    def cancel(self) -> None:
        self.cancelled = True

    def getTime(self) -> float:  # noqa: N802
        return self.time


class HeapClock:
    """A deterministic ``IReactorTime`` like ``task.Clock`` but with a heap: ``task.Clock``
    re-sorts its whole call list on every ``callLater``, which dominates a 500-node run."""

    def __init__(self) -> None:
        self._now = 0.0
        self._heap: list[_HeapCall] = []
        self._seq = 0

    def seconds(self) -> float:
        return self._now

    def callLater(self, delay: float, callable: Callable[..., object], *args: Any, **kw: Any) -> _HeapCall:  # noqa: N802
        self._seq += 1
        call = _HeapCall(self._now + max(0.0, delay), self._seq, callable, args, kw)
        heapq.heappush(self._heap, call)
        return call

    def getDelayedCalls(self) -> list[_HeapCall]:  # noqa: N802
        return [c for c in self._heap if c.active()]

    def advance(self, amount: float) -> None:
        target = self._now + amount
        while self._heap and self._heap[0].time <= target:
            call = heapq.heappop(self._heap)
            if call.cancelled:
                continue
            self._now = max(self._now, call.time)
            call.called = True
            call.function(*call.args, **call.kwargs)
        self._now = target


class _SimCall:
    """A delayed call on a node's clock that honours the node's stalls."""

    def __init__(self, node_clock: "NodeClock", when: float, function: Callable[[], object]) -> None:
        self._node_clock = node_clock
        self._function = function
        self._when = when
        self._cancelled = False
        self._called = False
        self._call = node_clock.clock.callLater(max(0.0, when - node_clock.seconds()), self._fire)

    def _fire(self) -> None:
        frozen_until = self._node_clock.frozen_until
        now = self._node_clock.seconds()
        if frozen_until > now:
            self._call = self._node_clock.clock.callLater(frozen_until - now, self._fire)
            return
        self._called = True
        self._function()

    def active(self) -> bool:
        return not (self._cancelled or self._called)

    def cancel(self) -> None:
        if self.active():
            self._cancelled = True
            self._call.cancel()

    def getTime(self) -> float:  # noqa: N802
        return self._when


class NodeClock:
    """``IReactorTime`` for one simulated node: the shared clock, frozen while stalled."""

    def __init__(self, clock: HeapClock) -> None:
        self.clock = clock
        self.frozen_until = 0.0

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay: float, callable: Callable[..., object], *args: Any, **kw: Any) -> _SimCall:  # noqa: N802
        return _SimCall(self, self.seconds() + delay, lambda: callable(*args, **kw))

    def getDelayedCalls(self) -> list:  # noqa: N802
        return []


@attrs.define
class SimNode:
    key: str
    swim: SwimNode
    clock: NodeClock
    running: bool = True
    refuses: bool = True
    sent: int = 0


class SimNetwork:
    """A cluster of SWIM nodes exchanging messages through a lossy in-memory network."""

    def __init__(
        self,
        settings: SwimSettings = SwimSettings(),
        seed: int = 0,
        loss: float = 0.0,
        latency: tuple[float, float] = (0.001, 0.005),
    ) -> None:
        self.clock = HeapClock()
        self.settings = settings
        self.rng = random.Random(seed)
        self.loss = loss
        self.latency = latency
        self.nodes: dict[str, SimNode] = {}
        self._blocked: set[frozenset[str]] = set()
        self._contacted: dict[str, set[str]] = {}
        self._counter = 0

    # ---------------------------------------------------------------- building

    def make_member(self, index: int, **overrides: Any) -> Member:
        fields: dict[str, Any] = dict(
            node_name=f"node-{index}",
            node_id=f"id{index:04d}",
            role="manager" if index < 3 else "worker",
            is_leader=index == 0,
            api_addr=f"10.0.{index // 250}.{index % 250 + 1}",
            api_port=9001,
            cluster_addr=f"10.0.{index // 250}.{index % 250 + 1}",
            cluster_port=9002,
            version="test",
            cert_fingerprint="ab" * 32,
            boot=int(self.clock.seconds() * 1000) + 1,
        )
        fields.update(overrides)
        return Member(**fields)

    def add(self, member: Member, start: bool = True) -> SwimNode:
        node_clock = NodeClock(self.clock)
        node = SimNode(member.key, None, node_clock)  # type: ignore[arg-type]
        node.swim = SwimNode(member, node_clock, SimTransport(self, node), self.settings,
                             random.Random(self.rng.random()))
        self.nodes[member.key] = node
        if start:
            node.swim.start()
        return node.swim

    def build(self, count: int, joined: bool = True) -> list[SwimNode]:
        """``count`` started nodes; ``joined`` seeds every table with every member (a
        converged cluster) instead of joining through the protocol."""
        swims = [self.add(self.make_member(i)) for i in range(count)]
        if joined:
            everyone = [s.local for s in swims]
            for swim in swims:
                swim.merge_state(everyone)
                swim.broadcasts.clear()
        return swims

    # ---------------------------------------------------------------- faults

    def kill(self, key: str, refuse: bool = True) -> None:
        """Stop a node abruptly. ``refuse``: its host answers connection refused and resets the
        connections peers had to it (SIGKILL); otherwise it is silent (host down, partition)."""
        node = self.nodes[key]
        node.running = False
        node.refuses = refuse
        node.swim.stop()
        if refuse:
            for other_key, contacted in self._contacted.items():
                if key in contacted or other_key in self._contacted.get(key, set()):
                    self._deliver_hint(other_key, key)

    def stall(self, key: str, duration: float) -> None:
        """Freeze a node's reactor for ``duration`` seconds starting now."""
        self.nodes[key].clock.frozen_until = self.clock.seconds() + duration

    def partition(self, group_a: Sequence[str], group_b: Sequence[str]) -> None:
        for a in group_a:
            for b in group_b:
                self._blocked.add(frozenset((a, b)))

    def heal(self) -> None:
        self._blocked.clear()

    # ---------------------------------------------------------------- observation

    def run(self, seconds: float, step: float = 0.01) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))

    def run_until(self, condition: Callable[[], bool], timeout: float, step: float = 0.01) -> float | None:
        """Advance until ``condition()`` holds; the elapsed simulated time, or None."""
        start = self.clock.seconds()
        while self.clock.seconds() - start <= timeout:
            if condition():
                return self.clock.seconds() - start
            self.clock.advance(step)
        return None

    def running_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.running]

    def sees_live(self, observer: SimNode, key: str) -> bool:
        member = observer.swim.member(key)
        return member is not None and member.is_live

    # ---------------------------------------------------------------- delivery

    def _delay(self) -> float:
        low, high = self.latency
        return self.rng.uniform(low, high)

    def _lost(self, lossy: bool) -> bool:
        return lossy and self.loss > 0 and self.rng.random() < self.loss

    def _deliver_hint(self, observer_key: str, lost_key: str) -> None:
        observer = self.nodes.get(observer_key)
        if observer is not None and observer.running:
            observer.clock.callLater(self._delay(), observer.swim.peer_connection_lost, lost_key)

    def request(
        self,
        source: SimNode,
        destination: str,
        handler: Callable[[SwimNode], Any],
        lossy: bool,
        expect_answer: bool = True,
    ) -> Deferred:
        """Deliver ``handler`` to ``destination`` and its result back; the Deferred may never
        fire (loss, partition, silent host) and errbacks with ConnectionRefusedError for a
        killed process."""
        answer: Deferred = Deferred(lambda _: None)
        source.sent += 1
        self._contacted.setdefault(source.key, set()).add(destination)

        def settle(value: Any, failed: bool = False) -> None:
            if answer.called or not source.running:
                return
            if failed:
                answer.errback(value)
            else:
                answer.callback(value)

        def arrive() -> None:
            target = self.nodes.get(destination)
            if target is None or frozenset((source.key, destination)) in self._blocked:
                return
            if not target.running:
                if target.refuses:
                    source.clock.callLater(self._delay(), settle, ConnectionRefusedError(destination), True)
                return
            target_clock = target.clock
            if target_clock.frozen_until > self.clock.seconds():
                self.clock.callLater(target_clock.frozen_until - self.clock.seconds() + IO_AFTER_TIMERS, arrive)
                return
            result = maybeDeferred(handler, target.swim)
            if not expect_answer:
                return

            def reply(value: Any) -> None:
                if not target.running or self._lost(lossy):
                    return
                if frozenset((source.key, destination)) in self._blocked:
                    return
                target.sent += 1
                self.clock.callLater(self._delay(), deliver_reply, value)

            result.addCallbacks(reply, lambda f: None)

        def deliver_reply(value: Any) -> None:
            frozen = source.clock.frozen_until
            if frozen > self.clock.seconds():
                self.clock.callLater(frozen - self.clock.seconds() + IO_AFTER_TIMERS, deliver_reply, value)
                return
            settle(value)

        if not self._lost(lossy):
            self.clock.callLater(self._delay(), arrive)
        return answer


class SimTransport:
    """:class:`~portainer_agent.cluster.swim.PeerTransport` over a :class:`SimNetwork`."""

    def __init__(self, network: SimNetwork, node: SimNode) -> None:
        self.network = network
        self.node = node

    def ping(self, peer: PeerAddress, updates: Sequence[Update]) -> Deferred:
        return self.network.request(self.node, peer.key, lambda s: s.handle_ping(updates), lossy=True)

    def ping_request(self, helper: PeerAddress, target: PeerAddress, updates: Sequence[Update]) -> Deferred:
        return self.network.request(
            self.node, helper.key, lambda s: s.handle_ping_request(target, updates), lossy=True
        )

    def gossip(self, peer: PeerAddress, updates: Sequence[Update]) -> None:
        sent = self.network.request(
            self.node, peer.key, lambda s: s.handle_gossip(updates), lossy=True, expect_answer=False
        )
        sent.addErrback(lambda _: None)

    def exchange_state(self, peer: PeerAddress, members: Sequence[Member], join: bool) -> Deferred:
        source = self.node.key
        return self.network.request(self.node, peer.key, lambda s: s.handle_state(members, source), lossy=False)

    def leave(self, peer: PeerAddress, member: Member) -> Deferred:
        return self.network.request(self.node, peer.key, lambda s: s.handle_leave(member), lossy=False)
