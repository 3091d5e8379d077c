"""Volume browser throughput, local: ``get``/``put`` of one file through the agent
vs ``cat``/``cp`` of the same file on the same disk, in the same run, with the
agent's RSS growth.

    sudo .venv/bin/python bench/browse.py [--mb 200]

Starts its own dockerd (as the integration tests do) and one agent on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.support import AgentProcess, shared_daemon  # noqa: E402
from tests.integration.test_browse import BOUNDARY, MB, PeakRSS, multipart_stream  # noqa: E402


def timed(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    size = parser.parse_args().mb * MB
    daemon = shared_daemon()
    agent = AgentProcess.start(daemon.socket_path, args=["--log-level", "INFO"])
    volume = "pabr-bench"
    try:
        daemon.docker("volume", "create", volume)
        data = Path(json.loads(daemon.docker("volume", "inspect", volume).stdout)[0]["Mountpoint"])
        length, chunks, digest = multipart_stream("/", "big.bin", size, b"bench")
        watch = PeakRSS(agent.proc.pid)
        started = time.monotonic()
        status, _, body = agent.request("POST", f"/browse/put?volumeID={volume}", body=chunks,  # type: ignore[arg-type]
                                        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                                                 "Content-Length": str(length)}, timeout=600)
        put_s, put_rss = time.monotonic() - started, watch.stop()
        assert status == 204, (status, body)
        watch = PeakRSS(agent.proc.pid)
        started = time.monotonic()
        conn = agent.connection(600)
        conn.request("GET", f"/browse/get?volumeID={volume}&path=big.bin", headers=agent.headers)
        response = conn.getresponse()
        received = hashlib.sha256()
        while chunk := response.read(MB):
            received.update(chunk)
        conn.close()
        get_s, get_rss = time.monotonic() - started, watch.stop()
        assert received.hexdigest() == digest
        cp_s = timed(["cp", str(data / "big.bin"), str(data / "copy.bin")])
        subprocess.run(["sync"], check=True)
        cat_s = timed(["sh", "-c", f"cat {data / 'big.bin'} > /dev/null"])
        mb = size / MB
        print(f"| operation | seconds | MB/s | agent RSS growth |")
        print(f"|---|---:|---:|---:|")
        print(f"| put via agent ({mb:.0f} MB, fsync) | {put_s:.2f} | {mb / put_s:.0f} | {put_rss / 1024:.1f} MB |")
        print(f"| cp on the same disk (no fsync) | {cp_s:.2f} | {mb / cp_s:.0f} | |")
        print(f"| get via agent | {get_s:.2f} | {mb / get_s:.0f} | {get_rss / 1024:.1f} MB |")
        print(f"| cat > /dev/null | {cat_s:.2f} | {mb / cat_s:.0f} | |")
    finally:
        agent.cleanup()
        daemon.docker("volume", "rm", "-f", volume, check=False)
        daemon.stop()


if __name__ == "__main__":
    main()
