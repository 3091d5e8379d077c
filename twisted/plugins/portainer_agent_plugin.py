"""twistd dropin: ``twistd -n portainer-agent --help``.

Kept tiny on purpose: twistd imports every dropin it finds, so the real work lives
in :mod:`portainer_agent.tap`, imported lazily by ``ServiceMaker``.
"""
from twisted.application.service import ServiceMaker

portainerAgent = ServiceMaker(
    "Portainer agent",
    "portainer_agent.tap",
    "Docker Swarm agent: streaming Docker API proxy, cluster routing, Portainer security",
    "portainer-agent",
)
