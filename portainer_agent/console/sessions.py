"""The live consoles, as a service: a stopping agent says goodbye to each.

A console is no longer a twisted.web request once upgraded, so the site's drain does not
see it. On stop, every session hangs up its shell and closes its websocket with 1001
(going away); the stop waits for both ends of each, at most ``timeout`` seconds, then
cuts what is left.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed

from portainer_agent.console.docker_stream import HANGUP_REPEAT, HANGUP_TRIES
from portainer_agent.timers import cancel_timer

if TYPE_CHECKING:
    from portainer_agent.console.session import ConsoleSession


class ConsoleSessions(Service):
    def __init__(self, clock: Any, timeout: float = HANGUP_REPEAT * (HANGUP_TRIES + 1)) -> None:
        self._clock = clock
        self._timeout = timeout
        self._sessions: set[ConsoleSession] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def track(self, session: ConsoleSession) -> Callable[[], None]:
        """Register a session; returns what the session calls once both ends are gone."""
        self._sessions.add(session)
        return lambda: self._sessions.discard(session)

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        sessions = list(self._sessions)
        if not sessions:
            return succeed(None)
        stopped: Deferred[None] = Deferred()

        def cut() -> None:
            for session in list(self._sessions):
                session.abort()
            if not stopped.called:
                stopped.callback(None)

        timer = self._clock.callLater(self._timeout, cut)

        def ended(_: Any) -> None:
            cancel_timer(timer)
            if not stopped.called:
                stopped.callback(None)

        DeferredList([s.go_away() for s in sessions], consumeErrors=True).addBoth(ended)
        return stopped
