"""Serving the agent API over TLS.

Two things beyond Twisted's defaults:

* a modern server context (TLS 1.2+, ECDHE AEAD ciphers), optionally requiring
  client certificates signed by a user-given CA (mutual TLS);
* :class:`HalfCloseTLSProtocol`: the docker CLI ends its side of a hijacked
  ``exec``/``attach`` stream with a TLS ``close_notify``; stock
  ``TLSMemoryBIOProtocol`` then closes the whole connection and the command's output
  is lost. The shim turns ``close_notify`` (and a TCP FIN) into a read-side
  half-close for protocols that can take one (the hijack splice), and keeps writing.
  It overrides the private ``_flushReceiveBIO``: covered by the end-to-end
  ``docker exec`` over TLS tests.

And two limits for a server exposed on the Swarm network (:mod:`portainer_agent.connections`):
the TLS handshake must complete within a deadline, and connections above a cap are
closed as soon as they are accepted, before any TLS work.
"""
from __future__ import annotations

from typing import Any, cast

from OpenSSL.SSL import Error as SSLError
from OpenSSL.SSL import WantReadError, ZeroReturnError
from twisted.internet import ssl
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort, IStreamServerEndpoint
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from portainer_agent.connections import TLS_HANDSHAKE_TIMEOUT, RefusalLog
from portainer_agent.toolbox.twisted_private import tls_factory_clock
from portainer_agent.tls.certs import TLSIdentity

MODERN_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_options(identity: TLSIdentity, client_ca_pem: bytes | None = None) -> ssl.CertificateOptions:
    """Server TLS options: TLS 1.2 minimum, AEAD ciphers; with ``client_ca_pem`` every
    client must present a certificate signed by that CA."""
    cert = ssl.PrivateCertificate.loadPEM(identity.cert_pem + b"\n" + identity.key_pem)
    kwargs: dict[str, Any] = {}
    if client_ca_pem is not None:
        cas = [ssl.Certificate.loadPEM(block).original for block in _pem_blocks(client_ca_pem)]
        kwargs.update(verify=True, caCerts=cas, requireCertificate=True)
    return ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS),
        **kwargs,
    )


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


@implementer(IHalfCloseableProtocol)
class HalfCloseTLSProtocol(BufferingTLSTransport):
    """A TLS server transport that can carry a half-closed (hijacked) stream."""

    _peerFinishedSending = False
    #: The peer closed its TCP side (a FIN, with or without close_notify before it):
    #: it will never answer our close_notify, so closing must not wait for one.
    tcpFinReceived = False
    _handshakeTimer: Any = None

    def makeConnection(self, transport: Any) -> None:
        factory = cast(HalfCloseTLSFactory, self.factory)
        if factory.handshake_timeout is not None and factory.clock is not None:
            self._handshakeTimer = factory.clock.callLater(factory.handshake_timeout, self._handshakeTimedOut)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # ``_handshakeDone`` is TLSMemoryBIOProtocol's own flag (private; covered by
        # the handshake-deadline tests).
        if self._handshakeTimer is not None and self._handshakeDone:
            self._cancelHandshakeTimer()

    def _cancelHandshakeTimer(self) -> None:
        timer, self._handshakeTimer = self._handshakeTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        if self._handshakeDone or self._lostTLSConnection:
            return
        on_cut = cast(HalfCloseTLSFactory, self.factory).on_cut
        if on_cut is not None:
            on_cut("tls_handshake_timeout")
        self.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelHandshakeTimer()
        super().connectionLost(reason)

    def _wrappedHalfCloseable(self) -> IHalfCloseableProtocol | None:
        return IHalfCloseableProtocol(self.wrappedProtocol, None)

    def _flushReceiveBIO(self) -> None:
        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                halfCloseable = self._wrappedHalfCloseable()
                if halfCloseable is None or self.disconnecting:
                    # Not a hijacked stream, or the peer answers our own close_notify:
                    # the normal TLS shutdown.
                    self._shutdownTLS()
                    self._tlsShutdownFinished(None)
                    continue
                # close_notify from the peer: it has finished sending, but still
                # reads. Tell the hijacked stream once and keep our write side open.
                if not self._peerFinishedSending:
                    self._peerFinishedSending = True
                    halfCloseable.readConnectionLost()
                break
            except SSLError:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def readConnectionLost(self) -> None:
        """TCP FIN from the peer (no close_notify): half-close for a hijacked stream,
        a normal close otherwise."""
        self.tcpFinReceived = True
        halfCloseable = self._wrappedHalfCloseable()
        if halfCloseable is not None and not self.disconnecting:
            if not self._peerFinishedSending:
                self._peerFinishedSending = True
                halfCloseable.readConnectionLost()
            else:
                # close_notify came first, now TCP ends too: a stream that cannot
                # take this as anything but the peer leaving may want to know.
                closed = getattr(self.wrappedProtocol, "tcpClosedAfterCloseNotify", None)
                if closed is not None:
                    closed()
            return
        # The peer closed TCP without close_notify, so it will never answer ours:
        # TLS loseConnection alone would wait forever (the reactor stopped reading) and
        # leak the connection until the HTTP timeout. Send what we can, then close TCP,
        # as stock TLSMemoryBIOProtocol does on a FIN.
        self.loseConnection()
        assert self.transport is not None  # the TCP connection that just reported the FIN
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        halfCloseable = self._wrappedHalfCloseable()
        if halfCloseable is not None:
            halfCloseable.writeConnectionLost()


class HalfCloseTLSFactory(TLSMemoryBIOFactory):
    """TLS server factory with a handshake deadline and a cap on open connections
    (``WrappingFactory.protocols`` holds the connections open now)."""

    protocol = HalfCloseTLSProtocol

    def __init__(self, options: Any, isClient: bool, wrappedFactory: Any, clock: Any = None,
                 handshake_timeout: float | None = TLS_HANDSHAKE_TIMEOUT, max_connections: int | None = None,
                 refusals: RefusalLog | None = None, on_cut: Any = None) -> None:
        super().__init__(options, isClient, wrappedFactory, clock)
        self.clock = tls_factory_clock(self)  # the reactor unless a clock was given
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.refusals = refusals
        #: Called with a reason when a deadline cuts a connection (metrics).
        self.on_cut = on_cut

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        if self.max_connections is not None and len(self.protocols) >= self.max_connections:
            # None: the listening port closes the socket at once (a clean refusal).
            if self.refusals is not None:
                self.refusals.refused()
            return None
        return super().buildProtocol(addr)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Compose TLS over any stream server endpoint (TCP, UNIX, systemd)."""

    def __init__(self, inner: IStreamServerEndpoint, options: ssl.CertificateOptions, clock: Any = None,
                 handshake_timeout: float | None = TLS_HANDSHAKE_TIMEOUT, max_connections: int | None = None,
                 refusals: RefusalLog | None = None, on_cut: Any = None) -> None:
        self._inner = inner
        self._options = options
        self._limits = dict(clock=clock, handshake_timeout=handshake_timeout, max_connections=max_connections,
                            refusals=refusals, on_cut=on_cut)
        self.factory: HalfCloseTLSFactory | None = None

    def listen(self, factory: Any) -> "Deferred[IListeningPort]":
        self.factory = HalfCloseTLSFactory(self._options, False, factory, **self._limits)
        return self._inner.listen(self.factory)
