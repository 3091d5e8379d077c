"""Ports for real listeners in other processes or services that must know theirs up front.

A listener in the test's own reactor binds port 0 and reads its port back
(``port.getHost().port``); that is always the first choice. Two kinds of listener cannot:

* an agent *process*, whose ``--port``/``--metrics-addr`` take 1-65535 and which logs the
  configured address, not a bound one;
* cluster services, which advertise their cluster port to peers before they listen, and
  which all use one port on several loopback addresses.

For those, :func:`reserve_port` lets the kernel pick a port (bind port 0 on the first
address) and *keeps* it: the sockets stay bound, never listening, with ``SO_REUSEADDR``.
The real listener binds the same port (Twisted sets ``SO_REUSEADDR`` on its listening
sockets, and Linux lets a second ``SO_REUSEADDR`` socket bind beside one that is not
listening), while anyone else binding it without ``SO_REUSEADDR``, or asking for port 0,
is kept off it. So, unlike bind-then-close, no other process can take the port between
the choice and the listen; release the reservation once the listener is up.

A held reservation is also the right "nothing listens here" port: a connection to it is
refused, and it stays refused for as long as the test holds it.
"""
from __future__ import annotations

import socket
from typing import Any, Sequence

__all__ = ["PortReservation", "reserve_port"]


class PortReservation:
    """One port held (bound, not listening) on every one of ``hosts``."""

    def __init__(self, port: int, sockets: list[socket.socket]) -> None:
        self.port = port
        self._sockets = sockets

    def release(self) -> None:
        """Let go of the port (call once the real listener is up); idempotent."""
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def __enter__(self) -> "PortReservation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _bound(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def reserve_port(hosts: Sequence[str] = ("127.0.0.1",), attempts: int = 50) -> PortReservation:
    """A port the kernel chose on ``hosts[0]`` and that is held on every one of ``hosts``."""
    for _ in range(attempts):
        first = _bound(hosts[0], 0)
        port: int = first.getsockname()[1]
        held = [first]
        try:
            for host in hosts[1:]:
                held.append(_bound(host, port))
        except OSError:  # taken on another address: let the kernel choose again
            for sock in held:
                sock.close()
            continue
        return PortReservation(port, held)
    raise RuntimeError(f"no port free on all of {list(hosts)} after {attempts} tries")
