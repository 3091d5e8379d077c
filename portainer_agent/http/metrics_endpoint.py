"""The metrics listener: ``GET /metrics`` in Prometheus format on its own plain-HTTP port.

Separate from the API on purpose: Prometheus does not sign requests, and the signed
API port must never answer anything unsigned but ``/ping``. Off unless
``--metrics-addr`` is given; bind it to loopback or a monitoring network.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from portainer_agent.listening import BoundPorts, ListenerService
from portainer_agent.metrics import AgentMetrics



class MetricsResource(Resource):
    """``/metrics``: the exposition of one :class:`AgentMetrics`; anything else 404."""

    isLeaf = True

    def __init__(self, metrics: AgentMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render(self, request: Request) -> bytes:
        if request.path.rstrip(b"/") != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: try /metrics\n"
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b""
        accept = request.getHeader(b"accept")
        body, content_type = self._metrics.exposition(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", content_type.encode())
        return b"" if request.method == b"HEAD" else body


class MetricsSite(Site):
    noisy = False

    def log(self, request: Any) -> None:  # scrapes are not worth an access line
        pass


class MetricsListenerService(ListenerService):
    """Listens on ``(host, port)`` (plain HTTP); a failure to bind is fatal, like the API's."""

    def __init__(self, reactor: Any, address: tuple[str, int], metrics: AgentMetrics,
                 on_fatal: Callable[[str], None] | None = None, ports: BoundPorts | None = None) -> None:
        host, port = address
        endpoint = (TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint)(reactor, port, interface=host)
        super().__init__(endpoint, MetricsSite(MetricsResource(metrics), reactor=reactor), host, port,
                         what="metrics", scheme="http", path="/metrics", name="metrics", cannot="cannot listen for metrics on",
                         on_fatal=on_fatal, ports=ports)
        self.address = address
