"""Helper threads whose failures fail the test.

An exception in a plain ``threading.Thread`` is printed and lost: the test goes on and
fails later for a reason that is not the real one, or passes. :class:`CheckedThread`
keeps the exception and :meth:`CheckedThread.finish` raises it in the test's own thread.
A helper that *expects* an error (a send that times out once nothing reads) catches
exactly that error itself and lets every other one through.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

__all__ = ["CheckedThread"]


class CheckedThread(threading.Thread):
    """A daemon thread running ``target(*args)``; :meth:`finish` joins it and re-raises."""

    def __init__(self, target: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        super().__init__(target=target, args=args, name=name or getattr(target, "__name__", None), daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as error:  # kept, and raised by finish() in the test's thread
            self.error = error

    @classmethod
    def started(cls, target: Callable[..., Any], *args: Any, name: str | None = None) -> "CheckedThread":
        thread = cls(target, *args, name=name)
        thread.start()
        return thread

    def finish(self, timeout: float = 30) -> None:
        """Join; fail if the thread is still running after ``timeout`` s or if it raised."""
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"helper thread {self.name!r} still running after {timeout}s")
        if self.error is not None:
            raise self.error
