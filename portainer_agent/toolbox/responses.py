"""Writing agent-made responses (JSON, errors, empty) onto a twisted.web request."""
from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.errors import AgentError
from portainer_agent.toolbox.twisted_private import client_gone


def write_json(request: Request, value: Any, status: int = 200) -> bytes:
    """Set status and JSON content type; return the body for ``render`` to return."""
    body = json.dumps(value).encode() + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return b"" if request.method == b"HEAD" else body


def write_error(request: Request, error: AgentError) -> bytes:
    """Docker-style JSON error (``{"message", "details"}``) for ``render`` to return."""
    body = error.body()
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    # HEAD: the length of the body a GET would get, and no body.
    return b"" if request.method == b"HEAD" else body


def finish_with_error(request: Request, error: AgentError) -> None:
    """Like :func:`write_error`, for an asynchronous (NOT_DONE_YET) request."""
    if client_gone(request) or request.finished:
        return
    if request.startedWriting:
        # Headers already went out: all we can do is cut the response short.
        abort_client(request)
        return
    body = write_error(request, error)
    request.write(body)
    request.finish()


def abort_client(request: Request) -> None:
    """Cut the client's connection at once (no clean end for a response under way)."""
    transport = request.channel.transport if request.channel else None
    if transport is not None:
        # The API is served over TCP (TLS or not): the channel's transport is an
        # ITCPTransport, though HTTPChannel declares only ITransport.
        cast(ITCPTransport, transport).abortConnection()


def write_empty(request: Request, status: int = 204) -> Any:
    """An empty answer. Finished here rather than by returning ``b""``, because
    twisted.web would add ``Content-Length: 0``, which a 204 must not carry."""
    request.setResponseCode(status)
    request.write(b"")
    request.finish()
    return NOT_DONE_YET
