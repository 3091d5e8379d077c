"""Mark a test that fails for a known reason, the same way under trial and pytest.

``pytest.mark.xfail`` means nothing to trial, and trial's ``todo`` attribute breaks under
pytest's unittest adapter. :func:`known_failure` works under both: an assertion failure
becomes a skip that names the reason, and a pass fails loudly, so the mark is removed as
soon as the behaviour is there (the test keeps its power to fail).
"""
from __future__ import annotations

import functools
import unittest
from typing import Any, Callable, TypeVar

__all__ = ["known_failure"]

F = TypeVar("F", bound=Callable[..., Any])


def known_failure(reason: str) -> Callable[[F], F]:
    """Decorate a (synchronous) test method that is expected to fail an assertion."""

    def decorate(test: F) -> F:
        @functools.wraps(test)
        def run(self: unittest.TestCase, *args: Any, **kwargs: Any) -> None:
            try:
                test(self, *args, **kwargs)
            except self.failureException as error:
                raise unittest.SkipTest(f"known failure ({reason}): {error}") from error
            raise self.failureException(f"passed although marked known_failure({reason!r}): remove the mark")

        return run  # type: ignore[return-value]

    return decorate
