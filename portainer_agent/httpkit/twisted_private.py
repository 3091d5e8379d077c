"""Every private Twisted name the proxy core relies on, in one place, with why.

Twisted does not promise these; ``pyproject.toml`` pins the tested Twisted range and the
canary tests (``tests/unit/test_twisted_private.py``) fail loudly if one changes. The TLS
half-close shim (:mod:`portainer_agent.tls.server`) is the other place: it overrides
``TLSMemoryBIOProtocol._flushReceiveBIO`` and is covered end to end by the docker CLI tests.

=========================================  =================================================
private name                                why
=========================================  =================================================
``HTTPChannel._command/_path/_version``    the request line at ``Request.gotLength`` time,
                                            before twisted.web sets ``method``/``uri``: a
                                            large upload starts upstream when its headers
                                            are in (:mod:`portainer_agent.httpkit.upload`)
``HTTPChannel._dataBuffer``                bytes a client sent after an upgrade request's
                                            head, already read by twisted.web: they belong
                                            to the new protocol (:mod:`.takeover`)
``Request._disconnected``                  "the client is gone" (set by ``connectionLost``;
                                            ``Request`` has no public flag for it)
``HTTPConnectionPool._factory``,            the pool logs "Starting/Stopping factory" at INFO
``twisted.web.client._HTTP11ClientFactory`` for every new peer connection; the factory class
                                            is only settable there (:mod:`portainer_agent.proxy.pool`)
=========================================  =================================================
"""
from __future__ import annotations

from typing import Any

from twisted.web.client import HTTP11ClientProtocol, HTTPConnectionPool, _HTTP11ClientFactory


def request_line(channel: Any) -> tuple[bytes, bytes, bytes]:
    """(method, request-target, version) of the request whose headers the channel has
    just parsed (valid from ``allHeadersReceived`` until the body is in)."""
    return channel._command, channel._path, channel._version


def take_unread(channel: Any) -> bytes:
    """Bytes the channel read past the current request and holds for the next one."""
    buffered = b"".join(channel._dataBuffer)
    channel._dataBuffer = []
    return buffered


def client_gone(request: Any) -> bool:
    """The client connection of ``request`` was lost."""
    return bool(request._disconnected)


class _NoDelayClientProtocol(HTTP11ClientProtocol):
    """Requests are small writes answered at once: no Nagle delay on the way out."""

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport
        tcp = getattr(transport, "transport", transport)  # under TLS, the TCP connection below
        if hasattr(tcp, "setTcpNoDelay"):
            tcp.setTcpNoDelay(True)


class _QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" log line for every new connection; TCP_NODELAY."""

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _NoDelayClientProtocol(self._quiescentCallback)


def quiet_pool(pool: HTTPConnectionPool) -> HTTPConnectionPool:
    """``pool``, building its connections with a factory that does not log each one."""
    if not hasattr(pool, "_factory"):
        raise RuntimeError("HTTPConnectionPool has no _factory: update portainer_agent.httpkit.twisted_private")
    pool._factory = _QuietClientFactory
    return pool
