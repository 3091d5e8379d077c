"""Blocking clients for a lab agent that the lab tests and the soak bench share: a kept-alive
signed HTTPS connection, and raw upgraded (``exec``/``attach``) streams on their own TLS
socket, which a test can read to the end or cut the way docker-py cancels one (TCP closed
without a TLS close_notify).

Everything here is bounded: every socket has a timeout and every read loop a deadline.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from typing import Any, Mapping

import attrs

from portainer_agent.lab.harness import AgentResponse
from portainer_agent.testing.tls import unverified_tls

TARGET = "X-PortainerAgent-Target"


class AgentConnection:
    """One kept-alive signed HTTPS connection to an agent, reopened after any error (so one
    failure costs one request, not the connection's next ones)."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str], timeout: float = 15.0) -> None:
        self.host, self.port, self.headers, self.timeout = host, port, dict(headers), timeout
        self._connection: http.client.HTTPSConnection | None = None

    def request(self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> AgentResponse:
        """One request; raises ``OSError``/``http.client.HTTPException`` when the agent does
        not answer within ``timeout`` (the connection is then dropped)."""
        all_headers = {**self.headers, **(headers or {})}
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        if self._connection is None:
            self._connection = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                           context=unverified_tls())
        connection = self._connection
        try:
            if timeout is not None:
                connection.timeout = timeout
                if connection.sock is not None:
                    connection.sock.settimeout(timeout)
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            data = response.read()
            if response.will_close:
                self.close()
            elif timeout is not None and connection.sock is not None:
                connection.sock.settimeout(self.timeout)
            return AgentResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class UpgradeRefused(Exception):
    """The agent answered an upgrade request with something other than ``101``."""

    def __init__(self, status_line: str, head: bytes) -> None:
        super().__init__(f"{status_line}: {head[:300]!r}")
        self.status_line = status_line


@attrs.define(eq=False)
class HijackedStream:
    """An upgraded Docker stream (``101 UPGRADED``) on its own TLS socket."""

    sock: ssl.SSLSocket
    data: bytes = b""  # what came after the response head so far

    @property
    def local_port(self) -> int:
        """The client's port: how the agent's netns names this connection (``ss``)."""
        return int(self.sock.getsockname()[1])

    def read_to_end(self, timeout: float = 30.0) -> bytes:
        """Read until the agent closes the stream; raises ``TimeoutError`` at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the stream was still open after {timeout}s; got {self.data[-200:]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ssl.SSLError as error:  # an unclean TLS end after the data: the end all the same
                if "EOF" in str(error) or "UNEXPECTED_EOF" in str(error):
                    return self.data
                raise
            except socket.timeout:
                continue
            if not chunk:
                return self.data
            self.data += chunk

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cancel(self) -> None:
        """Close TCP without a TLS close_notify, as docker-py's cancelled attach does."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def hijack(host: str, port: int, path: str, headers: Mapping[str, str], body: Any = None,
           timeout: float = 15.0) -> HijackedStream:
    """``POST path`` with ``Connection: Upgrade``/``Upgrade: tcp`` on a new TLS socket; the
    stream once the agent answered ``101``. Raises :class:`UpgradeRefused` otherwise and
    ``OSError`` when the agent does not answer within ``timeout``."""
    payload = json.dumps(body).encode() if body is not None else b""
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        sock = unverified_tls().wrap_socket(raw)
    except BaseException:
        raw.close()
        raise
    try:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Connection: Upgrade", "Upgrade: tcp",
                 "Content-Type: application/json", f"Content-Length: {len(payload)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        deadline = time.monotonic() + timeout
        data = b""
        while b"\r\n\r\n" not in data:
            if time.monotonic() > deadline:
                raise socket.timeout(f"no upgrade answer to POST {path} within {timeout}s")
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(f"the agent closed the connection before answering POST {path}: {data!r}")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if not status_line.startswith("HTTP/1.1 101"):
            raise UpgradeRefused(status_line, data)
        return HijackedStream(sock, rest)
    except BaseException:
        sock.close()
        raise


def docker_payload(data: bytes) -> bytes:
    """The payload of a multiplexed (non-tty) Docker stream, frame headers removed."""
    out, offset = bytearray(), 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset + 4:offset + 8], "big")
        out += data[offset + 8:offset + 8 + size]
        offset += 8 + size
    return bytes(out)
