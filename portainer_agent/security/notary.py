"""Which keys may talk to this agent: the association policy (reference-agent.md §5.4).

Two modes:

* **Default mode** (no secret): trust on first use, done right. The first key whose
  signature over ``MD5("Portainer-App")`` *verifies* is associated; from then on only that
  key is accepted, until the agent restarts (the association is kept in memory only, like
  the reference agent, so restarting the agent is how a user re-pairs it). The reference
  agent associates the first *parseable* key before checking its signature (§14.3), so a
  single garbage request could capture it; here a failed verification never associates.
* **Secret mode**: no association; any P-256 key whose signature over ``MD5(secret)``
  verifies is accepted, so several Portainer instances can share an agent.

The notary is pure (no reactor, no HTTP) apart from one structured log event when a key
gets associated. Verification is made cheap because it runs on every request: the
associated key is parsed once, and recently verified ``(public key, signature)`` header
pairs are remembered, so a client repeating the same headers (the docker CLI with its
``config.json``, Portainer's per-client Docker SDK) costs one dictionary lookup. A
remembered pair adds no weakness: the protocol has no freshness, a valid pair is valid
forever (§14.1).
"""
from __future__ import annotations

from collections import OrderedDict

from twisted.logger import Logger

from portainer_agent.security.signature import (
    PORTAINER_MESSAGE,
    PublicKey,
    SignatureInvalid,
    SignatureMissing,
    decode_signature,
    message_digest,
    parse_public_key,
    spki_from_header,
    verify_signature,
)

__all__ = ["Notary"]

#: How many verified header pairs to remember. Small: a handful of clients (Portainer's
#: Docker SDK client, one CLI config per stack deployment, peer agents) repeat headers.
_VERIFIED_CACHE_SIZE = 64


class Notary:
    """Decides whether a request's signature headers authenticate it.

    :param secret: the shared ``AGENT_SECRET``; ``None`` or empty selects default mode.
    :param log: a ``twisted.logger.Logger`` (injected for tests).
    """

    log = Logger()

    def __init__(self, secret: str | None = None, log: Logger | None = None) -> None:
        self._secret = secret or None
        self._digest = message_digest(self._secret if self._secret is not None else PORTAINER_MESSAGE)
        self._associated: PublicKey | None = None
        self._verified: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        if log is not None:
            self.log = log

    @property
    def secret_mode(self) -> bool:
        """True when a shared secret is configured (no association happens)."""
        return self._secret is not None

    @property
    def is_associated(self) -> bool:
        """True once a key is associated, and always in secret mode.

        The security shutdown (§5.5) closes the API only while this is false.
        """
        return self.secret_mode or self._associated is not None

    @property
    def associated_key(self) -> PublicKey | None:
        """The associated key in default mode, else ``None``."""
        return self._associated

    def verify(
        self,
        public_key: str | bytes | None,
        signature: str | bytes | None,
        client: str = "unknown",
    ) -> None:
        """Return if the headers authenticate the request, else raise.

        :param public_key: the ``X-PortainerAgent-PublicKey`` header value, if any.
        :param signature: the ``X-PortainerAgent-Signature`` header value, if any.
        :param client: the peer address, only for the association log line.
        :raises SignatureMissing: a header is absent or empty.
        :raises SignatureInvalid: anything else that does not authenticate; ``details``
            says why (``"Unauthorized"`` for a wrong key or signature).
        """
        if not public_key or not signature:
            raise SignatureMissing()
        public_key = _as_bytes(public_key)
        signature = _as_bytes(signature)
        pair = (public_key, signature)
        if pair in self._verified:
            self._verified.move_to_end(pair)
            return
        if self._secret is not None:
            key = parse_public_key(public_key)
        elif self._associated is not None:
            # Compare raw DER bytes: any other key, however valid, is refused, and the
            # associated key needs no parsing.
            if spki_from_header(public_key) != self._associated.spki:
                raise SignatureInvalid("Unauthorized")
            key = self._associated
        else:
            key = parse_public_key(public_key)
        verify_signature(key, decode_signature(signature), self._digest)
        if self._secret is None and self._associated is None:
            self._associate(key, client)
        self._remember(pair)

    def _associate(self, key: PublicKey, client: str) -> None:
        self._associated = key
        # Header values are credentials (replayable forever): log a fingerprint only.
        self.log.info(
            "Associated with Portainer key {fingerprint} (first verified request, from {client});"
            " other keys are refused until the agent restarts",
            fingerprint=key.fingerprint,
            client=client,
        )

    def _remember(self, pair: tuple[bytes, bytes]) -> None:
        self._verified[pair] = None
        if len(self._verified) > _VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)


def _as_bytes(value: str | bytes) -> bytes:
    """Normalise a header value for cache keys; non-ASCII text is kept distinct but unusable."""
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogatepass")
