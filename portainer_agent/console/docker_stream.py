"""Docker's side of a console: ``exec start`` or ``attach`` upgraded to a raw stream.

:func:`open_docker_stream` is the one place the console reaches Docker. It rides on the
agent's one Docker client, the one ``tap.py`` builds for the socket
(:meth:`~portainer_agent.docker.client.DockerClient.upgrade`: a fresh connection of that
client, which parses Docker's answer), so the console shares its socket path, its error
messages and its shutdown with the proxy.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Protocol as _Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from portainer_agent.docker import wire
from portainer_agent.docker.client import DockerClient
from portainer_agent.docker.upgrade import Upgraded
from portainer_agent.toolbox.whole_body import read_whole_body
from portainer_agent.errors import AgentError, bad_gateway_docker
from portainer_agent.proxy.relay import failure_reason

#: The body the original sends to ``exec start`` (reference-agent.md §7.6), newline included.
EXEC_START_BODY = b'{"Tty":true,"Detach":false}\n'


class StreamReceiver(Protocol):
    """Who gets Docker's bytes once the stream is upgraded."""

    def dockerDataReceived(self, data: bytes) -> None: ...

    def dockerStreamEnded(self) -> None: ...


@attrs.frozen
class ConsoleTarget:
    """Which Docker stream a console opens: an exec instance or a container's attach."""

    kind: str  # "exec" or "attach"
    id: str  # hexadecimal, checked at the HTTP edge
    #: Typed into the stream when the client leaves first (see :func:`hangup_for`).
    hangup: bytes = b""

    def request_line(self) -> tuple[bytes, bytes]:
        """Pure: (path, body) of the upgrade request, as the original sends them."""
        if self.kind == "exec":
            return b"/exec/%s/start" % self.id.encode(), EXEC_START_BODY
        return b"/containers/%s/attach?stdin=1&stdout=1&stderr=1&stream=1" % self.id.encode(), b""


#: Ctrl-C (drop the line being typed), Ctrl-D (end of input): what ends an idle shell.
TERMINAL_HANGUP = b"\x03\x04"
#: After a hangup, Ctrl-D again every HANGUP_REPEAT s, HANGUP_TRIES times, then close
#: (the session does it; here, beside the hangup, so that the sessions service can size
#: its stop without importing wsproto).
END_OF_INPUT = b"\x04"
HANGUP_REPEAT = 0.5
HANGUP_TRIES = 6


def hangup_for(target: ConsoleTarget, inspected: dict[str, Any]) -> ConsoleTarget:
    """Pure: the target, with the bytes to type when the client leaves first.

    Docker keeps a tty exec running when its stream closes (its stdin is closed, but a
    terminal never sees that as an end of input), so every closed console would leave
    a shell behind, as the original does. Typing Ctrl-C, Ctrl-D is what ends an idle
    shell. Only for exec instances with a tty: without one, closing stdin already ends
    the input and those bytes would be data; an attach belongs to the container's main
    process, which a console must never end."""
    config = inspected.get("ProcessConfig") or {}
    if target.kind == "exec" and config.get("tty"):
        return attrs.evolve(target, hangup=TERMINAL_HANGUP)
    return target


def upgrade_head(target: ConsoleTarget) -> bytes:
    """Pure: the raw HTTP/1.1 request asking Docker for the hijacked stream."""
    path, body = target.request_line()
    return wire.request_head(b"POST", path, wire.DOCKER_HOST, UPGRADE_HEADERS, wire.content_length(len(body))) + body


#: The header lines of the upgrade request, as the original sends them.
UPGRADE_HEADERS = ((b"Content-Type", b"application/json"), (b"Connection", b"Upgrade"), (b"Upgrade", b"tcp"))


def refusal(target: ConsoleTarget, code: int, phrase: bytes, rest: bytes) -> AgentError:
    """Pure: Docker did not upgrade (404 no such exec, 409 not running...). Its JSON
    message is kept when its body came with the head; 4xx keep their status, anything
    else is a 502."""
    message = f"Docker answered {code} {phrase.decode('latin-1')}".strip()
    try:
        decoded = json.loads(rest)
        if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
            message = decoded["message"]
    except ValueError:
        pass
    status = code if 400 <= code < 500 else 502
    return AgentError(status, message, f"Unable to start the {target.kind} stream of {target.id}")


@implementer(IHalfCloseableProtocol)
class _ToReceiver(_Protocol):
    """Docker's side of the upgraded connection: its bytes go to the receiver; its end
    of stream (EOF or close) ends the console (no half-close)."""

    def __init__(self, receiver: StreamReceiver) -> None:
        self._receiver = receiver
        self._ended = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self._ended:
            self._receiver.dockerDataReceived(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        self._end()
        if self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._receiver.dockerStreamEnded()


@attrs.define
class DockerStream:
    """An upgraded Docker connection. ``transport`` takes the client's bytes; Docker's
    bytes go to the receiver given to :meth:`start`, which must be called in the same
    reactor turn the Deferred fired in (nothing is buffered meanwhile)."""

    transport: ITCPTransport
    target: ConsoleTarget
    _upgraded: Upgraded

    def start(self, receiver: StreamReceiver) -> None:
        if self._upgraded.rest:
            receiver.dockerDataReceived(self._upgraded.rest)
        self._upgraded.hand_over(_ToReceiver(receiver))


def inspect_exec(docker: Any, target: ConsoleTarget) -> "Deferred[ConsoleTarget]":
    """``GET /exec/{id}/json`` through the project's Docker client (``get_json``): a
    missing exec is refused before any upgrade, and a tty exec gets its hangup bytes."""

    def checked(answer: tuple[int, Any]) -> ConsoleTarget:
        code, document = answer
        if code != 200 or not isinstance(document, dict):
            raise refusal(target, code, b"", json.dumps(document).encode())
        return hangup_for(target, document)

    def unreachable(failure: Failure) -> None:
        if failure.check(AgentError):
            failure.raiseException()
        raise AgentError(502, "Unable to inspect the exec instance via the Docker socket",
                         failure.getErrorMessage())

    return docker.get_json(f"/exec/{target.id}/json").addCallback(checked).addErrback(unreachable)


def console_opener(docker: DockerClient) -> Callable[[ConsoleTarget], "Deferred[DockerStream]"]:
    """How the console resources open Docker's side (wired in tap.py, with the agent's one
    Docker client): exec instances are inspected first (:func:`inspect_exec`), then the
    stream is upgraded (:func:`open_docker_stream`, on a fresh connection of the same client)."""

    def open_stream(target: ConsoleTarget) -> "Deferred[DockerStream]":
        if target.kind != "exec":
            return open_docker_stream(docker, target)
        return inspect_exec(docker, target).addCallback(lambda t: open_docker_stream(docker, t))

    return open_stream


def open_docker_stream(docker: DockerClient, target: ConsoleTarget) -> "Deferred[DockerStream]":
    """Ask Docker for ``target``'s stream (:meth:`DockerClient.upgrade`: a new connection
    to the socket, which never goes back to the pool).

    Fires with a :class:`DockerStream` on ``101``; fails with an :class:`AgentError`
    (Docker's refusal, or 502 when the socket is unreachable). Cancelling it aborts the
    Docker connection (the client left first)."""
    path, body = target.request_line()
    pending = docker.upgrade(b"POST", path, UPGRADE_HEADERS, body)
    result: Deferred[DockerStream] = Deferred(lambda _: pending.cancel())

    def answered(answer: Any) -> Any:
        if isinstance(answer, Upgraded):
            if result.called:  # cancelled meanwhile
                answer.transport.abortConnection()
            else:
                result.callback(DockerStream(answer.transport, target, answer))
            return None

        def refused(data: bytes) -> None:
            if not result.called:
                result.errback(Failure(refusal(target, answer.code, answer.phrase, data)))

        return read_whole_body(answer, source="Docker").addCallback(refused)

    def failed(failure: Failure) -> None:
        if not result.called and not failure.check(CancelledError):
            result.errback(Failure(bad_gateway_docker(docker.label, failure_reason(failure))))

    pending.addCallbacks(answered, failed).addErrback(failed)
    return result
