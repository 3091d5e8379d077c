"""A terminal console on a container through an agent, as Portainer's UI opens one.

    python -m portainer_agent.tools.console --agent https://10.77.0.11:9001 CONTAINER [COMMAND...]

Creates a tty exec instance (``POST /containers/{id}/exec`` through the agent's Docker
proxy), opens ``wss://.../websocket/exec?id=<exec id>`` and relays the terminal: keys
in, output out, window size changes as ``POST /exec/{id}/resize``. ``--attach`` attaches
to the container's own tty instead. Requests are signed as Portainer signs them, with
the headers of a docker ``config.json`` (``--docker-config``, default ``$DOCKER_CONFIG``,
as written by the lab), or a key (``--key``, with ``--secret`` in secret mode), or a new
key (a fresh agent in default mode pairs with the first key it sees). The agent's
certificate is self-signed: it is not verified unless ``--cacert`` is given.

Blocking and single-purpose on purpose: the standard library plus wsproto.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, RejectData,
                            Request, TextMessage)

from portainer_agent.testing.signing import PORTAINER_MESSAGE, PortainerSigner

TARGET_HEADER = "X-PortainerAgent-Target"


def signed_headers(args: argparse.Namespace) -> dict[str, str]:
    """The signature headers: from --key, else a docker config.json, else a new key."""
    if args.key:
        return PortainerSigner.from_pem(Path(args.key).read_bytes()).headers(args.secret or PORTAINER_MESSAGE)
    config_dir = args.docker_config or os.environ.get("DOCKER_CONFIG")
    if config_dir and (Path(config_dir) / "config.json").exists():
        headers = json.loads((Path(config_dir) / "config.json").read_text()).get("HttpHeaders") or {}
        if headers:
            return dict(headers)
    return PortainerSigner.generate().headers(args.secret or PORTAINER_MESSAGE)


class AgentConsole:
    def __init__(self, args: argparse.Namespace) -> None:
        url = urllib.parse.urlsplit(args.agent)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 9001
        self.tls = ssl.create_default_context(cafile=args.cacert)
        if not args.cacert:
            self.tls.check_hostname, self.tls.verify_mode = False, ssl.CERT_NONE
        self.headers = signed_headers(args)
        if args.target:
            self.headers[TARGET_HEADER] = args.target
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock: Any = None
        self.lock = threading.Lock()

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One signed call to the agent's Docker API."""
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.tls, timeout=30)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={**self.headers, "Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            return response.status, json.loads(raw) if raw.strip() else None
        finally:
            conn.close()

    def create_exec(self, container: str, command: Sequence[str]) -> str:
        status, answer = self.api("POST", f"/containers/{container}/exec", {
            "AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "Tty": True, "Cmd": list(command)})
        if status != 201:
            raise SystemExit(f"exec create failed: {status} {answer}")
        return str(answer["Id"])

    def open(self, path: str) -> None:
        raw = socket.create_connection((self.host, self.port), timeout=30)
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)
        self.sock.sendall(self.ws.send(Request(host=f"{self.host}:{self.port}", target=path,
                                               extra_headers=[(k.encode(), v.encode()) for k, v in self.headers.items()])))
        rejected: list[bytes] = []
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise SystemExit("the agent closed the connection during the handshake")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.sock.settimeout(None)
                    return
                if isinstance(event, RejectConnection):
                    rejected.append(b"%d" % event.status_code)
                    if not event.has_body:
                        raise SystemExit(f"refused: {event.status_code}")
                if isinstance(event, RejectData):
                    rejected.append(bytes(event.data))
                    if event.body_finished:
                        raise SystemExit("refused: " + b" ".join(rejected).decode(errors="replace").strip())

    def send(self, event: Any) -> None:
        with self.lock:
            self.sock.sendall(self.ws.send(event))

    def pump_stdin(self) -> None:
        while True:
            data = os.read(sys.stdin.fileno(), 4096)
            if not data:
                return
            self.send(BytesMessage(data))

    def pump_output(self) -> int:
        out = sys.stdout.buffer
        while True:
            data = self.sock.recv(65536)
            if not data:
                return 1
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    out.write(event.data.encode("utf-8"))
                    out.flush()
                elif isinstance(event, Ping):
                    self.send(event.response())
                elif isinstance(event, CloseConnection):
                    try:
                        self.send(event.response())
                    except Exception:  # the agent may already be gone
                        pass
                    return 0 if event.code == 1000 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portainer_agent.tools.console", description=__doc__.split("\n\n")[0])
    parser.add_argument("--agent", default="https://127.0.0.1:9001", help="agent URL (default %(default)s)")
    parser.add_argument("--target", help="node name for X-PortainerAgent-Target (a container on another node)")
    parser.add_argument("--docker-config", help="directory of a config.json with the signature HttpHeaders")
    parser.add_argument("--key", help="PEM private key to sign with")
    parser.add_argument("--secret", help="the agent's AGENT_SECRET (secret mode)")
    parser.add_argument("--cacert", help="verify the agent's certificate against this PEM")
    parser.add_argument("--attach", action="store_true", help="attach to the container's tty instead of an exec")
    parser.add_argument("container")
    parser.add_argument("command", nargs="*", default=["sh"])
    args = parser.parse_args(argv)
    console = AgentConsole(args)
    if args.attach:
        exec_id = None
        console.open(f"/websocket/attach?id={args.container}")
    else:
        exec_id = console.create_exec(args.container, args.command)
        console.open(f"/websocket/exec?id={exec_id}")

    def resize(*_: Any) -> None:
        if exec_id is not None and sys.stdout.isatty():
            size = shutil.get_terminal_size()
            console.api("POST", f"/exec/{exec_id}/resize?h={size.lines}&w={size.columns}")

    saved = None
    if sys.stdin.isatty():
        import termios
        import tty

        saved = termios.tcgetattr(sys.stdin.fileno())
        tty.setraw(sys.stdin.fileno(), termios.TCSANOW)  # keep what was typed ahead
        signal.signal(signal.SIGWINCH, resize)
    try:
        resize()
        threading.Thread(target=console.pump_stdin, daemon=True).start()
        return console.pump_output()
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


if __name__ == "__main__":
    sys.exit(main())
