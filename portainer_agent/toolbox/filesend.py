"""Sending an open file as an HTTP response, as Go's ``http.ServeContent`` does:
``Content-Length``, ``Content-Type``, ``Last-Modified``, ``Accept-Ranges: bytes``, one
``Range`` (206/416) and ``If-Modified-Since`` (304). Streamed by a push producer, at
most :data:`CHUNK` bytes in memory; never more than the announced length, even when
the file changes underneath. The file is read in the disk thread pool
(:mod:`portainer_agent.fs.pool`), a chunk at a time: a read from the page cache is
cheap, but one from a slow or hung disk would hold every other request.
"""
from __future__ import annotations

import mimetypes
import os
import re
from typing import Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request
from zope.interface import implementer

from portainer_agent.toolbox.twisted_private import client_gone
from portainer_agent.fs.pool import RunInPool
from portainer_agent.toolbox.responses import abort_client

log = Logger()

CHUNK = 256 * 1024
_RANGE = re.compile(rb"^bytes=\s*(\d*)\s*-\s*(\d*)\s*$")


class RangeNotSatisfiable(Exception):
    """The single range asked for starts beyond the end of the file."""


@attrs.frozen
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: bytes | None, size: int) -> ByteRange | None:
    """Pure: one ``Range`` header -> the range to send, or None for the whole file.

    Multiple ranges and malformed headers are ignored (the whole file, which RFC 9110
    allows); a range starting at or after the end raises :class:`RangeNotSatisfiable`."""
    if header is None or size == 0:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        count = int(last)
        if count == 0:
            raise RangeNotSatisfiable()
        return ByteRange(max(0, size - count), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size:
        raise RangeNotSatisfiable()
    if end < start:
        return None
    return ByteRange(start, min(end, size - 1))


def content_type(name: str, head: bytes) -> bytes:
    """Pure: from the extension, else a sniff of the first bytes (text or binary)."""
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    if guessed and not encoding:
        return guessed.encode() + (b"; charset=utf-8" if guessed.startswith("text/") else b"")
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return b"text/plain; charset=utf-8"
        except UnicodeDecodeError as error:
            if error.start >= len(head) - 3:  # a character cut by the sniff window
                return b"text/plain; charset=utf-8"
    return b"application/octet-stream"


#: ``read(offset, count)``: up to ``count`` bytes from ``offset`` (fewer only at the end).
Read = Callable[[int, int], "Deferred[bytes]"]


@implementer(IPushProducer)
class RangeProducer:
    """Writes ``length`` bytes from ``offset`` of a source to the request, then finishes
    it. A push producer: it writes until the transport pauses it (its buffer is full) and
    goes on when resumed, so at most a chunk or two is buffered.

    The source is read through ``read`` (for a file: ``os.pread`` in the disk thread pool,
    so a slow disk never holds the reactor), one chunk at a time; ``close`` is called once,
    when nothing reads any more. A source that came up short (a file that shrank
    meanwhile) cuts the connection: the length was promised; one that grew is sent up to
    the promised length."""

    def __init__(self, request: Request, read: Read, offset: int, length: int, close: Callable[[], None] = lambda: None,
                 chunk: int = CHUNK) -> None:
        self._request: Request | None = request
        self._read = read
        self._close_source: Callable[[], None] | None = close
        self._offset = offset
        self._remaining = length
        self._chunk = chunk
        self._paused = False
        self._producing = False
        self._reading = False

    def start(self) -> None:
        assert self._request is not None
        self._request.registerProducer(self, True)
        self._produce()

    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        self._produce()

    def _produce(self) -> None:
        if self._producing:
            return  # resumed from inside our own write (or read): the loop below goes on
        self._producing = True
        try:
            while self._request is not None and not self._paused and not self._reading:
                request = self._request
                if self._remaining == 0:
                    self._stop()
                    request.unregisterProducer()
                    if not client_gone(request) and not request.finished:
                        request.finish()
                    return
                self._reading = True
                # A synchronous source answers at once (the loop goes on); a pool read
                # answers later, from the reactor thread (``_got`` goes on).
                self._read(self._offset, min(self._chunk, self._remaining)).addCallbacks(self._got, self._failed)
        finally:
            self._producing = False

    def _got(self, data: bytes) -> None:
        self._reading = False
        request = self._request
        if request is None:  # stopped while reading
            self._close()
            return
        if not data:
            self._stop()
            request.unregisterProducer()
            abort_client(request)
            return
        self._offset += len(data)
        self._remaining -= len(data)
        request.write(data)
        self._produce()

    def _failed(self, failure: Failure) -> None:
        self._reading = False
        request = self._request
        log.warn("reading a file for a download failed: {error}", error=failure.getErrorMessage())
        self._stop()
        if request is not None:
            request.unregisterProducer()
            abort_client(request)

    def stopProducing(self) -> None:  # noqa: N802
        self._stop()

    def _stop(self) -> None:
        self._request = None
        if not self._reading:  # else closed when the read in flight is back
            self._close()

    def _close(self) -> None:
        close, self._close_source = self._close_source, None
        if close is not None:
            close()


def file_reader(fd: int, run: RunInPool) -> tuple[Read, Callable[[], None]]:
    """(read, close) for an open file (owned): reads and the close run in the pool."""
    def read(offset: int, count: int) -> "Deferred[bytes]":
        return run(os.pread, fd, count, offset)

    def close() -> None:
        run(os.close, fd).addErrback(lambda _: os.close(fd))  # inline when the pool is stopped

    return read, close


def bytes_reader(data: bytes) -> Read:
    """A ``read`` over bytes already in memory (an answer made in the pool)."""
    view = memoryview(data)
    return lambda offset, count: succeed(bytes(view[offset:offset + count]))


def send_bytes(request: Request, body: bytes, kind: bytes) -> None:
    """Answer ``request`` (already NOT_DONE_YET) with ``body``, written in chunks as the
    client reads (a large answer is never one huge write on the reactor)."""
    request.setHeader(b"content-type", kind)
    request.setHeader(b"content-length", b"%d" % len(body))
    if client_gone(request) or request.finished:
        return
    if request.method == b"HEAD" or not body:
        request.write(b"")
        request.finish()
        return
    RangeProducer(request, bytes_reader(body), 0, len(body)).start()


def send_file(request: Request, fd: int, size: int, mtime: float, name: str, head: bytes, run: RunInPool) -> None:
    """Answer ``request`` (already NOT_DONE_YET) with the file open at ``fd`` (owned),
    whose first bytes are ``head`` (for the content type, read with the open)."""
    read, close = file_reader(fd, run)
    request.setHeader(b"accept-ranges", b"bytes")
    request.setHeader(b"content-type", content_type(name, head))
    modified = int(mtime)
    if request.setLastModified(modified) == http.CACHED:
        return _finish_empty(request, close)
    try:
        wanted = None
        if_range = request.getHeader(b"if-range")
        if if_range is None or if_range.strip() == http.datetimeToString(modified):
            wanted = parse_range(request.getHeader(b"range"), size)
    except RangeNotSatisfiable:
        request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
        request.setHeader(b"content-range", b"bytes */%d" % size)
        request.setHeader(b"content-length", b"0")
        return _finish_empty(request, close)
    if wanted is None:
        offset, length = 0, size
    else:
        offset, length = wanted.start, wanted.length
        request.setResponseCode(http.PARTIAL_CONTENT)
        request.setHeader(b"content-range", b"bytes %d-%d/%d" % (wanted.start, wanted.end, size))
    request.setHeader(b"content-length", b"%d" % length)
    if request.method == b"HEAD" or length == 0:
        return _finish_empty(request, close)
    RangeProducer(request, read, offset, length, close).start()


def _finish_empty(request: Request, close: Callable[[], None]) -> None:
    close()
    if not client_gone(request) and not request.finished:
        request.finish()
