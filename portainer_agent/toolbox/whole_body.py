"""Reading a whole response body: bounded, and cancellable.

The one body reader (an aggregate's legs, the Swarm node list, a refused console stream, the
Docker client's small JSON answers). treq's ``content`` has neither bound nor canceller: a leg
of an aggregated list that timed out kept reading, and one node could send an answer of any
size. Here the Deferred's canceller stops the upstream (the body transport's
``stopProducing``, which closes that connection, so it never goes back dirty to a pool) and
a body over ``limit`` bytes fails with :class:`BodyTooLarge`, its connection closed the same
way.
"""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

#: The bound when the caller has none of its own: answers read whole are small (errors,
#: inspect, version); a larger one is a broken or hostile upstream.
SMALL_BODY_LIMIT = 4 * 1024 * 1024


class BodyTooLarge(Exception):
    """An answer is larger than the reader's bound."""

    def __init__(self, source: str, limit: int, hint: str = "") -> None:
        super().__init__(source, limit)
        self.source = source
        self.limit = limit
        self.hint = hint

    def __str__(self) -> str:
        return (f"the answer of {self.source} is larger than the limit of {self.limit} bytes"
                f"{self.hint}; its connection was closed")


class _Collector(Protocol):
    def __init__(self, too_large: BodyTooLarge) -> None:
        self._too_large = too_large
        self._chunks: list[bytes] = []
        self._size = 0
        self.ended = False
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.ended:
            return
        self._size += len(data)
        if self._size > self._too_large.limit:
            self.too_large()
            return
        self._chunks.append(data)

    def too_large(self) -> None:
        self.ended = True
        self._chunks = []
        self._stop()
        if not self.done.called:
            self.done.errback(self._too_large)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802
        if self.ended:
            return
        self.ended = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)
        self._chunks = []

    def _cancel(self, _: "Deferred[bytes]") -> None:
        if self.ended:
            return
        self.ended = True
        self._chunks = []
        self._stop()

    def _stop(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


def read_whole_body(response: IResponse, limit: int = SMALL_BODY_LIMIT, source: str = "the upstream",
                    hint: str = "") -> "Deferred[bytes]":
    """The whole body of ``response`` (from ``source``, for the error), at most ``limit`` bytes.

    Cancelling the Deferred stops the upstream; an answer announced or found larger than
    ``limit`` fails with :class:`BodyTooLarge` (``hint``: what sets the limit, for its
    message) and stops it too.
    """
    collector = _Collector(BodyTooLarge(source, limit, hint))
    response.deliverBody(collector)
    length = response.length
    if not collector.ended and length is not UNKNOWN_LENGTH and isinstance(length, int) and length > limit:
        collector.too_large()
    return collector.done


def read_json_body(response: IResponse, limit: int = SMALL_BODY_LIMIT,
                   source: str = "the upstream") -> "Deferred[tuple[int, Any]]":
    """A whole (small) answer: ``(status, parsed JSON or None)``."""
    def parse(body: bytes) -> tuple[int, Any]:
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, None

    return read_whole_body(response, limit, source).addCallback(parse)
