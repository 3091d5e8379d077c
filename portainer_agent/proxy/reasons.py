"""One meaningful line for why an upstream leg failed (never empty).

``getErrorMessage()`` of a timeout or a cancellation is empty, and Twisted's client wraps
the real cause in ``ResponseNeverReceived``/``ResponseFailed``; the log line and the
``Warnings`` of an aggregated list must say something a user can act on.
"""
from __future__ import annotations

from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError, TCPTimedOutError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from portainer_agent.toolbox.whole_body import BodyTooLarge
from portainer_agent.proxy.member_gone import MemberGone


def _one(failure: Failure, deadline: float | None) -> str:
    if failure.check(MemberGone, BodyTooLarge):
        return str(failure.value)
    if failure.check(TimeoutError, CancelledError):
        return f"no answer within {deadline:g}s" if deadline is not None else "no answer in time"
    if failure.check(ConnectionRefusedError):
        return "connection refused"
    if failure.check(ConnectTimeoutError, TCPTimedOutError):
        return "connection timed out"
    if failure.check(ConnectionDone):
        return "connection closed"
    if failure.check(ConnectionLost):
        return "connection lost"
    return failure.getErrorMessage().strip() or type(failure.value).__name__


def upstream_failure_reason(failure: Failure, deadline: float | None = None) -> str:
    """Why a request to a node failed, in a few words (``deadline``: the leg's, for timeouts)."""
    inner = getattr(failure.value, "reasons", None)
    if inner:
        text = "; ".join(dict.fromkeys(_one(f, deadline) for f in inner))
        if failure.check(ResponseNeverReceived):
            return f"{text} before any answer"
        if failure.check(ResponseFailed):
            return f"{text} while reading the answer"
        return text
    return _one(failure, deadline)
