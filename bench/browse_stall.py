"""Does a big ``/browse/ls`` stall the agent? A volume with N files (100,000 by default) is
listed through a real agent while another connection sends ``GET /ping`` every ~10 ms;
the script reports the listing time and the ping latencies during the listing.

    sudo .venv/bin/python bench/browse_stall.py [--files 100000] [--rounds 3]

Starts its own dockerd (as the integration tests do) and one agent on 127.0.0.1. To
measure another checkout of the agent (e.g. the code before a change), run the script
with ``PYTHONPATH`` pointing at that checkout: the agent process inherits it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.support import AgentProcess, shared_daemon  # noqa: E402


def fill(directory: Path, count: int) -> None:
    """``count`` small files (names of varied length, a few bytes each)."""
    existing = len(os.listdir(directory))
    for index in range(existing, count):
        with open(directory / f"file-{index:06d}-{'x' * (index % 17)}.txt", "wb") as handle:
            handle.write(b"%d\n" % index)


class Pinger:
    """``GET /ping`` on one kept-alive connection every ``interval`` seconds, in a thread;
    records (sent at, latency) pairs."""

    def __init__(self, agent: AgentProcess, interval: float = 0.01) -> None:
        self.agent = agent
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Pinger":
        self._thread.start()
        return self

    def _run(self) -> None:
        conn = self.agent.connection(60)
        try:
            while not self._stop.is_set():
                sent = time.monotonic()
                conn.request("GET", "/ping")
                response = conn.getresponse()
                response.read()
                assert response.status == 204, response.status
                self.samples.append((sent, time.monotonic() - sent))
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - sent)))
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> list[float]:
        """Latencies of the pings in flight at some time in [start, end]."""
        return [latency for sent, latency in self.samples if sent <= end and sent + latency >= start]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def list_once(agent: AgentProcess, volume: str) -> tuple[float, bytes]:
    """(seconds to the last byte, the answer); checked by the caller once the pings
    stopped (decoding 8 MB of JSON here would hold this process's GIL, and the pinger)."""
    conn = agent.connection(600)
    try:
        started = time.monotonic()
        conn.request("GET", f"/browse/ls?volumeID={volume}&path=/", headers=agent.headers)
        response = conn.getresponse()
        body = response.read()
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    assert response.status == 200, (response.status, body[:200])
    return elapsed, body


def check(body: bytes, expected: int) -> None:
    assert len(json.loads(body)) == expected


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    daemon = shared_daemon()
    agent = AgentProcess.start(daemon.socket_path, args=["--log-level", "INFO"])
    volume = "pabr-stall"
    try:
        daemon.docker("volume", "create", volume)
        data = Path(json.loads(daemon.docker("volume", "inspect", volume).stdout)[0]["Mountpoint"])
        fill(data, arguments.files)
        check(list_once(agent, volume)[1], arguments.files)  # warm the dentry cache and the agent
        for round_number in range(arguments.rounds):
            pinger = Pinger(agent).start()
            time.sleep(0.3)  # a baseline of pings before the listing
            started = time.monotonic()
            elapsed, body = list_once(agent, volume)
            ended = time.monotonic()
            time.sleep(0.1)
            pinger.stop()
            check(body, arguments.files)
            during = pinger.between(started, ended)
            baseline = [latency for sent, latency in pinger.samples if sent + latency < started]
            print(f"round {round_number + 1}: {arguments.files} entries listed in {elapsed * 1000:.0f} ms;"
                  f" {len(during)} pings during it: max {max(during) * 1000:.1f} ms,"
                  f" p99 {percentile(during, 0.99) * 1000:.1f} ms, median {statistics.median(during) * 1000:.1f} ms"
                  f" (before the listing: median {statistics.median(baseline) * 1000:.1f} ms)", flush=True)
    finally:
        agent.stop()
        agent.cleanup()
        daemon.docker("volume", "rm", "-f", volume, check=False)


if __name__ == "__main__":
    main()
