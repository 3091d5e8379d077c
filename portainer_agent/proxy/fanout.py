"""Aggregation: one list request sent to every node at once, the answers merged.

Each node gets an independent copy of the request (same method, URI with its query —
filters, ``all=1``, ``size=1`` — and end-to-end headers); the local leg goes straight to
the local Docker socket, the others to their agents with the target header. Every leg has
its own deadline (``--aggregate-timeout``), so a slow or dead node cannot hold the answer.
Partial failure is visible: the reachable nodes' items, the
``X-PortainerAgent-Unreachable-Nodes`` header, a warning in ``/volumes``' ``Warnings``,
and a log line. Only when every node fails is the answer an error.
"""
from __future__ import annotations

from typing import Any, Sequence

import attrs
import treq
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.http.twisted_private import client_gone
from portainer_agent.cluster.member import Member
from portainer_agent.errors import AgentError
from portainer_agent.http.responses import finish_with_error
from portainer_agent.proxy.local import DockerProxy
from portainer_agent.proxy.merge import (
    NodeAnswer,
    NodeFailure,
    docker_error_message,
    merge_answers,
    unreachable_header,
)
from portainer_agent.proxy.peer import PeerForwarder
from portainer_agent.proxy.relay import failure_reason

log = Logger()

UNREACHABLE_HEADER = b"X-PortainerAgent-Unreachable-Nodes"


@attrs.frozen
class _HTTPFailure(Exception):
    """A node answered, with an error status."""

    node: str
    code: int
    body: bytes
    content_type: bytes | None


class FanOut:
    """Serves aggregated list requests (``RouteKind.AGGREGATE``)."""

    def __init__(self, reactor: Any, local: DockerProxy, peers: PeerForwarder, timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._local = local
        self._peers = peers
        self._timeout = timeout

    def render(self, request: Request, path: bytes, members: Sequence[Member], local_name: str) -> Any:
        """Ask ``members`` for ``request`` (its routed ``path``: which list, how to merge)."""
        legs = [self._leg(request, member, member.node_name == local_name) for member in members]

        def cancel_legs(_: Failure) -> None:
            for leg in legs:
                if not leg.called:
                    leg.cancel()

        request.notifyFinish().addErrback(cancel_legs)
        DeferredList(legs, consumeErrors=True).addCallback(self._answer, request, path, members)
        return NOT_DONE_YET

    def _leg(self, request: Request, member: Member, local: bool) -> "Deferred[NodeAnswer]":
        try:
            sent = self._local.send(request) if local else self._peers.send(request, member, "aggregate")
        except AgentError as error:
            sent = fail(error)

        def read(response: IResponse) -> "Deferred[NodeAnswer]":
            content_type = response.headers.getRawHeaders(b"content-type", [None])[-1]

            def check(body: bytes) -> NodeAnswer:
                if 200 <= response.code < 300:
                    return NodeAnswer(member.node_name, body)
                raise _HTTPFailure(member.node_name, response.code, body, content_type)

            return treq.content(response).addCallback(check)

        answer: Deferred[NodeAnswer] = sent.addCallback(read)
        answer.addTimeout(self._timeout, self._reactor)
        return answer

    def _answer(self, results: list[tuple[bool, Any]], request: Request, path: bytes,
                members: Sequence[Member]) -> None:
        if client_gone(request):
            return
        answers: list[NodeAnswer] = []
        failures: list[NodeFailure] = []
        http_failures: list[_HTTPFailure] = []
        for member, (ok, value) in zip(members, results):
            if ok:
                answers.append(value)
                continue
            failures.append(NodeFailure(member.node_name, self._reason(value, member, http_failures)))
        body, failures = merge_answers(path, answers, failures)
        for failure in failures:
            log.warn("node {node} left out of the aggregated {path}: {reason}", node=failure.node,
                     path=request.path.decode("latin-1"), reason=failure.reason)
        if len(failures) == len(members):
            self._all_failed(request, failures, http_failures)
            return
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        if failures:
            request.setHeader(UNREACHABLE_HEADER, unreachable_header(failures))
        request.write(body)
        request.finish()

    def _reason(self, failure: Failure, member: Member, http_failures: list[_HTTPFailure]) -> str:
        if failure.check(_HTTPFailure):
            value: _HTTPFailure = failure.value
            http_failures.append(value)
            message = docker_error_message(value.body)
            return f"HTTP {value.code}" + (f": {message}" if message else "")
        if failure.check(TimeoutError, CancelledError):
            return f"no answer within {self._timeout:g}s"
        return failure_reason(failure)

    def _all_failed(self, request: Request, failures: list[NodeFailure], http_failures: list[_HTTPFailure]) -> None:
        if http_failures and len(http_failures) == len(failures):
            # Every node answered, with an error (a bad filter, say): pass Docker's answer on.
            first = min(http_failures, key=lambda f: f.node)
            request.setResponseCode(first.code)
            if first.content_type:
                request.setHeader(b"content-type", first.content_type)
            request.setHeader(b"content-length", b"%d" % len(first.body))
            request.write(first.body)
            request.finish()
            return
        details = "; ".join(f"{f.node}: {f.reason}" for f in failures)
        finish_with_error(request, AgentError(502, "Unable to retrieve the list from any node", details))
