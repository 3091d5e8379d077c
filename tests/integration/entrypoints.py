"""Starting real agent processes through either entry point: the console script
(``python -m portainer_agent``) or ``twistd -n portainer-agent``."""
from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from portainer_agent.testing.signing import PortainerSigner
from portainer_agent.testing.tls import unverified_tls

from tests.integration.support import PORTS_FILE, AgentProcess

TWISTD = str(Path(sys.executable).with_name("twistd"))
ENTRY_POINTS = ("console", "twistd")


def command(entry: str, args: Sequence[str], twistd_args: Sequence[str] = ("--pidfile=",)) -> list[str]:
    if entry == "console":
        return [sys.executable, "-m", "portainer_agent", *args]
    return [TWISTD, "-n", *twistd_args, "portainer-agent", *args]


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("AGENT_", "DOCKER_")) and k not in ("LOG_LEVEL", "LOG_FORMAT")}
    environ.update(extra or {})
    return environ


def start_agent(entry: str, socket_path: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                wait: bool = True, port: int | None = None, twistd_args: Sequence[str] = ("--pidfile=",),
                timeout: float = 30) -> AgentProcess:
    """An agent on 127.0.0.1 through ``entry``; its output (stdout and stderr) in ``agent.log``.
    Without ``port``, it binds port 0 and writes the port it got to ``--ports-file``
    (``agent.port`` once :meth:`~AgentProcess.wait_ready` has read it)."""
    workdir = Path(tempfile.mkdtemp(prefix="pa-ops-"))
    listen = ["--port", str(port)] if port is not None else ["--port", "0", "--ports-file", str(workdir / PORTS_FILE)]
    full = command(entry, ["--docker-host", f"unix://{socket_path}", "--host", "127.0.0.1", *listen,
                           "--data-dir", str(workdir / "data"), *args], twistd_args)
    with open(workdir / "agent.log", "wb") as log:
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=clean_environment(env), cwd=workdir)
    agent = AgentProcess(proc, port, workdir, PortainerSigner.generate())
    if wait:
        agent.wait_ready(timeout)
    return agent


def run(entry: str, args: Sequence[str], env: Mapping[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run an agent that is expected to exit by itself (bad option, no Docker...)."""
    workdir = tempfile.mkdtemp(prefix="pa-ops-")
    try:
        return subprocess.run(command(entry, args), capture_output=True, text=True, timeout=timeout,
                              env=clean_environment(env), cwd=workdir)
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used: work done, whatever the machine's load."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tls_connect(port: int, timeout: float = 10) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return unverified_tls().wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def is_closed(sock: socket.socket) -> bool:
    """True when the peer closed or reset ``sock`` (non-blocking check)."""
    sock.setblocking(False)
    try:
        data = sock.recv(1)
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True
    finally:
        try:
            sock.setblocking(True)
        except OSError:
            pass
    return data == b""
