"""Class-wide fixtures (one dockerd, one lab, one agent per test class) under every runner.

pytest and ``unittest`` call ``setUpClass``/``tearDownClass``; twisted.trial's runner calls
neither. :class:`ClassFixture` makes the same class work under both: when a test's
``setUp`` finds that ``setUpClass`` has not run, it runs it once for the class, and tears
it down when trial moves on to the next class that has such a fixture (trial runs a class's
tests together) or when the process exits. So at most one trial-started fixture is alive at
a time: a suite with several labs does not hold every lab's dockerds at once.

A fixture that skipped (``SkipTest``) skips the rest of the class at once; one that failed
fails the rest of the class at once with the first error, instead of trying (and timing out)
again for every test.

Use it as the first base, and chain ``super()`` in ``setUpClass``/``tearDownClass``/``setUp``::

    class MyTests(ClassFixture, SynchronousTestCase):
        @classmethod
        def setUpClass(cls):
            super().setUpClass()
            cls.daemon = DockerDaemon.start(...)

        @classmethod
        def tearDownClass(cls):
            cls.daemon.stop()
            super().tearDownClass()
"""
from __future__ import annotations

import atexit
import sys
import traceback
import unittest
from typing import Any

__all__ = ["ClassFixture", "tear_down_trial_fixtures"]

#: The class whose fixture this module brought up for trial (at most one), in a list so
#: that the atexit hook and the next class see the same thing.
_trial_active: list[type] = []
_atexit_registered: list[bool] = []

_UP = "_class_fixture_up"
_ERROR = "_class_fixture_error"


class ClassFixture:
    """``setUpClass``/``tearDownClass`` that also run under ``python -m twisted.trial``."""

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()  # type: ignore[misc]
        setattr(cls, _UP, True)

    @classmethod
    def tearDownClass(cls) -> None:
        setattr(cls, _UP, False)
        super().tearDownClass()  # type: ignore[misc]

    def setUp(self) -> Any:
        cls = type(self)
        if not cls.__dict__.get(_UP):
            _bring_up(cls)
        return super().setUp()  # type: ignore[misc]


def _bring_up(cls: type) -> None:
    """Run ``cls.setUpClass`` for trial, remembering a skip or a failure for the class."""
    earlier = cls.__dict__.get(_ERROR)
    if isinstance(earlier, unittest.SkipTest):
        raise earlier
    if earlier is not None:
        raise AssertionError(f"the class fixture of {cls.__qualname__} failed earlier: {earlier!r}")
    tear_down_trial_fixtures()
    if not _atexit_registered:
        atexit.register(tear_down_trial_fixtures)
        _atexit_registered.append(True)
    try:
        cls.setUpClass()  # type: ignore[attr-defined]
    except unittest.SkipTest as skip:
        setattr(cls, _ERROR, skip)
        raise
    except BaseException as error:
        setattr(cls, _ERROR, error)
        _quietly_tear_down(cls)  # release what the failed set-up had already started
        raise
    _trial_active.append(cls)


def tear_down_trial_fixtures() -> None:
    """Tear down the fixture this module brought up for trial, if any."""
    while _trial_active:
        _quietly_tear_down(_trial_active.pop())


def _quietly_tear_down(cls: type) -> None:
    try:
        cls.tearDownClass()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - best effort, but said out loud
        # Not a logged failure: trial would pin it on whichever test is running now.
        print(f"tearing down the class fixture of {cls.__qualname__} failed:", file=sys.stderr)
        traceback.print_exc()
