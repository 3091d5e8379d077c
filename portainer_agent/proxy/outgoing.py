"""What goes upstream from a client request: its end-to-end headers and its body.

Shared by every upstream (the local Docker socket, a peer agent, each leg of a fan-out),
so a request is copied the same way wherever it goes; each call makes an independent copy
(headers object, body file handle), so concurrent legs never share state.
"""
from __future__ import annotations

import io
import os
from typing import Any, Iterable

from twisted.internet import task
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from portainer_agent.http.paths import forwardable_request_headers


def request_body_producer(request: Request, cooperator: Any = task) -> FileBodyProducer | None:
    """A producer for the spooled request body, or None when there is no body."""
    content = request.content
    if content is None:
        return None
    content.seek(0, os.SEEK_END)
    size = content.tell()
    content.seek(0)
    has_body_header = request.requestHeaders.hasHeader(b"content-length") or request.requestHeaders.hasHeader(
        b"transfer-encoding"
    )
    if size == 0 and not has_body_header:
        return None
    # The producer gets its own file object: twisted.web closes ``request.content``
    # when the client request finishes, which can happen before the upload is read
    # (Docker answering early, e.g. with an error).
    if size < 100_000 or not hasattr(content, "fileno"):
        own: Any = io.BytesIO(content.read())
    else:
        own = os.fdopen(os.dup(content.fileno()), "rb")
        own.seek(0)
    return FileBodyProducer(own, cooperator=cooperator)


def upstream_headers(request: Request, extra: dict[bytes, bytes] | None = None) -> Headers:
    raw = request.requestHeaders
    headers = Headers()
    for name, values in forwardable_request_headers(raw.getAllRawHeaders(), raw.getRawHeaders(b"connection", [])):
        headers.setRawHeaders(name, values)
    for name, value in (extra or {}).items():
        headers.setRawHeaders(name, [value])
    return headers
