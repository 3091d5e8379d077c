"""Do not store request bodies of unauthenticated requests.

``twisted.web`` reads a request's whole body before ``render()`` runs: up to 100 kB in
memory, anything larger (or chunked) into an unbounded temporary file. The signature is
checked in ``render()``, so without this an anonymous client could stream gigabytes into
the agent's temporary directory before being told 403. The signature headers are known
as soon as the headers end (``gotLength``); this mixin checks them there and, if they do
not authenticate, drops the body as it arrives. ``render()`` then refuses the request as
usual, with the same 403 body.

Use it in the site's request class, before ``Request``, and give each request the guard
(``tap.py`` gives it to the request factory, :class:`portainer_agent.http.request.AgentRequests`)::

    class AgentRequest(DiscardUnauthenticatedBody, Request): ...

Without a guard it does nothing.
"""
from __future__ import annotations

from typing import Any, Protocol

__all__ = ["BodyGuard", "DiscardUnauthenticatedBody"]


class BodyGuard(Protocol):
    """Says, without answering anything, whether a request's headers authenticate it
    (:meth:`portainer_agent.security.guard.SignatureGuard.authenticates`)."""

    def authenticates(self, request: Any) -> bool: ...


class DiscardUnauthenticatedBody:
    """``twisted.web.server.Request`` mixin: discard the body of unauthenticated requests."""

    #: True once the headers failed the signature check: body chunks are dropped.
    discarding_body = False
    #: The guard, set by the request's factory (None: every body is kept).
    guard: BodyGuard | None = None

    def gotLength(self, length: int | None) -> None:
        guard = self.guard
        if guard is not None and not guard.authenticates(self):
            self.discarding_body = True
            length = 0  # an empty in-memory body instead of a temporary file
        super().gotLength(length)  # type: ignore[misc]

    def handleContentChunk(self, data: bytes) -> None:
        if not self.discarding_body:
            super().handleContentChunk(data)  # type: ignore[misc]
