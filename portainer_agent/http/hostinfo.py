"""``GET /host/info`` (also ``/v1``, ``/v2``): PCI devices and disks of this node
(spec §7.3, §10), read from the host's sysfs under the host root. Local only: the
routing layer forwards requests targeting another node."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from portainer_agent.errors import AgentError
from portainer_agent.fs.hostinfo import PciNames, host_info
from portainer_agent.http.responses import write_error, write_json

log = Logger()


class HostInfoResource(Resource):
    isLeaf = True

    def __init__(self, host_root: Path) -> None:
        super().__init__()
        self.host_root = host_root
        self._names = PciNames()

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return write_error(request, AgentError(405, "Method not allowed", "only GET on /host/info"))
        try:
            document = host_info(self.host_root, self._names)
        except (OSError, ValueError) as error:
            log.warn("cannot read host information: {error}", error=str(error))
            return write_error(request, AgentError(500, "Unable to retrieve host information", str(error)))
        return write_json(request, document)
