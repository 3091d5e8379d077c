"""Agent-made errors, raised inside and translated once, at the HTTP edge, into the
Docker-style JSON body ``{"message": ..., "details": ...}`` that Docker clients and
Portainer display."""
from __future__ import annotations

import json

import attrs


@attrs.frozen
class AgentError(Exception):
    """An error the agent answers itself, with an HTTP status."""

    status: int
    message: str
    details: str = ""

    def __str__(self) -> str:
        return f"{self.status} {self.message}: {self.details}"

    def body(self) -> bytes:
        return json.dumps({"message": self.message, "details": self.details or self.message}).encode() + b"\n"


def not_found(path: str) -> AgentError:
    return AgentError(404, "page not found", f"no agent route for {path}")


def bad_gateway_docker(socket_path: str, reason: str) -> AgentError:
    """Docker socket unreachable: named so an operator knows what to look at."""
    return AgentError(502, f"Unable to proxy the request via the Docker socket {socket_path}", reason)
