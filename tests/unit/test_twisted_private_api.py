"""Canaries for the private Twisted behaviour the agent relies on.

``pyproject.toml`` pins Twisted to the range these were written against (26.10 <= v < 27).
Each test below checks one private name or behaviour, used where the public API has no
seam, and fails with a message naming the production code that must be revisited. When one
fails after an upgrade, fix that code (or drop the private use), then move the pin.

The private uses (grep ``twisted\\..*\\._`` imports and ``._name`` on Twisted objects):

* ``twisted.web.client._HTTP11ClientFactory`` and ``HTTPConnectionPool._factory``
  (toolbox/twisted_private.py, the quiet peer pool; see also tests/unit/test_twisted_private.py
  for the names isolated there: the request line at ``gotLength``, unread bytes, client gone);
* ``twisted.web.http._GenericHTTPChannelProtocol`` (toolbox/twisted_private.py
  ``channel_protocol``, for http/site.py ``AgentSite.protocol``);
* ``HTTPChannel._respondToBadRequestAndDisconnect`` as the one path of every parser refusal,
  and the parser state ``_handlingRequest``, ``_receivedHeaderSize``,
  ``_receivedHeaderCount`` (toolbox/twisted_private.py ``RefusalHookChannel``,
  ``head_received``, ``answering``, for http/channel.py ``AgentHTTPChannel``: head deadline,
  414/431);
* ``TLSMemoryBIOProtocol._handshakeDone`` (tls/server.py, the TLS handshake deadline);
* ``TLSMemoryBIOFactory._clock`` (toolbox/twisted_private.py ``tls_factory_clock``, for
  tls/server.py: the handshake deadline on Twisted's TLS clock);
* ``reactor._exitSignal``, re-raised by ``twisted.scripts.twistd.runApp``
  (toolbox/twisted_private.py ``forget_exit_signal``, for twistd.py: exit 0 after SIGTERM
  under twistd);
* ``Request._disconnected`` (toolbox/responses.py, proxy/relay.py, proxy/fanout.py,
  proxy/splice.py, http/browse.py, toolbox/filesend.py, http/console.py);
* ``HTTPChannel._dataBuffer`` (toolbox/takeover.py, ``take_over_transport``);
* ``TLSMemoryBIOProtocol._flushReceiveBIO`` and the state it uses (``_lostTLSConnection``,
  ``_tlsConnection``, ``_shutdownTLS``, ``_tlsShutdownFinished``, ``_aborted``,
  ``_flushSendBIO``) (tls/server.py, ``HalfCloseTLSProtocol``);
* ``Request.gotLength``/``handleContentChunk`` as the body hooks (security/body.py);
* a connection's ``bufferSize`` as its read size (docker/connection.py, http/channel.py: public
  name, undocumented meaning).
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from typing import Any

import twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import tls
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .memory import HeldOpen

#: The Twisted releases these canaries were last checked against (pyproject.toml's pin).
TESTED = ((26, 10), (27, 0))

#: Digest of the code (``ast.unparse``, so without docstring and comments) of Twisted 26.10's ``TLSMemoryBIOProtocol._flushReceiveBIO`` (docstring
#: and comments excluded): ``HalfCloseTLSProtocol._flushReceiveBIO`` is a modified copy of it.
FLUSH_RECEIVE_BIO_DIGEST = "819659e2654f9366"


def _loud(what: str, where: str) -> str:
    return (f"Twisted {twisted.__version__}: {what}. The agent relies on it in {where}; "
            f"fix that code before moving the Twisted pin in pyproject.toml.")


def _body_digest(function: Any) -> str:
    """A digest of a function's code that ignores its docstring, comments and layout."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    definition = tree.body[0]
    assert isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef))
    body = definition.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    code = "\n".join(ast.unparse(statement) for statement in body)
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def _connected_site(resource: Resource) -> tuple[Any, StringTransport]:
    site = Site(resource, reactor=Clock())
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class VersionTests(SynchronousTestCase):
    def test_installed_twisted_is_in_the_tested_range(self) -> None:
        version = tuple(int(part) for part in twisted.__version__.split(".")[:2])
        low, high = TESTED
        self.assertTrue(low <= version < high, _loud(
            f"outside the range the private-API canaries were checked against ({low} <= v < {high})",
            "every module listed in this file's docstring"))


class PoolFactoryTests(SynchronousTestCase):
    """docker/client.py ``make_pool`` swaps ``pool._factory`` for a quieter subclass."""

    def test_pool_builds_connections_with_its_factory_attribute(self) -> None:
        try:
            from twisted.web.client import _HTTP11ClientFactory
        except ImportError as error:
            self.fail(_loud(f"_HTTP11ClientFactory is gone ({error})", "docker/client.py make_pool"))
        pool = HTTPConnectionPool(Clock(), persistent=True)
        self.assertIs(getattr(pool, "_factory", None), _HTTP11ClientFactory,
                      _loud("HTTPConnectionPool._factory is not _HTTP11ClientFactory", "docker/client.py make_pool"))

        class Recording(_HTTP11ClientFactory):
            pass

        class Endpoint:
            factories: list[Any] = []

            def connect(self, factory: Any) -> "Deferred[Any]":
                self.factories.append(factory)
                return Deferred()

        endpoint = Endpoint()
        pool._factory = Recording
        pool.getConnection((b"http", b"docker", 80), endpoint)  # type: ignore[arg-type]
        [factory] = endpoint.factories
        self.assertIsInstance(factory, Recording, _loud("the pool ignores _factory", "docker/client.py make_pool"))
        self.assertTrue(callable(getattr(factory, "_quiescentCallback", None)),
                        _loud("_HTTP11ClientFactory._quiescentCallback is gone",
                              "docker/client.py _QuietClientFactory.buildProtocol"))


class ChannelTests(SynchronousTestCase):
    """http/site.py: our channel class inside Twisted's protocol wrapper."""

    def test_generic_channel_protocol_wraps_the_channel_we_give(self) -> None:
        try:
            from twisted.web.http import _GenericHTTPChannelProtocol
        except ImportError as error:
            self.fail(_loud(f"_GenericHTTPChannelProtocol is gone ({error})", "toolbox/twisted_private.py channel_protocol"))

        class MyChannel(http.HTTPChannel):
            pass

        class MySite(Site):
            def protocol(self) -> Any:  # type: ignore[override]
                return _GenericHTTPChannelProtocol(MyChannel())

        resource = HeldOpen()
        site = MySite(resource, reactor=Clock())
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.assertIsInstance(protocol, _GenericHTTPChannelProtocol,
                              _loud("Site.buildProtocol no longer calls self.protocol()", "http/site.py"))
        channel: Any = getattr(protocol, "_channel", None)
        self.assertIsInstance(channel, MyChannel, _loud("the wrapper does not hold our channel", "http/site.py"))
        self.assertIs(channel.site, site, _loud("the site is not set on our channel", "http/site.py"))
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(resource.requests), 1, _loud("data does not reach our channel", "http/site.py"))
        self.assertIs(resource.requests[0].channel, channel)

    def test_respond_to_bad_request_and_disconnect(self) -> None:
        protocol, transport = _connected_site(HeldOpen())
        channel = protocol._channel
        method: Any = getattr(channel, "_respondToBadRequestAndDisconnect", None)
        self.assertTrue(callable(method), _loud("HTTPChannel._respondToBadRequestAndDisconnect is gone",
                                                "toolbox/twisted_private.py RefusalHookChannel"))
        method()
        self.assertEqual(transport.value(), b"HTTP/1.1 400 Bad Request\r\n\r\n",
                         _loud("_respondToBadRequestAndDisconnect writes something else",
                               "toolbox/twisted_private.py RefusalHookChannel"))
        self.assertTrue(transport.disconnecting, _loud("_respondToBadRequestAndDisconnect no longer closes",
                                                       "toolbox/twisted_private.py RefusalHookChannel"))

    def test_pipelined_bytes_wait_in_the_data_buffer(self) -> None:
        # take_over_transport hands bytes that arrived after an upgrade request's head
        # (the client's first stdin bytes) to the splice; they sit in ``_dataBuffer``.
        resource = HeldOpen()
        protocol, _ = _connected_site(resource)
        channel = protocol._channel
        protocol.dataReceived(b"POST /exec/x/start HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n"
                              b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\nstdin bytes")
        self.assertEqual(len(resource.requests), 1)
        buffered: Any = getattr(channel, "_dataBuffer", None)
        self.assertIsInstance(buffered, list, _loud("HTTPChannel._dataBuffer is gone or not a list",
                                                    "toolbox/takeover.py take_over_transport"))
        self.assertEqual(b"".join(buffered), b"stdin bytes",
                         _loud("bytes after a request in progress are no longer kept in _dataBuffer",
                               "toolbox/takeover.py take_over_transport"))


class RequestTests(SynchronousTestCase):
    def test_disconnected_flag_follows_the_connection(self) -> None:
        resource = HeldOpen()
        protocol, _ = _connected_site(resource)
        protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        [request] = resource.requests
        where = ("toolbox/twisted_private.py client_gone, for toolbox/responses.py, proxy/relay.py, "
                 "proxy/fanout.py, proxy/splice.py")
        self.assertIs(getattr(request, "_disconnected", None), False,
                      _loud("Request._disconnected is gone or not False on a live request", where))
        protocol.connectionLost(Failure(ConnectionError("client went away")))
        self.assertIs(request._disconnected, True,
                      _loud("Request._disconnected is not set when the connection is lost", where))
        request.write(b"ignored")  # documented no-op after a disconnect; the code relies on it

    def test_body_hooks_see_the_length_then_the_chunks(self) -> None:
        calls: list[tuple[str, Any]] = []

        class Watching(Request):
            def gotLength(self, length: int | None) -> None:
                calls.append(("gotLength", length))
                super().gotLength(length)

            def handleContentChunk(self, data: bytes) -> None:
                calls.append(("chunk", data))
                super().handleContentChunk(data)

        site = Site(HeldOpen(), requestFactory=Watching, reactor=Clock())
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel")
        protocol.dataReceived(b"lo")
        self.assertEqual(calls, [("gotLength", 5), ("chunk", b"hel"), ("chunk", b"lo")],
                         _loud("Request.gotLength/handleContentChunk are no longer called as body hooks",
                               "security/body.py DiscardUnauthenticatedBody"))


class TLSShimTests(SynchronousTestCase):
    """tls/server.py: ``HalfCloseTLSProtocol`` overrides ``_flushReceiveBIO``."""

    def test_buffering_transport_has_the_state_the_shim_uses(self) -> None:
        where = "tls/server.py HalfCloseTLSProtocol"
        self.assertTrue(issubclass(tls.BufferingTLSTransport, tls.TLSMemoryBIOProtocol),
                        _loud("BufferingTLSTransport no longer subclasses TLSMemoryBIOProtocol", where))
        for name in ("_flushReceiveBIO", "_flushSendBIO", "_shutdownTLS", "_tlsShutdownFinished"):
            self.assertTrue(callable(getattr(tls.TLSMemoryBIOProtocol, name, None)),
                            _loud(f"TLSMemoryBIOProtocol.{name} is gone", where))
        for name in ("_lostTLSConnection", "_aborted"):
            self.assertIs(getattr(tls.TLSMemoryBIOProtocol, name, None), False,
                          _loud(f"TLSMemoryBIOProtocol.{name} is no longer a False class default", where))
        self.assertIn("self._flushReceiveBIO()", inspect.getsource(tls.TLSMemoryBIOProtocol.dataReceived),
                      _loud("dataReceived no longer goes through _flushReceiveBIO: the shim's override "
                            "would never run", where))
        self.assertIn("self._tlsConnection", inspect.getsource(tls.TLSMemoryBIOProtocol.dataReceived),
                      _loud("the OpenSSL connection is no longer _tlsConnection", where))

    def test_flush_receive_bio_is_the_code_the_shim_was_copied_from(self) -> None:
        digest = _body_digest(tls.TLSMemoryBIOProtocol._flushReceiveBIO)
        self.assertEqual(digest, FLUSH_RECEIVE_BIO_DIGEST, _loud(
            f"TLSMemoryBIOProtocol._flushReceiveBIO changed (digest {digest})",
            "tls/server.py HalfCloseTLSProtocol._flushReceiveBIO, a modified copy of it: re-derive it "
            "from the new code and update FLUSH_RECEIVE_BIO_DIGEST"))


class ReadSizeTests(SynchronousTestCase):
    def test_unix_connections_read_buffer_size_bytes_at_a_time(self) -> None:
        from twisted.internet import unix

        source = inspect.getsource(unix.Client.doRead)
        self.assertIn("self.bufferSize", source, _loud(
            "the unix client connection no longer reads bufferSize bytes at a time",
            "docker/connection.py Connection.connectionMade (256 kB reads from the Docker socket)"))


class OperationsPrivateAPITests(SynchronousTestCase):
    """http/channel.py, tls/server.py and twistd.py (issue 11)."""

    def test_parser_refusals_all_go_through_one_method(self) -> None:
        source = inspect.getsource(http.HTTPChannel)
        where = "http/channel.py AgentHTTPChannel (JSON 400/414/431 answers)"
        self.assertNotIn("400 Bad Request", source.replace(
            inspect.getsource(http.HTTPChannel._respondToBadRequestAndDisconnect), ""),
            _loud("HTTPChannel writes a 400 outside _respondToBadRequestAndDisconnect", where))
        for name in ("_receivedHeaderSize", "_receivedHeaderCount", "maxHeaders", "totalHeadersSize"):
            self.assertIn(f"self.{name}", source, _loud(f"HTTPChannel no longer uses {name}", where))

    def test_handling_request_is_true_while_a_request_is_answered(self) -> None:
        resource = HeldOpen()
        protocol, _ = _connected_site(resource)
        channel = protocol._channel
        self.assertIs(channel._handlingRequest, False, _loud("HTTPChannel._handlingRequest is gone",
                                                             "http/channel.py (head deadline)"))
        protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIs(channel._handlingRequest, True, _loud("_handlingRequest is not set while answering",
                                                            "http/channel.py (head deadline)"))
        resource.requests[0].finish()
        self.assertIs(channel._handlingRequest, False)

    def test_tls_handshake_done_flag(self) -> None:
        self.assertIs(getattr(tls.TLSMemoryBIOProtocol, "_handshakeDone", None), False,
                      _loud("TLSMemoryBIOProtocol._handshakeDone is no longer a False class default",
                            "tls/server.py HalfCloseTLSProtocol (TLS handshake deadline)"))
        self.assertIn("self._handshakeDone = True", inspect.getsource(tls.TLSMemoryBIOProtocol._checkHandshakeStatus),
                      _loud("_handshakeDone is no longer set by _checkHandshakeStatus",
                            "tls/server.py HalfCloseTLSProtocol (TLS handshake deadline)"))

    def test_twistd_reraises_the_reactor_exit_signal(self) -> None:
        from twisted.scripts import twistd

        where = "twistd.py exit_like_the_console_script (exit 0 after SIGTERM under twistd)"
        self.assertIn("runner._exitSignal", inspect.getsource(twistd.runApp),
                      _loud("twistd.runApp no longer reads the runner's _exitSignal", where))
        from twisted.application import app

        self.assertIn("reactor._exitSignal", inspect.getsource(app.ApplicationRunner.startReactor),
                      _loud("ApplicationRunner no longer takes _exitSignal from the reactor", where))
