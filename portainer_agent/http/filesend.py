"""Sending an open file as an HTTP response, as Go's ``http.ServeContent`` does:
``Content-Length``, ``Content-Type``, ``Last-Modified``, ``Accept-Ranges: bytes``, one
``Range`` (206/416) and ``If-Modified-Since`` (304). Streamed by a push producer, at
most :data:`CHUNK` bytes in memory; never more than the announced length, even when
the file changes underneath.
"""
from __future__ import annotations

import mimetypes
import os
import re

import attrs
from twisted.internet.interfaces import IPushProducer
from twisted.web import http
from twisted.web.server import Request
from zope.interface import implementer

from portainer_agent.http.twisted_private import client_gone
from portainer_agent.http.responses import abort_client

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


@implementer(IPushProducer)
class FileRangeProducer:
    """Writes ``length`` bytes of ``fd`` from ``offset`` to the request, then finishes
    it. Owns ``fd``. A push producer: it writes until the transport pauses it (its
    buffer is full) and goes on when resumed, so at most a chunk or two is buffered.
    A file that shrank meanwhile cuts the connection (the length was promised); one
    that grew is sent up to the promised length."""

    def __init__(self, request: Request, fd: int, offset: int, length: int, chunk: int = CHUNK) -> None:
        self._request: Request | None = request
        self._fd = fd
        self._offset = offset
        self._remaining = length
        self._chunk = chunk
        self._paused = False
        self._writing = False

    def start(self) -> None:
        assert self._request is not None
        self._request.registerProducer(self, True)
        self._produce()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._produce()

    def _produce(self) -> None:
        if self._writing:
            return  # resumed from inside our own write: the loop below goes on
        self._writing = True
        try:
            while self._request is not None and not self._paused:
                request = self._request
                if self._remaining == 0:
                    self._close()
                    request.unregisterProducer()
                    if not client_gone(request) and not request.finished:
                        request.finish()
                    return
                data = os.pread(self._fd, min(self._chunk, self._remaining), self._offset)
                if not data:
                    self._close()
                    request.unregisterProducer()
                    abort_client(request)
                    return
                self._offset += len(data)
                self._remaining -= len(data)
                request.write(data)
        finally:
            self._writing = False

    def stopProducing(self) -> None:
        self._close()

    def _close(self) -> None:
        self._request = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _finish_empty(request: Request, fd: int) -> None:
    os.close(fd)
    if not client_gone(request) and not request.finished:
        request.finish()


def send_file(request: Request, fd: int, size: int, mtime: float, name: str) -> None:
    """Answer ``request`` (already NOT_DONE_YET) with the file open at ``fd`` (owned)."""
    request.setHeader(b"accept-ranges", b"bytes")
    request.setHeader(b"content-type", content_type(name, os.pread(fd, 512, 0)))
    modified = int(mtime)
    if request.setLastModified(modified) == http.CACHED:
        return _finish_empty(request, fd)
    try:
        wanted = None
        if_range = request.getHeader(b"if-range")
        if if_range is None or if_range.strip() == http.datetimeToString(modified):
            wanted = parse_range(request.getHeader(b"range"), size)
    except RangeNotSatisfiable:
        request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
        request.setHeader(b"content-range", b"bytes */%d" % size)
        request.setHeader(b"content-length", b"0")
        return _finish_empty(request, fd)
    if wanted is None:
        offset, length = 0, size
    else:
        offset, length = wanted.start, wanted.length
        request.setResponseCode(http.PARTIAL_CONTENT)
        request.setHeader(b"content-range", b"bytes %d-%d/%d" % (wanted.start, wanted.end, size))
    request.setHeader(b"content-length", b"%d" % length)
    if request.method == b"HEAD" or length == 0:
        return _finish_empty(request, fd)
    FileRangeProducer(request, fd, offset, length).start()
