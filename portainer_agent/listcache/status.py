"""Docker's time-relative container ``Status`` text, recomputed (pure).

``GET /containers/json`` says ``Up 5 minutes`` or ``Exited (0) 2 hours ago``: the daemon
formats the time since ``StartedAt`` / ``FinishedAt`` when it answers
(``container.State.String`` with ``go-units.HumanDuration``). An answer kept in memory
keeps its shape (prefix, suffix) and the container's times, and formats the duration again
at the moment it is served, with the same rules, so it says what the daemon would say then.
"""
from __future__ import annotations

import calendar
import re
from typing import Literal

import attrs

NS = 1_000_000_000
_HOUR = 3600 * NS

_DURATION = (r"(?:Less than a second|About a minute|About an hour|"
             r"[0-9]+ (?:second|seconds|minutes|hours|days|weeks|months|years))")
_UP = re.compile(rf"^(Up )({_DURATION})((?: \(.*\))?)$", re.DOTALL)
_AGO = re.compile(rf"^((?:Exited|Restarting) \(-?[0-9]+\) )({_DURATION})( ago)$", re.DOTALL)
_RFC3339 = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
                      r"(?:\.([0-9]{1,9}))?(Z|[+-][0-9]{2}:[0-9]{2})$")


def human_duration(ns: int) -> str:
    """``go-units.HumanDuration`` (the version Docker 20.10 vendors), for a duration in ns."""
    if ns < NS:
        return "Less than a second"
    seconds = ns // NS
    if seconds == 1:
        return "1 second"
    if seconds < 60:
        return f"{seconds} seconds"
    minutes = ns // (60 * NS)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    whole, rest = divmod(ns, _HOUR)
    exact_hours = float(whole) + rest / 3.6e12  # time.Duration.Hours()
    hours = int(exact_hours + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(exact_hours) // 24 // 365} years"


def next_change(ns: int) -> int:
    """The smallest duration above ``ns`` at which :func:`human_duration` may say something
    else: whole seconds below a minute, whole minutes below an hour, then whole and half
    hours (hours are rounded, days and more derive from the rounded hours, years from the
    whole ones)."""
    if ns < NS:
        return NS
    step = NS if ns < 60 * NS else 60 * NS if ns < _HOUR else _HOUR // 2
    return (ns // step + 1) * step


def parse_docker_time(text: str) -> int | None:
    """An RFC 3339 time from ``docker inspect`` as ns since the epoch; None for Go's zero
    time (``0001-01-01T00:00:00Z``: never started, never finished) or an unreadable one."""
    match = _RFC3339.match(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    if year <= 1:
        return None
    fraction = (match.group(7) or "").ljust(9, "0")
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    zone = match.group(8)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * NS + int(fraction)


@attrs.frozen
class StatusShape:
    """A time-relative status: ``prefix + duration + suffix``, counted from ``since``."""

    prefix: str
    suffix: str
    since: Literal["StartedAt", "FinishedAt"]

    def render(self, clock_ns: int, now_ns: int) -> str:
        return f"{self.prefix}{human_duration(now_ns - clock_ns)}{self.suffix}"


def status_shape(status: str) -> StatusShape | None:
    """The shape of a time-relative status, or None for one that does not change with time
    (``Created``, ``Dead``, ``Removal In Progress``, ``""``)."""
    match = _UP.match(status)
    if match is not None:
        return StatusShape(match.group(1), match.group(3), "StartedAt")
    match = _AGO.match(status)
    if match is not None:
        return StatusShape(match.group(1), match.group(3), "FinishedAt")
    return None
