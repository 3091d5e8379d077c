"""HTTP to the local Docker socket: one pooled ``twisted.web.client.Agent``.

Every Docker request goes to the fixed fake host ``http://docker``, so the pool holds
one key and reuses its persistent connections; the endpoint factory dials the unix
socket whatever the URL says.
"""
from __future__ import annotations

from typing import Any

import treq
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.defer import Deferred
from twisted.web._newclient import HTTP11ClientProtocol, Request, _ensureValidMethod, _ensureValidURI
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

DOCKER_BASE_URL = b"http://docker"
#: The ``Host`` header ``Agent`` computes for :data:`DOCKER_BASE_URL`.
DOCKER_HOST = b"docker"


@implementer(IAgentEndpointFactory)
class DockerSocketEndpointFactory:
    def __init__(self, reactor: Any, socket_path: str) -> None:
        self._reactor = reactor
        self.socket_path = socket_path

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self.socket_path, timeout=10)


class _LargeReadClientProtocol(HTTP11ClientProtocol):
    """Reads the Docker socket 256 kB at a time instead of Twisted's 64 kB: big
    bodies (exports, image saves) then cross the decoder, the relay and TLS in a
    quarter of the slices (measured: -19% CPU per GB exported, bench/README.md)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport  # a unix socket connection: has ``bufferSize``
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = 256 * 1024


class _QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" log line for every new upstream connection; large reads."""

    noisy = False

    def buildProtocol(self, addr: IAddress | None) -> HTTP11ClientProtocol:
        return _LargeReadClientProtocol(self._quiescentCallback)


def make_pool(reactor: Any, max_per_host: int = 16) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    return pool


@implementer(IAgent)
class DockerSocketAgent:
    """An ``IAgent`` for the Docker socket with a short path for the proxy.

    ``Agent.request`` parses every URL (``urlparse``), rebuilds its path, computes a
    ``Host`` value and copies the whole ``Headers`` to add it: ~12% of a proxied
    ``/_ping``'s CPU (bench/README.md). Requests for :data:`DOCKER_BASE_URL` that
    already carry ``Host`` (the proxy's, see ``DockerProxy``) skip that: same
    validation, same pool key and connection, same request on the wire. Anything
    else (treq's own calls) goes through the stock ``Agent``."""

    def __init__(self, reactor: Any, socket_path: str, pool: HTTPConnectionPool) -> None:
        factory = DockerSocketEndpointFactory(reactor, socket_path)
        self._agent = Agent.usingEndpointFactory(reactor, factory, pool=pool)
        self._pool = pool
        self._endpoint = factory.endpointForURI(None)
        self._prefix = DOCKER_BASE_URL + b"/"
        #: ``Agent``'s pool key for :data:`DOCKER_BASE_URL`: both paths share connections.
        self._key = (b"http", DOCKER_HOST, 80)

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None
    ) -> "Deferred[IResponse]":
        if headers is None or not uri.startswith(self._prefix) or not headers.hasHeader(b"host"):
            return self._agent.request(method, uri, headers, bodyProducer)
        # As Agent.request: invalid bytes raise ValueError here, before any I/O.
        path = _ensureValidURI(uri.strip())[len(DOCKER_BASE_URL):]
        method = _ensureValidMethod(method)
        persistent = self._pool.persistent

        def connected(proto: HTTP11ClientProtocol) -> "Deferred[IResponse]":
            return proto.request(Request(method, path, headers, bodyProducer, persistent=persistent))

        return self._pool.getConnection(self._key, self._endpoint).addCallback(connected)


def docker_agent(reactor: Any, socket_path: str, pool: HTTPConnectionPool) -> IAgent:
    return DockerSocketAgent(reactor, socket_path, pool)


def docker_treq(agent: IAgent) -> treq.client.HTTPClient:
    """A treq client over the Docker agent, for the agent's own JSON calls (``/info``)."""
    return treq.client.HTTPClient(agent)
