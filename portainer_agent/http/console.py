"""``GET /websocket/exec?id=`` and ``GET /websocket/attach?id=``: the HTTP edge of a console.

Order (reference-agent.md §7.6, with the original's crashes turned into answers):
method, ``id`` (present, hexadecimal), a valid websocket handshake; then Docker is
asked for the stream, and only once it answers ``101`` is the websocket accepted.
So every failure up to that point is an ordinary JSON error the client can read
(the original upgraded first and could only drop the socket).

Why not ``twisted.web.websocket.WebSocketResource`` (Twisted 26.10): it accepts the
handshake synchronously inside ``render_GET`` (no room to ask Docker first, no extra
response headers), and its takeover (``HTTPChannel._protocolUpgradeForWebsockets``)
leaves the ``HTTPChannel`` registered as the transport's producer: registering Docker
as producer then raises, and over TLS ``loseConnection`` waits for that producer
forever (both verified: ``attachProducer`` raised RuntimeError, and a close frame went
out but the TLS connection stayed open until the client gave up). The ``Request`` is
also never finished nor lost. The project's
``take_over_transport`` does the takeover cleanly; wsproto, the library twisted.web's
websocket support is built on, does the framing.

wsproto (with h11) and the session are imported by the first console request, not by the
agent's start: they cost about 1 MB of RSS that an agent nobody opens a console on never
needs (issue 15).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.toolbox.twisted_private import client_gone
from portainer_agent.console.docker_stream import ConsoleTarget, DockerStream
from portainer_agent.toolbox.takeover import take_over_transport
from portainer_agent.toolbox.teardown import cancel_when_client_leaves
from portainer_agent.errors import AgentError
from portainer_agent.toolbox.responses import finish_with_error, write_error
from portainer_agent.routing import Route

if TYPE_CHECKING:
    from wsproto.handshake import H11Handshake

log = Logger()

_HEX = re.compile(r"\A[0-9a-fA-F]+\Z")

MISSING_ID = AgentError(400, "Invalid query parameter: id", "Missing query parameter")
BAD_ID = AgentError(400, "Invalid query parameter: id (must be hexadecimal identifier)",
                    "Invalid query parameter: id (must be hexadecimal identifier)")

#: Opens Docker's side for a target (bound to the reactor and socket by tap.py).
OpenStream = Callable[[ConsoleTarget], "Deferred[DockerStream]"]


def console_target(kind: str, args: dict[bytes, list[bytes]]) -> ConsoleTarget:
    """Pure: the target named by the query string, or the original's 400s."""
    values = args.get(b"id") or [b""]
    raw = values[0].decode("latin-1")
    if not raw:
        raise MISSING_ID
    if not _HEX.match(raw):
        raise BAD_ID
    return ConsoleTarget(kind, raw)


def websocket_handshake(request: Request) -> H11Handshake:
    """The client's opening handshake, checked (not yet answered)."""
    from wsproto import ConnectionType
    from wsproto.handshake import H11Handshake
    from wsproto.utilities import RemoteProtocolError

    handshake = H11Handshake(ConnectionType.SERVER)
    headers = [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]
    try:
        handshake.initiate_upgrade_connection(headers, request.uri)
    except RemoteProtocolError as error:
        request.setHeader(b"sec-websocket-version", b"13")  # what a websocket server tells a bad client
        raise AgentError(400, "Invalid websocket request", str(error)) from None
    return handshake


def _each(*calls: Callable[[], None] | None) -> Callable[[], None] | None:
    """One callable calling each of ``calls`` that is not None (None if there is none)."""
    present = [call for call in calls if call is not None]
    if not present:
        return None

    def call_each() -> None:
        for call in present:
            call()

    return call_each


class ConsoleResource:
    """One console endpoint (``kind`` is ``"exec"`` or ``"attach"``)."""

    def __init__(self, kind: str, open_stream: OpenStream, clock: Any, ping_interval: float,
                 track: Callable[[Any], Callable[[], None]] | None = None, close_timeout: float = 5.0,
                 hand_over: Callable[[Request, Any], Callable[[], None]] | None = None) -> None:
        self.kind = kind
        self._open_stream = open_stream
        self._clock = clock
        self._ping_interval = ping_interval
        self._track = track
        #: The site's in-flight registry: the request lives on as the session.
        self._hand_over = hand_over
        self._close_timeout = close_timeout

    def render(self, request: Request, route: Route | None = None) -> Any:
        try:
            if request.method != b"GET":
                request.setHeader(b"allow", b"GET")
                raise AgentError(405, "Method not allowed", "a console is opened with a websocket GET")
            target = console_target(self.kind, request.args or {})
            handshake = websocket_handshake(request)
        except AgentError as error:
            return write_error(request, error)
        opening = self._open_stream(target)
        cancel_when_client_leaves(request, opening)
        opening.addCallbacks(self._accept, self._refused, callbackArgs=(request, handshake, target),
                             errbackArgs=(request, target))
        return NOT_DONE_YET

    def _refused(self, failure: Failure, request: Request, target: ConsoleTarget) -> None:
        if failure.check(CancelledError):
            return
        error = failure.value if isinstance(failure.value, AgentError) else AgentError(
            502, "Unable to open the console", failure.getErrorMessage())
        log.info("console {kind} {id} refused: {status} {message}", kind=target.kind, id=target.id,
                 status=error.status, message=error.message)
        finish_with_error(request, error)

    def _accept(self, stream: DockerStream, request: Request, handshake: H11Handshake,
                target: ConsoleTarget) -> None:
        """Docker upgraded: accept the websocket and join the two ends (same reactor turn)."""
        from wsproto.events import AcceptConnection

        from portainer_agent.console.session import ConsoleSession

        if client_gone(request):
            stream.transport.abortConnection()
            return
        agent_headers = [(name, values[0]) for name, values in request.responseHeaders.getAllRawHeaders()
                         if name.lower().startswith(b"portainer-agent")]
        accept = handshake.send(AcceptConnection(extra_headers=agent_headers))
        connection = handshake.connection
        assert connection is not None  # wsproto made it when accepting
        session = ConsoleSession(connection, stream.transport, self._clock, self._ping_interval,
                                 close_timeout=self._close_timeout, hangup=stream.target.hangup)
        forget = self._track(session) if self._track is not None else None
        release = self._hand_over(request, session) if self._hand_over is not None else None
        session.on_close = _each(forget, release)
        client = request.channel.transport
        assert client is not None  # not disconnected (checked above)
        client.write(accept)
        take_over_transport(request, session)
        stream.start(session)
        log.debug("console {kind} {id} open", kind=target.kind, id=target.id)
