"""Browse and host info do their filesystem work in the disk thread pool, never on the
reactor thread: the agent's real site on a loopback port (real reactor, real
:class:`~portainer_agent.fs.pool.PoolService`), every ``os`` call of the jail, the
download and host info recorded with the thread it ran on."""
from __future__ import annotations

import os
import threading
import types
from pathlib import Path
from typing import Any, Generator

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.threadable import isInIOThread
from twisted.trial.unittest import TestCase

from portainer_agent.fs import hostinfo as hostinfo_module
from portainer_agent.fs import jail as jail_module
from portainer_agent.fs.pool import PoolService
from portainer_agent.http import browse as browse_module
from portainer_agent.toolbox import filesend as filesend_module
from portainer_agent.http.browse import BrowseService, browse_endpoints
from portainer_agent.http.hostinfo import HostInfoResource
from portainer_agent.http.root import AgentRoot
from portainer_agent.http.router import Router, streaming_paths
from portainer_agent.http.site import AgentSite
from portainer_agent.http.request import AgentRequests
from portainer_agent.proxy.dispatch import Destinations

from .memory import RecordingHandler
from .tempdirs import temp_dir

#: ``os`` functions that touch the filesystem (what must not run on the reactor thread).
FILESYSTEM_CALLS = frozenset({
    "open", "close", "read", "write", "pread", "fstat", "stat", "lstat", "scandir", "listdir", "mkdir", "rmdir",
    "unlink", "rename", "fsync", "fchmod", "fchown", "dup", "set_blocking",
})


class RecordingOS(types.ModuleType):
    """The ``os`` module, recording (name, on the reactor thread?) for each filesystem call."""

    def __init__(self, calls: list[tuple[str, bool]]) -> None:
        super().__init__("os")
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        value = getattr(os, name)
        if name not in FILESYSTEM_CALLS:
            return value

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self._calls.append((name, isInIOThread()))
            return value(*args, **kwargs)

        return recorded


class DiskWorkThreadTests(TestCase):
    def setUp(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        recording = RecordingOS(self.calls)
        for module in (jail_module, browse_module, filesend_module, hostinfo_module):
            self.patch(module, "os", recording)
        self.threads: set[str] = set()
        self.root_dir: Path = temp_dir(self)
        (self.root_dir / "dir").mkdir()
        for index in range(50):
            (self.root_dir / "dir" / f"f{index}").write_bytes(b"%d" % index)
        (self.root_dir / "big.bin").write_bytes(os.urandom(1 << 20))
        self.pool = PoolService(reactor, threads=2)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)

        def run(function: Any, *args: Any) -> "Deferred[Any]":
            def where(*inner: Any) -> Any:
                self.threads.add(threading.current_thread().name)
                return function(*inner)

            return self.pool.run(where, *args)

        endpoints: dict[bytes, Any] = {
            **browse_endpoints(BrowseService(None, True, self.root_dir, run)),  # type: ignore[arg-type]
            b"/host/info": HostInfoResource(self.root_dir, run),
        }
        router = Router(streaming=streaming_paths(endpoints))
        root = AgentRoot(Destinations(RecordingHandler(), RecordingHandler()), router, endpoints=endpoints)
        self.site = AgentSite(root, AgentRequests(router), reactor=reactor)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        from twisted.web.client import HTTPConnectionPool

        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)

    def request(self, method: str, path: str, **kwargs: Any) -> "Deferred[Any]":
        return treq.request(method, self.base + path, pool=self.http, **kwargs)

    def assert_off_the_reactor(self, what: str) -> None:
        self.assertTrue(self.calls, f"{what}: no filesystem call recorded")
        on_reactor = sorted({name for name, in_reactor in self.calls if in_reactor})
        self.assertEqual(on_reactor, [], f"{what}: filesystem calls on the reactor thread")
        self.assertTrue(self.threads and all(name.startswith("PoolThread-disk") for name in self.threads), self.threads)
        self.calls.clear()

    @inlineCallbacks
    def test_every_action_runs_its_filesystem_calls_in_the_pool(self) -> Generator[Deferred[Any], Any, None]:
        response = yield self.request("GET", "/browse/ls?path=/dir")
        listing = yield response.json()
        self.assertEqual(len(listing), 50)
        self.assert_off_the_reactor("ls")

        response = yield self.request("GET", "/browse/get?path=/big.bin", headers={"Range": "bytes=10-"})
        body = yield response.content()
        self.assertEqual((response.code, body), (206, (self.root_dir / "big.bin").read_bytes()[10:]))
        self.assert_off_the_reactor("get")

        payload = os.urandom(300_000)
        boundary = "thr3adB0undary"
        form = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="up.bin"\r\n\r\n').encode() \
            + payload + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="Path"\r\n\r\n/new\r\n--{boundary}--\r\n'.encode()
        response = yield self.request("POST", "/browse/put", data=form,
                                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        yield response.content()
        self.assertEqual(response.code, 204)
        self.assertEqual((self.root_dir / "new" / "up.bin").read_bytes(), payload)
        self.assert_off_the_reactor("put")

        response = yield self.request("PUT", "/browse/rename",
                                      data=b'{"CurrentFilePath": "/new/up.bin", "NewFilePath": "/new/moved.bin"}')
        yield response.content()
        self.assertEqual(response.code, 204)
        self.assert_off_the_reactor("rename")

        response = yield self.request("DELETE", "/browse/delete?path=/new/moved.bin")
        yield response.content()
        self.assertEqual(response.code, 204)
        self.assertFalse((self.root_dir / "new" / "moved.bin").exists())
        self.assert_off_the_reactor("delete")

        response = yield self.request("GET", "/host/info")
        document = yield response.json()
        self.assertIn("PhysicalDisks", document)
        self.assert_off_the_reactor("host info")

    @inlineCallbacks
    def test_the_recorder_sees_calls_on_the_reactor_thread(self) -> Generator[Deferred[Any], Any, None]:
        """The check above can fail: the same request with an inline runner is caught."""
        from portainer_agent.fs.pool import run_inline

        service = BrowseService(None, True, self.root_dir, run_inline)  # type: ignore[arg-type]
        self.site.resource.endpoints.update(browse_endpoints(service))
        response = yield self.request("GET", "/browse/ls?path=/dir")
        yield response.content()
        self.assertIn(("scandir", True), self.calls)
