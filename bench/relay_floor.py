"""What a TLS hop costs on this machine: direct socket vs a C TLS relay (socat) vs the agent.

Puts the agent's `/containers/json` latency ratio in context: the extra process hop and TLS
alone cost something before any Python runs. Needs root (a real dockerd) and `socat`
(`apt-get install socat`). Bounded: 300 alternating requests per path; cleans up after itself.

    sudo .venv/bin/python bench/relay_floor.py
"""
from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portainer_agent.lab.dockerd import DockerDaemon, make_workdir  # noqa: E402
from tests.integration.support import AgentProcess, free_port  # noqa: E402


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("docker")
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(self._path)
        self.sock = sock


def main(requests: int = 300, containers: int = 50) -> None:
    if shutil.which("socat") is None:
        sys.exit("socat is not installed: apt-get install socat")
    daemon = DockerDaemon.start(make_workdir("floor"), "floornode")
    agent = relay = None
    try:
        daemon.import_busybox()
        for _ in range(containers):
            daemon.docker("create", "busybox:local", "sleep", "3600")
        agent = AgentProcess.start(daemon.socket_path, args=["--log-level", "INFO"])
        pem = Path(tempfile.mkdtemp(prefix="pa-floor-")) / "both.pem"
        data = agent.workdir / "data"
        pem.write_bytes((data / "cert.pem").read_bytes() + (data / "key.pem").read_bytes())
        port = free_port()
        relay = subprocess.Popen(["socat", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,cert={pem},verify=0,nodelay",
                                  f"UNIX-CONNECT:{daemon.socket_path}"], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        insecure = ssl._create_unverified_context()
        paths = {
            "direct (unix socket)": (UnixHTTPConnection(daemon.socket_path), {}),
            "socat TLS relay (C, OpenSSL)": (http.client.HTTPSConnection("127.0.0.1", port, context=insecure), {}),
            "agent (TLS + signature)": (http.client.HTTPSConnection("127.0.0.1", agent.port, context=insecure), agent.headers),
        }
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(requests):
            for name, (conn, headers) in paths.items():
                started = time.perf_counter()
                conn.request("GET", "/containers/json?all=1", headers=headers)
                response = conn.getresponse()
                response.read()
                samples[name].append(time.perf_counter() - started)
        base = statistics.median(samples["direct (unix socket)"])
        print(f"| path | p50 ms | p99 ms | p50 / direct |\n|---|---:|---:|---:|")
        for name, values in samples.items():
            values.sort()
            p50, p99 = statistics.median(values), values[int(len(values) * 0.99) - 1]
            print(f"| {name} | {p50 * 1000:.2f} | {p99 * 1000:.2f} | {p50 / base:.2f}x |")
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(10)
        if agent is not None:
            agent.cleanup()
        daemon.stop()


if __name__ == "__main__":
    main()
