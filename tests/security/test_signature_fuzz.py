"""Hypothesis: no header value makes the verifier or the notary raise anything but a
SignatureError, and nothing but a verified signature ever associates a key."""
from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.security.notary import Notary
from portainer_agent.security.signature import (
    P256_SPKI_PREFIX,
    SignatureError,
    SignatureInvalid,
    decode_signature,
    parse_public_key,
)
from portainer_agent.testing.signing import PortainerSigner

SIGNER = PortainerSigner.generate()
GOOD = SIGNER.headers()
GOOD_KEY = GOOD["X-PortainerAgent-PublicKey"]
GOOD_SIGNATURE = GOOD["X-PortainerAgent-Signature"]

hex_text = st.text(alphabet="0123456789abcdefABCDEF", max_size=400)
b64_text = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=200)


@st.composite
def near_keys(draw: st.DrawFn) -> str:
    """P-256-shaped SPKIs with random (mostly off-curve) points, or mutated good keys."""
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return (P256_SPKI_PREFIX + draw(st.binary(min_size=64, max_size=64))).hex()
    raw = bytearray(bytes.fromhex(GOOD_KEY))
    index = draw(st.integers(0, len(raw) - 1))
    raw[index] ^= draw(st.integers(1, 255))
    return raw.hex() if choice == 1 else raw.hex()[: draw(st.integers(0, len(raw) * 2))]


@st.composite
def near_signatures(draw: st.DrawFn) -> str:
    """64 random bytes (r and s possibly 0 or >= n), or a mutated good signature."""
    if draw(st.booleans()):
        raw = draw(st.sampled_from([b"\x00" * 64, b"\xff" * 64, b"\x00" * 32 + b"\xff" * 32]) | st.binary(min_size=64, max_size=64))
        return base64.b64encode(raw).decode().rstrip("=")
    text = list(GOOD_SIGNATURE)
    index = draw(st.integers(0, len(text) - 1))
    text[index] = draw(st.sampled_from("ABCDabcd0123+/=-_ \x00é"))
    return "".join(text)


keys = st.one_of(st.text(max_size=300), st.binary(max_size=300), hex_text, near_keys(), st.just(GOOD_KEY), st.none())
signatures = st.one_of(st.text(max_size=200), st.binary(max_size=200), b64_text, near_signatures(), st.just(GOOD_SIGNATURE), st.none())

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class VerifierFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(keys)
    def test_parse_public_key_raises_only_signature_invalid(self, value: str | bytes | None) -> None:
        if value is None:
            return
        try:
            key = parse_public_key(value)
        except SignatureInvalid:
            return
        self.assertEqual(len(key.spki), 91)

    @FUZZ
    @given(signatures)
    def test_decode_signature_raises_only_signature_invalid(self, value: str | bytes | None) -> None:
        if value is None:
            return
        try:
            der = decode_signature(value)
        except SignatureInvalid:
            return
        # Accepted: the DER signature holds exactly the r || s the 64 bytes carried.
        text = value.encode("latin-1") if isinstance(value, str) else value
        r, s = decode_dss_signature(der)
        self.assertEqual(r.to_bytes(32, "big") + s.to_bytes(32, "big"), base64.b64decode(text + b"=="))


class NotaryFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(keys, signatures, st.booleans())
    def test_notary_raises_only_signature_errors_and_never_associates_garbage(
        self, public_key: str | bytes | None, signature: str | bytes | None, secret_mode: bool
    ) -> None:
        notary = Notary(secret="my-agent-secret" if secret_mode else None)
        try:
            notary.verify(public_key, signature)
        except SignatureError:
            self.assertEqual(notary.is_associated, secret_mode)
            return
        # Only the genuine pair can pass, and only in default mode.
        self.assertFalse(secret_mode)
        self.assertGenuine(public_key, signature)
        self.assertTrue(notary.is_associated)

    @FUZZ
    @given(keys, signatures)
    def test_associated_notary_accepts_nothing_else(self, public_key: str | bytes | None, signature: str | bytes | None) -> None:
        notary = Notary()
        notary.verify(GOOD_KEY, GOOD_SIGNATURE)
        try:
            notary.verify(public_key, signature)
        except SignatureError:
            return
        self.assertGenuine(public_key, signature)

    def assertGenuine(self, public_key: str | bytes | None, signature: str | bytes | None) -> None:
        """Same key bytes and same (r, s) as the genuine pair. The text may differ: hex case,
        and the 4 unused bits of the last base64 character (Go's decoder ignores them too)."""
        assert public_key is not None and signature is not None
        self.assertEqual(parse_public_key(public_key).spki, bytes.fromhex(GOOD_KEY))
        self.assertEqual(decode_signature(signature), decode_signature(GOOD_SIGNATURE))
