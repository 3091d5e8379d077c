"""The multi-node test bed: real dockerds in network namespaces, joined into a Swarm.

- :mod:`portainer_agent.lab.dockerd`: :class:`DockerDaemon`, one real dockerd.
- :mod:`portainer_agent.lab.harness`: :class:`Lab`, N nodes, a Swarm and one agent per node.
- :mod:`portainer_agent.lab.testing`: :class:`LabTestCase`, a lab shared by a test class.
- :mod:`portainer_agent.lab.cli`: ``portainer-agent-lab up|status|down``.

Needs root, ``dockerd`` and ``busybox-static``.
"""
from portainer_agent.lab.dockerd import DockerDaemon, DockerDaemonError, make_workdir

__all__ = ["DockerDaemon", "DockerDaemonError", "make_workdir"]
