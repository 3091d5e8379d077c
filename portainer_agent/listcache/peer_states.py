"""What an aggregating agent has heard of its peers' list caches, and whom it trusts (pure).

A peer's list cache has a state: its boot (a random id per start) and its generation (one
more at every change). The peer says it when it changes and as a heartbeat
(:mod:`.beacon`); an answer it gives carries the state it is valid in, and until when its
time-relative texts stay as they are. A kept copy of a peer's answer is merged without
asking the peer only while all three hold:

- the last state heard from the peer is the copy's (nothing changed since);
- it was heard less than :data:`TRUST_SECONDS` ago (a lost notice, a partition or a frozen
  peer cannot keep a copy in use longer: the guarantee for changes made on a node's socket
  is "within a second");
- the copy's texts are still what the peer would say now.

A write through any agent does not rely on the heartbeat: the agent that wrote answers only
once every live peer has heard the new state (the write barrier, :mod:`.beacon`).
"""
from __future__ import annotations

from typing import Any

TRUST_SECONDS = 0.8


def state_text(boot: str, generation: int) -> str:
    return f"{boot}-{generation}"


class PeerListStates:
    def __init__(self, clock: Any, trust_seconds: float = TRUST_SECONDS) -> None:
        self._clock = clock
        self._trust = trust_seconds
        self._heard: dict[str, tuple[str, float]] = {}

    def heard(self, node: str, boot: str, generation: int) -> None:
        self._heard[node] = (state_text(boot, generation), self._clock.seconds())

    def forget(self, node: str) -> None:
        self._heard.pop(node, None)

    def trusts(self, node: str, state: str | None) -> bool:
        """Whether a copy of ``node``'s answer in ``state`` is its current answer."""
        if not state:
            return False
        heard = self._heard.get(node)
        return heard is not None and heard[0] == state and self._clock.seconds() - heard[1] <= self._trust
