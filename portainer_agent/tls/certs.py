"""The agent's TLS identity: a self-signed certificate made at start, or the user's.

Portainer connects with verification off, so any self-signed certificate works; we
use ECDSA P-256 (fast handshakes) and put every name a client might use in the SAN
(advertise/Swarm address, node name, localhost, 127.0.0.1). Peers pin the SPKI
fingerprint (see :func:`spki_fingerprint`) instead of skipping verification.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from pathlib import Path
from typing import Iterable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"


@attrs.frozen
class TLSIdentity:
    """PEM certificate and key of the agent API, and the certificate's SPKI pin."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        return spki_fingerprint(self.cert_pem)


def spki_fingerprint(cert_pem: bytes) -> str:
    """Hex SHA-256 of the certificate's SubjectPublicKeyInfo (RFC 7469 style pin)."""
    return certificate_spki_fingerprint(x509.load_pem_x509_certificate(cert_pem))


def certificate_spki_fingerprint(cert: x509.Certificate) -> str:
    """:func:`spki_fingerprint` of a parsed certificate (a presented peer's, say; pyOpenSSL's
    ``X509`` gives one with ``to_cryptography()``). The one place the pin is computed: the
    agent's own certificate, membership peers and peer agents all compare it."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in names:
        if not name or name in seen or name in ("0.0.0.0", "::"):
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def generate_self_signed(names: Iterable[str], days: int = 365) -> TLSIdentity:
    """A fresh P-256 key and a self-signed server certificate for ``names``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portainer-agent")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(["localhost", "127.0.0.1", *names])), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return TLSIdentity(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the start (never world-readable, even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _covers(cert_pem: bytes, names: Iterable[str]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=7):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    present = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    return all(name in present for name in names if name and name not in ("0.0.0.0", "::"))


def load_or_generate(
    data_dir: Path,
    names: Iterable[str],
    cert_file: Path | None = None,
    key_file: Path | None = None,
    keep: bool = False,
) -> TLSIdentity:
    """The API's TLS identity.

    With ``cert_file``/``key_file`` the user's PEMs are used. Otherwise a certificate
    is generated and written to ``data_dir`` (key 0600); it is reused on the next
    start only when ``keep`` is set and it still covers ``names``, so by default every
    start gets a fresh key, like the original agent.
    """
    if cert_file is not None and key_file is not None:
        return TLSIdentity(cert_pem=cert_file.read_bytes(), key_pem=key_file.read_bytes())
    names = list(names)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = data_dir / CERT_FILE, data_dir / KEY_FILE
    if keep and cert_path.exists() and key_path.exists():
        try:
            existing = TLSIdentity(cert_pem=cert_path.read_bytes(), key_pem=key_path.read_bytes())
            if _covers(existing.cert_pem, names):
                return existing
        except (ValueError, OSError):
            pass
    identity = generate_self_signed(names)
    _write_private(key_path, identity.key_pem)
    _write_private(cert_path, identity.cert_pem)
    return identity
