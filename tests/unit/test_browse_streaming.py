"""``/browse/put`` bodies written to the staging file as they arrive, through the agent's
real site (``AgentSite``/``AgentRequest``, root, browse endpoint) in memory; bodies read
whole stay in memory, bounded, never in a temporary file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from portainer_agent.errors import AgentError
from portainer_agent.fs.pool import POOL_STOPPED, PoolService, run_inline
from portainer_agent.toolbox.bodysink import HIGH_WATER
from portainer_agent.http.browse import BrowseService, browse_endpoints
from portainer_agent.http.root import AgentRoot
from portainer_agent.http.site import AgentSite
from portainer_agent.http.request import AgentRequests
from portainer_agent.http.router import Router, streaming_paths
from portainer_agent.toolbox.upload import MAX_MEMORY_BODY, STREAM_THRESHOLD, InMemoryBody
from portainer_agent.proxy.dispatch import Destinations

from .memory import RecordingHandler
from .tempdirs import temp_dir

BOUNDARY = "sTr3amB0undary"


def form_head(filename: str = "big.bin", directory: str = "/up") -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="Path"\r\n\r\n{directory}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n').encode()


FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def put_head(length: int | None, target: bytes = b"/browse/put", *extra: bytes) -> bytes:
    lines = [b"POST %s HTTP/1.1" % target, b"Host: agent",
             b"Content-Type: multipart/form-data; boundary=" + BOUNDARY.encode(), *extra]
    lines.append(b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class HeldRunner:
    """A RunInPool whose calls wait until the test releases them (a slow disk)."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        done: Deferred[Any] = Deferred()
        self.waiting.append((done, function, args))
        return done

    def release_all(self) -> None:
        while self.waiting:
            done, function, args = self.waiting.pop(0)
            maybeDeferred(function, *args).chainDeferred(done)


class Agent:
    """The agent's site with the browse endpoints over a host root (no Docker needed)."""

    def __init__(self, case: SynchronousTestCase, run: Any = run_inline, max_upload: int = 0) -> None:
        self.root_dir: Path = temp_dir(case)
        self.hijack = RecordingHandler(b"hijacked")
        endpoints = browse_endpoints(BrowseService(None, True, self.root_dir, run,  # type: ignore[arg-type]
                                                   max_upload=max_upload))
        router = Router(streaming=streaming_paths(endpoints))
        self.root = AgentRoot(Destinations(RecordingHandler(), self.hijack), router, endpoints=endpoints)
        self.requests: list[Request] = []
        self.site = AgentSite(self.root, AgentRequests(router), reactor=Clock())
        original = self.site.getResourceFor

        def remember(request: Request) -> Any:
            self.requests.append(request)
            return original(request)

        self.site.getResourceFor = remember  # type: ignore[method-assign]
        self.channel: Any = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.client = StringTransport()
        self.channel.makeConnection(self.client)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def status(self) -> bytes:
        return self.client.value().split(b"\r\n", 1)[0]

    def body(self) -> bytes:
        return self.client.value().partition(b"\r\n\r\n")[2]

    def staged(self, directory: str = "up") -> list[str]:
        where = self.root_dir / directory
        return [name for name in os.listdir(where) if name.endswith(".upload")] if where.exists() else []


def no_temporary_files(case: SynchronousTestCase) -> None:
    """Make any twisted.web spooling to a temporary file fail the test."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request body went to a temporary file")

    case.patch(tempfile, "TemporaryFile", refuse)


class StreamedPutTests(SynchronousTestCase):
    def setUp(self) -> None:
        no_temporary_files(self)

    def test_the_file_part_is_staged_while_the_client_is_still_sending(self) -> None:
        agent = Agent(self)
        payload = os.urandom(3 * STREAM_THRESHOLD)
        head = form_head()
        agent.send(put_head(len(head) + len(payload) + len(FORM_TAIL)) + head + payload[:100_000])
        [staged] = agent.staged()
        self.assertGreater(os.path.getsize(agent.root_dir / "up" / staged), 90_000)  # on disk already
        self.assertEqual(agent.client.value(), b"")  # no answer before the body ends
        [request] = agent.requests
        self.assertEqual(request.content.getvalue(), b"")  # type: ignore[union-attr]
        agent.send(payload[100_000:] + FORM_TAIL)
        self.assertTrue(agent.status().startswith(b"HTTP/1.1 204"), agent.client.value())
        self.assertEqual((agent.root_dir / "up" / "big.bin").read_bytes(), payload)
        self.assertEqual(agent.staged(), [])

    def test_chunked_upload_streams_too(self) -> None:
        agent = Agent(self)
        payload = b"z" * 200_000
        agent.send(put_head(None) + chunk(form_head()) + chunk(payload[:70_000]))
        self.assertEqual(len(agent.staged()), 1)
        agent.send(chunk(payload[70_000:]) + chunk(FORM_TAIL) + b"0\r\n\r\n")
        self.assertTrue(agent.status().startswith(b"HTTP/1.1 204"), agent.client.value())
        self.assertEqual((agent.root_dir / "up" / "big.bin").read_bytes(), payload)

    def test_a_slow_disk_pauses_the_client(self) -> None:
        runner = HeldRunner()
        agent = Agent(self, run=runner)
        head = form_head()
        length = len(head) + 4 * HIGH_WATER + len(FORM_TAIL)
        agent.send(put_head(length) + head)
        runner.release_all()  # the jail opened, the first bytes written
        agent.send(b"a" * (HIGH_WATER // 2))  # a write starts and waits for the disk
        self.assertEqual(agent.client.producerState, "producing")
        agent.send(b"a" * HIGH_WATER)  # more than HIGH_WATER waits: the client is paused
        self.assertEqual(agent.client.producerState, "paused")
        runner.release_all()
        self.assertEqual(agent.client.producerState, "producing")
        agent.send(b"a" * (4 * HIGH_WATER - HIGH_WATER // 2 - HIGH_WATER) + FORM_TAIL)
        for _ in range(10):
            runner.release_all()
        self.assertTrue(agent.status().startswith(b"HTTP/1.1 204"), agent.client.value())
        self.assertEqual(os.path.getsize(agent.root_dir / "up" / "big.bin"), 4 * HIGH_WATER)

    def test_client_gone_mid_upload_removes_the_staged_file(self) -> None:
        agent = Agent(self)
        agent.send(put_head(10 * STREAM_THRESHOLD) + form_head() + b"x" * STREAM_THRESHOLD)
        self.assertEqual(len(agent.staged()), 1)
        agent.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(agent.staged(), [])
        self.assertFalse((agent.root_dir / "up" / "big.bin").exists())


class UploadLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        no_temporary_files(self)

    def test_a_declared_length_over_the_limit_is_413_before_anything_is_staged(self) -> None:
        agent = Agent(self, max_upload=100_000)
        agent.send(put_head(200_000) + form_head())
        self.assertTrue(agent.status().startswith(b"HTTP/1.1 413"), agent.client.value())
        self.assertEqual(json.loads(agent.body())["message"], "Request body too large")
        self.assertEqual(agent.staged(), [])
        self.assertFalse((agent.root_dir / "up").exists())

    def test_a_chunked_body_over_the_limit_is_413_and_the_staged_file_removed(self) -> None:
        agent = Agent(self, max_upload=150_000)
        agent.send(put_head(None) + chunk(form_head()) + chunk(b"y" * 100_000))
        self.assertEqual(len(agent.staged()), 1)
        agent.send(chunk(b"y" * 100_000))
        self.assertTrue(agent.status().startswith(b"HTTP/1.1 413"), agent.client.value())
        document = json.loads(agent.body())
        self.assertIn("150000", document["details"])
        self.assertEqual(agent.staged(), [])
        self.assertFalse((agent.root_dir / "up" / "big.bin").exists())
        # The rest of the body is dropped as it arrives; the connection stays usable.
        agent.send(chunk(b"y" * 100_000) + chunk(FORM_TAIL) + b"0\r\n\r\n")
        agent.client.clear()
        agent.send(b"GET /ping HTTP/1.1\r\nHost: agent\r\n\r\n")
        self.assertTrue(agent.status().startswith(b"HTTP/1.1 204"), agent.client.value())

    def test_an_upload_under_the_limit_is_stored(self) -> None:
        agent = Agent(self, max_upload=150_000)
        head = form_head()
        agent.send(put_head(len(head) + 100_000 + len(FORM_TAIL)) + head + b"k" * 100_000 + FORM_TAIL)
        self.assertTrue(agent.status().startswith(b"HTTP/1.1 204"), agent.client.value())
        self.assertEqual(os.path.getsize(agent.root_dir / "up" / "big.bin"), 100_000)


class InMemoryBodyTests(SynchronousTestCase):
    """Bodies that are not streamed (upgrade requests, small ones) never reach the disk."""

    def setUp(self) -> None:
        no_temporary_files(self)

    def test_an_upgrade_request_body_is_kept_in_memory_up_to_the_bound(self) -> None:
        agent = Agent(self)
        seen: list[Any] = []
        agent.hijack.render = lambda request: seen.append(  # type: ignore[method-assign]
            (type(request.content), request.content.too_large, len(request.content.getvalue()))) or b"x"
        body = b"u" * (2 * MAX_MEMORY_BODY)
        agent.send(b"POST /exec/e1/start HTTP/1.1\r\nHost: agent\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.assertEqual(seen, [(InMemoryBody, True, MAX_MEMORY_BODY + 1)])

    def test_an_oversized_upgrade_body_is_413_through_the_real_hijack_proxy(self) -> None:
        from portainer_agent.proxy.splice import MAX_HIJACK_REQUEST_BODY, HijackProxy

        self.assertEqual(MAX_HIJACK_REQUEST_BODY, MAX_MEMORY_BODY)
        agent = Agent(self)
        agent.root.destinations.hijack = HijackProxy(None)  # type: ignore[arg-type]  # refused before Docker
        body = b"u" * (MAX_MEMORY_BODY + 10)
        agent.send(b"POST /exec/e1/start HTTP/1.1\r\nHost: agent\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n" + chunk(body) + b"0\r\n\r\n")
        self.assertTrue(agent.status().startswith(b"HTTP/1.1 413"), agent.client.value()[:200])

    def test_a_small_put_is_read_whole_in_memory(self) -> None:
        agent = Agent(self)
        endpoint = agent.root.endpoints[b"/browse/put"]
        contents: list[Any] = []
        original = endpoint.render
        endpoint.render = lambda request, route: (  # type: ignore
            contents.append(type(request.content)), original(request, route))[1]
        head = form_head("small.txt", "/")
        agent.send(put_head(len(head) + 5 + len(FORM_TAIL)) + head + b"small" + FORM_TAIL)
        self.assertTrue(agent.status().startswith(b"HTTP/1.1 204"), agent.client.value())
        self.assertEqual(contents, [InMemoryBody])
        self.assertEqual((agent.root_dir / "small.txt").read_bytes(), b"small")


class PoolServiceTests(SynchronousTestCase):
    def test_work_is_refused_when_the_pool_is_not_running(self) -> None:
        from twisted.internet import reactor

        pool = PoolService(reactor)
        failure = self.failureResultOf(pool.run(os.getpid), AgentError)
        self.assertIs(failure.value, POOL_STOPPED)
        self.assertEqual(failure.value.status, 503)
