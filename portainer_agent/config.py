"""The agent's configuration: one immutable record built once from options.

Configuration flows one way: command-line flags and environment variables are parsed
by :mod:`portainer_agent.options` into a :class:`Config`, which is handed to the
services that need it. Nothing else reads ``os.environ``.
"""
from __future__ import annotations

import os
from pathlib import Path

import attrs


def default_data_dir() -> Path:
    """Per-user default: ``$XDG_STATE_HOME/portainer-agent`` or ``~/.local/state/portainer-agent``.

    The container image sets ``AGENT_DATA_DIR=/data``.
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "portainer-agent"


@attrs.frozen
class Config:
    """Everything the agent was told to do. Durations are seconds (floats)."""

    host: str = "0.0.0.0"
    port: int = 9001
    #: Where to write the bound ports (JSON, by listener name) once listening; None: nowhere.
    ports_file: Path | None = None
    docker_host: str = "unix:///var/run/docker.sock"
    data_dir: Path = attrs.field(factory=default_data_dir)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    keep_cert: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    shutdown_grace: float = 5.0

    # security (issue 4)
    secret: str | None = None
    secret_timeout: float = 72 * 3600.0

    # cluster (issue 5)
    cluster_addr: str | None = None
    advertise_addr: str | None = None
    cluster_port: int = 9002
    cluster_key: bytes | None = None
    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    #: How often ``docker info`` is re-read for a changed role or leader flag.
    identity_refresh_interval: float = 5.0

    # browse (later issue)
    host_management: bool = False
    #: Where the host's ``<DockerRootDir>/volumes`` is mounted for the agent (None: same path).
    volumes_root: Path | None = None
    #: The host's ``/`` as mounted for the agent: host browsing and /host/info stay beneath it.
    host_root: Path = Path("/host")
    #: Largest ``/browse/put`` request body in bytes (413 above it); 0: no limit.
    browse_max_upload: int = 0

    # cluster routing (issue 8)
    peer_timeout: float = 5.0
    peer_response_timeout: float = 120.0
    aggregate_timeout: float = 10.0
    #: Largest answer one node may give to an aggregated list (bytes).
    aggregate_max_bytes: int = 64 * 1024 * 1024
    #: Answer this node's lists from memory, kept exact by Docker's event stream (issue 16).
    list_cache: bool = True
    #: Bytes of list answers the cache may hold (and, apart, of peers' answers kept for 304s).
    list_cache_max_bytes: int = 64 * 1024 * 1024
    # operations (issue 11)
    metrics_addr: tuple[str, int] | None = None
    tls_handshake_timeout: float = 10.0
    header_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_connections: int = 4096
    #: The client certificate and key ``portainer-agent healthcheck`` presents (mutual TLS).
    healthcheck_cert: Path | None = None
    healthcheck_key: Path | None = None

    # console (issue 10)
    console_ping_interval: float = 30.0

    @property
    def docker_socket_path(self) -> str:
        """Filesystem path of the Docker unix socket (``DOCKER_HOST=unix://...``)."""
        return self.docker_host[len("unix://"):] if self.docker_host.startswith("unix://") else self.docker_host
