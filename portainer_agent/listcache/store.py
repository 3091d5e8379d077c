"""A bounded map of answers, least recently used first out (pure).

Bounded twice: by the number of answers and by the bytes they hold, so a node with huge
lists cannot grow the agent without limit whatever its clients ask.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Iterator, Protocol, TypeVar


class Sized(Protocol):
    #: Bytes the value holds (its body, roughly).
    size: int


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Sized)


class BoundedStore(Generic[K, V]):
    """``get`` marks a key as recently used; ``put`` evicts the least recently used keys
    until both bounds hold (a value larger than ``max_bytes`` on its own is not kept)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, V] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))

    def values(self) -> list[V]:
        """The values, least recently used first (without marking them used)."""
        return list(self._items.values())

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> bool:
        """Keep ``value``; False if it is too large to keep at all."""
        self.discard(key)
        if value.size > self.max_bytes or self.max_entries < 1:
            return False
        self._items[key] = value
        self.bytes += value.size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.size
            self.evictions += 1
        return True

    def discard(self, key: K) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
