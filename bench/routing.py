#!/usr/bin/env python
"""Cluster routing costs on a real 3-node lab Swarm (2 managers, 1 worker), 50 containers a node.

All measured in one run, with bench/proxy.py's small keep-alive HTTP/1.1 client (TLS to the
agents without verification, signed like Portainer):

  * aggregated ``GET /containers/json?all=1`` through the worker's agent: p50/p99 and req/s at
    concurrency 1 and 16, against one node's direct-socket p50 for the same request in the
    same run (target: aggregated p50 <= 2.5x; the original agent: 3.6x);
  * CPU per aggregated request, summed over all three agents (utime+stime deltas during the
    concurrency-16 phase / requests; target <= 5 ms; the original: 12-15 ms);
  * ``GET /containers/{id}/json`` of a container on node1: through the worker's agent with
    ``X-PortainerAgent-Target: node1`` (remote), through node1's own agent (local agent) and
    straight from node1's socket (target: remote <= local agent + 1.5 ms);
  * ``GET /images/{name}/get`` of a ~1 GB image on node1 through the worker's agent (target
    node1): MB/s and the forwarding agent's RSS growth (VmRSS every 20 ms).

Usage (root, from the repository root; bounded: every phase has a request count or a time):

    sudo .venv/bin/python bench/routing.py [--requests 300] [--seconds 8] [--image-mb 1024] [--json out.json]
        [--prefix pabroute --subnet 10.77.63.0/24]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy import (  # noqa: E402  (bench/proxy.py: the shared client and helpers)
    Connection,
    Response,
    RssSampler,
    Target,
    _tls_context,
    cpu_seconds,
    create_containers,
    percentile,
)

from portainer_agent.lab.harness import Lab  # noqa: E402

MB = 1024 * 1024
LIST = "/v1.41/containers/json?all=1"


class NodeTarget(Target):
    """An agent at a lab node's address (bench/proxy.py's Target dials 127.0.0.1)."""

    def __init__(self, label: str, ip: str, port: int, headers: dict[str, str]) -> None:
        super().__init__(label, port=port, headers=headers)
        self.ip = ip
        self.host = f"{ip}:{port}"
        self.context = _tls_context()

    def connect(self, timeout: float = 60.0) -> socket.socket:
        sock = socket.create_connection((self.ip, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.context.wrap_socket(sock)


def timed(conn: Connection, path: str, extra: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    conn.request("GET", path, extra=extra).expect(200)
    return (time.perf_counter() - started) * 1000


def sequential(targets: dict[str, tuple[Target, dict[str, str] | None, str]], count: int) -> dict[str, list[float]]:
    """Round-robin over the targets request by request (load drift hits all alike)."""
    conns = {name: Connection(target) for name, (target, _, _) in targets.items()}
    times: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for name, (_, extra, path) in targets.items():  # warm up
            for _ in range(5):
                timed(conns[name], path, extra)
        for _ in range(count):
            for name, (_, extra, path) in targets.items():
                times[name].append(timed(conns[name], path, extra))
    finally:
        for conn in conns.values():
            conn.close()
    return times


def concurrent(target: Target, path: str, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with Connection(target) as conn:
            while time.monotonic() < deadline:
                value = timed(conn, path)
                with lock:
                    latencies.append(value)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    return len(latencies), latencies


def upload(target: Target, path: str, source: Path, extra: dict[str, str]) -> tuple[int, bytes]:
    """POST ``source`` to ``path``, streamed from the file (1 MiB writes); (status, body)."""
    size = source.stat().st_size
    lines = [f"POST {path} HTTP/1.1", f"Host: {target.host}", "Content-Type: application/x-tar",
             f"Content-Length: {size}"]
    lines += [f"{name}: {value}" for name, value in {**target.headers, **extra}.items()]
    with Connection(target, timeout=600) as conn:
        conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        with open(source, "rb") as data:
            while chunk := data.read(MB):
                conn.sock.sendall(chunk)
        status = int(conn._readline().split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while line := conn._readline():
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
        return status, Response(conn, status, headers, "POST").read()


def make_image(lab: Lab, node: str, size_mb: int) -> None:
    if lab.docker(node, "image", "inspect", "big:bench", check=False).returncode == 0:
        return
    work = Path(tempfile.mkdtemp(prefix="pa-bench-img-"))
    try:
        with open(work / "blob", "wb") as blob:
            chunk = os.urandom(MB)
            for index in range(size_mb):
                blob.write(chunk[:-8] + index.to_bytes(8, "big"))
        subprocess.run(["tar", "-C", str(work), "-cf", str(work / "big.tar"), "blob"], check=True)
        os.unlink(work / "blob")
        with open(work / "big.tar", "rb") as tar:
            subprocess.run(["docker", "-H", lab.node(node).docker_host, "import", "-", "big:bench"], stdin=tar,
                           check=True, capture_output=True, timeout=900)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per path")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each concurrency phase")
    parser.add_argument("--containers", type=int, default=50, help="containers per node")
    parser.add_argument("--image-mb", type=int, default=1024, help="size of the image saved across nodes (0: skip)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--prefix", default="pabroute", help="lab name prefix (namespaces, bridge)")
    parser.add_argument("--subnet", default="10.77.63.0/24", help="lab subnet")
    args = parser.parse_args()

    lab = Lab(prefix=args.prefix, subnet=args.subnet, nodes_count=3, managers=2, secret="bench-secret")
    lab.up()
    try:
        return run(lab, args)
    finally:
        lab.down()


def run(lab: Lab, args: argparse.Namespace) -> int:
    headers = lab.signed_headers()
    agents = {n.name: NodeTarget(n.name, n.ip, lab.agent_port, headers) for n in lab.nodes}
    sockets = {n.name: Target(f"{n.name}-socket", unix=n.socket_path) for n in lab.nodes}
    pids = {n.name: n.agent.pid for n in lab.nodes if n.agent is not None}

    def converged() -> bool:
        response = lab.agent_request("node3", "/agents")
        return response is not None and response.status == 200 and len(json.loads(response.body)) == 3

    lab.wait_for(converged, 30, "3 members")
    for name, target in sockets.items():
        create_containers(target, args.containers)
    total = len(json.loads(Connection(agents["node3"]).request("GET", LIST).expect(200)))
    print(f"lab up, {total} containers in the aggregate", file=sys.stderr)

    figures: dict[str, Any] = {"load_before": os.getloadavg()}
    one = sequential({"aggregated": (agents["node3"], None, LIST), "direct": (sockets["node1"], None, LIST)},
                     args.requests)
    figures["aggregated_p50_ms"] = percentile(one["aggregated"], 50)
    figures["aggregated_p99_ms"] = percentile(one["aggregated"], 99)
    figures["direct_p50_ms"] = percentile(one["direct"], 50)
    figures["direct_p99_ms"] = percentile(one["direct"], 99)
    figures["aggregated_over_direct_p50"] = figures["aggregated_p50_ms"] / figures["direct_p50_ms"]

    count1, _ = concurrent(agents["node3"], LIST, 1, args.seconds)
    figures["aggregated_rps_c1"] = count1 / args.seconds
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    count16, lat16 = concurrent(agents["node3"], LIST, 16, args.seconds)
    cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    figures["aggregated_rps_c16"] = count16 / args.seconds
    figures["aggregated_c16_p50_ms"] = percentile(lat16, 50)
    figures["aggregated_c16_p99_ms"] = percentile(lat16, 99)
    figures["cpu_ms_per_aggregate"] = {name: (cpu_after[name] - cpu_before[name]) * 1000 / max(count16, 1)
                                       for name in pids}
    figures["cpu_ms_per_aggregate_total"] = sum(figures["cpu_ms_per_aggregate"].values())

    container = Connection(sockets["node1"]).request("GET", LIST).expect(200)
    cid = json.loads(container)[0]["Id"]
    inspect = f"/v1.41/containers/{cid}/json"
    single = sequential({
        "remote": (agents["node3"], {"X-PortainerAgent-Target": "node1"}, inspect),
        "local_agent": (agents["node1"], None, inspect),
        "socket": (sockets["node1"], None, inspect),
    }, args.requests)
    for name, values in single.items():
        figures[f"inspect_{name}_p50_ms"] = percentile(values, 50)
        figures[f"inspect_{name}_p99_ms"] = percentile(values, 99)
    figures["remote_minus_local_agent_p50_ms"] = figures["inspect_remote_p50_ms"] - figures["inspect_local_agent_p50_ms"]

    if args.image_mb:
        make_image(lab, "node1", args.image_mb)
        saved = Path(tempfile.mkdtemp(prefix="pa-bench-save-")) / "big.tar"
        try:
            with RssSampler(pids["node3"]) as rss, Connection(agents["node3"], timeout=600) as conn, \
                    open(saved, "wb") as out:
                started = time.perf_counter()
                response = conn.request("GET", "/v1.41/images/big:bench/get",
                                        extra={"X-PortainerAgent-Target": "node1"})
                size = 0
                for piece in response.iter_body():
                    size += len(piece)
                    out.write(piece)
                elapsed = time.perf_counter() - started
            figures["image_get_mb"] = size / MB
            figures["image_get_mb_per_s"] = size / MB / elapsed
            figures["image_get_rss_growth_mb"] = rss.growth_mb
            with RssSampler(pids["node3"]) as rss:
                started = time.perf_counter()
                status, body = upload(agents["node3"], "/v1.41/images/load?quiet=1", saved,
                                      {"X-PortainerAgent-Target": "node2"})
                elapsed = time.perf_counter() - started
            if status != 200 or b"errorDetail" in body:
                raise RuntimeError(f"images/load through node3 to node2: HTTP {status} {body[:300]!r}")
            figures["image_load_mb_per_s"] = size / MB / elapsed
            figures["image_load_rss_growth_mb"] = rss.growth_mb
        finally:
            subprocess.run(["rm", "-rf", str(saved.parent)], check=False)
    figures["load_after"] = os.getloadavg()

    rows = [
        ("aggregated GET /containers/json?all=1 p50 / p99 (c=1)",
         f"{figures['aggregated_p50_ms']:.2f} / {figures['aggregated_p99_ms']:.2f} ms"),
        ("one node's socket, same request, p50 / p99",
         f"{figures['direct_p50_ms']:.2f} / {figures['direct_p99_ms']:.2f} ms"),
        ("aggregated p50 / direct p50 (target <= 2.5x)", f"{figures['aggregated_over_direct_p50']:.2f}x"),
        ("aggregated req/s, c=1 / c=16", f"{figures['aggregated_rps_c1']:.0f} / {figures['aggregated_rps_c16']:.0f}"),
        ("aggregated p50 / p99 at c=16", f"{figures['aggregated_c16_p50_ms']:.1f} / {figures['aggregated_c16_p99_ms']:.1f} ms"),
        ("CPU per aggregated request, all agents (target <= 5 ms)",
         f"{figures['cpu_ms_per_aggregate_total']:.2f} ms ("
         + ", ".join(f"{k} {v:.2f}" for k, v in sorted(figures['cpu_ms_per_aggregate'].items())) + ")"),
        ("inspect p50: remote / local agent / socket",
         f"{figures['inspect_remote_p50_ms']:.2f} / {figures['inspect_local_agent_p50_ms']:.2f} / "
         f"{figures['inspect_socket_p50_ms']:.2f} ms"),
        ("remote - local agent p50 (target <= 1.5 ms)", f"{figures['remote_minus_local_agent_p50_ms']:.2f} ms"),
    ]
    if args.image_mb:
        rows.append((f"images/get {figures['image_get_mb']:.0f} MB from another node",
                     f"{figures['image_get_mb_per_s']:.0f} MB/s, forwarding agent RSS +{figures['image_get_rss_growth_mb']:.1f} MB"))
        rows.append((f"images/load {figures['image_get_mb']:.0f} MB to another node",
                     f"{figures['image_load_mb_per_s']:.0f} MB/s, forwarding agent RSS +{figures['image_load_rss_growth_mb']:.1f} MB"))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nload average before {figures['load_before']}, after {figures['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
