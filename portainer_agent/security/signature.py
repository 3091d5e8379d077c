"""Pure verification of Portainer request signatures (reference-agent.md §5).

Portainer sends two headers on every request:

* ``X-PortainerAgent-PublicKey``: lowercase hex of the DER SubjectPublicKeyInfo of its
  P-256 key (always 182 hex characters, see :data:`P256_SPKI_PREFIX`);
* ``X-PortainerAgent-Signature``: ``base64.RawStdEncoding`` (no ``=`` padding) of
  ``r || s``, 32 bytes each, an ECDSA signature over ``MD5(message)`` where the message is
  ``Portainer-App`` or, in secret mode, the shared secret.

This module only turns header values into values (:class:`PublicKey`, a DER signature)
and checks them. It knows nothing about HTTP, association or the reactor; the policy
lives in :mod:`portainer_agent.security.notary`. Every function here raises only
:class:`SignatureInvalid` (or returns): header values are attacker-controlled, so no
input may escape as another exception, which the HTTP layer would turn into a 500 or a
dropped connection (the reference agent panics on RSA keys, §14.4).
"""
from __future__ import annotations

import binascii
import hashlib
import re

import attrs
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

__all__ = [
    "P256_SPKI_PREFIX",
    "PORTAINER_MESSAGE",
    "PublicKey",
    "SignatureError",
    "SignatureInvalid",
    "SignatureMissing",
    "decode_signature",
    "message_digest",
    "parse_public_key",
    "verify_signature",
]

#: The message Portainer signs when no secret is configured.
PORTAINER_MESSAGE = "Portainer-App"

#: DER SubjectPublicKeyInfo header of every uncompressed P-256 public key
#: (SEQUENCE, id-ecPublicKey, prime256v1, BIT STRING, point marker ``04``); X and Y follow.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004")
_P256_SPKI_LENGTH = len(P256_SPKI_PREFIX) + 64  # 91 bytes
_P256_COORDINATE_SIZE = 32
_SIGNATURE_LENGTH = 2 * _P256_COORDINATE_SIZE  # r || s
#: 64 bytes in unpadded base64 are always 86 characters.
_SIGNATURE_TEXT_LENGTH = 86
_RAW_STD_BASE64 = re.compile(rb"[A-Za-z0-9+/]*")
_ECDSA_MD5 = ec.ECDSA(utils.Prehashed(hashes.MD5()))


class SignatureError(Exception):
    """A request is not authenticated. Subclasses say whether it tried."""

    #: Short reason safe to send back to the client (never contains header values).
    details: str = "Unauthorized"


class SignatureMissing(SignatureError):
    """One or both signature headers are absent or empty."""

    def __init__(self, details: str = "Unauthorized") -> None:
        super().__init__(details)
        self.details = details


class SignatureInvalid(SignatureError):
    """The headers are present but do not authenticate the request.

    ``details`` is a fixed, human-readable reason (``"Unauthorized"`` when the key or
    signature is simply wrong); it never echoes the header values.
    """

    def __init__(self, details: str = "Unauthorized") -> None:
        super().__init__(details)
        self.details = details


@attrs.frozen
class PublicKey:
    """A parsed, validated P-256 public key together with the bytes it came from.

    ``spki`` (the raw DER) is what association compares: two headers name the same key
    iff their DER bytes are equal, whatever the hex letter case.
    """

    spki: bytes
    key: ec.EllipticCurvePublicKey = attrs.field(eq=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """Short, log-friendly identity of the key: ``SHA256:`` + 16 hex digits of the DER."""
        return "SHA256:" + hashlib.sha256(self.spki).hexdigest()[:16]


def _as_bytes(value: str | bytes) -> bytes:
    """Header values arrive as bytes from Twisted; tests may pass ``str``.

    Non-ASCII text cannot be valid hex or base64, so it maps to a value that fails the
    format checks instead of raising ``UnicodeEncodeError``.
    """
    if isinstance(value, bytes):
        return value
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        return b"\x00"


def message_digest(message: str | bytes) -> bytes:
    """``MD5(message)``: the 16 bytes Portainer signs (weak, but that is the protocol)."""
    if isinstance(message, str):
        message = message.encode("utf-8")
    return hashlib.md5(message).digest()


def parse_public_key(header: str | bytes) -> PublicKey:
    """Parse ``X-PortainerAgent-PublicKey`` into a P-256 :class:`PublicKey`.

    Only uncompressed P-256 keys are accepted: Portainer never uses anything else, and the
    reference agent's acceptance of other curves and its crash on RSA/Ed25519 keys are
    bugs (§14.4). Checking the fixed SPKI prefix first rejects every other key type
    without invoking the DER parser; ``load_der_public_key`` then checks that the point
    is on the curve.
    """
    text = _as_bytes(header)
    if len(text) != 2 * _P256_SPKI_LENGTH:
        # Also bounds the work done on oversized headers.
        if text and not _is_hex(text):
            raise SignatureInvalid("Invalid public key: not hexadecimal")
        raise SignatureInvalid("Invalid public key: not a P-256 ECDSA key")
    try:
        der = binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise SignatureInvalid("Invalid public key: not hexadecimal") from None
    if not der.startswith(P256_SPKI_PREFIX):
        raise SignatureInvalid("Invalid public key: not a P-256 ECDSA key")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureInvalid("Invalid public key: not a valid P-256 point") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SignatureInvalid("Invalid public key: not a P-256 ECDSA key")  # pragma: no cover
    return PublicKey(spki=der, key=key)


def spki_from_header(header: str | bytes) -> bytes | None:
    """Decode the hex header to DER bytes without parsing the key, or ``None``.

    Used on the hot path once a key is associated: comparing bytes is all that is needed
    to know whether the caller names the associated key.
    """
    text = _as_bytes(header)
    if len(text) != 2 * _P256_SPKI_LENGTH:
        return None
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        return None


def _is_hex(text: bytes) -> bool:
    try:
        binascii.unhexlify(text if len(text) % 2 == 0 else text + b"0")
    except (binascii.Error, ValueError):
        return False
    return True


def decode_signature(header: str | bytes) -> bytes:
    """Decode ``X-PortainerAgent-Signature`` (raw base64 ``r || s``) to a DER ECDSA signature.

    Mirrors Go's ``base64.RawStdEncoding``: standard alphabet, ``=`` padding refused.
    The decoded value must be exactly 64 bytes (P-256), as in the reference agent.
    """
    text = _as_bytes(header)
    if b"=" in text:
        raise SignatureInvalid("Invalid signature: base64 padding is not allowed")
    if not _RAW_STD_BASE64.fullmatch(text):
        raise SignatureInvalid("Invalid signature: not base64")
    if len(text) != _SIGNATURE_TEXT_LENGTH:
        raise SignatureInvalid("Invalid signature: wrong length")
    try:
        raw = binascii.a2b_base64(text + b"==", strict_mode=True)
    except (binascii.Error, ValueError):  # pragma: no cover - excluded by the checks above
        raise SignatureInvalid("Invalid signature: not base64") from None
    if len(raw) != _SIGNATURE_LENGTH:  # pragma: no cover - 86 characters are 64 bytes
        raise SignatureInvalid("Invalid signature: wrong length")
    r = int.from_bytes(raw[:_P256_COORDINATE_SIZE], "big")
    s = int.from_bytes(raw[_P256_COORDINATE_SIZE:], "big")
    return utils.encode_dss_signature(r, s)


def verify_signature(key: PublicKey, signature_der: bytes, digest: bytes) -> None:
    """Check an ECDSA signature (DER, from :func:`decode_signature`) over ``digest``.

    ``digest`` is the 16-byte ``MD5(message)``; Go's ``ecdsa.Verify`` uses it directly as
    the integer ``e`` and so does ``Prehashed(MD5)``.
    """
    try:
        key.key.verify(signature_der, digest, _ECDSA_MD5)
    except (InvalidSignature, ValueError):
        raise SignatureInvalid("Unauthorized") from None
