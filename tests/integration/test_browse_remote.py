"""The volume browser through another node's agent (X-PortainerAgent-Target), on a
2-node lab Swarm: the receiving agent forwards, the target node's agent serves its
own volume, and nothing escapes it."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import uuid
from typing import Any

from portainer_agent.lab.testing import SynchronousLabTestCase
from portainer_agent.testing.polling import wait_for
from portainer_agent.testing.tls import unverified_tls

from tests.integration.test_browse import BOUNDARY, MB, PeakRSS, multipart_stream

#: Size of the big upload/download through the remote agent (PA_BROWSE_BIG_MB to change).
BIG_MB = int(os.environ.get("PA_BROWSE_BIG_MB", "128"))


class RemoteVolumeBrowserTests(SynchronousLabTestCase):
    # One 2-node lab (1 manager, no secret) with the other classes that leave it as they found it.
    lab_shared = "two-nodes"
    volume: str

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.volume = f"pabr-remote-{uuid.uuid4().hex[:8]}"
        lab = cls.lab
        lab.docker("node2", "volume", "create", cls.volume)
        lab.docker("node2", "run", "--rm", "-v", f"{cls.volume}:/data", "busybox:local", "sh", "-c",
                   "echo remote > /data/hello.txt && mkdir /data/sub && ln -s / /data/link"
                   " && ln -s /etc/hostname /data/hostfile")
        def node1_sees_node2() -> bool:
            response = lab.agent_request("node1", "/agents")
            return response is not None and response.status == 200 and {"node1", "node2"} <= {
                e["NodeName"] for e in response.json()}

        wait_for(node1_sees_node2, 60, "node1's agent to see node2", interval=0.2)

    def setUp(self) -> Any:
        result = super().setUp()
        self.require_agents()
        return result

    def call(self, method: str, path: str, body: Any = None, target: str | None = "node2",
             headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        all_headers = dict(self.lab.signed_headers())
        if target:
            all_headers["X-PortainerAgent-Target"] = target
        all_headers.update(headers or {})
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def connection(self, timeout: float = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.lab.node("node1").ip, self.lab.agent_port, timeout=timeout,
                                           context=unverified_tls())

    def test_list_and_get_a_remote_volume(self) -> None:
        for path in (f"/browse/ls?volumeID={self.volume}&path=/", f"/v2/browse/ls?volumeID={self.volume}&path=/",
                     f"/v1/browse/{self.volume}/ls"):
            status, _, body = self.call("GET", path)
            self.assertEqual(status, 200, (path, body))
            self.assertLessEqual({"hello.txt", "sub", "link", "hostfile"}, {i["Name"] for i in json.loads(body)}, path)
        status, headers, body = self.call("GET", f"/browse/get?volumeID={self.volume}&path=hello.txt",
                                          headers={"Range": "bytes=0-2"})
        self.assertEqual((status, body, headers.get("content-range")), (206, b"rem", "bytes 0-2/7"))

    def test_the_volume_is_not_on_the_receiving_node(self) -> None:
        status, _, body = self.call("GET", f"/browse/ls?volumeID={self.volume}&path=/", target=None)
        self.assertEqual(status, 404, body)
        self.assertEqual(json.loads(body)["message"], "Invalid volume")

    def test_planted_links_are_refused_remotely(self) -> None:
        for path in ("link", "link/etc/hostname", "hostfile"):
            for action in ("ls", "get"):
                status, _, body = self.call("GET", f"/browse/{action}?volumeID={self.volume}&path={path}")
                self.assertEqual(status, 400, (action, path, body))
        status, _, _ = self.call("GET", f"/browse/get?volumeID={self.volume}&path=../../../../etc/hostname")
        self.assertEqual(status, 400)

    def test_unknown_target_and_unsigned(self) -> None:
        status, _, body = self.call("GET", f"/browse/ls?volumeID={self.volume}&path=/", target="nowhere")
        self.assertEqual(status, 500, body)
        conn = self.connection()
        try:
            conn.request("GET", f"/browse/ls?volumeID={self.volume}&path=/",
                         headers={"X-PortainerAgent-Target": "node2"})
            self.assertEqual(conn.getresponse().status, 403)
        finally:
            conn.close()

    def test_host_info_of_the_remote_node(self) -> None:
        status, _, body = self.call("GET", "/v1/host/info")
        self.assertEqual(status, 200, body)
        self.assertIn("PhysicalDisks", json.loads(body))

    def test_rename_and_delete_remotely(self) -> None:
        self.lab.docker("node2", "run", "--rm", "-v", f"{self.volume}:/data", "busybox:local", "sh", "-c",
                        "echo a > /data/r-a")
        body = json.dumps({"CurrentFilePath": "r-a", "NewFilePath": "sub/r-b"}).encode()
        status, _, answer = self.call("PUT", f"/v1/browse/{self.volume}/rename", body=body)
        self.assertEqual(status, 204, answer)
        self.assertEqual(self.lab.node("node2").volume_path(self.volume).joinpath("sub", "r-b").read_bytes(), b"a\n")
        status, _, _ = self.call("DELETE", f"/browse/delete?volumeID={self.volume}&path=sub/r-b")
        self.assertEqual(status, 204)
        self.assertFalse(self.lab.node("node2").volume_path(self.volume).joinpath("sub", "r-b").exists())

    def test_big_upload_and_download_through_the_remote_agent(self) -> None:
        size = BIG_MB * MB
        length, chunks, digest = multipart_stream("/big", "big.bin", size, b"remote")
        agents = [PeakRSS(self.lab.node(n).agent.pid) for n in ("node1", "node2")]  # type: ignore[union-attr]
        started = time.monotonic()
        status, _, body = self.call("POST", f"/v2/browse/put?volumeID={self.volume}", body=chunks,
                                    headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                                             "Content-Length": str(length)}, timeout=300)
        put_seconds = time.monotonic() - started
        growth = [watch.stop() for watch in agents]
        self.assertEqual(status, 204, body)
        stored = self.lab.node("node2").volume_path(self.volume) / "big" / "big.bin"
        self.assertEqual(_sha256(stored), digest)
        print(f"\n{BIG_MB} MB put via node1 -> node2: {BIG_MB / put_seconds:.0f} MB/s, RSS +{growth[0]} KiB (node1), "
              f"+{growth[1]} KiB (node2)")
        for grown in growth:
            self.assertLess(grown, 30 * 1024)
        agents = [PeakRSS(self.lab.node(n).agent.pid) for n in ("node1", "node2")]  # type: ignore[union-attr]
        started = time.monotonic()
        conn = self.connection(300)
        try:
            conn.request("GET", f"/browse/get?volumeID={self.volume}&path=/big/big.bin",
                         headers={**self.lab.signed_headers(), "X-PortainerAgent-Target": "node2"})
            response = conn.getresponse()
            self.assertEqual(response.status, 200)
            received = hashlib.sha256()
            while chunk := response.read(MB):
                received.update(chunk)
        finally:
            conn.close()
        get_seconds = time.monotonic() - started
        growth = [watch.stop() for watch in agents]
        self.assertEqual(received.hexdigest(), digest)
        print(f"{BIG_MB} MB get via node1 <- node2: {BIG_MB / get_seconds:.0f} MB/s, RSS +{growth[0]} KiB (node1), "
              f"+{growth[1]} KiB (node2)")
        for grown in growth:
            self.assertLess(grown, 30 * 1024)


def _sha256(path: os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MB):
            digest.update(chunk)
    return digest.hexdigest()
