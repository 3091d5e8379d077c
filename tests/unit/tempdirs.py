"""Real temporary directories for unit tests, removed when the test ends.

(``TestCase.mktemp`` would put them under the current directory when pytest runs
the suite, i.e. in the checkout.)
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase


def temp_dir(case: SynchronousTestCase) -> Path:
    path = Path(tempfile.mkdtemp(prefix="pa-unit-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path
