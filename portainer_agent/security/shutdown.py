"""Security shutdown: close an unclaimed API (reference-agent.md §5.5, CVE-2022-24961).

In default mode the first Portainer to reach the agent pairs with it. An agent that
nobody claimed for a long time is an open door: whoever finds it first owns the node's
Docker daemon. So after ``--secret-timeout`` (default 72h, ``0`` disables), if no key is
associated and no secret is set, the API listener is closed. The process keeps running on
purpose: if it exited, Docker or Kubernetes would restart it and reopen the window.

This is a :class:`~twisted.application.service.Service` with an injected clock, so tests
drive it with ``task.Clock``; the wiring passes the reactor and a ``close_listener`` that
stops the API's listening port.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["SecurityShutdown"]


class _AssociationState(Protocol):
    @property
    def is_associated(self) -> bool: ...


class _DelayedCall(Protocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class _Clock(Protocol):
    """The part of ``IReactorTime`` used here (the reactor, or ``task.Clock``)."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> _DelayedCall: ...


class SecurityShutdown(Service):
    """Close the API listener if nobody is associated when ``timeout`` seconds have passed.

    :param clock: where to schedule the check (the reactor, or ``task.Clock`` in tests).
    :param timeout: seconds; ``0`` (or less) disables the shutdown.
    :param notary: anything with an ``is_associated`` property (true in secret mode).
    :param close_listener: stops accepting API connections; may return a Deferred.
    """

    log = Logger()

    def __init__(
        self,
        clock: _Clock,
        timeout: float,
        notary: _AssociationState,
        close_listener: Callable[[], Any],
        log: Logger | None = None,
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._notary = notary
        self._close_listener = close_listener
        self._call: _DelayedCall | None = None
        #: True once the listener was closed by this service.
        self.triggered = False
        if log is not None:
            self.log = log

    @property
    def enabled(self) -> bool:
        """False when the timeout is 0 or a secret makes the agent associated from the start."""
        return self._timeout > 0 and not self._notary.is_associated

    def startService(self) -> None:
        super().startService()
        if self.enabled:
            self._call = self._clock.callLater(self._timeout, self._expired)
            self.log.info(
                "The API closes in {timeout} seconds unless a Portainer instance pairs first"
                " (--secret-timeout; 0 disables)",
                timeout=self._timeout,
            )

    def stopService(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        super().stopService()

    def _expired(self) -> None:
        self._call = None
        if self._notary.is_associated:
            # Said once, so that a reader (and the end-to-end test) can see the check ran.
            self.log.info("--secret-timeout of {timeout} seconds passed: a Portainer instance is paired, "
                          "the API stays open", timeout=self._timeout)
            return
        self.triggered = True
        self.log.warn(
            "Shutting down the API server: no Portainer instance was associated within"
            " {timeout} seconds (--secret-timeout). The process keeps running so that"
            " Docker/Kubernetes does not restart it into a new pairing window;"
            " restart the agent deliberately to pair it again.",
            timeout=self._timeout,
        )
        maybeDeferred(self._close_listener).addErrback(self._close_failed)

    def _close_failed(self, failure: Failure) -> None:
        self.log.failure("Could not close the API listener", failure)
