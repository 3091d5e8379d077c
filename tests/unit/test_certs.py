"""The agent's TLS identity: SANs, key file mode, keep/regenerate, user PEMs."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.tls.certs import (
    CERT_FILE,
    KEY_FILE,
    TLSIdentity,
    generate_self_signed,
    load_or_generate,
    spki_fingerprint,
)

from .tempdirs import temp_dir


def certificate(identity: TLSIdentity) -> x509.Certificate:
    return x509.load_pem_x509_certificate(identity.cert_pem)


def sans(identity: TLSIdentity) -> tuple[set[str], set[str]]:
    san = certificate(identity).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def self_signed_with(key: ec.EllipticCurvePrivateKey, names: list[str], days: int) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    entries = [x509.DNSName(n) if not n[0].isdigit() else x509.IPAddress(ipaddress.ip_address(n)) for n in names]
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(entries), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class GenerateTests(SynchronousTestCase):
    def test_sans_cover_every_name_plus_loopback(self) -> None:
        identity = generate_self_signed(["10.0.0.5", "node-1", "fd00::5", "node-1", "0.0.0.0", "::", ""])
        dns, ips = sans(identity)
        self.assertEqual(dns, {"localhost", "node-1"})
        self.assertEqual(ips, {"127.0.0.1", "10.0.0.5", "fd00::5"})

    def test_server_certificate_shape(self) -> None:
        identity = generate_self_signed(["node-1"], days=30)
        cert = certificate(identity)
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        self.assertEqual(public_key.curve.name, "secp256r1")
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.SERVER_AUTH, list(usages))
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertLessEqual(cert.not_valid_before_utc, now)
        self.assertApproximates((cert.not_valid_after_utc - now).total_seconds(), 30 * 86400, 3600)

    def test_key_matches_certificate_and_loads_in_twisted(self) -> None:
        identity = generate_self_signed(["node-1"])
        key = serialization.load_pem_private_key(identity.key_pem, password=None)
        self.assertEqual(
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
            certificate(identity).public_key().public_bytes(serialization.Encoding.DER,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo),
        )
        ssl.PrivateCertificate.loadPEM(identity.cert_pem + identity.key_pem).options()

    def test_each_generation_is_a_fresh_key(self) -> None:
        self.assertNotEqual(generate_self_signed([]).fingerprint, generate_self_signed([]).fingerprint)


class FingerprintTests(SynchronousTestCase):
    def test_sha256_of_the_spki(self) -> None:
        identity = generate_self_signed([])
        spki = certificate(identity).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.assertEqual(identity.fingerprint, hashlib.sha256(spki).hexdigest())
        self.assertEqual(len(identity.fingerprint), 64)

    def test_pin_survives_renewal_with_the_same_key(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        self.assertEqual(spki_fingerprint(self_signed_with(key, ["a"], 10)),
                         spki_fingerprint(self_signed_with(key, ["b"], 300)))


class LoadOrGenerateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = temp_dir(self) / "state"

    def test_writes_key_and_certificate_private(self) -> None:
        identity = load_or_generate(self.data, ["10.0.0.5"])
        self.assertEqual((self.data / CERT_FILE).read_bytes(), identity.cert_pem)
        self.assertEqual((self.data / KEY_FILE).read_bytes(), identity.key_pem)
        self.assertEqual(mode(self.data / KEY_FILE), 0o600)
        self.assertEqual(mode(self.data / CERT_FILE), 0o600)
        self.assertEqual(mode(self.data), 0o700)
        self.assertEqual(sorted(p.name for p in self.data.iterdir()), [CERT_FILE, KEY_FILE])  # no .tmp left

    def test_key_is_private_whatever_the_umask(self) -> None:
        previous = os.umask(0)
        try:
            load_or_generate(self.data, [])
        finally:
            os.umask(previous)
        self.assertEqual(mode(self.data / KEY_FILE), 0o600)

    def test_a_world_readable_key_file_is_replaced_private(self) -> None:
        self.data.mkdir(parents=True)
        (self.data / KEY_FILE).write_bytes(b"old")
        os.chmod(self.data / KEY_FILE, 0o644)
        load_or_generate(self.data, [])
        self.assertEqual(mode(self.data / KEY_FILE), 0o600)

    def test_without_keep_every_start_gets_a_new_key(self) -> None:
        first = load_or_generate(self.data, ["node-1"])
        second = load_or_generate(self.data, ["node-1"])
        self.assertNotEqual(first.fingerprint, second.fingerprint)
        self.assertEqual((self.data / KEY_FILE).read_bytes(), second.key_pem)

    def test_keep_reuses_a_covering_certificate(self) -> None:
        first = load_or_generate(self.data, ["node-1", "10.0.0.5"], keep=True)
        second = load_or_generate(self.data, ["10.0.0.5"], keep=True)
        self.assertEqual(second, first)

    def test_keep_regenerates_when_a_name_is_missing(self) -> None:
        first = load_or_generate(self.data, ["node-1"], keep=True)
        second = load_or_generate(self.data, ["node-1", "10.0.0.9"], keep=True)
        self.assertNotEqual(first.fingerprint, second.fingerprint)
        self.assertIn("10.0.0.9", sans(second)[1])
        self.assertEqual((self.data / CERT_FILE).read_bytes(), second.cert_pem)

    def test_keep_regenerates_a_certificate_about_to_expire(self) -> None:
        self.data.mkdir(parents=True)
        key = ec.generate_private_key(ec.SECP256R1())
        old_cert = self_signed_with(key, ["localhost", "127.0.0.1", "node-1"], days=3)
        (self.data / CERT_FILE).write_bytes(old_cert)
        (self.data / KEY_FILE).write_bytes(key_pem(key))
        identity = load_or_generate(self.data, ["node-1"], keep=True)
        self.assertNotEqual(identity.cert_pem, old_cert)
        self.assertGreater(certificate(identity).not_valid_after_utc,
                           datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=300))

    def test_keep_regenerates_unreadable_files(self) -> None:
        self.data.mkdir(parents=True)
        (self.data / CERT_FILE).write_bytes(b"not a certificate")
        (self.data / KEY_FILE).write_bytes(b"not a key")
        identity = load_or_generate(self.data, ["node-1"], keep=True)
        certificate(identity)
        self.assertEqual((self.data / CERT_FILE).read_bytes(), identity.cert_pem)

    def test_keep_regenerates_when_the_key_is_missing(self) -> None:
        first = load_or_generate(self.data, [], keep=True)
        (self.data / KEY_FILE).unlink()
        second = load_or_generate(self.data, [], keep=True)
        self.assertNotEqual(first.fingerprint, second.fingerprint)
        self.assertTrue((self.data / KEY_FILE).exists())

    def test_user_certificate_and_key_are_used_as_given(self) -> None:
        own = temp_dir(self)
        mine = generate_self_signed(["my.host"])
        (own / "c.pem").write_bytes(mine.cert_pem)
        (own / "k.pem").write_bytes(mine.key_pem)
        identity = load_or_generate(self.data, ["node-1"], cert_file=own / "c.pem", key_file=own / "k.pem", keep=True)
        self.assertEqual(identity, mine)
        self.assertFalse(self.data.exists())  # nothing generated or written
