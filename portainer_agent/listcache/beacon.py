"""Telling the other agents this agent's list cache state (:mod:`.peer_states`).

Three things, over the membership connections (AMP, authenticated by the cluster key):

- a **notice** at every change, at most one per reactor turn;
- a **heartbeat** every :data:`HEARTBEAT_SECONDS`, so a peer that missed a notice (or a
  frozen agent) stops being trusted within :data:`~.peer_states.TRUST_SECONDS`;
- the **write barrier**: a write this agent proxied to its Docker is answered only once every
  live peer has heard the new state, or after :data:`BARRIER_SECONDS` (a peer that did not
  answer stops trusting its copy when its trust runs out). So a container created through
  one agent is in the next list asked of any other, whichever one Portainer reaches.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from portainer_agent.cluster.member import Member

log = Logger()

HEARTBEAT_SECONDS = 0.3
BARRIER_SECONDS = 1.0


class ListBeacon(Service):
    name = "list-beacon"

    def __init__(self, reactor: Any, cache: Any, transport: Any, peers: Callable[[], Sequence[Member]],
                 local_name: Callable[[], str]) -> None:
        self._reactor = reactor
        self._cache = cache
        self._transport = transport
        self._peers = peers
        self._local_name = local_name
        self._loop: LoopingCall | None = None
        self._notice: Any = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._cache.on_change = self._changed
        self._cache.barrier = self.barrier
        self._loop = LoopingCall(self.send)
        self._loop.clock = self._reactor
        self._loop.start(HEARTBEAT_SECONDS, now=False).addErrback(
            lambda failure: log.failure("list cache heartbeat failed", failure))

    def stopService(self) -> Any:  # noqa: N802
        self._cache.on_change = None
        self._cache.barrier = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._notice is not None and self._notice.active():
            self._notice.cancel()
        return super().stopService()

    def _changed(self) -> None:
        if self._notice is None or not self._notice.active():
            self._notice = self._reactor.callLater(0, self.send)

    def send(self) -> "Deferred[Any]":
        """The current state to every live peer; fires when each has answered or failed."""
        name, boot, generation = self._local_name(), self._cache.boot, self._cache.generation
        sent = []
        for member in self._peers():
            try:
                sent.append(self._transport.list_state(member.peer, name, boot, generation))
            except Exception:  # noqa: BLE001 - a member record we cannot dial: it is asked every time
                continue
        return DeferredList(sent, consumeErrors=True)

    def barrier(self, result: Any = None) -> "Deferred[Any]":
        """Fires with ``result`` once every live peer heard the current state, or after
        :data:`BARRIER_SECONDS` (the peers' requests are not cancelled: AMP answers late)."""
        done: Deferred[Any] = Deferred()
        timer = self._reactor.callLater(BARRIER_SECONDS, lambda: done.called or done.callback(None))

        def heard(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        self.send().addBoth(heard)
        return done.addCallback(lambda _: result)
