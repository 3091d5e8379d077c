"""The one stream abstraction: relay an upstream HTTP response to a client request.

Used for the local Docker socket and for peer agents alike. The upstream body is
written to the client as it arrives, with backpressure both ways: the client
connection is the consumer and the upstream connection its push producer, so a slow
client pauses the upstream read instead of growing our memory.
"""
from __future__ import annotations

from typing import Any, Callable, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from portainer_agent.toolbox.paths import forwardable_response_headers
from portainer_agent.errors import AgentError
from portainer_agent.toolbox.responses import abort_client, finish_with_error
from portainer_agent.toolbox.teardown import cancel_when_client_leaves
from portainer_agent.toolbox.twisted_private import client_gone

log = Logger()

NO_BODY_CODES = frozenset({204, 304})


def copy_response_head(response: IResponse, request: Request) -> None:
    """Status and headers from ``response`` onto ``request`` (hop-by-hop removed,
    ``Content-Length`` put back from ``response.length``).

    A response of the Docker client carries its header lines as received
    (``raw_headers``): they are filtered and copied once, without an intermediate
    ``Headers``; twisted.web.client responses (peer agents) go through ``headers``."""
    request.setResponseCode(response.code, response.phrase)
    raw = getattr(response, "raw_headers", None)
    target = request.responseHeaders
    if raw is not None:
        connection = [value for name, value in raw if name.lower() == b"connection"]
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in raw:
            values = grouped.get(name)
            if values is None:
                grouped[name] = [value]
            else:
                values.append(value)
        # Set, not added: twisted.web put its own Server and Date there already.
        for name, values in forwardable_response_headers(grouped.items(), connection):
            target.setRawHeaders(name, values)
        lengths = [value for name, value in raw if name.lower() == b"content-length"]
    else:
        headers = response.headers
        connection = headers.getRawHeaders(b"connection", [])
        for name, values in forwardable_response_headers(headers.getAllRawHeaders(), connection):
            target.setRawHeaders(name, values)
        lengths = headers.getRawHeaders(b"content-length") or []
    if request.method == b"HEAD":
        if lengths:
            target.setRawHeaders(b"content-length", lengths[-1:])
    elif response.length is not UNKNOWN_LENGTH and response.code not in NO_BODY_CODES:
        target.setRawHeaders(b"content-length", [b"%d" % (response.length,)])


class _BodyRelay(Protocol):
    """Receives the upstream body and writes it to the client request."""

    def __init__(self, request: Request, done: "Deferred[None]") -> None:
        self._request = request
        self._done = done
        self._clientGone = False

    def connectionMade(self) -> None:
        # ``self.transport`` is a TransportProxyProducer over the upstream connection.
        self._request.registerProducer(self.transport, True)
        self._request.notifyFinish().addErrback(self._clientLost)

    def _clientLost(self, reason: Failure) -> None:
        self._clientGone = True
        # Stop the upstream (e.g. an endless /events or logs?follow) at once.
        # deliverBody's transport is a push producer, not the ITransport Protocol declares.
        cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self._clientGone:
            self._request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        request = self._request
        if request.channel is not None:
            try:
                request.unregisterProducer()
            except RuntimeError:
                pass
        if not self._clientGone and not client_gone(request):
            # isinstance, not Failure.check: check() computes qualified names every call.
            if reason is None or isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
                request.finish()
            else:
                # The upstream broke mid-body: the client must see a truncated
                # response, not a complete-looking one.
                log.warn("upstream body broken for {method} {path}: {error}",
                         method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
                         error=reason.getErrorMessage())
                abort_client(request)
        self._done.callback(None)


def relay_response(response: IResponse, request: Request) -> "Deferred[None]":
    """Copy ``response`` to ``request`` and stream its body; fires when it has ended."""
    copy_response_head(response, request)
    done: Deferred[None] = Deferred()
    if request.method == b"HEAD" or response.code in NO_BODY_CODES:
        response.deliverBody(_Discard())
        if not client_gone(request):
            request.finish()
        done.callback(None)
        return done
    # Flush the status line and headers now: clients such as ``docker run`` wait for
    # the headers of ``/containers/{id}/wait`` before they send ``/start``.
    request.write(b"")
    response.deliverBody(_BodyRelay(request, done))
    return done


class _Discard(Protocol):
    """Takes an empty body (HEAD, 204, 304): nothing to stop, the connection stays reusable."""

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        pass


class Drop(Protocol):
    """Takes a response nobody will read and stops its upstream at once."""

    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        pass


def failure_reason(failure: Failure) -> str:
    """A one-line reason, looking inside ``ResponseNeverReceived``-style wrappers."""
    inner = getattr(failure.value, "reasons", None)
    if inner:
        return "; ".join(f.getErrorMessage() for f in inner)
    return failure.getErrorMessage()


def relay_pending(pending: "Deferred[IResponse]", request: Request,
                  upstream_error: Callable[[Failure], AgentError]) -> "Deferred[None]":
    """Relay the response ``pending`` will give to ``request``, whatever the upstream.

    A client that leaves before the upstream answers cancels the upstream request (once
    the response streams, the relay stops the upstream itself). An upstream that cannot
    be reached is answered with ``upstream_error(failure)`` (a Docker-style JSON error).
    """
    cancel_when_client_leaves(request, pending)

    def relay(response: IResponse) -> None:
        if client_gone(request):
            response.deliverBody(Drop())
            return
        # Not chained: ``pending`` is done once the head is in, and the body relay stops
        # the upstream itself if the client leaves.
        relay_response(response, request)

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError) or client_gone(request):
            return
        finish_with_error(request, upstream_error(failure))

    def bug(failure: Failure) -> None:
        if failure.check(CancelledError) or client_gone(request):
            return
        log.failure("relaying an upstream response failed", failure)
        finish_with_error(request, AgentError(500, "Internal agent error", failure.getErrorMessage()))

    return pending.addCallbacks(relay, failed).addErrback(bug)
