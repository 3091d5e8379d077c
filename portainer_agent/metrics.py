"""Every Prometheus metric the agent exposes, in one place, with a small API.

Why one module: the names are an operator-facing contract (dashboards, alerts), so they
are declared together and documented in the README from this list. The metrics live
in a :class:`prometheus_client.CollectorRegistry` of their own (not the library's
global one), handed to whoever records into it: tests build an isolated
:class:`AgentMetrics` each, and the exposition carries only agent metrics.

Callers record facts (``request_finished``, ``forward_error``...); they never touch
the metric objects, so labels stay bounded (methods, reasons and route kinds come from
fixed sets; the only open label is a peer's node name, bounded by the cluster size).

Names (all prefixed ``portainer_agent_``):

=========================================  =========  ==============================================
name                                        type       labels
=========================================  =========  ==============================================
requests_total                              counter    kind, method, status (``2xx``... ``aborted``)
request_duration_seconds                    histogram  kind
response_bytes_total                        counter    kind (body bytes sent to clients)
open_connections                            gauge      (API connections open now)
open_hijacked_streams                       gauge      (attach/exec/console streams open now)
inflight_requests                           gauge      kind (requests being served now, streams included)
connections_refused_total                   counter    reason (``max_connections``)
connections_cut_total                       counter    reason (``header_timeout``, ``tls_handshake_timeout``)
signature_failures_total                    counter    reason
cluster_members                             gauge      state (alive, suspect, dead, left)
cluster_state_changes_total                 counter    node (the member), state (the state entered)
cluster_probe_rtt_seconds                   histogram
forwarded_requests_total                    counter    node, kind
forward_duration_seconds                    histogram  kind
forward_errors_total                        counter    node, reason
aggregate_unreachable_nodes_total           counter    node (once per aggregated list that named it)
aggregate_last_unreachable_nodes            gauge      (nodes named by the last aggregated list)
manager_failovers_total                     counter    from_node (the manager that failed)
hijacked_stream_bytes_total                 counter    direction (``from_client``, ``to_client``)
hijacked_stream_duration_seconds            histogram  (spliced streams, counted when they end)
list_cache_requests_total                   counter    list, outcome (``hit``, ``miss``, ``stream_down``, ``not_keepable``)
list_cache_invalidations_total              counter    reason (``event``, ``write``, ``stream_up``, ``stream_down``)
list_cache_event_stream_reconnects_total    counter    (Docker event stream reopened after a loss)
list_cache_bytes                            gauge      (bytes of list answers held)
aggregate_not_modified_total                counter    node (peer legs answered 304: its kept list merged)
aggregate_from_memory_total                 counter    node (peer legs not sent: its announced state is the kept copy's)
build_info                                  gauge      version, api_version, python (always 1)
=========================================  =========  ==============================================
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

PREFIX = "portainer_agent"

#: Methods counted under their own name; anything else is ``other`` (bounded labels).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

#: Request durations: from a ping (ms) to a long pull or build; streams land in +Inf.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: Membership probe round trips: LAN latencies up to the probe timeout.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
#: Hijacked streams: an ``exec`` of a second to a console left open for a day.
STREAM_BUCKETS = (0.1, 1, 10, 60, 300, 900, 3600, 4 * 3600, 86400)


def method_label(method: bytes | str) -> str:
    text = method.decode("latin-1") if isinstance(method, bytes) else method
    return text if text in KNOWN_METHODS else "other"


def status_label(code: int | None, completed: bool = True) -> str:
    """``2xx``.. ``5xx``; ``aborted`` when the client left before the answer ended."""
    if not completed:
        return "aborted"
    if code is None or not 100 <= code <= 599:
        return "other"
    return f"{code // 100}xx"


def signature_refusal_reason(message: str, details: str) -> str:
    """A bounded label for a refused signature, from the 403 the guard answers."""
    if message.startswith("Missing"):
        return "missing"
    if details.startswith("Invalid public key"):
        return "bad_public_key"
    if details.startswith("Invalid signature"):
        return "bad_signature_encoding"
    if details == "Unauthorized":
        return "unauthorized"
    return "api_closed"


class _MembersByState:
    """Collector: cluster size by state, read from the membership at scrape time
    (no gauge to keep in step with every gossip update)."""

    def __init__(self, members: Callable[[], Iterable[Any]]) -> None:
        self._members = members

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(f"{PREFIX}_cluster_members", "Cluster members known, by state", labels=["state"])
        counts = {"alive": 0, "suspect": 0, "dead": 0, "left": 0}
        for member in self._members():
            counts[member.state.value] = counts.get(member.state.value, 0) + 1
        for state, count in sorted(counts.items()):
            family.add_metric([state], count)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


class _InflightByKind:
    """Collector: requests in flight by route kind, read from the site's registry at
    scrape time (``kind`` comes from the fixed set of route kinds)."""

    def __init__(self, by_kind: Callable[[], Mapping[str, int]]) -> None:
        self.by_kind = by_kind

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(f"{PREFIX}_inflight_requests", "API requests being served now, by route kind",
                                   labels=["kind"])
        for kind, count in sorted(self.by_kind().items()):
            family.add_metric([kind], count)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


class AgentMetrics:
    """The agent's metrics in ``registry`` (a new one by default).

    prometheus_client is imported here, not at the top of the module: it costs about
    1 MB of RSS, paid only by an agent that exposes metrics (``--metrics-addr``); the
    others record into :class:`NoMetrics`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._requests = Counter(f"{PREFIX}_requests", "API requests answered, by route kind, method and status class",
                                 ["kind", "method", "status"], registry=r)
        self._duration = Histogram(f"{PREFIX}_request_duration_seconds", "API request duration, by route kind",
                                   ["kind"], buckets=DURATION_BUCKETS, registry=r)
        self._bytes = Counter(f"{PREFIX}_response_bytes", "Response body bytes sent to API clients, by route kind",
                              ["kind"], registry=r)
        self._open_connections = Gauge(f"{PREFIX}_open_connections", "API connections open now", registry=r)
        self._open_streams = Gauge(f"{PREFIX}_open_hijacked_streams", "Hijacked (attach/exec) streams open now",
                                   registry=r)
        self._refused = Counter(f"{PREFIX}_connections_refused", "API connections refused, by reason", ["reason"],
                                registry=r)
        self._cut = Counter(f"{PREFIX}_connections_cut", "API connections cut by a deadline, by reason", ["reason"],
                            registry=r)
        self._signature_failures = Counter(f"{PREFIX}_signature_failures", "Requests refused by the signature check",
                                           ["reason"], registry=r)
        self._state_changes = Counter(f"{PREFIX}_cluster_state_changes",
                                      "Member liveness changes seen, by member node and the state entered",
                                      ["node", "state"],
                                      registry=r)
        self._probe_rtt = Histogram(f"{PREFIX}_cluster_probe_rtt_seconds", "Membership probe round-trip time",
                                    buckets=RTT_BUCKETS, registry=r)
        self._forwarded = Counter(f"{PREFIX}_forwarded_requests", "Requests forwarded to a peer agent, by node and kind",
                                  ["node", "kind"], registry=r)
        self._forward_duration = Histogram(f"{PREFIX}_forward_duration_seconds",
                                           "Duration of requests forwarded to peers, by route kind", ["kind"],
                                           buckets=DURATION_BUCKETS, registry=r)
        self._forward_errors = Counter(f"{PREFIX}_forward_errors", "Forwarding failures, by peer node and reason",
                                       ["node", "reason"], registry=r)
        self._unreachable = Counter(f"{PREFIX}_aggregate_unreachable_nodes",
                                    "Aggregated lists that named a node as left out (no answer), by node", ["node"],
                                    registry=r)
        self._unreachable_last = Gauge(f"{PREFIX}_aggregate_last_unreachable_nodes",
                                       "Nodes named as left out by the last aggregated list", registry=r)
        self._failovers = Counter(f"{PREFIX}_manager_failovers",
                                  "Manager operations sent to the next manager, by the manager that failed",
                                  ["from_node"], registry=r)
        self._stream_bytes = Counter(f"{PREFIX}_hijacked_stream_bytes",
                                     "Bytes spliced through hijacked (attach/exec) streams, by direction",
                                     ["direction"], registry=r)
        for direction in ("from_client", "to_client"):  # both known: exposed at 0 from the start
            self._stream_bytes.labels(direction)
        self._stream_duration = Histogram(f"{PREFIX}_hijacked_stream_duration_seconds",
                                          "Duration of hijacked (attach/exec) streams, counted when they end",
                                          buckets=STREAM_BUCKETS, registry=r)
        self._cache_requests = Counter(f"{PREFIX}_list_cache_requests",
                                       "List requests seen by the list cache, by list and outcome",
                                       ["list", "outcome"], registry=r)
        self._cache_invalidations = Counter(f"{PREFIX}_list_cache_invalidations",
                                            "Times the list cache dropped what it held, by reason", ["reason"],
                                            registry=r)
        self._cache_reconnects = Counter(f"{PREFIX}_list_cache_event_stream_reconnects",
                                         "Docker event stream reopened after it was lost", registry=r)
        self._cache_bytes = Gauge(f"{PREFIX}_list_cache_bytes", "Bytes of list answers the list cache holds",
                                  registry=r)
        self._not_modified = Counter(f"{PREFIX}_aggregate_not_modified",
                                     "Aggregate legs a peer answered 304 (its kept list merged), by node", ["node"],
                                     registry=r)
        self._from_memory = Counter(f"{PREFIX}_aggregate_from_memory",
                                    "Aggregate legs not sent: the peer's announced list state is its kept copy's, "
                                    "by node", ["node"], registry=r)
        import platform

        from portainer_agent import AGENT_API_VERSION, __version__

        Gauge(f"{PREFIX}_build_info", "The agent's version, Agent API version and Python version (always 1)",
              ["version", "api_version", "python"], registry=r).labels(
            __version__, AGENT_API_VERSION, platform.python_version()).set(1)
        self._members_collector: _MembersByState | None = None
        self._inflight_collector: _InflightByKind | None = None

    # -- HTTP site -----------------------------------------------------------------

    def request_finished(self, kind: str, method: bytes | str, status: int | None, duration: float,
                         sent_bytes: int, completed: bool = True) -> None:
        """One API request ended (answered, or the client left: ``completed=False``)."""
        self._requests.labels(kind, method_label(method), status_label(status, completed)).inc()
        self._duration.labels(kind).observe(duration)
        if sent_bytes:
            self._bytes.labels(kind).inc(sent_bytes)

    def watch_connections(self, open_connections: Callable[[], float], open_streams: Callable[[], float]) -> None:
        """Read both gauges at scrape time from the site's own bookkeeping."""
        self._open_connections.set_function(open_connections)
        self._open_streams.set_function(open_streams)

    def watch_inflight(self, by_kind: Callable[[], Mapping[str, int]]) -> None:
        """Report requests in flight by kind from ``by_kind()`` at scrape time."""
        if self._inflight_collector is None:
            self._inflight_collector = _InflightByKind(by_kind)
            self.registry.register(self._inflight_collector)  # type: ignore[arg-type]
        else:
            self._inflight_collector.by_kind = by_kind

    def connection_refused(self, reason: str = "max_connections") -> None:
        self._refused.labels(reason).inc()

    def connection_cut(self, reason: str) -> None:
        self._cut.labels(reason).inc()

    # -- security ------------------------------------------------------------------

    def signature_refused(self, message: str, details: str) -> None:
        self._signature_failures.labels(signature_refusal_reason(message, details)).inc()

    # -- cluster membership ----------------------------------------------------------

    def watch_members(self, members: Callable[[], Iterable[Any]]) -> None:
        """Report cluster size by state from ``members()`` (SwimNode.members) at scrape time."""
        if self._members_collector is None:
            self._members_collector = _MembersByState(members)
            self.registry.register(self._members_collector)  # type: ignore[arg-type]
        else:
            self._members_collector._members = members

    def member_changed(self, old: Any, new: Any) -> None:
        """A SwimNode listener: count liveness transitions (suspect, dead... included), by
        member (the node label: flapping is one member going back and forth)."""
        if old is None or old.state is not new.state:
            self._state_changes.labels(new.node_name, new.state.value).inc()

    def probe_round_trip(self, seconds: float) -> None:
        self._probe_rtt.observe(seconds)

    # -- forwarding to peers (called by the routing/forwarding code) ---------------------

    def forwarded(self, node: str, kind: str, seconds: float) -> None:
        """A request forwarded to ``node``'s agent finished after ``seconds``."""
        self._forwarded.labels(node, kind).inc()
        self._forward_duration.labels(kind).observe(seconds)

    def forward_error(self, node: str, reason: str) -> None:
        """Forwarding to ``node`` failed; ``reason`` from a fixed set (``connect``,
        ``tls``, ``timeout``, ``unknown_node``, ``upstream_closed``...)."""
        self._forward_errors.labels(node, reason).inc()

    def aggregate_answered(self, unreachable: Iterable[str]) -> None:
        """An aggregated list was answered, naming ``unreachable`` nodes as left out."""
        named = set(unreachable)
        for node in named:
            self._unreachable.labels(node).inc()
        self._unreachable_last.set(len(named))

    def manager_failover(self, from_node: str) -> None:
        """A manager operation that failed on ``from_node`` goes to the next manager."""
        self._failovers.labels(from_node).inc()

    def aggregate_leg_not_modified(self, node: str) -> None:
        """``node``'s list had not changed: its kept answer was merged (a 304)."""
        self._not_modified.labels(node).inc()

    def aggregate_leg_from_memory(self, node: str) -> None:
        """``node`` announced that its list has not changed: its kept answer was merged unasked."""
        self._from_memory.labels(node).inc()

    # -- list cache ------------------------------------------------------------------

    def list_cache_answered(self, which: str, outcome: str) -> None:
        self._cache_requests.labels(which, outcome).inc()

    def list_cache_invalidated(self, reason: str) -> None:
        self._cache_invalidations.labels(reason).inc()

    def list_cache_stream_reconnected(self) -> None:
        self._cache_reconnects.inc()

    def watch_list_cache(self, bytes_held: Callable[[], float]) -> None:
        self._cache_bytes.set_function(bytes_held)

    # -- hijacked streams ------------------------------------------------------------

    def hijacked_stream_ended(self, from_client: int, to_client: int, seconds: float) -> None:
        """A spliced stream ended after ``seconds``, having carried these byte counts."""
        self._stream_bytes.labels("from_client").inc(from_client)
        self._stream_bytes.labels("to_client").inc(to_client)
        self._stream_duration.observe(seconds)

    # -- exposition ------------------------------------------------------------------

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The body and content type of a scrape (text format, or OpenMetrics if asked)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class NoMetrics(AgentMetrics):
    """The recorder of an agent that exposes no metrics (no ``--metrics-addr``): every
    public method of :class:`AgentMetrics` is a no-op returning None, so callers record
    unconditionally at the cost of one call, and nothing of prometheus_client is
    imported or allocated. The no-ops are derived from :class:`AgentMetrics` (below the
    class), so a method added there is a no-op here without a line of its own."""

    def __init__(self) -> None:  # noqa: D107 - no registry, no metric objects
        pass


def _no_op(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


for _name, _value in list(vars(AgentMetrics).items()):
    if callable(_value) and not _name.startswith("_"):
        setattr(NoMetrics, _name, _no_op)
del _name, _value


class TimedPings:
    """Wraps a membership transport to time direct probes (``ping``) into the RTT
    histogram; every other attribute is the wrapped transport's."""

    def __init__(self, transport: Any, metrics: AgentMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._transport = transport
        self._metrics = metrics
        self._clock = clock

    def ping(self, peer: Any, updates: Any) -> Any:
        started = self._clock()

        def observed(result: Any) -> Any:
            self._metrics.probe_round_trip(self._clock() - started)
            return result

        return self._transport.ping(peer, updates).addCallback(observed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def describe(metrics: AgentMetrics) -> Mapping[str, str]:
    """Metric family names to their help text (for docs and tests)."""
    return {m.name: m.documentation for m in metrics.registry.collect()}
