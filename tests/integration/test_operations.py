"""A real agent process: the metrics listener, the healthcheck command, and connection
hardening (idle connections held, dripping heads cut, the TLS handshake deadline, the
connection cap, streams never cut), with open file descriptors back to baseline."""
from __future__ import annotations

import http.client
import select
import socket
import statistics
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.entrypoints import clean_environment, is_closed, open_fds, start_agent, tls_connect, wait_for
from tests.integration.support import RealDockerTestCase, free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200, response.status
        body = response.read().decode()
    finally:
        connection.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "portainer_agent", "healthcheck", *args], capture_output=True,
                          text=True, timeout=60, env=clean_environment(env))


class MetricsAndHealthTests(RealDockerTestCase, SynchronousTestCase):
    start_agent = False
    agent = None
    metrics_port = 0

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.metrics_port = free_port()
        cls.agent = start_agent("console", cls.daemon.socket_path,
                                args=["--metrics-addr", f"127.0.0.1:{cls.metrics_port}"])

    def test_requests_by_kind_and_signature_failures(self) -> None:
        before = scrape(self.metrics_port)
        self.assertEqual(self.agent.request("GET", "/ping", signed=False)[0], 204)
        self.assertEqual(self.agent.request("GET", "/containers/json")[0], 200)
        self.assertEqual(self.agent.request("GET", "/version", signed=False)[0], 403)
        self.assertEqual(self.agent.request("GET", "/version", headers={"X-PortainerAgent-PublicKey": "zz",
                                                                         "X-PortainerAgent-Signature": "zz"},
                                            signed=False)[0], 403)

        def grew(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0) - before.get(key, 0)

        after: dict = {}

        def counted() -> bool:
            after.update(scrape(self.metrics_port))
            return grew("portainer_agent_requests_total", kind="local", method="GET", status="4xx") >= 2

        wait_for(counted, 10, "the requests to be counted")
        self.assertEqual(grew("portainer_agent_requests_total", kind="ping", method="GET", status="2xx"), 1)
        self.assertEqual(grew("portainer_agent_requests_total", kind="local", method="GET", status="2xx"), 1)
        self.assertEqual(grew("portainer_agent_signature_failures_total", reason="missing"), 1)
        # once paired, another key is refused before it is parsed: "unauthorized"
        self.assertEqual(grew("portainer_agent_signature_failures_total", reason="unauthorized"), 1)
        self.assertGreater(grew("portainer_agent_response_bytes_total", kind="local"), 0)
        self.assertGreaterEqual(grew("portainer_agent_request_duration_seconds_count", kind="local"), 3)
        self.assertIn(("portainer_agent_open_connections", ()), after)

    def test_metrics_are_not_on_the_api_port(self) -> None:
        status, _, body = self.agent.request("GET", "/metrics", signed=False)
        self.assertEqual(status, 403)
        status, _, body = self.agent.request("GET", "/metrics")
        self.assertNotIn(b"portainer_agent_", body)

    def test_healthcheck_healthy_then_each_failure(self) -> None:
        ok = healthcheck(env={"AGENT_HOST": "127.0.0.1", "AGENT_PORT": str(self.agent.port),
                              "DOCKER_HOST": f"unix://{self.daemon.socket_path}"})
        self.assertEqual((ok.returncode, ok.stdout.strip()), (0, "healthy"), ok.stderr)
        # 0.0.0.0 is probed on loopback
        ok = healthcheck("--host", "0.0.0.0", "--port", str(self.agent.port),
                         "--docker-host", f"unix://{self.daemon.socket_path}")
        self.assertEqual(ok.returncode, 0, ok.stderr)
        no_api = healthcheck("--port", str(free_port()), "--docker-host", f"unix://{self.daemon.socket_path}")
        self.assertEqual(no_api.returncode, 1)
        self.assertEqual(len(no_api.stderr.splitlines()), 1, no_api.stderr)
        self.assertIn("agent API https://127.0.0.1:", no_api.stderr)
        no_docker = healthcheck("--port", str(self.agent.port), "--docker-host", "unix:///nonexistent/d.sock")
        self.assertEqual(no_docker.returncode, 1)
        self.assertEqual(len(no_docker.stderr.splitlines()), 1, no_docker.stderr)
        self.assertIn("Docker at unix:///nonexistent/d.sock", no_docker.stderr)
        self.assertEqual(healthcheck("--port", "x").returncode, 2)


class HardeningCase(RealDockerTestCase):
    start_agent = False
    agent = None
    agent_args: tuple[str, ...] = ()

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.metrics_port = free_port()
        cls.agent = start_agent("console", cls.daemon.socket_path,
                                args=["--log-level", "INFO", "--metrics-addr", f"127.0.0.1:{cls.metrics_port}",
                                      *cls.agent_args])

    def setUp(self) -> None:
        super().setUp()  # brings the class fixture up under trial's runner
        self.sockets: list[socket.socket] = []
        # The baseline includes the kept-alive upstream connection to Docker (pooled).
        self.assertEqual(self.agent.request("GET", "/_ping")[0], 200)
        wait_for(lambda: self.open_connections() == 0, 10, "no API connection open")
        self.baseline = self.fds()

    def open_connections(self) -> float:
        return scrape(self.metrics_port)[("portainer_agent_open_connections", ())]

    def fds(self) -> int:
        return open_fds(self.agent.proc.pid)

    def tearDown(self) -> None:
        for sock in self.sockets:
            sock.close()
        wait_for(lambda: self.fds() <= self.baseline, 20,
                 f"the agent's descriptors back to {self.baseline} (now {self.fds()})")

    def timed_ms(self, method: str, path: str, signed: bool) -> float:
        started = time.monotonic()
        status, _, _ = self.agent.request(method, path, signed=signed, timeout=10)
        elapsed = (time.monotonic() - started) * 1000
        self.assertIn(status, (200, 204))
        return elapsed


class HardeningTests(HardeningCase, SynchronousTestCase):
    agent_args = ("--header-timeout", "2s", "--idle-timeout", "10m")  # connecting 1000 may take a while

    def test_1000_idle_tls_connections_do_not_slow_requests(self) -> None:
        started = time.monotonic()
        for _ in range(1000):
            self.sockets.append(tls_connect(self.agent.port))
        connect_seconds = time.monotonic() - started
        wait_for(lambda: self.open_connections() == 1000, 20, "1000 connections open in the agent")
        self.assertGreater(self.fds(), 1000)  # the open-file limit was raised
        fresh = [self.timed_ms("GET", "/ping", False) for _ in range(3)]
        connection = self.agent.connection(10)
        self.addCleanup(connection.close)

        def timed(path: str, headers: dict[str, str]) -> float:
            began = time.monotonic()
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            self.assertIn(response.status, (200, 204))
            return (time.monotonic() - began) * 1000

        timed("/ping", {})  # the handshake
        ping = [timed("/ping", {}) for _ in range(5)]
        containers = [timed("/containers/json", dict(self.agent.headers)) for _ in range(5)]
        print(f"\n1000 TLS connections in {connect_seconds:.1f}s; with them open, on a kept-alive connection: "
              f"/ping {[round(t, 1) for t in ping]} ms, signed /containers/json {[round(t, 1) for t in containers]} ms;"
              f" /ping on a new connection (with its handshake): {[round(t, 1) for t in fresh]} ms")
        self.assertLess(statistics.median(ping), 100)
        self.assertLess(statistics.median(containers), 100)
        self.assertFalse(any(is_closed(s) for s in self.sockets[:50]))

    def test_200_dripping_heads_are_cut_at_the_deadline(self) -> None:
        for _ in range(200):
            self.sockets.append(tls_connect(self.agent.port))
        for sock in self.sockets:
            sock.sendall(b"GET /_ping HTTP/1.1\r\nX-Drip: ")
        started = time.monotonic()
        cut_at: dict[int, float] = {}
        deadline = started + 10
        while len(cut_at) < len(self.sockets) and time.monotonic() < deadline:
            for index, sock in enumerate(self.sockets):
                if index in cut_at:
                    continue
                try:
                    sock.sendall(b"x")  # one byte per connection every ~0.2 s
                except OSError:
                    cut_at[index] = time.monotonic() - started
            readable, _, _ = select.select([s for i, s in enumerate(self.sockets) if i not in cut_at], [], [], 0.2)
            for sock in readable:
                if is_closed(sock):
                    cut_at[self.sockets.index(sock)] = time.monotonic() - started
        print(f"\n200 dripping heads cut between {min(cut_at.values()):.2f}s and {max(cut_at.values()):.2f}s")
        self.assertEqual(len(cut_at), 200)
        self.assertGreater(min(cut_at.values()), 1.5)  # not before the 2 s deadline (client-side clock)
        self.assertLess(max(cut_at.values()), 5)
        self.assertEqual(self.agent.request("GET", "/ping", signed=False)[0], 204)

    def test_tls_handshake_deadline(self) -> None:
        silent = socket.create_connection(("127.0.0.1", self.agent.port), timeout=20)
        self.sockets.append(silent)
        started = time.monotonic()
        try:
            self.assertEqual(silent.recv(1), b"")  # blocks until the agent cuts it (or 20 s)
        except ConnectionResetError:
            pass  # cut with a reset: the agent aborts, it owes a silent client nothing
        elapsed = time.monotonic() - started
        self.assertGreater(elapsed, 9)
        self.assertLess(elapsed, 13)


class StreamsTests(HardeningCase, SynchronousTestCase):
    agent_args = ("--header-timeout", "1s", "--idle-timeout", "1s")

    def test_events_stream_outlives_both_timeouts(self) -> None:
        sock = tls_connect(self.agent.port)
        self.sockets.append(sock)
        head = "GET /events HTTP/1.1\r\nHost: agent\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in self.agent.headers.items()) + "\r\n"
        sock.sendall(head.encode())
        sock.settimeout(10)
        self.assertIn(b"200 OK", sock.recv(4096))
        sock.settimeout(3)  # three times both timeouts: nothing arrives, and nothing closes
        with self.assertRaises(TimeoutError):
            data = sock.recv(4096)
            raise AssertionError(f"stream ended or sent data: {data!r}")
        name = f"pa-ops-{time.monotonic_ns()}"
        self.assertEqual(self.agent.request("POST", "/volumes/create", body=f'{{"Name": "{name}"}}'.encode(),
                                            headers={"Content-Type": "application/json"})[0], 201)
        self.addCleanup(self.agent.request, "DELETE", f"/volumes/{name}")
        sock.settimeout(10)
        received = b""
        while name.encode() not in received:
            chunk = sock.recv(65536)
            self.assertTrue(chunk, "the events stream was closed")
            received += chunk

    def test_exec_and_logs_follow_outlive_both_timeouts(self) -> None:
        # The workload pauses for 3 s, three times both timeouts, before it prints.
        container = self.agent.docker("run", "-d", "busybox:local", "sh", "-c",
                                      "sleep 3; echo late-line; sleep 60").stdout.strip()
        self.addCleanup(self.agent.docker, "rm", "-f", container, check=False)
        logs = subprocess.Popen(["docker", "--tls", "logs", "-f", container], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.agent.docker_env())
        self.addCleanup(logs.kill)
        executed = self.agent.docker("exec", container, "sh", "-c", "sleep 3; echo exec-done", timeout=30)
        self.assertEqual(executed.stdout.strip(), "exec-done")
        assert logs.stdout is not None
        readable, _, _ = select.select([logs.stdout], [], [], 20)
        self.assertTrue(readable, "logs -f printed nothing in 20 s")
        self.assertEqual(logs.stdout.readline().strip(), b"late-line")
        self.assertIsNone(logs.poll(), "logs -f ended")

    def test_idle_kept_alive_connection_is_closed(self) -> None:
        sock = tls_connect(self.agent.port)
        self.sockets.append(sock)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: agent\r\n\r\n")
        sock.settimeout(10)
        self.assertIn(b"204", sock.recv(4096))
        started = time.monotonic()
        wait_for(lambda: is_closed(sock), 10, "the idle connection to be closed")
        self.assertGreater(time.monotonic() - started, 0.5)


class CapTests(HardeningCase, SynchronousTestCase):
    agent_args = ("--max-connections", "5")

    def test_cap_refuses_the_next_and_accepts_after_a_close(self) -> None:
        for _ in range(5):
            self.sockets.append(tls_connect(self.agent.port))
        wait_for(lambda: self.open_connections() == 5, 10, "5 connections open in the agent")
        for _ in range(3):
            with self.assertRaises(OSError):  # closed at accept: the handshake fails
                tls_connect(self.agent.port).close()
        self.sockets.pop().close()

        def accepted() -> bool:
            try:
                sock = tls_connect(self.agent.port)
            except OSError:
                return False
            self.sockets.append(sock)
            return True

        wait_for(accepted, 10, "a new connection to be accepted after one closed")
        self.assertFalse(any(is_closed(s) for s in self.sockets))
        self.assertEqual(self.agent.log_text.count("connection limit reached"), 1)
        self.assertGreaterEqual(scrape(self.metrics_port)[("portainer_agent_connections_refused_total",
                                                           (("reason", "max_connections"),))], 3)
