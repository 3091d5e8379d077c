"""DockerDaemon against a real dockerd: it starts in its own namespace with its own name,
runs busybox containers without a registry, and leaves nothing behind when stopped or
when its leftovers are killed after a crash."""
from __future__ import annotations

import os
import signal

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.lab.dockerd import (
    DockerCommandError,
    DockerDaemon,
    DockerDaemonError,
    kill_leftovers,
    make_workdir,
    mounts_under,
    processes_under,
    wait_for_exit,
)
from portainer_agent.testing.gates import Need, require

from tests.integration.support import SHARED_DAEMON_NAME, RealDockerTestCase


class DockerDaemonTests(RealDockerTestCase, SynchronousTestCase):
    """The test session's daemon (the one the single-node end-to-end tests use), read only."""

    class_agent = False
    daemon: DockerDaemon

    def test_daemon_name_is_its_hostname(self) -> None:
        info = self.daemon.docker("info", "--format", "{{.Name}} {{.Driver}}").stdout.split()
        self.assertEqual(info, [SHARED_DAEMON_NAME, "vfs"])

    def test_paths_are_short_and_inside_the_workdir(self) -> None:
        self.assertLess(len(self.daemon.socket_path), 108)
        self.assertTrue(self.daemon.url.startswith("unix:///tmp/pa-"))
        self.assertEqual(self.daemon.data_root, self.daemon.workdir / "data")
        self.assertTrue(self.daemon.ping())

    def test_busybox_image_runs_its_applets(self) -> None:
        result = self.daemon.docker("run", "--rm", "busybox:local", "sh", "-c",
                                    "seq 3 | wc -l; echo hi | tr a-z A-Z; hostname; id -u")
        lines = result.stdout.split()
        self.assertEqual(lines[0], "3")
        self.assertEqual(lines[1], "HI")
        self.assertEqual(lines[3], "0")

    def test_docker_input_and_failures(self) -> None:
        result = self.daemon.docker("run", "--rm", "-i", "busybox:local", "cat", input="piped\n")
        self.assertEqual(result.stdout, "piped\n")
        error = self.assertRaises(DockerCommandError, self.daemon.docker, "inspect", "no-such-container")
        self.assertIn("no-such-container", str(error))
        self.assertNotEqual(self.daemon.docker("inspect", "no-such-container", check=False).returncode, 0)

    def test_daemon_does_not_see_the_hosts_network(self) -> None:
        result = self.daemon.docker("run", "--rm", "--network", "host", "busybox:local", "cat", "/proc/net/dev")
        interfaces = {line.split(":")[0].strip() for line in result.stdout.splitlines() if ":" in line}
        self.assertNotIn("eth0", interfaces)
        self.assertIn("docker0", interfaces)


class DockerDaemonLifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        require(Need.ROOT, Need.DOCKERD)

    def test_stop_removes_containers_processes_mounts_and_workdir(self) -> None:
        with DockerDaemon.temporary("lifecycle") as daemon:
            daemon.import_busybox()
            daemon.docker("run", "-d", "busybox:local", "sleep", "3600")
            self.assertTrue(processes_under(daemon.workdir))
        self.assertFalse(daemon.workdir.exists())
        self.assertEqual(processes_under(daemon.workdir), [])
        self.assertEqual(mounts_under(daemon.workdir), [])
        self.assertFalse(daemon.running)

    def test_kill_leftovers_cleans_up_after_a_killed_daemon(self) -> None:
        daemon = DockerDaemon.temporary("crashed")
        self.addCleanup(kill_leftovers, daemon.workdir, True)
        daemon.import_busybox()
        container = daemon.docker("run", "-d", "busybox:local", "sleep", "3600").stdout.strip()
        self.assertTrue(container)
        os.kill(daemon.pid, signal.SIGKILL)  # the crash: containerd, the shim, the container stay
        self.assertTrue(wait_for_exit(daemon.pid, 10, daemon.process))
        self.assertTrue(processes_under(daemon.workdir))
        kill_leftovers(daemon.workdir, remove=True)
        self.assertEqual(processes_under(daemon.workdir), [])
        self.assertEqual(mounts_under(daemon.workdir), [])
        self.assertFalse(daemon.workdir.exists())

    def test_failed_start_raises_with_the_log_and_cleans_up(self) -> None:
        workdir = make_workdir()
        error = self.assertRaises(DockerDaemonError, DockerDaemon.start, workdir, "broken", timeout=20,
                                  extra_args=["--no-such-flag"])
        self.assertIn("no-such-flag", str(error))
        self.assertFalse(workdir.exists())
