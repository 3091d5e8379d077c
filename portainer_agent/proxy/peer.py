"""Another agent of the cluster as an upstream: pinned HTTPS through one persistent pool.

A request for another node goes to that node's agent, which checks the Portainer signature
itself (the headers are forwarded, so a forwarded request has no more power than the
original) and serves it locally: the target header is set to the peer's node name and the
request is marked with :data:`~portainer_agent.routing.FORWARDED_HEADER`, so it is never
forwarded again. The client's URI goes as it is (``/v1.41`` and ``/v2`` prefixes, query).

TLS: every peer presents the self-signed certificate whose SPKI fingerprint it announced in
its membership record. When membership is authenticated (a cluster key), that fingerprint
is trusted and the connection is pinned to it; without a key the record could come from
anyone, so, like the original agent, the connection is not verified (logged once).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Protocol, Sequence

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl, task
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IAgent, IPolicyForHTTPS, IResponse
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from portainer_agent.cluster.member import Member
from portainer_agent.errors import AgentError
from portainer_agent.proxy.outgoing import request_body_producer, upstream_headers
from portainer_agent.proxy.relay import failure_reason, relay_pending
from portainer_agent.proxy.splice import HijackProxy
from portainer_agent.routing import FORWARDED_HEADER, TARGET_HEADER

log = Logger()


class PeerPinMissing(Exception):
    """Membership is authenticated but has no certificate pin for this address."""


def certificate_spki_fingerprint(cert: crypto.X509) -> str:
    """Hex SHA-256 of a presented certificate's SubjectPublicKeyInfo (as in membership)."""
    spki = cert.to_cryptography().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


@implementer(IOpenSSLClientConnectionCreator)
class _ConnectionCreator:
    """Client TLS connections with a handshake deadline: the connect timeout covers TCP only,
    and a peer that accepts but never answers (stopped, overloaded) must not hold a request."""

    def __init__(self, context: SSL.Context, clock: Any = None, handshake_timeout: float = 0.0) -> None:
        self._context = context
        self._clock = clock
        self._timeout = handshake_timeout

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._clock is not None and self._timeout > 0:
            timer = self._clock.callLater(self._timeout, _abort, tlsProtocol)

            def handshake_progress(conn: SSL.Connection, where: int, ret: int) -> None:
                if where & SSL.SSL_CB_HANDSHAKE_DONE and timer.active():
                    timer.cancel()

            connection.set_info_callback(handshake_progress)
        return connection


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
        return depth != 0 or certificate_spki_fingerprint(cert) == fingerprint

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
                 handshake_timeout: float = 0.0) -> None:
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
            return _ConnectionCreator(self._unverified, self._clock, self._handshake_timeout)
        fingerprint = self._pin_for(host, port)
        if not fingerprint:
            raise PeerPinMissing(f"no certificate fingerprint known for the agent at {host}:{port}")
        if fingerprint not in self._contexts:
            self._contexts[fingerprint] = _pinned_context(fingerprint)
        return _ConnectionCreator(self._contexts[fingerprint], self._clock, self._handshake_timeout)

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


def forward_failure_kind(failure: Failure) -> str:
    """Pure: the ``reason`` label of a forwarding failure (a small fixed set, for metrics)."""
    if failure.check(PeerPinMissing):
        return "tls"
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


class PeerForwarder:
    """Sends requests to peer agents: plain (streamed) HTTP and upgraded streams."""

    def __init__(self, reactor: Any, policy: PeerTLSPolicy, pool: HTTPConnectionPool, local_name: Callable[[], str],
                 hijack: HijackProxy, connect_timeout: float = 5.0, cooperator: Any = task,
                 agent: IAgent | None = None, metrics: ForwardMetrics | None = None) -> None:
        self._metrics = metrics
        self._reactor = reactor
        self._policy = policy
        self._local_name = local_name
        self._hijack = hijack
        self._timeout = connect_timeout
        self._cooperator = cooperator
        self.agent: IAgent = agent if agent is not None else Agent(
            reactor, contextFactory=policy, pool=pool, connectTimeout=connect_timeout)

    def _marks(self, member: Member) -> dict[bytes, bytes]:
        return {TARGET_HEADER: member.node_name.encode("utf-8"),
                FORWARDED_HEADER: self._local_name().encode("utf-8")}

    def send(self, request: Request, member: Member, kind: str = "forward") -> "Deferred[IResponse]":
        """An independent copy of ``request`` to ``member``'s agent (``kind``: the route kind
        it serves, for the metrics: forward, manager, aggregate)."""
        body = request_body_producer(request, self._cooperator)
        try:
            pending = self.agent.request(request.method, peer_base_url(member) + request.uri,
                                         upstream_headers(request, self._marks(member)), body)
        except PeerPinMissing as error:
            # Agent asks the policy while building the request, synchronously.
            pending = fail(error)
        except ValueError as error:
            raise AgentError(400, "Invalid request URL or method", str(error)) from None
        if self._metrics is not None:
            self._observe(pending, member.node_name, kind)
        return pending

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
        relay_pending(self.send(request, member), request, lambda f: self._unreachable(member, f))
        return NOT_DONE_YET

    def render_first(self, request: Request, candidates: Sequence[Member], what: str = "manager") -> Any:
        """Forward to the first candidate that can be reached (managers, leader first)."""
        failures: list[tuple[Member, Failure]] = []
        answer: Deferred[IResponse] = Deferred()

        def attempt(index: int) -> None:
            member = candidates[index]
            pending = self.send(request, member, "manager")
            pending.addCallbacks(answer.callback, retry, errbackArgs=(index, member))

        def retry(failure: Failure, index: int, member: Member) -> None:
            failures.append((member, failure))
            log.warn("agent on {what} node {node} unreachable: {reason}", what=what, node=member.node_name,
                     reason=failure_reason(failure))
            if failed_before_sending(failure) and index + 1 < len(candidates) and not answer.called:
                attempt(index + 1)
            else:
                answer.errback(failure)

        def all_failed(failure: Failure) -> AgentError:
            if len(failures) == len(candidates) and all(failed_before_sending(f) for _, f in failures):
                details = "; ".join(f"{m.node_name}: {failure_reason(f)}" for m, f in failures)
                return AgentError(502, f"Unable to reach any agent on a {what} node", details)
            return self._unreachable(failures[-1][0] if failures else candidates[0], failure)

        attempt(0)
        relay_pending(answer, request, all_failed)
        return NOT_DONE_YET

    def _unreachable(self, member: Member, failure: Failure) -> AgentError:
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
            return self._unreachable(member, failure)

        return self._hijack.open(request, endpoint, host, self._marks(member), unreachable)
