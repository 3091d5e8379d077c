"""Reading a whole, bounded response body that can be cancelled.

treq's ``content`` has neither: a leg of an aggregated list that timed out kept reading, and
one node could send an answer of any size. Here the Deferred's canceller stops the upstream
(the body transport's ``stopProducing``, which closes that connection, so it never goes back
dirty to a pool) and a body over ``limit`` bytes fails with :class:`AnswerTooLarge`, its
connection closed the same way.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse


class AnswerTooLarge(Exception):
    """A node's answer is larger than the cap (``--aggregate-max-bytes``)."""

    def __init__(self, node: str, limit: int) -> None:
        super().__init__(node, limit)
        self.node = node
        self.limit = limit

    def __str__(self) -> str:
        return (f"the answer of node {self.node} is larger than the limit of {self.limit} bytes"
                " (--aggregate-max-bytes); its connection was closed")


class _Collector(Protocol):
    def __init__(self, node: str, limit: int) -> None:
        self._node = node
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.ended = False
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.ended:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.too_large()
            return
        self._chunks.append(data)

    def too_large(self) -> None:
        self.ended = True
        self._chunks = []
        self._stop()
        if not self.done.called:
            self.done.errback(AnswerTooLarge(self._node, self._limit))

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


def collect_body(response: IResponse, node: str, limit: int) -> "Deferred[bytes]":
    """The whole body of ``response`` (from ``node``), at most ``limit`` bytes.

    Cancelling the Deferred stops the upstream; an answer announced or found larger than
    ``limit`` fails with :class:`AnswerTooLarge` and stops it too.
    """
    collector = _Collector(node, limit)
    response.deliverBody(collector)
    length = response.length
    if not collector.ended and length is not UNKNOWN_LENGTH and isinstance(length, int) and length > limit:
        collector.too_large()
    return collector.done
