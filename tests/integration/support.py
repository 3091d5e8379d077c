"""Real things for end-to-end tests: one dockerd for the test session and agent
processes started from the real entry point (``python -m portainer_agent``).

Blocking helpers (subprocess, http.client): the agent runs in its own process, so
tests drive it like any client would.
"""
from __future__ import annotations

import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from portainer_agent.testing.classfixture import ClassFixture
from portainer_agent.testing.tls import unverified_tls
from portainer_agent.testing.gates import Need, require
from portainer_agent.testing.polling import wait_for
from portainer_agent.testing.ports import wait_for_bound_port
from portainer_agent.testing.signing import PortainerSigner, write_docker_config

_daemon: Any = None
#: Where an agent started here writes the ports it bound (``--ports-file``), in its work directory.
PORTS_FILE = "ports.json"
#: The shared daemon's name (its hostname, and so ``docker info``'s Name).
SHARED_DAEMON_NAME = "itnode"


def shared_daemon() -> Any:
    """One real dockerd (own network namespace) with busybox:local, for the session."""
    global _daemon
    if _daemon is None:
        from portainer_agent.lab.dockerd import DockerDaemon, make_workdir

        _daemon = DockerDaemon.start(make_workdir("it"), SHARED_DAEMON_NAME)
        _daemon.import_busybox()
        atexit.register(_stop_daemon)
    return _daemon


def _stop_daemon() -> None:
    global _daemon
    if _daemon is not None:
        try:
            _daemon.stop()
        finally:
            _daemon = None


class AgentProcess:
    """A real agent process on 127.0.0.1 with its own data dir and log file.

    Started on port 0, it writes the port it bound to ``ports.json`` (``--ports-file``);
    :meth:`wait_ready` reads it (until then ``port`` is None unless one was given)."""

    def __init__(self, proc: subprocess.Popen, port: int | None, workdir: Path, signer: PortainerSigner) -> None:
        self.proc = proc
        self.port = port
        self.workdir = workdir
        self.signer = signer
        self.headers = signer.headers()
        self.docker_config = workdir / "docker-config"
        write_docker_config(self.docker_config, self.headers)

    @classmethod
    def start(cls, socket_path: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
              wait: bool = True, timeout: float = 20) -> "AgentProcess":
        workdir = Path(tempfile.mkdtemp(prefix="pa-agent-"))
        command = [sys.executable, "-m", "portainer_agent", "--docker-host", f"unix://{socket_path}",
                   "--host", "127.0.0.1", "--port", "0", "--ports-file", str(workdir / PORTS_FILE),
                   "--data-dir", str(workdir / "data"), "--log-level", "DEBUG", *args]
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "DOCKER_"))}
        environ.update(env or {})
        log = open(workdir / "agent.log", "wb")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ)
        log.close()
        agent = cls(proc, None, workdir, PortainerSigner.generate())
        if wait:
            agent.wait_ready(timeout)
        return agent

    @property
    def log_text(self) -> str:
        return (self.workdir / "agent.log").read_text(errors="replace")

    def check_running(self) -> None:
        """Raise (with the log) when the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_text}")

    def bound_port(self, name: str, timeout: float = 20) -> int:
        """The port the agent bound for ``name`` (``api``, ``metrics``, ``cluster``)."""
        return wait_for_bound_port(self.workdir / PORTS_FILE, name, timeout, self.check_running,
                                   describe=lambda: self.log_text)

    def answers_ping(self) -> bool:
        """True once the agent answers ``/ping``; raises when the process has exited."""
        self.check_running()
        try:
            return self.request("GET", "/ping", signed=False, timeout=2)[0] == 204
        except OSError:
            return False

    def wait_ready(self, timeout: float = 20) -> None:
        if self.port is None:
            self.port = self.bound_port("api", timeout)
        wait_for(self.answers_ping, timeout, "the agent to answer /ping", interval=0.1,
                 describe=lambda: self.log_text)

    def connection(self, timeout: float = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=unverified_tls())

    def request(self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
                signed: bool = True, timeout: float = 30) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = self.connection(timeout)
        try:
            all_headers = dict(self.headers) if signed else {}
            all_headers.update(headers or {})
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        status, _, body = self.request(method, path, **kwargs)
        assert 200 <= status < 300, (status, body)
        return json.loads(body)

    def docker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(DOCKER_HOST=f"tcp://127.0.0.1:{self.port}", DOCKER_TLS="1",
                   DOCKER_CONFIG=str(self.docker_config), DOCKER_CERT_PATH=str(self.docker_config))
        return env

    def docker(self, *args: str, input: bytes | str | None = None, check: bool = True, timeout: float = 60,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """The real docker CLI through this agent (TLS, signed headers from config.json)."""
        environ = self.docker_env()
        environ.update(env or {})
        text = not isinstance(input, bytes)
        result = subprocess.run(["docker", "--tls", *args], input=input, capture_output=True, text=text,
                                env=environ, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class LineReader:
    """Lines from a subprocess pipe, each awaited under a deadline (a stream that stops
    flowing fails the test on the deadline instead of hanging it)."""

    def __init__(self, pipe: Any) -> None:
        self._fd = pipe.fileno()
        self._buffer = b""

    def readline(self, timeout: float) -> bytes | None:
        """The next line (with its newline), or None when none came within ``timeout``
        seconds; b"" at the end of the stream."""
        import select

        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([self._fd], [], [], remaining)
            if not readable:
                continue
            data = os.read(self._fd, 65536)
            if not data:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class UnixRelay:
    """A unix-socket relay in front of the Docker socket that a test can cut and
    restore, to make "Docker went away" real (connections drop, dials are refused)."""

    def __init__(self, target: str, path: str) -> None:
        self.target = target
        self.path = path
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        import threading

        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:
            return

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns = []
        if os.path.exists(self.path):
            os.unlink(self.path)


class RealDockerTestCase(ClassFixture):
    """Mixin for trial test cases needing the session's real dockerd (``cls.daemon``)
    and, when ``class_agent`` is true, one agent process shared by the class
    (``cls.agent``). Skips with the reason when the machine cannot run dockerd.
    Works under trial's runner too (:class:`ClassFixture`)."""

    class_agent = True
    daemon: Any
    agent: "AgentProcess | None" = None

    @classmethod
    def setUpClass(cls) -> None:
        require(Need.ROOT, Need.DOCKERD)
        super().setUpClass()
        cls.daemon = shared_daemon()
        if cls.class_agent:
            cls.agent = AgentProcess.start(cls.daemon.socket_path)

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.agent is not None:
            cls.agent.cleanup()
            cls.agent = None
        super().tearDownClass()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def socket_request(socket_path: str, method: str, path: str, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """One request straight to a Docker socket (what the node's Docker says, no agent)."""
    connection = _UnixHTTPConnection(socket_path, timeout)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
