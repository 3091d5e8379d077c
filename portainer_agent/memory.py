"""Giving back to the system the heap that the agent's start used and freed.

Starting the agent imports some 550 modules; the temporary objects of that work (source
compiled when no bytecode cache is written, file contents, parser state) are freed, but
glibc's allocator keeps the freed pages in the process, where an agent idle for months
would hold them for good. One ``malloc_trim(0)`` once the agent runs returns them:
about 0.5 MB of RSS measured on an idle agent (``bench/idle_rss.py``, issue 15). Elsewhere
than glibc (musl, macOS) there is no such call and this does nothing.
"""
from __future__ import annotations

import ctypes
from typing import Any, Callable


def _glibc() -> Any:
    return ctypes.CDLL(None)


def release_free_heap(libc: Callable[[], Any] = _glibc) -> bool:
    """Return the allocator's free pages to the system; False when the C library has
    no ``malloc_trim`` (nothing done)."""
    try:
        trim = libc().malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
