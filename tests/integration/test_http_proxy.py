"""Raw HTTP through a running agent: headers, prefixes, errors, streaming limits."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.testing.polling import wait_for
from portainer_agent.testing.tls import unverified_tls

from tests.integration.support import AgentProcess, RealDockerTestCase, rss_kib

AGENT_HEADERS = ("Portainer-Agent", "Portainer-Agent-Api-Version", "Portainer-Agent-Platform")


class AgentHTTPTests(RealDockerTestCase, SynchronousTestCase):

    def assertAgentHeadersOnce(self, headers) -> None:
        for name in AGENT_HEADERS:
            self.assertEqual(len(headers.get_all(name) or []), 1, f"{name}: {headers.get_all(name)}")
        self.assertEqual(headers["Portainer-Agent-Api-Version"], "2")
        self.assertEqual(headers["Portainer-Agent-Platform"], "1")

    def test_ping_is_public_204(self) -> None:
        for path in ("/ping", "/v2/ping"):
            status, headers, body = self.agent.request("GET", path, signed=False)
            self.assertEqual((status, body), (204, b""), path)
            self.assertAgentHeadersOnce(headers)

    def test_v1_ping_is_not_the_agent_ping(self) -> None:
        status, _, body = self.agent.request("GET", "/v1/ping", signed=False)
        self.assertEqual(status, 403)
        self.assertIn(b"Missing request signature headers", body)

    def test_agent_headers_exactly_once_everywhere(self) -> None:
        cases = [("GET", "/_ping", True, 200), ("GET", "/v1.41/version", True, 200),
                 ("GET", "/containers/does-not-exist/json", True, 404), ("GET", "/host/nothing", True, 404),
                 ("GET", "/version", False, 403)]
        for method, path, signed, expected in cases:
            status, headers, _ = self.agent.request(method, path, signed=signed)
            self.assertEqual(status, expected, path)
            self.assertAgentHeadersOnce(headers)

    def test_over_long_request_line_or_header_is_refused_at_once(self) -> None:
        for path, headers, expected in (("/" + "a" * 20000, {}, 414), ("/_ping", {"X-Big": "b" * 20000}, 431)):
            status, response_headers, body = self.agent.request("GET", path, headers=headers, timeout=10)
            self.assertEqual(status, expected)
            self.assertEqual(response_headers["Connection"], "close")
            self.assertAgentHeadersOnce(response_headers)
            self.assertIn("message", json.loads(body))

    def test_requests_the_parser_refuses_are_json_with_agent_headers(self) -> None:
        for raw in (b"POST /_ping HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
                    b"GET /_ping HTTP/1.1\r\nX-Bare: a\nb\r\n\r\n"):
            sock = socket.create_connection(("127.0.0.1", self.agent.port), timeout=10)
            with unverified_tls().wrap_socket(sock) as tls:
                tls.sendall(raw)
                answer = b""
                while True:  # the agent closes after answering (else: the 10 s timeout fails the test)
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
            self.assertIn(b"Portainer-Agent-Api-Version: 2", head)
            self.assertNotIn(b"TwistedWeb", head)
            self.assertEqual(json.loads(body)["message"], "Bad request")

    def test_no_server_version_disclosed(self) -> None:
        for path, signed in (("/ping", False), ("/v2/host/nothing", True), ("/version", False)):
            _, headers, _ = self.agent.request("GET", path, signed=signed)
            self.assertNotIn("TwistedWeb", headers.get("Server", ""), path)

    def test_agent_errors_are_docker_style_json(self) -> None:
        status, headers, body = self.agent.request("GET", "/v2/host/nothing")
        self.assertEqual(status, 404)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertIn("message", json.loads(body))

    def test_docker_receives_the_client_version_prefix(self) -> None:
        # Docker refuses API versions older than its minimum: only possible if it saw /v1.11.
        status, _, body = self.agent.request("GET", "/v1.11/version")
        self.assertEqual(status, 400, body)
        self.assertIn(b"too old", body)
        status, headers, _ = self.agent.request("GET", "/v1.41/version")
        self.assertEqual((status, headers["Api-Version"]), (200, "1.41"))

    def test_version_like_segment_inside_a_path_is_kept(self) -> None:
        status, _, body = self.agent.request("POST", "/v1.41/volumes/create", body=b'{"Name": "v1.5data"}',
                                             headers={"Content-Type": "application/json"})
        self.assertEqual(status, 201, body)
        try:
            volume = self.agent.json("GET", "/v1.41/volumes/v1.5data")
            self.assertEqual(volume["Name"], "v1.5data")
        finally:
            self.agent.request("DELETE", "/volumes/v1.5data")

    def test_query_string_reaches_docker(self) -> None:
        filters = json.dumps({"name": ["no-such-container-xyz"]})
        from urllib.parse import quote

        self.assertEqual(self.agent.json("GET", f"/containers/json?all=1&filters={quote(filters)}"), [])

    def test_content_length_is_kept_not_rechunked(self) -> None:
        conn = self.agent.connection()
        try:
            conn.request("GET", "/_ping", headers=self.agent.headers)
            response = conn.getresponse()
            self.assertEqual(response.read(), b"OK")
            self.assertEqual(response.headers["Content-Length"], "2")
            self.assertIsNone(response.headers["Transfer-Encoding"])
            # keep-alive: the same connection serves a second request
            conn.request("GET", "/_ping", headers=self.agent.headers)
            self.assertEqual(conn.getresponse().read(), b"OK")
        finally:
            conn.close()

    def test_upgrade_error_status_is_relayed(self) -> None:
        status, headers, body = self.agent.request(
            "POST", "/exec/0123456789abcdef/start", body=b'{"Detach": false, "Tty": false}',
            headers={"Content-Type": "application/json", "Connection": "Upgrade", "Upgrade": "tcp"})
        self.assertEqual(status, 404, body)
        self.assertIn("message", json.loads(body))
        self.assertAgentHeadersOnce(headers)

    def test_large_upload_streams_to_docker(self) -> None:
        container = self.agent.json("POST", "/containers/create", body=b'{"Image": "busybox:local", "Cmd": ["true"]}',
                                    headers={"Content-Type": "application/json"})["Id"]
        try:
            import io
            import tarfile

            payload = os.urandom(20 * 1024 * 1024)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                info = tarfile.TarInfo("big.bin")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            status, _, body = self.agent.request("PUT", f"/containers/{container}/archive?path=/",
                                                 body=buffer.getvalue(), headers={"Content-Type": "application/x-tar"})
            self.assertEqual(status, 200, body)
            status, headers, body = self.agent.request("GET", f"/containers/{container}/archive?path=/big.bin")
            self.assertEqual(status, 200)
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                self.assertEqual(tar.extractfile("big.bin").read(), payload)
        finally:
            self.agent.request("DELETE", f"/containers/{container}?force=1")

    def test_slow_client_download_keeps_agent_memory_flat(self) -> None:
        """Backpressure: a client reading a 120 MB export slowly does not make the
        agent buffer it."""
        run = self.agent.docker("run", "-d", "busybox:local", "sh", "-c",
                                "dd if=/dev/urandom of=/big bs=1M count=120 2>/dev/null; sleep 3600")
        container = run.stdout.strip()
        try:
            self.agent.docker("exec", container, "sh", "-c", "while [ $(stat -c %s /big) -lt 125829120 ]; do sleep 0.2; done",
                              timeout=120)
            before = rss_kib(self.agent.proc.pid)
            conn = self.agent.connection(timeout=60)
            conn.request("GET", f"/containers/{container}/export", headers=self.agent.headers)
            response = conn.getresponse()
            self.assertEqual(response.status, 200)
            peak = before
            received = 0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                received += len(response.read(64 * 1024))
                time.sleep(0.05)
                peak = max(peak, rss_kib(self.agent.proc.pid))
            conn.close()
            self.assertLess(received, 40 * 1024 * 1024)  # the client really was slow
            self.assertLess(peak - before, 30 * 1024, f"RSS grew {peak - before} KiB")
        finally:
            self.agent.docker("rm", "-f", container, check=False)


class AgentProcessTests(RealDockerTestCase, SynchronousTestCase):
    """Start-up, failure and shutdown behaviour of the agent process."""

    class_agent = False

    def start(self, *args, **kwargs) -> AgentProcess:
        agent = AgentProcess.start(*args, **kwargs)
        self.addCleanup(agent.cleanup)
        return agent

    def test_bad_option_is_one_line_and_exit_2(self) -> None:
        agent = self.start(self.daemon.socket_path, args=["--log-level", "verbose"], wait=False)
        self.assertEqual(agent.proc.wait(20), 2)
        lines = [line for line in agent.log_text.splitlines() if line.strip()]
        self.assertIn("invalid --log-level", lines[0])
        self.assertNotIn("Traceback", agent.log_text)

    def test_bad_env_value_names_the_variable(self) -> None:
        agent = self.start(self.daemon.socket_path, env={"AGENT_SECRET_TIMEOUT": "soon"}, wait=False)
        self.assertEqual(agent.proc.wait(20), 2)
        self.assertIn("AGENT_SECRET_TIMEOUT", agent.log_text)

    def test_docker_unreachable_at_start(self) -> None:
        agent = self.start("/tmp/pa-no-such-docker.sock", wait=False)
        self.assertEqual(agent.proc.wait(20), 1)
        self.assertIn("/tmp/pa-no-such-docker.sock", agent.log_text)
        self.assertNotIn("Traceback", agent.log_text)

    def test_docker_lost_mid_run_gives_502_then_recovers(self) -> None:
        from tests.integration.support import UnixRelay

        relay_dir = tempfile.mkdtemp(prefix="pa-relay-")
        self.addCleanup(shutil.rmtree, relay_dir, True)
        link = str(Path(relay_dir) / "docker.sock")
        relay = UnixRelay(self.daemon.socket_path, link)
        relay.start()
        self.addCleanup(relay.stop)
        agent = self.start(link)
        self.assertEqual(agent.request("GET", "/_ping")[0], 200)
        relay.stop()
        for _ in range(2):  # the pooled connection is gone too, and dialing fails
            status, headers, body = agent.request("GET", "/_ping")
            self.assertEqual(status, 502, body)
            self.assertIn(link, json.loads(body)["message"])
            self.assertEqual(headers.get_all("Portainer-Agent"), ["1.2.1"])
        relay.start()
        self.assertEqual(agent.request("GET", "/_ping")[0], 200)
        self.assertEqual(agent.proc.poll(), None)

    def test_sigterm_lets_a_short_request_finish_and_exits_0(self) -> None:
        agent = self.start(self.daemon.socket_path)
        # The container's output ends when the test says so (/tmp/go): no guessing how long
        # a request takes to reach Docker, or whether it is still running at SIGTERM.
        container = agent.docker("run", "-d", "busybox:local", "sh", "-c",
                                 "echo ready; until [ -e /tmp/go ]; do sleep 0.05; done; echo done").stdout.strip()
        self.addCleanup(self.daemon.docker, "rm", "-f", container, check=False)
        conn = agent.connection(timeout=30)
        self.addCleanup(conn.close)
        conn.request("GET", f"/containers/{container}/logs?follow=1&stdout=1", headers=agent.headers)
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertTrue(response.readline().endswith(b"ready\n"))  # in flight, through to Docker
        agent.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", agent.port)) != 0

        wait_for(refused, 10, "the agent to stop accepting connections after SIGTERM")  # it stops accepting first...
        self.assertIsNone(agent.proc.poll(), "...but waits for the request under way")
        self.daemon.docker("exec", container, "touch", "/tmp/go")
        self.assertTrue(response.read().endswith(b"done\n"))
        self.assertEqual(agent.proc.wait(20), 0)

    def test_json_logs_and_access_lines_hide_secrets(self) -> None:
        agent = self.start(self.daemon.socket_path, args=["--log-format", "json"])
        agent.request("GET", "/containers/json?all=1&filters=secret-query")
        agent.request("GET", "/_ping", headers={"X-PortainerAgent-Target": "node-secret-target"})
        agent.stop()
        records = [json.loads(line) for line in agent.log_text.splitlines() if line.strip()]
        self.assertTrue(records)
        access = [r for r in records if r.get("ns") == "portainer_agent.access"]
        self.assertIn("/containers/json", [r.get("path") for r in access])
        text = agent.log_text
        for secret in ("secret-query", "node-secret-target", agent.headers["X-PortainerAgent-Signature"],
                       agent.headers["X-PortainerAgent-PublicKey"]):
            self.assertNotIn(secret, text)

    def test_twistd_plugin_serves(self) -> None:
        import subprocess
        import sys

        from tests.integration.entrypoints import start_agent

        twistd = str(Path(sys.executable).with_name("twistd"))
        listing = subprocess.run([twistd, "--help"], capture_output=True, text=True, timeout=60, cwd="/")
        self.assertIn("portainer-agent", listing.stdout)
        agent = start_agent("twistd", self.daemon.socket_path)  # waits for /ping to answer 204
        try:
            self.assertEqual(agent.request("GET", "/ping", signed=False)[0], 204)
        finally:
            agent.proc.send_signal(signal.SIGTERM)
            # twistd re-raises the signal that stopped it once shut down cleanly.
            self.assertIn(agent.proc.wait(30), (0, -signal.SIGTERM))
            agent.cleanup()


class RawHijackHalfCloseTests(RealDockerTestCase, SynchronousTestCase):
    """The hijacked stream over TLS, driven byte by byte: a client that ends its
    side with a bare TCP FIN (no close_notify) still receives the output."""

    def exec_instance(self, container: str) -> str:
        body = json.dumps({"AttachStdin": True, "AttachStdout": True, "AttachStderr": True,
                           "Tty": False, "Cmd": ["sh", "-c", "cat; echo done-after-eof"]}).encode()
        created = self.agent.json("POST", f"/containers/{container}/exec", body=body,
                                  headers={"Content-Type": "application/json"})
        return created["Id"]

    def test_tcp_fin_half_close_keeps_output_flowing(self) -> None:
        import ssl as ssl_module

        container = self.agent.docker("run", "-d", "busybox:local", "sleep", "3600").stdout.strip()
        self.addCleanup(self.agent.docker, "rm", "-f", container, check=False)
        exec_id = self.exec_instance(container)

        context = unverified_tls()
        incoming, outgoing = ssl_module.MemoryBIO(), ssl_module.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=False)
        raw = socket.create_connection(("127.0.0.1", self.agent.port), timeout=20)
        self.addCleanup(raw.close)

        def pump_out() -> None:
            data = outgoing.read()
            if data:
                raw.sendall(data)

        def pump_in() -> bool:
            data = raw.recv(65536)
            if not data:
                return False
            incoming.write(data)
            return True

        while True:  # handshake
            try:
                tls.do_handshake()
                break
            except ssl_module.SSLWantReadError:
                pump_out()
                self.assertTrue(pump_in(), "connection closed during handshake")
        pump_out()

        body = b'{"Detach": false, "Tty": false}'
        head = (f"POST /v1.41/exec/{exec_id}/start HTTP/1.1\r\nHost: agent\r\nConnection: Upgrade\r\n"
                f"Upgrade: tcp\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        head += "".join(f"{name}: {value}\r\n" for name, value in self.agent.headers.items())
        tls.write(head.encode() + b"\r\n" + body)
        pump_out()

        received = b""

        def read_until(marker: bytes) -> None:
            nonlocal received
            deadline = time.monotonic() + 20
            while marker not in received and time.monotonic() < deadline:
                try:
                    received += tls.read(65536)
                    continue
                except ssl_module.SSLWantReadError:
                    pass
                except ssl_module.SSLZeroReturnError:
                    return
                if not pump_in():
                    return

        read_until(b"\r\n\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.1 101"), received[:200])
        self.assertEqual(received.count(b"Portainer-Agent: "), 1)
        received = received.split(b"\r\n\r\n", 1)[1]

        tls.write(b"line one\nline two\n")
        pump_out()
        raw.shutdown(socket.SHUT_WR)  # bare TCP FIN: stdin ends, no close_notify
        read_until(b"done-after-eof")
        # Docker's stdout frames: 8-byte header then payload.
        payload = b""
        while len(received) >= 8:
            size = int.from_bytes(received[4:8], "big")
            payload += received[8:8 + size]
            received = received[8 + size:]
        self.assertEqual(payload, b"line one\nline two\ndone-after-eof\n")
