"""The HTTP edge: where twisted.web hands the agent a request.

The site and its request class (:mod:`.site`), the connection rules (:mod:`.channel`),
the root resource that routes every request once (:mod:`.root`), the registry of requests
in flight (:mod:`.inflight`), and the agent's own endpoints: ``/agents`` (:mod:`.agents`),
``/browse/*`` (:mod:`.browse`), ``/host/info`` (:mod:`.hostinfo`), ``/websocket/*``
(:mod:`.console`), and the metrics listener (:mod:`.metrics_endpoint`).

Only the entry points (:mod:`portainer_agent.tap`) import this package; everything below it
uses the toolbox, :mod:`portainer_agent.toolbox` (``tests/unit/test_layout.py`` checks it).
"""
