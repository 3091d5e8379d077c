"""The association policy: verify before associating, one key in default mode, many with a secret."""
from __future__ import annotations

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.security import notary as notary_module
from portainer_agent.security.notary import Notary
from portainer_agent.security.signature import SignatureInvalid, SignatureMissing
from portainer_agent.testing.signing import PortainerSigner


class CapturingLogger:
    """A ``twisted.logger`` observer collecting events, for asserting on log output."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def logger(self) -> Logger:
        return Logger(observer=self)


class DefaultModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.portainer = PortainerSigner.generate()
        self.intruder = PortainerSigner.generate()
        self.log = CapturingLogger()
        self.notary = Notary(log=self.log.logger())

    def verify(self, headers: dict[str, str], client: str = "10.0.0.1:5555") -> None:
        self.notary.verify(headers.get("X-PortainerAgent-PublicKey"), headers.get("X-PortainerAgent-Signature"), client)

    def test_not_associated_before_any_request(self) -> None:
        self.assertFalse(self.notary.is_associated)
        self.assertFalse(self.notary.secret_mode)

    def test_first_verified_key_is_associated(self) -> None:
        self.verify(self.portainer.headers())
        self.assertTrue(self.notary.is_associated)

    def test_second_valid_key_is_refused_after_association(self) -> None:
        self.verify(self.portainer.headers())
        error = self.assertRaises(SignatureInvalid, self.verify, self.intruder.headers())
        self.assertEqual(error.details, "Unauthorized")
        # and the associated key keeps working with fresh signatures
        self.verify(self.portainer.headers())

    def test_bad_signature_never_associates(self) -> None:
        """The reference associates the first parseable key before checking (§14.3)."""
        headers = self.intruder.headers(message="something else")
        self.assertRaises(SignatureInvalid, self.verify, headers)
        self.assertFalse(self.notary.is_associated)
        self.verify(self.portainer.headers())
        self.assertEqual(self.notary.associated_key.spki.hex(), self.portainer.public_key_hex)

    def test_associated_key_with_someone_elses_signature_is_refused(self) -> None:
        self.verify(self.portainer.headers())
        forged = {
            "X-PortainerAgent-PublicKey": self.portainer.public_key_hex,
            "X-PortainerAgent-Signature": self.intruder.sign(),
        }
        self.assertRaises(SignatureInvalid, self.verify, forged)

    def test_uppercase_hex_names_the_same_key(self) -> None:
        self.verify(self.portainer.headers())
        headers = self.portainer.headers()
        headers["X-PortainerAgent-PublicKey"] = headers["X-PortainerAgent-PublicKey"].upper()
        self.verify(headers)

    def test_secret_signature_refused_in_default_mode(self) -> None:
        self.assertRaises(SignatureInvalid, self.verify, self.portainer.headers(message="my-agent-secret"))

    def test_missing_headers(self) -> None:
        headers = self.portainer.headers()
        for public_key, signature in [(None, None), (headers["X-PortainerAgent-PublicKey"], None),
                                      (None, headers["X-PortainerAgent-Signature"]), ("", ""),
                                      (headers["X-PortainerAgent-PublicKey"], b"")]:
            self.assertRaises(SignatureMissing, self.notary.verify, public_key, signature)
        self.assertFalse(self.notary.is_associated)

    def test_association_logged_once_with_fingerprint_and_client_never_header_values(self) -> None:
        headers = self.portainer.headers()
        self.verify(headers, client="192.0.2.7:40000")
        self.verify(self.portainer.headers(), client="192.0.2.7:40001")
        self.verify(headers, client="192.0.2.7:40002")
        events = [e for e in self.log.events if "fingerprint" in e]
        self.assertEqual(len(events), 1)
        event = events[0]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["client"], "192.0.2.7:40000")
        self.assertRegex(event["fingerprint"], r"^SHA256:[0-9a-f]{16}$")
        for logged in self.log.events:
            text = repr(logged)
            self.assertNotIn(headers["X-PortainerAgent-PublicKey"], text)
            self.assertNotIn(headers["X-PortainerAgent-Signature"], text)


class CacheTests(SynchronousTestCase):
    """Repeated identical headers (docker CLI config.json) must not cost an ECDSA verify."""

    def setUp(self) -> None:
        self.portainer = PortainerSigner.generate()
        self.calls = 0
        real = notary_module.verify_signature

        def counting(*args: object) -> None:
            self.calls += 1
            real(*args)  # type: ignore[arg-type]

        self.patch(notary_module, "verify_signature", counting)

    def test_repeated_headers_are_verified_once(self) -> None:
        notary = Notary()
        headers = self.portainer.headers()
        for _ in range(5):
            notary.verify(headers["X-PortainerAgent-PublicKey"], headers["X-PortainerAgent-Signature"])
        self.assertEqual(self.calls, 1)

    def test_fresh_signatures_of_the_associated_key_cost_one_verify_each(self) -> None:
        notary = Notary()
        for _ in range(3):
            headers = self.portainer.headers()
            notary.verify(headers["X-PortainerAgent-PublicKey"], headers["X-PortainerAgent-Signature"])
        self.assertEqual(self.calls, 3)

    def test_failed_pairs_are_not_remembered(self) -> None:
        notary = Notary()
        headers = self.portainer.headers(message="wrong")
        for _ in range(2):
            self.assertRaises(SignatureInvalid, notary.verify,
                              headers["X-PortainerAgent-PublicKey"], headers["X-PortainerAgent-Signature"])
        self.assertEqual(self.calls, 2)

    def test_cache_is_bounded(self) -> None:
        notary = Notary(secret="s")
        signers = [PortainerSigner.generate() for _ in range(3)]
        for _ in range(30):
            for signer in signers:
                headers = signer.headers("s")
                notary.verify(headers["X-PortainerAgent-PublicKey"], headers["X-PortainerAgent-Signature"])
        self.assertLessEqual(len(notary._verified), notary_module._VERIFIED_CACHE_SIZE)


class SecretModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.notary = Notary(secret="my-agent-secret")

    def verify(self, headers: dict[str, str]) -> None:
        self.notary.verify(headers["X-PortainerAgent-PublicKey"], headers["X-PortainerAgent-Signature"])

    def test_is_associated_from_the_start(self) -> None:
        self.assertTrue(self.notary.secret_mode)
        self.assertTrue(self.notary.is_associated)

    def test_two_different_keys_both_accepted(self) -> None:
        first, second = PortainerSigner.generate(), PortainerSigner.generate()
        for _ in range(2):
            self.verify(first.headers("my-agent-secret"))
            self.verify(second.headers("my-agent-secret"))
        self.assertIsNone(self.notary.associated_key)

    def test_portainer_app_signature_refused(self) -> None:
        self.assertRaises(SignatureInvalid, self.verify, PortainerSigner.generate().headers())

    def test_wrong_secret_refused(self) -> None:
        self.assertRaises(SignatureInvalid, self.verify, PortainerSigner.generate().headers("other-secret"))

    def test_other_curves_refused_even_with_the_secret(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        for curve in (ec.SECP384R1(), ec.SECP521R1(), ec.SECP256K1()):
            signer = PortainerSigner.generate(curve)
            with self.subTest(curve.name):
                self.assertRaises(SignatureInvalid, self.verify, signer.headers("my-agent-secret"))

    def test_empty_secret_means_default_mode(self) -> None:
        notary = Notary(secret="")
        self.assertFalse(notary.secret_mode)
        self.assertFalse(notary.is_associated)
