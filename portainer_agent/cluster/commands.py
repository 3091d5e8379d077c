"""AMP commands between agents, and the encoding of member records into AMP boxes.

Every member travels as one ``AmpList`` element of short typed fields. AMP caps a value at
65 535 bytes and an ``AmpList`` is *one* value, so anything that can grow with the cluster
(the full state) is paged under :data:`PAGE_BUDGET`; piggy-backed updates are few by design and
trimmed to the same budget.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from twisted.logger import Logger
from twisted.protocols import amp

from portainer_agent.cluster.dissemination import Update
from portainer_agent.cluster.member import InvalidMember, Member, member_from_fields, member_to_fields

log = Logger(namespace="portainer_agent.cluster")

PROTOCOL_VERSION = 1
#: Bytes of encoded members per AMP value; below ``amp.MAX_VALUE_LENGTH`` (65 535) with room.
PAGE_BUDGET = 60_000

MEMBER_FIELDS: list[tuple[bytes, amp.Argument]] = [
    (b"node_name", amp.Unicode()),
    (b"node_id", amp.Unicode()),
    (b"role", amp.Unicode()),
    (b"is_leader", amp.Boolean()),
    (b"api_addr", amp.Unicode()),
    (b"api_port", amp.Integer()),
    (b"cluster_addr", amp.Unicode()),
    (b"cluster_port", amp.Integer()),
    (b"version", amp.Unicode()),
    (b"cert_fingerprint", amp.Unicode()),
    (b"incarnation", amp.Integer()),
    (b"state", amp.Unicode()),
    (b"boot", amp.Integer()),
]
UPDATE_FIELDS = MEMBER_FIELDS + [(b"origin", amp.Unicode())]


class NotAuthenticated(Exception):
    """A command arrived before the connection proved knowledge of the cluster key."""


class AuthenticationFailed(Exception):
    """The peer's proof did not match."""


class UnsupportedProtocol(Exception):
    """The peer speaks another version of this protocol."""


_AUTH_ERRORS = {NotAuthenticated: b"NOT_AUTHENTICATED", AuthenticationFailed: b"AUTH_FAILED"}


class Hello(amp.Command):
    """First command on a connection: nonces and identities for the mutual challenge."""

    arguments = [(b"nonce", amp.String()), (b"origin", amp.Unicode()), (b"protocol", amp.Integer())]
    response = [(b"nonce", amp.String()), (b"origin", amp.Unicode()), (b"proof", amp.String())]
    errors = {UnsupportedProtocol: b"UNSUPPORTED_PROTOCOL", **_AUTH_ERRORS}


class Prove(amp.Command):
    """The client's proof; the server accepts member data only after it."""

    arguments = [(b"proof", amp.String())]
    response = []  # type: ignore[var-annotated]
    errors = dict(_AUTH_ERRORS)


class Ping(amp.Command):
    """SWIM direct probe; both directions carry piggy-backed updates."""

    arguments = [(b"updates", amp.AmpList(UPDATE_FIELDS))]
    response = [(b"updates", amp.AmpList(UPDATE_FIELDS))]
    errors = dict(_AUTH_ERRORS)


class PingRequest(amp.Command):
    """SWIM indirect probe: ask the receiver to probe a target for us (ack or nack)."""

    arguments = [
        (b"target_host", amp.Unicode()),
        (b"target_port", amp.Integer()),
        (b"target_fingerprint", amp.Unicode()),
        (b"updates", amp.AmpList(UPDATE_FIELDS)),
    ]
    response = [(b"ack", amp.Boolean())]
    errors = dict(_AUTH_ERRORS)


class Gossip(amp.Command):
    """Fire-and-forget push of updates (the fast dissemination path)."""

    arguments = [(b"updates", amp.AmpList(UPDATE_FIELDS))]
    requiresAnswer = False


class PushState(amp.Command):
    """One page of the sender's full state (join or anti-entropy); merged as it arrives."""

    arguments = [(b"members", amp.AmpList(MEMBER_FIELDS)), (b"join", amp.Boolean())]
    response = []  # type: ignore[var-annotated]
    errors = dict(_AUTH_ERRORS)


class PullState(amp.Command):
    """One page of the receiver's full state: members whose key sorts after ``after``.

    ``next`` is the cursor for the following page, empty when done. Keying pages by member key
    rather than by index keeps them consistent while the table changes underneath."""

    arguments = [(b"after", amp.Unicode())]
    response = [(b"members", amp.AmpList(MEMBER_FIELDS)), (b"next", amp.Unicode())]
    errors = dict(_AUTH_ERRORS)


class Leave(amp.Command):
    """The sender leaves for good (SIGTERM): drop it now instead of suspecting it."""

    arguments = [(b"member", amp.AmpList(MEMBER_FIELDS))]
    response = []  # type: ignore[var-annotated]
    errors = dict(_AUTH_ERRORS)


# ---------------------------------------------------------------------- encoding

_MEMBER_LIST = amp.AmpList(MEMBER_FIELDS)
_UPDATE_LIST = amp.AmpList(UPDATE_FIELDS)


def encoded_size(fields: dict[str, Any], update: bool = False) -> int:
    """Bytes one element adds to an ``AmpList`` value."""
    return len((_UPDATE_LIST if update else _MEMBER_LIST).toStringProto([fields], None))


def encode_member(member: Member) -> dict[str, Any]:
    return member_to_fields(member)


def encode_updates(updates: Iterable[Update], budget: int = PAGE_BUDGET) -> list[dict[str, Any]]:
    """Updates as AmpList elements, trimmed so the whole list fits one AMP value."""
    result, used = [], 0
    for update in updates:
        fields = {**member_to_fields(update.member), "origin": update.origin}
        size = encoded_size(fields, update=True)
        if used + size > budget:
            break
        used += size
        result.append(fields)
    return result


def decode_members(elements: Sequence[dict[str, Any]]) -> list[Member]:
    """Valid members only: a malformed element is logged and dropped, not fatal."""
    members = []
    for fields in elements:
        try:
            members.append(member_from_fields(fields))
        except InvalidMember as error:
            log.debug("dropped an invalid member record: {error}", error=str(error))
    return members


def decode_updates(elements: Sequence[dict[str, Any]]) -> list[Update]:
    updates = []
    for fields in elements:
        try:
            updates.append(Update(member_from_fields(fields), str(fields.get("origin", ""))[:300]))
        except InvalidMember as error:
            log.debug("dropped an invalid update: {error}", error=str(error))
    return updates


def paginate(members: Iterable[Member], budget: int = PAGE_BUDGET) -> list[list[dict[str, Any]]]:
    """Split members (any number) into pages that each fit one AMP value."""
    pages: list[list[dict[str, Any]]] = [[]]
    used = 0
    for member in members:
        fields = member_to_fields(member)
        size = encoded_size(fields)
        if pages[-1] and used + size > budget:
            pages.append([])
            used = 0
        pages[-1].append(fields)
        used += size
    return pages if pages[0] else []


def page_after(members: Iterable[Member], after: str, budget: int = PAGE_BUDGET) -> tuple[list[dict[str, Any]], str]:
    """The page of members with key > ``after`` (sorted by key) and the next cursor."""
    ordered = sorted((m for m in members if m.key > after), key=lambda m: m.key)
    page: list[dict[str, Any]] = []
    used = 0
    for member in ordered:
        fields = member_to_fields(member)
        size = encoded_size(fields)
        if page and used + size > budget:
            return page, page_last_key(page)
        page.append(fields)
        used += size
    return page, ""


def page_last_key(page: Sequence[dict[str, Any]]) -> str:
    from portainer_agent.cluster.member import format_hostport

    last = page[-1]
    return format_hostport(last["cluster_addr"], last["cluster_port"])


class ListState(amp.Command):
    """An agent's list cache state (``boot``, ``generation``): sent when what it holds
    changed, and as a heartbeat. An aggregating agent merges its kept copy of a peer's list
    without asking while it has heard, recently, that the peer's state is the copy's
    (:mod:`portainer_agent.listcache.peer_states`). Unknown to older agents: an error there
    only means they are asked every time."""

    arguments = [(b"node", amp.Unicode()), (b"boot", amp.Unicode()), (b"generation", amp.Integer())]
    response: list[tuple[bytes, amp.Argument]] = []

