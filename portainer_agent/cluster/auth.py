"""Mutual HMAC challenge between agents, bound to the server's TLS key.

Both sides send a fresh nonce; each proves knowledge of the cluster key with
``HMAC-SHA256(key, label | role | client nonce | server nonce | server SPKI pin)``. The client
checks the server's proof before it sends anything about the cluster, the server checks the
client's before it accepts anything. Binding the server's SPKI fingerprint (as the client saw
it on the TLS handshake) means a man in the middle with its own certificate cannot relay the
proofs: the client would compute them over the middle's key and refuse.

Pure functions; the AMP protocol calls them.
"""
from __future__ import annotations

import hashlib
import hmac
import os

LABEL = b"portainer-agent cluster auth v1"
NONCE_BYTES = 32


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes, server_pin: str) -> bytes:
    """The proof ``role`` (``b"server"`` or ``b"client"``) sends."""
    message = b"|".join((LABEL, role, client_nonce, server_nonce, server_pin.encode("ascii", "replace")))
    return hmac.new(key, message, hashlib.sha256).digest()


def check(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes, server_pin: str, presented: bytes) -> bool:
    """Constant-time comparison of a presented proof with the expected one."""
    expected = proof(key, role, client_nonce, server_nonce, server_pin)
    return hmac.compare_digest(expected, presented)
