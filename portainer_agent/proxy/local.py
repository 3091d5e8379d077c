"""The local Docker proxy: any request, streamed to the Docker socket and back.

Request bodies arrive spooled by twisted.web (memory under 100 kB, a temporary file
above) and are streamed upstream with ``FileBodyProducer``; responses are relayed
by :func:`portainer_agent.proxy.relay.relay_response`. Docker receives the
client's original path, API version prefix included, so it answers in the client's
API version.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IAgent, IResponse
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.errors import AgentError, bad_gateway_docker
from portainer_agent.proxy.outgoing import request_body_producer, upstream_headers
from portainer_agent.proxy.relay import failure_reason, relay_pending

log = Logger()


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

    def send(self, request: Request) -> "Deferred[IResponse]":
        """An independent copy of ``request`` to Docker (the client's URI, end-to-end
        headers, body); raises :class:`AgentError` (400) for a URI the client library refuses."""
        try:
            return self._agent.request(
                request.method, self._base_url + request.uri, upstream_headers(request, self._host),
                request_body_producer(request, self._cooperator),
            )
        except ValueError as error:
            # The client library refuses control characters in the method or URI
            # (twisted.web's server lets some through): a client error, not a crash.
            raise AgentError(400, "Invalid request URL or method", str(error)) from None

    def render(self, request: Request) -> Any:
        relay_pending(self.send(request), request, self._unreachable)
        return NOT_DONE_YET

    def _unreachable(self, failure: Failure) -> AgentError:
        reason = failure_reason(failure)
        log.warn("Docker socket {socket} unreachable: {reason}", socket=self._socket_path, reason=reason)
        return bad_gateway_docker(self._socket_path, reason)
