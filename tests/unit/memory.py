"""In-memory HTTP for the unit tests: a fake Docker, the agent root in front of it,
and a raw-wire client for assertions that need the exact bytes on the wire.

Nothing here opens a socket or needs a running reactor: the client side is
``treq.testing.StubTreq`` (or a ``StringTransport`` on the agent's real ``AgentSite``),
the proxy's upstream is the real Docker client connected in memory to the fake Docker
(``portainer_agent.docker.testing.MemoryDocker``), and spooled request bodies are
produced by a ``Cooperator`` driven by a ``task.Clock``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, cast

import attrs
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.docker.testing import MemoryDocker
from portainer_agent.http.site import AgentSite
from portainer_agent.http.request import AgentRequests
from portainer_agent.proxy.local import DockerProxy
from portainer_agent.http.root import AgentRoot
from portainer_agent.proxy.dispatch import Destinations

SOCKET = "/fake.sock"


@attrs.frozen
class Seen:
    """A request as the fake Docker received it."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> list[bytes] | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else list(values)


def json_answer(request: Request) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"api-version", b"1.41")
    return b'[{"Id":"abc"}]'


class FakeDocker(Resource):
    """Records every request; answers with ``handler(request)`` (bytes or NOT_DONE_YET)."""

    isLeaf = True

    def __init__(self, handler: Callable[[Request], Any] = json_answer) -> None:
        super().__init__()
        self.handler = handler
        self.seen: list[Seen] = []
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        content = request.content
        body = content.read() if content is not None else b""
        self.seen.append(Seen(request.method, request.uri, request.requestHeaders.copy(), body))
        result = self.handler(request)
        if result is NOT_DONE_YET:
            self.pending.append(request)
        return result


class RecordingHandler:
    """Stands in for the hijack proxy or an agent endpoint."""

    def __init__(self, body: bytes = b"handled") -> None:
        self.requests: list[Request] = []
        self._body = body

    def render(self, request: Request, route: Any = None) -> bytes:
        self.requests.append(request)
        return self._body


class Memory:
    """The agent root over a fake Docker, all in memory."""

    def __init__(self, docker: FakeDocker | None = None, upstream: Any = None, guard: Any = None,
                 hijack: Any = None, endpoints: dict[bytes, Any] | None = None) -> None:
        self.clock = Clock()
        self.cooperator = Cooperator(scheduler=lambda work: self.clock.callLater(0, work), started=True)
        self.docker = docker if docker is not None else FakeDocker()
        self.upstream: Any = upstream if upstream is not None else MemoryDocker(self.docker, self.clock)
        self.hijack: Any = hijack if hijack is not None else RecordingHandler(b"hijacked")
        self.root = AgentRoot(
            Destinations(DockerProxy(cast(Any, self.upstream), SOCKET, cooperator=self.cooperator), self.hijack),
            guard=guard,
            endpoints=endpoints,
        )
        self.client: Any = StubTreq(self.root)

    def stop(self) -> None:
        self.cooperator.stop()

    def pump(self, rounds: int = 30) -> None:
        """Move bytes client <-> agent <-> fake Docker and run body producers until quiet."""
        for _ in range(rounds):
            self.client.flush()
            self.clock.advance(0)
            flush = getattr(self.upstream, "flush", None)
            if flush is not None:
                flush()
        self.client.flush()

    def raw(self, request: bytes) -> "Wire":
        """Send raw request bytes to the agent's Site; return what reached the wire."""
        site = AgentSite(self.root, AgentRequests(self.root.router, self.root.guard), reactor=Clock())
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(request)
        self.pump()
        return Wire(transport, protocol)


@attrs.define
class Wire:
    transport: Any  # a StringTransport
    #: The agent's HTTP channel on this connection (the transport's protocol).
    protocol: Any = None

    @property
    def data(self) -> bytes:
        """Everything the agent wrote to the client connection."""
        value: bytes = self.transport.value()
        return value

    def head(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        head, _, _ = self.data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        return lines[0], headers

    def status(self) -> bytes:
        return self.head()[0]

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.head()[1] if key == name.lower()]

    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]


def raw_request(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (), body: bytes = b"") -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, target), b"Host: agent"]
    lines += [name + b": " + value for name, value in headers]
    if body or method in (b"POST", b"PUT"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class HeldOpen(Resource):
    """Holds requests open (NOT_DONE_YET), so tests can look at them mid-flight: every
    request, or with ``paths`` only those (like ``logs -f``; the rest answer ``ok`` at once).
    A held request first writes ``first`` (nothing by default)."""

    isLeaf = True

    def __init__(self, paths: "set[bytes] | None" = None, first: bytes = b"") -> None:
        super().__init__()
        self._paths = paths
        self._first = first
        #: Every request rendered, held or not.
        self.requests: list[Request] = []
        #: The requests held open.
        self.held: list[Request] = []
        #: (channel, body) as render saw them (a finished request drops both).
        self.seen: list[tuple[Any, bytes]] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        self.seen.append((request.channel, request.content.read() if request.content else b""))
        if self._paths is not None and request.path not in self._paths:
            return b"ok"
        if self._first:
            request.write(self._first)
        self.held.append(request)
        return NOT_DONE_YET
