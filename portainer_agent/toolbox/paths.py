"""Pure request-path and header rules (no I/O, no reactor)."""
from __future__ import annotations

import re
from typing import Iterable, Sequence, TypeVar

# Header values as given: lists, or the sequences of ``Headers.getAllRawHeaders``.
_Values = TypeVar("_Values", bound=Sequence[bytes])

_VERSION_PREFIX = re.compile(rb"\A/v(\d+\.\d+)(?=/|\Z)")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Not hop-by-hop, but recomputed by the client library for the upstream request.
RECOMPUTED_REQUEST = frozenset({b"content-length", b"expect", b"host"})
#: Set by this agent on every response; stripped from upstream (peer) responses so
#: each appears exactly once.
AGENT_RESPONSE_HEADERS = frozenset(
    {b"portainer-agent", b"portainer-agent-api-version", b"portainer-agent-platform"}
)


def split_version_prefix(path: bytes) -> tuple[bytes | None, bytes]:
    """``/v1.41/containers/json`` -> ``(b"1.41", b"/containers/json")``.

    Only a Docker API version at the very start is a prefix; ``/v2/...`` (agent API
    version) and ``/volumes/v1.5data`` are left alone.
    """
    match = _VERSION_PREFIX.match(path)
    if not match:
        return None, path
    rest = path[match.end():] or b"/"
    return match.group(1), rest


def connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    """Header names listed in ``Connection`` (also hop-by-hop, RFC 7230 §6.1)."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def forwardable_request_headers(
    headers: Iterable[tuple[bytes, _Values]], connection: Iterable[bytes] = ()
) -> list[tuple[bytes, _Values]]:
    """Request headers to send upstream: hop-by-hop and recomputed ones removed."""
    drop = HOP_BY_HOP | RECOMPUTED_REQUEST | connection_tokens(connection)
    return [(name, values) for name, values in headers if name.lower() not in drop]


def forwardable_response_headers(
    headers: Iterable[tuple[bytes, _Values]], connection: Iterable[bytes] = ()
) -> list[tuple[bytes, _Values]]:
    """Response headers to give the client: hop-by-hop, length and agent headers removed
    (the length is set from the upstream's, agent headers by this agent)."""
    drop = HOP_BY_HOP | AGENT_RESPONSE_HEADERS | {b"content-length"} | connection_tokens(connection)
    return [(name, values) for name, values in headers if name.lower() not in drop]


def is_upgrade_request(method: bytes, headers_connection: Iterable[bytes], upgrade: Sequence[bytes]) -> bool:
    """A request asking for Docker's hijacked stream (``Connection: Upgrade``)."""
    return bool(upgrade) and b"upgrade" in connection_tokens(headers_connection)
