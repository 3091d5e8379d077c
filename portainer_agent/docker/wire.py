"""HTTP/1.1 on the wire to Docker (or a peer agent): request heads out, responses in.

Pure: bytes in, events out; no reactor, no sockets, so the same code serves the
asynchronous client (:mod:`portainer_agent.docker.client` and its connections), the
blocking start-up reader (:mod:`portainer_agent.docker.blocking`), and the hijack splice.

Responses are parsed by llhttp (Node.js's parser) through ``httptools``: status line,
headers, length-delimited, chunked (trailers included) and close-delimited bodies, and
``101`` with the bytes that follow its head. Measured on this machine against h11 (the
pure-Python alternative), one whole response including its parser set-up: ``/_ping``
1.4 µs vs 64 µs, a 20 kB JSON body 2.7 µs vs 63 µs, 5 chunks 3.5 µs vs 64 µs
(``bench/parsers.py``). At a few hundred µs of CPU per proxied request, h11 alone
would have cost ~15%.
"""
from __future__ import annotations

import re
from typing import Protocol, Sequence

import httptools

#: The ``Host`` the agent sends Docker; the socket path decides where it goes.
DOCKER_HOST = b"docker"

#: Bytes per read of the Docker socket (Twisted's default is 64 kB): big bodies cross
#: the parser, the relay and TLS in a quarter of the slices (-19% CPU per GB exported).
#: The asynchronous connections and the blocking start-up reader both use it.
READ_SIZE = 256 * 1024

#: RFC 9110 token (method) and request-target without controls or spaces.
_METHOD = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"\A[\x21-\x7e\x80-\xff]+\Z")

#: 1xx answers that precede the real one (101 is the final answer of an upgrade).
_INTERIM = frozenset({100, 102, 103})

Headers = Sequence[tuple[bytes, bytes]]


class ProtocolError(Exception):
    """The upstream's bytes are not an HTTP/1.1 response."""


def check_request_line(method: bytes, target: bytes) -> None:
    """Raise ValueError for a method or target that cannot go on the wire as is
    (control characters, spaces): the caller answers the client 400."""
    if not _METHOD.match(method):
        raise ValueError(f"invalid HTTP method {method[:40]!r}")
    if not _TARGET.match(target):
        raise ValueError(f"invalid request target {target[:80]!r}")


def request_head(method: bytes, target: bytes, host: bytes, headers: Headers, framing: bytes = b"") -> bytes:
    """Pure: the request head, ``framing`` (``Content-Length: n\\r\\n`` or
    ``Transfer-Encoding: chunked\\r\\n``, or nothing) after the given headers."""
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (framing, b"\r\n")
    return b"".join(parts)


def content_length(length: int) -> bytes:
    return b"Content-Length: %d\r\n" % length


CHUNKED = b"Transfer-Encoding: chunked\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: an empty chunk ends the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


class ResponseSink(Protocol):
    """Receives the events of one response, in order: ``head``, then ``body`` any number
    of times and ``end``, or ``upgraded`` after a 101's head."""

    def head(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None: ...

    def body(self, data: bytes) -> None: ...

    def end(self, trailers: list[tuple[bytes, bytes]]) -> None: ...

    def upgraded(self, rest: bytes) -> None: ...


class ResponseReader:
    """One HTTP/1.1 response, fed as bytes arrive; events go to a :class:`ResponseSink`.

    ``head_only`` for the answer to ``HEAD``: its framing headers describe a body that
    is not sent, so the response ends with its head. A close-delimited body (no length,
    not chunked) ends when the connection does: call :meth:`eof`.
    """

    __slots__ = ("_sink", "_parser", "_phrase", "_headers", "_trailers", "_in_body", "_head_only", "done",
                 "upgrade", "_code", "_framed", "_seen")

    def __init__(self, sink: ResponseSink, head_only: bool = False) -> None:
        self._head_only = False
        self._parser = httptools.HttpResponseParser(self)
        self.reset(sink, head_only)

    def reset(self, sink: ResponseSink, head_only: bool = False) -> None:
        """Read the next response on the same connection (a kept-alive one): llhttp
        goes on from where the last response ended, which saves building a parser per
        request (~20% of the client's work for a small answer). After the answer to a
        HEAD, whose head announced a body that never came, a fresh parser is needed."""
        if self._head_only:
            self._parser = httptools.HttpResponseParser(self)
        self._sink = sink
        self._phrase = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._in_body = False
        self._head_only = head_only
        self._code = 0
        self._framed = True
        #: Bytes fed while the head is incomplete (for a 101 without upgrade headers).
        self._seen: list[bytes] = []
        #: The response has ended (its ``end`` or ``upgraded`` event was sent).
        self.done = False
        #: The response was a 101: the bytes after its head belong to another protocol.
        self.upgrade = False

    @property
    def started(self) -> bool:
        """The status line and headers are in (``head`` was sent)."""
        return self._in_body or self.done

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raise :class:`ProtocolError` for bytes that are not HTTP."""
        if self.done:
            return
        if not self._in_body:
            self._seen.append(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if not self.done:
                self.done = True
                self.upgrade = True
                self._sink.upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as error:
            # An exception in our own callbacks (the sink's): not the upstream's fault.
            cause = error.__context__
            if cause is not None:
                raise cause
            raise
        except httptools.HttpParserError as error:
            if self._code == 101 and not self.done:
                # A 101 without ``Upgrade``/``Connection`` headers: llhttp pauses without
                # an offset; the rest starts after the head's blank line.
                seen = b"".join(self._seen)
                self.done = True
                self.upgrade = True
                self._sink.upgraded(seen[seen.index(b"\r\n\r\n") + 4:])
                return
            if not self.done:
                raise ProtocolError(str(error)) from None
        finally:
            if self._in_body:
                self._seen = []

    def eof(self) -> bool:
        """The connection ended: True if that ends this response properly (a
        close-delimited body); False if the response was cut short."""
        if self.done:
            return True
        if self._in_body and not self._framed:
            self.done = True
            self._sink.end([])
            return True
        return False

    # httptools callbacks (llhttp events)

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_body:
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        code = parser.get_status_code()
        if code in _INTERIM:
            self._phrase = b""
            self._headers = []
            return
        self._code = code
        self._in_body = True
        headers = self._headers
        framed = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                framed = True
                break
        self._framed = framed or code in (204, 304) or code < 200
        self._sink.head(code, self._phrase, headers, parser.should_keep_alive() and self._framed)
        if self._head_only and code != 101:
            self.done = True
            self._sink.end([])

    def on_body(self, data: bytes) -> None:
        if not self.done:
            self._sink.body(data)

    def on_message_complete(self) -> None:
        if not self._in_body or self.done:
            return
        if self._code == 101:
            return  # the parser raises HttpParserUpgrade next, with the offset of the rest
        self.done = True
        self._sink.end(self._trailers)
