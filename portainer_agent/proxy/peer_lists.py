"""The last list each peer gave this agent, to ask again conditionally (pure).

An aggregating agent keeps, per peer and per request URI, the body and the entity tag of
the peer's last answer. The next time it asks with ``If-None-Match``: a peer whose list
has not changed answers ``304`` with no body, and the kept body is merged instead. The
tag is a hash of the exact bytes (:func:`portainer_agent.listcache.answer.entity_tag`),
so a 304 means the bytes are the peer's current answer, whoever changed what in between:
read-your-writes holds across agents without any clock or gossip.
"""
from __future__ import annotations

import attrs

from portainer_agent.listcache.store import BoundedStore


@attrs.frozen
class PeerCopy:
    etag: bytes
    body: bytes

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

    def keep(self, node: str, uri: bytes, etag: bytes | None, body: bytes) -> None:
        """The peer's 200 answer: kept if it has a tag, else any older copy is dropped."""
        if etag:
            self._store.put((node, uri), PeerCopy(etag, body))
        else:
            self._store.discard((node, uri))

    def forget(self, node: str, uri: bytes) -> None:
        self._store.discard((node, uri))
