"""A service that listens for a site and treats a failure to bind as fatal.

The agent API and the metrics listener differ only in their endpoint, their site and what
stopping means (the API drains in-flight requests); binding, the log lines and the fatal
callback are the same, so they live here once.
"""
from __future__ import annotations

from typing import Any, Callable, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class ListenerService(Service):
    """Listens with ``endpoint`` for ``site``; ``on_fatal(message)`` when it cannot bind.

    ``what`` names the listener in the start line, ``url`` is where it answers once bound,
    ``describe`` the address in the one-line failure, which starts with ``cannot``."""

    def __init__(self, endpoint: IStreamServerEndpoint, site: Any, describe: str, *, what: str, url: str,
                 cannot: str = "cannot listen on", on_fatal: Callable[[str], None] | None = None) -> None:
        self._endpoint = endpoint
        self.site = site
        self._describe = describe
        self._what = what
        self._url = url
        self._cannot = cannot
        self._on_fatal = on_fatal
        self.port: IListeningPort | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._endpoint.listen(self.site).addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        log.info("{what} listening on {url}", what=self._what, url=self._url)

    def _failed(self, failure: Failure) -> None:
        message = f"{self._cannot} {self._describe}: {failure.getErrorMessage()}"
        # The message is a field, never the format string: an address or an error text
        # with braces in it must not be read as a format.
        log.error("{message}", message=message)
        if self._on_fatal is not None:
            self._on_fatal(message)

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
