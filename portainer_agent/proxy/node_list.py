"""Keeps the Swarm's node list fresh for aggregated lists (the thin shell of
:mod:`portainer_agent.cluster.swarm_nodes`).

The list comes from a manager: this node's own Docker socket when it is one, else (or when
that fails) the live managers' agents, the leader first, with ``GET /nodes`` through treq
over the pinned peer pool. An agent has no credentials of its own for another agent (each one checks
Portainer's signature), so the peer request carries the signature headers of the aggregated
request that needs the list, as any forwarded request does: the list is read on demand,
when an aggregate needs it and it is older than ``max_age`` (5 s), at most once at a time.

A known list is used at once, even when a refresh is due (the refresh runs beside the legs,
for the next aggregate). An unknown list (a worker right after start) is waited for, at most
``wait`` seconds, beside the legs; then the aggregate is answered saying the list is unknown.
Every attempt is bounded (``timeout``, ``max_bytes``); failures are logged once per change of
state, not once per attempt.
"""
from __future__ import annotations

from typing import Any, Sequence

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.server import Request

from portainer_agent.cluster.member import Member
from portainer_agent.cluster.swarm_nodes import NodeListState, SwarmNode, node_list_sources, parse_node_list
from portainer_agent.toolbox.whole_body import read_whole_body
from portainer_agent.proxy.merge import docker_error_message
from portainer_agent.proxy.peer import peer_base_url
from portainer_agent.proxy.reasons import upstream_failure_reason
from portainer_agent.routing import FORWARDED_HEADER, TARGET_HEADER
from portainer_agent.security.guard import PUBLIC_KEY_HEADER, SIGNATURE_HEADER
from portainer_agent.timers import cancel_timer, cancel_timer_when_done

log = Logger()

#: Node lists are small (about 1 kB a node); this bounds a broken or hostile answer.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
#: While the list is unknown, attempts are spaced by at least this much.
RETRY_UNKNOWN = 1.0


class NodeListUnavailable(Exception):
    """No manager could give the node list; the message says what each one answered."""


class SwarmNodeList:
    """The Swarm's node list, read from a manager and kept fresh on demand."""

    def __init__(self, clock: Any, docker: Any, peer_client: IAgent | None, *, max_age: float = 5.0,
                 timeout: float = 5.0, wait: float = 2.0, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._clock = clock
        #: The one Docker client (``request(method, target, headers, body)``).
        self._docker = docker
        #: The client between agents (:class:`~portainer_agent.proxy.peer_client.PeerClient`:
        #: treq over the pinned pool); None: only the local socket.
        self._peer_client = peer_client
        self._max_age = max_age
        self._timeout = timeout
        self._wait = wait
        self._max_bytes = max_bytes
        self._state = NodeListState()
        self._fetching: Deferred[None] | None = None
        self._last_attempt: float | None = None
        self._waiters: list[Deferred[NodeListState]] = []
        self._failing: bool | None = None  # the last logged outcome

    @property
    def state(self) -> NodeListState:
        return self._state

    def current(self, request: Request, members: Sequence[Member], local_name: str) -> "Deferred[NodeListState]":
        """The node list for an aggregate of ``members``; never fails.

        Known: at once (refreshed in the background when older than ``max_age``). Unknown:
        once a read in flight ends, or after ``wait`` seconds, whichever comes first.
        """
        now = self._clock.seconds()
        state = self._state
        if state.known and state.read_at is not None and now - state.read_at < self._max_age:
            return succeed(state)
        self._refresh(request, members, local_name, now)
        if self._state.known or self._fetching is None:
            return succeed(self._state)
        return self._waiter()

    def _waiter(self) -> "Deferred[NodeListState]":
        timer: Any = None

        def cancel(d: "Deferred[NodeListState]") -> None:
            if d in self._waiters:
                self._waiters.remove(d)
            cancel_timer(timer)

        waiter: Deferred[NodeListState] = Deferred(cancel)

        def give_up() -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                waiter.callback(self._state)

        timer = self._clock.callLater(self._wait, give_up)
        cancel_timer_when_done(waiter, timer)
        self._waiters.append(waiter)
        return waiter

    def _refresh(self, request: Request, members: Sequence[Member], local_name: str, now: float) -> None:
        if self._fetching is not None:
            return
        spacing = self._max_age if self._state.known else RETRY_UNKNOWN
        if self._last_attempt is not None and now - self._last_attempt < spacing:
            return
        sources = node_list_sources(members, local_name)
        if not sources:
            self._failed("no live agent on a manager node to ask")
            return
        self._last_attempt = now
        headers = _signature_headers(request, local_name)
        fetching = self._fetch(sources, local_name, headers)
        self._fetching = fetching
        fetching.addErrback(lambda f: log.failure("reading the Swarm node list failed", f))
        fetching.addBoth(self._fetched)

    def _fetched(self, _: Any) -> None:
        self._fetching = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._state)

    def _fetch(self, sources: Sequence[Member], local_name: str, headers: dict[bytes, list[bytes]]
               ) -> "Deferred[None]":
        reasons: list[str] = []

        def attempt(index: int) -> "Deferred[None]":
            member = sources[index]
            reading: Deferred[tuple[SwarmNode, ...]] = maybeDeferred(
                self._read, member, member.node_name == local_name, headers)
            reading.addTimeout(self._timeout, self._clock)
            return reading.addCallbacks(self._succeeded, failed, callbackArgs=(member,),
                                        errbackArgs=(index, member))

        def failed(failure: Failure, index: int, member: Member) -> "Deferred[None] | None":
            reasons.append(f"{member.node_name}: {upstream_failure_reason(failure, self._timeout)}")
            if index + 1 < len(sources):
                return attempt(index + 1)
            self._failed("; ".join(reasons))
            return None

        return attempt(0)

    def _read(self, member: Member, local: bool, headers: dict[bytes, list[bytes]]
              ) -> "Deferred[tuple[SwarmNode, ...]]":
        if local:
            pending: Deferred[Any] = self._docker.request(b"GET", b"/nodes")
        elif self._peer_client is None:
            raise NodeListUnavailable("no peer agent client")
        else:
            marks = {TARGET_HEADER: [member.node_name.encode("utf-8")], **headers}
            pending = self._peer_client.request(b"GET", peer_base_url(member) + b"/nodes", Headers(marks))

        def read(response: Any) -> "Deferred[tuple[SwarmNode, ...]]":
            body = read_whole_body(response, self._max_bytes, f"node {member.node_name}")

            def check(data: bytes) -> tuple[SwarmNode, ...]:
                if response.code != 200:
                    message = docker_error_message(data)
                    raise NodeListUnavailable(f"HTTP {response.code}" + (f": {message}" if message else ""))
                return parse_node_list(data)

            return body.addCallback(check)

        return pending.addCallback(read)

    def _succeeded(self, nodes: tuple[SwarmNode, ...], member: Member) -> None:
        self._state = NodeListState(nodes, self._clock.seconds(), None)
        if self._failing is not False:
            log.info("Swarm node list read from node {node}: {count} nodes ({names})", node=member.node_name,
                     count=len(nodes), names=", ".join(n.name for n in nodes))
            self._failing = False

    def _failed(self, reason: str) -> None:
        self._state = attrs.evolve(self._state, error=reason)
        if self._failing is not True:
            log.warn("cannot read the Swarm node list: {reason}; aggregated lists {what}", reason=reason,
                     what="use the last one read" if self._state.known else "say the node list is unknown")
            self._failing = True


def _signature_headers(request: Request, local_name: str) -> dict[bytes, list[bytes]]:
    """The headers a ``GET /nodes`` to another agent carries: the aggregate's own signature
    (the peer checks it) and the forwarding mark."""
    headers: dict[bytes, list[bytes]] = {FORWARDED_HEADER: [local_name.encode("utf-8")]}
    for name in (PUBLIC_KEY_HEADER, SIGNATURE_HEADER):
        values = request.requestHeaders.getRawHeaders(name)
        if values:
            headers[name] = list(values)
    return headers


__all__ = ["SwarmNodeList", "NodeListUnavailable", "DEFAULT_MAX_BYTES"]
