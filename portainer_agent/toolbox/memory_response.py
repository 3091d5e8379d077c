"""An ``IResponse`` whose body is already in memory (an answer from the list cache).

It has what the relay and the body readers use of a Docker response: ``code``,
``phrase``, ``raw_headers`` (header lines as a Docker response carries them), ``headers``,
``length`` and ``deliverBody``, so it goes back to a client, or into a merge, by the same
code as an answer read from a socket.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer


@implementer(IPushProducer)
class _Delivered:
    """The "transport" a body protocol is given: nothing to pause or stop."""

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


@implementer(IResponse)
class MemoryResponse:
    version = (b"HTTP", 1, 1)
    previousResponse = None
    request = None

    def __init__(self, code: int, phrase: bytes, raw_headers: Sequence[tuple[bytes, bytes]], body: bytes) -> None:
        self.code = code
        self.phrase = phrase
        self.raw_headers = list(raw_headers)
        self.body = body
        self.length = len(body)

    @cached_property
    def headers(self) -> Headers:
        """``raw_headers`` as a ``Headers``, built once, when first asked for."""
        headers = Headers()
        for name, value in self.raw_headers:
            headers.addRawHeader(name, value)
        headers.setRawHeaders(b"content-length", [b"%d" % self.length])
        return headers

    def setPreviousResponse(self, response: Any) -> None:  # noqa: N802
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        protocol.makeConnection(_Delivered())
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone("Response body fully received")))
