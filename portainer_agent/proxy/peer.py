"""Another agent of the cluster as an upstream: pinned HTTPS through one persistent pool.

A request for another node goes to that node's agent (through treq, verbatim:
:mod:`portainer_agent.proxy.peer_client`), which checks the Portainer signature
itself (the headers are forwarded, so a forwarded request has no more power than the
original) and serves it locally: the target header is set to the peer's node name and the
request is marked with :data:`~portainer_agent.routing.FORWARDED_HEADER`, so it is never
forwarded again. The client's URI goes as it is (``/v1.41`` and ``/v2`` prefixes, query).

TLS: every peer presents the self-signed certificate whose SPKI fingerprint it announced in
its membership record. When membership is authenticated (a cluster key), that fingerprint
is trusted and the connection is pinned to it; without a key the record could come from
anyone, so, like the original agent, the connection is not verified (logged once).

Deadlines follow membership: every connection made to a peer is known by its address
(:class:`PeerConnections`), and when membership declares a member dead they are all cut at
once, so a request in flight to it fails with :class:`MemberGone` instead of waiting for a
node the cluster already knows is gone (a frozen agent accepts TCP and answers nothing). A
manager operation then goes to the next manager when that is safe (nothing sent yet, or
GET/HEAD); otherwise it answers 502 naming the node. Plain (non-upgrade) requests also have
a deadline for the response head (``--peer-response-timeout``), counted from when the
request body has been sent; once the head is in, streams have no timeout.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Protocol, Sequence

from OpenSSL import SSL, crypto
from twisted.internet import ssl, task
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS, IResponse
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from portainer_agent.cluster.member import Member
from portainer_agent.errors import AgentError
from portainer_agent.proxy.member_gone import MemberGone
from portainer_agent.proxy.outgoing import request_body_producer, upstream_headers
from portainer_agent.proxy.peer_client import PeerClient
from portainer_agent.proxy.relay import Drop, failure_reason, relay_pending
from portainer_agent.proxy.splice import HijackProxy
from portainer_agent.routing import FORWARDED_HEADER, TARGET_HEADER
from portainer_agent.timers import cancel_timer
from portainer_agent.tls.certs import certificate_spki_fingerprint

log = Logger()


class PeerPinMissing(Exception):
    """Membership is authenticated but has no certificate pin for this address."""


class PeerConnections:
    """Every TLS connection made to a peer agent (pooled, in flight or spliced), by the
    peer's API address, so that all of them can be cut when its member is declared dead."""

    def __init__(self) -> None:
        self._by_address: dict[tuple[str, int], "weakref.WeakSet[Any]"] = {}

    def add(self, host: str, port: int, connection: Any) -> None:
        self._by_address.setdefault((host, port), weakref.WeakSet()).add(connection)

    def open_to(self, host: str, port: int) -> int:
        return sum(1 for c in self._by_address.get((host, port), ()) if getattr(c, "transport", None) is not None)

    def abort(self, host: str, port: int) -> int:
        """Abort every connection to ``host:port``; returns how many were open."""
        connections = self._by_address.pop((host, port), None) or ()
        aborted = 0
        for connection in list(connections):
            if getattr(connection, "transport", None) is None:
                continue
            try:
                connection.abortConnection()
                aborted += 1
            except Exception:  # noqa: BLE001 - already gone
                pass
        return aborted


@implementer(IOpenSSLClientConnectionCreator)
class _ConnectionCreator:
    """Client TLS connections with a handshake deadline: the connect timeout covers TCP only,
    and a peer that accepts but never answers (stopped, overloaded) must not hold a request.
    ``made(tls_protocol)`` is told of each connection (see :class:`PeerConnections`)."""

    def __init__(self, context: SSL.Context, clock: Any = None, handshake_timeout: float = 0.0,
                 made: Callable[[Any], None] | None = None) -> None:
        self._context = context
        self._clock = clock
        self._timeout = handshake_timeout
        self._made = made

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._made is not None:
            self._made(tlsProtocol)
        if self._clock is not None and self._timeout > 0:
            timer = self._clock.callLater(self._timeout, _abort, tlsProtocol)

            def handshake_progress(conn: SSL.Connection, where: int, ret: int) -> None:
                if where & SSL.SSL_CB_HANDSHAKE_DONE and timer.active():
                    timer.cancel()

            connection.set_info_callback(handshake_progress)
        return connection


class _HeadDeadline:
    """The response head deadline of one peer request: started once its body is sent,
    stopped by the head (or any failure); when it expires the request is cancelled."""

    def __init__(self, clock: Any, seconds: float) -> None:
        self._clock = clock
        self.seconds = seconds
        self._pending: Deferred[Any] | None = None
        self._timer: Any = None
        self.expired = False
        self._over = False

    def watch(self, pending: "Deferred[Any]") -> None:
        self._pending = pending

        def over(result: Any) -> Any:
            self._over = True
            cancel_timer(self._timer)
            return result

        pending.addBoth(over)

    def start(self) -> None:
        if self.seconds <= 0 or self._over or self._timer is not None:
            return
        self._timer = self._clock.callLater(self.seconds, self._expire)

    def _expire(self) -> None:
        if self._pending is not None and not self._pending.called:
            self.expired = True
            self._pending.cancel()


def _abort(tls_protocol: Any) -> None:
    log.warn("TLS handshake with another agent timed out")
    try:
        tls_protocol.abortConnection()
    except Exception:  # noqa: BLE001 - already gone
        pass


def _pinned_context(fingerprint: str) -> SSL.Context:
    context = ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2).getContext()

    def verify(connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        # Only the leaf matters: the peer's self-signed certificate, pinned by its key.
        return depth != 0 or certificate_spki_fingerprint(cert.to_cryptography()) == fingerprint

    context.set_verify(SSL.VERIFY_PEER, verify)
    return context


@implementer(IPolicyForHTTPS)
class PeerTLSPolicy:
    """TLS for connections to peer agents: pinned to the fingerprint membership announced.

    ``pin_for(host, port)`` returns the fingerprint of the live member whose API is at that
    address (None if unknown). ``authenticated`` says whether membership records are
    authenticated (a cluster key); only then are their fingerprints trusted as pins.
    """

    def __init__(self, pin_for: Callable[[str, int], str | None], authenticated: bool, clock: Any = None,
                 handshake_timeout: float = 0.0, connections: PeerConnections | None = None) -> None:
        #: Every connection this policy secured, by peer address.
        self.connections = connections if connections is not None else PeerConnections()
        self._pin_for = pin_for
        self.authenticated = authenticated
        self._clock = clock
        self._handshake_timeout = handshake_timeout
        self._contexts: dict[str, SSL.Context] = {}
        self._unverified: SSL.Context | None = None
        self._warned = False

    def creator_for(self, host: str, port: int) -> IOpenSSLClientConnectionCreator:
        if not self.authenticated:
            if not self._warned:
                self._warned = True
                log.warn("cluster membership is unauthenticated (no cluster key): connections to other agents "
                         "are not verified, as in the original agent; set AGENT_SECRET or --cluster-key to pin them")
            if self._unverified is None:
                context = ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2).getContext()
                context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
                self._unverified = context
            return _ConnectionCreator(self._unverified, self._clock, self._handshake_timeout, self._made(host, port))
        fingerprint = self._pin_for(host, port)
        if not fingerprint:
            raise PeerPinMissing(f"no certificate fingerprint known for the agent at {host}:{port}")
        if fingerprint not in self._contexts:
            self._contexts[fingerprint] = _pinned_context(fingerprint)
        return _ConnectionCreator(self._contexts[fingerprint], self._clock, self._handshake_timeout,
                                  self._made(host, port))

    def _made(self, host: str, port: int) -> Callable[[Any], None]:
        return lambda connection: self.connections.add(host, port, connection)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:  # noqa: N802
        return self.creator_for(hostname.decode("idna"), port)


def peer_base_url(member: Member) -> bytes:
    host = f"[{member.api_addr}]" if ":" in member.api_addr else member.api_addr
    return f"https://{host}:{member.api_port}".encode("ascii")


def peer_unreachable(member: Member, failure: Failure) -> AgentError:
    return AgentError(502, f"Unable to reach the agent on node {member.node_name}",
                      f"{member.api_addr}:{member.api_port}: {failure_reason(failure)}")


def failed_before_sending(failure: Failure) -> bool:
    """The request never left: safe to try another peer."""
    return bool(failure.check(ConnectError, DNSLookupError, PeerPinMissing))


#: Methods a manager operation may be sent again for after a failure mid-request.
SAFE_METHODS = frozenset({b"GET", b"HEAD"})
#: Docker's answer to a Swarm operation on a node that is not a manager ("This node is not a
#: swarm manager..."), also its answer while a manager has no quorum.
NOT_A_MANAGER_STATUS = 503


def safe_to_retry(method: bytes, failure: Failure) -> bool:
    """Pure: whether a manager operation that failed this way may go to another manager:
    it never left, or it cannot have changed anything (GET/HEAD). A client that left
    (cancelled) is never retried."""
    if failure.check(CancelledError):
        return False
    return failed_before_sending(failure) or method in SAFE_METHODS


class PeerResponseTimeout(TimeoutError):
    """No response head from a peer agent within ``--peer-response-timeout``."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __str__(self) -> str:
        return f"no response from the agent within {self.seconds:g}s"


@implementer(IBodyProducer)
class _NotifyWhenSent:
    """A request body producer that says when its last byte went out (the response head
    deadline starts then: uploading a large body is not waiting for an answer)."""

    def __init__(self, inner: Any, sent: Callable[[], None]) -> None:
        self._inner = inner
        self._sent = sent
        self.length = inner.length

    def startProducing(self, consumer: Any) -> "Deferred[None]":  # noqa: N802
        def done(result: Any) -> Any:
            self._sent()
            return result

        return self._inner.startProducing(consumer).addCallback(done)

    def pauseProducing(self) -> None:  # noqa: N802
        self._inner.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self._inner.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        self._inner.stopProducing()


def forward_failure_kind(failure: Failure) -> str:
    """Pure: the ``reason`` label of a forwarding failure (a small fixed set, for metrics)."""
    if failure.check(PeerPinMissing):
        return "tls"
    if failure.check(MemberGone):
        return "member_dead"
    if failure.check(ConnectError, DNSLookupError):
        return "connect"
    if failure.check(TimeoutError):
        return "timeout"
    if failure.check(CancelledError):
        return "cancelled"
    reasons = getattr(failure.value, "reasons", None) or []
    if any(r.check(SSL.Error) for r in reasons):
        return "tls"
    if failure.check(ResponseNeverReceived, ResponseFailed):
        return "upstream_closed"
    return "other"


class ForwardMetrics(Protocol):
    """What forwarding reports (:class:`portainer_agent.metrics.AgentMetrics`)."""

    def forwarded(self, node: str, kind: str, seconds: float) -> None: ...

    def forward_error(self, node: str, reason: str) -> None: ...

    def manager_failover(self, from_node: str) -> None: ...


class PeerForwarder:
    """Sends requests to peer agents: plain (streamed) HTTP and upgraded streams.

    ``alive(member)`` says whether membership still holds ``member`` live (a request that
    fails to a member that is not is failed with :class:`MemberGone`); the membership
    service calls :meth:`member_departed` when a member is declared dead."""

    def __init__(self, reactor: Any, policy: PeerTLSPolicy, pool: HTTPConnectionPool, local_name: Callable[[], str],
                 hijack: HijackProxy, connect_timeout: float = 5.0, cooperator: Any = task,
                 agent: IAgent | None = None, metrics: ForwardMetrics | None = None,
                 alive: Callable[[Member], bool] | None = None, response_timeout: float = 120.0) -> None:
        self._metrics = metrics
        self._reactor = reactor
        self._policy = policy
        self._local_name = local_name
        self._hijack = hijack
        self._timeout = connect_timeout
        self._response_timeout = response_timeout
        self._cooperator = cooperator
        self._alive = alive
        #: The pinned agent on the persistent pool (connections made through ``policy``).
        self.agent: IAgent = agent if agent is not None else Agent(
            reactor, contextFactory=policy, pool=pool, connectTimeout=connect_timeout)
        #: treq over :attr:`agent`, verbatim: every plain request to another agent goes through it.
        self.client = PeerClient(self.agent, reactor)

    def _marks(self, member: Member) -> dict[bytes, bytes]:
        return {TARGET_HEADER: member.node_name.encode("utf-8"),
                FORWARDED_HEADER: self._local_name().encode("utf-8")}

    def member_departed(self, member: Member) -> None:
        """Membership declared ``member`` dead (or it left): cut every connection to it, so
        whatever is in flight there fails now (:class:`MemberGone`)."""
        aborted = self._policy.connections.abort(member.api_addr, member.api_port)
        if aborted:
            log.warn("agent on node {node} declared {state}: {count} connection(s) to it cut",
                     node=member.node_name, state=member.state.value, count=aborted)

    def send(self, request: Request, member: Member, kind: str = "forward",
             headers: dict[bytes, bytes | None] | None = None) -> "Deferred[IResponse]":
        """An independent copy of ``request`` to ``member``'s agent (``kind``: the route kind
        it serves, for the metrics: forward, manager, aggregate; ``headers``: set on the copy,
        None removing the client's). Fires with the response
        once its head is in; fails with :class:`MemberGone` if membership declares the
        member dead first, and with :class:`PeerResponseTimeout` if the head is late."""
        deadline = _HeadDeadline(self._reactor, self._response_timeout)
        body = request_body_producer(request, self._cooperator)
        if body is not None:
            body = _NotifyWhenSent(body, deadline.start)
        try:
            pending = self.client.request(request.method, peer_base_url(member) + request.uri,
                                          upstream_headers(request, {**self._marks(member), **(headers or {})}), body)
        except PeerPinMissing as error:
            # The agent asks the policy while building the request, synchronously.
            pending = fail(error)
        except ValueError as error:
            raise AgentError(400, "Invalid request URL or method", str(error)) from None
        deadline.watch(pending)
        if body is None:
            deadline.start()
        pending.addErrback(self._explain, member, deadline)
        if self._metrics is not None:
            self._observe(pending, member.node_name, kind)
        return pending

    def _explain(self, failure: Failure, member: Member, deadline: "_HeadDeadline") -> Failure:
        """The failure as the cluster understands it: a member declared dead, or a late head."""
        if deadline.expired and failure.check(CancelledError):
            return Failure(PeerResponseTimeout(deadline.seconds))
        if not failure.check(CancelledError) and not failed_before_sending(failure) and not self.is_live(member):
            # (A request that never left stays a connection failure: another peer may take it.)
            return Failure(MemberGone(member.node_name))
        return failure

    def _observe(self, pending: "Deferred[IResponse]", node: str, kind: str) -> None:
        metrics, started = self._metrics, self._reactor.seconds()
        assert metrics is not None

        def answered(response: IResponse) -> IResponse:
            metrics.forwarded(node, kind, self._reactor.seconds() - started)
            return response

        def failed(failure: Failure) -> Failure:
            metrics.forward_error(node, forward_failure_kind(failure))
            return failure

        pending.addCallbacks(answered, failed)

    def render(self, request: Request, member: Member) -> Any:
        """Forward ``request`` to ``member`` and relay its answer."""
        log.debug("forwarding {method} {path} to {node}", method=request.method.decode("latin-1"),
                  path=request.path.decode("latin-1"), node=member.node_name)
        relay_pending(self.send(request, member), request, lambda f: self.unreachable(member, f))
        return NOT_DONE_YET

    def render_first(self, request: Request, candidates: Sequence[Member], what: str = "manager") -> Any:
        """Forward to the first candidate that can be reached (managers, leader first); see
        :class:`FirstReachable`."""
        attempt = FirstReachable(self, request, candidates, what)
        relay_pending(attempt.answer, request, attempt.error)
        return NOT_DONE_YET

    def is_live(self, member: Member) -> bool:
        """Whether membership still holds ``member`` live (always, without a membership view)."""
        return self._alive is None or self._alive(member)

    def failed_over(self, from_node: str) -> None:
        """A manager operation left ``from_node`` for the next manager (for the metrics)."""
        if self._metrics is not None:
            self._metrics.manager_failover(from_node)

    def unreachable(self, member: Member, failure: Failure) -> AgentError:
        """The 502 naming ``member`` for ``failure``, logged."""
        error = peer_unreachable(member, failure)
        log.warn("{message}: {details}", message=error.message, details=error.details)
        return error

    def open_stream(self, request: Request, member: Member) -> Any:
        """Splice an upgrade request (exec, attach, a websocket) to ``member``'s agent."""
        try:
            creator = self._policy.creator_for(member.api_addr, member.api_port)
        except PeerPinMissing as error:
            raise AgentError(502, f"Unable to reach the agent on node {member.node_name}", str(error)) from None
        inner = HostnameEndpoint(self._reactor, member.api_addr, member.api_port, timeout=self._timeout)
        endpoint = wrapClientTLS(creator, inner)
        host = peer_base_url(member)[len(b"https://"):]
        def unreachable(failure: Failure) -> AgentError:
            if self._metrics is not None:
                self._metrics.forward_error(member.node_name, forward_failure_kind(failure))
            return self.unreachable(member, failure)

        return self._hijack.open(request, endpoint, host, self._marks(member), unreachable)


class FirstReachable:
    """One manager operation: sent to the first candidate (managers, leader first) and, when
    the one it went to fails, to the next live one if that is safe (:func:`safe_to_retry`).

    ``answer`` fires with the response; cancelling it (the client left) cancels the attempt
    in flight, so its connection is closed rather than left with a late answer nobody reads.
    """

    def __init__(self, peers: PeerForwarder, request: Request, candidates: Sequence[Member], what: str) -> None:
        self._peers = peers
        self._request = request
        self._candidates = list(candidates)
        self._what = what
        self._failures: list[tuple[Member, Failure]] = []
        self._current: Deferred[IResponse] | None = None
        self._cancelled = False
        self.answer: Deferred[IResponse] = Deferred(canceller=self._cancel)
        self._attempt(0)

    def _cancel(self, _: Any) -> None:
        self._cancelled = True
        if self._current is not None and not self._current.called:
            self._current.cancel()

    def _attempt(self, index: int) -> None:
        member = self._candidates[index]
        self._current = self._peers.send(self._request, member, "manager")
        self._current.addCallbacks(self._answered, self._failed, callbackArgs=(index, member),
                                   errbackArgs=(index, member))

    def _answered(self, response: IResponse, index: int, member: Member) -> None:
        if self.answer.called:  # cancelled meanwhile: nobody reads it
            response.deliverBody(Drop())
            return
        following = self._next_live(index)
        if (response.code == NOT_A_MANAGER_STATUS and following is not None
                and self._request.method in SAFE_METHODS):
            # The node is no longer a manager (demoted; membership learns it within its
            # identity refresh): its Docker refused, so the next manager answers instead.
            log.info("{node} answered {status} to a {method} manager operation (no longer a manager?); "
                     "asking {next}", node=member.node_name, status=response.code,
                     method=self._request.method.decode("latin-1"), next=self._candidates[following].node_name)
            response.deliverBody(Drop())
            self._fail_over(member, following)
            return
        self.answer.callback(response)

    def _fail_over(self, member: Member, following: int) -> None:
        self._peers.failed_over(member.node_name)
        self._attempt(following)

    def _next_live(self, index: int) -> int | None:
        for following in range(index + 1, len(self._candidates)):
            if self._peers.is_live(self._candidates[following]):
                return following
        return None

    def _failed(self, failure: Failure, index: int, member: Member) -> None:
        if self._cancelled or self.answer.called:
            return
        self._failures.append((member, failure))
        log.warn("agent on {what} node {node} failed a {method} operation: {reason}", what=self._what,
                 node=member.node_name, method=self._request.method.decode("latin-1"),
                 reason=failure_reason(failure))
        following = self._next_live(index)
        if following is not None and safe_to_retry(self._request.method, failure):
            self._fail_over(member, following)
        else:
            self.answer.errback(failure)

    def error(self, failure: Failure) -> AgentError:
        failures = self._failures
        if failures and len(failures) == len(self._candidates) and all(
                failed_before_sending(f) for _, f in failures):
            details = "; ".join(f"{m.node_name}: {failure_reason(f)}" for m, f in failures)
            return AgentError(502, f"Unable to reach any agent on a {self._what} node", details)
        member = failures[-1][0] if failures else self._candidates[0]
        error = self._peers.unreachable(member, failure)
        if not safe_to_retry(self._request.method, failure):
            # It may have reached the manager: say so rather than retry a change.
            return AgentError(error.status, error.message,
                              f"{error.details}; the {self._request.method.decode('latin-1')} operation may have "
                              "been applied, so it was not sent to another manager")
        return error
