"""The last list each peer gave this agent, to ask again conditionally (pure).

An aggregating agent keeps, per peer and per request URI, the body and the entity tag of
the peer's last answer. The next time it asks with ``If-None-Match``: a peer whose list
has not changed answers ``304`` with no body, and the kept body is merged instead. The
tag is a hash of the exact bytes (:func:`portainer_agent.listcache.answer.entity_tag`),
so a 304 means the bytes are the peer's current answer, whoever changed what in between:
read-your-writes holds across agents without any clock or gossip.

With the peers' states heard over membership (:mod:`portainer_agent.listcache.peer_states`),
a copy whose state the peer still announces, and whose texts still hold, is merged without
asking at all.
"""
from __future__ import annotations

from typing import Any

import attrs

from portainer_agent.listcache.store import BoundedStore


@attrs.frozen
class PeerCopy:
    etag: bytes
    body: bytes
    #: The peer's cache state the copy is valid in (``X-PortainerAgent-List-State``).
    state: str | None = None
    #: Until when (this agent's clock, seconds) its time-relative texts hold; None: always.
    valid_until: float | None = 0.0
    #: The copy, re-renderable here (a :class:`~portainer_agent.listcache.answer.KeptAnswer`
    #: built from the peer's clocks), and how far the peer's clock is ahead of ours (ns).
    answer: Any = None
    offset_ns: int = 0

    def rendered(self, now_ns: int) -> tuple[bytes, bytes]:
        """The body and tag the peer would give now (the copy itself if not re-renderable)."""
        if self.answer is None:
            return self.body, self.etag
        rendered: tuple[bytes, bytes] = self.answer.render(now_ns + self.offset_ns)
        return rendered

    @property
    def size(self) -> int:
        return len(self.body) + len(self.etag)


class PeerCopies:
    """Bounded like the list cache: by count and bytes, least recently used out."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._store: BoundedStore[tuple[str, bytes], PeerCopy] = BoundedStore(max_entries, max_bytes)

    @property
    def bytes(self) -> int:
        return self._store.bytes

    def get(self, node: str, uri: bytes) -> PeerCopy | None:
        return self._store.get((node, uri))

    def keep(self, node: str, uri: bytes, etag: bytes | None, body: bytes, state: str | None = None,
             valid_until: float | None = 0.0, answer: Any = None, offset_ns: int = 0) -> None:
        """The peer's 200 answer (or a 304 confirming a copy): kept if it has a tag, else any
        older copy is dropped."""
        if etag:
            self._store.put((node, uri), PeerCopy(etag, body, state, valid_until, answer, offset_ns))
        else:
            self._store.discard((node, uri))

    def forget(self, node: str, uri: bytes) -> None:
        self._store.discard((node, uri))
