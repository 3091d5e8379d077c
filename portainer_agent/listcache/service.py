"""The list cache: this node's answers to the four list requests, from memory.

How an answer stays exact:

- **Generations.** Every change makes the cache drop what it holds and count a new
  generation. An answer read from Docker is kept only if no change happened between the
  moment it was asked and the moment it is kept, so an answer that raced a change is
  served once (it is Docker's own) and never kept.
- **Changes** are learnt from Docker's event stream (:mod:`.events`, every event but a
  few read-only container actions, see :func:`changes_lists`), and from the writes this
  agent proxies to its own Docker: those drop the answers once Docker has answered and
  before the client sees the answer (:meth:`ListCache.written`), so a write followed by a
  list never shows the old list, whatever the event stream's delay.
- **Nothing from memory without the stream.** While the event stream is down, every list
  goes to Docker; when it is back, the answers held before are read again.
- **Time-relative text** (``Up 5 minutes``) is formatted at each answer from the
  container's clock (:mod:`.answer`), read with ``inspect`` once per container start.

Every answer carries an ``ETag`` (a hash of its bytes) and a conditional request whose
tag still matches gets ``304 Not Modified`` with no body: that is how an aggregating
agent learns, in one small round trip, that a peer's list has not changed.
"""
from __future__ import annotations

import secrets
import time
from typing import Any, Callable, Iterable, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from portainer_agent.listcache.answer import KeptAnswer, NotKeepable, entity_tag, keep, timed_statuses
from portainer_agent.listcache.events import EventStream
from portainer_agent.listcache.keys import ListKey, list_key
from portainer_agent.listcache.peer_states import state_text
from portainer_agent.listcache.status import StatusShape, parse_docker_time
from portainer_agent.listcache.store import BoundedStore
from portainer_agent.toolbox.memory_response import MemoryResponse
from portainer_agent.toolbox.whole_body import read_whole_body

log = Logger()

DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Concurrent ``inspect`` calls while learning containers' clocks.
INSPECT_CONCURRENCY = 8
#: Answers read again, in the background, when the event stream comes back.
REFILL_LIMIT = 16
ETAG = b"ETag"
#: The cache state an answer is valid in (``<boot>-<generation>``), for aggregating peers.
STATE_HEADER = b"X-PortainerAgent-List-State"
#: How long (ms) its time-relative texts stay as they are; absent: as long as the state.
VALID_FOR_HEADER = b"X-PortainerAgent-List-Valid-For"
#: Asked by an aggregating agent (any value): send the clocks of the time-relative statuses,
#: so it can format them itself while the state holds (answered in the same header: the
#: ns clocks of the items whose Status is time-relative, in body order, comma-separated).
CLOCKS_HEADER = b"X-PortainerAgent-List-Clocks"
#: With the clocks: this agent's time (ns) when it formatted the answer (for clock skew).
NOW_HEADER = b"X-PortainerAgent-List-Now"
#: More time-relative items than this: no clocks (a header stays well under 16 kB).
MAX_CLOCKS_SENT = 400
#: Containers whose clocks are held at most (far above any node's container count).
MAX_CLOCKS = 100_000

#: Container actions that change nothing a list shows (``exec_*`` also come from health
#: checks, every few seconds on a node with healthchecks).
_READ_ONLY_CONTAINER_ACTIONS = frozenset({
    "exec_create", "exec_start", "exec_detach", "exec_die", "attach", "detach", "resize", "top", "export",
    "archive-path", "extract-to-dir", "copy",
})


def changes_lists(event: dict[str, Any]) -> bool:
    """Whether ``event`` may change a list (every event but read-only container actions)."""
    action = event.get("Action") or event.get("status") or ""
    if not isinstance(action, str):
        return True
    verb = action.split(":", 1)[0].strip()
    return not ((event.get("Type") or "container") == "container" and verb in _READ_ONLY_CONTAINER_ACTIONS)


def matches(if_none_match: bytes | None, etag: bytes) -> bool:
    """``If-None-Match`` (weak comparison, RFC 9110 13.1.2) against ``etag``."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(b","):
        tag = candidate.strip()
        if tag == b"*":
            return True
        if tag.startswith(b"W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


class CacheMetrics(Protocol):
    def list_cache_answered(self, which: str, outcome: str) -> None: ...

    def list_cache_invalidated(self, reason: str) -> None: ...

    def list_cache_stream_reconnected(self) -> None: ...


class _NoMetrics:
    def list_cache_answered(self, which: str, outcome: str) -> None:
        pass

    def list_cache_invalidated(self, reason: str) -> None:
        pass

    def list_cache_stream_reconnected(self) -> None:
        pass


class ListCache:
    """This node's list answers, kept while Docker's event stream says nothing changed."""

    def __init__(self, reactor: Any, client: Any, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES, metrics: CacheMetrics | None = None,
                 max_body: int = 64 * 1024 * 1024, now_ns: Callable[[], int] = time.time_ns,
                 events: EventStream | None = None) -> None:
        self._reactor = reactor
        self._client = client
        self._metrics = metrics if metrics is not None else _NoMetrics()
        self._max_body = max_body
        self._now_ns = now_ns
        self.store: BoundedStore[ListKey, _Kept] = BoundedStore(max_entries, max_bytes)
        #: Container ID -> (the status field it counts from, its ns time).
        self._clocks: dict[str, tuple[str, int]] = {}
        self._inspecting = DeferredSemaphore(INSPECT_CONCURRENCY)
        self.generation = 0
        #: Tells a restarted agent's generations from the last run's.
        self.boot = secrets.token_hex(6)
        #: Called at every change (:class:`~portainer_agent.listcache.beacon.ListBeacon`).
        self.on_change: Callable[[], None] | None = None
        #: The write barrier (the beacon's), if this agent is in a cluster.
        self.barrier: Callable[[Any], Any] | None = None
        self.ready = False
        self._refill: list[bytes] = []
        self.events = events if events is not None else EventStream(
            reactor, client, self._stream_up, self._event, self._stream_down,
            on_reconnect=self._metrics.list_cache_stream_reconnected)

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        self.events.start()

    def stop(self) -> None:
        self.events.stop()

    @property
    def bytes_held(self) -> int:
        return self.store.bytes

    # -- changes ---------------------------------------------------------------------

    def invalidate(self, reason: str) -> None:
        """Something changed: nothing held is served again, nothing in flight is kept."""
        self.generation += 1
        if len(self.store):
            self.store.clear()
        self._metrics.list_cache_invalidated(reason)
        if self.on_change is not None:
            self.on_change()

    def written(self, result: Any = None) -> Any:
        """A write this agent proxied to Docker was answered (or failed): called before the
        client sees the answer. Passes ``result`` through (a Deferred callback)."""
        self.invalidate("write")
        return result

    def settled(self, result: Any = None) -> Any:
        """After :meth:`written`: ``result`` once the other agents heard of the change (the
        write barrier), at once outside a cluster."""
        return self.barrier(result) if self.barrier is not None else result

    def _event(self, event: dict[str, Any]) -> None:
        actor = event.get("Actor")
        ident = actor.get("ID") if isinstance(actor, dict) else event.get("id")
        if isinstance(ident, str):
            self._clocks.pop(ident, None)
        if changes_lists(event):
            self.invalidate("event")

    def _stream_up(self) -> None:
        self._clocks.clear()
        self.invalidate("stream_up")
        self.ready = True
        refill, self._refill = self._refill, []
        for uri in refill:
            self._read(uri, list_key(b"GET", uri), self._client.request(b"GET", uri),
                       self.generation, self._now_ns()).addErrback(lambda _: None)

    def _stream_down(self, reason: str) -> None:
        self.ready = False
        self._refill = [kept.uri for kept in self.store.values()][-REFILL_LIMIT:]
        self._clocks.clear()
        self.invalidate("stream_down")

    # -- answers ---------------------------------------------------------------------

    def answer(self, method: bytes, uri: bytes, if_none_match: bytes | None,
               fetch: Callable[[], "Deferred[IResponse]"], clocks: bool = False) -> "Deferred[IResponse] | None":
        """The answer to a list request, or None when it is not one this cache answers
        (the caller sends it on as usual). ``fetch()`` sends the request to Docker."""
        key = list_key(method, uri)
        if key is None:
            return None
        if not self.ready:
            self._metrics.list_cache_answered(key.list, "stream_down")
            return None
        kept = self.store.get(key)
        if kept is not None:
            self._metrics.list_cache_answered(key.list, "hit")
            now = self._now_ns()
            body, etag, until = kept.answer.render_until(now)
            valid = None if until is None else max(0, (until - now) // 1_000_000)
            extra: list[tuple[bytes, bytes]] = []
            if clocks and until is not None:
                timed = kept.answer.clocks()
                if len(timed) <= MAX_CLOCKS_SENT:
                    extra = [(CLOCKS_HEADER, b",".join(b"%d" % clock for clock in timed)), (NOW_HEADER, b"%d" % now)]
            return succeed(_response(kept.answer.headers, body, etag, if_none_match,
                                     state=state_text(self.boot, self.generation), valid_ms=valid,
                                     with_body=extra))
        self._metrics.list_cache_answered(key.list, "miss")
        return self._read(uri, key, fetch(), self.generation, self._now_ns(), if_none_match)

    def _read(self, uri: bytes, key: ListKey | None, pending: "Deferred[IResponse]", generation: int,
              sent_ns: int, if_none_match: bytes | None = None) -> "Deferred[IResponse]":
        """Docker's answer to ``uri``, whole; kept (in the background) if it may be."""

        def whole(response: IResponse) -> "Deferred[IResponse]":
            headers = list(getattr(response, "raw_headers", None) or _header_lines(response))

            def answered(body: bytes) -> IResponse:
                if response.code != 200:
                    return MemoryResponse(response.code, response.phrase, headers, body)
                if key is not None:
                    self._keep(uri, key, body, headers, generation, (sent_ns, self._now_ns()))
                # Valid in the state it was asked in, for no time: an aggregating peer asks again.
                return _response(headers, body, entity_tag(body), if_none_match, phrase=response.phrase,
                                 state=state_text(self.boot, generation), valid_ms=0)

            return read_whole_body(response, self._max_body, "Docker", " (--aggregate-max-bytes)"
                                   ).addCallback(answered)

        return pending.addCallback(whole)

    def _keep(self, uri: bytes, key: ListKey, body: bytes, headers: list[tuple[bytes, bytes]], generation: int,
              answered_between: tuple[int, int]) -> None:
        if generation != self.generation or not self.ready:
            return
        containers = key.list == "containers"
        try:
            timed = timed_statuses(body) if containers else {}
        except NotKeepable as error:
            log.debug("list answer not kept: {error}", error=str(error))
            return
        missing = {ident: shape for ident, shape in timed.items()
                   if self._clocks.get(ident, ("", 0))[0] != shape.since}
        learnt = self._learn_clocks(missing, generation) if missing else succeed(None)

        def store(_: Any) -> None:
            if generation != self.generation or not self.ready:
                return
            clocks = {ident: self._clocks[ident][1] for ident, shape in timed.items()
                      if self._clocks.get(ident, ("", 0))[0] == shape.since}
            try:
                kept = keep(body, headers, containers, clocks, answered_between)
            except NotKeepable as error:
                log.info("list answer {uri} not kept: {error}", uri=uri.decode("latin-1"), error=str(error))
                self._metrics.list_cache_answered(key.list, "not_keepable")
                return
            self.store.put(key, _Kept(uri, kept))

        learnt.addCallback(store).addErrback(self._bug)

    def _learn_clocks(self, containers: dict[str, StatusShape], generation: int) -> "Deferred[Any]":
        """Inspect ``containers`` for the time their status counts from."""

        def inspect(ident: str, shape: StatusShape) -> "Deferred[None]":
            def learnt(answer: tuple[int, Any]) -> None:
                status, document = answer
                if status != 200 or generation != self.generation or not isinstance(document, dict):
                    return
                state = document.get("State")
                text = state.get(shape.since) if isinstance(state, dict) else None
                clock = parse_docker_time(text) if isinstance(text, str) else None
                if clock is not None:
                    if len(self._clocks) >= MAX_CLOCKS:
                        self._clocks.clear()  # bounded; a destroy event normally drops its container
                    self._clocks[ident] = (shape.since, clock)

            return self._client.get_json(f"/containers/{ident}/json").addCallback(learnt)

        calls: Iterable[Deferred[Any]] = [self._inspecting.run(inspect, ident, shape)
                                          for ident, shape in containers.items()]
        return DeferredList(list(calls), consumeErrors=True)

    def _bug(self, failure: Failure) -> None:
        log.failure("keeping a list answer failed", failure)


class ListCacheService(Service):
    """Runs the cache's event stream while the agent runs."""

    name = "list-cache"

    def __init__(self, cache: ListCache) -> None:
        self.cache = cache

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.cache.start()

    def stopService(self) -> Any:  # noqa: N802
        self.cache.stop()
        return super().stopService()


class _Kept:
    __slots__ = ("uri", "answer", "size")

    def __init__(self, uri: bytes, answer: KeptAnswer) -> None:
        self.uri = uri
        self.answer = answer
        self.size = answer.size + len(uri)


def _header_lines(response: IResponse) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, values in response.headers.getAllRawHeaders() for value in values]


def _response(headers: Iterable[tuple[bytes, bytes]], body: bytes, etag: bytes, if_none_match: bytes | None,
              phrase: bytes = b"OK", state: str | None = None, valid_ms: int | None = None,
              with_body: Iterable[tuple[bytes, bytes]] = ()) -> MemoryResponse:
    """A 200 with ``body`` (and the ``with_body`` header lines), or a 304 when
    ``if_none_match`` matches ``etag``."""
    lines = [(name, value) for name, value in headers
             if name.lower() not in (b"content-length", b"etag", b"transfer-encoding", b"date")]
    own = [(ETAG, etag)]
    if state is not None:
        own.append((STATE_HEADER, state.encode("ascii")))
    if valid_ms is not None:
        own.append((VALID_FOR_HEADER, b"%d" % valid_ms))
    if matches(if_none_match, etag):
        # RFC 9110 15.4.5: no representation metadata on a 304 but the validator (and ours).
        return MemoryResponse(304, b"Not Modified", own, b"")
    lines.extend(own)
    lines.extend(with_body)
    return MemoryResponse(200, phrase, lines, body)
