"""The websocket end of a console: frames in, bytes to Docker; Docker's bytes, text out.

Runs on the client's connection once it has been taken over from twisted.web (see
:mod:`portainer_agent.http.console`), with wsproto doing the framing. What it adds:

- client messages (text or binary) go to Docker as their bytes, chunk by chunk as
  wsproto parses them: no size limit and nothing reassembled in memory;
- Docker's bytes go out as text frames, decoded by :class:`TerminalText`, so no
  character is cut between frames and no byte is dropped or padded;
- backpressure both ways (each connection is the other's registered producer);
- a keepalive ping every ``ping_interval``; a client silent for a whole interval after
  a ping is gone, and is cut;
- close both ways: Docker's stream ends (the shell exited) -> close 1000; the client
  closes or drops -> the ``hangup`` bytes (repeated, see :meth:`_closeDocker`), then the
  Docker connection is closed; the agent stops (:meth:`go_away`) -> both, with 1001;
- a bounded close: a client that never answers our close frame is cut after
  ``close_timeout`` (its TCP may be gone without a FIN; a TLS close would wait forever).
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage

from portainer_agent.console.docker_stream import END_OF_INPUT, HANGUP_REPEAT, HANGUP_TRIES
from portainer_agent.console.text import TerminalText
from portainer_agent.toolbox.teardown import unregister_producer

log = Logger()

NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
PING_PAYLOAD = b"portainer-agent"


class ConsoleSession(Protocol):
    """One console: the client's websocket relayed to one Docker stream."""

    def __init__(self, connection: Connection, docker: Any, clock: Any, ping_interval: float,
                 close_timeout: float = 5.0, on_close: Callable[[], None] | None = None,
                 hangup: bytes = b"") -> None:
        self._ws = connection
        #: Docker's connection (write, loseConnection, producer registration).
        self._docker = docker
        self._clock = clock
        self._ping_interval = ping_interval
        self._close_timeout = close_timeout
        self.on_close = on_close
        #: Typed into Docker's stream when the client leaves first (ends an idle shell).
        self._hangup = hangup
        self._text = TerminalText()
        self._heard = True
        self._keepalive: LoopingCall | None = None
        self._closeTimer: IDelayedCall | None = None
        self._dockerClosed = False
        self._dockerEnded = False
        self._finished = False
        self._waiters: list[Deferred[None]] = []
        self._hangupTimer: IDelayedCall | None = None
        self._hangupLeft = 0
        self.lost = False

    # -- client connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self._docker, True)  # type: ignore[attr-defined]
        self._docker.registerProducer(self.transport, True)
        if self._ping_interval > 0:
            self._keepalive = LoopingCall(self._ping)
            self._keepalive.clock = self._clock
            self._keepalive.start(self._ping_interval, now=False)

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        if self._ws.state is ConnectionState.CLOSED:
            return
        self._ws.receive_data(data)
        for event in self._ws.events():
            self._handle(event)

    def _handle(self, event: Event) -> None:
        if isinstance(event, TextMessage):
            self._toDocker(event.data.encode("utf-8"))
        elif isinstance(event, BytesMessage):
            self._toDocker(bytes(event.data))
        elif isinstance(event, Ping):
            self._send(event.response())
        elif isinstance(event, CloseConnection):
            state = self._ws.state
            if state is ConnectionState.REMOTE_CLOSING:
                self._send(event.response())  # the client closed: answer, end Docker
            elif state is ConnectionState.OPEN:
                # A protocol error found by wsproto (bad frame, invalid UTF-8 text): say so.
                self._send(CloseConnection(event.code, event.reason))
            self._closeDocker(self._hangup)
            self._dropClient()
        # Pong: its arrival already counted as a sign of life.

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.lost:
            return
        self.lost = True
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        self._closeDocker(self._hangup)
        self._maybeFinished()

    # -- Docker stream (StreamReceiver) -------------------------------------------

    def dockerDataReceived(self, data: bytes) -> None:
        text = self._text.feed(data)
        if text:
            self._send(TextMessage(text))

    def dockerStreamEnded(self) -> None:
        """The exec or attach stream is over (the shell exited): say goodbye normally."""
        self._dockerEnded = True
        if self._hangupTimer is not None:
            self._stopHangup()
            self._docker.loseConnection()
        text = self._text.end()
        if text:
            self._send(TextMessage(text))
        self.close(NORMAL_CLOSURE)
        self._maybeFinished()

    # -- the session as a whole ----------------------------------------------------

    def _maybeFinished(self) -> None:
        """Both ends are gone: the session is over for whoever tracks it."""
        if self.lost and self._dockerEnded and not self._finished:
            self._finished = True
            waiters, self._waiters = self._waiters, []
            for waiting in waiters:
                waiting.callback(None)
            if self.on_close is not None:
                self.on_close()

    def go_away(self) -> "Deferred[None]":
        """The agent is stopping: hang up the shell, tell the client (1001), and fire
        once both ends are gone."""
        self._closeDocker(self._hangup)
        self.close(GOING_AWAY, "agent stopping")
        return self.whenFinished()

    def whenFinished(self) -> "Deferred[None]":
        done: Deferred[None] = Deferred()
        if self._finished:
            done.callback(None)
        else:
            self._waiters.append(done)
        return done

    def abort(self) -> None:
        """Cut both ends now (a stop that ran out of time)."""
        self._stopHangup()
        unregister_producer(self._docker)
        self._docker.abortConnection()
        self._abortClient()

    # -- actions -------------------------------------------------------------------

    def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake; the client is cut if it does not answer in time."""
        self._closeDocker()
        if self._ws.state is ConnectionState.OPEN and not self.lost:
            self._send(CloseConnection(code, reason))
            assert self.transport is not None
            unregister_producer(self.transport)  # nothing more to relay from Docker...
            if not getattr(self._docker, "disconnecting", False):
                self._docker.resumeProducing()  # ...but keep reading it, to see its end
            self._closeTimer = self._clock.callLater(self._close_timeout, self._dropClient)
        else:
            self._dropClient()

    def _ping(self) -> None:
        if not self._heard:
            log.info("console client silent for {seconds}s after a ping: cutting it", seconds=self._ping_interval)
            self._abortClient()
            return
        self._heard = False
        self._send(Ping(PING_PAYLOAD))

    def _send(self, event: Event) -> None:
        if self.lost or self.transport is None:
            return
        if self._ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return
        self.transport.write(self._ws.send(event))

    def _toDocker(self, data: bytes) -> None:
        if data and not self._dockerClosed:
            self._docker.write(data)

    def _closeDocker(self, hangup: bytes = b"") -> None:
        """No more client bytes for Docker. With ``hangup`` (a tty exec the client left),
        type it, then an end of input again every :data:`HANGUP_REPEAT` seconds for a
        while, and only then close: a Ctrl-D that lands while the shell is still in
        cooked mode (finishing a command) is lost when its line editor takes the tty
        back, so one try is not enough. The stream's own end (the shell exited) closes
        at once."""
        if self._dockerClosed:
            return
        self._dockerClosed = True
        unregister_producer(self._docker)
        if not hangup:
            self._docker.loseConnection()
            return
        self._docker.write(hangup)
        self._hangupLeft = HANGUP_TRIES
        self._hangupTimer = self._clock.callLater(HANGUP_REPEAT, self._hangupAgain)

    def _hangupAgain(self) -> None:
        self._hangupLeft -= 1
        if self._hangupLeft <= 0:
            self._hangupTimer = None
            self._docker.loseConnection()
            return
        self._docker.write(END_OF_INPUT)
        self._hangupTimer = self._clock.callLater(HANGUP_REPEAT, self._hangupAgain)

    def _stopHangup(self) -> None:
        if self._hangupTimer is not None and self._hangupTimer.active():
            self._hangupTimer.cancel()
        self._hangupTimer = None

    def _dropClient(self) -> None:
        """Close the client connection; abort it if even that does not finish in time."""
        if self.lost or self.transport is None:
            return
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        unregister_producer(self.transport)
        self.transport.loseConnection()
        self._closeTimer = self._clock.callLater(self._close_timeout, self._abortClient)

    def _abortClient(self) -> None:
        if not self.lost and self.transport is not None:
            unregister_producer(self.transport)
            self.transport.abortConnection()  # type: ignore[attr-defined]
