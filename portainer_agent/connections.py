"""Connection limits: the open-file limit, the connection cap and its refusal log.

The agent is exposed on the Swarm network, so one client must not be able to use up
its file descriptors: new API connections above ``--max-connections`` are closed as
soon as they are accepted (before any TLS work), the others keep being served, and
the refusals are logged at most once a minute (a flood must not flood the log too).
"""
from __future__ import annotations

import resource
from typing import Any, Callable

from twisted.logger import Logger

log = Logger()

#: Descriptors kept for everything that is not a client connection: listening ports,
#: cluster connections, log files, certificates.
RESERVED_DESCRIPTORS = 64

#: Twisted's default for a TLS handshake is "forever"; a client gets this long.
TLS_HANDSHAKE_TIMEOUT = 10.0


def raise_open_file_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit now
    in force. Best effort: a refusal leaves the limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _kernel_open_max(soft)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.warn("cannot raise the open-file limit from {soft} to {target}: {error}", soft=soft,
                     target=target, error=str(error))
            return soft
        return target
    return soft


def _kernel_open_max(fallback: int) -> int:
    try:
        with open("/proc/sys/fs/nr_open") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return fallback


def connection_cap(configured: int, open_file_limit: int) -> int:
    """The cap in force: ``configured``, lowered so that every allowed connection can
    also hold its upstream socket (to Docker or a peer) within the open-file limit."""
    return max(1, min(configured, (open_file_limit - RESERVED_DESCRIPTORS) // 2))


class RefusalLog:
    """Counts refusals; logs a warning on the first one and then at most once per
    ``interval`` seconds, with the number refused since the last line."""

    def __init__(self, clock: Any, cap: int, interval: float = 60.0,
                 on_refused: Callable[[], None] | None = None) -> None:
        self._clock = clock
        self._cap = cap
        self._interval = interval
        self._on_refused = on_refused
        self._last_logged: float | None = None
        self._unlogged = 0
        self.total = 0

    def refused(self) -> None:
        self.total += 1
        self._unlogged += 1
        if self._on_refused is not None:
            self._on_refused()
        now = self._clock.seconds()
        if self._last_logged is None or now - self._last_logged >= self._interval:
            log.warn("connection limit reached ({cap} open): refused {count} new connection(s) since the last "
                     "such line; raise --max-connections if this is legitimate load", cap=self._cap,
                     count=self._unlogged)
            self._last_logged = now
            self._unlogged = 0
