"""End to end: a real dockerd, a real agent process, real HTTPS clients and the docker CLI.

What the issue asks to see working on the wire: signed requests reach Docker, unsigned
ones get the reference 403 text (also through the docker CLI and its ``config.json``
headers), a Hypothesis fuzz over both headers only ever yields 403 or Docker's 2xx,
association and secret mode behave as specified, mutual TLS refuses strangers, and the
security shutdown closes the port while the process stays up.

Skipped when dockerd or the namespace tools are missing, or when not root.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.testing.certs import client_pki
from portainer_agent.testing.polling import wait_for
from portainer_agent.testing.ports import wait_for_bound_port
from portainer_agent.testing.signing import PortainerSigner, write_docker_config

from tests.integration.support import RealDockerTestCase

REPO = Path(__file__).resolve().parents[2]
MISSING = "Missing request signature headers"
INVALID = "Invalid request signature"


class AgentProcess:
    """``python -m portainer_agent`` on 127.0.0.1:<free port> against one dockerd."""

    def __init__(self, docker_host: str, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 probe_cert: tuple[Path, Path] | None = None) -> None:
        self.probe_cert = probe_cert
        self.workdir = Path(tempfile.mkdtemp(prefix="pa-sec-"))
        self.log_path = self.workdir / "agent.log"
        # Port 0: the agent writes the port it bound to the ports file (see
        # portainer_agent.testing.ports). The engine is not in a Swarm: no cluster port.
        ports_file = self.workdir / "ports.json"
        command = [
            sys.executable, "-m", "portainer_agent",
            "--docker-host", docker_host, "--host", "127.0.0.1", "--port", "0", "--ports-file", str(ports_file),
            "--data-dir", str(self.workdir / "data"), *extra_args,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, start_new_session=True,
            )
        try:
            self.port = wait_for_bound_port(ports_file, "api", 30, self.check_running, describe=self.log)
            wait_for(self.answers_ping, 30, "the agent to answer /ping", describe=self.log)
        except BaseException:
            self.stop()
            raise

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"agent exited {self.process.returncode}:\n{self.log()}")

    def answers_ping(self) -> bool:
        self.check_running()
        try:
            return https_request(self.port, "/ping", cert=self.probe_cert)[0] == 204
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def client_context(cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # as Portainer does (--tlsskipverify)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def https_request(port: int, path: str, headers: Mapping[str, str | bytes] | None = None,
                  cert: tuple[Path, Path] | None = None, method: str = "GET") -> tuple[int, bytes]:
    """One request on a fresh HTTPS connection; returns (status, body). A dropped
    connection raises (http.client.RemoteDisconnected), which the callers treat as a failure."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(cert), timeout=15)
    try:
        connection.putrequest(method, path)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        return response.status, body
    finally:
        connection.close()


class DockerdFixture(RealDockerTestCase):
    """The test session's dockerd (starting one takes seconds); agents started per test."""

    class_agent = False
    daemon: Any

    def start_agent(self, *args: str, probe_cert: tuple[Path, Path] | None = None) -> AgentProcess:
        agent = AgentProcess(self.daemon.url, args, probe_cert=probe_cert)
        self.addCleanup(agent.stop)
        return agent


class DefaultModeAgentTests(DockerdFixture, SynchronousTestCase):
    """One agent in default mode, associated with PORTAINER in ``setUpClass``."""

    PORTAINER = PortainerSigner.generate()

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.agent = AgentProcess(cls.daemon.url, ["--log-level", "DEBUG"])
        status, body = https_request(cls.agent.port, "/version", cls.PORTAINER.headers())
        assert status == 200, (status, body)

    @classmethod
    def tearDownClass(cls) -> None:
        agent, cls.agent = cls.__dict__.get("agent"), None
        if agent is not None:
            agent.stop()
        super().tearDownClass()

    def request(self, path: str, headers: Mapping[str, str | bytes] | None = None) -> tuple[int, dict]:
        status, body = https_request(self.agent.port, path, headers)
        return status, json.loads(body) if body else {}

    def test_ping_needs_no_signature(self) -> None:
        self.assertEqual(https_request(self.agent.port, "/ping")[0], 204)
        self.assertEqual(https_request(self.agent.port, "/v2/ping")[0], 204)

    def test_unsigned_docker_call_gets_missing_headers_403(self) -> None:
        self.assertEqual(self.request("/containers/json"), (403, {"message": MISSING, "details": "Unauthorized"}))

    def test_unsigned_host_info_refused_before_routing(self) -> None:
        status, body = self.request("/v2/host/info", {"X-PortainerAgent-Target": "some-other-node"})
        self.assertEqual((status, body["message"]), (403, MISSING))

    def test_signed_docker_call_reaches_docker(self) -> None:
        status, body = self.request("/version", self.PORTAINER.headers())
        self.assertEqual(status, 200)
        self.assertIn("ApiVersion", body)

    def test_go_canonical_header_names(self) -> None:
        headers = self.PORTAINER.headers()
        status, _ = self.request("/version", {
            "X-Portaineragent-Publickey": headers["X-PortainerAgent-PublicKey"],
            "X-Portaineragent-Signature": headers["X-PortainerAgent-Signature"],
        })
        self.assertEqual(status, 200)

    def test_second_portainer_refused_with_invalid_signature(self) -> None:
        status, body = self.request("/version", PortainerSigner.generate().headers())
        self.assertEqual((status, body), (403, {"message": INVALID, "details": "Unauthorized"}))

    def test_rsa_key_gets_clean_403_not_a_dropped_connection(self) -> None:
        vectors = json.loads((Path(__file__).parent / "data" / "signature-vectors.json").read_text())["vectors"]
        rsa = next(v for v in vectors if v["name"] == "RSA public key")
        status, body = self.request("/version", {"X-PortainerAgent-PublicKey": rsa["public_key_hex"],
                                                 "X-PortainerAgent-Signature": rsa["signature"]})
        self.assertEqual((status, body["message"]), (403, INVALID))

    def test_association_logged_once_without_header_values(self) -> None:
        log = self.agent.log()
        self.assertEqual(log.count("Associated with Portainer key SHA256:"), 1)
        self.assertNotIn(self.PORTAINER.public_key_hex, log)

    def test_docker_cli_with_signed_config_json(self) -> None:
        config = Path(tempfile.mkdtemp(prefix="pa-cli-"))
        self.addCleanup(shutil.rmtree, config, ignore_errors=True)
        write_docker_config(config, self.PORTAINER.headers())
        result = self.docker_cli(config, "version", "--format", "{{.Server.APIVersion}}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout.strip(), r"^1\.\d+$")
        result = self.docker_cli(config, "ps", "-a")
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_docker_cli_without_signature_shows_the_403_text(self) -> None:
        config = Path(tempfile.mkdtemp(prefix="pa-cli-"))
        self.addCleanup(shutil.rmtree, config, ignore_errors=True)
        write_docker_config(config, {})
        result = self.docker_cli(config, "ps")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(MISSING, result.stderr)

    def test_docker_cli_with_another_key_shows_invalid_signature(self) -> None:
        config = Path(tempfile.mkdtemp(prefix="pa-cli-"))
        self.addCleanup(shutil.rmtree, config, ignore_errors=True)
        write_docker_config(config, PortainerSigner.generate().headers())
        result = self.docker_cli(config, "ps")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(INVALID, result.stderr)

    def docker_cli(self, config: Path, *args: str) -> subprocess.CompletedProcess:
        """The real docker CLI, as Portainer's stack deployments run it (headers from
        ``config.json``; ``write_docker_config`` also writes the ``ca.pem`` that
        ``--tls`` without verification still loads)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(config)
        return subprocess.run(
            ["docker", "--tls", "-H", f"tcp://127.0.0.1:{self.agent.port}", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(
        st.one_of(st.none(), st.binary(max_size=200), st.just(PORTAINER.public_key_hex.encode()),
                  st.text(alphabet="0123456789abcdef", max_size=200).map(str.encode)),
        st.one_of(st.none(), st.binary(max_size=120), st.just(PORTAINER.sign().encode()),
                  st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
                          max_size=100).map(str.encode)),
        st.sampled_from(["/_ping", "/version", "/containers/json", "/v1.41/info", "/v2/host/info", "/v2/agents"]),
    )
    def test_fuzzed_headers_only_ever_403_or_docker_2xx(self, public_key: bytes | None, signature: bytes | None,
                                                         path: str) -> None:
        headers: dict[str, bytes] = {}
        if public_key is not None:
            headers["X-PortainerAgent-PublicKey"] = _legal_field(public_key)
        if signature is not None:
            headers["X-PortainerAgent-Signature"] = _legal_field(signature)
        status, body = https_request(self.agent.port, path, headers)
        genuine = (headers.get("X-PortainerAgent-PublicKey") == self.PORTAINER.public_key_hex.encode()
                   and signature is not None and headers.get("X-PortainerAgent-Signature") == signature)
        if status == 403:
            self.assertIn(json.loads(body)["message"], (MISSING, INVALID))
        elif genuine and path in ("/v2/host/info", "/v2/agents"):
            # Past the guard: what these agent endpoints answer (404 until implemented, 503
            # on a standalone engine...) belongs to other issues.
            self.assertNotEqual(status, 403, body[:200])
        elif genuine:
            self.assertTrue(200 <= status < 300, (status, body[:200]))
        else:
            self.fail(f"{path}: {status} {body[:200]!r}")


def _legal_field(value: bytes) -> bytes:
    """Keep only bytes an HTTP field value may contain (VCHAR, SP, HTAB, obs-text): the
    fuzz targets the signature check, not the HTTP parser's 400s."""
    return bytes(b for b in value if b in (0x09, 0x20) or 0x21 <= b <= 0x7E or b >= 0x80)


class SecretModeAgentTests(DockerdFixture, SynchronousTestCase):
    def test_two_keys_signing_the_secret_both_work_and_portainer_app_is_refused(self) -> None:
        agent = self.start_agent("--secret", "my-agent-secret", "--secret-timeout", "1s")
        for signer in (PortainerSigner.generate(), PortainerSigner.generate(), PortainerSigner.generate()):
            self.assertEqual(https_request(agent.port, "/version", signer.headers("my-agent-secret"))[0], 200)
        status, body = https_request(agent.port, "/version", PortainerSigner.generate().headers())
        self.assertEqual((status, json.loads(body)["message"]), (403, INVALID))
        # Secret mode counts as associated: the 1s security shutdown is never even armed
        # (the agent is ready, so its services have started and would have said so).
        self.assertNotIn("The API closes in", agent.log())
        self.assertEqual(https_request(agent.port, "/ping")[0], 204)


class SecurityShutdownAgentTests(DockerdFixture, SynchronousTestCase):
    def test_unpaired_agent_closes_its_port_and_keeps_running(self) -> None:
        agent = self.start_agent("--secret-timeout", "3s")
        # A keep-alive connection opened before the shutdown...
        lingering = http.client.HTTPSConnection("127.0.0.1", agent.port, context=client_context(), timeout=15)
        self.addCleanup(lingering.close)
        lingering.request("GET", "/ping")
        response = lingering.getresponse()
        response.read()
        self.assertEqual(response.status, 204)
        # A bad signature must not count as a pairing (it does in the reference agent).
        bad = PortainerSigner.generate().headers("not the message")
        self.assertEqual(https_request(agent.port, "/version", bad)[0], 403)

        def refused() -> bool:
            try:
                https_request(agent.port, "/ping")
            except ConnectionRefusedError:
                return True
            return False

        wait_for(refused, 15, "the API port to close")
        self.assertTrue(agent.alive)
        self.assertIn("Shutting down the API server", agent.log())
        # ...cannot be used to pair the agent afterwards.
        lingering.request("GET", "/version", headers=PortainerSigner.generate().headers())
        response = lingering.getresponse()
        body = json.loads(response.read())
        self.assertEqual((response.status, body["message"]), (403, INVALID))
        self.assertIn("security shutdown", body["details"])

    def test_paired_agent_keeps_serving_after_the_timeout(self) -> None:
        agent = self.start_agent("--secret-timeout", "1s")
        self.assertIn("The API closes in", agent.log(), "armed, unlike in secret mode")
        signer = PortainerSigner.generate()
        self.assertEqual(https_request(agent.port, "/version", signer.headers())[0], 200)
        wait_for(lambda: "the API stays open" in agent.log(), 15, "the timeout to pass (the check logs it)")
        self.assertEqual(https_request(agent.port, "/version", signer.headers())[0], 200)
        self.assertNotIn("Shutting down the API server", agent.log())


class MutualTLSAgentTests(DockerdFixture, SynchronousTestCase):
    def test_client_certificate_required_and_signature_still_checked(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="pa-mtls-"))
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        pki = client_pki(tmp)
        good, stranger = pki.trusted, pki.foreign
        agent = self.start_agent("--tls-ca", str(pki.ca_pem), probe_cert=good)
        signer = PortainerSigner.generate()
        self.assertEqual(https_request(agent.port, "/version", signer.headers(), cert=good)[0], 200)
        self.assertEqual(https_request(agent.port, "/version", cert=good)[0], 403)
        for cert in (None, stranger):
            with self.assertRaises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
                https_request(agent.port, "/ping", cert=cert)
