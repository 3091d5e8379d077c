"""The HTTP seam: header extraction, refusal format, and a fuzz proving only 403 or pass."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from portainer_agent.config import Config
from portainer_agent.errors import AgentError
from portainer_agent.security.guard import SignatureGuard
from portainer_agent.testing.signing import PortainerSigner


def request(headers: dict[bytes, list[bytes]] | None = None, path: bytes = b"/containers/json") -> DummyRequest:
    req = DummyRequest(path.lstrip(b"/").split(b"/"))
    req.path = path
    for name, values in (headers or {}).items():
        req.requestHeaders.setRawHeaders(name, values)
    return req


def as_raw(headers: dict[str, str]) -> dict[bytes, list[bytes]]:
    return {name.encode(): [value.encode()] for name, value in headers.items()}


class GuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.guard = SignatureGuard.from_config(Config())
        self.portainer = PortainerSigner.generate()

    def refusal(self, req: DummyRequest) -> AgentError:
        return self.assertRaises(AgentError, self.guard.check, req)

    def test_missing_headers_403_with_reference_text(self) -> None:
        error = self.refusal(request())
        self.assertEqual((error.status, error.message, error.details), (403, "Missing request signature headers", "Unauthorized"))
        self.assertEqual(json.loads(error.body()), {"message": "Missing request signature headers", "details": "Unauthorized"})

    def test_one_header_missing(self) -> None:
        headers = as_raw(self.portainer.headers())
        del headers[b"X-PortainerAgent-Signature"]
        self.assertEqual(self.refusal(request(headers)).message, "Missing request signature headers")

    def test_valid_headers_pass(self) -> None:
        self.assertIsNone(self.guard.check(request(as_raw(self.portainer.headers()))))
        self.assertTrue(self.guard.is_associated)

    def test_go_canonical_header_names_pass(self) -> None:
        headers = self.portainer.headers()
        req = request({
            b"X-Portaineragent-Publickey": [headers["X-PortainerAgent-PublicKey"].encode()],
            b"x-portaineragent-signature": [headers["X-PortainerAgent-Signature"].encode()],
        })
        self.guard.check(req)

    def test_wrong_key_after_association_is_invalid_unauthorized(self) -> None:
        self.guard.check(request(as_raw(self.portainer.headers())))
        error = self.refusal(request(as_raw(PortainerSigner.generate().headers())))
        self.assertEqual((error.status, error.message, error.details), (403, "Invalid request signature", "Unauthorized"))

    def test_undecodable_header_is_invalid_with_a_reason(self) -> None:
        req = request({b"X-PortainerAgent-PublicKey": [b"\xff\xfe zz"], b"X-PortainerAgent-Signature": [b"\x00"]})
        error = self.refusal(req)
        self.assertEqual((error.status, error.message), (403, "Invalid request signature"))
        self.assertIn("public key", error.details)

    def test_first_of_repeated_headers_is_used_like_go(self) -> None:
        good = self.portainer.headers()
        req = request({
            b"X-PortainerAgent-PublicKey": [good["X-PortainerAgent-PublicKey"].encode(), b"junk"],
            b"X-PortainerAgent-Signature": [good["X-PortainerAgent-Signature"].encode(), b"junk"],
        })
        self.guard.check(req)

    def test_closed_guard_refuses_even_valid_requests(self) -> None:
        self.guard.close("API closed by the security shutdown")
        error = self.refusal(request(as_raw(self.portainer.headers())))
        self.assertEqual((error.status, error.message, error.details),
                         (403, "Invalid request signature", "API closed by the security shutdown"))
        self.assertFalse(self.guard.is_associated)

    def test_secret_mode_from_config(self) -> None:
        guard = SignatureGuard.from_config(Config(secret="s3cret"))
        self.assertTrue(guard.notary.secret_mode)
        guard.check(request(as_raw(self.portainer.headers("s3cret"))))
        guard.check(request(as_raw(PortainerSigner.generate().headers("s3cret"))))
        self.assertRaises(AgentError, guard.check, request(as_raw(self.portainer.headers())))


header_values = st.one_of(
    st.none(),
    st.binary(max_size=300),
    st.text(alphabet="0123456789abcdef", max_size=200).map(str.encode),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=120).map(str.encode),
)


class GuardFuzzTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(header_values, header_values, st.booleans())
    def test_only_403_or_pass(self, public_key: bytes | None, signature: bytes | None, secret: bool) -> None:
        guard = SignatureGuard.from_config(Config(secret="x" if secret else None))
        headers = {}
        if public_key is not None:
            headers[b"X-PortainerAgent-PublicKey"] = [public_key]
        if signature is not None:
            headers[b"X-PortainerAgent-Signature"] = [signature]
        try:
            guard.check(request(headers))
        except AgentError as error:
            self.assertEqual(error.status, 403)
            self.assertIn(error.message, ("Missing request signature headers", "Invalid request signature"))
            json.loads(error.body())
        else:  # pragma: no cover - random bytes do not make a valid P-256 signature
            self.fail("random headers were accepted")
