"""What goes upstream from a client request: its end-to-end headers and its body.

Shared by every upstream (the local Docker socket, a peer agent, each leg of a fan-out),
so a request is copied the same way wherever it goes; each call makes an independent copy
(headers, body producer), so concurrent legs never share state.
"""
from __future__ import annotations

import os
from typing import Any

from twisted.internet import task
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.server import Request

from portainer_agent.toolbox.paths import forwardable_request_headers
from portainer_agent.toolbox.upload import BufferedBody, body_producer

#: Spooled bodies below this size are copied to memory and written with the head.
SMALL_BODY = 64 * 1024


def request_body_producer(request: Request, cooperator: Any = task) -> IBodyProducer | None:
    """A producer for the request's body, or None when it has none.

    A body that streams as it arrives (:mod:`portainer_agent.toolbox.upload`) can be sent
    once: calling this again gives a producer that sends it only if no byte went to an
    earlier one (a failover after a refused connection), and fails with
    ``BodyAlreadyConsumed`` otherwise. Bodies read whole before ``render`` (small, or
    not for an upstream) can be sent any number of times.
    """
    streamed = body_producer(request)
    if streamed is not None:
        return streamed
    content = request.content
    if content is None:
        return None
    content.seek(0, os.SEEK_END)
    size = content.tell()
    content.seek(0)
    if size == 0:
        headers = request.requestHeaders
        if not (headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")):
            return None
    # The producer gets its own copy or file handle: twisted.web closes
    # ``request.content`` when the client request finishes, which can happen before
    # the upload is read (Docker answering early, e.g. with an error).
    if size < SMALL_BODY or not hasattr(content, "fileno"):
        return BufferedBody(content.read())
    own = os.fdopen(os.dup(content.fileno()), "rb")
    own.seek(0)
    return FileBodyProducer(own, cooperator=cooperator)


def upstream_header_lines(request: Request, extra: dict[bytes, bytes | None] | None = None
                          ) -> list[tuple[bytes, bytes]]:
    """The request's end-to-end headers as ``(name, value)`` lines, then ``extra``, whose
    names replace the client's (the target header set for a peer, say; a None value
    removes the client's header and adds none)."""
    raw = request.requestHeaders
    replaced = {name.lower() for name in (extra or {})}
    lines = [
        (name, value)
        for name, values in forwardable_request_headers(raw.getAllRawHeaders(), raw.getRawHeaders(b"connection", []))
        if name.lower() not in replaced
        for value in values
    ]
    if extra:
        lines += [(name, value) for name, value in extra.items() if value is not None]
    return lines


def upstream_headers(request: Request, extra: dict[bytes, bytes | None] | None = None) -> Headers:
    """:func:`upstream_header_lines` as a ``Headers`` (for ``twisted.web.client.Agent``)."""
    headers = Headers()
    for name, value in upstream_header_lines(request, extra):
        headers.addRawHeader(name, value)
    return headers
