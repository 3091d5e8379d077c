#!/usr/bin/env python
"""Idle RSS of the agent (issue 15 target: <= 40 MB per agent): a standalone agent
against a real dockerd, then each agent of a 3-node lab Swarm once membership has
converged.

    sudo .venv/bin/python bench/idle_rss.py [--settle 10] [--no-lab] [--prefix pabench2 --subnet 10.77.91.0/24]

The first row is the floor: a bare interpreter with the stack every agent needs. "Idle" means: the agent answered ``/ping``, (in the Swarm) every agent lists every
member on ``/agents``, then ``--settle`` seconds passed with no request. Reads
``VmRSS`` (and its anonymous/file split, ``RssAnon``/``RssFile``) from
``/proc/<pid>/status``. Which modules the agent imports at start is checked by
``tests/unit/test_startup_imports.py``. Agents started from a checkout under
``PYTHONDONTWRITEBYTECODE=1`` compile the package at every start (about 1.3 MB more
than with cached bytecode, as an installed package has). Needs root (dockerd, and network namespaces for the lab).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portainer_agent.lab.harness import Lab  # noqa: E402
from portainer_agent.lab.testing import lab_skip_reason  # noqa: E402
from tests.integration.support import AgentProcess, shared_daemon  # noqa: E402
from tests.integration.test_idle_memory import FLOOR_PROGRAM  # noqa: E402


def memory_of(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of ``pid``, in MB."""
    figures: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                figures[key] = int(value.split()[0]) / 1024
    return figures


def row(name: str, pid: int) -> str:
    figures = memory_of(pid)
    return (f"| {name} | {figures['VmRSS']:.1f} | {figures['RssAnon']:.1f} | {figures['RssFile']:.1f} "
            f"| {figures['VmHWM']:.1f} |")


def header() -> str:
    return "| agent | VmRSS MB | RssAnon MB | RssFile MB | VmHWM MB |\n|---|---:|---:|---:|---:|"


def floor() -> None:
    """The same figures for an interpreter holding only what every agent needs (the
    reactor with pyOpenSSL and cryptography, twisted.web, the service tree)."""
    program = FLOOR_PROGRAM.replace('print(open("/proc/self/status").read())', "import os, sys; sys.stdout.write(os.linesep)")
    with subprocess.Popen([sys.executable, "-c", program + "\nimport sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stdin is not None
        process.stdout.readline()
        print(row("floor (python + twisted + pyOpenSSL)", process.pid))
        process.stdin.close()


def standalone(settle: float, extra: list[str]) -> None:
    daemon = shared_daemon()
    agent = AgentProcess.start(daemon.socket_path, args=["--log-level", "INFO", *extra])
    try:
        time.sleep(settle)
        print(row("standalone", agent.proc.pid))
    finally:
        agent.cleanup()
        daemon.stop()


def swarm(settle: float, prefix: str, subnet: str, extra: list[str]) -> None:
    lab = Lab(prefix=prefix, subnet=subnet, nodes_count=3, managers=2,
              agent_args=("--log-level", "INFO", *extra))
    try:
        lab.up()
        names = {node.name for node in lab.nodes}

        def converged() -> bool:
            for node in lab.nodes:
                response = lab.agent_request(node, "/agents")
                if response is None or response.status != 200:
                    return False
                if {member.get("NodeName") for member in response.json()} != names:
                    return False
            return True

        lab.wait_for(converged, 60, "membership to converge on every agent")
        time.sleep(settle)
        for node in lab.nodes:
            assert node.agent is not None
            print(row(f"swarm {node.name} ({node.role})", node.agent.pid))
    finally:
        lab.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=10, help="idle seconds before reading RSS")
    parser.add_argument("--no-lab", action="store_true", help="only the standalone agent")
    parser.add_argument("--prefix", default="pabench2")
    parser.add_argument("--subnet", default="10.77.91.0/24")
    parser.add_argument("--agent-arg", action="append", default=[], help="extra agent argument (repeatable)")
    args = parser.parse_args()
    reason = lab_skip_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    print(header())
    floor()
    standalone(args.settle, args.agent_arg)
    if not args.no_lab:
        swarm(args.settle, args.prefix, args.subnet, args.agent_arg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
