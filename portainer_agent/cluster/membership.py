"""The read side of membership: what routing and ``/agents`` see.

The view resolves duplicate node names (an old and a new agent task on one Docker node, both
alive for a while): only the newest process generation is routed to, the others are reported
as conflicts. The Go agent returned whichever serf listed first and aggregated both.
"""
from __future__ import annotations

from typing import Callable, Protocol

import attrs
from twisted.logger import Logger

from portainer_agent.cluster.member import Member, newer_generation

log = Logger(namespace="portainer_agent.cluster")


class MemberSource(Protocol):
    """Anything holding a member table (the :class:`~portainer_agent.cluster.swim.SwimNode`)."""

    @property
    def local(self) -> Member: ...

    def live_members(self) -> list[Member]: ...


@attrs.frozen
class NameConflict:
    """Several live agents claim one node name; ``routed`` wins, ``shadowed`` are ignored."""

    node_name: str
    routed: Member
    shadowed: tuple[Member, ...]


class MembershipView:
    """Live members by node name, self included, duplicates resolved to the newest."""

    def __init__(self, source: MemberSource) -> None:
        self._source = source
        self._warned: set[tuple[str, ...]] = set()
        self._departure_watchers: list[Callable[[Member], None]] = []

    def watch_departures(self, watcher: Callable[[Member], None]) -> None:
        """``watcher(member)`` whenever a live member stops being live (declared dead, or
        left): whoever has requests in flight to it fails them at once."""
        self._departure_watchers.append(watcher)

    def member_departed(self, member: Member) -> None:
        """Called by the membership service when ``member`` stopped being live."""
        for watcher in list(self._departure_watchers):
            try:
                watcher(member)
            except Exception:  # noqa: BLE001 - one watcher's bug must not hide the others
                log.failure("a departure watcher failed for {node}", node=member.node_name)

    def has_live_agent_at(self, api_addr: str, api_port: int) -> bool:
        """Whether a live member serves its agent API at this address (peers are dialled
        only then)."""
        return any(m.api_addr == api_addr and m.api_port == api_port for m in self._source.live_members())

    def is_alive(self, member: Member) -> bool:
        """Whether this very agent (same address, same process generation) is live."""
        return any(m.key == member.key and m.boot == member.boot
                   for m in self._source.live_members())

    @property
    def local(self) -> Member:
        return self._source.local

    def alive_members(self) -> list[Member]:
        """One member per node name (the newest generation), sorted by node name."""
        chosen: dict[str, Member] = {}
        for member in self._source.live_members():
            current = chosen.get(member.node_name)
            chosen[member.node_name] = member if current is None else newer_generation(current, member)
        # Self follows the same rule: if a newer agent runs on our node, routing goes to it.
        return sorted(chosen.values(), key=lambda m: (m.node_name, m.key))

    def member_by_name(self, name: str) -> Member | None:
        for member in self.alive_members():
            if member.node_name == name:
                return member
        return None

    def managers(self) -> list[Member]:
        return [m for m in self.alive_members() if m.is_manager]

    def leader(self) -> Member | None:
        return next((m for m in self.alive_members() if m.is_leader), None)

    def conflicts(self) -> list[NameConflict]:
        """Node names claimed by more than one live agent; logs each new conflict once."""
        by_name: dict[str, list[Member]] = {}
        for member in self._source.live_members():
            by_name.setdefault(member.node_name, []).append(member)
        result = []
        for name, members in sorted(by_name.items()):
            if len(members) < 2:
                continue
            routed = members[0]
            for member in members[1:]:
                routed = newer_generation(routed, member)
            shadowed = tuple(sorted((m for m in members if m is not routed), key=lambda m: m.key))
            conflict = NameConflict(name, routed, shadowed)
            signature = (name, routed.key, *(m.key for m in shadowed))
            if signature not in self._warned:
                self._warned.add(signature)
                log.warn(
                    "node name {node} is claimed by several live agents; routing to the newest "
                    "{routed}, ignoring {shadowed}",
                    node=name, routed=routed.key, shadowed=[m.key for m in shadowed],
                )
            result.append(conflict)
        return result
