"""The agent's HTTP channel: one client connection, before any request is routed.

Why its own class: the agent is exposed on the Swarm network, so the connection level
needs rules twisted.web does not have (a deadline for the request head; Twisted's
idle timeout is reset by every byte, so alone it never cuts a client that drips
header bytes), explicit head limits, and agent-style answers to the requests
twisted.web's parser refuses itself.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from portainer_agent.errors import AgentError
from portainer_agent.http.root import AGENT_HEADERS
from portainer_agent.toolbox.twisted_private import RefusalHookChannel, answering, head_received

log = Logger()


#: Limits on a request head; above them the agent answers 414 or 431 and closes.
MAX_LINE_LENGTH = 16384  # the request line, and each header line
MAX_HEAD_SIZE = 32768  # the request line plus all headers
MAX_HEADERS = 100


def refusal_response(status: int, message: str, details: str) -> bytes:
    """A complete HTTP/1.1 answer for a request the parser refused: agent headers,
    Docker-style JSON, ``Connection: close``."""
    body = AgentError(status, message, details).body()
    head = [b"HTTP/1.1 %d %s" % (status, http.RESPONSES.get(status, b"Error")),
            b"Content-Type: application/json", b"Content-Length: %d" % len(body), b"Connection: close",
            b"Date: " + http.datetimeToString()]
    head += [name + b": " + value for name, value in AGENT_HEADERS]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class AgentHTTPChannel(RefusalHookChannel):
    """HTTPChannel with the agent's limits and its own answer to a refused request.

    * A request the parser refuses (a malformed request line or header, both
      ``Content-Length`` and ``Transfer-Encoding``, two ``Content-Length`` values, a bare
      LF...) gets a Docker-style JSON 400 with the agent headers, not Twisted's bare
      28-byte ``400 Bad Request``; an over-long request line a 414, too many or too
      large headers a 431; then the connection closes.
    * An over-long line actually closes: Twisted's default
      (``LineReceiver.lineLengthExceeded``) calls ``transport.loseConnection()`` while
      the channel is still the transport's registered producer, which over TLS defers
      the shutdown forever.
    * The request head must complete within ``head_timeout`` of its first byte.

    Every parser refusal comes to :meth:`refuse_bad_request` (the private Twisted method
    behind it is hooked in :mod:`portainer_agent.toolbox.twisted_private`).
    """

    MAX_LENGTH = MAX_LINE_LENGTH
    totalHeadersSize = MAX_HEAD_SIZE
    maxHeaders = MAX_HEADERS

    closed = False
    #: Seconds a request line and its headers may take from their first byte (None: no limit).
    head_timeout: float | None = None
    #: Called with a reason when a deadline cuts the connection (metrics).
    on_cut: Callable[[str], None] | None = None
    _awaiting_head = True
    _head_timer: Any = None
    #: Why the next refusal happens, when the parser would only say "bad request".
    _refusal: tuple[int, str, str] | None = None
    _line_count = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        # Read the client's TCP connection 256 kB at a time (Twisted's default: 64 kB), as
        # the Docker socket is: an upload then crosses TLS, the channel and the Docker
        # client in a quarter of the slices (measured: -22% CPU per GB uploaded, +25%
        # upload throughput, bench/README.md). ``transport.transport`` is the TCP
        # connection under TLS; ``bufferSize`` is public on it.
        inner = getattr(self.transport, "transport", None)
        if inner is not None and hasattr(inner, "bufferSize"):
            inner.bufferSize = 256 * 1024
        # Answers go out as the head then the body (the head is flushed early for streams):
        # without TCP_NODELAY the body's last small segment can wait for the client's ACK.
        if inner is not None and hasattr(inner, "setTcpNoDelay"):
            inner.setTcpNoDelay(True)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._line_count == 0:
            self._refusal = (414, "Request-URI Too Long",
                             f"the request line is longer than {self.MAX_LENGTH} bytes")
        else:
            self._refusal = (431, "Request Header Fields Too Large",
                             f"a header line is longer than {self.MAX_LENGTH} bytes")
        self.refuse_bad_request()

    def lineReceived(self, line: bytes) -> None:
        if head_received(self)[0] + len(line) > self.totalHeadersSize:
            self._refusal = (431, "Request Header Fields Too Large",
                             f"the request head is larger than {self.totalHeadersSize} bytes")
        self._line_count += 1
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if head_received(self)[1] >= self.maxHeaders:
            self._refusal = (431, "Request Header Fields Too Large", f"more than {self.maxHeaders} headers")
        return super().headerReceived(line)

    def refuse_bad_request(self) -> None:
        status, message, details = self._refusal or (
            400, "Bad request", "the request could not be parsed: malformed request line or header, or "
                                "conflicting Content-Length/Transfer-Encoding")
        if self.transport is not None and not self.closed:
            self.transport.write(refusal_response(status, message, details))
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        # The head deadline starts with the first byte of a request (an idle kept-alive
        # connection is the idle timeout's business) and ends with its last header.
        # A request being handled (a stream such as ``logs -f``) is never timed here.
        if self._awaiting_head and self._head_timer is None and self.head_timeout and not answering(self):
            self._head_timer = self.callLater(self.head_timeout, self._head_timed_out)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._line_count = 0
        self._cancel_head_timer()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        self._awaiting_head = True  # before super(): it may parse a pipelined head at once
        super().requestDone(request)

    def _cancel_head_timer(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.closed or self.transport is None:
            return
        log.debug("cut a connection whose request head took over {timeout}s", timeout=self.head_timeout)
        if self.on_cut is not None:
            self.on_cut("header_timeout")
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._cancel_head_timer()
        super().connectionLost(reason)
