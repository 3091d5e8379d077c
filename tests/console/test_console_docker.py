"""The websocket console end to end: a real agent process on a real dockerd, a real
websocket client (websocket-client, which decodes every text frame strictly)."""
from __future__ import annotations

import json
import os
import ssl
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.testing.polling import wait_for
from portainer_agent.testing.threads import CheckedThread

from tests.integration.support import AgentProcess, RealDockerTestCase, rss_kib

PING = 1.0  # the agent's keepalive interval in these tests (--console-ping)


def connect(agent: AgentProcess, kind: str, ident: str, signed: bool = True, prefix: str = "") -> Any:
    import websocket  # test dependency: websocket-client

    headers = [f"{name}: {value}" for name, value in agent.headers.items()] if signed else []
    return websocket.create_connection(
        f"wss://127.0.0.1:{agent.port}{prefix}/websocket/{kind}?id={ident}", header=headers, timeout=10,
        sslopt={"cert_reqs": ssl.CERT_NONE, "check_hostname": False})


def receive(ws: Any, until: str | None = None, timeout: float = 20) -> tuple[str, int, int | None]:
    """Text frames (each decoded strictly on its own) until ``until`` appears or the
    agent closes: (text, number of frames, close code or None)."""
    from websocket import ABNF

    text, frames, deadline = "", 0, time.monotonic() + timeout
    while until is None or until not in text:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {until!r}; got {text[-300:]!r}")
        ws.settimeout(remaining)
        opcode, frame = ws.recv_data_frame(True)
        if opcode == ABNF.OPCODE_TEXT:
            text += frame.data.decode("utf-8")  # strict: a cut character raises here
            frames += 1
        elif opcode == ABNF.OPCODE_CLOSE:
            code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
            return text, frames, code
    return text, frames, None


class ConsoleAgainstDockerTests(RealDockerTestCase, SynchronousTestCase):
    class_agent = False

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.agent = AgentProcess.start(cls.daemon.socket_path, args=["--console-ping", f"{PING}s"])
        # A running container with a tty and an open stdin, as Portainer's console needs.
        cls.container = cls.agent.docker("run", "-d", "-t", "-i", "busybox:local", "sh").stdout.strip()

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.agent is not None:
            if os.environ.get("PA_CONSOLE_SHOW_LOG"):
                print(cls.agent.log_text)
            cls.agent.docker("rm", "-f", cls.container, check=False)
        if "container" in cls.__dict__:
            del cls.container
        super().tearDownClass()

    def exec_create(self, *command: str) -> str:
        body = json.dumps({"AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "Tty": True,
                           "Cmd": list(command or ["sh"])}).encode()
        created = self.agent.json("POST", f"/containers/{self.container}/exec", body=body,
                                  headers={"Content-Type": "application/json"})
        return created["Id"]

    def exec_running(self, exec_id: str) -> bool:
        return bool(self.agent.json("GET", f"/exec/{exec_id}/json")["Running"])

    def test_exec_sh_echo_hello(self) -> None:
        ws = connect(self.agent, "exec", self.exec_create("sh"))
        try:
            ws.send("echo hello-$((6*7))\n")
            text, _, _ = receive(ws, "hello-42")
            self.assertIn("hello-42", text)
        finally:
            ws.close()

    def test_multibyte_characters_split_across_reads_arrive_intact(self) -> None:
        # Each printf ends in the middle of a character; the sleeps make Docker read
        # (and the agent receive) the pieces separately. \377 is not UTF-8 at all.
        script = ("printf 'S:A\\360\\237'; sleep 0.3; printf '\\230\\200B\\344\\270'; sleep 0.3; "
                  "printf '\\255\\346'; sleep 0.3; printf '\\226\\207X\\377Y:E'")
        ws = connect(self.agent, "exec", self.exec_create("sh", "-c", script))
        try:
            text, frames, code = receive(ws)
        finally:
            ws.close()
        self.assertEqual(text, "S:A😀B中文X\ufffdY:E")
        self.assertGreaterEqual(frames, 4)  # the splits really happened
        self.assertEqual(code, 1000)  # the command ended: a normal close

    def test_one_megabyte_of_output_arrives_complete(self) -> None:
        ws = connect(self.agent, "exec", self.exec_create("sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' x"))
        try:
            text, frames, code = receive(ws, timeout=60)
        finally:
            ws.close()
        self.assertEqual((len(text), set(text), code), (1 << 20, {"x"}, 1000))

    def test_shell_exit_closes_the_websocket_normally(self) -> None:
        ws = connect(self.agent, "exec", self.exec_create("sh"))
        try:
            ws.send("exit\n")
            _, _, code = receive(ws)
        finally:
            ws.close()
        self.assertEqual(code, 1000)

    def test_client_close_ends_the_exec(self) -> None:
        exec_id = self.exec_create("sh")
        ws = connect(self.agent, "exec", exec_id, prefix="/v2")
        ws.send("echo ready\n")
        receive(ws, "ready")
        self.assertTrue(self.exec_running(exec_id))
        ws.close()
        wait_for(lambda: not self.exec_running(exec_id), 15, "the exec to end after the client closed")

    def test_attach_to_a_running_tty_container(self) -> None:
        ws = connect(self.agent, "attach", self.container, prefix="/v1")
        try:
            ws.send("echo attached-$((2+3))\n")
            text, _, _ = receive(ws, "attached-5")
            self.assertIn("attached-5", text)
        finally:
            ws.close()
        self.assertEqual(self.agent.json("GET", f"/containers/{self.container}/json")["State"]["Running"], True)

    def test_resize_through_the_docker_proxy(self) -> None:
        exec_id = self.exec_create("sh")
        ws = connect(self.agent, "exec", exec_id)
        try:
            ws.send("echo up\n")
            receive(ws, "up")
            status, _, body = self.agent.request("POST", f"/exec/{exec_id}/resize?h=37&w=101")
            self.assertIn(status, (200, 201), body)
            ws.send("stty size\n")
            text, _, _ = receive(ws, "37 101")
            self.assertIn("37 101", text)
        finally:
            ws.close()

    def test_bad_and_missing_id_are_400(self) -> None:
        import websocket

        with self.assertRaises(websocket.WebSocketBadStatusException) as caught:
            connect(self.agent, "exec", "not-hex")
        self.assertEqual(caught.exception.status_code, 400)
        status, headers, body = self.agent.request("GET", "/websocket/attach")
        self.assertEqual((status, json.loads(body)["message"]), (400, "Invalid query parameter: id"))
        self.assertEqual(headers["Portainer-Agent-Api-Version"], "2")

    def test_unsigned_is_403(self) -> None:
        import websocket

        with self.assertRaises(websocket.WebSocketBadStatusException) as caught:
            connect(self.agent, "exec", self.exec_create("sh"), signed=False)
        self.assertEqual(caught.exception.status_code, 403)

    def test_unknown_exec_is_404_json(self) -> None:
        status, _, body = self.agent.request("GET", "/websocket/exec?id=" + "ab" * 32, headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        self.assertEqual(status, 404)
        self.assertIn("No such exec instance", json.loads(body)["message"])

    def test_keepalive_pings_arrive(self) -> None:
        from websocket import ABNF

        ws = connect(self.agent, "exec", self.exec_create("sh"))
        try:
            pings = []

            def pinged() -> bool:
                ws.settimeout(20 * PING)
                opcode, _ = ws.recv_data_frame(True)  # answers pings itself
                pings.append(opcode == ABNF.OPCODE_PING)
                return pings.count(True) >= 3

            # Repeated pings on a console where nothing else happens. The bound is 20 intervals,
            # generous for any load yet below the 30 s default: an ignored --console-ping fails.
            wait_for(pinged, 20 * PING, "three keepalive pings", interval=0)
        finally:
            ws.close()

    def test_hundred_open_close_cycles_leave_no_descriptors(self) -> None:
        pid = self.agent.proc.pid

        def fds() -> int:
            return len(os.listdir(f"/proc/{pid}/fd"))

        def cycle(i: int) -> None:
            exec_id = self.exec_create("sh")
            ws = connect(self.agent, "exec", exec_id)
            if i % 2:
                ws.send("exit\n")  # the shell ends the session
                receive(ws)
            else:
                ws.send("echo c\n")  # the client ends it
                receive(ws, "c")
            ws.close()

        cycle(0)
        baseline = fds()
        started = time.monotonic()
        for i in range(100):
            cycle(i)
        elapsed = time.monotonic() - started
        wait_for(lambda: fds() <= baseline, 15, f"agent fds back to {baseline}", describe=lambda: f"now {fds()}")
        print(f"\n100 console cycles in {elapsed:.1f}s; agent fds {baseline} -> {fds()}")

    def rss_growth_while(self, seconds: float) -> int:
        """Highest agent RSS growth (kB) seen over ``seconds`` (a fixed window on purpose:
        the test is that nothing happens while a side does not read)."""
        pid, start = self.agent.proc.pid, rss_kib(self.agent.proc.pid)
        peak, deadline = start, time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(pid))
            time.sleep(0.1)
        return peak - start

    def test_backpressure_from_docker_to_a_client_that_does_not_read(self) -> None:
        ws = connect(self.agent, "exec", self.exec_create("sh", "-c", "tr '\\0' x < /dev/zero"))
        try:
            receive(ws, "x" * 1000)
            growth = self.rss_growth_while(3)
        finally:
            ws.close()
        print(f"\nagent RSS growth with an endless output and a client not reading: {growth} kB")
        self.assertLess(growth, 40_000)

    def test_backpressure_from_a_client_to_a_process_that_does_not_read(self) -> None:
        import threading

        from websocket import WebSocketTimeoutException

        ws = connect(self.agent, "exec", self.exec_create("sleep", "3600"))
        sent, stop = [0], threading.Event()

        def flood() -> None:
            chunk = "y" * (1 << 20)
            try:
                while not stop.is_set() and sent[0] < 256:
                    ws.send(chunk)
                    sent[0] += 1
            except WebSocketTimeoutException:  # nothing is read any more: backpressure
                pass  # the one expected error; any other fails the test (CheckedThread)

        ws.sock.settimeout(2)
        thread = CheckedThread.started(flood)
        try:
            growth = self.rss_growth_while(3)
        finally:
            stop.set()
            # Closed only once the sender is gone: a socket closed under a blocked sender
            # frees its descriptor for the next test's connection, which the sender's late
            # TLS records would then corrupt.
            try:
                thread.finish(30)
            finally:
                ws.sock.close()
        print(f"\nclient flood into a process not reading: {sent[0]} MB sent, agent RSS growth {growth} kB")
        # dockerd itself takes in much of the flood; what matters is the agent holds none of it.
        self.assertLess(growth, 40_000)

    def test_readme_console_tool(self) -> None:
        import subprocess
        import sys

        result = subprocess.run(
            [sys.executable, "-m", "portainer_agent.tools.console", "--agent", f"https://127.0.0.1:{self.agent.port}",
             "--docker-config", str(self.agent.docker_config), self.container, "sh"],
            input=b"echo tool-$((1+1))\nexit\n", capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"tool-2", result.stdout)

    def test_sigterm_with_an_open_console_ends_it_and_exits(self) -> None:
        import signal

        agent = AgentProcess.start(self.daemon.socket_path, args=["--shutdown-grace", "1s"])
        try:
            agent.headers, agent.signer = self.agent.headers, self.agent.signer
            body = json.dumps({"AttachStdin": True, "AttachStdout": True, "Tty": True, "Cmd": ["sh"]}).encode()
            # Fresh agent: it pairs with the first key it sees, the class's.
            exec_id = agent.json("POST", f"/containers/{self.container}/exec", body=body,
                                 headers={"Content-Type": "application/json"})["Id"]
            ws = connect(agent, "exec", exec_id)
            ws.send("echo before-stop\n")
            receive(ws, "before-stop")
            agent.proc.send_signal(signal.SIGTERM)
            _, _, code = receive(ws)
            self.assertEqual(code, 1001)  # going away: ended by the agent, not by the grace period
            self.assertEqual(agent.proc.wait(30), 0)
            wait_for(lambda: not self.exec_running(exec_id), 15, "the exec to end with the agent")
            ws.close()
        finally:
            agent.cleanup()
