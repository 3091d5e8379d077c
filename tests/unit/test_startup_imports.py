"""What the agent imports to start (issue 15, idle RSS): the console, metrics and
peer/fan-out stacks are imported when first needed, and nothing test-only ever is.

Each check runs in a fresh interpreter (``sys.modules`` of this test process holds
whatever other tests imported) and reads that interpreter's ``sys.modules``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.metrics import AgentMetrics, NoMetrics
from portainer_agent.memory import release_free_heap

#: Never imported by the runtime: test and lab tooling (docker-py and hypothesis are test dependencies).
TEST_ONLY = ("docker", "hypothesis", "portainer_agent.lab", "portainer_agent.testing", "tests")
#: Imported when first needed: the console (wsproto, h11), metrics (prometheus_client, only with
#: --metrics-addr), the peer and fan-out stack (treq, msgspec; a Swarm only), membership (AMP, SWIM).
ON_DEMAND = ("wsproto", "h11", "prometheus_client", "treq", "msgspec", "twisted.protocols.amp",
             "portainer_agent.console.session", "portainer_agent.proxy.fanout", "portainer_agent.proxy.peer",
             "portainer_agent.cluster.service", "portainer_agent.http.metrics_endpoint")

#: Builds the service tree of a standalone agent (no Swarm, no --metrics-addr) on a
#: MemoryReactor, as ``build_agent_service`` does after reading Docker's identity.
BUILD_STANDALONE = """
import tempfile
from pathlib import Path
from twisted.internet.testing import MemoryReactorClock
from portainer_agent.docker.identity import NodeIdentity
from portainer_agent.options import AgentOptions
from portainer_agent.tap import AgentService
from portainer_agent.tls.certs import load_or_generate

data = Path(tempfile.mkdtemp(prefix="pa-imports-"))
options = AgentOptions({})
options.parseOptions(["--data-dir", str(data), "--docker-host", "unix:///nonexistent.sock"])
identity = NodeIdentity(name="standalone")
service = AgentService(options.config, identity, load_or_generate(data, ["standalone"]), MemoryReactorClock())
assert service.cluster is None
"""


def modules_after(code: str) -> set[str]:
    """The module names loaded once ``code`` ran in a fresh interpreter (this checkout's
    package first on the path, as the agent processes of the integration tests)."""
    program = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"the program failed:\n{result.stderr}")
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (packages count with their submodules) are in ``modules``."""
    return sorted(name for name in names if any(m == name or m.startswith(name + ".") for m in modules))


class StartupImportTests(SynchronousTestCase):
    def test_start_up_modules_import_no_optional_or_test_stack(self) -> None:
        """The modules of both entry points (console script, twistd plugin)."""
        modules = modules_after("import portainer_agent.cli, portainer_agent.tap, portainer_agent.logs\n"
                                "from twisted.internet import reactor")
        self.assertEqual(loaded(modules, TEST_ONLY + ON_DEMAND), [])

    def test_building_a_standalone_agent_imports_no_optional_or_test_stack(self) -> None:
        """Building the services too: what a constructor imports counts."""
        modules = modules_after(BUILD_STANDALONE)
        self.assertIn("portainer_agent.http.console", modules)  # the endpoints exist, their stacks wait
        self.assertEqual(loaded(modules, TEST_ONLY + ON_DEMAND), [])

    def test_the_check_sees_an_on_demand_stack(self) -> None:
        """The detector is not blind: the first console does import wsproto."""
        modules = modules_after("import portainer_agent.console.session")
        self.assertEqual(loaded(modules, ("wsproto", "h11")), ["h11", "wsproto"])


class NoMetricsTests(SynchronousTestCase):
    def test_every_recording_method_is_a_no_op(self) -> None:
        """A method added to AgentMetrics is a no-op on NoMetrics without a line of its own."""
        public = [name for name, value in vars(AgentMetrics).items() if callable(value) and not name.startswith("_")]
        self.assertIn("request_finished", public)
        recorder = NoMetrics()
        for name in public:
            self.assertIsNone(getattr(recorder, name)(*([None] * 6)[:_arity(name)]), name)

    def test_no_metrics_imports_no_prometheus(self) -> None:
        modules = modules_after("from portainer_agent.metrics import NoMetrics\n"
                                "NoMetrics().request_finished('local', b'GET', 200, 0.1, 10)")
        self.assertEqual(loaded(modules, ("prometheus_client",)), [])

    def test_agent_metrics_still_record(self) -> None:
        metrics = AgentMetrics()
        metrics.request_finished("local", b"GET", 200, 0.01, 5)
        self.assertEqual(metrics.registry.get_sample_value(
            "portainer_agent_requests_total", {"kind": "local", "method": "GET", "status": "2xx"}), 1.0)


def _arity(name: str) -> int:
    """Positional parameters of ``AgentMetrics.<name>`` without ``self``."""
    code = getattr(AgentMetrics, name).__code__
    return code.co_argcount - 1


class ReleaseFreeHeapTests(SynchronousTestCase):
    def test_calls_malloc_trim(self) -> None:
        calls: list[int] = []

        class Libc:
            def malloc_trim(self, pad: int) -> int:
                calls.append(pad)
                return 1

        self.assertTrue(release_free_heap(lambda: Libc()))
        self.assertEqual(calls, [0])

    def test_nothing_without_malloc_trim(self) -> None:
        self.assertFalse(release_free_heap(lambda: object()))

    def test_runs_on_this_system(self) -> None:
        self.assertIn(release_free_heap(), (True, False))
