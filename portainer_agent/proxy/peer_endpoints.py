"""Where connections to peer agents come from: TLS over TCP, only to a live member.

Why not twisted.web.client.Agent's own endpoints: its pool retries an idempotent request
(GET, HEAD) once on a new connection when a kept-alive one failed before any answer. When
membership declares a frozen agent dead and its connections are cut, that retry would dial
the frozen agent again (the kernel still accepts its TCP connections) and wait for the TLS
handshake deadline (``--peer-timeout``) before the request could go to another manager.
Here an address with no live member is refused at once (:class:`NoLiveAgent`, a
``ConnectError``: nothing was sent, so the caller may try elsewhere).
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer


class NoLiveAgent(ConnectError):
    """No live cluster member has its agent API at this address (declared dead, or left)."""


@implementer(IStreamClientEndpoint)
class _LiveMemberEndpoint:
    def __init__(self, inner: IStreamClientEndpoint, host: str, port: int,
                 is_live: Callable[[str, int], bool]) -> None:
        self._inner = inner
        self._host = host
        self._port = port
        self._is_live = is_live

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[Any]":  # noqa: N803
        if not self._is_live(self._host, self._port):
            return fail(NoLiveAgent(string=f"no live agent at {self._host}:{self._port}"))
        return self._inner.connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class PeerEndpoints:
    """Endpoints for ``https://host:port`` URIs of peer agents: ``policy``'s TLS over a
    ``HostnameEndpoint`` with ``connect_timeout``, checked against ``is_live(host, port)``
    at each connection attempt (the pool's retries included)."""

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float,
                 is_live: Callable[[str, int], bool]) -> None:
        self._reactor = reactor
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._is_live = is_live

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:  # noqa: N802
        host = uri.host.decode("idna") if isinstance(uri.host, bytes) else uri.host
        tcp = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._connect_timeout)
        tls = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), tcp)
        return _LiveMemberEndpoint(tls, host, uri.port, self._is_live)
