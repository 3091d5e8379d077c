"""The ``Upgrade: tcp`` exchange: a request whose ``101`` turns the connection into a byte stream.

``docker exec``/``attach`` (and the websocket console) ask Docker, or a peer agent that
forwards to its Docker, to hijack the HTTP connection. :meth:`DockerClient.upgrade
<portainer_agent.docker.client.DockerClient.upgrade>` sends the request on a fresh
connection as an :class:`UpgradeExchange`. On ``101`` the connection leaves the pool for
good and comes back as :class:`Upgraded`: the answer's head as received, the bytes that
followed it, and :meth:`Upgraded.hand_over` to give the stream to the splice
(:mod:`portainer_agent.proxy.splice`) or the console
(:mod:`portainer_agent.console.docker_stream`). Any other answer is an ordinary streamed
response, and its connection is closed once it is read.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocol

from portainer_agent.docker.connection import Connection, Exchange

__all__ = ["UpgradeExchange", "Upgraded"]


class Upgraded:
    """A ``101`` answer: its head as received, the bytes that followed it, and the
    connection, now a raw byte stream for :meth:`hand_over`."""

    def __init__(self, code: int, phrase: bytes, raw_headers: list[tuple[bytes, bytes]], rest: bytes,
                 connection: Connection) -> None:
        self.code = code
        self.phrase = phrase
        self.raw_headers = raw_headers
        self.rest = rest
        self._connection = connection

    @property
    def transport(self) -> Any:
        return self._connection.transport

    def hand_over(self, protocol: IProtocol) -> None:
        """From now on ``protocol`` receives the connection's bytes and its (half-)close."""
        self._connection.delegate(protocol)


class UpgradeExchange(Exchange):
    """An exchange that asks for an upgrade: fires with :class:`Upgraded` on ``101``, with
    the (normal) response otherwise; either way its connection never goes back to the pool."""

    upgrade = True

    _upgrade_head: tuple[int, bytes, list[tuple[bytes, bytes]]] | None = None

    def head(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        if code == 101:
            self._keep_alive = keep_alive
            self._upgrade_head = (code, phrase, headers)
            return
        super().head(code, phrase, headers, keep_alive)

    def upgraded(self, rest: bytes) -> None:
        assert self._upgrade_head is not None and self._connection is not None
        code, phrase, headers = self._upgrade_head
        connection, self._connection = self._connection, None
        connection.exchange = None
        if not self.result.called:
            self.result.callback(Upgraded(code, phrase, headers, rest, connection))
        else:
            connection.abort()
