"""Ports for real listeners in tests.

A listener binds port 0 and reports the port the kernel chose; that is always the first
choice, since nothing can take the port between the choice and the listen:

* in the test's own reactor, read it back (``port.getHost().port``);
* an agent *process* takes ``--port 0`` (and ``--cluster-port 0``, ``--metrics-addr
  host:0``) with ``--ports-file PATH``, and writes the ports it bound there as one JSON
  object (replaced atomically as each listener binds): :func:`wait_for_bound_port` reads it.

Two kinds of listener must know their port before they listen:

* cluster services in one process that all use one port on several loopback addresses;
* programs that cannot report a bound port (Prometheus in the lab test).

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

import json
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from portainer_agent.testing.polling import wait_for

__all__ = ["PortReservation", "bound_ports", "reserve_port", "wait_for_bound_port"]


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


def bound_ports(path: Path) -> dict[str, int]:
    """The ports an agent started with ``--ports-file path`` has bound so far, by listener
    (``api``, ``cluster``, ``metrics``); empty before it wrote the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    ports: dict[str, int] = json.loads(text)  # replaced whole by a rename: never half written
    return ports


def wait_for_bound_port(path: Path, name: str, timeout: float, check: Callable[[], None] = lambda: None,
                        describe: Callable[[], str] | None = None) -> int:
    """The port the agent's ``name`` listener bound, once it is in ``path``. ``check()`` runs
    before each look and raises to stop waiting (e.g. when the agent process has exited)."""
    def bound() -> int | None:
        check()
        return bound_ports(path).get(name)

    port: int = wait_for(bound, timeout, f"the agent's {name} port in {path.name}", describe=describe)
    return port
