"""Ending what a request started: its upstream when the client leaves, a producer quietly.

Why here, in the toolbox: every upstream (a relayed response, a spliced stream, the legs
of an aggregated list) and the console do these two things, and each did them its own way.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import Request


def cancel_when_client_leaves(request: Request, *pending: "Deferred[Any]") -> None:
    """Cancel each of ``pending`` (what is waited for upstream) if the client leaves first.

    Cancelling one that has fired is a no-op, unless it waits on a further Deferred (a leg
    of an aggregate reading its body), which is then the one cancelled: whoever keeps a
    chain waiting on something must want it stopped when nobody will read it."""
    def left(_: Any) -> None:
        for deferred in pending:
            deferred.cancel()

    request.notifyFinish().addErrback(left)


def unregister_producer(transport: Any) -> None:
    """Unregister ``transport``'s producer, if it has one (or the transport is gone):
    taking a connection over, closing it or stopping a relay all do it, and none of them
    knows whether a producer is still registered."""
    if transport is None:
        return
    try:
        transport.unregisterProducer()
    except Exception:  # noqa: BLE001 - none registered, or already disconnected
        pass
