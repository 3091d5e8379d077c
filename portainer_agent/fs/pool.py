"""A small, bounded thread pool for blocking filesystem work (browse, host info).

Why: ``scandir`` + ``lstat`` of a 100,000-entry directory, an ``fsync``, a ``rename`` on a
slow or hung disk all block the thread that calls them. On the reactor thread every other
request, and membership's probes, would wait as long (a 100k listing stalled ``/ping``
for 0.75 s, issue 15). Here they run in a :class:`~twisted.python.threadpool.ThreadPool`
of a few threads owned by a :class:`PoolService`, started and stopped with the agent's
service tree; the work's result comes back to the reactor thread as a Deferred.

Users take a :data:`RunInPool` callable (``run(function, *args) -> Deferred``), so tests
inject :func:`run_inline` (synchronous, no threads) or a real pool. Functions run in the
pool must not touch Twisted objects (transports, requests, Deferreds): they take and
return plain values.
"""
from __future__ import annotations

import threading
from functools import partial
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from portainer_agent.errors import AgentError

log = Logger()

#: ``run(function, *args)``: ``function(*args)`` off the reactor thread, its result as a Deferred.
RunInPool = Callable[..., "Deferred[Any]"]

#: Threads for disk work: a few are enough (the disk, not the CPU, is the limit), and a
#: bound keeps a hung filesystem from taking more than this many threads.
DEFAULT_THREADS = 4
#: How long a stop waits for work still running (a hung disk must not hang the exit).
STOP_WAIT = 5.0

POOL_STOPPED = AgentError(503, "The agent is stopping", "Filesystem work is no longer accepted")


def run_inline(function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    """A :data:`RunInPool` for tests: runs ``function`` at once, on the calling thread."""
    return maybeDeferred(function, *args)


class PoolService(Service):
    """Owns the disk thread pool: started with the agent, stopped after the API has
    drained (add it to the service tree before the API listener). :meth:`run` is the
    :data:`RunInPool` to hand out."""

    def __init__(self, reactor: Any, threads: int = DEFAULT_THREADS, name: str = "disk") -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        # Daemon threads: a thread stuck in a syscall on a hung filesystem must not keep
        # the process alive after the reactor has stopped.
        self.pool.threadFactory = partial(threading.Thread, daemon=True)  # type: ignore[assignment]

    def run(self, function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        if not self.running:  # stopped (or stopping): the pool would drop the work silently
            return fail(POOL_STOPPED)
        return deferToThreadPool(self._reactor, self.pool, function, *args)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.pool.start()

    def stopService(self) -> "Deferred[None]":  # noqa: N802
        super().stopService()
        done: Deferred[None] = Deferred()
        # ThreadPool.stop joins its threads: done in a helper thread so that the reactor
        # keeps running, with a bound (work still running on a hung disk is left behind).
        stopper = threading.Thread(target=self._stop_pool, args=(done,), name="disk-pool-stop", daemon=True)
        stopper.start()
        timer = self._reactor.callLater(STOP_WAIT, self._gave_up, done)
        done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return done

    def _stop_pool(self, done: "Deferred[None]") -> None:
        self.pool.stop()
        self._reactor.callFromThread(lambda: None if done.called else done.callback(None))

    def _gave_up(self, done: "Deferred[None]") -> None:
        if not done.called:
            log.warn("the disk thread pool did not stop within {seconds}s (a filesystem call is hanging)",
                     seconds=STOP_WAIT)
            done.callback(None)
