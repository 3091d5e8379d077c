#!/usr/bin/env python
"""CPU per proxied request on the agent's hot path, in one process, without sockets.

The machine is shared and loopback ``send`` under load charges the sender for the
receiver's wake-up, so socket benchmarks swing by 2x; this one does not: the agent's
real ``AgentSite`` (request, channel, root, routing, proxy, Docker client, relay) is fed
raw request bytes on an in-memory transport, and its Docker connection reaches a canned
Docker (a raw protocol that answers every request head at once) through in-memory
transports. Not measured: TLS, the signature check, the kernel.

    python bench/hotpath.py [--requests 20000] [--path /_ping] [--profile out.prof]

Run it with ``PYTHONPATH=<checkout>`` from that checkout to compare two versions
(it adapts to the Docker client the checkout has).
"""
from __future__ import annotations

import argparse
import cProfile
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.defer import succeed
from twisted.test import iosim

from portainer_agent.http.root import AgentRoot
from portainer_agent.http.site import AgentSite
from portainer_agent.proxy.local import DockerProxy

PING = (b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nCache-Control: no-cache, no-store, must-revalidate\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nDocker-Experimental: false\r\nOstype: linux\r\n"
        b"Pragma: no-cache\r\nServer: Docker/20.10.24 (linux)\r\nDate: Sun, 29 Nov 2026 15:00:00 GMT\r\n"
        b"Content-Length: 2\r\n\r\nOK")
LIST = PING.replace(b"Content-Length: 2\r\n\r\nOK", b"Content-Length: 30000\r\n\r\n" + b"x" * 30000).replace(
    b"text/plain; charset=utf-8", b"application/json")


class CannedDocker(Protocol):
    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.transport.write(self.answer)  # type: ignore[union-attr]


class Endpoint:
    """Connects each client protocol to a canned Docker over in-memory transports."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.pumps: list[Any] = []

    def connect(self, protocolFactory: Any) -> Any:  # noqa: N803
        client = protocolFactory.buildProtocol(None)
        server = self.factory.buildProtocol(None)
        self.pumps.append(iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                                        client, iosim.FakeTransport(client, isServer=False), greet=False))
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


def docker_upstream(clock: Clock, answer: bytes) -> tuple[Any, Any]:
    """(the proxy's upstream, a flush function) for whichever client this checkout has."""
    endpoint = Endpoint(Factory.forProtocol(lambda: CannedDocker(answer)))
    try:
        from portainer_agent.docker.client import DockerClient
    except ImportError:  # before the one Docker client: DockerSocketAgent over _newclient
        from twisted.web.client import Agent

        from portainer_agent.docker.client import DockerSocketAgent, make_pool

        agent = DockerSocketAgent(clock, "/canned.sock", make_pool(clock))
        agent._endpoint = endpoint
        agent._agent = Agent.usingEndpointFactory(clock, type("F", (), {"endpointForURI": lambda s, u: endpoint})(),
                                                  pool=agent._pool)
        return agent, endpoint.flush
    return DockerClient(clock, endpoint), endpoint.flush


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--path", default="/_ping", choices=("/_ping", "/containers/json"))
    parser.add_argument("--profile", help="write a cProfile of the measured loop here")
    args = parser.parse_args()
    clock = Clock()
    upstream, flush = docker_upstream(clock, PING if args.path == "/_ping" else LIST)
    proxy = DockerProxy(upstream, "/canned.sock")
    try:
        root = AgentRoot(docker=proxy, hijack=proxy, guard=None)  # type: ignore[call-arg]
    except TypeError:  # AgentRoot(destinations) since 9086998
        from portainer_agent.proxy.dispatch import Destinations

        root = AgentRoot(Destinations(proxy, proxy), guard=None)
    try:  # routed by the request when its headers are in, as the agent does (since the layout branch)
        from portainer_agent.http.request import AgentRequests

        site = AgentSite(root, AgentRequests(root.router), reactor=clock)
    except ImportError:
        site = AgentSite(root, reactor=clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    request = (b"GET /v1.41%s HTTP/1.1\r\nHost: 127.0.0.1:9001\r\nUser-Agent: Docker-Client/28.2.2 (linux)\r\n"
               b"X-PortainerAgent-PublicKey: 3059301306072a8648ce3d020106082a8648ce3d03010703420004\r\n"
               b"X-PortainerAgent-Signature: MEUCIQD\r\n\r\n") % args.path.encode()

    def one() -> None:
        channel.dataReceived(request)
        flush()
        data = transport.value()
        if not data.endswith(b"OK") and not data.endswith(b"x" * 100):
            raise RuntimeError(f"unexpected answer {data[:300]!r}")
        transport.clear()

    for _ in range(500):
        one()
    profile = cProfile.Profile() if args.profile else None
    start = time.process_time()
    if profile:
        profile.enable()
    for _ in range(args.requests):
        one()
    if profile:
        profile.disable()
        profile.dump_stats(args.profile)
    elapsed = time.process_time() - start
    print(f"{args.path}: {elapsed / args.requests * 1e6:.1f} µs CPU per request ({args.requests} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
