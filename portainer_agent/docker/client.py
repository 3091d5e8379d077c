"""The one HTTP/1.1 client for the Docker socket: its API and its keep-alive pool.

Everything the agent says to Docker goes through :class:`DockerClient`: the proxied
requests (:mod:`portainer_agent.proxy.local`, the aggregator's local leg), the node
identity and container facts (``get_json``), and the ``Upgrade: tcp`` hijacks of the
splice (:mod:`portainer_agent.proxy.splice`) and of the console
(:mod:`portainer_agent.console.docker_stream`). ``tap.py`` builds one, for the socket.

Connections are ``UNIXClientEndpoint`` connections, kept alive in a small LIFO pool, one
timer sweeping the idle ones. The rest lives beside this module, one job each:

- :mod:`~portainer_agent.docker.connection`: one socket and the request/response
  exchange it carries (request bodies streamed, a stale kept connection retried once);
- :mod:`~portainer_agent.docker.response`: the streamed ``IResponse``
  (:class:`~portainer_agent.docker.response.DockerResponse`) and whole-body readers;
- :mod:`~portainer_agent.docker.upgrade`: the upgrade exchange and its
  :class:`~portainer_agent.docker.upgrade.Upgraded` byte stream;
- :mod:`~portainer_agent.docker.wire`: request heads out, llhttp responses in (pure);
- :mod:`~portainer_agent.docker.blocking`: the blocking start-up read, without a reactor.

Only Twisted's public API is used here.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer

from portainer_agent.docker import wire
from portainer_agent.docker.connection import Connection, ConnectionFactory, Exchange
from portainer_agent.docker.response import DockerResponse
from portainer_agent.toolbox.whole_body import read_json_body
from portainer_agent.docker.upgrade import UpgradeExchange, Upgraded
from portainer_agent.docker.wire import DOCKER_HOST

__all__ = ["DockerClient"]


class DockerClient:
    """HTTP/1.1 to one upstream endpoint (the Docker socket) with a keep-alive pool.

    ``request`` and ``upgrade`` take the method, the request-target (path and query
    as the client sent it), header lines (``(name, value)`` pairs; ``Host`` and the
    body framing are added here) and a body (None, bytes, or an ``IBodyProducer``).
    """

    def __init__(self, reactor: Any, endpoint: IStreamClientEndpoint, host: bytes = DOCKER_HOST,
                 max_idle: int = 16, idle_timeout: float = 120.0, label: str = "") -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self.host = host
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: list[Connection] = []
        self._sweeper: Any = None
        self._all: set[Connection] = set()
        #: What this client talks to, for error messages (the socket path).
        self.label = label

    @property
    def reactor(self) -> Any:
        return self._reactor

    def elsewhere(self, endpoint: IStreamClientEndpoint, host: bytes) -> "DockerClient":
        """A client for another upstream that speaks the same HTTP/1.1 (a peer agent's
        TLS endpoint, for a spliced stream), without a pool."""
        return DockerClient(self._reactor, endpoint, host, max_idle=0, label=host.decode("latin-1"))

    @classmethod
    def for_socket(cls, reactor: Any, socket_path: str, **kwargs: Any) -> "DockerClient":
        return cls(reactor, UNIXClientEndpoint(reactor, socket_path, timeout=10), label=socket_path, **kwargs)

    def request(self, method: bytes, target: bytes, headers: wire.Headers = (), body: Any = None
                ) -> "Deferred[DockerResponse]":
        """Send a request; fires with the response once its head is in. Raises
        ValueError at once for a method or target that cannot go on the wire."""
        wire.check_request_line(method, target)
        exchange = Exchange(self, method, target, headers, _as_body(body))
        self._start(exchange)
        return exchange.result

    def upgrade(self, method: bytes, target: bytes, headers: wire.Headers, body: bytes = b""
                ) -> "Deferred[Upgraded | DockerResponse]":
        """Send an upgrade request (``headers`` carry ``Upgrade``) on a fresh connection;
        fires with :class:`Upgraded` on 101, else with the (normal) response."""
        wire.check_request_line(method, target)
        exchange = UpgradeExchange(self, method, target, headers, body)
        self._start(exchange, fresh=True)
        return exchange.result

    def get_json(self, path: str) -> "Deferred[tuple[int, Any]]":
        """``GET path``: (status, the parsed JSON body, or None if it is not JSON)."""
        return self.request(b"GET", path.encode("ascii")).addCallback(read_json_body, source=self.label)

    def close_idle(self) -> "Deferred[None]":
        """Close the kept-alive connections (on stop)."""
        idle, self._idle = self._idle, []
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for connection in idle:
            connection.close()
        return succeed(None)

    # pool

    def _start(self, exchange: Exchange, fresh: bool = False) -> None:
        while self._idle and not fresh:
            connection = self._idle.pop()
            if connection.connected_ and connection.transport is not None:
                connection.used += 1
                exchange.start(connection)
                return
        connection = Connection(self)
        connection.used = 1
        connecting = self._endpoint.connect(ConnectionFactory(connection))

        def connected(_: Any) -> None:
            self._all.add(connection)
            if exchange.result.called:  # cancelled while connecting
                connection.close()
                return
            exchange.start(connection)

        def failed(failure: Failure) -> None:
            if not exchange.result.called:
                exchange.result.errback(failure)

        connecting.addCallbacks(connected, failed)
        exchange.result.addErrback(_cancel_connect, connecting)

    def _release(self, connection: Connection) -> None:
        connection.reset_flow()
        if len(self._idle) >= self._max_idle or not connection.connected_:
            connection.close()
            return
        connection.idle_since = self._reactor.seconds()
        self._idle.append(connection)
        if self._sweeper is None:
            # One timer for the pool, not one per request.
            self._sweeper = self._reactor.callLater(self._idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than the idle timeout."""
        self._sweeper = None
        now = self._reactor.seconds()
        for connection in [c for c in self._idle if now - c.idle_since >= self._idle_timeout]:
            self._idle.remove(connection)
            connection.close()
        if self._idle:
            oldest = min(c.idle_since for c in self._idle)
            self._sweeper = self._reactor.callLater(max(0.0, oldest + self._idle_timeout - now), self._sweep)

    def _lost(self, connection: Connection) -> None:
        self._all.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)


def _cancel_connect(failure: Failure, connecting: Deferred[Any]) -> Failure:
    if failure.check(CancelledError) and not connecting.called:
        connecting.cancel()
    return failure


def _as_body(body: Any) -> Any:
    if body is None or isinstance(body, bytes):
        return body
    if not IBodyProducer.providedBy(body) and not hasattr(body, "startProducing"):
        raise TypeError(f"not a request body: {body!r}")
    return body
