"""The HTTP seam of the signature check: request in, pass or :class:`AgentError` out.

The root resource calls :meth:`SignatureGuard.check` for every request except the public
``GET /ping`` and ``GET /v2/ping``, *before* any routing or forwarding, so ``/host/info``
and forwarded Docker calls are never touched unauthenticated (the reference agent
redirects ``/host/info`` before checking, §14.5).

Refusals follow the reference wire format, which Portainer relies on (it greps
``Invalid request signature`` to report "already paired with another instance"):

* missing header(s): ``403 {"message": "Missing request signature headers", "details": "Unauthorized"}``
* anything else: ``403 {"message": "Invalid request signature", "details": <reason>}``
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.logger import Logger
from twisted.web.http_headers import Headers

from portainer_agent.errors import AgentError
from portainer_agent.security.notary import Notary
from portainer_agent.security.signature import SignatureInvalid, SignatureMissing

__all__ = [
    "INVALID_SIGNATURE_MESSAGE",
    "MISSING_SIGNATURE_MESSAGE",
    "PUBLIC_KEY_HEADER",
    "SIGNATURE_HEADER",
    "SignatureGuard",
]

#: Request headers, as bytes: Twisted matches bytes names case-insensitively and returns
#: raw bytes, whereas ``str`` names make it decode values as UTF-8, which can raise.
PUBLIC_KEY_HEADER = b"X-PortainerAgent-PublicKey"
SIGNATURE_HEADER = b"X-PortainerAgent-Signature"

MISSING_SIGNATURE_MESSAGE = "Missing request signature headers"
INVALID_SIGNATURE_MESSAGE = "Invalid request signature"


class RequestLike(Protocol):
    """What the guard reads from a ``twisted.web`` request (``Request``, ``DummyRequest``)."""

    requestHeaders: Headers

    def getClientAddress(self) -> Any: ...


class SignatureGuard:
    """Authenticate HTTP requests with a :class:`Notary`.

    Build it with :meth:`from_config` in the service wiring; tests can inject a notary.
    """

    log = Logger()

    def __init__(self, notary: Notary, on_refused: Callable[[str, str], None] | None = None) -> None:
        self.notary = notary
        self._closed_because: str | None = None
        #: Told ``(message, details)`` of every refusal (metrics); never header values.
        self.on_refused = on_refused

    @classmethod
    def from_config(cls, config: object, on_refused: Callable[[str, str], None] | None = None) -> "SignatureGuard":
        """A guard for ``Config.secret`` (``None``/empty: default mode with association)."""
        return cls(Notary(secret=getattr(config, "secret", None)), on_refused)

    @property
    def is_associated(self) -> bool:
        """Delegates to the notary; lets the guard stand in for it in the security shutdown."""
        return self.notary.is_associated

    def close(self, reason: str) -> None:
        """Refuse every request from now on (security shutdown).

        Closing the listening port stops new connections, but keep-alive connections
        opened before would still be served; without this, a request arriving on one of
        them could still pair the agent after the shutdown.
        """
        self._closed_because = reason

    def check(self, request: RequestLike) -> None:
        """Return if the request is authenticated, else raise a 403 :class:`AgentError`."""
        try:
            self._check(request)
        except AgentError as error:
            if self.on_refused is not None:
                self.on_refused(error.message, str(error.details or ""))
            raise

    def _check(self, request: RequestLike) -> None:
        if self._closed_because is not None:
            raise AgentError(403, INVALID_SIGNATURE_MESSAGE, self._closed_because)
        public_key = _first_header(request, PUBLIC_KEY_HEADER)
        signature = _first_header(request, SIGNATURE_HEADER)
        client = _client_address(request)
        try:
            self.notary.verify(public_key, signature, client=client)
        except SignatureMissing as error:
            self._refused(request, client, MISSING_SIGNATURE_MESSAGE)
            raise AgentError(403, MISSING_SIGNATURE_MESSAGE, error.details) from None
        except SignatureInvalid as error:
            self._refused(request, client, error.details)
            raise AgentError(403, INVALID_SIGNATURE_MESSAGE, error.details) from None

    def authenticates(self, request: RequestLike) -> bool:
        """Non-raising, quiet form of :meth:`check`, for use before the body is read
        (see :mod:`portainer_agent.security.body`). The refusal itself is answered and
        logged later by :meth:`check`; a success is remembered by the notary, so the
        second check costs a dictionary lookup."""
        if self._closed_because is not None:
            return False
        try:
            self.notary.verify(_first_header(request, PUBLIC_KEY_HEADER), _first_header(request, SIGNATURE_HEADER),
                               client=_client_address(request))
        except (SignatureMissing, SignatureInvalid):
            return False
        return True

    def _refused(self, request: RequestLike, client: str, reason: str) -> None:
        # Never log header values: a valid pair is a credential that never expires.
        self.log.debug(
            "Refused {method} {path} from {client}: {reason}",
            method=_safe_text(getattr(request, "method", b"")),
            path=_safe_text(getattr(request, "path", b"")),
            client=client,
            reason=reason,
        )


def _first_header(request: RequestLike, name: bytes) -> bytes | None:
    """The first value of a header, as Go's ``Header.Get`` returns (Twisted's ``getHeader``
    returns the last)."""
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


def _client_address(request: RequestLike) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"{host}:{port}" if port is not None else str(host)


def _safe_text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value
