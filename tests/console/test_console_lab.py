"""The console across nodes on a real 2-node Swarm: Portainer talks to node1's agent
and names node2 in ``X-PortainerAgent-Target``; node1's router splices the websocket to
node2's agent, whose console endpoint does the local work. Also: in a Swarm, a console
request without a target header is served by the receiving node (the original: 500)."""
from __future__ import annotations

import json
import os
import ssl
import time
from typing import Any, ClassVar

from portainer_agent.lab.harness import Lab
from portainer_agent.lab.testing import SynchronousLabTestCase
from portainer_agent.testing.polling import wait_for

from tests.console.test_console_docker import receive

TARGET = "X-PortainerAgent-Target"


class ConsoleLabTests(SynchronousLabTestCase):
    # One 2-node lab (1 manager, no secret) with the other classes that leave it as they found it.
    lab_shared = "two-nodes"
    lab: ClassVar[Lab]
    containers: ClassVar[dict[str, str]] = {}

    def setUp(self) -> Any:
        result = super().setUp()
        self.require_agents()
        lab = self.lab

        def converged() -> bool:
            for node in ("node1", "node2"):
                response = lab.agent_request(node, "/agents")
                if response is None or response.status != 200 or len(json.loads(response.body)) != 2:
                    return False
            return True

        wait_for(converged, 30, "both agents to list 2 members", interval=0.2)
        for node in ("node1", "node2"):
            if node not in self.containers:
                self.containers[node] = lab.docker(node, "run", "-d", "-t", "-i", "busybox:local", "sh").stdout.strip()
        return result

    # -- helpers -------------------------------------------------------------------------

    def api(self, via: str, method: str, path: str, target: str | None, body: Any = None) -> Any:
        headers = {"Content-Type": "application/json", **({TARGET: target} if target else {})}
        response = self.lab.agent_request(via, path, method=method, headers=headers,
                                          body=json.dumps(body).encode() if body is not None else None, timeout=30)
        self.assertIsNotNone(response)
        self.assertLess(response.status, 300, response.body[:300])
        return json.loads(response.body) if response.body.strip() else None

    def exec_create(self, via: str, node: str, target: str | None, *command: str) -> str:
        created = self.api(via, "POST", f"/containers/{self.containers[node]}/exec", target, {
            "AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "Tty": True,
            "Cmd": list(command or ["sh"])})
        return str(created["Id"])

    def connect(self, via: str, kind: str, ident: str, target: str | None) -> Any:
        import websocket

        headers = [f"{k}: {v}" for k, v in self.lab.signed_headers().items()]
        if target:
            headers.append(f"{TARGET}: {target}")
        return websocket.create_connection(
            f"wss://{self.lab.node(via).ip}:{self.lab.agent_port}/websocket/{kind}?id={ident}&nodeName={target}",
            header=headers, timeout=15, sslopt={"cert_reqs": ssl.CERT_NONE, "check_hostname": False})

    def agent_fds(self, node: str) -> int:
        agent = self.lab.node(node).agent
        assert agent is not None
        return len(os.listdir(f"/proc/{agent.pid}/fd"))

    # -- tests ---------------------------------------------------------------------------

    def test_exec_on_another_node_echo_hello(self) -> None:
        ws = self.connect("node1", "exec", self.exec_create("node1", "node2", "node2", "sh"), "node2")
        try:
            ws.send("echo hello-from-$(hostname)\n")
            text, _, _ = receive(ws, "hello-from-")
            # The shell runs on node2: the container's hostname is its id's first 12 digits.
            if self.containers["node2"][:12] not in text:
                receive(ws, self.containers["node2"][:12])
        finally:
            ws.close()

    def test_multibyte_split_and_one_megabyte_across_nodes(self) -> None:
        script = ("printf 'S:A\\360\\237'; sleep 0.3; printf '\\230\\200B\\344\\270'; sleep 0.3; "
                  "printf '\\255\\346\\226\\207:E'; head -c 1048576 /dev/zero | tr '\\0' x")
        ws = self.connect("node1", "exec", self.exec_create("node1", "node2", "node2", "sh", "-c", script), "node2")
        try:
            text, frames, code = receive(ws, timeout=60)
        finally:
            ws.close()
        self.assertTrue(text.startswith("S:A😀B中文:E"), text[:40])
        self.assertEqual(text[len("S:A😀B中文:E"):], "x" * (1 << 20))
        self.assertEqual(code, 1000)

    def test_attach_on_another_node(self) -> None:
        ws = self.connect("node1", "attach", self.containers["node2"], "node2")
        try:
            ws.send("echo attached-$((40+2))\n")
            receive(ws, "attached-42")
        finally:
            ws.close()

    def test_resize_and_close_on_another_node(self) -> None:
        exec_id = self.exec_create("node1", "node2", "node2", "sh")
        ws = self.connect("node1", "exec", exec_id, "node2")
        try:
            ws.send("echo up\n")
            receive(ws, "up")
            self.api("node1", "POST", f"/exec/{exec_id}/resize?h=33&w=99", "node2")
            ws.send("stty size\n")
            receive(ws, "33 99")
        finally:
            ws.close()
        wait_for(lambda: not self.api("node1", "GET", f"/exec/{exec_id}/json", "node2")["Running"], 15,
                 "the exec on node2 to end after the client closed")

    def test_no_target_header_means_this_node(self) -> None:
        ws = self.connect("node2", "exec", self.exec_create("node2", "node2", None, "sh"), None)
        try:
            ws.send("echo local-$((3*3))\n")
            receive(ws, "local-9")
        finally:
            ws.close()

    def test_unsigned_is_refused_before_forwarding(self) -> None:
        import websocket

        with self.assertRaises(websocket.WebSocketBadStatusException) as caught:
            websocket.create_connection(
                f"wss://{self.lab.node('node1').ip}:{self.lab.agent_port}/websocket/exec?id=ab",
                header=[f"{TARGET}: node2"], timeout=15, sslopt={"cert_reqs": ssl.CERT_NONE, "check_hostname": False})
        self.assertEqual(caught.exception.status_code, 403)

    def test_hundred_cross_node_cycles_leave_no_descriptors(self) -> None:
        def cycle(i: int) -> None:
            ws = self.connect("node1", "exec", self.exec_create("node1", "node2", "node2", "sh"), "node2")
            if i % 2:
                ws.send("exit\n")
                receive(ws)
            else:
                ws.send("echo c\n")
                receive(ws, "c")
            ws.close()

        cycle(0)
        baseline = {node: self.agent_fds(node) for node in ("node1", "node2")}
        started = time.monotonic()
        for i in range(100):
            cycle(i)
        elapsed = time.monotonic() - started
        # node1 keeps a few pooled, kept-alive HTTPS connections to node2 for the forwarded
        # Docker calls (exec create/inspect): a handful, not one per cycle.
        slack = {"node1": 4, "node2": 0}
        for node in ("node1", "node2"):
            wait_for(lambda: self.agent_fds(node) <= baseline[node] + slack[node], 15,
                     f"{node}'s agent fds back to {baseline[node]} (+{slack[node]})",
                     describe=lambda: f"now {self.agent_fds(node)}")
        print(f"\n100 cross-node console cycles in {elapsed:.1f}s; fds {baseline} -> "
              f"{ {n: self.agent_fds(n) for n in baseline} }")
