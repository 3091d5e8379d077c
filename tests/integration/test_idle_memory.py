"""Idle RSS of a real standalone agent against a real dockerd (issue 15).

An absolute figure depends on the interpreter, the library versions and whether
bytecode is cached, so the budget is what the agent holds *above the floor*: a fresh
interpreter of the same Python that imports only what no agent can do without (the
reactor with pyOpenSSL and cryptography, twisted.web's server and client, the
service tree), measured on the same machine in the same run. Measured here: floor
49.1 MB; the agent 58.1 MB before the on-demand imports (9.0 above), 53.7 MB after
(4.6 above). ``bench/idle_rss.py`` prints the figures of a standalone agent and of
a 3-node Swarm.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support import AgentProcess, RealDockerTestCase

#: MB an idle standalone agent may hold above the floor (fails on the code before issue 15: 9.0).
BUDGET_ABOVE_FLOOR_MB = 7.0

FLOOR_PROGRAM = """
from twisted.internet import reactor
import twisted.application.service, twisted.web.client, twisted.web.server
print(open("/proc/self/status").read())
"""


def rss_mb(status: str) -> float:
    """``VmRSS`` of a ``/proc/<pid>/status`` text, in MB."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError("no VmRSS line")


def process_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return rss_mb(status.read())


def idle_rss_mb(pid: int, timeout: float = 30, still_for: float = 1.5, step: float = 0.25) -> float:
    """The RSS of ``pid`` once it has not moved by more than one page for ``still_for``
    seconds (the start's work done), polled under a deadline."""
    deadline = time.monotonic() + timeout
    last, since = process_rss_mb(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(step)
        now = process_rss_mb(pid)
        if abs(now - last) > 4 / 1024:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still_for:
            return now
    raise AssertionError(f"the RSS of {pid} did not settle within {timeout}s (last {last:.1f} MB)")


def floor_rss_mb() -> float:
    """The RSS of an interpreter holding only the stack every agent needs."""
    result = subprocess.run([sys.executable, "-c", FLOOR_PROGRAM], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ), check=True)
    return rss_mb(result.stdout)


class IdleMemoryTests(RealDockerTestCase, SynchronousTestCase):
    class_agent = False

    def test_idle_standalone_agent_stays_within_budget_above_the_floor(self) -> None:
        agent = AgentProcess.start(self.daemon.socket_path, args=["--log-level", "INFO"])
        self.addCleanup(agent.cleanup)
        idle = idle_rss_mb(agent.proc.pid)
        floor = floor_rss_mb()
        self.assertLessEqual(idle - floor, BUDGET_ABOVE_FLOOR_MB,
                             f"idle agent {idle:.1f} MB, floor {floor:.1f} MB: {idle - floor:.1f} MB above "
                             f"(budget {BUDGET_ABOVE_FLOOR_MB} MB)")
        self.assertEqual(agent.request("GET", "/ping", signed=False)[0], 204)  # idle, not dead


class RssParsingTests(SynchronousTestCase):
    def test_reads_vmrss_in_mb(self) -> None:
        self.assertEqual(rss_mb("Name:\tpython\nVmRSS:\t   51200 kB\nRssAnon:\t 1 kB\n"), 50.0)

    def test_floor_is_below_any_agent(self) -> None:
        """The floor program runs here and is a plausible interpreter size."""
        self.assertGreater(floor_rss_mb(), 5)
