"""Which list requests can be answered from memory, and under which key (pure).

Two requests share a key when Docker would give them the same answer: the key is the
list, the API version prefix (Docker shapes its answer by version) and the query
parameters Docker reads, normalised the way Docker parses them (booleans by
``httputils.BoolValue``, ``filters`` as a set of terms); parameters Docker ignores do not
split the key. A request whose query Docker would reject (a bad ``filters`` or ``limit``)
is not cacheable: Docker answers it, with its own error.
"""
from __future__ import annotations

import json
import re
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

import attrs

#: The lists, by their unversioned path.
LISTS: dict[str, str] = {
    "/containers/json": "containers",
    "/images/json": "images",
    "/volumes": "volumes",
    "/networks": "networks",
}

_VERSIONED = re.compile(r"^/v([0-9]+\.[0-9]+)(/.*)$")


class _NotCacheable(ValueError):
    """A parameter Docker would reject, or one whose answer must not be kept (``size=1``)."""


def _bool(value: str) -> str:
    # httputils.BoolValue: anything but "", 0, no, false, none (any case, trimmed) is true.
    return "0" if value.strip().lower() in ("", "0", "no", "false", "none") else "1"


_ATOI = re.compile(r"^[+-]?[0-9]+$")


def _int(value: str) -> str:
    # strconv.Atoi: an optional sign and digits, nothing else ("" is no limit, as 0 is).
    if value == "":
        return ""
    if _ATOI.match(value) is None:
        raise _NotCacheable(f"limit {value!r}")
    return str(int(value, 10))


def _filters(value: str) -> str:
    """``filters.FromJSON``: ``{"k": {"v": true}}`` or the legacy ``{"k": ["v"]}``, as a
    canonical string. Docker reads a term's presence, not its boolean (``Args.Get`` lists
    the map's keys), so ``{"v": false}`` filters on ``v`` too."""
    if value == "":
        return ""
    try:
        parsed = json.loads(value)
    except ValueError:
        raise _NotCacheable("filters") from None
    if parsed is None:
        return ""
    if not isinstance(parsed, dict):
        raise _NotCacheable("filters")
    terms: dict[str, list[str]] = {}
    for name, values in parsed.items():
        if isinstance(values, dict):
            on = list(values)
            if any(not isinstance(flag, bool) for flag in values.values()):
                raise _NotCacheable("filters")
        elif isinstance(values, list) and all(isinstance(v, str) for v in values):
            on = list(values)
        else:
            raise _NotCacheable("filters")
        terms[name] = sorted(set(on))
    return json.dumps(sorted(terms.items()), separators=(",", ":"))


def _text(value: str) -> str:
    return value


_PARAMETERS: dict[str, dict[str, Callable[[str], str]]] = {
    "containers": {"all": _bool, "limit": _int, "size": _bool, "filters": _filters, "before": _text,
                   "since": _text},
    "images": {"all": _bool, "filters": _filters, "filter": _text, "digests": _bool, "shared-size": _bool,
               "manifests": _bool},
    "volumes": {"filters": _filters},
    "networks": {"filters": _filters},
}


@attrs.frozen
class ListKey:
    """What an answer from memory is kept under."""

    #: ``containers``, ``images``, ``volumes`` or ``networks``.
    list: str
    #: The API version the client asked for ("" for the unversioned path).
    version: str
    #: The parameters Docker reads, normalised, sorted.
    query: tuple[tuple[str, str], ...]


def list_key(method: bytes, uri: bytes) -> ListKey | None:
    """The key of a cacheable list request, or None (not a list, or not cacheable)."""
    if method != b"GET":
        return None
    try:
        text = uri.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = urlsplit(text)
    path, version = parts.path, ""
    match = _VERSIONED.match(path)
    if match is not None:
        version, path = match.group(1), match.group(2)
    which = LISTS.get(path)
    if which is None or ";" in parts.query:
        return None
    readers = _PARAMETERS[which]
    seen: dict[str, str] = {}
    try:
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            reader = readers.get(name)
            if reader is None or name in seen:  # ignored by Docker, or not its first value
                continue
            seen[name] = reader(value)
    except _NotCacheable:
        return None
    if seen.get("size") == "1":
        return None  # sizes are computed on demand and change without an event
    query = tuple(sorted((name, value) for name, value in seen.items() if value not in ("", "0")))
    return ListKey(which, version, query)
