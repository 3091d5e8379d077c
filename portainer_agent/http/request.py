"""The agent's request class: routed once, when its headers are in.

twisted.web runs ``render`` only after the whole body is in; the agent must know earlier
where a request goes, to stream a large upload upstream as it arrives
(:class:`~portainer_agent.toolbox.upload.StreamingUploads`) and to drop the body of a request
whose signature fails (:class:`~portainer_agent.security.body.DiscardUnauthenticatedBody`).
So at ``gotLength`` the request asks the router it was built with for its route, once, and
keeps it (:attr:`AgentRequest.routed`) for the root's ``render``. The router and the guard
are given to the request factory (:class:`AgentRequests`, built by ``tap.py``); nothing is
looked up through the channel or the site.
"""
from __future__ import annotations

import time
from typing import Any

import attrs
from twisted.web.http import parse_qs
from twisted.web.server import Request

from portainer_agent.http.router import Routed, Router
from portainer_agent.toolbox.twisted_private import request_line
from portainer_agent.toolbox.upload import StreamingUploads
from portainer_agent.security.body import BodyGuard, DiscardUnauthenticatedBody


class AgentRequest(DiscardUnauthenticatedBody, StreamingUploads, Request):
    """Never parses form bodies into memory (the proxy streams them as they are), is routed
    when its headers are in, drops the body of a request without valid signature headers
    instead of spooling it, and streams the bodies its route says stream."""

    #: The route, decided at ``gotLength`` (None without a router: the root decides then).
    routed: Routed | None = None

    def __init__(self, channel: Any, *args: Any, router: Router | None = None, guard: BodyGuard | None = None,
                 **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)
        self.router = router
        self.guard = guard
        self.startedAt = time.monotonic()

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        if self.router is not None:
            # twisted.web sets these from the request line after the body is in; routing
            # needs them now (the same values).
            command, target, version = request_line(self.channel)
            self.method, self.uri, self.clientproto = command, target, version
            self.path, _, query = target.partition(b"?")
            self.args = parse_qs(query, True) if query else {}
            self.routed = self.router.decide(self)
        super().gotLength(length)

    def body_streams(self) -> bool:
        return self.routed is not None and self.router is not None and self.router.body_streams(self.routed)


@attrs.frozen
class AgentRequests:
    """The site's request factory: every request gets the router and the guard."""

    router: Router | None = None
    guard: BodyGuard | None = None

    def __call__(self, channel: Any, *args: Any, **kwargs: Any) -> AgentRequest:
        return AgentRequest(channel, *args, router=self.router, guard=self.guard, **kwargs)
