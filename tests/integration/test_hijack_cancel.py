"""A client that cancels a hijacked stream (exec, attach; tty or not) by closing TCP
without a TLS close_notify, as docker-py's ``test_attach_stream_and_cancel`` does:
the agent must let go of both the client socket and the Docker socket (its open
descriptors, ``/proc/PID/fd``, return to where they were)."""
from __future__ import annotations

import json
import os
import socket
import ssl

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.testing.polling import wait_for

from portainer_agent.testing.tls import unverified_tls
from tests.integration.support import RealDockerTestCase

DEADLINE = 15.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class HijackCancelTests(RealDockerTestCase, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()  # brings the class fixture (the agent) up under trial's runner
        assert self.agent is not None
        self.pid = self.agent.proc.pid
        self.containers: list[str] = []
        self.addCleanup(self._remove_containers)
        # Warm up: the pooled Docker connection and the listener are there for good.
        self.sleeper = self.run_container(tty=False, cmd=["sleep", "300"], stdin=False)
        self.start(self.sleeper)
        self.exec_create(self.sleeper, ["true"], tty=False)
        self.baseline = open_fds(self.pid)

    def _remove_containers(self) -> None:
        for container in self.containers:
            self.agent.request("DELETE", f"/v1.41/containers/{container}?force=1")

    def run_container(self, tty: bool, cmd: list[str], stdin: bool) -> str:
        status, _, body = self.agent.request("POST", "/v1.41/containers/create", body=json.dumps({
            "Image": "busybox:local", "Cmd": cmd, "Tty": tty, "OpenStdin": stdin, "StdinOnce": stdin,
            "AttachStdin": stdin, "AttachStdout": True, "AttachStderr": True,
        }).encode(), headers={"Content-Type": "application/json"})
        self.assertEqual(status, 201, body)
        container = json.loads(body)["Id"]
        self.containers.append(container)
        return container

    def start(self, container: str) -> None:
        status, _, body = self.agent.request("POST", f"/v1.41/containers/{container}/start")
        self.assertEqual(status, 204, body)

    def exec_create(self, container: str, cmd: list[str], tty: bool) -> str:
        status, _, body = self.agent.request("POST", f"/v1.41/containers/{container}/exec", body=json.dumps({
            "Cmd": cmd, "Tty": tty, "AttachStdin": True, "AttachStdout": True, "AttachStderr": True,
        }).encode(), headers={"Content-Type": "application/json"})
        self.assertEqual(status, 201, body)
        return str(json.loads(body)["Id"])

    def hijack(self, path: str, body: bytes = b"") -> ssl.SSLSocket:
        """A raw TLS connection with the upgrade answered (101) and some output read."""
        assert self.agent is not None
        raw = socket.create_connection(("127.0.0.1", self.agent.port), timeout=10)
        sock = unverified_tls().wrap_socket(raw)
        headers = [f"POST {path} HTTP/1.1", "Host: agent", "Connection: Upgrade", "Upgrade: tcp",
                   "Content-Type: application/json", f"Content-Length: {len(body)}"]
        headers += [f"{name}: {value}" for name, value in self.agent.headers.items()]
        sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            self.assertTrue(chunk, data)
            data += chunk
        self.assertTrue(data.startswith(b"HTTP/1.1 101"), data)
        return sock

    def read_until(self, sock: ssl.SSLSocket, marker: bytes) -> None:
        data = b""
        while marker not in data:
            chunk = sock.recv(4096)
            self.assertTrue(chunk, data)
            data += chunk

    def cancel(self, sock: ssl.SSLSocket) -> None:
        """Close TCP without close_notify (``SSLSocket.shutdown`` is the TCP shutdown)."""
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def assertDescriptorsReturn(self, what: str) -> None:
        def held() -> str:
            links = sorted(os.readlink(f"/proc/{self.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{self.pid}/fd"))
            return f"agent holds {open_fds(self.pid)} fds, baseline {self.baseline}: {links}"

        wait_for(lambda: open_fds(self.pid) <= self.baseline, DEADLINE, f"{what}: descriptors back to baseline",
                 describe=held)

    def exec_and_cancel(self, tty: bool, cmd: list[str]) -> None:
        exec_id = self.exec_create(self.sleeper, cmd, tty)
        sock = self.hijack(f"/v1.41/exec/{exec_id}/start", json.dumps({"Detach": False, "Tty": tty}).encode())
        self.read_until(sock, b"ready")
        self.cancel(sock)
        self.assertDescriptorsReturn(f"exec tty={tty} {cmd}")

    def test_exec_reading_stdin_cancelled(self) -> None:
        # The cancel reaches cat as EOF: Docker ends the stream, the agent must not wait
        # for a close_notify from a client that has closed TCP.
        for tty in (False, True):
            self.exec_and_cancel(tty, ["sh", "-c", "echo ready; cat"])

    def test_exec_with_endless_output_cancelled(self) -> None:
        for tty in (False, True):
            self.exec_and_cancel(tty, ["sh", "-c", "echo ready; while true; do echo more; usleep 20000; done"])

    def test_attach_cancelled(self) -> None:
        for tty in (False, True):
            container = self.run_container(tty, ["sh", "-c", "while true; do echo ready; usleep 100000; done"],
                                           stdin=True)
            sock = self.hijack(f"/v1.41/containers/{container}/attach?stream=1&stdin=1&stdout=1&stderr=1")
            self.start(container)
            self.read_until(sock, b"ready")
            self.cancel(sock)
            self.assertDescriptorsReturn(f"attach tty={tty}")

    def test_repeated_cancels_leave_nothing(self) -> None:
        for _ in range(5):
            self.exec_and_cancel(False, ["sh", "-c", "echo ready; cat"])
        self.assertLessEqual(open_fds(self.pid), self.baseline)
