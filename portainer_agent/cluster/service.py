"""The membership service: the thin shell that gives the SWIM state machine real I/O.

``startService``: find our advertise and cluster addresses (options, else the container's
Swarm facts), listen for AMP over TLS on the cluster port, start the SWIM loops, start joining,
and re-read the Docker identity every few seconds so a promotion or a leader change spreads
within seconds (a changed record bumps our incarnation). ``stopService`` (SIGTERM): broadcast a
leave so peers drop us at once, then close.

TLS choice: the cluster port serves the agent's own certificate. Dialling a *known* member, we
require the SPKI pin from its authenticated member record; dialling a seed found through DNS
(no record yet), we accept any certificate and rely on the HMAC challenge, which is bound to
the server's SPKI so it cannot be relayed. Without a cluster key there is no authentication at
all (logged as a warning at start).
"""
from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any, Callable

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IListeningPort, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer  # type: ignore[import-untyped]

from portainer_agent.cluster.discovery import (
    ContainerFacts,
    choose_advertise_address,
    default_cluster_address,
    inspect_own_container,
)
from portainer_agent.cluster.joining import (
    ClusterAddress,
    InvalidClusterAddress,
    Joiner,
    Resolver,
    parse_cluster_address,
)
from portainer_agent.cluster.member import Member, PeerAddress
from portainer_agent.cluster.membership import MembershipView
from portainer_agent.cluster.swim import SwimNode, SwimSettings
from portainer_agent.cluster.transport import AmpPeerTransport, ClusterProtocol

log = Logger(namespace="portainer_agent.cluster")

IDENTITY_REFRESH_INTERVAL = 5.0


def system_resolver(reactor: Any) -> Resolver:
    """Every address ``getaddrinfo`` knows for a name (A and AAAA; /etc/hosts included), in a
    thread. Docker's embedded DNS answers ``tasks.<service>`` with one record per task."""

    def resolve(host: str) -> "Deferred[list[str]]":
        try:
            return succeed([str(ipaddress.ip_address(host))])
        except ValueError:
            pass
        d = deferToThreadPool(reactor, reactor.getThreadPool(), socket.getaddrinfo, host, None, 0,
                              socket.SOCK_STREAM)
        return d.addCallback(_distinct_addresses)

    return resolve


def _distinct_addresses(infos: Any) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@implementer(IOpenSSLClientConnectionCreator)
class _AnyCertificate:
    """Client TLS that accepts any server certificate: pinning and the HMAC challenge
    (bound to the presented key) authenticate the peer at the protocol level."""

    def __init__(self) -> None:
        options = ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        self._context = options.getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], ClusterProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> ClusterProtocol:  # noqa: N802
        return self._build()


class _ClientFactory(Factory):
    """One connection, one given protocol (``connectProtocol`` without its log lines)."""

    noisy = False

    def __init__(self, protocol: ClusterProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> ClusterProtocol:  # noqa: N802
        return self._protocol


class ClusterService(Service):
    """Cluster membership for one agent; ``view`` is what routing and ``/agents`` read."""

    def __init__(
        self,
        reactor: Any,
        *,
        identity: Any,
        api_port: int | Callable[[], "Deferred[int]"],
        cluster_port: int,
        fingerprint: str,
        server_tls: ssl.CertificateOptions | None,
        version: str,
        key: bytes | None,
        cluster_addr: str | None = None,
        advertise_addr: str | None = None,
        listen_host: str = "0.0.0.0",
        settings: SwimSettings = SwimSettings(),
        refresh_identity: Callable[[], "Deferred[Any]"] | None = None,
        refresh_interval: float = IDENTITY_REFRESH_INTERVAL,
        docker: Any = None,
        resolve: Resolver | None = None,
        metrics: Any = None,
        ports: Any = None,
    ) -> None:
        self.reactor = reactor
        #: A :class:`~portainer_agent.listening.BoundPorts` to record the bound cluster port in.
        self.ports = ports
        #: An :class:`~portainer_agent.metrics.AgentMetrics` (None: not measured).
        self.metrics = metrics
        self.identity = identity
        # The API port peers reach us at: a number, or (for --port 0) the API listener's
        # bound port, learnt before the local member is first advertised.
        self._api_port = api_port
        self.api_port = api_port if isinstance(api_port, int) else 0
        #: Configured, then the bound port once listening (port 0: the kernel's choice).
        self.cluster_port = cluster_port
        self.fingerprint = fingerprint
        self.server_tls = server_tls
        self.version = version
        self.key = key
        self.configured_cluster_addr = cluster_addr
        self.configured_advertise_addr = advertise_addr
        self.listen_host = listen_host
        self.settings = settings
        self.refresh_identity = refresh_identity
        self.refresh_interval = refresh_interval
        self.docker = docker
        self.resolve = resolve or system_resolver(reactor)
        self.transport = AmpPeerTransport(reactor, self._connect, key)
        self.node: SwimNode | None = None
        self.joiner: Joiner | None = None
        self.port: IListeningPort | None = None
        self.view = MembershipView(self)
        self._provisional = self._local_member(advertise_addr or identity.node_addr or "127.0.0.1")
        self._refresher: LoopingCall | None = None
        self._refreshing = False
        self._started: Deferred | None = None

    # ------------------------------------------------------------------ MemberSource

    @property
    def local(self) -> Member:
        return self.node.local if self.node is not None else self._provisional

    def live_members(self) -> list[Member]:
        return self.node.live_members() if self.node is not None else [self._provisional]

    # ------------------------------------------------------------------ lifecycle

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._started = self._start()
        self._started.addErrback(self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        log.error("cluster membership failed to start, this agent stays alone: {error}",
                  error=failure.getErrorMessage())

    @inlineCallbacks
    def _start(self) -> Any:
        facts = ContainerFacts()
        needs_facts = not (self.configured_advertise_addr and self.configured_cluster_addr)
        if needs_facts and self.docker is not None:
            try:
                facts = yield inspect_own_container(self.docker)
            except Exception as error:  # noqa: BLE001 - discovery is best effort
                log.info("cannot inspect our own container: {error}", error=str(error))
        advertise = choose_advertise_address(self.configured_advertise_addr, facts, self.identity.node_addr)
        cluster_text = default_cluster_address(self.configured_cluster_addr, facts)
        address: ClusterAddress | None = None
        if cluster_text:
            try:
                address = parse_cluster_address(cluster_text, self.cluster_port)
            except InvalidClusterAddress as error:
                log.error("invalid cluster address {address!r}: {error}; this agent runs alone",
                          address=cluster_text, error=str(error))
        if not isinstance(self._api_port, int):
            self.api_port = yield self._api_port()
        if not self.running:
            return
        yield self._listen()
        if not self.running:  # stopped while we were starting
            listening: Any = self.port
            self.port = None
            if listening is not None:
                yield listening.stopListening()
            return
        if address is not None and address.port == 0:
            log.error("--cluster-port is 0 and --cluster-addr {address!r} names no port: give the port to join "
                      "at; this agent runs alone", address=cluster_text)
            address = None
        if self.key is None:
            log.warn("no cluster key (set AGENT_SECRET or --cluster-key): cluster membership is unauthenticated; "
                     "anyone reaching port {port} can join", port=self.cluster_port)
        # Built once listening, so the member advertises the bound ports. The listener
        # fired synchronously (a TCP bind), and with it this method: no connection was
        # accepted before the transport has its node.
        local = self._local_member(advertise)
        probes: Any = self.transport
        if self.metrics is not None:
            from portainer_agent.metrics import TimedPings

            probes = TimedPings(self.transport, self.metrics, self.reactor.seconds)
        self.node = SwimNode(local, self.reactor, probes, self.settings)
        self.transport.node = self.node
        self.node.add_listener(self._member_changed)
        if self.metrics is not None:
            self.node.add_listener(self.metrics.member_changed)
            self.metrics.watch_members(self.node.members)
        self.node.start()
        if address is not None:
            self.joiner = Joiner(self.node, address, self.resolve, self.reactor,
                                 own_addresses={advertise, self.listen_host})
            self.joiner.start()
            log.info("cluster membership on {advertise}:{port}, joining {address}",
                     advertise=advertise, port=self.cluster_port, address=str(address))
        else:
            log.warn("no cluster address (--cluster-addr) and not a Swarm service task: this agent runs alone; "
                     "other agents may still join it on {advertise}:{port}", advertise=advertise,
                     port=self.cluster_port)
        if self.refresh_identity is not None:
            self._refresher = LoopingCall(self._refresh)
            self._refresher.clock = self.reactor
            self._refresher.start(self.refresh_interval, now=False).addErrback(
                lambda f: log.failure("identity refresh loop stopped", f))

    def _listen(self) -> "Deferred[IListeningPort]":
        inner_class = TCP6ServerEndpoint if ":" in self.listen_host else TCP4ServerEndpoint
        inner: Any = inner_class(self.reactor, self.cluster_port, backlog=64, interface=self.listen_host)
        factory = _ServerFactory(lambda: self.transport.protocol(server=True, local_fingerprint=self.fingerprint))
        if self.server_tls is not None:
            from portainer_agent.tls.server import TLSServerEndpoint

            endpoint: Any = TLSServerEndpoint(inner, self.server_tls)
        else:
            endpoint = inner
        d = endpoint.listen(factory)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            self.cluster_port = port.getHost().port  # type: ignore[attr-defined]
            log.info("cluster port listening on {host}:{port} (AMP over TLS)", host=self.listen_host,
                     port=self.cluster_port, listener="cluster")
            if self.ports is not None:
                self.ports.record("cluster", self.cluster_port)
            return port

        return d.addCallback(listening)

    def _connect(self, peer: PeerAddress, protocol: ClusterProtocol) -> "Deferred[ClusterProtocol]":
        endpoint_class = TCP6ClientEndpoint if ":" in peer.host else TCP4ClientEndpoint
        endpoint: Any = endpoint_class(self.reactor, peer.host, peer.port, timeout=3)
        if self.server_tls is not None:
            creator: Any = _AnyCertificate()
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint.connect(_ClientFactory(protocol)).addCallback(lambda _: protocol)

    @inlineCallbacks
    def stopService(self) -> Any:  # noqa: N802
        super().stopService()
        if self.joiner is not None:
            self.joiner.stop()
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        if self.node is not None and self.node.running:
            log.info("leaving the cluster")
            yield self.node.leave(timeout=1.0)
        if self.port is not None:
            port: Any = self.port
            self.port = None
            yield port.stopListening()
        yield self.transport.close()

    # ------------------------------------------------------------------ identity

    def _local_member(self, advertise: str) -> Member:
        identity = self.identity
        return Member(
            node_name=identity.name or socket.gethostname(),
            node_id=identity.node_id,
            role=identity.role,
            is_leader=bool(identity.is_leader),
            api_addr=advertise,
            api_port=self.api_port,
            cluster_addr=advertise,
            cluster_port=self.cluster_port,
            version=self.version,
            cert_fingerprint=self.fingerprint,
            boot=int(time.time() * 1000),
        )

    @inlineCallbacks
    def _refresh(self) -> Any:
        """Re-read ``docker info``: a changed role or leader flag bumps our incarnation."""
        if self._refreshing or self.node is None or self.refresh_identity is None:
            return
        self._refreshing = True
        try:
            identity = yield self.refresh_identity()
        except Exception as error:  # noqa: BLE001 - Docker may be briefly unavailable
            log.debug("identity refresh failed: {error}", error=str(error))
            return
        finally:
            self._refreshing = False
        before = self.node.local
        if self.node.update_local(node_name=identity.name or before.node_name, node_id=identity.node_id,
                                  role=identity.role, is_leader=bool(identity.is_leader)):
            after = self.node.local
            log.info("node identity changed: role {before_role} -> {role}, leader {before_leader} -> {leader}",
                     before_role=before.role, role=after.role, before_leader=before.is_leader,
                     leader=after.is_leader)
        self.identity = identity


    def _member_changed(self, old: Member | None, new: Member) -> None:
        if self.node is not None and new.key == self.node.local.key:
            return
        _log_transitions(old, new)
        if new.is_live and (old is None or not old.is_live):
            self.view.conflicts()  # logs a warning for each new duplicate node name
        if old is not None and old.is_live and not new.is_live:
            self.view.member_departed(new)


def _log_transitions(old: Member | None, new: Member) -> None:
    """One info line per liveness change of another member (not per gossip message)."""
    if old is not None and old.state is new.state:
        return
    if old is None:
        log.info("member {node} ({address}, {role}) joined", node=new.node_name, address=new.key,
                 role=new.role or "-")
    else:
        log.info("member {node} ({address}) is now {state}", node=new.node_name, address=new.key,
                 state=new.state.value)


def build_cluster_service(config: Any, identity: Any, tls: Any, reactor: Any, docker: Any,
                          metrics: Any = None, api_port: "int | Callable[[], Deferred[int]] | None" = None,
                          ports: Any = None) -> ClusterService:
    """The membership service for the agent's ``Config``, in a Swarm (outside one, the
    agent imports none of this module: see :mod:`portainer_agent.tap`)."""
    from portainer_agent import __version__
    from portainer_agent.docker.identity import fetch_identity
    from portainer_agent.tls.server import server_options

    service = ClusterService(
        reactor,
        identity=identity,
        api_port=config.port if api_port is None else api_port,
        cluster_port=config.cluster_port,
        fingerprint=tls.fingerprint,
        server_tls=server_options(tls),
        version=__version__,
        key=config.cluster_key,
        cluster_addr=config.cluster_addr,
        advertise_addr=config.advertise_addr,
        listen_host=config.host,
        settings=SwimSettings(probe_interval=config.probe_interval, probe_timeout=config.probe_timeout),
        refresh_identity=lambda: fetch_identity(docker),
        refresh_interval=config.identity_refresh_interval,
        docker=docker,
        metrics=metrics,
        ports=ports,
    )
    service.setName("cluster")
    return service
