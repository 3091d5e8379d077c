"""Real TLS handshakes against the agent's server context on a real port (issue 4).

Certificates are generated here: a client CA, a client certificate it signed, and
certificates it did not sign (another CA's, a self-signed one). The client side is the
standard library's ``ssl`` (a different TLS stack user than the server's pyOpenSSL) run in
a thread, so handshakes are real and independent of Twisted's client code.
"""
from __future__ import annotations

import http.client
import shutil
import ssl
import tempfile
import warnings
from pathlib import Path

from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from portainer_agent.testing.certs import client_pki
from portainer_agent.testing.polling import wait_for_deferred
from portainer_agent.tls.certs import generate_self_signed
from portainer_agent.tls.server import TLSServerEndpoint, server_options


def https_get(port: int, client: tuple[Path, Path] | None = None, *, tls_max: ssl.TLSVersion | None = None,
              tls_min: ssl.TLSVersion | None = None, ciphers: str | None = None) -> int:
    """One HTTPS GET with the stdlib; returns the status or raises the TLS/socket error."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # like Portainer (--tlsskipverify); we test the server side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if ciphers:
            context.set_ciphers(ciphers)
        if tls_min is not None:
            context.minimum_version = tls_min
        if tls_max is not None:
            context.maximum_version = tls_max
    if client is not None:
        context.load_cert_chain(*client)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", "/ping")
        response = connection.getresponse()
        response.read()
        response.close()  # the response holds the socket open otherwise
        return response.status
    finally:
        connection.close()


class TrackingSite(Site):
    """Knows its open connections. (Not ``WrappingFactory``: its wrapper copies the TLS
    transport's interfaces, posing as half-closeable, which changes the shim's behaviour.)"""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.open: set = set()

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.open.add(protocol)
        lost = protocol.connectionLost

        def connectionLost(reason):
            self.open.discard(protocol)
            return lost(reason)

        protocol.connectionLost = connectionLost
        return protocol


#: How a refused client certificate shows at the client: a TLS alert, or (TLS 1.3, where the
#: server checks the certificate after the client's handshake is done) the connection reset
#: or closed under the first request. Not a timeout or a refused connection: a server that
#: hangs or is not listening must fail these tests, not pass them.
REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)


class MutualTLSTests(TestCase):
    """The server context with ``--tls-ca``: only clients signed by that CA get through."""

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        pki = client_pki(self.tmp)
        self.good, self.foreign, self.self_signed = pki.trusted, pki.foreign, pki.self_signed
        return self.listen(pki.ca_pem.read_bytes())

    def listen(self, client_ca_pem: bytes | None):
        root = Resource()
        root.putChild(b"ping", Data(b"pong", "text/plain"))
        identity = generate_self_signed(["127.0.0.1"])
        endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
                                     server_options(identity, client_ca_pem))
        site = TrackingSite(root)
        d = endpoint.listen(site)

        def listening(port):
            self.port = port.getHost().port
            self.addCleanup(port.stopListening)
            # The client may close before the server has noticed; wait for the server side
            # to see every connection go, so the reactor is clean after each test.
            self.addCleanup(wait_for_deferred, lambda: not site.open, 10, "every server connection to close", 0.01)

        return d.addCallback(listening)

    def get(self, *args, **kwargs):
        return threads.deferToThread(https_get, self.port, *args, **kwargs)

    async def test_client_signed_by_ca_accepted(self) -> None:
        self.assertEqual(await self.get(self.good), 200)

    async def test_client_signed_by_ca_accepted_over_tls12(self) -> None:
        self.assertEqual(await self.get(self.good, tls_max=ssl.TLSVersion.TLSv1_2), 200)

    async def test_no_client_certificate_refused(self) -> None:
        with self.assertRaises(REFUSED):
            await self.get(None)

    async def test_no_client_certificate_refused_over_tls12(self) -> None:
        with self.assertRaises(REFUSED):
            await self.get(None, tls_max=ssl.TLSVersion.TLSv1_2)

    async def test_client_signed_by_another_ca_refused(self) -> None:
        with self.assertRaises(REFUSED):
            await self.get(self.foreign)

    async def test_self_signed_client_refused(self) -> None:
        with self.assertRaises(REFUSED):
            await self.get(self.self_signed)


class ServerTLSPolicyTests(TestCase):
    """Without ``--tls-ca``: any client, but only TLS 1.2+ with modern ciphers."""

    def setUp(self):
        return MutualTLSTests.listen(self, None)  # type: ignore[arg-type]

    def get(self, *args, **kwargs):
        return threads.deferToThread(https_get, self.port, *args, **kwargs)

    async def test_no_client_certificate_needed(self) -> None:
        self.assertEqual(await self.get(None), 200)

    async def test_tls13_accepted(self) -> None:
        self.assertEqual(await self.get(None, tls_min=ssl.TLSVersion.TLSv1_3), 200)

    async def test_tls12_accepted(self) -> None:
        self.assertEqual(await self.get(None, tls_max=ssl.TLSVersion.TLSv1_2), 200)

    async def assertOldVersionRefusedByServer(self, version: ssl.TLSVersion) -> None:
        """The server must answer a TLS 1.0/1.1 hello with a protocol_version alert. If the
        local client library cannot even offer that version, there is nothing to test."""
        with self.assertRaises(ssl.SSLError) as caught:
            await self.get(None, tls_min=version, tls_max=version, ciphers="ALL:@SECLEVEL=0")
        text = str(caught.exception).upper()
        if "NO_PROTOCOLS_AVAILABLE" in text or ("UNSUPPORTED_PROTOCOL" in text and "ALERT" not in text):
            raise SkipTest(f"this client's OpenSSL cannot offer {version.name}: {caught.exception}")
        self.assertIn("ALERT_PROTOCOL_VERSION", text)

    async def test_tls11_refused_by_the_server(self) -> None:
        await self.assertOldVersionRefusedByServer(ssl.TLSVersion.TLSv1_1)

    async def test_tls10_refused_by_the_server(self) -> None:
        await self.assertOldVersionRefusedByServer(ssl.TLSVersion.TLSv1)

    async def test_non_forward_secret_cipher_refused(self) -> None:
        with self.assertRaises(ssl.SSLError):
            await self.get(None, tls_max=ssl.TLSVersion.TLSv1_2, ciphers="AES128-GCM-SHA256:AES256-SHA")

    async def test_cbc_cipher_refused(self) -> None:
        with self.assertRaises(ssl.SSLError):
            await self.get(None, tls_max=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
