"""Cluster membership: which agents exist, which are alive, and what each one is.

A pure SWIM state machine (:mod:`.swim`, with :mod:`.member`, :mod:`.dissemination`,
:mod:`.health`) behind a thin AMP-over-TLS transport (:mod:`.amp`) and a Twisted service
(:mod:`.service`). Routing and ``/agents`` read :class:`~.membership.MembershipView`.
:mod:`.simulation` runs hundreds of state machines on one fake clock for tests and benchmarks.
"""
from portainer_agent.cluster.member import Member, MemberState, PeerAddress
from portainer_agent.cluster.membership import MembershipView, NameConflict

__all__ = ["Member", "MemberState", "MembershipView", "NameConflict", "PeerAddress"]
