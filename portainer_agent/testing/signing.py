"""Sign requests the way a Portainer server does, for tests, tools and the lab.

Portainer keeps one P-256 key, sends its public key as hex of the DER
SubjectPublicKeyInfo in ``X-PortainerAgent-PublicKey`` and an ECDSA signature over
``MD5(message)`` (``r || s``, 32 bytes each, base64 *without* padding) in
``X-PortainerAgent-Signature``. The message is ``Portainer-App`` or, in secret mode,
the shared ``AGENT_SECRET`` (reference-agent.md §5 and §12.1).

Shipped with the package (like ``treq.testing``) so users can script a signed agent
client without Portainer.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

PORTAINER_MESSAGE = "Portainer-App"
PUBLIC_KEY_HEADER = "X-PortainerAgent-PublicKey"
SIGNATURE_HEADER = "X-PortainerAgent-Signature"


@attrs.frozen
class PortainerSigner:
    """A Portainer-style key pair that produces signature headers."""

    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, curve: ec.EllipticCurve | None = None) -> "PortainerSigner":
        return cls(ec.generate_private_key(curve or ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes | str) -> "PortainerSigner":
        if isinstance(pem, str):
            pem = pem.encode()
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(key)

    @property
    def public_key_hex(self) -> str:
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return der.hex()

    def sign(self, message: str = PORTAINER_MESSAGE) -> str:
        """Return the base64 (unpadded) ``r||s`` signature over ``MD5(message)``."""
        digest = hashlib.md5(message.encode()).digest()
        der = self.private_key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.MD5())))
        r, s = utils.decode_dss_signature(der)
        size = (self.private_key.curve.key_size + 7) // 8
        raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return base64.b64encode(raw).decode().rstrip("=")

    def headers(self, message: str = PORTAINER_MESSAGE) -> dict[str, str]:
        """The two headers a Portainer server puts on every request."""
        return {PUBLIC_KEY_HEADER: self.public_key_hex, SIGNATURE_HEADER: self.sign(message)}


def placeholder_ca_pem() -> bytes:
    """A throwaway self-signed certificate for ``DOCKER_CONFIG/ca.pem``.

    With ``--tls`` (no ``--tlsverify``) the docker CLI does not verify the agent, yet it
    still loads ``ca.pem`` from its cert path (``DOCKER_CONFIG``) and fails when it is
    missing. Its content is never used for verification.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portainer-agent placeholder (not verified)")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)


def write_docker_config(directory: str | os.PathLike[str], headers: dict[str, str]) -> Path:
    """Write a docker CLI ``config.json`` that sends ``headers`` on every request, and
    the placeholder ``ca.pem`` that ``docker --tls`` insists on loading.

    Point ``DOCKER_CONFIG`` at ``directory`` and the real CLI talks to an agent as
    Portainer's stack deployments do.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = path / "config.json"
    config.write_text(json.dumps({"HttpHeaders": headers}, indent=2))
    placeholder = path / "ca.pem"
    if not placeholder.exists():
        placeholder.write_bytes(placeholder_ca_pem())
    return config


def docker_client(base_url: str, headers: dict[str, str] | None = None, **kwargs: Any):
    """A docker-py client for an agent URL (``tcp://host:port``), TLS without verification,
    sending ``headers`` (e.g. ``PortainerSigner.headers()``) on every request."""
    import docker  # test-only dependency
    from docker.tls import TLSConfig

    # Build with a fixed version (no request yet): the version probe must already carry the
    # signature headers, and requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override
    # verify=False unless the session ignores the environment.
    version = kwargs.pop("version", None)
    client = docker.DockerClient(base_url=base_url, tls=TLSConfig(verify=False),
                                 version=version if version not in (None, "auto") else "1.41", **kwargs)
    client.api.trust_env = False
    if headers:
        client.api.headers.update(headers)
    if version in (None, "auto"):
        client.api._version = client.api._retrieve_server_version()
    return client
