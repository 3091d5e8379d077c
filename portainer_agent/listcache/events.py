"""Docker's event stream, supervised: one ``GET /events`` kept open, reopened when it drops.

The list cache may serve from memory only while this stream is open, since it is the
only way to learn of a change made by anyone else (the CLI on the node, Swarm starting a
task, a restart policy). So the stream says when it is up and when it is down, and
reopens with a capped, jittered backoff.

There is no gap to miss: Docker writes the response head *before* it subscribes to its
event bus (``getEvents`` flushes, then ``SubscribeToEvents``), so the stream is opened
with ``since`` a little in the past: Docker replays from its in-memory log (the last 256
events) whatever happened since, including between the head and the subscription. A
replayed event only costs an invalidation.
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable

import json
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

log = Logger()

#: How far back ``since`` reaches when the stream opens (covers the head/subscribe gap).
REPLAY_SECONDS = 2.0
#: Reconnect delays: from the first to the cap, doubled each failure, with jitter.
FIRST_DELAY = 0.1
MAX_DELAY = 5.0
#: An event line longer than this is not an event (the stream is cut and reopened).
MAX_LINE = 1024 * 1024



class EventStream:
    """Keeps ``GET /events`` open on ``client`` (the one Docker client).

    ``on_up()`` is called when a stream is open (its head in), ``on_event(event)`` for each
    event (a dict, as Docker sends it), ``on_down(reason)`` when it ends or cannot open.
    """

    def __init__(self, reactor: Any, client: Any, on_up: Callable[[], None],
                 on_event: Callable[[dict[str, Any]], None], on_down: Callable[[str], None],
                 wall_clock: Callable[[], float] = time.time, jitter: Callable[[], float] = random.random,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self._reactor = reactor
        self._client = client
        self._on_up = on_up
        self._on_event = on_event
        self._on_down = on_down
        self._on_reconnect = on_reconnect
        self._wall_clock = wall_clock
        self._jitter = jitter
        self._pending: Deferred[Any] | None = None
        self._body: _EventLines | None = None
        self._retry: Any = None
        self._delay = FIRST_DELAY
        #: When the open stream's head came in (reactor seconds).
        self._opened_at = 0.0
        self._running = False
        self.up = False
        self.opened = 0

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._open()

    def stop(self) -> None:
        """Close the stream for good (agent stopping)."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._pending is not None:
            self._pending.cancel()
        if self._body is not None:
            self._body.close()
        self._went_down("stopped")

    def _open(self) -> None:
        self._retry = None
        since = self._wall_clock() - REPLAY_SECONDS
        try:
            pending = self._client.request(b"GET", b"/events?since=%.9f" % since)
        except Exception as error:  # noqa: BLE001 - a bug: counted as a failed open, retried
            self._failed(f"cannot ask for events: {error}")
            return
        self._pending = pending
        pending.addCallbacks(self._answered, self._unreachable)

    def _answered(self, response: Any) -> None:
        self._pending = None
        if not self._running:
            response.deliverBody(_EventLines(lambda event: None, lambda reason: None))
            return
        if response.code != 200:
            response.deliverBody(_EventLines(lambda event: None, lambda reason: None))
            self._failed(f"Docker answered GET /events with {response.code}")
            return
        self.up = True
        self.opened += 1
        if self.opened > 1 and self._on_reconnect is not None:
            self._on_reconnect()
        self._opened_at = self._reactor.seconds()
        self._on_up()
        self._body = _EventLines(self._on_event, self._ended)
        response.deliverBody(self._body)

    def _unreachable(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(CancelledError) or not self._running:
            return
        self._failed(f"Docker unreachable for events: {failure.getErrorMessage()}")

    def _ended(self, reason: str) -> None:
        self._body = None
        if not self._running:
            return
        # A stream that stayed up a while starts the backoff again from the first delay.
        if self._reactor.seconds() - self._opened_at > 10 * MAX_DELAY:
            self._delay = FIRST_DELAY
        self._failed(reason)

    def _failed(self, reason: str) -> None:
        was_up = self.up
        self._went_down(reason)
        if was_up:
            log.warn("Docker event stream lost ({reason}): lists are read from Docker until it is back",
                     reason=reason)
        else:
            log.debug("Docker event stream not open: {reason}", reason=reason)
        if self._running:
            delay = self._delay * (0.5 + self._jitter())
            self._delay = min(self._delay * 2, MAX_DELAY)
            self._retry = self._reactor.callLater(delay, self._open)

    def _went_down(self, reason: str) -> None:
        if self.up:
            self.up = False
            self._on_down(reason)


class _EventLines(Protocol):
    """Splits the event stream into JSON lines (one event each)."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None], on_end: Callable[[str], None]) -> None:
        self._on_event = on_event
        self._on_end = on_end
        self._buffer = b""
        self._closed = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._closed:
            return
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                log.warn("Docker event stream: not an event, ignored: {line!r}", line=line[:200])
                continue
            self._on_event(event)
            if self._closed:
                return
        if len(self._buffer) > MAX_LINE:
            self.close()
            self._end("an event line over 1 MiB")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            transport: Any = self.transport
            if transport is not None:
                transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        if reason is not None and reason.check(ResponseDone):
            self._end("Docker ended the stream")
        else:
            self._end(reason.getErrorMessage() if reason is not None else "stream closed")

    def _end(self, reason: str) -> None:
        on_end, self._on_end = self._on_end, lambda reason: None
        on_end(reason)
