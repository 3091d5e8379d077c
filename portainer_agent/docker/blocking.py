"""One blocking ``GET`` on the Docker socket, for the moments before (or without) a reactor.

The agent reads the node identity before anything listens, so that a missing Docker fails
the start with a clear message (:func:`~portainer_agent.docker.identity.fetch_identity_blocking`),
and the container healthcheck is a short-lived process that asks ``/_ping`` once
(:mod:`portainer_agent.healthcheck`). Both use :func:`get_json_blocking`: the same request
head and parser as the asynchronous client (:mod:`portainer_agent.docker.wire`) over a plain
socket, so this module needs neither Twisted nor the client.
"""
from __future__ import annotations

import json
import socket
from typing import Any

from portainer_agent.docker import wire
from portainer_agent.docker.wire import DOCKER_HOST, READ_SIZE, ProtocolError

__all__ = ["get_json_blocking"]


class _Collected:
    """A whole response, for the blocking reader (a :class:`wire.ResponseSink`)."""

    def __init__(self) -> None:
        self.code = 0
        self.chunks: list[bytes] = []

    def head(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.code = code

    def body(self, data: bytes) -> None:
        self.chunks.append(data)

    def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        pass

    def upgraded(self, rest: bytes) -> None:
        raise ProtocolError("unexpected 101 to a plain request")


def get_json_blocking(socket_path: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    """``GET path`` on the Docker socket, synchronously: (status, parsed JSON or None).

    For start-up only (before the reactor runs), so that a missing Docker fails the
    start with a clear message before anything listens. Same request head and parser
    as :class:`~portainer_agent.docker.client.DockerClient`; raises OSError or
    :class:`ProtocolError`."""
    collected = _Collected()
    reader = wire.ResponseReader(collected)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(wire.request_head(b"GET", path.encode("ascii"), DOCKER_HOST, [(b"Connection", b"close")]))
        while not reader.done:
            data = sock.recv(READ_SIZE)
            if not data:
                if not reader.eof():
                    raise ProtocolError(f"Docker closed the connection during GET {path}")
                break
            reader.feed(data)
    try:
        return collected.code, json.loads(b"".join(collected.chunks))
    except ValueError:
        return collected.code, None
