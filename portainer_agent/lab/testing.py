"""Trial support: a lab shared by the tests of one class.

::

    from portainer_agent.lab.testing import LabTestCase

    class ForwardingTests(LabTestCase):
        lab_prefix = "pafw"              # unique per test class (<= 10 chars)
        lab_subnet = "10.77.61.0/24"     # unique per test class
        lab_nodes, lab_managers = 3, 2

        def test_node_ls_through_agent(self):
            client = self.lab.signed_client("node2")
            ...

The lab comes up once in ``setUpClass`` (pytest and unittest call it) and goes down in
``tearDownClass``; under the plain ``trial`` runner, which does not call them, the first
``setUp`` brings it up and it goes down when trial reaches the next class with a class
fixture, or at process exit (:mod:`portainer_agent.testing.classfixture`). Without root or dockerd, every test of
the class is skipped with the reason. Set ``PA_LAB_KEEP_LOGS=<dir>`` to keep the agents'
and dockerds' logs (teardown deletes the lab's work directory). Two runs of the same class on
one machine wait for each other (the lab's lock); they never clean each other's nodes.

Prefixes and subnets already taken: ``tests/lab`` uses ``palt``..``palt7`` on
``10.77.50-56.0/24``, ``tests/cluster`` ``parout`` on ``10.77.61.0/24``, ``pacl``/``pacla``
on ``10.77.86-87.0/24`` and ``pahf`` on ``10.77.102.0/24``, the shared two-node lab
(``lab_shared = "two-nodes"``) ``pa2node`` on ``10.77.63.0/24``, ``tests/deploy`` ``padep`` on
``10.77.80.0/24``, ``tests/cluster/test_lifecycle_lab.py`` ``pahs`` on ``10.77.105.0/24``,
``bench/soak.py`` ``pasoak`` on ``10.77.106.0/24``, ``bench/lab_bringup.py`` ``pabench`` on ``10.77.90.0/24`` and the CLI
``palab`` on ``10.77.0.0/24``. Pick others (e.g. ``10.77.60-89.0/24``) for new classes.
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import unittest
from typing import Any, ClassVar

import attrs

from twisted.trial import unittest as trial_unittest

from portainer_agent.lab.harness import Lab, NodeRef
from portainer_agent.testing.classfixture import ClassFixture
from portainer_agent.testing.gates import Need, missing, require


def lab_skip_reason() -> str | None:
    """Why a lab cannot run here, or None (the suite's one gate: :mod:`portainer_agent.testing.gates`)."""
    return missing(Need.ROOT, Need.DOCKERD)


def agent_available() -> bool:
    """True once the agent program (``python -m portainer_agent``) exists in the package."""
    try:
        return importlib.util.find_spec("portainer_agent.__main__") is not None
    except (ImportError, ValueError):
        return False


def default_prefix_and_subnet(cls: type) -> tuple[str, str]:
    """A stable prefix and /24 for a test class that did not choose one."""
    digest = hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}".encode()).digest()
    return f"pl{digest[:4].hex()[:7]}", f"10.77.{100 + digest[4] % 150}.0/24"


@attrs.frozen
class SharedLab:
    """The shape of a lab that several test classes share (``lab_shared``)."""

    prefix: str
    subnet: str
    nodes: int
    managers: int
    #: Every agent serves /metrics on <node ip>:<this port> (read with ``Lab.agent_metrics``).
    metrics_port: int | None = None


#: The shared labs: 2 nodes (1 manager), default options: agents without a secret.
SHARED_LABS: dict[str, SharedLab] = {
    "two-nodes": SharedLab(prefix="pa2node", subnet="10.77.63.0/24", nodes=2, managers=1, metrics_port=9103),
}
_shared_up: dict[str, Lab] = {}


def _down(lab: Lab) -> None:
    keep = os.environ.get("PA_LAB_KEEP_LOGS")
    if keep:
        lab.collect_logs(keep)
    lab.down()


def _down_shared_labs() -> None:
    while _shared_up:
        _, lab = _shared_up.popitem()
        _down(lab)


class LabMixin(ClassFixture):
    """The lab lifecycle; mix into any TestCase (``LabTestCase`` is the trial one)."""

    lab_prefix: ClassVar[str | None] = None
    lab_subnet: ClassVar[str | None] = None
    lab_nodes: ClassVar[int] = 3
    lab_managers: ClassVar[int] = 2
    #: Start an agent on every node (needs the agent program; tests needing agents skip otherwise).
    lab_agents: ClassVar[bool] = True
    #: Extra keyword arguments for :class:`Lab` (``secret=``, ``agent_args=``, ...).
    lab_options: ClassVar[dict[str, Any]] = {}
    #: How long to wait for another run holding the same prefix.
    lab_lock_timeout: ClassVar[float] = 600
    #: Classes naming the same shared lab run on one lab, brought up by the first of them and
    #: taken down at process exit (``SHARED_LABS`` says which exist). Only for classes that
    #: leave the lab as they found it (no faults left behind, no cluster-wide settings).
    lab_shared: ClassVar[str | None] = None
    #: The running lab (set by ``setUpClass``; absent before and after).
    lab: ClassVar[Lab]

    @classmethod
    def make_lab(cls) -> Lab:
        if cls.lab_shared is not None:
            shape = SHARED_LABS[cls.lab_shared]
            return Lab(prefix=shape.prefix, subnet=shape.subnet, nodes_count=shape.nodes, managers=shape.managers,
                       agents=agent_available(), lock_timeout=cls.lab_lock_timeout, metrics_port=shape.metrics_port)
        prefix, subnet = default_prefix_and_subnet(cls)
        return Lab(prefix=cls.lab_prefix or prefix, subnet=cls.lab_subnet or subnet,
                   nodes_count=cls.lab_nodes, managers=cls.lab_managers,
                   agents=cls.lab_agents and agent_available(), lock_timeout=cls.lab_lock_timeout,
                   **cls.lab_options)

    @classmethod
    def _start_lab(cls) -> Lab:
        """Skip when this machine cannot run a lab; otherwise bring one up for the class
        (or join the shared lab the class names, bringing it up if it is not up yet)."""
        require(Need.ROOT, Need.DOCKERD)
        if cls.lab_shared is not None and cls.lab_shared in _shared_up:
            lab = _shared_up[cls.lab_shared]
        else:
            lab = cls.make_lab()
            lab.up()
            if cls.lab_shared is not None:
                if not _shared_up:
                    atexit.register(_down_shared_labs)
                _shared_up[cls.lab_shared] = lab
        cls.lab = lab
        return lab

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls._start_lab()

    @classmethod
    def tearDownClass(cls) -> None:
        lab: Lab | None = cls.__dict__.get("lab")
        if lab is not None:
            del cls.lab
        try:
            if lab is not None and cls.lab_shared is None:  # a shared lab goes down at exit
                _down(lab)
        finally:
            super().tearDownClass()

    def require_agents(self) -> None:
        """Skip the test when the lab runs without agents."""
        if not self.lab.agents:
            raise unittest.SkipTest("the agent program (python -m portainer_agent) is not there yet")

    def ensure_agent_running(self, node: NodeRef) -> None:
        """Leave the node's agent running and reachable (for tearDown after fault tests)."""
        self.lab.heal(node)
        agent = self.lab.node(node).agent
        if self.lab.agents and (agent is None or not agent.running):
            if agent is not None:
                self.lab.kill_agent(node)
            self.lab.start_agent(node)


class LabTestCase(LabMixin, trial_unittest.TestCase):
    """A trial TestCase with a lab (``self.lab``) shared by the class's tests."""


class SynchronousLabTestCase(LabMixin, trial_unittest.SynchronousTestCase):
    """The same for tests that never return Deferreds."""
