"""A Python/Twisted re-implementation of the Portainer Agent.

The agent runs on every Swarm node, proxies the local Docker API over HTTPS, forms a
cluster with the other agents and routes or aggregates requests across nodes.
"""

__version__ = "1.2.1"

#: Value of the ``Portainer-Agent-Api-Version`` response header.
AGENT_API_VERSION = "2"
#: Value of the ``Portainer-Agent-Platform`` response header (1 = Docker).
AGENT_PLATFORM = "1"
