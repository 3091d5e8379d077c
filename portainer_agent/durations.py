"""Go-style durations (``30s``, ``15m``, ``72h``, ``1h30m``, ``500ms``), as the original
agent's options use them."""
from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Return the duration in seconds; raise ``ValueError`` with a clear message.

    ``0`` alone is accepted (Go accepts it too); a bare number otherwise is refused,
    because ``30`` could mean seconds or minutes.
    """
    value = text.strip()
    if value == "0":
        return 0.0
    if not value:
        raise ValueError("empty duration")
    sign = 1.0
    if value[0] in "+-":
        sign = -1.0 if value[0] == "-" else 1.0
        value = value[1:]
    total, pos = 0.0, 0
    while pos < len(value):
        match = _PART.match(value, pos)
        if not match:
            raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 30s, 15m, 72h, 1h30m)")
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if sign < 0:
        raise ValueError(f"negative duration {text!r}")
    return total
