"""One list answer kept in memory, served again byte for byte (pure).

Docker's answer is kept as its items' exact bytes (decoded shallowly with msgspec, as the
merge does), so serving it again costs a join, not an encode. A container whose
``Status`` is time-relative (:mod:`.status`) is kept as the bytes before and after its
``Status`` value, with the shape of that text and the container's clock; it is formatted
again at each answer. Building one proves the round trip: the items re-joined must be
Docker's bytes, and every recomputed ``Status`` must equal Docker's at the moment Docker
answered; an answer that fails either is not kept (:class:`NotKeepable`).
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Mapping, Sequence, Union

from functools import lru_cache
from typing import Any, Callable

import attrs

from portainer_agent.listcache.status import StatusShape, next_change, status_shape


@attrs.frozen
class _Codec:
    """msgspec, imported when the first containers answer is kept (not at start-up: an
    idle agent does without it, see tests/unit/test_startup_imports.py)."""

    msgspec: Any
    decode_items: Callable[[bytes], list[dict[str, Any]]]
    decode_str: Callable[[bytes], str]
    encode: Callable[[Any], bytes]
    errors: tuple[type[Exception], ...]


@lru_cache(maxsize=1)
def _codec() -> _Codec:
    import msgspec

    return _Codec(msgspec, msgspec.json.Decoder(list[dict[str, msgspec.Raw]]).decode,
                  msgspec.json.Decoder(str).decode, msgspec.json.Encoder().encode,
                  (msgspec.DecodeError, msgspec.ValidationError))

#: Marks where a ``Status`` value goes while an item is cut in two (random, so no label
#: value can contain it by accident; an item where it shows twice is not kept).
_MARK = b"\x01" + secrets.token_hex(8).encode() + b"\x01"


class NotKeepable(ValueError):
    """An answer that cannot be served again exactly (the reason says why)."""


@attrs.frozen
class TimedItem:
    """A container whose ``Status`` is formatted at each answer."""

    before: bytes
    shape: StatusShape
    clock_ns: int
    after: bytes


Part = Union[bytes, TimedItem]


def timed_statuses(body: bytes) -> dict[str, StatusShape]:
    """Container ID -> the shape of its time-relative ``Status``, for a containers list
    (the containers whose clocks must be known before the answer can be kept)."""
    found: dict[str, StatusShape] = {}
    for item in _items(body):
        shape = _shape_of(item)
        if shape is not None:
            found[_codec().decode_str(item["Id"])] = shape
    return found


def _items(body: bytes) -> list[dict[str, Any]]:
    codec = _codec()
    try:
        return codec.decode_items(body)
    except codec.errors as error:
        raise NotKeepable(f"not a list of objects: {error}") from None


def _shape_of(item: dict[str, Any]) -> StatusShape | None:
    raw = item.get("Status")
    if raw is None or "Id" not in item:
        return None
    codec = _codec()
    try:
        return status_shape(codec.decode_str(raw))
    except codec.errors:
        return None


#: A rendered body is reused until this long before its next text change (float margin).
_MARGIN_NS = 1_000


@attrs.define
class KeptAnswer:
    """A Docker list answer (status 200), ready to be served again.

    A body with time-relative statuses is rendered again only when one of its texts may
    have changed (:func:`~portainer_agent.listcache.status.next_change`): in between, the
    same bytes and tag are served."""

    #: Docker's header lines, without those of the message itself (length, date).
    headers: tuple[tuple[bytes, bytes], ...]
    #: The whole body when nothing in it changes with time, else None.
    static_body: bytes | None
    parts: tuple[Part, ...]
    size: int
    #: ``static_body``'s entity tag (None when it must be computed per answer).
    static_etag: bytes | None
    #: The last rendering (from, until: ns) and its body and tag.
    _rendered: tuple[int, int, bytes, bytes] | None = attrs.field(default=None, eq=False)

    def clocks(self) -> list[int]:
        """The clocks of the time-relative statuses, in body order (what an aggregating
        agent needs to format them itself: :func:`keep_with_clocks`)."""
        return [part.clock_ns for part in self.parts if isinstance(part, TimedItem)]

    def render(self, now_ns: int) -> tuple[bytes, bytes]:
        """The body Docker would give at ``now_ns``, and its entity tag."""
        body, tag, _ = self.render_until(now_ns)
        return body, tag

    def render_until(self, now_ns: int) -> tuple[bytes, bytes, int | None]:
        """:meth:`render`, and until when (ns) its texts stay as they are (None: always)."""
        if self.static_body is not None and self.static_etag is not None:
            return self.static_body, self.static_etag, None
        rendered = self._rendered
        if rendered is not None and rendered[0] <= now_ns < rendered[1]:
            return rendered[2], rendered[3], rendered[1]
        encode = _codec().encode
        until = None
        pieces = []
        for part in self.parts:
            if isinstance(part, bytes):
                pieces.append(part)
                continue
            pieces.append(part.before + encode(part.shape.render(part.clock_ns, now_ns)) + part.after)
            changes = part.clock_ns + next_change(now_ns - part.clock_ns)
            until = changes if until is None else min(until, changes)
        body = b"[" + b",".join(pieces) + b"]\n"
        tag = entity_tag(body)
        if until is None:
            return body, tag, None
        self._rendered = (now_ns, until - _MARGIN_NS, body, tag)
        return body, tag, until - _MARGIN_NS


def entity_tag(body: bytes) -> bytes:
    """A strong entity tag for exactly these bytes (a content hash: equal tags, equal
    bodies, whichever agent or generation produced them)."""
    return b'"' + hashlib.blake2b(body, digest_size=12).hexdigest().encode() + b'"'


def keep(body: bytes, headers: Sequence[tuple[bytes, bytes]], containers: bool,
         clocks: Mapping[str, int], answered_between: tuple[int, int]) -> KeptAnswer:
    """Docker's 200 answer as a :class:`KeptAnswer`.

    ``clocks``: container ID -> the ns time its time-relative status counts from
    (``StartedAt`` or ``FinishedAt``, from inspect); ``answered_between``: when the
    request left and when the answer came back (Docker formatted its texts in between).
    """
    kept_headers = tuple((name, value) for name, value in headers
                         if name.lower() not in (b"content-length", b"date", b"transfer-encoding", b"connection",
                                                 b"etag"))
    if not containers:
        return KeptAnswer(kept_headers, body, (body,), len(body), entity_tag(body))
    codec = _codec()
    encode, decode_str = codec.encode, codec.decode_str
    items = _items(body)
    if encode(items) + b"\n" != body:
        raise NotKeepable("the items do not re-join to Docker's bytes")
    parts: list[Part] = []
    timed = False
    sent, received = answered_between
    for item in items:
        shape = _shape_of(item)
        if shape is None:
            parts.append(encode(item))
            continue
        ident = decode_str(item["Id"])
        clock = clocks.get(ident)
        if clock is None:
            raise NotKeepable(f"no {shape.since} for container {ident[:12]}")
        said = decode_str(item["Status"])
        if said not in (shape.render(clock, sent), shape.render(clock, received)):
            raise NotKeepable(f"status {said!r} of container {ident[:12]} is not "
                              f"{shape.render(clock, received)!r}")
        marked = dict(item)
        marked["Status"] = codec.msgspec.Raw(_MARK)
        before, mark, after = encode(marked).partition(_MARK)
        if not mark or _MARK in after:
            raise NotKeepable("a status mark shows twice")
        parts.append(TimedItem(before, shape, clock, after))
        timed = True
    if not timed:
        return KeptAnswer(kept_headers, body, (body,), len(body), entity_tag(body))
    return KeptAnswer(kept_headers, None, tuple(parts), len(body), None)


def keep_with_clocks(body: bytes, clocks: Sequence[int], now_ns: int) -> KeptAnswer:
    """A peer's containers answer, re-renderable here: ``clocks`` are its time-relative
    statuses' clocks in body order (:meth:`KeptAnswer.clocks`), ``now_ns`` the peer's time
    when it formatted them (checked like Docker's, :func:`keep`)."""
    items = _items(body)
    decode_str = _codec().decode_str
    timed = [decode_str(item["Id"]) for item in items if _shape_of(item) is not None]
    if len(timed) != len(clocks):
        raise NotKeepable(f"{len(clocks)} clocks for {len(timed)} time-relative statuses")
    return keep(body, [], True, dict(zip(timed, clocks)), (now_ns, now_ns))

