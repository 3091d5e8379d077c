"""The Docker client against a twisted.web resource, in memory (for tests).

``MemoryDocker(resource)`` gives a real :class:`~portainer_agent.docker.client.DockerClient`
whose connections reach a ``Site`` over in-memory transports (``twisted.test.iosim``):
the request head, the body framing, the parser and the pool all run as in production;
``flush()`` moves the bytes.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.resource import IResource
from twisted.web.server import Site
from zope.interface import implementer

from portainer_agent.docker.client import DockerClient


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects each client protocol to a new server protocol of ``factory``."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self.pumps: list[iosim.IOPump] = []
        #: Set to a Failure to refuse connections (Docker not running).
        self.refuse: Failure | None = None

    def connect(self, protocolFactory: Any) -> "Deferred[Any]":  # noqa: N803
        if self.refuse is not None:
            return fail(self.refuse)
        client = protocolFactory.buildProtocol(None)
        server = self._factory.buildProtocol(None)
        pump = iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                             client, iosim.FakeTransport(client, isServer=False), greet=False)
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        """Move bytes both ways on every connection, new ones made meanwhile included."""
        count = -1
        while count != len(self.pumps):
            count = len(self.pumps)
            for pump in list(self.pumps):
                pump.flush()


class MemoryDocker(DockerClient):
    """A DockerClient talking to ``resource`` in memory."""

    def __init__(self, resource: IResource, clock: Clock | None = None, **kwargs: Any) -> None:
        self.clock = clock if clock is not None else Clock()
        self.site = Site(resource, reactor=self.clock)
        self.endpoint = MemoryEndpoint(self.site)
        super().__init__(self.clock, self.endpoint, label="/memory/docker.sock", **kwargs)

    def flush(self) -> None:
        self.endpoint.flush()
