"""The security shutdown (CVE-2022-24961), driven by a fake clock."""
from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.security.notary import Notary
from portainer_agent.security.shutdown import SecurityShutdown
from portainer_agent.security.signature import SignatureInvalid
from portainer_agent.testing.signing import PortainerSigner

HOUR = 3600.0


class ShutdownTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.closed = 0
        self.events: list[dict] = []

    def close_listener(self) -> None:
        self.closed += 1

    def service(self, notary: Notary, timeout: float = 72 * HOUR, close=None) -> SecurityShutdown:
        service = SecurityShutdown(self.clock, timeout, notary, close or self.close_listener, log=Logger(observer=self.events.append))
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_closes_listener_when_nobody_paired(self) -> None:
        service = self.service(Notary())
        self.clock.advance(72 * HOUR - 1)
        self.assertEqual(self.closed, 0)
        self.clock.advance(1)
        self.assertEqual(self.closed, 1)
        self.assertTrue(service.triggered)
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("no Portainer instance was associated", warnings[0]["log_format"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_keeps_listener_when_a_key_was_associated(self) -> None:
        notary = Notary()
        service = self.service(notary, timeout=30)
        self.clock.advance(10)
        headers = PortainerSigner.generate().headers()
        notary.verify(headers["X-PortainerAgent-PublicKey"], headers["X-PortainerAgent-Signature"])
        self.clock.advance(3600)
        self.assertEqual(self.closed, 0)
        self.assertFalse(service.triggered)
        [event] = [e for e in self.events if "the API stays open" in e["log_format"]]
        self.assertEqual(event["log_level"], LogLevel.info)

    def test_a_bad_signature_does_not_prevent_the_shutdown(self) -> None:
        """In the reference a parseable key with a bad signature defeats the shutdown (§5.5)."""
        notary = Notary()
        self.service(notary, timeout=30)
        headers = PortainerSigner.generate().headers("not Portainer-App")
        try:
            notary.verify(headers["X-PortainerAgent-PublicKey"], headers["X-PortainerAgent-Signature"])
        except SignatureInvalid:
            pass
        self.clock.advance(30)
        self.assertEqual(self.closed, 1)

    def test_never_in_secret_mode(self) -> None:
        service = self.service(Notary(secret="s"))
        self.assertFalse(service.enabled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000 * HOUR)
        self.assertEqual(self.closed, 0)

    def test_zero_timeout_disables(self) -> None:
        self.service(Notary(), timeout=0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000 * HOUR)
        self.assertEqual(self.closed, 0)

    def test_stop_cancels_the_timer(self) -> None:
        service = self.service(Notary(), timeout=5)
        service.stopService()
        self.clock.advance(10)
        self.assertEqual(self.closed, 0)

    def test_close_listener_may_return_a_deferred(self) -> None:
        pending: Deferred[None] = Deferred()
        self.service(Notary(), timeout=5, close=lambda: pending)
        self.clock.advance(5)
        self.assertFalse(pending.called)
        pending.callback(None)

    def test_close_failure_is_logged_not_raised(self) -> None:
        self.service(Notary(), timeout=5, close=lambda: fail(RuntimeError("port already gone")))
        self.clock.advance(5)
        self.assertTrue(any(e.get("log_failure") for e in self.events))
        self.flushLoggedErrors(RuntimeError)
