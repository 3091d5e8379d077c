"""Every private Twisted name the agent relies on, in one place, with why.

Twisted does not promise these; ``pyproject.toml`` pins the tested Twisted range and the
canary tests (``tests/unit/test_twisted_private.py``) fail loudly if one changes. The TLS
half-close shim (:mod:`portainer_agent.tls.server`) is the other place, and must stay apart:
it is a subclass of ``TLSMemoryBIOProtocol`` that overrides ``_flushReceiveBIO`` and reads the
TLS state next to it (``_handshakeDone``, ``_lostTLSConnection``...), covered by the canaries in
``tests/unit/test_twisted_private_api.py`` and end to end by the docker CLI tests.

=========================================  =================================================
private name                                why
=========================================  =================================================
``HTTPChannel._command/_path/_version``    the request line at ``Request.gotLength`` time,
                                            before twisted.web sets ``method``/``uri``: a
                                            large upload starts upstream when its headers
                                            are in (:mod:`portainer_agent.toolbox.upload`)
``HTTPChannel._dataBuffer``                bytes a client sent after an upgrade request's
                                            head, already read by twisted.web: they belong
                                            to the new protocol (:mod:`.takeover`)
``Request._disconnected``                  "the client is gone" (set by ``connectionLost``;
                                            ``Request`` has no public flag for it)
``HTTPConnectionPool._factory``,            the pool logs "Starting/Stopping factory" at INFO
``twisted.web.client._HTTP11ClientFactory`` for every new peer connection; the factory class
                                            is only settable there (:mod:`portainer_agent.proxy.pool`)
``twisted.web.http._GenericHTTPChannelProtocol``  ``HTTPFactory`` builds it around a plain
                                            ``HTTPChannel``, with no public seam for the
                                            channel class: the site builds it around ours
                                            (:func:`channel_protocol`, :mod:`portainer_agent.http.site`)
``HTTPChannel._respondToBadRequestAndDisconnect``  the one method every parser refusal goes
                                            through: our channel answers them in Docker JSON
                                            with the agent headers (:class:`RefusalHookChannel`)
``HTTPChannel._receivedHeaderSize/Count``  the size and count of the head so far: the 431
                                            answers say which limit was hit
                                            (:func:`head_received`)
``HTTPChannel._handlingRequest``            a request is being answered: the head deadline
                                            must not cut a long stream (:func:`answering`)
``TLSMemoryBIOFactory._clock``              the clock Twisted's TLS write buffering uses; the
                                            handshake deadline uses the same one, so tests
                                            drive both with one ``task.Clock``
                                            (:func:`tls_factory_clock`, :mod:`portainer_agent.tls.server`)
``reactor._exitSignal``                     twistd re-raises the signal that stopped the
                                            reactor (SIGTERM: exit 143); the agent exits 0
                                            after a graceful stop (:func:`forget_exit_signal`,
                                            :mod:`portainer_agent.twistd`)
=========================================  =================================================

The canaries of the functions here are in ``tests/unit/test_twisted_private.py``; those of
the Twisted behaviour behind them (and of the TLS shim) in
``tests/unit/test_twisted_private_api.py``.
"""
from __future__ import annotations

from typing import Any

from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import HTTP11ClientProtocol, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol


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
        raise RuntimeError("HTTPConnectionPool has no _factory: update portainer_agent.toolbox.twisted_private")
    pool._factory = _QuietClientFactory
    return pool


def channel_protocol(channel: HTTPChannel) -> _GenericHTTPChannelProtocol:
    """What ``HTTPFactory.buildProtocol`` returns, around ``channel`` (an ``HTTPChannel`` of
    ours) instead of a plain one: Twisted's wrapper that would switch to HTTP/2 under TLS
    ALPN, and otherwise passes everything to the channel."""
    return _GenericHTTPChannelProtocol(channel)


class RefusalHookChannel(HTTPChannel):
    """An ``HTTPChannel`` whose every parser refusal (malformed request line or header,
    conflicting lengths, over-long lines...) calls :meth:`refuse_bad_request`, which a
    subclass overrides; by default Twisted's bare ``400 Bad Request`` and a close."""

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.refuse_bad_request()

    def refuse_bad_request(self) -> None:
        super()._respondToBadRequestAndDisconnect()


def head_received(channel: HTTPChannel) -> tuple[int, int]:
    """(bytes, header lines) of the request head the channel has parsed so far."""
    return channel._receivedHeaderSize, channel._receivedHeaderCount  # type: ignore[attr-defined]


def answering(channel: HTTPChannel) -> bool:
    """The channel is answering a request (its head is in and it has not finished)."""
    return bool(channel._handlingRequest)  # type: ignore[attr-defined]


def tls_factory_clock(factory: TLSMemoryBIOFactory) -> Any:
    """The clock ``factory``'s connections buffer their small writes with (the one given
    to ``TLSMemoryBIOFactory``, or the global reactor)."""
    return factory._clock


def forget_exit_signal(reactor: Any) -> None:
    """Make twistd exit normally after the reactor stopped on a signal (it would re-raise
    the signal, ``reactor._exitSignal``, once it has cleaned up)."""
    if hasattr(reactor, "_exitSignal"):
        reactor._exitSignal = None
