"""Lifeguard's local health multiplier: distrust your own timeouts when you are the slow one.

A node whose event loop stalls sees its timers fire late and its acks arrive "after" their
timeout; naive SWIM then suspects healthy peers. The awareness score rises on evidence of local
trouble (late timers, missing nacks from helpers, being suspected by others) and decays on
every successful probe; probe timeouts, the probe interval and the suspicion timeouts this node
starts are multiplied by ``score + 1``.
"""
from __future__ import annotations

import attrs


@attrs.define
class LocalHealth:
    """Awareness score in ``[0, maximum)``; ``multiplier`` scales this node's own timeouts."""

    maximum: int = 8
    score: int = 0

    @property
    def multiplier(self) -> int:
        return self.score + 1

    def adjust(self, delta: int) -> int:
        self.score = min(self.maximum - 1, max(0, self.score + delta))
        return self.score

    def late_timer(self) -> None:
        """A timer fired noticeably late: the local reactor was stalled."""
        self.adjust(+1)

    def missed_nack(self) -> None:
        """A helper did not even answer our indirect probe request: likely our problem."""
        self.adjust(+1)

    def refuted(self) -> None:
        """Someone suspected us: we were slow to answer."""
        self.adjust(+1)

    def probe_succeeded(self) -> None:
        self.adjust(-1)
