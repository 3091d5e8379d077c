"""Client certificates for mutual-TLS tests, from ``trustme`` (a test dependency).

The agent's own server identity comes from :func:`portainer_agent.tls.certs.generate_self_signed`
(the code under test); what a test needs around it is a client PKI: the CA given to
``--tls-ca``, a client it signed, one another CA signed, and one signed by its own key.
``trustme`` builds those (its leaves carry ``clientAuth``), so the tests hold no
certificate builder of their own.
"""
from __future__ import annotations

from pathlib import Path

import attrs

__all__ = ["ClientPKI", "client_pki"]

CertAndKey = tuple[Path, Path]


@attrs.frozen
class ClientPKI:
    """Files in one directory; each pair is ``(cert, key)``, as ``load_cert_chain`` takes it."""

    #: The CA to trust (``--tls-ca``).
    ca_pem: Path
    #: A client certificate that CA signed.
    trusted: CertAndKey
    #: A client certificate another CA signed.
    foreign: CertAndKey
    #: A certificate signed by its own key (a self-signed CA nobody was told about).
    self_signed: CertAndKey


def _write(directory: Path, name: str, cert_pem: bytes, key_pem: bytes) -> CertAndKey:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(cert_pem)
    key.touch(mode=0o600)
    key.write_bytes(key_pem)
    return cert, key


def client_pki(directory: Path) -> ClientPKI:
    """A fresh client PKI written into ``directory`` (created if needed)."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca, other, alone = trustme.CA(), trustme.CA(), trustme.CA()
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    trusted = ca.issue_cert("portainer.client", common_name="portainer")
    foreign = other.issue_cert("intruder.client", common_name="intruder")
    return ClientPKI(
        ca_pem=ca_pem,
        trusted=_write(directory, "trusted", trusted.cert_chain_pems[0].bytes(), trusted.private_key_pem.bytes()),
        foreign=_write(directory, "foreign", foreign.cert_chain_pems[0].bytes(), foreign.private_key_pem.bytes()),
        self_signed=_write(directory, "self", alone.cert_pem.bytes(), alone.private_key_pem.bytes()),
    )
