"""Certificates for testing mutual TLS against the agent (``--tls-ca``).

Shipped with the package (like ``treq.testing``) so tests and users can try mTLS without
an external PKI: :func:`make_ca` makes a client CA, :meth:`CertificateAuthority.issue`
a client certificate it signs, :func:`self_signed_client` one nobody signed.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "IssuedCertificate", "make_ca", "self_signed_client"]


@attrs.frozen
class IssuedCertificate:
    """A PEM certificate and its PEM (PKCS#8) private key."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``name.crt`` and ``name.key`` (0600) into ``directory``; return their paths
        (the order ``ssl.SSLContext.load_cert_chain`` and docker-py's ``client_cert`` take)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(self.key_pem)
        return cert, key


@attrs.frozen
class CertificateAuthority:
    """A CA that signs client certificates; ``certificate.cert_pem`` goes to ``--tls-ca``."""

    certificate: IssuedCertificate
    key: ec.EllipticCurvePrivateKey = attrs.field(repr=False)
    name: x509.Name

    def issue(self, common_name: str, days: int = 1) -> IssuedCertificate:
        """A client certificate (``clientAuth``) for ``common_name`` signed by this CA."""
        return _client_certificate(common_name, self.key, self.name, days)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days))


def make_ca(common_name: str = "portainer-agent test client CA", days: int = 1) -> CertificateAuthority:
    """A fresh P-256 CA (``cA=TRUE``, ``keyCertSign``) valid for ``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = _validity(builder, days).sign(key, hashes.SHA256())
    return CertificateAuthority(IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)),
                                key, name)


def self_signed_client(common_name: str = "nobody", days: int = 1) -> IssuedCertificate:
    """A client certificate signed by its own key: what an mTLS agent must refuse."""
    return _client_certificate(common_name, None, None, days)


def _client_certificate(common_name: str, issuer_key: ec.EllipticCurvePrivateKey | None,
                        issuer: x509.Name | None, days: int) -> IssuedCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    cert = _validity(builder, days).sign(issuer_key or key, hashes.SHA256())
    return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
