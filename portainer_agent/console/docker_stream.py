"""Docker's side of a console: ``exec start`` or ``attach`` upgraded to a raw stream.

:func:`open_docker_stream` is the one place the console reaches Docker. It rides on the
project's hijack client (:class:`~portainer_agent.proxy.splice.DockerUpgradeClient`
over the unix socket, which parses Docker's answer head), so re-pointing the console at
another Docker client means changing this module only.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import ITCPTransport
from twisted.python.failure import Failure

from portainer_agent.proxy.splice import DockerUpgradeClient, SpliceEnd
from portainer_agent.errors import AgentError, bad_gateway_docker

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
    return (
        b"POST %s HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
        b"Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body)
    )


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


class _ReceiverTransport:
    """What the hijack splice writes Docker's bytes into: the receiver, not a socket."""

    def __init__(self, receiver: StreamReceiver) -> None:
        self._receiver = receiver
        self._ended = False

    def write(self, data: bytes) -> None:
        if not self._ended:
            self._receiver.dockerDataReceived(data)

    def loseConnection(self) -> None:
        if not self._ended:
            self._ended = True
            self._receiver.dockerStreamEnded()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@attrs.define
class DockerStream:
    """An upgraded Docker connection. ``transport`` takes the client's bytes; Docker's
    bytes go to the receiver given to :meth:`start`, which must be called in the same
    reactor turn the Deferred fired in (nothing is buffered meanwhile)."""

    transport: ITCPTransport
    target: ConsoleTarget
    _upstream: DockerUpgradeClient
    _initial: bytes

    def start(self, receiver: StreamReceiver) -> None:
        end = SpliceEnd()
        # Docker's end of stream (EOF or close) ends the console: no half-close.
        end.prefersHalfClose = False
        end.makeConnection(_ReceiverTransport(receiver))  # type: ignore[arg-type]
        end.peer = self._upstream
        self._upstream.peer = end
        if self._initial:
            receiver.dockerDataReceived(self._initial)


def inspect_exec(docker: Any, target: ConsoleTarget) -> "Deferred[ConsoleTarget]":
    """``GET /exec/{id}/json`` through the project's Docker HTTP client (treq): a missing
    exec is refused before any upgrade, and a tty exec gets its hangup bytes."""

    def answered(response: Any) -> Any:
        return response.json().addCallback(checked, response.code)

    def checked(document: Any, code: int) -> ConsoleTarget:
        if code != 200 or not isinstance(document, dict):
            raise refusal(target, code, b"", json.dumps(document).encode())
        return hangup_for(target, document)

    def unreachable(failure: Failure) -> None:
        if failure.check(AgentError):
            failure.raiseException()
        raise AgentError(502, "Unable to inspect the exec instance via the Docker socket",
                         failure.getErrorMessage())

    return docker.get(f"http://docker/exec/{target.id}/json").addCallback(answered).addErrback(unreachable)


def console_opener(reactor: Any, socket_path: str, docker: Any) -> Callable[[ConsoleTarget], "Deferred[DockerStream]"]:
    """How the console resources open Docker's side (wired in tap.py): exec instances
    are inspected first (:func:`inspect_exec`), then the stream is upgraded."""

    def open_stream(target: ConsoleTarget) -> "Deferred[DockerStream]":
        if target.kind != "exec":
            return open_docker_stream(reactor, socket_path, target)
        return inspect_exec(docker, target).addCallback(lambda t: open_docker_stream(reactor, socket_path, t))

    return open_stream


def open_docker_stream(reactor: Any, socket_path: str, target: ConsoleTarget) -> "Deferred[DockerStream]":
    """Connect to the Docker socket and ask for ``target``'s stream.

    Fires with a :class:`DockerStream` on ``101``; fails with an :class:`AgentError`
    (Docker's refusal, or 502 when the socket is unreachable). Cancelling it aborts the
    Docker connection (the client left first)."""
    upstream = DockerUpgradeClient(upgrade_head(target))

    def cancel(_: Deferred[DockerStream]) -> None:
        if upstream.transport is not None:
            upstream.transport.abortConnection()

    result: Deferred[DockerStream] = Deferred(cancel)

    def connectFailed(failure: Failure) -> None:
        if not upstream.status.called:
            upstream.status.errback(failure)

    def answered(status: tuple[int, bytes, list[tuple[bytes, bytes]], bytes, bytes]) -> None:
        code, phrase, _, _, rest = status
        assert upstream.transport is not None  # Docker just answered on it
        if result.called:  # cancelled meanwhile
            upstream.transport.abortConnection()
        elif code == 101:
            result.callback(DockerStream(upstream.transport, target, upstream, rest))
        else:
            upstream.transport.abortConnection()
            result.errback(Failure(refusal(target, code, phrase, rest)))

    def failed(failure: Failure) -> None:
        if not result.called:
            result.errback(Failure(bad_gateway_docker(socket_path, failure.getErrorMessage())))

    connectProtocol(UNIXClientEndpoint(reactor, socket_path, timeout=10), upstream).addErrback(connectFailed)
    upstream.status.addCallbacks(answered, failed)
    return result
