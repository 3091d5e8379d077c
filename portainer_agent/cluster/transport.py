"""The AMP transport: SWIM messages between agents over persistent, authenticated connections.

Thin by design: it encodes, authenticates, pages and keeps connections; every decision is
the state machine's (:mod:`.swim`). Connection establishment is injected (``connect``), so
tests run it over ``twisted.test.iosim`` and production over TLS (:mod:`.service`).

Security: a connection carries no member data in either direction until both sides proved
knowledge of the cluster key (:mod:`.auth`). When the peer is a member we already know, its
TLS key must also match the SPKI pin it published in its (authenticated) member record.
Seeds found through DNS have no pin yet; for them the HMAC, which is bound to the server's
TLS key, is the authentication.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Generator, Sequence, cast

from twisted.internet.defer import Deferred, DeferredList, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from portainer_agent.cluster import auth
from portainer_agent.cluster.commands import (
    PROTOCOL_VERSION,
    AuthenticationFailed,
    Gossip,
    Hello,
    Leave,
    ListState,
    NotAuthenticated,
    Ping,
    PingRequest,
    Prove,
    PullState,
    PushState,
    UnsupportedProtocol,
    decode_members,
    decode_updates,
    encode_member,
    encode_updates,
    page_after,
    paginate,
)
from portainer_agent.cluster.dissemination import Update
from portainer_agent.cluster.member import Member, MemberState, PeerAddress
from portainer_agent.cluster.swim import Clock, SwimNode
from portainer_agent.timers import cancel_timer, cancel_timer_when_done
from portainer_agent.tls.certs import certificate_spki_fingerprint

if TYPE_CHECKING:
    from OpenSSL.crypto import X509

log = Logger(namespace="portainer_agent.cluster")

#: A connection must authenticate within this time or it is dropped.
AUTH_TIMEOUT = 10.0
_OPEN_COMMANDS = {b"Hello", b"Prove"}


class OwnAddress(Exception):
    """The peer turned out to be this agent (its own address came back from DNS)."""


class PinMismatch(Exception):
    """The peer's TLS key is not the one its member record announced."""


def peer_spki_fingerprint(transport: Any) -> str:
    """SPKI SHA-256 (hex) of the certificate the TLS peer presented, '' without TLS."""
    if not ISSLTransport.providedBy(transport):
        return ""
    # ISSLTransport declares an ``object``; Twisted's TLS gives pyOpenSSL's X509 or None.
    certificate = cast("X509 | None", transport.getPeerCertificate())
    if certificate is None:
        return ""
    return certificate_spki_fingerprint(certificate.to_cryptography())


class ClusterProtocol(amp.AMP):
    """One agent-to-agent connection, either side.

    The server side answers SWIM commands once the client has authenticated. The client side
    (the one that dialled) answers nothing: peers talk to us on their own connections."""

    def __init__(
        self,
        node: SwimNode,
        key: bytes | None,
        clock: Clock,
        server: bool,
        local_fingerprint: str = "",
        on_lost: Callable[["ClusterProtocol"], None] | None = None,
    ) -> None:
        super().__init__()
        self.node = node
        self.key = key
        self.clock = clock
        self.server = server
        self.local_fingerprint = local_fingerprint
        self.on_lost = on_lost
        self.authenticated = False
        self.closed: Deferred | None = None
        self.closing = False
        self.peer_origin = ""
        self._client_nonce = b""
        self._server_nonce = b""
        self._auth_timer: Any = None
        #: Where a peer's list cache state goes (``(node, boot, generation)``), if anywhere.
        self.list_states: Callable[[str, str, int], None] | None = None

    # ------------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.server:
            self._auth_timer = self.clock.callLater(AUTH_TIMEOUT, self._auth_timed_out)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        if self.on_lost is not None:
            self.on_lost(self)
        if self.closed is not None and not self.closed.called:
            self.closed.callback(None)
        # A hint to probe the peer now, unless the close was orderly: we closed it, or the peer
        # said goodbye (TLS close_notify / clean FIN). A killed agent cannot say goodbye.
        if self.authenticated and self.peer_origin and not self.closing and not reason.check(ConnectionDone):
            self.node.peer_connection_lost(self.peer_origin)

    def busy(self) -> bool:
        """Requests of ours still awaiting an answer (AMP keeps them by tag)."""
        return bool(getattr(self, "_outstandingRequests", None))

    def close_quietly(self) -> None:
        """Close without hinting that the peer failed (connection reaping, shutdown)."""
        self.closing = True
        if self.transport is not None:
            self._wire().loseConnection()

    def _auth_timed_out(self) -> None:
        log.warn("dropping a cluster connection that did not authenticate in time")
        self._wire().loseConnection()

    def locateResponder(self, name: bytes) -> Any:  # noqa: N802 (AMP API)
        """Gatekeeper: before authentication only the challenge commands are answered, and
        the client side of a connection answers nothing at all."""
        if self.server and (self.authenticated or name in _OPEN_COMMANDS):
            return super().locateResponder(name)
        return self._refuse

    def _refuse(self, box: amp.AmpBox) -> Deferred:
        log.warn(
            "refused cluster command {command} on an unauthenticated connection from {peer}",
            command=box.get(b"_command", b"?").decode("latin-1", "replace"), peer=self._peer_description(),
        )
        self.clock.callLater(0, self._wire().loseConnection)
        return fail(amp.RemoteAmpError(b"NOT_AUTHENTICATED", "authenticate first"))

    def _peer_description(self) -> str:
        try:
            peer = self._wire().getPeer()
            return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        except Exception:  # noqa: BLE001 - describing a peer must never fail a connection
            return "?"

    def _wire(self) -> Any:
        """The underlying transport (typed loosely: zope interfaces are opaque to mypy)."""
        return self.transport

    def _server_pin(self) -> str:
        return self.local_fingerprint if ISSLTransport.providedBy(self.transport) else ""

    # ------------------------------------------------------------------ server: challenge

    @Hello.responder
    def hello(self, nonce: bytes, origin: str, protocol: int) -> dict[str, Any]:
        if protocol != PROTOCOL_VERSION:
            raise UnsupportedProtocol(f"protocol {protocol} (we speak {PROTOCOL_VERSION})")
        if len(nonce) != auth.NONCE_BYTES or self._server_nonce:
            raise AuthenticationFailed("bad hello")
        self._client_nonce = nonce
        self._server_nonce = auth.new_nonce()
        self.peer_origin = origin[:300]
        server_proof = b""
        if self.key is not None:
            server_proof = auth.proof(self.key, b"server", nonce, self._server_nonce, self._server_pin())
        return {"nonce": self._server_nonce, "origin": self.node.local.key, "proof": server_proof}

    @Prove.responder
    def prove(self, proof: bytes) -> dict[str, Any]:
        if not self._server_nonce:
            raise NotAuthenticated("hello first")
        if self.key is not None and not auth.check(
            self.key, b"client", self._client_nonce, self._server_nonce, self._server_pin(), proof
        ):
            log.warn("cluster peer {peer} failed authentication", peer=self._peer_description())
            self.clock.callLater(0, self._wire().loseConnection)
            raise AuthenticationFailed("wrong cluster key")
        self.authenticated = True
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        return {}

    # ------------------------------------------------------------------ server: SWIM

    @Ping.responder
    def ping(self, updates: list[dict[str, Any]]) -> dict[str, Any]:
        acks = self.node.handle_ping(decode_updates(updates))
        return {"updates": encode_updates(acks)}

    @PingRequest.responder
    def ping_request(
        self, target_host: str, target_port: int, target_fingerprint: str, updates: list[dict[str, Any]]
    ) -> Deferred:
        target = PeerAddress(target_host, target_port, target_fingerprint or None)
        d = self.node.handle_ping_request(target, decode_updates(updates))
        return d.addCallback(lambda ack: {"ack": bool(ack)})

    @Gossip.responder
    def gossip(self, updates: list[dict[str, Any]]) -> dict[str, Any]:
        self.node.handle_gossip(decode_updates(updates))
        return {}

    @ListState.responder
    def list_state(self, node: str, boot: str, generation: int) -> dict[str, Any]:
        if self.list_states is not None:
            self.list_states(node, boot, generation)
        return {}

    @PushState.responder
    def push_state(self, members: list[dict[str, Any]], join: bool) -> dict[str, Any]:
        self.node.merge_state(decode_members(members), source=self.peer_origin)
        return {}

    @PullState.responder
    def pull_state(self, after: str) -> dict[str, Any]:
        page, following = page_after(self.node.full_state(), after)
        return {"members": page, "next": following}

    @Leave.responder
    def leave(self, member: list[dict[str, Any]]) -> dict[str, Any]:
        for record in decode_members(member):
            self.node.handle_leave(record)
        return {}

    # ------------------------------------------------------------------ client: challenge

    @inlineCallbacks
    def authenticate(self, peer: PeerAddress) -> Generator[Any, Any, "ClusterProtocol"]:
        """Run the challenge as the client; fires with ``self`` once both sides are proven."""
        nonce = auth.new_nonce()
        answer = yield self.callRemote(Hello, nonce=nonce, origin=self.node.local.key, protocol=PROTOCOL_VERSION)
        if answer["origin"] == self.node.local.key:
            raise OwnAddress(peer.key)
        presented = peer_spki_fingerprint(self.transport)
        if peer.fingerprint and presented and presented != peer.fingerprint:
            raise PinMismatch(f"{peer.key} presented {presented[:16]}..., expected {peer.fingerprint[:16]}...")
        client_proof = b""
        if self.key is not None:
            if not auth.check(self.key, b"server", nonce, answer["nonce"], presented, answer["proof"]):
                raise AuthenticationFailed(f"{peer.key} does not know the cluster key")
            client_proof = auth.proof(self.key, b"client", nonce, answer["nonce"], presented)
        yield self.callRemote(Prove, proof=client_proof)
        self.authenticated = True
        self.peer_origin = answer["origin"]
        return self


Connector = Callable[[PeerAddress, ClusterProtocol], "Deferred[ClusterProtocol]"]


class AmpPeerTransport:
    """:class:`~portainer_agent.cluster.swim.PeerTransport` over AMP.

    Keeps one authenticated connection per peer, opened on first use; a failed or lost
    connection is forgotten and re-dialled on the next message."""

    def __init__(
        self,
        clock: Clock,
        connect: Connector,
        key: bytes | None,
        connect_timeout: float = 3.0,
        max_connections: int = 64,
    ) -> None:
        self.clock = clock
        self._connect = connect
        self.key = key
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.node: SwimNode | None = None
        #: Peers' list cache states arriving on server connections go here (set by the agent).
        self.on_list_state: Callable[[str, str, int], None] | None = None
        self._connections: dict[str, Deferred] = {}
        self._open: dict[str, ClusterProtocol] = {}
        self._waiters: dict[str, list[Deferred]] = {}
        self._all: set[ClusterProtocol] = set()

    # ------------------------------------------------------------------ connections

    def protocol(self, server: bool, local_fingerprint: str = "") -> ClusterProtocol:
        """A protocol for a new connection, tracked until it is lost (so stop can close it)."""
        assert self.node is not None, "bind the transport to a node first"
        protocol = ClusterProtocol(self.node, self.key, self.clock, server, local_fingerprint)
        protocol.list_states = self._list_state
        protocol.closed = Deferred()
        self._all.add(protocol)
        protocol.closed.addBoth(lambda _: self._all.discard(protocol))
        return protocol

    def connection(self, peer: PeerAddress) -> Deferred:
        """An authenticated client connection to ``peer`` (shared by concurrent callers)."""
        opened = self._open.pop(peer.key, None)
        if opened is not None:
            self._open[peer.key] = opened  # most recently used last
            return succeed(opened)
        waiter: Deferred = Deferred()
        waiters = self._waiters.get(peer.key)
        if waiters is None:
            self._waiters[peer.key] = [waiter]
            self._connections[peer.key] = self._dial(peer)
        else:
            waiters.append(waiter)
        return waiter

    def _dial(self, peer: PeerAddress) -> Deferred:
        protocol = self.protocol(server=False)
        protocol.on_lost = lambda p: self._forget(peer.key, p)
        attempt = self._connect(peer, protocol)
        attempt.addCallback(lambda p: p.authenticate(peer))
        timer = self.clock.callLater(self.connect_timeout, attempt.cancel)

        def done(result: Any) -> None:
            cancel_timer(timer)
            self._connections.pop(peer.key, None)
            waiters = self._waiters.pop(peer.key, [])
            if not isinstance(result, Failure):
                self._open[peer.key] = result
                self._reap_connections()
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            if isinstance(result, Failure):
                if result.check(OwnAddress):
                    log.info("cluster address {address} is this agent; ignoring it", address=peer.key)
                elif result.check(AuthenticationFailed, PinMismatch):
                    log.warn("refusing cluster peer {address}: {error}", address=peer.key,
                             error=result.getErrorMessage())
                else:
                    log.debug("cannot reach cluster peer {address}: {error}", address=peer.key,
                              error=result.getErrorMessage())
                if protocol.transport is not None:
                    protocol._wire().loseConnection()

        return attempt.addBoth(done)

    def _forget(self, key: str, protocol: ClusterProtocol) -> None:
        if self._open.get(key) is protocol:
            del self._open[key]

    def _reap_connections(self) -> None:
        """Keep at most ``max_connections`` client connections: in a large cluster each node
        probes everyone in turn, and one idle TLS connection per member would exhaust file
        descriptors. The least recently used goes (re-dialled on its next probe)."""
        excess = len(self._open) - self.max_connections
        for key, protocol in list(self._open.items()):
            if excess <= 0:
                break
            if protocol.busy():
                continue  # a state exchange or probe is in flight on it
            del self._open[key]
            protocol.close_quietly()
            excess -= 1

    def close(self, timeout: float = 2.0) -> Deferred:
        """Close every connection, both directions (on stop); fires once all are gone,
        aborting the stragglers after ``timeout``."""
        for pending in list(self._connections.values()):
            pending.cancel()
        self._connections.clear()
        self._open.clear()
        protocols = [p for p in self._all if p.transport is not None]
        for protocol in protocols:
            protocol.close_quietly()

        def abort() -> None:
            for protocol in protocols:
                if protocol.transport is not None and hasattr(protocol.transport, "abortConnection"):
                    protocol.transport.abortConnection()

        timer = self.clock.callLater(timeout, abort)
        done = DeferredList([p.closed for p in protocols if p.closed is not None], consumeErrors=True)

        return cancel_timer_when_done(done, timer).addCallback(lambda _: None)

    def _call(self, peer: PeerAddress, command: type[amp.Command], **arguments: Any) -> Deferred:
        d = self.connection(peer)
        d.addCallback(lambda protocol: protocol.callRemote(command, **arguments))
        return d

    # ------------------------------------------------------------------ PeerTransport

    def ping(self, peer: PeerAddress, updates: Sequence[Update]) -> Deferred:
        d = self._call(peer, Ping, updates=encode_updates(updates))
        return d.addCallback(lambda answer: decode_updates(answer["updates"]))

    def ping_request(self, helper: PeerAddress, target: PeerAddress, updates: Sequence[Update]) -> Deferred:
        d = self._call(
            helper, PingRequest, target_host=target.host, target_port=target.port,
            target_fingerprint=target.fingerprint or "", updates=encode_updates(updates),
        )
        return d.addCallback(lambda answer: bool(answer["ack"]))

    def gossip(self, peer: PeerAddress, updates: Sequence[Update]) -> None:
        self._call(peer, Gossip, updates=encode_updates(updates)).addErrback(lambda _: None)

    @inlineCallbacks
    def exchange_state(
        self, peer: PeerAddress, members: Sequence[Member], join: bool
    ) -> Generator[Any, Any, list[Member]]:
        """Push our state page by page, then pull theirs page by page."""
        protocol = yield self.connection(peer)
        for page in paginate(members):
            yield protocol.callRemote(PushState, members=page, join=join)
        received: list[Member] = []
        after = ""
        for _ in range(100_000):  # bounded: a page always advances the cursor
            answer = yield protocol.callRemote(PullState, after=after)
            received.extend(decode_members(answer["members"]))
            if not answer["next"] or answer["next"] <= after:
                break
            after = answer["next"]
        return received

    def _list_state(self, node: str, boot: str, generation: int) -> None:
        if self.on_list_state is not None:
            self.on_list_state(node, boot, generation)

    def list_state(self, peer: PeerAddress, node: str, boot: str, generation: int) -> Deferred:
        """Tell ``peer`` this agent's list cache state; fires when it has heard it."""
        return self._call(peer, ListState, node=node, boot=boot, generation=generation)

    def leave(self, peer: PeerAddress, member: Member) -> Deferred:
        d = self._call(peer, Leave, member=[encode_member(member)])
        return d.addCallback(lambda _: None)


__all__ = [
    "AmpPeerTransport",
    "ClusterProtocol",
    "MemberState",
    "OwnAddress",
    "PinMismatch",
    "peer_spki_fingerprint",
]
