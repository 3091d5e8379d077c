"""The failure of a request whose peer agent membership declared dead while it was in flight."""
from __future__ import annotations


class MemberGone(Exception):
    """Cluster membership declared the agent on ``node`` dead: every request in flight to it
    fails at once, instead of waiting for a node the cluster already knows is gone."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node

    def __str__(self) -> str:
        return f"the agent on node {self.node} was declared dead by cluster membership"
