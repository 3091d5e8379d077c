"""The member record every agent gossips about itself, and the rules that order two records.

A record is immutable; a change (a role promotion, a suspicion, a death) is a *new* record
that supersedes the old one. Which of two records about the same agent wins is decided by
:func:`supersedes` alone, so every node resolves conflicting gossip the same way without
coordination (SWIM's incarnation rule, extended with a process generation so a restarted
agent does not have to out-count the tombstone its previous life left behind).
"""
from __future__ import annotations

import enum
from typing import Any

import attrs

#: Bounds applied to every record that arrives from the network: membership data is small,
#: and a record that breaks them is dropped rather than stored.
MAX_TEXT_LENGTH = 255
MAX_FINGERPRINT_LENGTH = 128
VALID_ROLES = ("manager", "worker", None)


class MemberState(enum.Enum):
    """Liveness of a member as seen by the cluster.

    The order of the values is the SWIM precedence at equal incarnation: a suspicion
    overrides an alive claim, a death overrides a suspicion, a graceful leave is final.
    """

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def is_live(self) -> bool:
        """Alive and suspect members are routed to (a suspect may still refute)."""
        return self in (MemberState.ALIVE, MemberState.SUSPECT)


_RANK = {MemberState.ALIVE: 0, MemberState.SUSPECT: 1, MemberState.DEAD: 2, MemberState.LEFT: 3}


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed so the result parses back unambiguously."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class PeerAddress:
    """Where to reach a peer's cluster port, and the certificate pin if membership taught us one."""

    host: str
    port: int
    fingerprint: str | None = None

    @property
    def key(self) -> str:
        return format_hostport(self.host, self.port)


@attrs.frozen
class Member:
    """One agent as the cluster knows it.

    ``boot`` is the agent process start time in milliseconds since the epoch. It orders
    *generations* of the agent behind one cluster address: a restarted agent starts a new
    generation at incarnation 0 and immediately supersedes its dead predecessor, and of two
    live agents claiming the same node name the one with the larger ``boot`` is the newest.
    """

    node_name: str
    node_id: str
    role: str | None
    is_leader: bool
    api_addr: str
    api_port: int
    cluster_addr: str
    cluster_port: int
    version: str
    cert_fingerprint: str
    incarnation: int = 0
    state: MemberState = MemberState.ALIVE
    boot: int = 0

    @property
    def key(self) -> str:
        """Identity of the member in the member table: its cluster address (unique per agent)."""
        return format_hostport(self.cluster_addr, self.cluster_port)

    @property
    def peer(self) -> PeerAddress:
        return PeerAddress(self.cluster_addr, self.cluster_port, self.cert_fingerprint or None)

    @property
    def is_live(self) -> bool:
        return self.state.is_live

    @property
    def is_manager(self) -> bool:
        return self.role == "manager"

    @property
    def precedence(self) -> tuple[int, int, int]:
        return (self.boot, self.incarnation, self.state.rank)

    def with_state(self, state: MemberState, incarnation: int | None = None) -> "Member":
        return attrs.evolve(
            self, state=state, incarnation=self.incarnation if incarnation is None else incarnation
        )


def supersedes(new: Member, old: Member | None) -> bool:
    """Whether ``new`` replaces ``old`` (both about the same cluster address).

    Lexicographic on (generation, incarnation, state rank): a newer process generation
    always wins; within a generation a higher incarnation wins (that is how a member refutes a
    suspicion), and at equal incarnation the graver state wins. News about a member we never
    heard of is only accepted when it says the member is live: a death notice for a stranger
    carries nothing worth storing.
    """
    if old is None:
        return new.is_live
    return new.precedence > old.precedence


def newer_generation(a: Member, b: Member) -> Member:
    """Of two live members with the same node name, the one routing should use: the newest
    process (larger ``boot``), ties broken by address so every node picks the same one."""
    return max(a, b, key=lambda m: (m.boot, m.key))


class InvalidMember(ValueError):
    """A member record from the network that breaks the bounds; it is dropped."""


def member_to_fields(member: Member) -> dict[str, Any]:
    """Flat, wire-friendly fields (shared by the AMP encoding and the simulation)."""
    return {
        "node_name": member.node_name,
        "node_id": member.node_id,
        "role": member.role or "",
        "is_leader": member.is_leader,
        "api_addr": member.api_addr,
        "api_port": member.api_port,
        "cluster_addr": member.cluster_addr,
        "cluster_port": member.cluster_port,
        "version": member.version,
        "cert_fingerprint": member.cert_fingerprint,
        "incarnation": member.incarnation,
        "state": member.state.value,
        "boot": member.boot,
    }


def member_from_fields(fields: dict[str, Any]) -> Member:
    """Build and validate a member from wire fields; raises :class:`InvalidMember`."""
    try:
        role = fields["role"] or None
        member = Member(
            node_name=str(fields["node_name"]),
            node_id=str(fields["node_id"]),
            role=role,
            is_leader=bool(fields["is_leader"]),
            api_addr=str(fields["api_addr"]),
            api_port=int(fields["api_port"]),
            cluster_addr=str(fields["cluster_addr"]),
            cluster_port=int(fields["cluster_port"]),
            version=str(fields["version"]),
            cert_fingerprint=str(fields["cert_fingerprint"]),
            incarnation=int(fields["incarnation"]),
            state=MemberState(fields["state"]),
            boot=int(fields["boot"]),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise InvalidMember(str(error)) from error
    validate_member(member)
    return member


def validate_member(member: Member) -> None:
    """Reject records no honest agent produces, so a buggy peer cannot bloat the table."""
    for name in ("node_name", "node_id", "api_addr", "cluster_addr", "version"):
        if len(getattr(member, name)) > MAX_TEXT_LENGTH:
            raise InvalidMember(f"{name} too long")
    if not member.node_name or not member.cluster_addr:
        raise InvalidMember("node_name and cluster_addr are required")
    if len(member.cert_fingerprint) > MAX_FINGERPRINT_LENGTH:
        raise InvalidMember("cert_fingerprint too long")
    if member.role not in VALID_ROLES:
        raise InvalidMember(f"unknown role {member.role!r}")
    for port in (member.api_port, member.cluster_port):
        if not 0 < port < 65536:
            raise InvalidMember(f"port out of range: {port}")
    if member.incarnation < 0 or member.boot < 0 or member.incarnation >= 2**62 or member.boot >= 2**62:
        raise InvalidMember("incarnation/boot out of range")
