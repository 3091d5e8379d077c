"""The list cache against a real dockerd: answers from memory equal the socket's, writes
and outside changes are seen at once, and nothing is served from memory without events."""
from __future__ import annotations

import json
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.testing.polling import wait_for
from tests.integration.entrypoints import start_agent
from tests.integration.support import AgentProcess, RealDockerTestCase, socket_request
from tests.integration.test_operations import scrape

LIST = "/v1.41/containers/json?all=1"


def hits(port: int, which: str = "containers") -> float:
    return scrape(port).get(("portainer_agent_list_cache_requests_total",
                             (("list", which), ("outcome", "hit"))), 0.0)


def without_status(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k != "Status"} for item in items]


class ListCacheTests(RealDockerTestCase, SynchronousTestCase):
    """One agent (list cache on by default) on the session's dockerd."""

    class_agent = False
    agent: AgentProcess | None = None
    metrics_port = 0

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.agent = start_agent("console", cls.daemon.socket_path, args=["--metrics-addr", "127.0.0.1:0"])
        cls.metrics_port = cls.agent.bound_port("metrics")
        # A running container and one that has exited: both have time-relative statuses.
        cls.running = cls.daemon.docker("run", "-d", "--label", "pa.lc=1", "busybox:local",
                                        "sleep", "3600").stdout.strip()
        cls.exited = cls.daemon.docker("run", "-d", "--label", "pa.lc=1", "busybox:local", "true").stdout.strip()
        cls.daemon.docker("wait", cls.exited)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.docker("rm", "-f", cls.running, cls.exited, check=False)
        super().tearDownClass()

    def socket(self, path: str) -> tuple[int, bytes]:
        return socket_request(self.daemon.socket_path, "GET", path)

    def through_agent(self, path: str, **headers: str) -> tuple[int, Any, bytes]:
        assert self.agent is not None
        return self.agent.request("GET", path, headers=headers)

    def assert_same_as_socket(self, path: str) -> None:
        """The agent's answer equals the socket's, its Status texts those of the socket
        just before or just after (Docker formats them at the moment it answers)."""
        _, before = self.socket(path)
        status, headers, body = self.through_agent(path)
        _, after = self.socket(path)
        self.assertEqual(status, 200, body)
        ours, earlier, later = json.loads(body), json.loads(before), json.loads(after)
        self.assertEqual(without_status(ours), without_status(earlier))
        for item, first, last in zip(ours, earlier, later):
            self.assertIn(item["Status"], (first["Status"], last["Status"]), item["Id"])
        self.assertIsNotNone(headers.get("ETag"))

    def test_answers_from_memory_equal_the_socket_at_two_instants(self) -> None:
        self.assert_same_as_socket(LIST)  # fills the cache
        first_hits = hits(self.metrics_port)
        self.assert_same_as_socket(LIST)
        # Two instants at least two seconds apart: every "N seconds" status has changed.
        instant = time.monotonic()
        wait_for(lambda: time.monotonic() - instant > 2.2, 5, "two seconds to pass", interval=0.2)
        self.assert_same_as_socket(LIST)
        self.assertGreaterEqual(hits(self.metrics_port) - first_hits, 2, "the later answers came from memory")
        ours = {item["Id"]: item["Status"] for item in json.loads(self.through_agent(LIST)[2])}
        self.assertTrue(ours[self.running].startswith("Up "), ours[self.running])
        self.assertTrue(ours[self.exited].startswith("Exited (0) "), ours[self.exited])

    def test_every_list_and_its_byte_exact_answer(self) -> None:
        for path in ("/containers/json", "/v1.41/images/json", "/volumes", "/networks",
                     "/containers/json?all=1&filters=%7B%22label%22%3A%5B%22pa.lc%3D1%22%5D%7D"):
            for _ in range(2):  # a miss, then a hit
                _, from_socket = self.socket(path)
                status, _, body = self.through_agent(path)
                self.assertEqual(status, 200, body)
                if path.startswith("/containers"):
                    self.assertEqual(without_status(json.loads(body)), without_status(json.loads(from_socket)))
                elif path == "/volumes":
                    self.assertEqual(body, from_socket, path)
                else:
                    # Docker lists networks (and may list images) in map order: same items, any order.
                    self.assertEqual(sorted(json.loads(body), key=json.dumps),
                                     sorted(json.loads(from_socket), key=json.dumps), path)

    def test_a_conditional_request_gets_304_until_the_list_changes(self) -> None:
        path = "/images/json"
        _, headers, body = self.through_agent(path)
        tag = headers["ETag"]
        status, headers, again = self.through_agent(path, **{"If-None-Match": tag})
        self.assertEqual((status, again), (304, b""))
        self.assertEqual(headers["ETag"], tag)
        self.daemon.docker("tag", "busybox:local", "busybox:lc-304")
        try:
            status, headers, changed = self.through_agent(path, **{"If-None-Match": tag})
            self.assertEqual(status, 200)
            self.assertIn(b"busybox:lc-304", changed)
            self.assertNotEqual(headers["ETag"], tag)
        finally:
            self.daemon.docker("rmi", "busybox:lc-304")

    def test_a_write_through_the_agent_then_a_list_never_shows_the_old_list(self) -> None:
        assert self.agent is not None
        stale = 0
        for round_ in range(15):
            self.through_agent(LIST)  # keep the cache full
            status, _, created = self.agent.request(
                "POST", f"/containers/create?name=pa-lc-w{round_}",
                body=json.dumps({"Image": "busybox:local", "Cmd": ["true"]}).encode(),
                headers={"Content-Type": "application/json"})
            self.assertEqual(status, 201, created)
            ident = json.loads(created)["Id"]
            stale += ident not in {c["Id"] for c in json.loads(self.through_agent(LIST)[2])}
            self.assertEqual(self.agent.request("DELETE", f"/containers/{ident}")[0], 204)
            stale += ident in {c["Id"] for c in json.loads(self.through_agent(LIST)[2])}
        self.assertEqual(stale, 0)

    def test_a_write_straight_to_the_socket_shows_within_a_second(self) -> None:
        self.through_agent(LIST)
        self.through_agent(LIST)
        ident = self.daemon.docker("create", "--name", "pa-lc-outside", "busybox:local", "true").stdout.strip()
        try:
            wait_for(lambda: ident in {c["Id"] for c in json.loads(self.through_agent(LIST)[2])}, 1.0,
                     "the container created on the socket to show through the agent", interval=0.02)
        finally:
            self.daemon.docker("rm", "-f", ident)
        wait_for(lambda: ident not in {c["Id"] for c in json.loads(self.through_agent(LIST)[2])}, 1.0,
                 "the container removed on the socket to go", interval=0.02)

    def test_sizes_are_never_kept(self) -> None:
        for _ in range(2):
            status, headers, _ = self.through_agent("/containers/json?size=1")
            self.assertEqual(status, 200)
            self.assertIsNone(headers.get("ETag"))


class ListCacheOffTests(RealDockerTestCase, SynchronousTestCase):
    """``--list-cache off``: every list goes to Docker, as before."""

    class_agent = False

    def setUp(self) -> None:
        super().setUp()
        self.off = start_agent("console", self.daemon.socket_path, args=["--list-cache", "off"])
        self.addCleanup(self.off.cleanup)

    def test_no_tags_no_304(self) -> None:
        for _ in range(2):
            status, headers, _ = self.off.request("GET", "/images/json", headers={"If-None-Match": "*"})
            self.assertEqual(status, 200)
            self.assertIsNone(headers.get("ETag"))


class EventStreamLossTests(SynchronousTestCase):
    """dockerd restarted under an agent asking lists all the while: no list is ever stale,
    and the cache serves from memory again once the event stream is back."""

    def setUp(self) -> None:
        from portainer_agent.lab.dockerd import DockerDaemon, make_workdir
        from portainer_agent.testing.gates import Need, require

        require(Need.ROOT, Need.DOCKERD)
        self.daemon = DockerDaemon.start(make_workdir("lcr"), "lcrnode")
        self.addCleanup(lambda: self.daemon.stop())
        self.daemon.import_busybox()
        self.agent = start_agent("console", self.daemon.socket_path,
                                 args=["--metrics-addr", "127.0.0.1:0", "--log-level", "DEBUG"])
        self.addCleanup(self.agent.cleanup)
        self.metrics_port = self.agent.bound_port("metrics")

    def ids_on_socket(self) -> set[str] | None:
        try:
            status, body = socket_request(self.daemon.socket_path, "GET", LIST, timeout=5)
        except OSError:
            return None
        return {c["Id"] for c in json.loads(body)} if status == 200 else None

    def ids_through_agent(self) -> set[str] | None:
        status, _, body = self.agent.request("GET", LIST, timeout=10)
        return {c["Id"] for c in json.loads(body)} if status == 200 else None

    def test_lists_asked_while_dockerd_restarts_are_never_stale(self) -> None:
        from portainer_agent.lab.dockerd import DockerDaemon, terminate
        from portainer_agent.testing.threads import CheckedThread

        stale: list[Any] = []
        checked = [0]
        stop = [False]

        def ask() -> None:
            # Changes made on the socket may take the event stream's delay to show (the
            # guarantee is "within 1 s"): a container the socket showed at least a second
            # before the agent was asked, and still shows after, must be in the agent's list;
            # nothing may be there that the socket did not show in that second or after.
            seen: list[tuple[float, set[str]]] = []
            deadline = time.monotonic() + 120
            while not stop[0] and time.monotonic() < deadline:
                asked = time.monotonic()
                before = self.ids_on_socket()
                ours = self.ids_through_agent()
                after = self.ids_on_socket()
                if before is None or ours is None or after is None:
                    seen.clear()  # dockerd down: the agent says so (502), nothing to compare
                    continue
                seen.append((asked, before))
                old = [ids for at, ids in seen if at <= asked - 1.0]
                if not old:
                    continue
                since = set().union(*(ids for at, ids in seen if at > asked - 1.0))
                checked[0] += 1
                if not (old[-1] & after) <= ours <= (old[-1] | since | after):
                    stale.append((sorted(i[:8] for i in old[-1]), sorted(i[:8] for i in ours),
                                  sorted(i[:8] for i in after)))
                seen[:] = [(at, ids) for at, ids in seen if at > asked - 3.0]

        asker = CheckedThread(target=ask)
        asker.start()
        try:
            self.daemon.docker("create", "--name", "pa-lcr-before", "busybox:local", "true")
            terminate(self.daemon.pid, 30, self.daemon.process)
            self.daemon = DockerDaemon.start(self.daemon.workdir, self.daemon.name)
            for round_ in range(5):
                ident = self.daemon.docker("create", "busybox:local", "true").stdout.strip()
                wait_for(lambda: ident in (self.ids_through_agent() or set()), 1.0,
                         "a container created after the restart to show through the agent", interval=0.02)
                self.daemon.docker("rm", ident)
            compared = checked[0]
            wait_for(lambda: checked[0] > compared + 20, 60, "lists compared after the restart", interval=0.1)
        finally:
            stop[0] = True
            asker.finish(60)
        self.assertEqual(stale, [], "\n".join(line for line in self.agent.log_text.splitlines()
                                             if "/ping" not in line)[-6000:])
        metrics = scrape(self.metrics_port)
        self.assertGreaterEqual(metrics.get(("portainer_agent_list_cache_event_stream_reconnects_total", ()), 0), 1)
        before_hits = hits(self.metrics_port)
        self.ids_through_agent()
        self.ids_through_agent()
        self.assertGreater(hits(self.metrics_port), before_hits, "answers from memory again after the restart")
