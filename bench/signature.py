"""Per-request cost of the signature check (issue 4).

Run from the repository root: ``PYTHONPATH=. python bench/signature.py [--calls N]``.

Measures, in microseconds per call:

* the pure pieces (hex key parse, base64 decode, one ECDSA-P256 verify);
* the notary on its real paths: associated key with a fresh signature per request (what
  Portainer's reverse proxy sends), the same headers repeated (docker CLI config.json,
  Portainer's Docker SDK client: cache hit), secret mode with a fresh signature
  (full parse + verify), and a refused foreign key after association;
* the whole guard on a DummyRequest (header lookup + notary).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

from twisted.web.test.requesthelper import DummyRequest

from portainer_agent.security.guard import SignatureGuard
from portainer_agent.security.notary import Notary
from portainer_agent.security.signature import (
    SignatureInvalid,
    decode_signature,
    message_digest,
    parse_public_key,
    verify_signature,
)
from portainer_agent.testing.signing import PortainerSigner


def per_call_us(function: Callable[[int], object], calls: int, repeats: int = 5) -> float:
    """Best of ``repeats`` runs of ``calls`` calls (the minimum is the least noisy estimate)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(calls):
            function(index)
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    calls = args.calls

    portainer = PortainerSigner.generate()
    intruder = PortainerSigner.generate()
    key_hex = portainer.public_key_hex
    # Pre-compute fresh signatures so signing cost is not measured.
    fresh = [portainer.sign() for _ in range(calls)]
    fresh_secret = [portainer.sign("my-agent-secret") for _ in range(calls)]
    intruder_headers = intruder.headers()
    key = parse_public_key(key_hex)
    der = decode_signature(fresh[0])
    digest = message_digest("Portainer-App")

    associated = Notary()
    associated.verify(key_hex, fresh[0])
    secret = Notary(secret="my-agent-secret")

    def refused(_: int) -> None:
        try:
            associated.verify(intruder_headers["X-PortainerAgent-PublicKey"], intruder_headers["X-PortainerAgent-Signature"])
        except SignatureInvalid:
            pass

    guard = SignatureGuard(Notary())
    repeated_headers = portainer.headers()
    request = DummyRequest([b"containers", b"json"])
    for name, value in repeated_headers.items():
        request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
    guard.check(request)

    rows = [
        ("parse P-256 public key (hex -> key)", lambda i: parse_public_key(key_hex)),
        ("decode signature (raw base64 -> DER)", lambda i: decode_signature(fresh[i])),
        ("one ECDSA-P256 verify (MD5 prehashed)", lambda i: verify_signature(key, der, digest)),
        ("notary, associated key, fresh signature", lambda i: associated.verify(key_hex, fresh[i])),
        ("notary, associated key, repeated headers", lambda i: associated.verify(key_hex, fresh[0])),
        ("notary, secret mode, fresh signature", lambda i: secret.verify(key_hex, fresh_secret[i])),
        ("notary, foreign key refused (associated)", refused),
        ("guard.check, repeated headers (DummyRequest)", lambda i: guard.check(request)),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'case':<{width}}  {'us/call':>9}  {'calls/s':>10}")
    print("-" * (width + 23))
    for label, function in rows:
        # Cache-defeating rows need a fresh notary-side state per run: the verified-pair
        # cache would otherwise turn runs 2..n into hits.
        if "fresh" in label:
            associated._verified.clear()
            secret._verified.clear()
            us = per_call_us(function, calls, repeats=1)
        else:
            us = per_call_us(function, calls)
        print(f"{label:<{width}}  {us:9.2f}  {1e6 / us:10.0f}")


if __name__ == "__main__":
    main()
