"""The local Docker proxy: any request, streamed to the Docker socket and back.

The request goes through the one Docker client (:mod:`portainer_agent.docker.client`)
with its end-to-end headers and its body as it arrives (large uploads stream, see
:mod:`portainer_agent.toolbox.upload`); the response is relayed by
:func:`portainer_agent.proxy.relay.relay_response`. Docker receives the client's
original path, API version prefix included, so it answers in the client's API version.

With the list cache (:mod:`portainer_agent.listcache`), a list request may be answered
from memory instead, and every other request that can change something (any method but
GET and HEAD) drops what the cache holds once Docker has answered, before the client
sees the answer, and again when the exchange ends (a pull or a build changes the lists
at the end of its stream).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.errors import AgentError, bad_gateway_docker
from portainer_agent.proxy.outgoing import request_body_producer, upstream_header_lines
from portainer_agent.proxy.relay import failure_reason, relay_pending
from portainer_agent.listcache.service import CLOCKS_HEADER
from portainer_agent.routing import Route

log = Logger()


class Upstream(Protocol):
    """What the proxy needs of the Docker client (:class:`DockerClient` provides it)."""

    def request(self, method: bytes, target: bytes, headers: Any = (), body: Any = None) -> "Deferred[Any]": ...


class Lists(Protocol):
    """What the proxy needs of the list cache (:class:`~portainer_agent.listcache.service.ListCache`)."""

    def answer(self, method: bytes, uri: bytes, if_none_match: bytes | None,
               fetch: Callable[[], "Deferred[Any]"], clocks: bool = False) -> "Deferred[Any] | None": ...

    def written(self, result: Any = None) -> Any: ...

    def settled(self, result: Any = None) -> Any: ...


_READS = frozenset({b"GET", b"HEAD"})


class DockerProxy:
    """Forwards a request to the local Docker engine."""

    def __init__(self, client: Upstream, socket_path: str, cooperator: Any = task, lists: Lists | None = None) -> None:
        self._client = client
        self._socket_path = socket_path
        self._cooperator = cooperator
        #: The list cache (None: every request goes to Docker).
        self.lists = lists

    def send(self, request: Request, conditional: bool = False) -> "Deferred[Any]":
        """An independent copy of ``request`` to Docker (the client's URI, end-to-end
        headers, body), or its answer from the list cache (honouring the client's
        ``If-None-Match`` if ``conditional``); raises :class:`AgentError` (400) for a URI
        that cannot go on the wire."""
        if self.lists is not None and request.method == b"GET":
            headers = request.requestHeaders
            tag = headers.getRawHeaders(b"if-none-match", [None])[-1] if conditional else None
            clocks = conditional and headers.hasHeader(CLOCKS_HEADER)
            cached = self.lists.answer(request.method, request.uri, tag, lambda: self._send(request), clocks)
            if cached is not None:
                return cached
        return self._send(request)

    def _send(self, request: Request) -> "Deferred[Any]":
        try:
            return self._client.request(request.method, request.uri, upstream_header_lines(request),
                                        request_body_producer(request, self._cooperator))
        except ValueError as error:
            # Control characters or spaces in the method or URI (twisted.web's server
            # lets some through): a client error, not a crash.
            raise AgentError(400, "Invalid request URL or method", str(error)) from None

    def render(self, request: Request, route: Route | None = None) -> Any:
        pending = self.send(request, conditional=True)
        if self.lists is not None and request.method not in _READS:
            # Before the relay's callbacks: the cache forgets before the client hears.
            pending.addBoth(self.lists.written)
            # In a cluster: answered once the other agents heard of it (read-your-writes).
            pending.addBoth(self.lists.settled)
            request.notifyFinish().addBoth(lambda _: self.lists.written())  # type: ignore[union-attr]
        relay_pending(pending, request, self._unreachable)
        return NOT_DONE_YET

    def _unreachable(self, failure: Failure) -> AgentError:
        reason = failure_reason(failure)
        log.warn("Docker socket {socket} unreachable: {reason}", socket=self._socket_path, reason=reason)
        return bad_gateway_docker(self._socket_path, reason)
