"""Both entry points, ``portainer-agent`` and ``twistd -n portainer-agent``, behave the
same in real processes: options and environment, log level and format, exit codes
(0 after SIGTERM, 1 when Docker is unreachable or the port is taken, 2 on a bad
option); and twistd's own --pidfile/--logfile/--umask keep working."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.entrypoints import ENTRY_POINTS, run, start_agent
from tests.integration.support import RealDockerTestCase


class EntryPointCases(RealDockerTestCase):
    class_agent = False
    entry = "console"

    def start(self, **kwargs):  # type: ignore[no-untyped-def]
        agent = start_agent(self.entry, self.daemon.socket_path, **kwargs)
        self.addCleanup(agent.cleanup)
        return agent

    def assertOneLine(self, text: str, expected: str) -> None:
        self.assertNotIn("Traceback", text)
        self.assertIn(expected, text)
        # twistd's own start/stop lines aside, the failure is said once.
        self.assertEqual(text.count(expected), 1, text)

    def test_bad_option_exits_2_with_one_line(self) -> None:
        result = run(self.entry, ["--port", "99999"])
        self.assertEqual(result.returncode, 2, result.stderr + result.stdout)
        self.assertEqual(result.stderr.splitlines()[0], "portainer-agent: error: invalid --port: port out of range "
                                                         "(0-65535): 99999")
        self.assertNotIn("Options:", result.stdout + result.stderr)  # not a help dump
        result = run(self.entry, ["--no-such-flag"])
        self.assertEqual(result.returncode, 2)
        result = run(self.entry, [], env={"AGENT_HEADER_TIMEOUT": "soon"})
        self.assertEqual(result.returncode, 2)
        self.assertIn("invalid AGENT_HEADER_TIMEOUT", result.stderr)

    def test_docker_unreachable_exits_1_with_one_line(self) -> None:
        workdir = tempfile.mkdtemp(prefix="pa-ops-")
        self.addCleanup(shutil.rmtree, workdir, True)
        result = run(self.entry, ["--docker-host", "unix:///nonexistent/docker.sock", "--data-dir", workdir,
                                  "--port", "0"])
        self.assertEqual(result.returncode, 1, result.stderr + result.stdout)
        self.assertOneLine(result.stderr, "/nonexistent/docker.sock")

    def test_port_taken_exits_1_with_one_line(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            agent = self.start(port=port, wait=False)
            self.assertEqual(agent.proc.wait(60), 1, agent.log_text)
        self.assertOneLine(agent.log_text, f"cannot listen on 127.0.0.1:{port}")

    def test_sigterm_exits_0_and_log_level_applies(self) -> None:
        agent = self.start(args=["--log-level", "WARN"])
        self.assertEqual(agent.request("GET", "/ping", signed=False)[0], 204)
        self.assertEqual(agent.stop(signal.SIGTERM), 0)
        self.assertNotIn("[INFO]", agent.log_text)
        self.assertNotIn("[DEBUG]", agent.log_text)

    def test_json_format_and_level_from_the_environment(self) -> None:
        agent = self.start(args=[], env={"LOG_FORMAT": "json", "LOG_LEVEL": "debug"})
        self.assertEqual(agent.request("GET", "/ping", signed=False)[0], 204)
        self.assertEqual(agent.stop(signal.SIGTERM), 0)
        records = [json.loads(line) for line in agent.log_text.splitlines() if line.strip()]
        self.assertIn("/ping", [r.get("path") for r in records if r.get("ns") == "portainer_agent.access"])
        self.assertIn("debug", {r["level"] for r in records})


class ConsoleEntryPointTests(EntryPointCases, SynchronousTestCase):
    entry = "console"


class TwistdEntryPointTests(EntryPointCases, SynchronousTestCase):
    entry = "twistd"

    def test_pidfile_logfile_and_umask(self) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="pa-ops-"))
        self.addCleanup(shutil.rmtree, workdir, True)
        pidfile, logfile = workdir / "agent.pid", workdir / "agent.log"
        agent = self.start(args=["--log-format", "json"],
                           twistd_args=[f"--pidfile={pidfile}", f"--logfile={logfile}", "--umask=0077"])
        self.assertEqual(int(pidfile.read_text()), agent.proc.pid)
        # twistd applies --umask after loading the plugin and opening the log, before
        # writing the pid file: the pid file shows it applied.
        self.assertEqual(stat.S_IMODE(os.stat(pidfile).st_mode) & 0o077, 0)
        self.assertEqual(agent.stop(signal.SIGTERM), 0)
        self.assertFalse(pidfile.exists())
        lines = [json.loads(line) for line in logfile.read_text().splitlines() if line.strip()]
        self.assertTrue(any("agent API listening" in r["msg"] for r in lines))
        self.assertEqual(agent.log_text.strip(), "")  # everything went to --logfile


class HelpTests(SynchronousTestCase):
    def test_help_is_the_same_for_both_and_machine_independent(self) -> None:
        outputs = {}
        for entry in ENTRY_POINTS:
            result = run(entry, ["--help"], env={"HOME": "/some/home", "XDG_STATE_HOME": "/some/state"})
            self.assertEqual(result.returncode, 0, result.stderr)
            outputs[entry] = result.stdout
            self.assertNotIn("/some/", result.stdout)
            self.assertIn("--metrics-addr", result.stdout)
        options = {entry: text[text.index("Options:"):] for entry, text in outputs.items()}
        self.assertEqual(options["console"].split(), options["twistd"].split())

    def test_readme_options_table_matches_the_option_table(self) -> None:
        from portainer_agent.options import OPTIONS

        readme = (Path(__file__).parents[2] / "README.md").read_text()
        missing = [spec.flag for spec in OPTIONS if f"| `--{spec.flag}` | `{spec.env}` | {spec.default_text} |" not in readme]
        self.assertEqual(missing, [], "README options table rows missing or out of date")
