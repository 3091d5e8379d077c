"""Timers that bound a wait: cancelled once what they bound is over.

Why a module: "start a timer, cancel it when the Deferred fires (if it is still pending)"
was written again in the membership transport, the gossip engine, the console sessions and
the node list reader. Nothing HTTP here, so :mod:`portainer_agent.cluster` can use it.
"""
from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

T = TypeVar("T")


def cancel_timer(timer: IDelayedCall | None) -> None:
    """Cancel ``timer`` unless it has run, been cancelled, or is None."""
    if timer is not None and timer.active():
        timer.cancel()


def cancel_timer_when_done(deferred: "Deferred[T]", timer: IDelayedCall) -> "Deferred[T]":
    """Cancel ``timer`` once ``deferred`` fires (its result passes through); returns ``deferred``."""
    def over(result: Any) -> Any:
        cancel_timer(timer)
        return result

    return deferred.addBoth(over)
