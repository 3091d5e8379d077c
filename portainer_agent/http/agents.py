"""``GET /agents`` (also ``/v1/agents``, ``/v2/agents``): this agent's view of the cluster.

The Go agent's keys come first, with its types (``Port`` is a string): ``IPAddress``,
``Port``, ``NodeName``, ``NodeRole``, then ``EdgeKeySet`` (1.5+), then our extras. One entry per
node name (the newest agent when a node runs two); ``Conflicts`` lists the agents it
shadows. Always the local view, never redirected. On a standalone engine: 503 with the
original's message (spec §7.2).
"""
from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from portainer_agent.cluster.membership import MembershipView
from portainer_agent.errors import AgentError
from portainer_agent.toolbox.responses import write_error, write_json
from portainer_agent.routing import Route

STANDALONE = AgentError(
    503,
    "Agent management is not available when running the agent on a standalone engine",
    "Agent management is disabled",
)


def agents_document(view: MembershipView) -> list[dict[str, Any]]:
    """Pure: the JSON array for ``/agents``."""
    shadowed: dict[str, list[str]] = {}
    for conflict in view.conflicts():
        shadowed[conflict.routed.key] = [m.key for m in conflict.shadowed]
    local_key = view.local.key
    document = []
    for member in view.alive_members():
        document.append({
            "IPAddress": member.api_addr,
            "Port": str(member.api_port),
            "NodeName": member.node_name,
            "NodeRole": member.role or "",
            "EdgeKeySet": False,
            "NodeID": member.node_id,
            "Leader": member.is_leader,
            "State": member.state.value,
            "Version": member.version,
            "ClusterAddress": member.key,
            "Incarnation": member.incarnation,
            "CertificateFingerprint": member.cert_fingerprint,
            "Self": member.key == local_key,
            "Conflicts": shadowed.get(member.key, []),
        })
    return document


class AgentsResource(Resource):
    """Leaf resource over a membership view (None: standalone engine, 503)."""

    isLeaf = True

    def __init__(self, view: MembershipView | None) -> None:
        super().__init__()
        self.view = view

    def render(self, request: Request, route: Route | None = None) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return write_error(request, AgentError(405, "method not allowed", "only GET on /agents"))
        if self.view is None:
            return write_error(request, STANDALONE)
        return write_json(request, agents_document(self.view))
