"""The failure of a request in flight to an agent that membership has declared dead.

Raised (by the peer forwarder) on every request still waiting for a member when the cluster
declares it dead, so nothing waits for a node the cluster already knows is gone; the fan-out
names the node with this message.
"""
from __future__ import annotations


class MemberGone(Exception):
    """The agent on ``node`` was declared dead while a request to it was in flight."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node

    def __str__(self) -> str:
        return f"the agent on node {self.node} was declared dead by cluster membership"
