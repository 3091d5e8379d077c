"""The places a request can go once routed, sharing one stream relay (:mod:`.relay`).

* :mod:`.local` — the local Docker engine, streamed both ways;
* :mod:`.splice` — an upgraded (hijacked) stream, spliced byte for byte, to the local
  Docker socket or to a peer agent;
* :mod:`.peer` — another agent of the cluster, over pinned HTTPS;
* :mod:`.fanout` — every node at once, answers merged by :mod:`.merge` (pure), each leg's
  body read by :mod:`.collect` (bounded, cancellable), the nodes without an agent named from
  the Swarm's node list (:mod:`.node_list`, over :mod:`portainer_agent.cluster.swarm_nodes`);
* :mod:`.dispatch` — acts on a :class:`~portainer_agent.routing.Route`.
"""
