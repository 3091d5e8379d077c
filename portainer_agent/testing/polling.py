"""Waiting for a condition under a deadline: the one poll loop of the test suite.

Tests never sleep for a fixed time; they poll what they expect and fail naming it when the
deadline passes. The deadline bounds how long a broken build hangs, it is never what the
test asserts. :func:`wait_for` blocks (for tests that drive other processes with blocking
clients); :func:`wait_for_deferred` yields to the reactor between polls (for tests whose
condition is changed by the reactor itself).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = ["wait_for", "wait_for_deferred"]


def _failure(what: str, timeout: float, describe: Callable[[], str] | None,
             error: Callable[[str], Exception] = AssertionError) -> Exception:
    detail = f": {describe()}" if describe is not None else ""
    return error(f"timed out after {timeout}s waiting for {what}{detail}")


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
             describe: Callable[[], str] | None = None,
             error: Callable[[str], Exception] = AssertionError) -> Any:
    """Poll ``condition`` until it returns something true, and return that; raise
    ``error`` (an ``AssertionError`` in tests; the lab raises its own) naming ``what`` (and
    ``describe()``, the state seen) at the deadline. An exception from ``condition``
    propagates at once."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _failure(what, timeout, describe, error)
        time.sleep(interval)


def wait_for_deferred(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
                      describe: Callable[[], str] | None = None, reactor: Any = None) -> "Deferred[Any]":
    """:func:`wait_for` on the reactor: a Deferred (``yield`` it under ``inlineCallbacks`` or
    ``await`` it) that lets the reactor run between polls and fails with the same error."""
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(_poll_on_reactor(condition, timeout, what, interval, describe, reactor))


async def _poll_on_reactor(condition: Callable[[], Any], timeout: float, what: str, interval: float,
                           describe: Callable[[], str] | None, reactor: Any) -> Any:
    from twisted.internet.task import deferLater

    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _failure(what, timeout, describe)
        await deferLater(reactor, interval, lambda: None)
