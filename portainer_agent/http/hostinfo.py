"""``GET /host/info`` (also ``/v1``, ``/v2``): PCI devices and disks of this node
(spec §7.3, §10), read from the host's sysfs under the host root. Local only: the
routing layer forwards requests targeting another node. The sysfs reads (a few hundred
small files, and ``pci.ids`` once) run in the disk thread pool, not on the reactor."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.errors import AgentError
from portainer_agent.fs.hostinfo import PciNames, host_info
from portainer_agent.fs.pool import RunInPool
from portainer_agent.toolbox.responses import finish_with_error, write_error, write_json
from portainer_agent.toolbox.twisted_private import client_gone
from portainer_agent.routing import Route

log = Logger()


class HostInfoResource(Resource):
    isLeaf = True

    def __init__(self, host_root: Path, run_in_pool: RunInPool) -> None:
        super().__init__()
        self.host_root = host_root
        self._names = PciNames()
        self._run = run_in_pool

    def render(self, request: Request, route: Route | None = None) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return write_error(request, AgentError(405, "Method not allowed", "only GET on /host/info"))
        done = self._run(host_info, self.host_root, self._names)
        done.addCallbacks(self._answer, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        done.addErrback(lambda failure: log.failure("host info failed", failure))
        return NOT_DONE_YET

    @staticmethod
    def _answer(document: Any, request: Request) -> None:
        if client_gone(request) or request.finished:
            return
        request.write(write_json(request, document))
        request.finish()

    @staticmethod
    def _failed(failure: Failure, request: Request) -> None:
        if failure.check(AgentError):
            finish_with_error(request, failure.value)
            return
        failure.trap(OSError, ValueError)
        log.warn("cannot read host information: {error}", error=str(failure.value))
        finish_with_error(request, AgentError(500, "Unable to retrieve host information", str(failure.value)))
