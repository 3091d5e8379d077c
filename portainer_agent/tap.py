"""Assembling the agent: Config -> services. Also the twistd plugin's entry points
(``Options`` and ``makeService``, loaded lazily by ``twisted/plugins``).

``build_agent_service`` reads the node identity from Docker synchronously (so a
missing Docker fails the start with a clear message before anything listens),
makes the TLS identity, and returns one ``MultiService`` holding the API listener
(and, wired by their modules, the membership and security services).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from portainer_agent import __version__
from portainer_agent.config import Config
from portainer_agent.docker.client import DockerClient
from portainer_agent.proxy.pool import make_pool
from portainer_agent.proxy.splice import HijackProxy
from portainer_agent.docker.identity import DockerUnavailable, NodeIdentity, fetch_identity_blocking
from portainer_agent.proxy.local import DockerProxy
from portainer_agent.proxy.peer_lists import PeerCopies
from portainer_agent.listcache.beacon import ListBeacon
from portainer_agent.listcache.peer_states import PeerListStates
from portainer_agent.listcache.service import ListCache, ListCacheService
from portainer_agent.http.request import AgentRequests
from portainer_agent.http.root import AgentRoot
from portainer_agent.http.router import Router, streaming_paths
from portainer_agent.http.inflight import InFlight
from portainer_agent.http.site import AgentSite
from portainer_agent.options import AgentOptions
from portainer_agent.twistd import TwistdAgentOptions, exit_like_the_console_script, twistd_log_observer
from portainer_agent.tls.certs import TLSIdentity, load_or_generate
from portainer_agent.security.guard import SignatureGuard
from portainer_agent.security.shutdown import SecurityShutdown
from portainer_agent.tls.server import TLSServerEndpoint, server_options
from portainer_agent.cluster.membership import MembershipView
from portainer_agent.proxy.dispatch import Destinations, Handler
from portainer_agent.routing import ClusterSnapshot
from portainer_agent.http.agents import AgentsResource
from portainer_agent.fs.pool import PoolService
from portainer_agent.fs.volumes import VolumeLocator, VolumeRootMap
from portainer_agent.http.browse import BrowseService, browse_endpoints
from portainer_agent.http.hostinfo import HostInfoResource
from portainer_agent.console.docker_stream import console_opener
from portainer_agent.http.console import ConsoleResource
from portainer_agent.console.sessions import ConsoleSessions
from portainer_agent.connections import RefusalLog, connection_cap, raise_open_file_limit
from portainer_agent.listening import BoundPorts, ListenerService
from portainer_agent.memory import release_free_heap
from portainer_agent.metrics import AgentMetrics, NoMetrics

if TYPE_CHECKING:
    from portainer_agent.cluster.service import ClusterService

log = Logger()


class StartupError(Exception):
    """The agent cannot start; the message says why, in one line."""


class ApiListenerService(ListenerService):
    """Listens for the agent API; on stop, stops accepting and drains in-flight
    requests within a bounded grace period."""

    def __init__(self, endpoint: IStreamServerEndpoint, site: AgentSite, clock: Any, grace: float,
                 host: str, port: int, on_fatal: Callable[[str], None] | None = None,
                 ports: BoundPorts | None = None) -> None:
        super().__init__(endpoint, site, host, port, what="agent API", scheme="https", name="api",
                         on_fatal=on_fatal, ports=ports)
        self._clock = clock
        self._grace = grace

    @inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        yield self.site.drain(self._clock, self._grace)


class AgentService(MultiService):
    """The whole agent. Children are stopped in reverse order of addition."""

    #: Under twistd: the observer twistd should log to (see :meth:`setServiceParent`).
    twistd_log_observer: Any = None

    def __init__(self, config: Config, identity: NodeIdentity, tls: TLSIdentity, reactor: Any,
                 open_file_limit: int | None = None) -> None:
        super().__init__()
        self.config = config
        # Recorded into prometheus_client only when a listener exposes them (idle RSS, issue 15).
        self.metrics = AgentMetrics() if config.metrics_addr is not None else NoMetrics()
        self.identity = identity
        self.tls = tls
        self.reactor = reactor
        self.exit_code = 0
        #: The ports the listeners bound (port 0: the kernel's choice), written to --ports-file.
        self.bound_ports = BoundPorts(config.ports_file)
        #: The one client of the Docker socket (proxy, hijack, identity, discovery, volumes, console).
        self.docker = DockerClient.for_socket(reactor, config.docker_socket_path)
        self.guard = SignatureGuard.from_config(config, on_refused=self.metrics.signature_refused)
        # Disk work (browse, host info) runs in a small thread pool; added first, so it is
        # stopped last, after the API has drained.
        self.disk = PoolService(reactor)
        self.disk.setName("disk-pool")
        self.disk.setServiceParent(self)
        #: Every request from arrival to release (hijacks and consoles hand theirs over).
        self.inflight = InFlight(self.metrics)
        #: This node's lists from memory (issue 16); None with --list-cache off.
        self.lists: ListCache | None = None
        if config.list_cache:
            self.lists = ListCache(reactor, self.docker, max_bytes=config.list_cache_max_bytes, metrics=self.metrics,
                                   max_body=config.aggregate_max_bytes)
            self.metrics.watch_list_cache(lambda: self.lists.bytes_held if self.lists is not None else 0)
            ListCacheService(self.lists).setServiceParent(self)
        self.docker_proxy = DockerProxy(self.docker, config.docker_socket_path, lists=self.lists)
        self.hijack = HijackProxy(self.docker, hand_over=self.inflight.hand_over, metrics=self.metrics)
        # Cluster membership (issue 5). Its stack (AMP, SWIM: about 1 MB of RSS) is imported
        # in a Swarm only (issue 15). Built here, started in its place below.
        self.cluster: ClusterService | None = None
        self.peer_list_states: PeerListStates | None = None
        self.peer_pool: HTTPConnectionPool | None = None
        cluster_snapshot: Callable[[], ClusterSnapshot | None] | None = None
        if identity.in_swarm:
            from portainer_agent.cluster.service import build_cluster_service

            self.cluster = build_cluster_service(config, identity, tls, reactor, self.docker, metrics=self.metrics,
                                                 api_port=lambda: self.api.when_bound(), ports=self.bound_ports)
            view = self.cluster.view
            if self.lists is not None:
                # Peers' list cache states, heard over membership: unchanged peers are not asked.
                self.peer_list_states = PeerListStates(reactor)
                self.cluster.transport.on_list_state = self.peer_list_states.heard
            self.destinations = self._cluster_destinations(view)
            cluster_snapshot = lambda: ClusterSnapshot.of(view)  # noqa: E731
        else:
            Logger(namespace="portainer_agent.cluster").info(
                "the engine is not in a Swarm: cluster membership is off and /agents answers 503")
            self.destinations = Destinations(self.docker_proxy, self.hijack)
        # The agent's own endpoints: /agents, the volume/host browser and host info (issue 9),
        # the websocket console (issue 10: local exec/attach; other nodes are reached by routing).
        self.consoles = ConsoleSessions(reactor)
        volumes = VolumeRootMap.for_docker_root(identity.docker_root_dir, str(config.volumes_root) if config.volumes_root else None)
        browse = BrowseService(VolumeLocator(self.docker, volumes), config.host_management, config.host_root,
                               self.disk.run, max_upload=config.browse_max_upload)
        endpoints: dict[bytes, Handler] = {
            b"/agents": AgentsResource(self.cluster.view if self.cluster is not None else None),
            **browse_endpoints(browse),
            b"/host/info": HostInfoResource(config.host_root, self.disk.run),
        }
        open_console = console_opener(self.docker)  # its upgrades are fresh connections of the one client
        for kind in ("exec", "attach"):
            endpoints[b"/websocket/" + kind.encode()] = ConsoleResource(
                kind, open_console, reactor,
                config.console_ping_interval, track=self.consoles.track, hand_over=self.inflight.hand_over)
        # Each request is routed once, when its headers are in (the request asks the router).
        self.router = Router(cluster_snapshot, streaming=streaming_paths(endpoints))
        self.root = AgentRoot(self.destinations, self.router, guard=self.guard, endpoints=endpoints,
                              inflight=self.inflight)
        self.site = AgentSite(self.root, AgentRequests(self.router, self.guard),
                              access_log=config.log_level == "DEBUG", inflight=self.inflight, reactor=reactor,
                              metrics=self.metrics, head_timeout=config.header_timeout, timeout=config.idle_timeout)
        ca_pem = config.tls_ca.read_bytes() if config.tls_ca else None
        inner = (TCP6ServerEndpoint if ":" in config.host else TCP4ServerEndpoint)(
            reactor, config.port, backlog=128, interface=config.host
        )
        self.max_connections = connection_cap(config.max_connections, open_file_limit or 2**20)
        if self.max_connections < config.max_connections:
            log.warn("--max-connections lowered from {configured} to {cap} to fit the open-file limit ({limit})",
                     configured=config.max_connections, cap=self.max_connections, limit=open_file_limit)
        refusals = RefusalLog(reactor, self.max_connections, on_refused=self.metrics.connection_refused)
        self.api = ApiListenerService(
            TLSServerEndpoint(inner, server_options(tls, ca_pem), clock=reactor,
                              handshake_timeout=config.tls_handshake_timeout, max_connections=self.max_connections,
                              refusals=refusals, on_cut=self.metrics.connection_cut),
            self.site, reactor, config.shutdown_grace, config.host, config.port, on_fatal=self.fatal,
            ports=self.bound_ports,
        )
        self.api.setName("api")
        self.api.setServiceParent(self)
        self.security_shutdown = SecurityShutdown(reactor, config.secret_timeout, self.guard, self.close_api_for_security)
        self.security_shutdown.setName("security-shutdown")
        self.security_shutdown.setServiceParent(self)
        # Membership is stopped before the API drains, so peers see our leave first.
        if self.cluster is not None:
            self.cluster.setServiceParent(self)
            if self.lists is not None:
                cluster = self.cluster
                ListBeacon(reactor, self.lists, cluster.transport,
                           lambda: [m for m in cluster.view.alive_members() if m.node_name != cluster.view.local.node_name],
                           lambda: cluster.view.local.node_name).setServiceParent(self)
        self.consoles.setServiceParent(self)
        # Metrics (issue 11): a plain-HTTP listener of its own, only when asked for.
        if config.metrics_addr is not None:
            from portainer_agent.http.metrics_endpoint import MetricsListenerService

            self.metrics_listener = MetricsListenerService(reactor, config.metrics_addr, self.metrics,
                                                           on_fatal=self.fatal, ports=self.bound_ports)
            self.metrics_listener.setName("metrics")
            self.metrics_listener.setServiceParent(self)

    def _cluster_destinations(self, view: MembershipView) -> Destinations:
        """Local Docker plus target forwarding, manager operations and aggregation (Swarm
        only: a standalone agent never imports treq, msgspec or the peer TLS stack)."""
        from portainer_agent.proxy.fanout import FanOut
        from portainer_agent.proxy.node_list import SwarmNodeList
        from twisted.web.client import Agent

        from portainer_agent.proxy.peer import PeerForwarder, PeerTLSPolicy
        from portainer_agent.proxy.peer_endpoints import PeerEndpoints

        def pin_for(host: str, port: int) -> str | None:
            member = next((m for m in view.alive_members() if m.api_addr == host and m.api_port == port), None)
            return member.cert_fingerprint if member is not None else None

        pool = self.peer_pool = make_pool(self.reactor)
        policy = PeerTLSPolicy(pin_for, authenticated=self.config.cluster_key is not None, clock=self.reactor,
                               handshake_timeout=self.config.peer_timeout)
        # Connections only to live members: a frozen agent declared dead is never dialled again.
        endpoints = PeerEndpoints(self.reactor, policy, self.config.peer_timeout, view.has_live_agent_at)
        agent = Agent.usingEndpointFactory(self.reactor, endpoints, pool=pool)
        peers = PeerForwarder(self.reactor, policy, pool, lambda: view.local.node_name, self.hijack,
                              connect_timeout=self.config.peer_timeout, metrics=self.metrics, alive=view.is_alive,
                              response_timeout=self.config.peer_response_timeout, agent=agent)
        # Deadlines follow membership: a member declared dead has its requests failed at once.
        view.watch_departures(peers.member_departed)
        # The Swarm's node list, so an aggregate names the nodes no live agent answers for.
        node_list = SwarmNodeList(self.reactor, self.docker, peers.client,
                                  timeout=min(self.config.aggregate_timeout, self.config.peer_timeout * 2),
                                  wait=min(self.config.aggregate_timeout, 2.0))
        fanout = FanOut(self.reactor, self.docker_proxy, peers, self.config.aggregate_timeout,
                        max_bytes=self.config.aggregate_max_bytes, node_list=node_list, metrics=self.metrics,
                        peer_copies=PeerCopies(1024, self.config.list_cache_max_bytes) if self.config.list_cache else None,
                        peer_states=self.peer_list_states)
        return Destinations(self.docker_proxy, self.hijack, peers, fanout)

    def setServiceParent(self, parent: Any) -> None:  # noqa: N802
        """Under twistd, the parent is the Application: give it our log observer, which
        twistd's logger uses unless ``--logger``/``--syslog`` chose another, so both
        entry points log with the same level and format."""
        super().setServiceParent(parent)
        from twisted.logger import ILogObserver

        if self.twistd_log_observer is not None and hasattr(parent, "setComponent"):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.twistd_log_observer)

    def close_api_for_security(self) -> "Deferred[None]":
        """Security shutdown (--secret-timeout): refuse requests on connections still
        open, stop listening, keep the process running."""
        self.guard.close("API closed by the security shutdown: no Portainer instance was associated in time;"
                         " restart the agent to pair it")
        return self.api.stop_listening()

    def fatal(self, message: str) -> None:
        """Stop the process with a non-zero exit code."""
        self.exit_code = 1
        if self.reactor.running:
            self.reactor.stop()
        else:  # twistd starts services before the reactor runs
            self.reactor.callWhenRunning(self.reactor.stop)

    @inlineCallbacks
    def stopService(self) -> Any:
        log.info("stopping: no new connections, draining in-flight requests (grace {grace}s)",
                 grace=self.config.shutdown_grace)
        yield super().stopService()
        yield self.docker.close_idle()
        if self.peer_pool is not None:
            yield self.peer_pool.closeCachedConnections()
        log.info("stopped")


def build_agent_service(config: Config, reactor: Any) -> AgentService:
    """Read the node identity, make the TLS identity, build the service tree."""
    try:
        identity = fetch_identity_blocking(config.docker_socket_path)
    except DockerUnavailable as error:
        raise StartupError(f"{error} (is Docker running? set --docker-host/DOCKER_HOST)") from error
    log.info(
        "Portainer agent {version} on node {node} (swarm: {swarm}, role: {role}, leader: {leader}, "
        "node address: {addr}, Docker root: {root}, Docker {docker_version})",
        version=__version__, node=identity.name, swarm=identity.in_swarm, role=identity.role or "standalone",
        leader=identity.is_leader, addr=identity.node_addr or "-", root=identity.docker_root_dir,
        docker_version=identity.server_version,
    )
    names = [n for n in (config.advertise_addr, identity.node_addr, identity.name) if n]
    if config.host not in ("0.0.0.0", "::"):
        names.append(config.host)
    try:
        tls = load_or_generate(config.data_dir, names, config.tls_cert, config.tls_key, keep=config.keep_cert)
    except (OSError, ValueError) as error:
        raise StartupError(f"cannot prepare the TLS certificate in {config.data_dir}: {error}") from error
    log.info("TLS certificate SPKI sha256 {fingerprint}", fingerprint=tls.fingerprint)
    open_files = raise_open_file_limit()
    return AgentService(config, identity, tls, reactor, open_file_limit=open_files)


# -- twistd plugin entry points -------------------------------------------------------

Options = TwistdAgentOptions


def makeService(options: AgentOptions) -> AgentService:
    """twistd's entry point; :mod:`portainer_agent.twistd` makes it behave like the
    console script (logging, exit codes)."""
    from twisted.internet import reactor

    assert options.config is not None
    twistd_options = getattr(options, "parent", None) or {}
    try:
        service = build_agent_service(options.config, reactor)
    except StartupError as error:
        raise SystemExit(f"portainer-agent: {error}") from None
    service.twistd_log_observer = twistd_log_observer(options.config, twistd_options)
    exit_like_the_console_script(reactor, lambda: service.exit_code)
    reactor.callWhenRunning(release_free_heap)
    return service
