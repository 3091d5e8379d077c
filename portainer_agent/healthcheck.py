"""``portainer-agent healthcheck``: is the agent on this machine healthy? (exit 0 or 1)

Made for the image's ``HEALTHCHECK`` and for humans: it reads the same options and
environment variables as the agent, so it probes what the agent was told to serve:

* the API answers ``GET /ping`` with 204 over TLS on ``--host``/``--port`` (a wildcard
  host is probed on loopback; the certificate is self-signed, so it is not verified:
  the check is liveness, not identity); an agent with ``--tls-ca`` (mutual TLS) is
  shown ``--healthcheck-cert``/``--healthcheck-key``, a client certificate that CA signed;
* Docker answers ``GET /_ping`` on ``--docker-host``, the socket the agent uses.

Failure: one line saying what failed, exit 1. Blocking standard-library I/O: a
one-shot command has no use for a reactor.
"""
from __future__ import annotations

import http.client
import ssl
import sys
from pathlib import Path
from typing import IO, Mapping, Sequence

from twisted.python import usage

from portainer_agent.config import Config
from portainer_agent.docker.blocking import get_json_blocking
from portainer_agent.docker.wire import ProtocolError

TIMEOUT = 4.0


def probe_host(host: str) -> str:
    """Where to reach an agent listening on ``host`` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def check_api(host: str, port: int, timeout: float = TIMEOUT, client: tuple[Path, Path] | None = None) -> str | None:
    """None when the API answers ``/ping`` with 204, else what went wrong; ``client``: the
    (certificate, key) to present to an agent that requires one."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if client is not None:
        try:
            context.load_cert_chain(str(client[0]), str(client[1]))
        except (OSError, ssl.SSLError) as error:
            return f"client certificate {client[0]} (key {client[1]}): {error}"
    target = probe_host(host)
    shown = f"[{target}]:{port}" if ":" in target else f"{target}:{port}"
    connection = http.client.HTTPSConnection(target, port, timeout=timeout, context=context)
    try:
        connection.request("GET", "/ping")
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as error:
        return f"agent API https://{shown}/ping: {error or type(error).__name__}"
    finally:
        connection.close()
    if response.status != 204:
        return f"agent API https://{shown}/ping answered {response.status}, expected 204"
    return None


def check_docker(socket_path: str, timeout: float = TIMEOUT) -> str | None:
    """None when Docker answers ``/_ping`` with 200 on ``socket_path`` (through the agent's
    one Docker client, its blocking start-up form)."""
    try:
        code, _ = get_json_blocking(socket_path, "/_ping", timeout)
    except (OSError, ProtocolError) as error:
        return f"Docker at unix://{socket_path}: {error or type(error).__name__}"
    if code != 200:
        return f"Docker at unix://{socket_path} answered /_ping with {code}"
    return None


def run(config: Config, timeout: float = TIMEOUT) -> str | None:
    """The first failure, or None when the agent is healthy."""
    client = ((config.healthcheck_cert, config.healthcheck_key)
              if config.healthcheck_cert is not None and config.healthcheck_key is not None else None)
    return check_api(config.host, config.port, timeout, client) or check_docker(config.docker_socket_path, timeout)


def main(argv: Sequence[str], environ: Mapping[str, str], out: IO[str] | None = None) -> int:
    from portainer_agent.options import AgentOptions, report_usage_error

    options = AgentOptions(environ)
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as error:
        return report_usage_error(error, "portainer-agent healthcheck")
    assert options.config is not None
    failure = run(options.config)
    stream = out if out is not None else sys.stderr
    if failure is not None:
        print(f"unhealthy: {failure}", file=stream)
        return 1
    print("healthy", file=out if out is not None else sys.stdout)
    return 0
