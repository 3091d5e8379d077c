"""The one skip gate of the test suite: each reason a machine cannot run a test, said once.

Tests that need something the machine may lack call :func:`require` (in ``setUp`` or
``setUpClass``) with what they need; it raises ``SkipTest`` naming the first missing need
and how to get it. :func:`missing` answers the same question without raising, for callers
that must decide before a test runs (the lab's class fixture, a test module's banner).

A broken import is never a reason to skip: the needs below only look at the machine.
"""
from __future__ import annotations

import enum
import os
import shutil
import unittest
from pathlib import Path

__all__ = ["Need", "missing", "require"]

#: Where the deployment test caches the image's root file system (no debootstrap needed then).
ROOTFS_CACHE = Path("/var/cache/portainer-agent-image")


class Need(enum.Enum):
    """What a test may need from the machine."""

    #: Network namespaces, bridges, iptables and dockerd all need root.
    ROOT = "root"
    #: dockerd, containerd, runc, the docker CLI, iproute2, iptables, util-linux and busybox-static.
    DOCKERD = "dockerd"
    #: busybox-static alone (the image the lab imports as busybox:local).
    BUSYBOX = "busybox"
    #: A statically linked docker CLI (mounted into busybox containers).
    STATIC_DOCKER_CLI = "static-docker-cli"
    #: The deployment tests (image build + stack deploy, minutes): opt in with PA_DEPLOY_TESTS=1.
    DEPLOY = "deploy"
    #: Prometheus 2.x and promtool (Debian's prometheus package), for deploy/prometheus.
    PROMETHEUS = "prometheus"


def _why_not(need: Need) -> str | None:
    if need is Need.ROOT:
        return None if os.geteuid() == 0 else "needs root (network namespaces, bridges, iptables, dockerd)"
    if need is Need.DOCKERD:
        from portainer_agent.lab.dockerd import INSTALL_HINT, missing_tools

        tools = missing_tools()
        return f"needs {', '.join(tools)}: {INSTALL_HINT}" if tools else None
    if need is Need.BUSYBOX:
        from portainer_agent.lab.dockerd import BUSYBOX_PATHS

        present = any(os.path.exists(path) for path in BUSYBOX_PATHS)
        return None if present else "needs busybox-static (apt-get install busybox-static)"
    if need is Need.STATIC_DOCKER_CLI:
        import subprocess

        cli = shutil.which("docker")
        if cli is None:
            return "needs the docker CLI (apt-get install docker.io)"
        kind = subprocess.run(["file", "-L", cli], capture_output=True, text=True).stdout
        return None if "statically linked" in kind else f"{cli} is not a static binary; it cannot run in busybox"
    if need is Need.DEPLOY:
        if os.environ.get("PA_DEPLOY_TESTS") != "1":
            return "deployment tests are slow (image build + stack deploy) and opt-in: set PA_DEPLOY_TESTS=1"
        if shutil.which("debootstrap") is None and not any(ROOTFS_CACHE.glob("rootfs-*.tar")):
            return f"needs debootstrap (apt-get install debootstrap) or a cached rootfs in {ROOTFS_CACHE}"
        return None
    if need is Need.PROMETHEUS:
        absent = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
        return f"needs {' and '.join(absent)} (apt-get install prometheus)" if absent else None
    raise AssertionError(f"unknown need {need!r}")


def missing(*needs: Need) -> str | None:
    """Why this machine cannot give every one of ``needs`` (the first missing one), or None."""
    for need in needs:
        reason = _why_not(need)
        if reason is not None:
            return reason
    return None


def require(*needs: Need) -> None:
    """Skip the calling test (or class fixture) with the reason when a need is missing."""
    reason = missing(*needs)
    if reason is not None:
        raise unittest.SkipTest(reason)
