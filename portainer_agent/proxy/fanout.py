"""Aggregation: one list request sent to every node at once, the answers merged.

Each live agent gets an independent copy of the request (same method, URI with its query —
filters, ``all=1``, ``size=1`` — and end-to-end headers); the local leg goes straight to
the local Docker socket, the others to their agents with the target header. Every leg has
its own deadline (``--aggregate-timeout``) and size cap (``--aggregate-max-bytes``), so a
slow, dead or babbling node cannot hold the answer; a leg that gives up (deadline, cap, client
gone) stops its upstream, whose connection is closed rather than returned to a pool.

Nothing goes missing in silence: beside the legs, the Swarm's node list
(:class:`~portainer_agent.proxy.node_list.SwarmNodeList`) says which nodes exist, and every
node with no answer — a failed leg, or a Swarm node with no live agent — is named in the
``X-PortainerAgent-Unreachable-Nodes`` header, in ``/volumes``' ``Warnings`` and in the log.
An aggregate answered before the node list is known says so (``X-PortainerAgent-Node-List:
unknown``). Only when no node answers is the answer an error.

With the list cache on, the local leg is answered from memory when it can be, and each
peer leg is a conditional request (``If-None-Match`` with the tag of that peer's last
answer, :mod:`portainer_agent.proxy.peer_lists`): an unchanged peer answers 304 and its
last answer is merged. Merge and failures are the same either way.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Protocol, Sequence

import attrs
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.cluster.member import Member
from portainer_agent.cluster.swarm_nodes import NodeListState, uncovered_nodes, unknown_list_warning
from portainer_agent.errors import AgentError
from portainer_agent.toolbox.responses import finish_with_error
from portainer_agent.toolbox.teardown import cancel_when_client_leaves
from portainer_agent.toolbox.twisted_private import client_gone
from portainer_agent.toolbox.whole_body import read_whole_body
from portainer_agent.proxy.local import DockerProxy
from portainer_agent.proxy.merge import (
    MergeMemo,
    NodeAnswer,
    NodeFailure,
    docker_error_message,
    unreachable_header,
)
from portainer_agent.proxy.node_list import SwarmNodeList
from portainer_agent.proxy.peer import PeerForwarder
from portainer_agent.proxy.peer_lists import PeerCopies
from portainer_agent.listcache.peer_states import PeerListStates
from portainer_agent.listcache.answer import NotKeepable, keep_with_clocks
from portainer_agent.listcache.service import CLOCKS_HEADER, NOW_HEADER, STATE_HEADER, VALID_FOR_HEADER
from portainer_agent.proxy.reasons import upstream_failure_reason

log = Logger()

UNREACHABLE_HEADER = b"X-PortainerAgent-Unreachable-Nodes"
#: Set to ``unknown`` on an aggregate answered before the Swarm's node list was known.
NODE_LIST_HEADER = b"X-PortainerAgent-Node-List"
#: The list whose statuses are time-relative (formatted here from a peer's clocks).
CONTAINERS_PATH = b"/containers/json"
#: ``--aggregate-max-bytes``'s default: one node's answer (a big node's ``ps -a --size``
#: is a few MB).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@attrs.frozen
class _HTTPFailure(Exception):
    """A node answered, with an error status."""

    node: str
    code: int
    body: bytes
    content_type: bytes | None


class AggregateMetrics(Protocol):
    """What aggregation reports (:class:`portainer_agent.metrics.AgentMetrics`)."""

    def aggregate_answered(self, unreachable: Iterable[str]) -> None: ...

    def aggregate_leg_not_modified(self, node: str) -> None: ...

    def aggregate_leg_from_memory(self, node: str) -> None: ...


class FanOut:
    """Serves aggregated list requests (``RouteKind.AGGREGATE``)."""

    def __init__(self, reactor: Any, local: DockerProxy, peers: PeerForwarder, timeout: float = 10.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, node_list: SwarmNodeList | None = None,
                 metrics: AggregateMetrics | None = None, peer_copies: PeerCopies | None = None,
                 peer_states: PeerListStates | None = None) -> None:
        self._metrics = metrics
        #: Peers' last answers, for conditional legs (None: the list cache is off).
        self._copies = peer_copies
        #: Merged answers by their nodes' entity tags (only tagged answers: the cache's).
        self._memo = MergeMemo()
        #: The peers' cache states heard over membership (None: every peer is asked).
        self._states = peer_states
        self._reactor = reactor
        self._local = local
        self._peers = peers
        self._timeout = timeout
        self._max_bytes = max_bytes
        #: None: only live members are accounted for (tests, or a cluster without a node list).
        self._node_list = node_list
        #: Swarm nodes named for having no live agent, for one log line per change.
        self._absent: dict[str, str] = {}
        self._list_unknown_logged = False

    def render(self, request: Request, path: bytes, members: Sequence[Member], local_name: str) -> Any:
        """Ask ``members`` for ``request`` (its routed ``path``: which list, how to merge)."""
        legs = [self._leg(request, path, member, member.node_name == local_name) for member in members]
        listing: Deferred[NodeListState | None] = (
            self._node_list.current(request, members, local_name) if self._node_list is not None else succeed(None))
        pending: list[Deferred[Any]] = [*legs, listing]

        # A leg reading its body is "called" but waits on the reader: cancelling it reaches
        # the reader (a finished leg ignores it).
        cancel_when_client_leaves(request, *pending)
        answered = DeferredList(pending, consumeErrors=True)
        answered.addCallback(self._answer, request, path, members)
        answered.addErrback(self._crashed, request)
        return NOT_DONE_YET

    def _leg(self, request: Request, path: bytes, member: Member, local: bool) -> "Deferred[NodeAnswer]":
        node, copies = member.node_name, None if local else self._copies
        copy = copies.get(node, request.uri) if copies is not None else None
        now_ns = time.time_ns()
        if copy is not None and self._states is not None and self._states.trusts(node, copy.state) and (
                copy.answer is not None or copy.valid_until is None or self._reactor.seconds() < copy.valid_until):
            # The peer said it has not changed since, recently enough, and its texts are
            # formatted here (or still hold).
            if self._metrics is not None:
                self._metrics.aggregate_leg_from_memory(node)
            body, tag = copy.rendered(now_ns)
            return succeed(NodeAnswer(node, body, tag))
        current = copy.rendered(now_ns) if copy is not None else None
        try:
            if local:
                sent = self._local.send(request)
            elif copies is not None:
                # The client's own If-None-Match never reaches a peer: a 304 must mean "as kept".
                sent = self._peers.send(request, member, "aggregate", {
                    b"If-None-Match": current[1] if current is not None else None,
                    CLOCKS_HEADER: b"1" if self._states is not None and path == CONTAINERS_PATH else None})
            else:
                sent = self._peers.send(request, member, "aggregate")
        except Exception:  # noqa: BLE001 - an AgentError (a bad URI), or a bug: this leg fails, not the list
            sent = fail()

        def read(response: IResponse) -> "Deferred[NodeAnswer]":
            content_type = response.headers.getRawHeaders(b"content-type", [None])[-1]

            def check(body: bytes) -> NodeAnswer:
                if response.code == 304 and copy is not None and current is not None and copies is not None:
                    if self._metrics is not None:
                        self._metrics.aggregate_leg_not_modified(node)
                    copies.keep(node, request.uri, copy.etag, copy.body, *self._validity(response),
                                answer=copy.answer, offset_ns=copy.offset_ns)
                    return NodeAnswer(node, current[0], current[1])
                if 200 <= response.code < 300:
                    tag = response.headers.getRawHeaders(b"etag", [None])[-1] if self._copies is not None else None
                    if copies is not None:
                        copies.keep(node, request.uri, tag, body, *self._validity(response),
                                    *self._renderable(response, body))
                    return NodeAnswer(node, body, tag)
                if copies is not None:
                    copies.forget(node, request.uri)
                raise _HTTPFailure(node, response.code, body, content_type)

            return read_whole_body(response, self._max_bytes, f"node {node}",
                                   " (--aggregate-max-bytes)").addCallback(check)

        answer: Deferred[NodeAnswer] = sent.addCallback(read)
        # On the deadline the cancellation reaches whatever the leg waits for: the request
        # (connection aborted) or the body (upstream stopped).
        answer.addTimeout(self._timeout, self._reactor)
        return answer

    def _renderable(self, response: IResponse, body: bytes) -> tuple[Any, int]:
        """A peer's containers answer sent with its clocks, as a copy this agent formats
        itself (and the peer's clock offset); (None, 0) otherwise."""
        headers = response.headers
        clocks = headers.getRawHeaders(CLOCKS_HEADER, [None])[-1]
        now = headers.getRawHeaders(NOW_HEADER, [None])[-1]
        if clocks is None or now is None:
            return None, 0
        try:
            peer_now = int(now)
            answer = keep_with_clocks(body, [int(c) for c in clocks.split(b",") if c], peer_now)
        except (ValueError, NotKeepable):
            return None, 0
        return answer, peer_now - time.time_ns()

    def _validity(self, response: IResponse) -> tuple[str | None, float | None]:
        """The peer's cache state of an answer, and until when (our clock) its texts hold."""
        headers = response.headers
        state = headers.getRawHeaders(STATE_HEADER, [None])[-1]
        valid_for = headers.getRawHeaders(VALID_FOR_HEADER, [None])[-1]
        if state is None:
            return None, 0.0
        if valid_for is None:
            return state.decode("ascii", "replace"), None
        try:
            milliseconds = int(valid_for)
        except ValueError:
            milliseconds = 0
        return state.decode("ascii", "replace"), self._reactor.seconds() + milliseconds / 1000

    def _answer(self, results: list[tuple[bool, Any]], request: Request, path: bytes,
                members: Sequence[Member]) -> None:
        *leg_results, (listed, state) = results
        if client_gone(request):
            return
        answers: list[NodeAnswer] = []
        failures: list[NodeFailure] = []
        http_failures: list[_HTTPFailure] = []
        for member, (ok, value) in zip(members, leg_results):
            if ok:
                answers.append(value)
                continue
            failures.append(NodeFailure(member.node_name, self._reason(value, http_failures)))
        absent, notes, list_unknown = self._coverage(state if listed else None, members)
        body, failures = self._memo.merge(path, request.uri, answers, failures + absent, notes)
        where = request.path.decode("latin-1")
        absent_names = {f.node for f in absent}
        for failure in failures:
            if failure.node not in absent_names:
                log.warn("node {node} left out of the aggregated {path}: {reason}", node=failure.node, path=where,
                         reason=failure.reason)
        self._log_absent(absent, where)
        answered = {a.node for a in answers} - {f.node for f in failures}
        if self._metrics is not None:
            self._metrics.aggregate_answered(f.node for f in failures)
        if not answered:
            self._all_failed(request, failures, http_failures, len(members))
            return
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        if failures:
            request.setHeader(UNREACHABLE_HEADER, unreachable_header(failures))
        if list_unknown:
            request.setHeader(NODE_LIST_HEADER, b"unknown")
        request.write(body)
        request.finish()

    def _coverage(self, state: NodeListState | None, members: Sequence[Member]
                  ) -> tuple[list[NodeFailure], list[str], bool]:
        """The Swarm nodes to name (no live agent), the ``/volumes`` notes, whether the list is unknown."""
        if self._node_list is None:
            return [], [], False
        if state is None or state.nodes is None:
            reason = state.unknown_reason() if state is not None else "not read yet"
            if not self._list_unknown_logged:
                self._list_unknown_logged = True
                log.warn("aggregated lists answered without the Swarm node list: {text}",
                         text=unknown_list_warning(reason))
            return [], [unknown_list_warning(reason)], True
        self._list_unknown_logged = False
        asked = [m.node_name for m in members]
        return [NodeFailure(name, reason) for name, reason in uncovered_nodes(state.nodes, asked)], [], False

    def _log_absent(self, absent: list[NodeFailure], path: str) -> None:
        """One line when a Swarm node starts or stops being named for having no agent."""
        now = {f.node: f.reason for f in absent}
        for node, reason in now.items():
            if self._absent.get(node) != reason:
                log.warn("{reason}: its items are left out of aggregated lists (first: {path}) and the node is "
                         "named in them until an agent answers there", reason=reason, path=path)
            else:
                log.debug("node {node} left out of the aggregated {path}: {reason}", node=node, path=path,
                          reason=reason)
        for node in self._absent.keys() - now.keys():
            log.info("node {node} is no longer left out of aggregated lists (its agent is live, or the node left "
                     "the Swarm)", node=node)
        self._absent = now

    def _reason(self, failure: Failure, http_failures: list[_HTTPFailure]) -> str:
        if failure.check(_HTTPFailure):
            value: _HTTPFailure = failure.value
            http_failures.append(value)
            message = docker_error_message(value.body)
            return f"HTTP {value.code}" + (f": {message}" if message else "")
        if failure.check(AgentError):
            error: AgentError = failure.value
            return f"{error.message}: {error.details}" if error.details else error.message
        return upstream_failure_reason(failure, self._timeout)

    def _all_failed(self, request: Request, failures: list[NodeFailure], http_failures: list[_HTTPFailure],
                    asked: int) -> None:
        if http_failures and len(http_failures) == asked:
            # Every node answered, with an error (a bad filter, say): pass Docker's answer on.
            first = min(http_failures, key=lambda f: f.node)
            request.setResponseCode(first.code)
            if first.content_type:
                request.setHeader(b"content-type", first.content_type)
            request.setHeader(b"content-length", b"%d" % len(first.body))
            request.write(first.body)
            request.finish()
            return
        details = "; ".join(f"{f.node}: {f.reason}" for f in sorted(failures, key=lambda f: f.node))
        finish_with_error(request, AgentError(502, "Unable to retrieve the list from any node", details))

    def _crashed(self, failure: Failure, request: Request) -> None:
        """A bug while answering: the client gets a 500 rather than waiting forever."""
        log.failure("answering the aggregated {path} failed", failure, path=request.path.decode("latin-1"))
        finish_with_error(request, AgentError(500, "Internal agent error",
                                              f"the aggregated list could not be built: "
                                              f"{failure.getErrorMessage() or type(failure.value).__name__}"))
