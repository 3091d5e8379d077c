"""The HTTP client between agents: treq's ``HTTPClient`` over the pinned, pooled peer agent,
made verbatim.

Every plain request to another agent (a forwarded request, a manager operation, a leg of an
aggregated list, the Swarm node list read from a manager) goes through
:meth:`PeerClient.request`, with the response unbuffered (streams stay streams) and no
redirect followed.

treq's ``HTTPClient`` is a client for applications, and it does things a proxy must not:

* it re-encodes the URL through hyperlink (``EncodedURL.to_uri``), whichever form it is
  given (bytes, text, ``EncodedURL``): an empty query's ``?`` is dropped, ``[]{}|^``` in a
  query are percent-encoded, and an IPv6 literal host is refused (hyperlink 21 passes it
  to IDNA);
* it upper-cases the method;
* it always wraps ``ContentDecoderAgent``: ``Accept-Encoding: gzip`` is added to the
  request, a gzip answer is decoded (its length lost), and every other answer gets an empty
  ``Content-Encoding`` header;
* it keeps cookies (``CookieAgent``): a ``Set-Cookie`` from one peer answer would go out
  with later requests of other clients.

None of its options turns these off, so each request goes through treq over
:class:`_Verbatim`, a one-request ``IAgent`` layer that puts on the wire exactly the
caller's method, URI, headers and body producer (treq's copies of them are not used), and
shows treq a stand-in response without headers, so there is nothing to decode and no
cookie to keep; the caller gets the pinned agent's own response back. The Deferred treq
returns is the agent's own (every layer only adds callbacks), so cancelling it cancels the
request on the pool. ``tests/unit/test_peer_client.py`` holds these promises.
"""
from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from typing import Any

from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar  # type: ignore[attr-defined]
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

#: What treq is told the URL is: only a label, since the request line carries the caller's
#: URI (see :class:`_Verbatim`). It has no host on purpose: hyperlink runs every host through
#: IDNA on each request, half of treq's cost per request.
TREQ_URL = EncodedURL.from_text("https:///")


class _HeaderlessStandIn:
    """What treq's layers see of a response: no headers (nothing to decode, no cookie)."""

    def __init__(self) -> None:
        self.headers = Headers()


@implementer(IAgent)
class _Verbatim:
    """One request, sent on ``agent`` exactly as the caller built it, whatever treq passes."""

    def __init__(self, agent: IAgent, method: bytes, uri: bytes, headers: Headers | None,
                 body: IBodyProducer | None) -> None:
        self._agent = agent
        self._request = (method, uri, headers, body)
        #: The pinned agent's response, once its head is in.
        self.response: IResponse | None = None

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> "Deferred[Any]":  # noqa: N803
        return self._agent.request(*self._request).addCallback(self._arrived)

    def _arrived(self, response: IResponse) -> _HeaderlessStandIn:
        self.response = response
        return _HeaderlessStandIn()

    def unwrap(self, _: Any) -> IResponse:
        assert self.response is not None
        return self.response


@implementer(IAgent)
class PeerClient:
    """The one client between agents (an ``IAgent`` itself): treq over ``agent``, the
    forwarder's pinned agent on the persistent pool."""

    def __init__(self, agent: IAgent, reactor: Any) -> None:
        self.agent = agent
        self._reactor = reactor
        # Belt and braces: the stand-in response never shows a cookie, and this jar
        # refuses any that would come its way.
        self._no_cookies = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> "Deferred[IResponse]":  # noqa: N803
        """``method uri`` with ``headers`` and ``bodyProducer``, byte for byte; fires with the
        response once its head is in (the body streams). Raises what the agent raises while
        building the request (``ValueError`` for a URI or method that cannot go on the wire)."""
        verbatim = _Verbatim(self.agent, method, uri, headers, bodyProducer)
        client = HTTPClient(verbatim, cookiejar=self._no_cookies)
        pending: Deferred[Any] = client.request(method.decode("latin-1"), TREQ_URL, data=bodyProducer,
                                                unbuffered=True, allow_redirects=False, reactor=self._reactor)
        return pending.addCallback(verbatim.unwrap)
