"""Piggy-backed dissemination: which membership updates ride on the next messages.

SWIM spreads changes epidemically: each node that learns something new re-sends it a bounded
number of times (``retransmit_mult * ceil(log10(N + 1))``), least-sent first, attached to
messages it sends anyway. The bound makes per-node traffic independent of the change rate's
history, and the log keeps the infection probability high as the cluster grows.
"""
from __future__ import annotations

import math
from typing import Iterable

import attrs

from portainer_agent.cluster.member import Member


@attrs.frozen
class Update:
    """A member record in flight, with the address of the node that first asserted it.

    ``origin`` lets a receiver count *independent* suspicions of a member (Lifeguard's
    confirmations) instead of the same rumour heard twice.
    """

    member: Member
    origin: str


def retransmit_limit(retransmit_mult: int, cluster_size: int) -> int:
    """How many times a node re-sends one update: memberlist's ``mult * ceil(log10(N+1))``."""
    return max(1, retransmit_mult * math.ceil(math.log10(max(1, cluster_size) + 1)))


@attrs.define
class _Entry:
    update: Update
    transmits: int
    order: int


class BroadcastQueue:
    """At most one pending update per member (a newer one replaces the older), sent
    least-transmitted first and dropped once sent ``limit`` times."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._entries)

    def enqueue(self, update: Update) -> None:
        self._counter += 1
        self._entries[update.member.key] = _Entry(update, 0, self._counter)

    def select(self, max_count: int, limit: int) -> list[Update]:
        """Pick up to ``max_count`` updates for one outgoing message and count the send."""
        if not self._entries or max_count <= 0:
            return []
        chosen = sorted(self._entries.values(), key=lambda e: (e.transmits, -e.order))[:max_count]
        for entry in chosen:
            entry.transmits += 1
            if entry.transmits >= limit:
                del self._entries[entry.update.member.key]
        return [entry.update for entry in chosen]

    def pending(self) -> Iterable[Update]:
        return [entry.update for entry in self._entries.values()]

    def clear(self) -> None:
        self._entries.clear()
