"""The real docker CLI and docker-py through a running agent (TLS, signed), against
a real dockerd: everything an operator does must behave as against the socket."""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.testing.signing import docker_client
from tests.integration.support import LineReader, RealDockerTestCase


class DockerCLIThroughAgentTests(RealDockerTestCase, SynchronousTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.ticker = cls.agent.docker(
            "run", "-d", "busybox:local", "sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"
        ).stdout.strip()

    @classmethod
    def tearDownClass(cls) -> None:
        ticker = cls.__dict__.get("ticker")
        if cls.agent is not None and ticker is not None:
            cls.agent.docker("rm", "-f", ticker, check=False)
        super().tearDownClass()

    def test_ps_lists_containers(self) -> None:
        out = self.agent.docker("ps", "--no-trunc", "--format", "{{.ID}}").stdout.split()
        self.assertIn(self.ticker, out)

    def test_run_prints_output_and_propagates_exit_code(self) -> None:
        result = self.agent.docker("run", "--rm", "busybox:local", "sh", "-c", "echo hello-run; exit 7", check=False)
        self.assertEqual((result.returncode, result.stdout), (7, "hello-run\n"))

    def test_run_interactive_with_stdin(self) -> None:
        result = self.agent.docker("run", "-i", "--rm", "busybox:local", "sh", "-c", "cat; exit 3",
                                   input="from stdin\n", check=False)
        self.assertEqual((result.returncode, result.stdout), (3, "from stdin\n"))

    def test_logs_follow_streams_while_container_runs(self) -> None:
        proc = subprocess.Popen(["docker", "--tls", "logs", "-f", "--tail", "0", self.ticker],
                                stdout=subprocess.PIPE, env=self.agent.docker_env())
        try:
            # The ticker prints a line every 0.2 s and never ends: lines come only if the
            # agent relays them as they are printed (a buffered stream would never end).
            lines = LineReader(proc.stdout)
            first, second = lines.readline(timeout=10), lines.readline(timeout=10)
            self.assertTrue(first and first.startswith(b"tick "), first)
            self.assertTrue(second and second.startswith(b"tick "), second)
            self.assertEqual(int(second.split()[1]), int(first.split()[1]) + 1)
            self.assertIsNone(proc.poll())
        finally:
            proc.kill()
            proc.wait(10)

    def test_exec_with_piped_stdin_half_close(self) -> None:
        payload = os.urandom(1 << 20).hex()  # 2 MiB of text
        result = self.agent.docker("exec", "-i", self.ticker, "sh", "-c", "md5sum", input=payload)
        self.assertEqual(result.stdout.split()[0], hashlib.md5(payload.encode()).hexdigest())

    def test_exec_stdout_stderr_and_exit_code(self) -> None:
        result = self.agent.docker("exec", self.ticker, "sh", "-c", "echo out; echo err >&2; exit 4", check=False)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (4, "out\n", "err\n"))

    def test_exec_interactive_tty(self) -> None:
        command = f"docker --tls exec -it {self.ticker} sh -c 'tty; echo tty-ok'"
        result = subprocess.run(["script", "-qec", command, "/dev/null"], stdin=subprocess.DEVNULL,
                                capture_output=True, env=self.agent.docker_env(), timeout=60)
        out = result.stdout.decode(errors="replace")
        self.assertIn("/dev/pts/", out)
        self.assertIn("tty-ok", out)
        self.assertEqual(result.returncode, 0, out)

    def test_attach_receives_output(self) -> None:
        proc = subprocess.Popen(["docker", "--tls", "attach", "--no-stdin", self.ticker],
                                stdout=subprocess.PIPE, env=self.agent.docker_env())
        try:
            line = LineReader(proc.stdout).readline(timeout=10)  # a broken attach fails, not hangs
            self.assertTrue(line and line.startswith(b"tick "), line)
        finally:
            proc.kill()
            proc.wait(10)

    def test_cp_both_ways_is_byte_identical(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp, "blob")
            source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
            self.agent.docker("cp", str(source), f"{self.ticker}:/blob")
            self.agent.docker("cp", f"{self.ticker}:/blob", str(Path(tmp, "back")))
            self.assertEqual(Path(tmp, "back").read_bytes(), source.read_bytes())

    def test_build_with_local_base_image(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "Dockerfile").write_text("FROM busybox:local\nCOPY data /payload.bin\nRUN echo built > /built\n")
            Path(tmp, "data").write_bytes(os.urandom(2 * 1024 * 1024))
            self.agent.docker("build", "-q", "-t", "agent-built:1", tmp, env={"DOCKER_BUILDKIT": "0"}, timeout=180)
            result = self.agent.docker("run", "--rm", "agent-built:1", "sh", "-c", "cat /built; wc -c < /payload.bin")
            self.assertEqual(result.stdout.split(), ["built", str(2 * 1024 * 1024)])

    def test_save_and_load(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp, "image.tar")
            self.agent.docker("tag", "busybox:local", "agent-saved:1")
            self.agent.docker("save", "-o", str(archive), "agent-saved:1")
            self.assertGreater(archive.stat().st_size, 500_000)
            self.agent.docker("rmi", "agent-saved:1")
            out = self.agent.docker("load", "-i", str(archive)).stdout
            self.assertIn("agent-saved:1", out)
            self.agent.docker("image", "inspect", "agent-saved:1")

    def test_events_stream(self) -> None:
        proc = subprocess.Popen(["docker", "--tls", "events", "--filter", "type=container", "--filter", "event=create",
                                 "--format", "{{.Action}} {{.Actor.Attributes.name}}"],
                                stdout=subprocess.PIPE, env=self.agent.docker_env())
        created: list[str] = []

        def create(name: str) -> None:
            created.append(name)
            self.agent.docker("create", "--name", name, "busybox:local", "true")

        try:
            lines = LineReader(proc.stdout)
            # A create made before the events request reached Docker is not reported: create
            # until one is (the stream is then up), then one more, which must arrive live.
            line = None
            while line is None:
                self.assertLess(len(created), 20, "no event came through the agent")
                create(f"evented-{len(created)}")
                line = lines.readline(timeout=1)
            self.assertRegex(line, rb"^create evented-\d+\n$")
            create("evented-live")
            seen = [line]
            while seen[-1] != b"create evented-live\n":
                line = lines.readline(timeout=10)
                self.assertTrue(line, f"the stream stalled or ended after {seen}")
                assert line is not None
                seen.append(line)
            self.assertIsNone(proc.poll())
        finally:
            proc.kill()
            proc.wait(10)
            for name in created:
                self.agent.docker("rm", "-f", name, check=False)

    def test_docker_py_client(self) -> None:
        client = docker_client(f"tcp://127.0.0.1:{self.agent.port}", self.agent.headers)
        try:
            self.assertIn(self.ticker, [c.id for c in client.containers.list()])
            out = client.containers.run("busybox:local", ["sh", "-c", "echo via-docker-py"], remove=True)
            self.assertEqual(out, b"via-docker-py\n")
            code, output = client.containers.get(self.ticker).exec_run(["sh", "-c", "echo a; echo b >&2"], demux=True)
            self.assertEqual((code, output), (0, (b"a\n", b"b\n")))
            socket = client.api.attach_socket(self.ticker, params={"stdout": 1, "stream": 1})
            raw = socket._sock if hasattr(socket, "_sock") else socket
            raw.settimeout(10)
            data = b""
            while b"tick" not in data:
                chunk = raw.recv(4096)
                if not chunk:
                    break
                data += chunk
            raw.close()
            self.assertIn(b"tick", data)
        finally:
            client.close()
