"""Where a volume's files are: its ``Mountpoint`` from Docker, seen from the agent.

The original built ``/var/lib/docker/volumes/<volumeID>/_data`` from an unvalidated
``volumeID``, which broke with a non-default Docker root, rootless Docker and some
volume drivers, and let ``volumeID=../..`` walk out. Here the volume must exist
(``GET /volumes/{name}``) and its ``Mountpoint`` is used; when the agent runs in a
container, ``--volumes-root`` maps the host's ``<DockerRootDir>/volumes`` prefix to
where that directory is mounted in the agent's container.
"""
from __future__ import annotations

from typing import Any, Generator
from urllib.parse import quote

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks

from portainer_agent.errors import AgentError
from portainer_agent.fs.jail import MAX_NAME


def check_volume_id(volume_id: str) -> str:
    """Pure: a ``volumeID`` that can only name a volume (no ``/``, ``..``, NUL)."""
    try:
        encoded = volume_id.encode("utf-8")  # a query's invalid UTF-8 arrives surrogate-escaped
    except UnicodeEncodeError:
        encoded = b"/"
    if (not volume_id or "/" in volume_id or "\\" in volume_id or "\x00" in volume_id
            or volume_id in (".", "..") or len(encoded) > MAX_NAME or b"/" in encoded):
        raise AgentError(400, "Invalid volume", f"Invalid volume identifier {volume_id!r}")
    return volume_id


@attrs.frozen
class VolumeRootMap:
    """How the host's volume directories appear to the agent."""

    #: ``<DockerRootDir>/volumes`` on the host (from ``docker info``).
    host_prefix: str
    #: Where that directory is mounted for the agent (None: the same path).
    mounted_at: str | None = None

    @classmethod
    def for_docker_root(cls, docker_root_dir: str, mounted_at: str | None) -> "VolumeRootMap":
        return cls(docker_root_dir.rstrip("/") + "/volumes", (mounted_at.rstrip("/") or "/") if mounted_at else None)

    def local_path(self, mountpoint: str) -> str:
        """Pure: a host ``Mountpoint`` -> the path the agent opens."""
        if self.mounted_at is None:
            return mountpoint
        if mountpoint == self.host_prefix or mountpoint.startswith(self.host_prefix + "/"):
            return self.mounted_at.rstrip("/") + mountpoint[len(self.host_prefix):]
        return mountpoint


def mountpoint_from_inspect(volume_id: str, document: Any) -> str:
    """Pure: the ``Mountpoint`` of a ``GET /volumes/{name}`` answer."""
    mountpoint = document.get("Mountpoint") if isinstance(document, dict) else None
    if not isinstance(mountpoint, str) or not mountpoint.startswith("/"):
        raise AgentError(400, "Invalid volume", f"Volume {volume_id} has no local mount point")
    return mountpoint


class VolumeLocator:
    """Finds a volume's directory through the agent's Docker client (``get_json``)."""

    def __init__(self, docker: Any, roots: VolumeRootMap) -> None:
        self._docker = docker
        self.roots = roots

    @inlineCallbacks
    def locate(self, volume_id: str) -> Generator[Deferred[Any], Any, str]:
        check_volume_id(volume_id)
        code, document = yield self._docker.get_json("/volumes/" + quote(volume_id, safe=""))
        if code == 404:
            raise AgentError(404, "Invalid volume", f"No such volume: {volume_id}")
        if code != 200:
            message = document.get("message") if isinstance(document, dict) else None
            raise AgentError(502, "Unable to inspect the volume", str(message or f"Docker answered {code}"))
        if not isinstance(document, dict):
            raise AgentError(502, "Unable to inspect the volume", "Docker answered with invalid JSON")
        return self.roots.local_path(mountpoint_from_inspect(volume_id, document))
