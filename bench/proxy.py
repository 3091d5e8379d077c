#!/usr/bin/env python
"""Proxy overhead: the Docker API straight from its unix socket vs through the agent.

One real dockerd (its own network namespace, see portainer_agent.lab.dockerd) and one
agent process in front of it; every figure is measured on both paths in the same run,
with the same small HTTP/1.1 client (keep-alive connections; TLS to the agent without
verification; signature headers on every agent request except ``/ping``):

  * ``GET /containers/json?all=1`` with 50 busybox containers: p50/p99 latency over
    sequential requests on one persistent connection (no TLS handshake per request);
  * ``GET /_ping`` requests/s at concurrency 1 and 16 (a thread per keep-alive connection,
    fixed time, direct and agent taking turns in 0.5 s slices; ``wrk`` cross-check if installed);
  * ``logs?follow=1&timestamps=1``: a container prints a line every 200 ms; per line,
    client receive time minus the time Docker stamped it, read on both paths at once,
    plus the paired difference (agent receive minus direct receive of the same line);
  * ``GET /containers/{id}/export`` of a ~200 MB container: MB/s on both paths, and the
    agent process's RSS growth (VmRSS sampled every 20 ms) during the agent export and
    during a deliberately slow reader (backpressure: the RSS must stay flat).

Each measurement is repeated ``--runs`` times; the table shows medians (the ratio column:
the median of each run's agent/direct ratio; RSS rows: the worst run), the JSON file
(``--json``) holds the table and every run's values. ``--merge a.json b.json`` prints one
table over the runs of several invocations. See bench/README.md for what each row means.

Usage (root, from the repository root):

    sudo .venv/bin/python bench/proxy.py [--runs 3] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import tarfile
import calendar
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portainer_agent.lab.dockerd import DockerDaemon, make_workdir, missing_tools, terminate  # noqa: E402
from portainer_agent.testing.signing import PortainerSigner  # noqa: E402

IMAGE = "busybox:local"
MB = 1024 * 1024
IO_TIMEOUT = 60.0


# ------------------------------------------------------------------ a tiny HTTP/1.1 client

def _tls_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Target:
    """Where requests go: Docker's unix socket, or the agent over TLS."""

    def __init__(self, label: str, *, unix: str | None = None, port: int = 0,
                 headers: dict[str, str] | None = None) -> None:
        self.label = label
        self.unix = unix
        self.port = port
        self.headers = dict(headers or {})
        self.host = "docker" if unix else f"127.0.0.1:{port}"
        self.context = None if unix else _tls_context()

    def connect(self, timeout: float = IO_TIMEOUT) -> socket.socket:
        if self.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.unix)
            return sock
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.context is not None
        return self.context.wrap_socket(sock)

    def request_bytes(self, method: str, path: str, body: bytes = b"",
                      extra: dict[str, str] | None = None, signed: bool = True) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", "User-Agent: pa-bench"]
        if signed:
            lines += [f"{name}: {value}" for name, value in self.headers.items()]
        lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class HTTPError(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection (blocking), with a small read buffer."""

    def __init__(self, target: Target, timeout: float = IO_TIMEOUT) -> None:
        self.target = target
        self.sock = target.connect(timeout)
        self.buf = bytearray()
        self.pos = 0
        self.reusable = True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Unblock a reader in another thread and drop the connection."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # buffer helpers
    def _fill(self, size: int = 1 << 18) -> None:
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        data = self.sock.recv(size)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _readline(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos:end])
                self.pos = end + 2
                return line
            if len(self.buf) - self.pos > 65536:
                raise HTTPError("header line too long")
            self._fill()

    def _take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes: what is buffered, else one recv."""
        if self.pos >= len(self.buf):
            self._fill(min(max(limit, 4096), 1 << 18))
        n = min(limit, len(self.buf) - self.pos)
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def request(self, method: str, path: str, body: bytes = b"", extra: dict[str, str] | None = None,
                signed: bool = True) -> "Response":
        self.sock.sendall(self.target.request_bytes(method, path, body, extra, signed))
        status_line = self._readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HTTPError(f"bad status line {status_line!r}")
        headers: dict[str, str] = {}
        while True:
            line = self._readline()
            if not line:
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
        return Response(self, int(parts[1]), headers, method)


class Response:
    def __init__(self, conn: Connection, status: int, headers: dict[str, str], method: str) -> None:
        self.conn = conn
        self.status = status
        self.headers = headers
        if headers.get("connection", "").lower() == "close":
            conn.reusable = False
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self.mode, self.remaining = "length", 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self.mode, self.remaining = "chunked", 0
        elif "content-length" in headers:
            self.mode, self.remaining = "length", int(headers["content-length"])
        else:
            self.mode, self.remaining = "close", -1
            conn.reusable = False

    def iter_body(self, piece: int = 1 << 18) -> Iterator[bytes]:
        """The body as it arrives (chunked framing removed)."""
        conn = self.conn
        if self.mode == "length":
            while self.remaining > 0:
                data = conn._take(min(piece, self.remaining))
                self.remaining -= len(data)
                yield data
        elif self.mode == "chunked":
            while True:
                size = int(conn._readline().split(b";", 1)[0], 16)
                if size == 0:
                    while conn._readline():
                        pass
                    return
                while size > 0:
                    data = conn._take(min(piece, size))
                    size -= len(data)
                    yield data
                if conn._readline() != b"":
                    raise HTTPError("bad chunk end")
        else:
            while True:
                try:
                    data = conn._take(piece)
                except EOFError:
                    return
                yield data

    def read(self) -> bytes:
        return b"".join(self.iter_body())

    def expect(self, *codes: int) -> bytes:
        body = self.read()
        if self.status not in codes:
            raise HTTPError(f"{self.conn.target.label}: HTTP {self.status}: {body[:300]!r}")
        return body


def call(target: Target, method: str, path: str, body: Any = None, codes: tuple[int, ...] = (200,),
         timeout: float = IO_TIMEOUT) -> Any:
    """One request on a fresh connection; JSON in and out."""
    data = json.dumps(body).encode() if body is not None else b""
    extra = {"Content-Type": "application/json"} if body is not None else None
    with Connection(target, timeout) as conn:
        raw = conn.request(method, path, data, extra).expect(*codes)
    return json.loads(raw) if raw.strip() else None


# ------------------------------------------------------------------ statistics helpers

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def read_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (seconds)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """VmRSS of ``pid`` every ``interval`` seconds in a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(read_rss_kb(self.pid))
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.baseline = read_rss_kb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth_mb(self) -> float:
        return (max(self.samples + [self.baseline]) - self.baseline) / 1024

    @property
    def peak_mb(self) -> float:
        return max(self.samples + [self.baseline]) / 1024


# ------------------------------------------------------------------ measurements

def bench_list_latency(direct: Target, agent: Target, requests: int, agent_pid: int) -> dict[str, dict[str, float]]:
    """Sequential ``GET /containers/json?all=1``, one keep-alive connection per path,
    alternating direct and agent request by request (machine load drifts hit both)."""
    path = "/v1.41/containers/json?all=1"
    times: dict[str, list[float]] = {"direct": [], "agent": []}
    sizes: dict[str, int] = {}
    with Connection(direct) as d_conn, Connection(agent) as a_conn:
        pairs = (("direct", d_conn), ("agent", a_conn))
        for _ in range(20):  # warm-up: TLS session, agent and Docker caches
            for _, conn in pairs:
                conn.request("GET", path).expect(200)
        cpu_before = cpu_seconds(agent_pid)
        for _ in range(requests):
            for label, conn in pairs:
                start = time.perf_counter()
                body = conn.request("GET", path).expect(200)
                times[label].append(time.perf_counter() - start)
                sizes[label] = len(body)
        agent_cpu = cpu_seconds(agent_pid) - cpu_before
        for label, conn in pairs:
            if not conn.reusable:
                raise HTTPError(f"{label}: connection not kept alive")
    result = {label: {"p50_ms": percentile(values, 50) * 1000, "p99_ms": percentile(values, 99) * 1000,
                      "mean_ms": statistics.fmean(values) * 1000, "requests": requests,
                      "body_bytes": sizes[label]}
              for label, values in times.items()}
    result["agent"]["agent_cpu_us_per_request"] = agent_cpu / requests * 1e6
    return result


def _ping_slice(target: Target, connections: list[Connection], seconds: float) -> tuple[int, float]:
    """Every connection's thread sends ``GET /_ping`` back to back for ``seconds``."""
    counts = [0] * len(connections)
    errors: list[BaseException] = []
    start = time.perf_counter()
    stop = start + seconds

    def worker(index: int) -> None:
        conn, n = connections[index], 0
        try:
            while time.perf_counter() < stop:
                conn.request("GET", "/_ping").expect(200)
                n += 1
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        counts[index] = n

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(connections))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + IO_TIMEOUT)
    elapsed = time.perf_counter() - start
    if errors:
        raise HTTPError(f"{target.label}: /_ping load failed: {errors[0]!r}")
    return sum(counts), elapsed


def bench_ping(direct: Target, agent: Target, concurrency: int, seconds: float, agent_pid: int,
               slice_seconds: float = 0.5) -> dict[str, dict[str, float]]:
    """``GET /_ping`` from ``concurrency`` threads, each with its own keep-alive connection;
    direct and agent take turns in ``slice_seconds`` slices, ``seconds`` in all for each."""
    pools = {t.label: [Connection(t) for _ in range(concurrency)] for t in (direct, agent)}
    totals = {label: [0, 0.0] for label in pools}
    agent_cpu = 0.0
    try:
        for target in (direct, agent):  # warm-up
            _ping_slice(target, pools[target.label], 0.2)
        slices = max(1, round(seconds / slice_seconds))
        for _ in range(slices):
            for target in (direct, agent):
                cpu_before = cpu_seconds(agent_pid) if target is agent else 0.0
                count, elapsed = _ping_slice(target, pools[target.label], seconds / slices)
                if target is agent:
                    agent_cpu += cpu_seconds(agent_pid) - cpu_before
                totals[target.label][0] += count
                totals[target.label][1] += elapsed
    finally:
        for conns in pools.values():
            for conn in conns:
                conn.close()
    result = {label: {"rps": count / elapsed, "requests": count, "seconds": elapsed, "concurrency": concurrency}
              for label, (count, elapsed) in totals.items()}
    result[agent.label]["agent_cpu_us_per_request"] = agent_cpu / max(1, totals[agent.label][0]) * 1e6
    return result


def bench_ping_wrk(agent: Target, concurrency: int, seconds: float) -> float | None:
    """Cross-check of the agent figure with ``wrk`` (C, cheap on the client side), if installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    command = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
    for name, value in agent.headers.items():
        command += ["-H", f"{name}: {value}"]
    command.append(f"https://127.0.0.1:{agent.port}/_ping")
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    rps = None
    for line in result.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            rps = float(line.split()[1])
        if "Non-2xx" in line:
            raise HTTPError(f"wrk: {line.strip()}")
    return rps


def parse_docker_time(stamp: bytes) -> float:
    """``2026-11-25T18:30:00.123456789Z`` -> epoch seconds (float)."""
    text = stamp.decode()
    main, _, fraction = text.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    return seconds + (float("0." + fraction) if fraction else 0.0)


class LogFollower(threading.Thread):
    """Follows a container's multiplexed log stream; records (line, recv time, stamp)."""

    def __init__(self, target: Target, container: str) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.container = container
        self.lines: dict[str, tuple[float, float]] = {}
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.conn: Connection | None = None
        self.stopping = False

    def run(self) -> None:
        try:
            self.conn = Connection(self.target, timeout=10)
            path = f"/v1.41/containers/{self.container}/logs?follow=1&stdout=1&stderr=1&timestamps=1&tail=0"
            response = self.conn.request("GET", path)
            if response.status != 200:
                raise HTTPError(f"{self.target.label}: logs HTTP {response.status}")
            self.ready.set()
            pending = b""
            for data in response.iter_body(65536):
                now = time.time()
                pending += data
                while len(pending) >= 8:
                    size = int.from_bytes(pending[4:8], "big")
                    if len(pending) < 8 + size:
                        break
                    payload, pending = pending[8:8 + size], pending[8 + size:]
                    for line in payload.splitlines():
                        stamp, _, text = line.partition(b" ")
                        self.lines[text.decode()] = (now, parse_docker_time(stamp))
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            if not self.stopping:
                self.error = error
        finally:
            self.ready.set()

    def stop(self) -> None:
        self.stopping = True
        if self.conn is not None:
            self.conn.abort()
        self.join(5)
        if self.conn is not None:
            self.conn.close()


def bench_logs(direct: Target, agent: Target, container: str, seconds: float) -> dict[str, dict[str, float]]:
    followers = [LogFollower(direct, container), LogFollower(agent, container)]
    for follower in followers:
        follower.start()
    for follower in followers:
        follower.ready.wait(10)
    time.sleep(seconds)
    for follower in followers:
        follower.stop()
    for follower in followers:
        if follower.error is not None:
            raise follower.error
    results: dict[str, dict[str, float]] = {}
    for follower in followers:
        latencies = [(recv - stamp) * 1000 for recv, stamp in follower.lines.values()]
        results[follower.target.label] = {"p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
                                          "max_ms": max(latencies, default=float("nan")), "lines": len(latencies)}
    d_lines, a_lines = followers[0].lines, followers[1].lines
    paired = [(a_lines[key][0] - d_lines[key][0]) * 1000 for key in d_lines if key in a_lines]
    results["overhead"] = {"p50_ms": percentile(paired, 50), "p95_ms": percentile(paired, 95),
                           "max_ms": max(paired, default=float("nan")), "lines": len(paired)}
    return results


def bench_export(target: Target, container: str, agent_pid: int | None,
                 slow_rate: float | None = None, slow_seconds: float = 5.0) -> dict[str, float]:
    """Read ``/containers/{id}/export``; with ``slow_rate`` (bytes/s), read slowly for
    ``slow_seconds`` and then drop the connection. Samples the agent's RSS meanwhile."""
    path = f"/v1.41/containers/{container}/export"
    sampler = RssSampler(agent_pid) if agent_pid else None
    total = 0
    conn = Connection(target, timeout=IO_TIMEOUT)
    try:
        if sampler:
            sampler.__enter__()
        cpu_before = cpu_seconds(agent_pid) if agent_pid else 0.0
        start = time.perf_counter()
        response = conn.request("GET", path)
        if response.status != 200:
            raise HTTPError(f"{target.label}: export HTTP {response.status}: {response.read()[:200]!r}")
        if slow_rate is None:
            for data in response.iter_body(1 << 20):
                total += len(data)
        else:
            piece = 16384
            deadline = start + slow_seconds
            for data in response.iter_body(piece):
                total += len(data)
                # pace to slow_rate: sleep until this many bytes are "due"
                due = start + total / slow_rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                if time.perf_counter() >= deadline:
                    break
        elapsed = time.perf_counter() - start
        agent_cpu = cpu_seconds(agent_pid) - cpu_before if agent_pid else 0.0
    finally:
        if sampler:
            sampler.__exit__()
        conn.close()
    result = {"bytes": total, "seconds": elapsed, "mb_per_s": total / MB / elapsed}
    if sampler:
        result["agent_cpu_s_per_gb"] = agent_cpu / (total / 1024**3) if total else float("nan")
        result.update(rss_growth_mb=sampler.growth_mb, rss_peak_mb=sampler.peak_mb,
                      rss_baseline_mb=sampler.baseline / 1024)
    return result


def upload_body(size: int) -> bytes:
    """A tar archive holding one ``size``-byte file of random bytes."""
    info = tarfile.TarInfo("pa-bench-upload.bin")
    info.size = size
    payload = os.urandom(min(size, 1 << 20)) * (size // (1 << 20)) + os.urandom(size % (1 << 20))
    return info.tobuf() + payload + b"\0" * (-size % 512) + b"\0" * 1024


def bench_upload(target: Target, container: str, body: bytes, agent_pid: int | None) -> dict[str, float]:
    """``PUT /containers/{id}/archive?path=/tmp`` with ``body``: MB/s from the first byte
    sent to the answer, and the agent's RSS growth meanwhile (the body must stream, not
    be held or spooled)."""
    path = f"/v1.41/containers/{container}/archive?path=/tmp"
    sampler = RssSampler(agent_pid) if agent_pid else None
    conn = Connection(target, timeout=IO_TIMEOUT)
    try:
        if sampler:
            sampler.__enter__()
        cpu_before = cpu_seconds(agent_pid) if agent_pid else 0.0
        start = time.perf_counter()
        head = target.request_bytes("PUT", path, b"", {"Content-Type": "application/x-tar"})
        head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % len(body))
        conn.sock.sendall(head)
        view = memoryview(body)
        for offset in range(0, len(body), 1 << 20):
            conn.sock.sendall(view[offset:offset + (1 << 20)])
        status_line = conn._readline()
        elapsed = time.perf_counter() - start
        agent_cpu = cpu_seconds(agent_pid) - cpu_before if agent_pid else 0.0
        if b" 200 " not in status_line + b" ":
            raise HTTPError(f"{target.label}: upload answered {status_line!r}")
    finally:
        if sampler:
            sampler.__exit__()
        conn.close()
    result = {"bytes": len(body), "seconds": elapsed, "mb_per_s": len(body) / MB / elapsed}
    if sampler:
        result["agent_cpu_s_per_gb"] = agent_cpu / (len(body) / 1024**3)
        result.update(rss_growth_mb=sampler.growth_mb, rss_peak_mb=sampler.peak_mb)
    return result


# ------------------------------------------------------------------ setup

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_agent(daemon: DockerDaemon, data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    # PA_BENCH_PROFILE=out.prof: the agent runs under cProfile (written when it stops).
    profile = ["-m", "cProfile", "-o", os.environ["PA_BENCH_PROFILE"]] if os.environ.get("PA_BENCH_PROFILE") else []
    command = [sys.executable, *profile, "-m", "portainer_agent", "--docker-host", daemon.url, "--host", "127.0.0.1",
               "--port", str(port), "--data-dir", str(data_dir), "--log-level", "INFO"]
    # PA_BENCH_AGENT_SRC=/path/to/checkout: measure another checkout's agent (before/after).
    source = os.environ.get("PA_BENCH_AGENT_SRC") or str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": source}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True, cwd=source)
    ping = Target("agent", port=port)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"agent exited {process.returncode}; log:\n{log_path.read_text()[-2000:]}")
        try:
            with Connection(ping, timeout=2) as conn:
                if conn.request("GET", "/ping", signed=False).status == 204:
                    return process, port
        except (OSError, EOFError, HTTPError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"agent did not answer /ping in 30 s; log:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.1)


def start_relay(daemon: DockerDaemon, scratch: Path) -> tuple[subprocess.Popen, tuple[Target, int]]:
    """socat: TLS (OpenSSL, C) on a local port to the Docker socket, the agent's certificate."""
    data = scratch / "data"
    pem = scratch / "relay.pem"
    pem.write_bytes((data / "cert.pem").read_bytes() + (data / "key.pem").read_bytes())
    port = free_port()
    # -b: 256 kB per read/write, as the agent reads both sockets (socat's default is 8 kB).
    process = subprocess.Popen(["socat", "-b", "262144", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,cert={pem},verify=0,"
                                f"nodelay", f"UNIX-CONNECT:{daemon.socket_path}"], stderr=subprocess.DEVNULL)
    target = Target("relay", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            with Connection(target, timeout=2) as conn:
                conn.request("GET", "/_ping", signed=False).expect(200)
                return process, (target, process.pid)
        except (OSError, EOFError, HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def create_containers(direct: Target, count: int, workers: int = 4, running: int | None = None,
                      name: str = "bench-sleep") -> list[str]:
    """``count`` ``sleep 3600`` busybox containers named ``<name>-<index>``, created in parallel
    and the first ``running`` (all by default) started: created-only ones list like the others
    but cost no shim process."""
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def make(indexes: range) -> None:
        try:
            for index in indexes:
                created = call(direct, "POST", f"/v1.41/containers/create?name={name}-{index}",
                               {"Image": IMAGE, "Cmd": ["sleep", "3600"], "Labels": {"pa-bench": "1"},
                                "HostConfig": {"NetworkMode": "none"}}, codes=(201,))
                if running is None or index < running:
                    call(direct, "POST", f"/v1.41/containers/{created['Id']}/start", codes=(204,))
                with lock:
                    ids.append(created["Id"])
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=make, args=(range(w, count, workers),), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    if errors:
        raise errors[0]
    return ids


def run_container(direct: Target, name: str, cmd: list[str], wait: bool) -> str:
    created = call(direct, "POST", f"/v1.41/containers/create?name={name}",
                   {"Image": IMAGE, "Cmd": cmd, "Labels": {"pa-bench": "1"},
                    "HostConfig": {"NetworkMode": "none"}}, codes=(201,))
    cid = created["Id"]
    call(direct, "POST", f"/v1.41/containers/{cid}/start", codes=(204,))
    if wait:
        result = call(direct, "POST", f"/v1.41/containers/{cid}/wait", codes=(200,), timeout=300)
        if result.get("StatusCode") != 0:
            raise RuntimeError(f"{name} exited {result}")
    return cid


# ------------------------------------------------------------------ report

def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


def collect(runs: list[dict[str, Any]], *keys: str) -> list[float]:
    values = []
    for run in runs:
        node: Any = run
        try:
            for key in keys:
                node = node[key]
        except (KeyError, TypeError):
            continue
        if node is not None:
            values.append(float(node))
    return values


def build_rows(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Table rows: medians over runs (the ratio column: median of each run's ratio), except
    RSS growth and the log overhead maximum (the worst run)."""
    def med(*keys: str) -> float | None:
        values = collect(runs, *keys)
        return median(values) if values else None

    def worst(*keys: str) -> float | None:
        values = collect(runs, *keys)
        return max(values) if values else None

    rows: list[dict[str, Any]] = []

    def row(metric: str, unit: str, keys: tuple[str, ...] | None, agent: Any, target: str = "",
            digits: int = 2, agent_text: str | None = None, met: bool | None = None) -> None:
        """``keys``: the path to a measurement under ``direct``/``agent`` (a direct-vs-agent
        row); ``agent``: the path of an agent-only figure, or the value itself."""
        direct_value = ratio = None
        if keys is not None:
            prefix, leaf = keys[:-1], keys[-1]
            direct_value, agent = med(*prefix, "direct", leaf), med(*prefix, "agent", leaf)
            # Paired: the median over runs of each run's agent/direct ratio.
            ratios = [a / d for a, d in zip(collect(runs, *prefix, "agent", leaf), collect(runs, *prefix, "direct", leaf))
                      if d]
            ratio = median(ratios) if ratios else None
        elif isinstance(agent, tuple):
            agent = med(*agent)
        rows.append({"metric": metric, "unit": unit, "direct": direct_value, "agent": agent, "ratio": ratio,
                     "target": target, "met": met, "digits": digits, "agent_text": agent_text})

    def below(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    n = args.containers
    row(f"GET /containers/json?all=1 ({n} containers), p50", "ms", ("list", "p50_ms"), None, "agent ≤ 1.15× direct")
    rows[-1]["met"] = below(rows[-1]["ratio"], 1.15)
    row(f"GET /containers/json?all=1 ({n} containers), p99", "ms", ("list", "p99_ms"), None)
    row("  agent CPU per /containers/json request (sequential)", "µs", None,
        ("list", "agent", "agent_cpu_us_per_request"), digits=0)
    for c in (1, 16):
        row(f"GET /_ping, concurrency {c}", "req/s", ("ping", f"c{c}", "rps"), None, digits=0)
        if collect(runs, "ping_wrk", f"c{c}"):
            row("  same, agent measured with wrk (C client)", "req/s", None, ("ping_wrk", f"c{c}"), digits=0)
        row(f"  agent CPU per /_ping request (c={c})", "µs", None,
            ("ping", f"c{c}", "agent", "agent_cpu_us_per_request"), digits=0)
    for c in (1, 16):
        relay_ratio = _relay_ratio(runs, ("ping_relay", f"c{c}"), "rps")
        if relay_ratio is not None:
            row(f"  /_ping c={c} through socat (C TLS relay, no Python): relay / direct", "×", None, relay_ratio)
    row("logs?follow=1 line: receive − Docker timestamp, p50", "ms", ("logs", "p50_ms"), None)
    row("logs?follow=1 line: receive − Docker timestamp, p95", "ms", ("logs", "p95_ms"), None)
    overhead, overhead_max = med("logs", "overhead", "p50_ms"), worst("logs", "overhead", "max_ms")
    row("logs?follow=1 agent overhead per line (agent − direct receive), p50 / max", "ms", None, overhead,
        "p50 ≤ 5 ms", agent_text=f"{fmt(overhead)} / {fmt(overhead_max)}", met=below(overhead, 5))
    row(f"GET /containers/{{id}}/export (~{args.export_mb} MB) throughput", "MB/s", ("export", "mb_per_s"), None,
        "agent ≥ 0.9× direct", digits=0)
    rows[-1]["met"] = None if rows[-1]["ratio"] is None else rows[-1]["ratio"] >= 0.9
    row("  agent CPU per GB exported", "s", None, ("export", "agent", "agent_cpu_s_per_gb"))
    growth = worst("export", "agent", "rss_growth_mb")
    row("agent RSS growth during the export (worst run)", "MB", None, growth, "≤ 20 MB", digits=1,
        met=below(growth, 20))
    if collect(runs, "upload", "agent", "mb_per_s"):
        upload_mb = getattr(args, "upload_mb", args.export_mb)
        row(f"PUT /containers/{{id}}/archive ({upload_mb} MB tar) throughput", "MB/s", ("upload", "mb_per_s"),
            None, "agent ≥ 0.8× direct", digits=0)
        rows[-1]["met"] = None if rows[-1]["ratio"] is None else rows[-1]["ratio"] >= 0.8
        row("  agent CPU per GB uploaded", "s", None, ("upload", "agent", "agent_cpu_s_per_gb"))
        upload_growth = worst("upload", "agent", "rss_growth_mb")
        row("agent RSS growth during the upload (worst run)", "MB", None, upload_growth, "≤ 20 MB", digits=1,
            met=below(upload_growth, 20))
    for key, what in (("export", "export"), ("upload", "upload")):
        relay_ratio = _relay_ratio(runs, (key,), "mb_per_s")
        if relay_ratio is not None:
            row(f"  {what} through socat (C TLS relay, no Python): relay / direct", "×", None, relay_ratio)
    slow_mb = med("export_slow", "bytes")
    slow_growth = worst("export_slow", "rss_growth_mb")
    row(f"agent RSS growth, slow reader at {fmt(args.slow_rate, 1)} MB/s for {fmt(args.slow_seconds, 0)} s "
        f"(read {fmt((slow_mb or 0) / MB, 0)} MB, then drop; worst run)", "MB", None, slow_growth,
        "flat (≤ 2 MB)", digits=1, met=below(slow_growth, 2))
    return rows


def _relay_ratio(runs: list[dict[str, Any]], prefix: tuple[str, ...], leaf: str) -> float | None:
    """Median over runs of relay/direct (the socat floor), if measured."""
    ratios = [r / d for r, d in zip(collect(runs, *prefix, "relay", leaf), collect(runs, *prefix, "direct", leaf))
              if d]
    return median(ratios) if ratios else None


def markdown(rows: list[dict[str, Any]], runs: int) -> str:
    lines = [f"| metric (median of {runs} run{'s' if runs != 1 else ''}) | unit | direct (unix socket) | "
             f"agent (HTTPS + signature) | agent / direct (per-run ratio, median) | target |",
             "|---|---|---:|---:|---:|---|"]
    for row in rows:
        digits = row["digits"]
        direct = fmt(row["direct"], digits) if row["direct"] is not None else "—"
        agent = row["agent_text"] or fmt(row["agent"], digits)
        ratio = f"{row['ratio']:.2f}×" if row["ratio"] is not None else "—"
        target = row["target"]
        if row["met"] is not None:
            target += ": met" if row["met"] else ": **not met**"
        lines.append(f"| {row['metric']} | {row['unit']} | {direct} | {agent} | {ratio} | {target} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ main

def _json_safe(value: Any) -> Any:
    """NaN -> null (strict JSON)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def one_run(index: int, args: argparse.Namespace, direct: Target, agent: Target, agent_pid: int,
            logger: str, big: str, relay: "tuple[Target, int] | None" = None) -> dict[str, Any]:
    run: dict[str, Any] = {"ping": {}, "ping_wrk": {}, "export": {}, "ping_relay": {}}

    def say(text: str) -> None:
        print(f"[run {index + 1}/{args.runs}] {text}", file=sys.stderr, flush=True)

    only = getattr(args, "only", None)
    if only in (None, "list"):
        say(f"containers/json latency ({args.requests} requests per path, alternating)")
        run["list"] = bench_list_latency(direct, agent, args.requests, agent_pid)
    if only in (None, "ping"):
        for c in (1, 16):
            say(f"/_ping load, concurrency {c}")
            run["ping"][f"c{c}"] = bench_ping(direct, agent, c, args.ping_seconds, agent_pid)
            if relay is not None:
                run["ping_relay"][f"c{c}"] = bench_ping(direct, relay[0], c, args.ping_seconds, relay[1])
            if not args.no_wrk:
                run["ping_wrk"][f"c{c}"] = bench_ping_wrk(agent, c, args.ping_seconds)
    if only is None:
        say(f"logs follow ({args.log_seconds:g} s)")
        run["logs"] = bench_logs(direct, agent, logger, args.log_seconds)
    if only in (None, "transfer"):
        # The slow reader goes first: a full-speed export before it could leave the agent's
        # allocator holding freed memory, which would hide growth from a later VmRSS baseline.
        say("export, slow reader")
        run["export_slow"] = bench_export(agent, big, agent_pid, slow_rate=args.slow_rate * MB,
                                          slow_seconds=args.slow_seconds)
        # The agent must still answer after the slow reader dropped its connection mid-body.
        with Connection(agent, timeout=10) as conn:
            conn.request("GET", "/_ping").expect(200)
        say("export, full speed")
        run["export"]["direct"] = bench_export(direct, big, None)
        run["export"]["agent"] = bench_export(agent, big, agent_pid)
        if relay is not None:
            run["export"]["relay"] = bench_export(relay[0], big, None)
        if args.upload_mb:
            say(f"upload, {args.upload_mb} MB (PUT /containers/{{id}}/archive)")
            body = upload_body(args.upload_mb * MB)
            run["upload"] = {"direct": bench_upload(direct, big, body, None),
                             "agent": bench_upload(agent, big, body, agent_pid)}
            if relay is not None:
                run["upload"]["relay"] = bench_upload(relay[0], big, body, None)
            del body
    run["agent_rss_mb_after"] = read_rss_kb(agent_pid) / 1024
    return run


def merge(args: argparse.Namespace) -> int:
    """One table (medians over all runs) from several ``--json`` outputs of the same settings."""
    runs: list[dict[str, Any]] = []
    loads: list[float] = []
    for path in args.merge:
        data = json.loads(path.read_text())
        runs += data["runs"]
        loads += [data["machine"]["loadavg_before"][0], data["machine"]["loadavg_after"][0]]
        for key in ("containers", "export_mb", "slow_rate", "slow_seconds", "upload_mb"):
            setattr(args, key, data["config"].get(key, 0))
    table = markdown(build_rows(runs, args), len(runs))
    table += (f"\n\n{len(args.merge)} invocations, {len(runs)} runs; 1-min load average "
              f"{min(loads):.1f}–{max(loads):.1f} at their starts and ends.")
    print(table)
    if args.json:
        args.json.write_text(json.dumps(_json_safe({"merged": [str(p) for p in args.merge], "markdown": table,
                                                    "table": build_rows(runs, args)}), indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repeat every measurement N times (median shown)")
    parser.add_argument("--requests", type=int, default=300, help="sequential /containers/json requests per path")
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--ping-seconds", type=float, default=3.0)
    parser.add_argument("--log-seconds", type=float, default=6.0, help="follow logs this long (a line per 200 ms)")
    parser.add_argument("--export-mb", type=int, default=200)
    parser.add_argument("--relay", action="store_true",
                        help="also measure a C TLS relay (socat) in front of the socket: the floor of the extra hop")
    parser.add_argument("--upload-mb", type=int, default=200, help="PUT /containers/{id}/archive size (0: skip)")
    parser.add_argument("--only", choices=("list", "ping", "transfer"), help="measure only these rows")
    parser.add_argument("--slow-rate", type=float, default=2.0, help="slow reader speed, MB/s")
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk cross-check even if wrk is installed")
    parser.add_argument("--json", type=Path, help="also write the table and raw runs as JSON here")
    parser.add_argument("--quick", action="store_true", help="1 run, fewer requests, 20 MB export (smoke test)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: print one table over every run in these --json files")
    args = parser.parse_args()
    if args.merge:
        return merge(args)
    if args.quick:
        args.runs, args.requests, args.ping_seconds, args.log_seconds = 1, 50, 1.0, 2.0
        args.export_mb, args.slow_seconds, args.containers, args.upload_mb = 20, 2.0, 10, 20
    if os.geteuid() != 0:
        print("bench/proxy.py needs root (it starts dockerd): sudo .venv/bin/python bench/proxy.py",
              file=sys.stderr)
        return 2
    missing = missing_tools()
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    daemon: DockerDaemon | None = None
    agent_process: subprocess.Popen | None = None
    relay_process: subprocess.Popen | None = None
    scratch = Path(tempfile.mkdtemp(prefix="pa-bench-agent-"))
    started = time.time()
    try:
        print("starting dockerd ...", file=sys.stderr, flush=True)
        daemon = DockerDaemon.start(make_workdir("bench"), "benchnode")
        daemon.import_busybox(IMAGE)
        direct = Target("direct", unix=daemon.socket_path)
        print(f"creating {args.containers} containers and a {args.export_mb} MB filesystem ...",
              file=sys.stderr, flush=True)
        create_containers(direct, args.containers)
        logger = run_container(direct, "bench-logger", [
            "sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; usleep 200000; done"], wait=False)
        big = run_container(direct, "bench-big", [
            "dd", "if=/dev/urandom", "of=/big", "bs=1M", f"count={args.export_mb}"], wait=True)
        print("starting the agent ...", file=sys.stderr, flush=True)
        agent_process, port = start_agent(daemon, scratch / "data", scratch / "agent.log")
        agent = Target("agent", port=port, headers=PortainerSigner.generate().headers())
        listed = call(agent, "GET", "/v1.41/containers/json?all=1")
        if len(listed) < args.containers:
            raise RuntimeError(f"agent lists {len(listed)} containers, expected >= {args.containers}")
        relay_target = None
        if args.relay:
            relay_process, relay_target = start_relay(daemon, scratch)
        load_before = os.getloadavg()
        runs = [one_run(i, args, direct, agent, agent_process.pid, logger, big, relay_target)
                for i in range(args.runs)]
        rows = build_rows(runs, args)
        table = markdown(rows, len(runs))
        problems = [line for line in (scratch / "agent.log").read_text(errors="replace").splitlines()
                    if "[WARN" in line or "[ERROR" in line or "[CRITICAL" in line or "Traceback" in line]
        for line in problems[:10]:
            print(f"agent log: {line}", file=sys.stderr)
        load_after = os.getloadavg()
        table += (f"\n\n{os.cpu_count()} CPUs; 1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
                  f"{len(runs)} run(s), {time.time() - started:.0f} s in all.")
        print(table)
        if args.json:
            args.json.write_text(json.dumps(_json_safe({
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "seconds": round(time.time() - started, 1),
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after},
                "agent_log_problems": problems[:50],
                "table": [{k: v for k, v in row.items() if k not in ("digits", "agent_text")} for row in rows],
                "markdown": table,
                "runs": runs,
            }), indent=2))
        return 0
    except KeyboardInterrupt:
        print("interrupted; cleaning up ...", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if agent_process is not None:
            terminate(agent_process.pid, 15, agent_process)
        if relay_process is not None:
            relay_process.terminate()
            relay_process.wait(10)
        if daemon is not None:
            daemon.stop()
        if os.environ.get("PA_BENCH_KEEP_LOGS"):
            print(f"agent log kept in {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
