"""A response from Docker as it streams in: ``IResponse`` over one connection's flow control.

The relay (:mod:`portainer_agent.proxy.relay`) and treq read the client's responses through
``IResponse`` (``code``, ``phrase``, ``headers``, ``length``, ``deliverBody``). Here that
interface is a thin view of the connection (:mod:`portainer_agent.docker.connection`): the
body goes to the reader's protocol as it arrives, and its transport pauses, resumes or drops
the socket, so a slow client slows Docker down and nothing is buffered beyond one read.
The raw header list is kept as received (``raw_headers``) so the relay copies it once,
filtered; ``headers`` is built only when someone asks.

A whole (small) answer, for the agent's own questions to Docker (identity, volumes, exec
inspection), is read by the one body reader, :mod:`portainer_agent.toolbox.whole_body`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

if TYPE_CHECKING:
    from portainer_agent.docker.connection import Connection

__all__ = ["RESPONSE_DONE", "DockerResponse"]


#: One Failure for every normal end of a body: building one per response costs more than
#: the rest of the end-of-response work (body protocols only ``check`` it).
RESPONSE_DONE = Failure(ResponseDone())


class DockerResponse:
    """A response from the client: what ``IResponse`` offers (``code``, ``phrase``,
    ``headers``, ``length``, ``deliverBody``) plus ``raw_headers`` as received."""

    version = (b"HTTP", 1, 1)
    previousResponse = None
    request = None

    def __init__(self, code: int, phrase: bytes, raw_headers: list[tuple[bytes, bytes]],
                 connection: "Connection") -> None:
        self.code = code
        self.phrase = phrase
        self.raw_headers = raw_headers
        self.trailers: list[tuple[bytes, bytes]] = []
        self._connection = connection
        self._headers: Headers | None = None
        length: Any = UNKNOWN_LENGTH
        if code in (204, 304):
            length = 0
        else:
            for name, value in raw_headers:
                if name.lower() == b"content-length" and value.isdigit():
                    length = int(value)
        self.length = length
        self._protocol: IProtocol | None = None
        self._buffer: list[bytes] = []
        self._ended: Failure | None = None
        self._held = False

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            headers = Headers()
            for name, value in self.raw_headers:
                headers.addRawHeader(name, value)
            self._headers = headers
        return self._headers

    def setPreviousResponse(self, response: Any) -> None:  # noqa: N802 (IResponse)
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:  # noqa: N802 (IResponse)
        """Give the body to ``protocol``: its transport pauses/resumes/stops the socket."""
        if self._protocol is not None:
            raise RuntimeError("the body of a response can be delivered once")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self._connection))  # type: ignore[arg-type]
        buffered, self._buffer = self._buffer, []
        for data in buffered:
            protocol.dataReceived(data)
        if self._held:
            self._held = False
            self._connection.resume()
        if self._ended is not None:
            protocol.connectionLost(self._ended)

    # from the exchange

    def _data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
            return
        # Nobody reads yet: hold the bytes and stop reading the socket.
        self._buffer.append(data)
        if not self._held:
            self._held = True
            self._connection.pause()

    def _end(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        if self._protocol is not None:
            self._protocol.connectionLost(reason)


@implementer(IPushProducer)
class _BodyTransport:
    """The transport a body protocol sees: flow control of the Docker socket."""

    def __init__(self, connection: "Connection") -> None:
        self._connection = connection

    def pauseProducing(self) -> None:  # noqa: N802
        self._connection.pause()

    def resumeProducing(self) -> None:  # noqa: N802
        self._connection.resume()

    def stopProducing(self) -> None:  # noqa: N802
        """The reader is gone (client left an endless stream): drop the connection."""
        self._connection.abort()
