"""Command-line flags and environment variables -> :class:`~portainer_agent.config.Config`.

Every option is both a flag and an environment variable; the flag wins. The table
below is the single place where options are declared: ``--help`` shows each option's
environment variable and default from it, and the parsing/validation is driven by it.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs
from twisted.python import usage

from portainer_agent.config import Config

#: What ``--help`` and the README show for --data-dir: the rule, not this machine's path.
DATA_DIR_DEFAULT_TEXT = "$XDG_STATE_HOME/portainer-agent, else ~/.local/state/portainer-agent (image: /data)"
from portainer_agent.durations import parse_go_duration

LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
LOG_FORMATS = ("text", "json")


def _port(text: str) -> int:
    """A port to listen on; 0 lets the kernel pick a free one (logged, and in ``--ports-file``)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"port out of range (0-65535): {value}")
    return value


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None


def _docker_host(text: str) -> str:
    if not text.startswith("unix://") or len(text) <= len("unix://"):
        raise ValueError(f"only unix:// Docker hosts are supported, got {text!r}")
    return text


def _log_level(text: str) -> str:
    value = text.strip().upper()
    if value == "WARNING":
        value = "WARN"
    if value not in LOG_LEVELS:
        raise ValueError(f"unknown log level {text!r} (one of {', '.join(LOG_LEVELS)})")
    return value


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"unknown log format {text!r} (text or json)")
    return value


def _duration(text: str) -> float:
    return parse_go_duration(text)


def _positive_duration(text: str) -> float:
    value = parse_go_duration(text)
    if value <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return value


def _path(text: str) -> Path:
    if not text:
        raise ValueError("empty path")
    return Path(text).expanduser()


def _absolute_path(text: str) -> Path:
    path = _path(text)
    if not path.is_absolute():
        raise ValueError(f"not an absolute path: {text!r}")
    return path


def _existing_file(text: str) -> Path:
    path = _path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    return path


def _text(text: str) -> str:
    if text == "":
        raise ValueError("empty value")
    return text


def _listen_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) for a plain-HTTP listener such as the metrics one."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    return _ip(host.strip("[]")), _port(port)


_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def _byte_size(text: str) -> int:
    """``67108864``, ``64MiB``, ``64m``, ``512KiB``, ``1GiB`` (units are powers of 1024)."""
    stripped = text.strip()
    digits = stripped.rstrip("bBkKmMgGiI ")
    unit = stripped[len(digits):].strip().lower()
    if not digits.isdigit() or unit not in _BYTE_UNITS:
        raise ValueError(f"not a size (e.g. 64MiB): {text!r}")
    value = int(digits, 10) * _BYTE_UNITS[unit]
    if value < 1:
        raise ValueError(f"must be at least 1 byte: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1: {value}")
    return value


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(text: str) -> int:
    """Bytes: a whole number, optionally with a binary unit (``512M``, ``10G``, ``1GiB``); 0 allowed."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    number = value[: len(value) - len(unit)].strip()
    if not number.isdigit():
        raise ValueError(f"not a size: {text!r} (bytes, or with K, M, G or T)")
    return int(number) * _SIZE_UNITS[unit]


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1 or 0)")


@attrs.frozen
class OptionSpec:
    """One option: its flag, environment variable, Config field and parser."""

    flag: str
    env: str
    field: str
    parse: Callable[[str], Any]
    help: str
    default_text: str
    takes_value: bool = True


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("host", "AGENT_HOST", "host", _ip, "address the agent API listens on", "0.0.0.0"),
    OptionSpec("port", "AGENT_PORT", "port", _port, "agent API port (HTTPS; 0: a free port the kernel picks)", "9001"),
    OptionSpec("ports-file", "AGENT_PORTS_FILE", "ports_file", _absolute_path, "write the bound ports here as one JSON object (api, cluster, metrics) as they are bound", "none"),
    OptionSpec("docker-host", "DOCKER_HOST", "docker_host", _docker_host, "Docker API socket", "unix:///var/run/docker.sock"),
    OptionSpec("data-dir", "AGENT_DATA_DIR", "data_dir", _path, "where the agent keeps its TLS key and state", DATA_DIR_DEFAULT_TEXT),
    OptionSpec("tls-cert", "AGENT_TLS_CERT", "tls_cert", _existing_file, "PEM certificate for the API (else self-signed, made at start)", "generated"),
    OptionSpec("tls-key", "AGENT_TLS_KEY", "tls_key", _existing_file, "PEM private key for --tls-cert", "generated"),
    OptionSpec("tls-ca", "AGENT_TLS_CA", "tls_ca", _existing_file, "PEM CA: require client certificates signed by it (mutual TLS)", "none"),
    OptionSpec("keep-cert", "AGENT_TLS_KEEP_CERT", "keep_cert", _flag, "reuse the generated certificate in --data-dir across restarts (1/0)", "0"),
    OptionSpec("log-level", "LOG_LEVEL", "log_level", _log_level, "DEBUG, INFO, WARN or ERROR (any case)", "INFO"),
    OptionSpec("log-format", "LOG_FORMAT", "log_format", _log_format, "text, or json (one object a line)", "text"),
    OptionSpec("shutdown-grace", "AGENT_SHUTDOWN_GRACE", "shutdown_grace", _duration, "how long in-flight requests may run after SIGTERM", "5s"),
    OptionSpec("secret", "AGENT_SECRET", "secret", _text, "shared secret: accept any Portainer key signing it (secret mode)", "none"),
    OptionSpec("secret-timeout", "AGENT_SECRET_TIMEOUT", "secret_timeout", _duration, "close the API if no Portainer paired within this time (0: never)", "72h"),
    OptionSpec("cluster-addr", "AGENT_CLUSTER_ADDR", "cluster_addr", _text, "name or address[:port] of agents to join", "tasks.<service> when run as a Swarm task"),
    OptionSpec("advertise-addr", "AGENT_ADVERTISE_ADDR", "advertise_addr", _ip, "address other agents reach this one at", "detected"),
    OptionSpec("cluster-port", "AGENT_CLUSTER_PORT", "cluster_port", _port, "cluster membership port (AMP over TLS; 0: a free port)", "9002"),
    OptionSpec("cluster-key", "AGENT_CLUSTER_KEY", "cluster_key", lambda t: _text(t).encode(), "shared key authenticating cluster members", "derived from AGENT_SECRET"),
    OptionSpec("probe-interval", "AGENT_CLUSTER_PROBE_INTERVAL", "probe_interval", _positive_duration, "membership probe interval", "1s"),
    OptionSpec("probe-timeout", "AGENT_CLUSTER_PROBE_TIMEOUT", "probe_timeout", _positive_duration, "membership probe timeout", "500ms"),
    OptionSpec("identity-refresh", "AGENT_IDENTITY_REFRESH_INTERVAL", "identity_refresh_interval", _positive_duration, "how often the node's role and leader flag are re-read from Docker and spread to the cluster", "5s"),
    OptionSpec("host-management", "CAP_HOST_MANAGEMENT", "host_management", _flag, "allow /browse outside volumes (1/0)", "0"),
    OptionSpec("peer-timeout", "AGENT_PEER_TIMEOUT", "peer_timeout", _positive_duration, "connect timeout to another agent (established streams have none)", "5s"),
    OptionSpec("peer-response-timeout", "AGENT_PEER_RESPONSE_TIMEOUT", "peer_response_timeout", _duration, "deadline for another agent's response head, once the request is sent (0: none; streams have none once the head is in)", "2m"),
    OptionSpec("aggregate-timeout", "AGENT_AGGREGATE_TIMEOUT", "aggregate_timeout", _positive_duration, "per-node deadline of an aggregated list (containers, images, volumes, networks)", "10s"),
    OptionSpec("aggregate-max-bytes", "AGENT_AGGREGATE_MAX_BYTES", "aggregate_max_bytes", _byte_size, "largest answer one node may give to an aggregated list (e.g. 64MiB)", "64MiB"),
    OptionSpec("list-cache", "AGENT_LIST_CACHE", "list_cache", _flag, "answer this node's container/image/volume/network lists from memory, kept exact by Docker's events (on/off)", "on"),
    OptionSpec("list-cache-max-bytes", "AGENT_LIST_CACHE_MAX_BYTES", "list_cache_max_bytes", _byte_size, "memory the list cache may hold (and, apart, peers' lists kept for conditional requests)", "64MiB"),
    OptionSpec("volumes-root", "AGENT_VOLUMES_ROOT", "volumes_root", _absolute_path, "where <DockerRootDir>/volumes is mounted for the agent", "the same path"),
    OptionSpec("host-root", "AGENT_HOST_ROOT", "host_root", _absolute_path, "where the host's / is mounted: host browsing and /host/info stay beneath it", "/host"),
    OptionSpec("browse-max-upload", "AGENT_BROWSE_MAX_UPLOAD", "browse_max_upload", _size, "largest /browse/put body, e.g. 10G (0: no limit, as the original)", "0"),
    OptionSpec("console-ping", "AGENT_CONSOLE_PING_INTERVAL", "console_ping_interval", _duration, "websocket console keepalive ping interval (0: none)", "30s"),
    # operations (issue 11)
    OptionSpec("metrics-addr", "AGENT_METRICS_ADDR", "metrics_addr", _listen_address, "serve Prometheus metrics over plain HTTP on host:port (e.g. 127.0.0.1:9003; port 0: a free port)", "off"),
    OptionSpec("tls-handshake-timeout", "AGENT_TLS_HANDSHAKE_TIMEOUT", "tls_handshake_timeout", _positive_duration, "a client must finish its TLS handshake within this time", "10s"),
    OptionSpec("header-timeout", "AGENT_HEADER_TIMEOUT", "header_timeout", _positive_duration, "a request line and its headers must arrive within this time", "30s"),
    OptionSpec("idle-timeout", "AGENT_IDLE_TIMEOUT", "idle_timeout", _positive_duration, "close a kept-alive connection idle for this long", "60s"),
    OptionSpec("healthcheck-cert", "AGENT_HEALTHCHECK_CERT", "healthcheck_cert", _existing_file, "PEM client certificate `portainer-agent healthcheck` presents (for an agent with --tls-ca)", "none"),
    OptionSpec("healthcheck-key", "AGENT_HEALTHCHECK_KEY", "healthcheck_key", _existing_file, "PEM private key for --healthcheck-cert", "none"),
    OptionSpec("max-connections", "AGENT_MAX_CONNECTIONS", "max_connections", _positive_int, "refuse new API connections above this many open ones", "4096"),
)

_BY_FLAG = {spec.flag: spec for spec in OPTIONS}


def derive_cluster_key(secret: str) -> bytes:
    """Cluster key derived from ``AGENT_SECRET`` so one secret authenticates both
    Portainer and the agents' membership traffic (domain-separated by the label)."""
    return hmac.new(secret.encode(), b"portainer-agent cluster key v1", hashlib.sha256).hexdigest().encode()


def build_config(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> Config:
    """Pure: flag values (None when not given) and an environment -> Config.

    Raises ``usage.UsageError`` with a one-line message naming the flag/variable.
    """
    values: dict[str, Any] = {}
    for spec in OPTIONS:
        raw = flags.get(spec.flag)
        source = f"--{spec.flag}"
        if raw is None:
            raw = environ.get(spec.env)
            source = spec.env
            if raw is None or (raw == "" and spec.flag not in ("host-management", "keep-cert")):
                continue
        try:
            values[spec.field] = spec.parse(raw)
        except ValueError as error:
            raise usage.UsageError(f"invalid {source}: {error}") from None
    if ("tls_cert" in values) != ("tls_key" in values):
        raise usage.UsageError("--tls-cert and --tls-key must be given together")
    if ("healthcheck_cert" in values) != ("healthcheck_key" in values):
        raise usage.UsageError("--healthcheck-cert and --healthcheck-key must be given together")
    if values.get("cluster_key") is None and values.get("secret"):
        values["cluster_key"] = derive_cluster_key(values["secret"])
    return Config(**values)


def report_usage_error(error: Exception, program: str = "portainer-agent") -> int:
    """One line (and a hint) on stderr for a bad option; the exit status for it (2)."""
    import sys

    print(f"{program}: error: {error}", file=sys.stderr)
    print(f"{program}: try --help", file=sys.stderr)
    return 2


class AgentOptions(usage.Options):
    """``portainer-agent`` / ``twistd portainer-agent`` options (see :data:`OPTIONS`)."""

    synopsis = "[options]"
    longdesc = ("Every option is also an environment variable; the flag wins. "
                "`portainer-agent healthcheck [options]` checks a running agent (exit 0 or 1).")
    optParameters = [
        [spec.flag, None, None, f"{spec.help} [env {spec.env}; default {spec.default_text}]"]
        for spec in OPTIONS
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self.config: Config | None = None

    def postOptions(self) -> None:
        self.config = build_config({spec.flag: self.get(spec.flag) for spec in OPTIONS}, self._environ)
