"""The local Docker proxy: any request, streamed to the Docker socket and back.

Request bodies arrive spooled by twisted.web (memory under 100 kB, a temporary file
above) and are streamed upstream with ``FileBodyProducer``; responses are relayed
by :func:`portainer_agent.http.streaming.relay_response`. Docker receives the
client's original path, API version prefix included, so it answers in the client's
API version.
"""
from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import task
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.errors import AgentError, bad_gateway_docker
from portainer_agent.http.paths import forwardable_request_headers
from portainer_agent.http.responses import finish_with_error
from portainer_agent.http.streaming import relay_response

log = Logger()


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


class DockerProxy:
    """Forwards a request to the local Docker engine."""

    def __init__(self, agent: IAgent, socket_path: str, base_url: bytes = b"http://docker", cooperator: Any = task) -> None:
        self._agent = agent
        self._socket_path = socket_path
        self._base_url = base_url
        self._cooperator = cooperator
        # The Host value twisted.web.client.Agent computes from the base URL (scheme
        # default ports left out); given here, DockerSocketAgent skips its URL parsing.
        uri = URI.fromBytes(base_url)
        host = b"[" + uri.host + b"]" if isIPv6Address(uri.host.decode("ascii")) else uri.host
        default_port = (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443))
        self._host = {b"host": host if default_port else b"%b:%d" % (host, uri.port)}

    def render(self, request: Request) -> Any:
        url = self._base_url + request.uri
        try:
            pending = self._agent.request(
                request.method, url, upstream_headers(request, self._host), request_body_producer(request, self._cooperator)
            )
        except ValueError as error:
            # The client library refuses control characters in the method or URI
            # (twisted.web's server lets some through): a client error, not a crash.
            raise AgentError(400, "Invalid request URL or method", str(error)) from None
        # A client that leaves before Docker answers cancels the upstream request;
        # once the response streams, the relay stops the upstream itself.
        request.notifyFinish().addErrback(lambda _: None if pending.called else pending.cancel())
        pending.addCallbacks(self._relay, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        pending.addErrback(self._bug, request)
        return NOT_DONE_YET

    def _relay(self, response: IResponse, request: Request) -> Any:
        if request._disconnected:
            response.deliverBody(_Drop())
            return None
        return relay_response(response, request)

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError) or request._disconnected:
            return
        reason = failure.getErrorMessage()
        inner = getattr(failure.value, "reasons", None)
        if inner:
            reason = "; ".join(f.getErrorMessage() for f in inner)
        log.warn("Docker socket {socket} unreachable: {reason}", socket=self._socket_path, reason=reason)
        finish_with_error(request, bad_gateway_docker(self._socket_path, reason))

    def _bug(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError) or request._disconnected:
            return
        log.failure("proxying to Docker failed", failure)

        finish_with_error(request, AgentError(500, "Internal agent error", failure.getErrorMessage()))


class _Drop:
    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass
