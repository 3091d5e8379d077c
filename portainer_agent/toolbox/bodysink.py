"""A request body written to a blocking sink (a staged file) in the disk thread pool, as
it arrives, with backpressure and a size limit.

The body comes from an ``IBodyProducer`` (:func:`portainer_agent.toolbox.upload.body_producer`
for a body that streams, or a :class:`~portainer_agent.toolbox.upload.BufferedBody`); the
sink is a plain function (``feed(bytes)``) run by a :data:`~portainer_agent.fs.pool.RunInPool`.
One batch is written at a time; bytes that arrive meanwhile are gathered into the next
batch, and the client is paused once :data:`HIGH_WATER` bytes wait. So the pool never
sees two writes to the same file at once, the agent holds at most about
``HIGH_WATER`` + one read per upload, and a thread hop costs one batch, not one TCP read.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from portainer_agent.errors import AgentError
from portainer_agent.fs.pool import RunInPool

#: Bytes waiting for the pool before the client is paused.
HIGH_WATER = 1 << 20


def too_large(limit: int) -> AgentError:
    return AgentError(413, "Request body too large", f"The upload is larger than the limit of {limit} bytes"
                      " (--browse-max-upload)")


@implementer(IConsumer)
class PoolSink:
    """Consumes a body and hands it to ``feed`` in the pool, in order, one batch at a
    time. :meth:`drain` fires once every byte was fed, or fails (413 over ``limit``,
    the producer's failure, or ``feed``'s) once no write is in flight any more, so the
    caller may then close what ``feed`` writes to."""

    def __init__(self, feed: Callable[[bytes], Any], run: RunInPool, limit: int = 0) -> None:
        self._feed = feed
        self._run = run
        self._limit = limit
        self._producer: IBodyProducer | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._writing = False
        self._paused = False
        self._ended = False
        self._error: Failure | None = None
        self._done: Deferred[None] = Deferred()
        #: Body bytes received so far.
        self.received = 0

    def drain(self, producer: IBodyProducer) -> "Deferred[None]":
        self._producer = producer
        producer.startProducing(self).addCallbacks(self._body_ended, self._fail)
        return self._done

    # IConsumer (the producer registers nothing: it was started by ``drain``)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:  # noqa: N802
        pass

    def unregisterProducer(self) -> None:  # noqa: N802
        pass

    def write(self, data: bytes) -> None:
        if self._error is not None:
            return
        self.received += len(data)
        if self._limit and self.received > self._limit:
            producer, self._producer = self._producer, None
            if producer is not None:
                producer.stopProducing()  # the rest of the body is dropped as it arrives
            self._fail(Failure(too_large(self._limit)))
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= HIGH_WATER and not self._paused and self._producer is not None:
            self._paused = True
            self._producer.pauseProducing()
        self._next()

    def _next(self) -> None:
        if self._writing:
            return
        if self._error is not None:
            self._settle_failure()
            return
        if not self._pending:
            if self._ended and not self._done.called:
                self._done.callback(None)
            return
        batch = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_size = [], 0
        self._writing = True
        self._run(self._feed, batch).addCallbacks(self._written, self._write_failed)

    def _written(self, _: Any) -> None:
        self._writing = False
        if self._paused and self._producer is not None and self._error is None:
            self._paused = False
            self._producer.resumeProducing()
        self._next()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = False
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        self._fail(failure)

    def _body_ended(self, _: Any) -> None:
        self._ended = True
        self._next()

    def _fail(self, failure: Failure) -> None:
        if self._error is None:
            self._error = failure
            self._pending, self._pending_size = [], 0
        self._settle_failure()

    def _settle_failure(self) -> None:
        if self._writing:
            return  # a write is in flight: fail once it is back (through ``_next``)
        if self._error is not None and not self._done.called:
            self._done.errback(self._error)
