"""A service that listens for a site and treats a failure to bind as fatal.

The agent API and the metrics listener differ only in their endpoint, their site and what
stopping means (the API drains in-flight requests); binding, the log lines and the fatal
callback are the same, so they live here once.

Port 0 asks the kernel for a free port. The "listening" line then names the port that was
bound, not the one configured, and :class:`BoundPorts` records it (and writes
``--ports-file``), so whoever started the agent (a test, a supervisor) learns it without
guessing a free port first.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def host_port(host: str, port: int) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BoundPorts:
    """The ports the agent's listeners bound, by listener name (``api``, ``cluster``,
    ``metrics``), written as one JSON object to ``path`` each time one is added.

    The file is replaced atomically (write a temporary file beside it, then rename), so a
    reader sees either the previous object or the new one, never half of one; a reader
    waits for the name it needs to appear."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self.ports: dict[str, int] = {}

    def record(self, name: str, port: int) -> None:
        self.ports[name] = port
        if self._path is not None:
            write_atomically(self._path, json.dumps(self.ports, sort_keys=True).encode() + b"\n")


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


class ListenerService(Service):
    """Listens with ``endpoint`` (on ``host``, ``port``) for ``site``; ``on_fatal(message)``
    when it cannot bind.

    ``what`` names the listener in the start line, ``scheme`` and ``path`` where it answers;
    the one-line failure starts with ``cannot``. Once bound, ``ports`` (when given)
    records the bound port under ``name``."""

    def __init__(self, endpoint: IStreamServerEndpoint, site: Any, host: str, port: int, *, what: str,
                 scheme: str, name: str, path: str = "", cannot: str = "cannot listen on",
                 on_fatal: Callable[[str], None] | None = None, ports: BoundPorts | None = None) -> None:
        self._endpoint = endpoint
        self.site = site
        self._host = host
        self._configured_port = port
        self._what = what
        self._scheme = scheme
        self._path = path
        self._name = name
        self._cannot = cannot
        self._on_fatal = on_fatal
        self._ports = ports
        self._waiting: list[Deferred[int]] = []
        self.port: IListeningPort | None = None
        #: The port bound (the configured one, or the kernel's choice for port 0); None until bound.
        self.bound_port: int | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._endpoint.listen(self.site).addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.bound_port = bound = port.getHost().port  # type: ignore[attr-defined]
        log.info("{what} listening on {url}", what=self._what, url=f"{self._scheme}://{host_port(self._host, bound)}{self._path}",
                 listener=self._name, port=bound)
        if self._ports is not None:
            self._ports.record(self._name, bound)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(bound)

    def _failed(self, failure: Failure) -> None:
        message = f"{self._cannot} {host_port(self._host, self._configured_port)}: {failure.getErrorMessage()}"
        # The message is a field, never the format string: an address or an error text
        # with braces in it must not be read as a format.
        log.error("{message}", message=message)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)
        if self._on_fatal is not None:
            self._on_fatal(message)

    def when_bound(self) -> "Deferred[int]":
        """The bound port, once listening (at once when it already is)."""
        if self.bound_port is not None:
            return succeed(self.bound_port)
        d: Deferred[int] = Deferred()
        self._waiting.append(d)
        return d

    def stop_listening(self) -> "Deferred[None]":
        """Close the listening port (the process keeps running)."""
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        # maybeDeferred unwraps the Deferred that stopListening may return; its overloads
        # cannot say so for a ``Deferred[None] | None`` result.
        return cast("Deferred[None]", maybeDeferred(port.stopListening))

    def stopService(self) -> Any:  # noqa: N802
        super().stopService()
        return self.stop_listening()
