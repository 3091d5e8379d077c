"""The SWIM state machine: probing, indirect probing, suspicion, dissemination, anti-entropy.

Pure protocol logic. Time comes from an injected ``IReactorTime`` (``task.Clock`` in tests),
randomness from an injected ``random.Random`` and all I/O goes through an injected
:class:`PeerTransport` (the AMP transport in production, an in-memory network in the
simulation). Nothing here imports the reactor or opens a socket, so a 500-member cluster runs in
one process on one fake clock.

Design choices (versus hashicorp/memberlist, which the Go agent uses through serf):

* Probes go over persistent AMP/TLS connections; a connection that drops is a *hint* that
  triggers an immediate probe of that member (a SIGKILLed agent resets its connections, so it
  is suspected within milliseconds instead of after its next scheduled probe), never proof.
* Suspicion timeout ``suspicion_mult * max(1, log10 N) * interval`` with Lifeguard
  confirmations: it starts at ``suspicion_max_mult`` times that and shrinks as independent
  members confirm. The default multiplier (2) is half memberlist's (4): with the connection
  hint and the local health multiplier guarding against false positives, a killed agent is
  dead in ~2 s at 3 nodes.
* Every timer checks how late it fired. A late timeout is *inconclusive*: the node raises its
  awareness score (Lifeguard) and re-checks after a short grace so the acks that queued during
  the stall are read first. This is what keeps a 300 ms reactor stall from killing anyone.
* A member is keyed by its cluster address; records carry a process generation (``boot``) so a
  restarted agent supersedes its own tombstone at once.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterable, Protocol, Sequence

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from portainer_agent.cluster.dissemination import BroadcastQueue, Update, retransmit_limit
from portainer_agent.cluster.health import LocalHealth
from portainer_agent.cluster.member import Member, MemberState, PeerAddress, supersedes
from portainer_agent.timers import cancel_timer

log = Logger(namespace="portainer_agent.cluster")


class DelayedCall(Protocol):
    """The part of ``DelayedCall`` the protocol uses (structural, so mypy needs no zope plugin)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def getTime(self) -> float: ...  # noqa: N802


class Clock(Protocol):
    """The part of ``IReactorTime`` the protocol uses: the reactor, ``task.Clock`` or the
    simulation's per-node clock."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., object], *args: Any, **kw: Any) -> Any: ...  # noqa: N802


@attrs.frozen
class SwimSettings:
    """Protocol tunables. Durations in seconds; defaults match the agent's options."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: float = 2.0
    suspicion_max_mult: float = 3.0
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    max_piggyback: int = 10
    state_sync_interval: float = 30.0
    reconnect_interval: float = 10.0
    reconnect_timeout: float = 60.0
    tombstone_timeout: float = 60.0
    late_tolerance: float = 0.1
    late_grace: float = 0.05
    awareness_max: int = 8
    max_members: int = 10_000

    def state_sync_period(self, cluster_size: int) -> float:
        """Anti-entropy period: every 5 s in small clusters, growing with log2(N) up to
        ``state_sync_interval`` so that large clusters do not spend their bandwidth on it."""
        return min(self.state_sync_interval, 5.0 * max(1.0, math.log2(max(1, cluster_size))))


class PeerTransport(Protocol):
    """What the state machine needs from the network. Every Deferred may never fire (lost
    message): the state machine applies its own timeouts and cancels what it abandons."""

    def ping(self, peer: PeerAddress, updates: Sequence[Update]) -> "Deferred[list[Update]]":
        """Direct probe; fires with the piggy-backed updates of the ack."""

    def ping_request(
        self, helper: PeerAddress, target: PeerAddress, updates: Sequence[Update]
    ) -> "Deferred[bool]":
        """Ask ``helper`` to probe ``target``; True is an ack, False a nack (helper alive,
        target silent)."""

    def gossip(self, peer: PeerAddress, updates: Sequence[Update]) -> None:
        """Fire-and-forget push of updates."""

    def exchange_state(
        self, peer: PeerAddress, members: Sequence[Member], join: bool
    ) -> "Deferred[list[Member]]":
        """Push our full state, pull theirs (paged by the transport)."""

    def leave(self, peer: PeerAddress, member: Member) -> "Deferred[None]":
        """Tell a peer we are leaving for good."""


Listener = Callable[[Member | None, Member], None]


@attrs.define
class _Suspicion:
    precedence: tuple[int, int, int]
    started: float
    confirmations: set[str]
    expected_confirmations: int
    min_timeout: float
    max_timeout: float
    timer: DelayedCall | None = None

    def timeout(self) -> float:
        """Lifeguard: max timeout with no confirmation, shrinking logarithmically to the
        minimum once ``expected_confirmations`` independent members agree."""
        k = self.expected_confirmations
        if k < 1:
            return self.min_timeout
        fraction = math.log(len(self.confirmations) + 1) / math.log(k + 1)
        return max(self.min_timeout, self.max_timeout - (self.max_timeout - self.min_timeout) * fraction)


@attrs.define
class _Probe:
    target: Member
    started: float
    acked: bool = False
    finished: bool = False
    indirect_started: bool = False
    helpers: int = 0
    answers: int = 0
    nacks: int = 0
    pending: list[Deferred] = attrs.field(factory=list)
    timers: list[DelayedCall] = attrs.field(factory=list)


class SwimNode:
    """One member's view of the cluster and the loops that keep it true."""

    def __init__(
        self,
        local: Member,
        clock: Clock,
        transport: PeerTransport,
        settings: SwimSettings = SwimSettings(),
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.transport = transport
        self.settings = settings
        self.rng = rng or random.Random()
        self.health = LocalHealth(maximum=settings.awareness_max)
        self.broadcasts = BroadcastQueue()
        self._members: dict[str, Member] = {local.key: local.with_state(MemberState.ALIVE)}
        self._since: dict[str, float] = {local.key: clock.seconds()}
        self._local_key = local.key
        self._live = _IndexedSet()
        self._suspicions: dict[str, _Suspicion] = {}
        self._probes: dict[str, _Probe] = {}
        self._round: list[str] = []
        self._timers: set[DelayedCall] = set()
        self._listeners: list[Listener] = []
        self._last_hint: dict[str, float] = {}
        self._last_late = -math.inf
        self.running = False
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------------ queries

    @property
    def local(self) -> Member:
        return self._members[self._local_key]

    def members(self) -> list[Member]:
        """Every record held, tombstones included."""
        return list(self._members.values())

    def member(self, key: str) -> Member | None:
        return self._members.get(key)

    def live_members(self) -> list[Member]:
        return [m for m in self._members.values() if m.is_live]

    def live_peers(self) -> list[Member]:
        return [self._members[key] for key in self._live.items]

    def cluster_size(self) -> int:
        """Live members, self included (O(1): used on every message)."""
        return len(self._live) + 1

    def _sample_live_peers(self, count: int, exclude: str = "") -> list[Member]:
        """Up to ``count`` random live peers other than ``exclude``, in O(count)."""
        keys = self._live.items
        picked = self.rng.sample(keys, min(len(keys), count + (1 if exclude else 0)))
        return [self._members[k] for k in picked if k != exclude][:count]

    def add_listener(self, listener: Listener) -> None:
        """``listener(old, new)`` after every accepted change (used by the view and logs)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the periodic loops. Joining is separate (see :meth:`join`)."""
        if self.running:
            return
        self.running = True
        # Random phases: agents started together (a service update) must not probe and gossip
        # in lockstep.
        self._schedule(self.rng.uniform(0.5, 1.0) * self._probe_period(), self._probe_tick)
        self._schedule(self.rng.uniform(0.0, 1.0) * self.settings.gossip_interval, self._gossip_tick)
        self._schedule(self.settings.state_sync_period(self.cluster_size()), self._state_sync_tick)
        self._schedule(self.settings.reconnect_interval, self._reconnect_tick)
        self._schedule(self.settings.tombstone_timeout / 4, self._reap_tick)

    def stop(self) -> None:
        """Cancel every timer and abandon every outstanding request."""
        self.running = False
        for timer in list(self._timers):
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for probe in list(self._probes.values()):
            self._finish_probe(probe)
        for suspicion in self._suspicions.values():
            if suspicion.timer is not None:
                suspicion.timer.cancel()
        self._suspicions.clear()

    def leave(self, timeout: float = 1.0) -> "Deferred[None]":
        """Announce a graceful leave to every live peer (waiting at most ``timeout``), then stop.

        Peers drop a left member at once instead of waiting for it to be suspected and die."""
        left = self.local.with_state(MemberState.LEFT, self.local.incarnation + 1)
        self._store(left)
        peers = self.live_peers()
        self.stop()
        if not peers:
            return succeed(None)
        sends = [self._detach(self.transport.leave(p.peer, left)) for p in peers]
        done: Deferred[None] = Deferred()

        def expire() -> None:
            if not done.called:
                done.callback(None)

        timer = self.clock.callLater(timeout, expire)

        def finished(_: object) -> None:
            cancel_timer(timer)
            if not done.called:
                done.callback(None)

        DeferredList(sends, consumeErrors=True).addBoth(finished)
        return done

    # ------------------------------------------------------------------ local identity

    def update_local(self, **changes: object) -> bool:
        """Change our own record (role, leader flag, addresses); bump the incarnation so the
        change supersedes everywhere, and broadcast it. Returns whether anything changed."""
        current = self.local
        candidate = attrs.evolve(current, **changes)  # type: ignore[arg-type]
        if candidate == current:
            return False
        updated = attrs.evolve(candidate, incarnation=current.incarnation + 1, state=MemberState.ALIVE)
        self._store(updated)
        self.broadcasts.enqueue(Update(updated, self._local_key))
        log.info(
            "local member updated: {changes}, incarnation {incarnation}",
            changes=sorted(changes), incarnation=updated.incarnation,
        )
        return True

    # ------------------------------------------------------------------ joining and state sync

    def join(self, peers: Iterable[PeerAddress]) -> "Deferred[int]":
        """Exchange full state with every given peer; fires with how many answered."""
        targets = [p for p in peers if p.key != self._local_key]
        if not targets:
            return succeed(0)

        def one(peer: PeerAddress) -> Deferred:
            d = self._detach(self.transport.exchange_state(peer, self.full_state(), True))
            d.addCallback(self.merge_state, source=peer.key)
            d.addCallback(lambda _: 1)
            d.addErrback(lambda f: _log_exchange_failure(peer, f))
            return d

        return DeferredList([one(p) for p in targets], consumeErrors=True).addCallback(
            lambda results: sum(1 for ok, value in results if ok and value == 1)
        )

    def full_state(self) -> list[Member]:
        """Everything we know, tombstones included, for a push/pull exchange."""
        return list(self._members.values())

    def merge_state(self, members: Iterable[Member], source: str = "") -> int:
        """Merge a peer's full state. A death we did not witness is downgraded to a suspicion
        so the member gets a chance to refute (the state may be old). Returns changes made."""
        changed = 0
        for member in members:
            if member.state is MemberState.DEAD and member.key != self._local_key:
                old = self._members.get(member.key)
                if old is not None and old.is_live:
                    member = member.with_state(MemberState.SUSPECT)
            if self._apply(Update(member, source or member.key)):
                changed += 1
        return changed

    # ------------------------------------------------------------------ incoming messages

    def handle_ping(self, updates: Sequence[Update]) -> list[Update]:
        """A peer probed us: merge what it carried, answer with our own piggy-back."""
        self._count("ping_received")
        self.apply_updates(updates)
        return self._piggyback()

    def handle_ping_request(self, target: PeerAddress, updates: Sequence[Update]) -> "Deferred[bool]":
        """Probe ``target`` on behalf of a peer; True on ack, False (a nack) on timeout."""
        self._count("ping_request_received")
        self.apply_updates(updates)
        result: Deferred[bool] = Deferred()
        attempt = self._detach(self.transport.ping(target, self._piggyback()))
        timeout = self.settings.probe_timeout * self.health.multiplier

        def settle(value: bool) -> None:
            if not result.called:
                timer.cancel()
                result.callback(value)

        def acked(acks: list[Update]) -> None:
            self.apply_updates(acks)
            settle(True)

        def expire() -> None:
            settle(False)
            attempt.cancel()

        timer = self._schedule(timeout, expire, grace=True)
        attempt.addCallbacks(acked, lambda _: settle(False))
        return result

    def handle_gossip(self, updates: Sequence[Update]) -> None:
        self._count("gossip_received")
        self.apply_updates(updates)

    def handle_state(self, members: Sequence[Member], source: str = "") -> list[Member]:
        self._count("state_received")
        self.merge_state(members, source)
        return self.full_state()

    def handle_leave(self, member: Member) -> None:
        if member.state is MemberState.LEFT:
            self._apply(Update(member, member.key))

    def apply_updates(self, updates: Iterable[Update]) -> None:
        for update in updates:
            self._apply(update)

    def peer_connection_lost(self, key: str) -> None:
        """A connection to or from ``key`` dropped: probe it now rather than at its turn.

        A hint, never proof; rate-limited to once per probe interval per member."""
        member = self._members.get(key)
        if not self.running or member is None or not member.is_live or key == self._local_key:
            return
        now = self.clock.seconds()
        if now - self._last_hint.get(key, -math.inf) < self.settings.probe_interval:
            return
        self._last_hint[key] = now
        if key not in self._probes:
            self._count("hinted_probe")
            self._probe(member)

    # ------------------------------------------------------------------ the merge rule

    def _apply(self, update: Update) -> bool:
        member = update.member
        if member.key == self._local_key:
            return self._about_me(member)
        old = self._members.get(member.key)
        if not supersedes(member, old):
            if (
                old is not None
                and member.state is MemberState.SUSPECT
                and old.state is MemberState.SUSPECT
                and member.precedence == old.precedence
            ):
                self._confirm(member.key, update.origin)
            return False
        if old is None and len(self._members) >= self.settings.max_members:
            self._count("dropped_table_full")
            return False
        self._store(member)
        if member.state is MemberState.SUSPECT:
            self._start_suspicion(member, update.origin)
        else:
            self._cancel_suspicion(member.key)
        self.broadcasts.enqueue(update)
        return True

    def _about_me(self, member: Member) -> bool:
        local = self.local
        if local.state is MemberState.LEFT:
            return False
        if member.boot > local.boot:
            if member.is_live:
                log.warn(
                    "another live agent claims our cluster address {address} with a newer generation",
                    address=member.key,
                )
                return False
            # A tombstone from a predecessor whose clock ran ahead of ours (a task rescheduled on
            # another host with the same overlay address): start a generation after it.
            reborn = attrs.evolve(local, boot=member.boot + 1, incarnation=0, state=MemberState.ALIVE)
            self._store(reborn)
            self.broadcasts.enqueue(Update(reborn, self._local_key))
            return True
        if member.boot < local.boot or (member.incarnation < local.incarnation):
            return False
        if member.state is MemberState.ALIVE and member.incarnation == local.incarnation:
            return False
        # Suspected, declared dead, or an incarnation we never issued: refute by out-counting.
        refuted = attrs.evolve(local, incarnation=member.incarnation + 1, state=MemberState.ALIVE)
        self._store(refuted)
        self.broadcasts.enqueue(Update(refuted, self._local_key))
        if member.state is not MemberState.ALIVE:
            self.health.refuted()
            self._count("refutations")
            log.info(
                "refuted {state} rumour about ourselves, incarnation now {incarnation}",
                state=member.state.value, incarnation=refuted.incarnation,
            )
        return True

    def _store(self, member: Member) -> None:
        old = self._members.get(member.key)
        self._members[member.key] = member
        if member.key != self._local_key:
            if member.is_live:
                self._live.add(member.key)
            else:
                self._live.discard(member.key)
        if old is None or old.state is not member.state:
            self._since[member.key] = self.clock.seconds()
            if old is not None or member.key != self._local_key:
                log.debug(
                    "member {address} ({node}) is {state}",
                    address=member.key, node=member.node_name, state=member.state.value,
                )
        for listener in self._listeners:
            listener(old, member)

    # ------------------------------------------------------------------ suspicion

    def _start_suspicion(self, member: Member, origin: str) -> None:
        existing = self._suspicions.get(member.key)
        if existing is not None and existing.precedence == member.precedence:
            self._confirm(member.key, origin)
            return
        self._cancel_suspicion(member.key)
        n = self.cluster_size()
        k = self.settings.indirect_checks if n - 2 >= self.settings.indirect_checks else 0
        minimum = (
            self.settings.suspicion_mult
            * max(1.0, math.log10(n))
            * self.settings.probe_interval
            * self.health.multiplier
        )
        suspicion = _Suspicion(
            precedence=member.precedence,
            started=self.clock.seconds(),
            confirmations=set(),
            expected_confirmations=k,
            min_timeout=minimum,
            max_timeout=minimum * self.settings.suspicion_max_mult,
        )
        if origin != self._local_key:
            suspicion.confirmations.add(origin)
        self._suspicions[member.key] = suspicion
        self._arm_suspicion(member.key, suspicion)

    def _confirm(self, key: str, origin: str) -> None:
        suspicion = self._suspicions.get(key)
        if suspicion is None or origin == self._local_key or origin in suspicion.confirmations:
            return
        suspicion.confirmations.add(origin)
        self._arm_suspicion(key, suspicion)

    def _arm_suspicion(self, key: str, suspicion: _Suspicion) -> None:
        if suspicion.timer is not None and suspicion.timer.active():
            suspicion.timer.cancel()
        remaining = max(0.0, suspicion.started + suspicion.timeout() - self.clock.seconds())
        suspicion.timer = self._schedule(remaining, lambda: self._suspicion_expired(key), grace=True)

    def _cancel_suspicion(self, key: str) -> None:
        suspicion = self._suspicions.pop(key, None)
        if suspicion is not None and suspicion.timer is not None and suspicion.timer.active():
            suspicion.timer.cancel()

    def _suspicion_expired(self, key: str) -> None:
        suspicion = self._suspicions.pop(key, None)
        member = self._members.get(key)
        if suspicion is None or member is None or member.state is not MemberState.SUSPECT:
            return
        if member.precedence != suspicion.precedence:
            return
        dead = member.with_state(MemberState.DEAD)
        self._store(dead)
        self.broadcasts.enqueue(Update(dead, self._local_key))
        self._count("declared_dead")
        log.debug(
            "member {address} ({node}) declared dead after {seconds:.2f}s of suspicion",
            address=key, node=member.node_name, seconds=self.clock.seconds() - suspicion.started,
        )

    def _suspect(self, member: Member) -> None:
        current = self._members.get(member.key)
        if current is None or current.state is not MemberState.ALIVE or current.precedence != member.precedence:
            return
        suspect = current.with_state(MemberState.SUSPECT)
        self._count("suspected")
        log.debug("member {address} ({node}) suspected by us", address=member.key, node=member.node_name)
        self._apply(Update(suspect, self._local_key))

    # ------------------------------------------------------------------ probing

    def _probe_period(self) -> float:
        return self.settings.probe_interval * self.health.multiplier

    def _probe_tick(self) -> None:
        if not self.running:
            return
        self._schedule(self._probe_period(), self._probe_tick)
        target = self._next_probe_target()
        if target is not None:
            self._probe(target)

    def _next_probe_target(self) -> Member | None:
        """Randomised round-robin: every live peer once per round, in a fresh random order."""
        for _ in range(2):
            while self._round:
                key = self._round.pop()
                member = self._members.get(key)
                if member is not None and member.is_live and key != self._local_key and key not in self._probes:
                    return member
            self._round = list(self._live.items)
            self.rng.shuffle(self._round)
        return None

    def _probe(self, target: Member) -> None:
        probe = _Probe(target=target, started=self.clock.seconds())
        self._probes[target.key] = probe
        self._count("ping_sent")
        direct = self._detach(self.transport.ping(target.peer, self._piggyback()))
        probe.pending.append(direct)

        def acked(updates: list[Update]) -> None:
            self.apply_updates(updates)
            self._probe_acked(probe)

        def failed(reason: Failure) -> None:
            # Refused or reset: no point waiting for the timeout.
            if not probe.finished:
                self._start_indirect(probe)

        direct.addCallbacks(acked, failed)
        if probe.finished:
            return
        timeout = self.settings.probe_timeout * self.health.multiplier
        probe.timers.append(self._schedule(timeout, lambda: self._start_indirect(probe), grace=True))
        # The probe round ends one interval after it started; late acks still count until then.
        round_end = max(timeout, self._probe_period())
        probe.timers.append(self._schedule(round_end, lambda: self._probe_round_ended(probe), grace=True))

    def _probe_acked(self, probe: _Probe) -> None:
        if probe.finished:
            return
        probe.acked = True
        self.health.probe_succeeded()
        self._finish_probe(probe)

    def _start_indirect(self, probe: _Probe) -> None:
        if probe.finished or probe.indirect_started:
            return
        probe.indirect_started = True
        helpers = self._sample_live_peers(self.settings.indirect_checks, exclude=probe.target.key)
        probe.helpers = len(helpers)
        if not helpers:
            if probe.pending and all(d.called for d in probe.pending):
                self._probe_round_ended(probe)
            return
        for helper in helpers:
            self._count("ping_request_sent")
            d = self._detach(self.transport.ping_request(helper.peer, probe.target.peer, self._piggyback()))
            probe.pending.append(d)

            def answered(ack: bool) -> None:
                probe.answers += 1
                if ack:
                    self._probe_acked(probe)
                else:
                    probe.nacks += 1
                    if probe.answers == probe.helpers and not probe.finished:
                        self._probe_round_ended(probe)

            d.addCallbacks(answered, lambda _: None)

    def _probe_round_ended(self, probe: _Probe) -> None:
        if probe.finished:
            return
        if not probe.indirect_started:
            self._start_indirect(probe)
            if probe.finished:
                return
        missing = probe.helpers - probe.answers
        if missing > 0:
            # Lifeguard: helpers that did not even nack suggest *we* are the slow one.
            self.health.missed_nack()
        self._finish_probe(probe)
        self._count("probe_failed")
        self._suspect(probe.target)

    def _finish_probe(self, probe: _Probe) -> None:
        probe.finished = True
        if self._probes.get(probe.target.key) is probe:
            del self._probes[probe.target.key]
        for timer in probe.timers:
            timer.cancel()
        for d in probe.pending:
            if not d.called:
                d.cancel()

    # ------------------------------------------------------------------ dissemination

    def _piggyback(self) -> list[Update]:
        limit = retransmit_limit(self.settings.retransmit_mult, self.cluster_size())
        return self.broadcasts.select(self.settings.max_piggyback, limit)

    def _gossip_tick(self) -> None:
        if not self.running:
            return
        self._schedule(self.settings.gossip_interval, self._gossip_tick)
        if not len(self.broadcasts):
            return
        for peer in self._sample_live_peers(self.settings.gossip_nodes):
            updates = self._piggyback()
            if not updates:
                break
            self._count("gossip_sent")
            self.transport.gossip(peer.peer, updates)

    def _state_sync_tick(self) -> None:
        if not self.running:
            return
        self._schedule(self.settings.state_sync_period(self.cluster_size()), self._state_sync_tick)
        peers = self._sample_live_peers(1)
        if peers:
            self._sync_with(peers[0].peer)

    def _reconnect_tick(self) -> None:
        """Retry dead (not left) members for a while: this is what heals a partition."""
        if not self.running:
            return
        self._schedule(self.settings.reconnect_interval, self._reconnect_tick)
        now = self.clock.seconds()
        dead = [
            m for m in self._members.values()
            if m.state is MemberState.DEAD and now - self._since.get(m.key, now) < self.settings.reconnect_timeout
        ]
        if dead:
            self._sync_with(self.rng.choice(dead).peer)

    def _sync_with(self, peer: PeerAddress) -> None:
        self._count("state_sync_sent")
        d = self._detach(self.transport.exchange_state(peer, self.full_state(), False))
        d.addCallback(self.merge_state, source=peer.key)
        d.addErrback(lambda f: None)

    def _reap_tick(self) -> None:
        if not self.running:
            return
        self._schedule(self.settings.tombstone_timeout / 4, self._reap_tick)
        now = self.clock.seconds()
        for key, member in list(self._members.items()):
            if (
                not member.is_live
                and key != self._local_key
                and now - self._since.get(key, now) >= self.settings.tombstone_timeout
            ):
                del self._members[key]
                self._since.pop(key, None)
                self._last_hint.pop(key, None)

    # ------------------------------------------------------------------ timers

    def _schedule(self, delay: float, function: Callable[[], object], grace: bool = False) -> DelayedCall:
        """``callLater`` that notices when it fires late (a stalled reactor).

        A late firing raises the local health score; with ``grace`` (timeouts) it also
        postpones the verdict by ``late_grace`` so that I/O queued during the stall is read
        first: a stall is inconclusive, not evidence against the peer."""
        expected = self.clock.seconds() + delay
        holder: list[DelayedCall] = []

        def fire(regraced: bool = False) -> None:
            if holder:
                self._timers.discard(holder[-1])
            late = self.clock.seconds() - expected
            if not regraced and late > self.settings.late_tolerance:
                # One stall makes every pending timer late at once: count it once per interval,
                # or a single hiccup would slow this node's probing for tens of seconds.
                now = self.clock.seconds()
                if now - self._last_late >= self.settings.probe_interval:
                    self._last_late = now
                    self.health.late_timer()
                self._count("late_timers")
                if grace:
                    holder.append(self.clock.callLater(self.settings.late_grace, fire, True))
                    self._timers.add(holder[-1])
                    return
            function()

        call = self.clock.callLater(delay, fire)
        holder.append(call)
        self._timers.add(call)
        return _TimerHandle(holder, self._timers)

    # ------------------------------------------------------------------ helpers

    def _detach(self, d: "Deferred") -> "Deferred":
        """A Deferred we can cancel without disturbing the transport's own: a late answer to
        an abandoned request is then simply ignored."""
        detached: Deferred = Deferred(lambda _: None)

        def forward(result: object) -> None:
            if not detached.called:
                if isinstance(result, Failure):
                    detached.errback(result)
                else:
                    detached.callback(result)

        d.addBoth(forward)
        return detached

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


class _IndexedSet:
    """A set with O(1) add/discard and a list view for O(k) random sampling."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, key: str) -> None:
        if key not in self._index:
            self._index[key] = len(self.items)
            self.items.append(key)

    def discard(self, key: str) -> None:
        position = self._index.pop(key, None)
        if position is None:
            return
        last = self.items.pop()
        if position < len(self.items):
            self.items[position] = last
            self._index[last] = position


class _TimerHandle:
    """An ``DelayedCall``-like handle that follows a timer through its grace re-arming."""

    def __init__(self, holder: list[DelayedCall], registry: set[DelayedCall]) -> None:
        self._holder = holder
        self._registry = registry

    def active(self) -> bool:
        return self._holder[-1].active()

    def cancel(self) -> None:
        call = self._holder[-1]
        self._registry.discard(call)
        if call.active():
            call.cancel()

    def getTime(self) -> float:  # noqa: N802 (DelayedCall spelling)
        return self._holder[-1].getTime()


def _log_exchange_failure(peer: PeerAddress, failure: Failure) -> int:
    log.debug("state exchange with {address} failed: {error}", address=peer.key, error=failure.getErrorMessage())
    return 0


