"""Every vector of signature-vectors.json (made by the reference Go signer), in both modes.

A vector's ``valid`` says whether the signature verifies cryptographically for its
``signed_message``; the agent additionally accepts only P-256 keys and only the message of
its mode (``Portainer-App``, or the secret in secret mode).
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.security.notary import Notary
from portainer_agent.security.signature import (
    PORTAINER_MESSAGE,
    SignatureInvalid,
    decode_signature,
    message_digest,
    parse_public_key,
    verify_signature,
)
from portainer_agent.testing.signing import PortainerSigner

VECTORS_FILE = Path(__file__).parent / "data" / "signature-vectors.json"
DATA: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
VECTORS: list[dict[str, Any]] = DATA["vectors"]
SECRET = "my-agent-secret"
P256_PREFIX = "3059301306072a8648ce3d020106082a8648ce3d03010703420004"


#: What a fresh agent answers for each vector: (default mode, secret mode with SECRET).
#: Derived from the vector's ``valid`` (relative to ``agent_secret`` when present), then
#: narrowed: only P-256 keys, only the message of the agent's mode.
EXPECTED: dict[str, tuple[bool, bool]] = {
    "default-mode valid": (True, False),
    "default-mode valid, second signature of the same key (fresh nonce)": (True, False),
    "default-mode, other key": (True, False),
    "secret-mode valid": (False, True),
    # A genuine signature over Portainer-App: fine for a default-mode agent, not for a secret one.
    "secret-mode, signed Portainer-App instead of the secret": (True, False),
    "padded base64": (False, False),
    "truncated signature": (False, False),
    "tampered signature": (False, False),
    "non-hex public key": (False, False),
    "RSA public key": (False, False),
    "P-384 key, own valid signature": (False, False),
}


def accepted_by_agent(vector: dict[str, Any], message: str) -> bool:
    """What a fresh agent in the mode signing ``message`` must answer for this vector."""
    default, secret = EXPECTED[vector["name"]]
    return secret if message == SECRET else default


class VectorFileTests(SynchronousTestCase):
    def test_vector_file_covers_the_cases_the_issue_names(self) -> None:
        names = {v["name"] for v in VECTORS}
        for needle in ("padded", "truncated", "tampered", "non-hex", "RSA", "P-384", "other key", "secret"):
            self.assertTrue(any(needle in name for name in names), needle)

    def test_expectations_cover_every_vector_and_agree_with_valid(self) -> None:
        self.assertEqual(set(EXPECTED), {v["name"] for v in VECTORS})
        for vector in VECTORS:
            default, secret = EXPECTED[vector["name"]]
            claimed = secret if "agent_secret" in vector else default
            p256 = vector["public_key_hex"].startswith(P256_PREFIX)
            self.assertEqual(claimed, vector["valid"] and p256, vector["name"])

    def test_md5_of_portainer_app_matches(self) -> None:
        self.assertEqual(message_digest(PORTAINER_MESSAGE).hex(), DATA["md5_of_Portainer-App"])

    def test_key1_private_key_matches_the_first_vector(self) -> None:
        signer = PortainerSigner.from_pem(DATA["key1_private_pem"])
        self.assertEqual(signer.public_key_hex, VECTORS[0]["public_key_hex"])

    def test_p384_vector_is_a_genuine_signature_the_agent_still_refuses(self) -> None:
        """The reference accepts any curve; Portainer only uses P-256, so we refuse P-384
        even though its signature is cryptographically valid (checked here, curve-agnostic)."""
        vector = next(v for v in VECTORS if "P-384" in v["name"])
        key = serialization.load_der_public_key(bytes.fromhex(vector["public_key_hex"]))
        assert isinstance(key, ec.EllipticCurvePublicKey)
        raw = base64.b64decode(vector["signature"] + "=" * (-len(vector["signature"]) % 4))
        half = len(raw) // 2
        der = utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
        key.verify(der, hashlib.md5(b"Portainer-App").digest(), ec.ECDSA(utils.Prehashed(hashes.MD5())))
        with self.assertRaises(SignatureInvalid):
            parse_public_key(vector["public_key_hex"])


class PureVerifierVectorTests(SynchronousTestCase):
    """The pure functions agree with the reference signer on every vector."""

    def check(self, vector: dict[str, Any], message: str) -> bool:
        try:
            key = parse_public_key(vector["public_key_hex"])
            verify_signature(key, decode_signature(vector["signature"]), message_digest(message))
        except SignatureInvalid:
            return False
        return True

    def test_every_vector_against_portainer_app(self) -> None:
        for vector in VECTORS:
            with self.subTest(vector["name"]):
                self.assertEqual(self.check(vector, PORTAINER_MESSAGE), accepted_by_agent(vector, PORTAINER_MESSAGE))

    def test_every_vector_against_the_secret(self) -> None:
        for vector in VECTORS:
            with self.subTest(vector["name"]):
                self.assertEqual(self.check(vector, SECRET), accepted_by_agent(vector, SECRET))


class NotaryVectorTests(SynchronousTestCase):
    """Each vector against a fresh notary in default mode and in secret mode."""

    def outcome(self, notary: Notary, vector: dict[str, Any]) -> bool:
        try:
            notary.verify(vector["public_key_hex"], vector["signature"], client="test")
        except SignatureInvalid:
            return False
        return True

    def test_default_mode_fresh_agent(self) -> None:
        for vector in VECTORS:
            with self.subTest(vector["name"]):
                notary = Notary()
                expected = accepted_by_agent(vector, PORTAINER_MESSAGE)
                self.assertEqual(self.outcome(notary, vector), expected)
                # Only a verified signature associates.
                self.assertEqual(notary.is_associated, expected)

    def test_secret_mode_fresh_agent(self) -> None:
        for vector in VECTORS:
            with self.subTest(vector["name"]):
                notary = Notary(secret=vector.get("agent_secret", SECRET))
                self.assertEqual(self.outcome(notary, vector), accepted_by_agent(vector, SECRET))
                self.assertTrue(notary.is_associated)
                self.assertIsNone(notary.associated_key)

    def test_default_mode_sequence_associates_key1_then_refuses_the_other_key(self) -> None:
        notary = Notary()
        outcomes = {v["name"]: self.outcome(notary, v) for v in VECTORS}
        self.assertTrue(outcomes["default-mode valid"])
        self.assertTrue(outcomes["default-mode valid, second signature of the same key (fresh nonce)"])
        self.assertFalse(outcomes["default-mode, other key"])
        self.assertEqual(
            notary.associated_key.spki if notary.associated_key else None,
            bytes.fromhex(VECTORS[0]["public_key_hex"]),
        )
        self.assertEqual([name for name, ok in outcomes.items() if ok], [VECTORS[0]["name"], VECTORS[1]["name"]])

    def test_invalid_vectors_first_never_associate(self) -> None:
        """Replaying every invalid vector before the valid ones leaves the agent unclaimed;
        the other valid key (vector 3) can then still pair (the reference would have been
        captured by the first parseable key)."""
        notary = Notary()
        for vector in VECTORS:
            if not accepted_by_agent(vector, PORTAINER_MESSAGE):
                self.assertFalse(self.outcome(notary, vector))
                self.assertFalse(notary.is_associated, vector["name"])
        other = next(v for v in VECTORS if v["name"] == "default-mode, other key")
        self.assertTrue(self.outcome(notary, other))
        self.assertFalse(self.outcome(notary, VECTORS[0]))
