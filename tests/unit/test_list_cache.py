"""The list cache in memory: keys, Status rules, kept answers, the event stream's
supervision and the cache's rules of freshness, with a fake Docker and a Clock."""
from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from portainer_agent.listcache.answer import NotKeepable, keep
from portainer_agent.listcache.events import EventStream
from portainer_agent.listcache.keys import list_key
from portainer_agent.listcache.service import ListCache, changes_lists, matches
from portainer_agent.listcache.status import NS, human_duration, parse_docker_time, status_shape
from portainer_agent.listcache.store import BoundedStore
from portainer_agent.proxy.local import DockerProxy
from portainer_agent.proxy.peer_lists import PeerCopies
from portainer_agent.toolbox.memory_response import MemoryResponse
from portainer_agent.toolbox.whole_body import read_whole_body

MINUTE = 60 * NS
HOUR = 60 * MINUTE
DAY = 24 * HOUR
STARTED = "2026-12-05T01:00:00.5Z"
STARTED_NS = parse_docker_time(STARTED)
assert STARTED_NS is not None


class KeyTests(SynchronousTestCase):
    def test_what_docker_reads_the_same_way_shares_a_key(self) -> None:
        same = [b"/containers/json?all=1", b"/containers/json?all=true", b"/containers/json?all=True&foo=bar",
                b"/containers/json?foo=1&all=yes", b"/containers/json?all=1&all=0"]
        keys = {list_key(b"GET", uri) for uri in same}
        self.assertEqual(len(keys), 1, keys)
        self.assertNotEqual(list_key(b"GET", b"/containers/json"), list_key(b"GET", b"/containers/json?all=1"))
        self.assertEqual(list_key(b"GET", b"/containers/json?all=0"), list_key(b"GET", b"/containers/json"))
        self.assertEqual(list_key(b"GET", b"/containers/json?limit=0"), list_key(b"GET", b"/containers/json"))

    def test_filters_are_a_set_of_terms_in_either_form(self) -> None:
        a = list_key(b"GET", b'/volumes?filters={"dangling":{"true":true},"name":{"b":true,"a":true}}')
        b = list_key(b"GET", b'/volumes?filters={"name":["a","b"],"dangling":["true"]}')
        self.assertEqual(a, b)
        self.assertNotEqual(a, list_key(b"GET", b'/volumes?filters={"name":["a"]}'))

    def test_the_version_prefix_splits_the_key(self) -> None:
        self.assertNotEqual(list_key(b"GET", b"/v1.41/images/json"), list_key(b"GET", b"/v1.40/images/json"))
        self.assertEqual(list_key(b"GET", b"/v1.41/images/json").list, "images")  # type: ignore[union-attr]

    def test_what_is_not_kept(self) -> None:
        for method, uri in [(b"POST", b"/containers/json"), (b"GET", b"/containers/json?size=1"),
                            (b"GET", b"/containers/json?filters=notjson"), (b"GET", b"/containers/json?limit=x"),
                            (b"GET", b"/containers/json?limit=5_0"), (b"GET", b'/volumes?filters={"a":{"b":1}}'),
                            (b"GET", b"/containers/abc/json"), (b"GET", b"/volumes/x"),
                            (b"GET", b"/containers/json?all=1;size=1"), (b"GET", b"/info")]:
            self.assertIsNone(list_key(method, uri), uri)


class StatusTests(SynchronousTestCase):
    def test_go_units_human_duration(self) -> None:
        cases = [(0, "Less than a second"), (NS - 1, "Less than a second"), (NS, "1 second"),
                 (59 * NS, "59 seconds"), (60 * NS, "About a minute"), (119 * NS, "About a minute"),
                 (120 * NS, "2 minutes"), (59 * MINUTE, "59 minutes"), (60 * MINUTE, "About an hour"),
                 (89 * MINUTE, "About an hour"), (90 * MINUTE, "2 hours"), (47 * HOUR + 29 * MINUTE, "47 hours"),
                 (47 * HOUR + 30 * MINUTE, "2 days"), (13 * DAY, "13 days"), (14 * DAY, "2 weeks"),
                 (59 * DAY, "8 weeks"), (60 * DAY, "2 months"), (729 * DAY, "24 months"),
                 (730 * DAY, "2 years"), (-5 * NS, "Less than a second")]
        for ns, text in cases:
            self.assertEqual(human_duration(ns), text, ns)

    def test_shapes(self) -> None:
        up = status_shape("Up 5 minutes (healthy)")
        assert up is not None
        self.assertEqual((up.prefix, up.suffix, up.since), ("Up ", " (healthy)", "StartedAt"))
        self.assertEqual(up.render(0, 3 * HOUR), "Up 3 hours (healthy)")
        exited = status_shape("Exited (137) About an hour ago")
        assert exited is not None
        self.assertEqual(exited.render(0, 2 * NS), "Exited (137) 2 seconds ago")
        self.assertEqual(status_shape("Restarting (1) 3 seconds ago").since, "FinishedAt")  # type: ignore[union-attr]
        for static in ("Created", "Dead", "Removal In Progress", "", "Up to you"):
            self.assertIsNone(status_shape(static), static)

    def test_the_text_never_changes_before_the_next_change(self) -> None:
        from portainer_agent.listcache.status import next_change

        for start in (0, NS // 2, 59 * NS + 3, 61 * NS, 59 * MINUTE + 7, 90 * MINUTE - 1, 47 * HOUR + 1799 * NS,
                      13 * DAY + 5, 729 * DAY + HOUR, -3 * NS):
            change = next_change(start)
            self.assertGreater(change, start)
            probe = start
            for probe in (start, (start + change) // 2, change - 1):
                self.assertEqual(human_duration(probe), human_duration(start), (start, probe))
        self.assertNotEqual(human_duration(next_change(59 * NS)), human_duration(59 * NS))
        self.assertNotEqual(human_duration(next_change(89 * MINUTE)), human_duration(89 * MINUTE))

    def test_docker_times(self) -> None:
        self.assertIsNone(parse_docker_time("0001-01-01T00:00:00Z"))
        self.assertEqual(parse_docker_time("1970-01-01T00:00:01.000000002Z"), NS + 2)
        self.assertEqual(parse_docker_time("1970-01-01T01:00:01+01:00"), NS)
        self.assertIsNone(parse_docker_time("yesterday"))


def containers_body(*items: dict[str, Any]) -> bytes:
    # Docker's encoding: compact, a newline at the end.
    return json.dumps(list(items), separators=(",", ":")).encode() + b"\n"


RUNNING = {"Id": "a" * 64, "Names": ["/web"], "State": "running", "Status": "Up 5 minutes",
           "Labels": {"x": "Status"}}
CREATED = {"Id": "b" * 64, "Names": ["/new"], "State": "created", "Status": "Created"}


class KeptAnswerTests(SynchronousTestCase):
    def test_a_kept_answer_says_what_docker_would_say_later(self) -> None:
        at = STARTED_NS + 5 * MINUTE + 10 * NS
        body = containers_body(RUNNING, CREATED)
        kept = keep(body, [(b"Api-Version", b"1.41")], True, {RUNNING["Id"]: STARTED_NS}, (at, at))
        self.assertEqual(kept.render(at)[0], body)
        later, tag = kept.render(at + 2 * MINUTE)
        self.assertEqual(json.loads(later)[0]["Status"], "Up 7 minutes")
        self.assertEqual(json.loads(later)[1], CREATED)
        self.assertEqual(json.loads(later)[0]["Labels"], {"x": "Status"})
        self.assertNotEqual(tag, kept.render(at)[1])
        self.assertEqual(kept.headers, ((b"Api-Version", b"1.41"),))

    def test_a_status_the_rules_do_not_give_is_not_kept(self) -> None:
        at = STARTED_NS + 5 * MINUTE
        with self.assertRaises(NotKeepable):
            keep(containers_body(RUNNING), [], True, {RUNNING["Id"]: STARTED_NS - HOUR}, (at, at))
        with self.assertRaises(NotKeepable):
            keep(containers_body(RUNNING), [], True, {}, (at, at))

    def test_bytes_that_would_not_round_trip_are_not_kept(self) -> None:
        spaced = json.dumps([CREATED]).encode() + b"\n"  # not Docker's compact form
        with self.assertRaises(NotKeepable):
            keep(spaced, [], True, {}, (0, 0))
        with self.assertRaises(NotKeepable):
            keep(b'{"not": "a list"}\n', [], True, {}, (0, 0))

    def test_other_lists_are_kept_as_they_are(self) -> None:
        body = b'{"Volumes":[],"Warnings":null}\n'
        kept = keep(body, [], False, {}, (0, 0))
        self.assertEqual(kept.render(10 * DAY)[0], body)


class PeerClocksTests(SynchronousTestCase):
    def test_a_peer_answer_with_its_clocks_is_formatted_here_at_the_peers_time(self) -> None:
        from portainer_agent.listcache.answer import keep_with_clocks
        from portainer_agent.proxy.peer_lists import PeerCopy

        at = STARTED_NS + 5 * MINUTE
        body = containers_body(RUNNING, CREATED)
        peer = keep(body, [], True, {RUNNING["Id"]: STARTED_NS}, (at, at))
        self.assertEqual(peer.clocks(), [STARTED_NS])
        here = keep_with_clocks(body, peer.clocks(), at)
        skew = 7 * NS  # the peer's clock is 7 s ahead of ours
        copy = PeerCopy(b'"x"', body, "b-1", None, here, skew)
        ours = at - skew + 2 * MINUTE
        self.assertEqual(copy.rendered(ours), peer.render(at + 2 * MINUTE))
        with self.assertRaises(NotKeepable):
            keep_with_clocks(body, [], at)
        with self.assertRaises(NotKeepable):
            keep_with_clocks(body, [STARTED_NS - HOUR], at)  # the texts do not match the clocks
        self.assertEqual(PeerCopy(b'"x"', body).rendered(ours), (body, b'"x"'))


class FakeDocker:
    """Answers lists from ``lists`` and inspects from ``started``; holds ``/events`` open."""

    def __init__(self) -> None:
        self.lists: dict[bytes, bytes] = {}
        self.started: dict[str, str] = {}
        self.asked: list[bytes] = []
        self.events: list[Deferred[Any]] = []
        self.held: dict[bytes, Deferred[Any]] = {}
        self.hold = False

    def request(self, method: bytes, uri: bytes, headers: Any = (), body: Any = None) -> "Deferred[Any]":
        if uri.startswith(b"/events"):
            pending: Deferred[Any] = Deferred()
            self.events.append(pending)
            return pending
        self.asked.append(uri)
        response = MemoryResponse(200, b"OK", [(b"Content-Type", b"application/json")], self.lists[uri])
        if self.hold:
            self.held[uri] = Deferred()
            return self.held[uri].addCallback(lambda _: response)
        return succeed(response)

    def get_json(self, path: str) -> "Deferred[tuple[int, Any]]":
        ident = path.split("/")[2]
        return succeed((200, {"State": {"StartedAt": self.started[ident], "FinishedAt": "0001-01-01T00:00:00Z"}}))


class EventBody:
    """An open ``GET /events`` response whose lines the test writes."""

    code = 200
    phrase = b"OK"
    length = None

    def __init__(self) -> None:
        self.protocol: Any = None
        self.stopped = False

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        self.protocol = protocol
        protocol.makeConnection(self)

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True

    def event(self, kind: str, action: str, ident: str = "x") -> None:
        line = json.dumps({"Type": kind, "Action": action, "Actor": {"ID": ident}})
        self.protocol.dataReceived(line.encode()[:10])  # split across reads
        self.protocol.dataReceived(line.encode()[10:] + b"\n")

    def end(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))


class CacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.now = STARTED_NS + 5 * MINUTE
        self.docker = FakeDocker()
        self.docker.lists[b"/containers/json?all=1"] = containers_body(RUNNING, CREATED)
        self.docker.lists[b"/images/json"] = b"[]\n"
        self.docker.started[RUNNING["Id"]] = STARTED
        self.cache = ListCache(self.clock, self.docker, now_ns=lambda: self.now)
        self.cache.start()

    def up(self) -> EventBody:
        stream = EventBody()
        self.docker.events[-1].callback(stream)
        return stream

    def ask(self, uri: bytes, tag: bytes | None = None) -> MemoryResponse | None:
        pending = self.cache.answer(b"GET", uri, tag, lambda: self.docker.request(b"GET", uri))
        if pending is None:
            return None
        return self.successResultOf(pending)

    def body(self, response: Any) -> bytes:
        return self.successResultOf(read_whole_body(response))

    def test_the_second_ask_is_answered_from_memory_with_the_same_tag(self) -> None:
        self.up()
        first = self.ask(b"/containers/json?all=1")
        second = self.ask(b"/containers/json?all=true")
        self.assertEqual(self.docker.asked, [b"/containers/json?all=1"])
        assert first is not None and second is not None
        self.assertEqual(self.body(first), self.body(second))
        self.assertEqual(dict(first.raw_headers)[b"ETag"], dict(second.raw_headers)[b"ETag"])
        self.assertEqual(second.code, 200)

    def test_a_matching_tag_gets_304_without_a_body(self) -> None:
        self.up()
        first = self.ask(b"/images/json")
        assert first is not None
        tag = dict(first.raw_headers)[b"ETag"]
        again = self.ask(b"/images/json", b'W/"other", ' + tag)
        assert again is not None
        self.assertEqual((again.code, again.length), (304, 0))
        # Only the validator and the cache state (no representation metadata on a 304).
        self.assertEqual(again.raw_headers, [(b"ETag", tag), (b"X-PortainerAgent-List-State",
                                                             f"{self.cache.boot}-{self.cache.generation}".encode())])

    def test_an_aggregating_peer_asking_for_clocks_gets_them(self) -> None:
        self.up()
        self.ask(b"/containers/json?all=1")
        pending = self.cache.answer(b"GET", b"/containers/json?all=1", None, lambda: succeed(None), clocks=True)
        assert pending is not None
        headers = dict(self.successResultOf(pending).raw_headers)
        self.assertEqual(headers[b"X-PortainerAgent-List-Clocks"], b"%d" % STARTED_NS)
        self.assertEqual(headers[b"X-PortainerAgent-List-Now"], b"%d" % self.now)
        self.assertEqual(headers[b"X-PortainerAgent-List-Valid-For"], b"%d" % (60 * 1000 - 1), "until 6 minutes")

    def test_time_relative_statuses_move_on_in_memory(self) -> None:
        self.up()
        self.ask(b"/containers/json?all=1")
        self.now += 3 * MINUTE
        later = self.ask(b"/containers/json?all=1")
        self.assertEqual(len(self.docker.asked), 1)
        self.assertEqual(json.loads(self.body(later))[0]["Status"], "Up 8 minutes")

    def test_an_event_drops_what_is_kept_but_read_only_actions_do_not(self) -> None:
        stream = self.up()
        self.ask(b"/images/json")
        stream.event("container", "exec_start: sh -c true")
        stream.event("container", "health_status: healthy", "y")  # a status change: this one counts
        self.ask(b"/images/json")
        self.assertEqual(len(self.docker.asked), 2)
        self.ask(b"/images/json")
        stream.event("container", "top")
        self.ask(b"/images/json")
        self.assertEqual(len(self.docker.asked), 2)
        stream.event("image", "tag")
        self.ask(b"/images/json")
        self.assertEqual(len(self.docker.asked), 3)

    def test_an_answer_that_raced_a_change_is_served_once_and_not_kept(self) -> None:
        stream = self.up()
        self.docker.hold = True
        pending = self.cache.answer(b"GET", b"/images/json", None,
                                    lambda: self.docker.request(b"GET", b"/images/json"))
        assert pending is not None
        stream.event("image", "delete")
        self.docker.held[b"/images/json"].callback(None)
        self.assertEqual(self.body(self.successResultOf(pending)), b"[]\n")
        self.docker.hold = False
        self.ask(b"/images/json")
        self.assertEqual(len(self.docker.asked), 2, "the raced answer was not kept")

    def test_a_write_drops_what_is_kept(self) -> None:
        self.up()
        self.ask(b"/images/json")
        self.assertEqual(self.cache.written("passed through"), "passed through")
        self.ask(b"/images/json")
        self.assertEqual(len(self.docker.asked), 2)

    def test_nothing_from_memory_while_the_stream_is_down_and_a_refill_when_it_is_back(self) -> None:
        self.assertIsNone(self.ask(b"/images/json"), "not before the stream is open")
        stream = self.up()
        self.ask(b"/images/json")
        stream.end()
        self.assertFalse(self.cache.ready)
        self.assertIsNone(self.ask(b"/images/json"))
        self.assertEqual(self.cache.bytes_held, 0)
        self.clock.advance(1)  # the reconnect delay (at most 0.15 s the first time)
        self.assertEqual(len(self.docker.events), 2)
        self.up()
        self.assertEqual(self.docker.asked, [b"/images/json", b"/images/json"], "read again in the background")
        self.ask(b"/images/json")
        self.assertEqual(len(self.docker.asked), 2, "served from the refill")

    def test_a_lost_container_clock_is_read_again(self) -> None:
        stream = self.up()
        self.ask(b"/containers/json?all=1")
        stream.event("container", "restart", RUNNING["Id"])
        self.docker.started[RUNNING["Id"]] = "2026-12-05T01:04:00Z"
        self.docker.lists[b"/containers/json?all=1"] = containers_body({**RUNNING, "Status": "About a minute"},
                                                                        CREATED)
        self.docker.lists[b"/containers/json?all=1"] = containers_body({**RUNNING, "Status": "Up About a minute"},
                                                                        CREATED)
        self.ask(b"/containers/json?all=1")
        self.now += MINUTE
        later = self.ask(b"/containers/json?all=1")
        self.assertEqual(len(self.docker.asked), 2)
        self.assertEqual(json.loads(self.body(later))[0]["Status"], "Up 2 minutes")

    def test_stop_closes_the_stream(self) -> None:
        stream = self.up()
        self.cache.stop()
        self.assertTrue(stream.stopped)
        stream.end()
        self.clock.advance(60)
        self.assertEqual(len(self.docker.events), 1, "not reopened after stop")


class EventStreamTests(SynchronousTestCase):
    def test_failures_back_off_up_to_the_cap_and_reset_after_a_long_run(self) -> None:
        clock = Clock()
        docker = FakeDocker()
        ups: list[str] = []
        stream = EventStream(clock, docker, lambda: ups.append("up"), lambda e: None, lambda r: ups.append("down"),
                             jitter=lambda: 0.5)
        stream.start()
        delays = []
        for _ in range(8):
            docker.events[-1].errback(Failure(ConnectionRefusedError("no dockerd")))
            call = clock.getDelayedCalls()[0]
            delays.append(round(call.getTime() - clock.seconds(), 3))
            clock.advance(call.getTime() - clock.seconds())
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
        self.assertEqual(ups, [], "never up: no up/down calls")
        body = EventBody()
        docker.events[-1].callback(body)
        clock.advance(100)
        body.end()
        self.assertEqual(ups, ["up", "down"])
        call = clock.getDelayedCalls()[0]
        self.assertEqual(round(call.getTime() - clock.seconds(), 3), 0.1)

    def test_a_non_200_answer_is_a_failed_open(self) -> None:
        clock = Clock()
        docker = FakeDocker()
        stream = EventStream(clock, docker, lambda: None, lambda e: None, lambda r: None, jitter=lambda: 0.5)
        stream.start()
        docker.events[-1].callback(MemoryResponse(500, b"Error", [], b'{"message":"boom"}'))
        self.assertFalse(stream.up)
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_changes_lists(self) -> None:
        self.assertTrue(changes_lists({"Type": "container", "Action": "start"}))
        self.assertTrue(changes_lists({"Type": "network", "Action": "connect"}))
        self.assertFalse(changes_lists({"Type": "container", "Action": "exec_die"}))
        self.assertTrue(changes_lists({"Type": "container", "Action": "commit"}))
        self.assertTrue(changes_lists({"status": "start", "id": "x"}))  # the legacy fields


class SmallPartsTests(SynchronousTestCase):
    def test_if_none_match(self) -> None:
        self.assertTrue(matches(b'"a", W/"b"', b'"b"'))
        self.assertTrue(matches(b"*", b'"b"'))
        self.assertFalse(matches(b'"a"', b'"b"'))
        self.assertFalse(matches(None, b'"b"'))

    def test_the_store_is_bounded_by_count_and_bytes_least_recent_out(self) -> None:
        class Value:
            def __init__(self, size: int) -> None:
                self.size = size

        store: BoundedStore[str, Value] = BoundedStore(max_entries=2, max_bytes=100)
        store.put("a", Value(10))
        store.put("b", Value(10))
        store.get("a")
        store.put("c", Value(10))
        self.assertEqual(sorted(store), ["a", "c"])
        store.put("d", Value(95))
        self.assertEqual(list(store), ["d"])
        self.assertFalse(store.put("e", Value(101)))
        self.assertEqual(store.bytes, 95)

    def test_peer_copies_forget_untagged_answers(self) -> None:
        copies = PeerCopies(10, 1000)
        copies.keep("n1", b"/x", b'"t"', b"[]")
        self.assertEqual(copies.get("n1", b"/x").etag, b'"t"')  # type: ignore[union-attr]
        copies.keep("n1", b"/x", None, b"[]")
        self.assertIsNone(copies.get("n1", b"/x"))


class MergeMemoTests(SynchronousTestCase):
    def test_the_same_tags_give_the_kept_merge_and_untagged_answers_are_merged_each_time(self) -> None:
        from portainer_agent.proxy import merge as merge_module
        from portainer_agent.proxy.merge import MergeMemo, NodeAnswer, NodeFailure

        merged: list[int] = []
        real = merge_module.merge_answers

        def counting(*args: Any, **kwargs: Any) -> Any:
            merged.append(1)
            return real(*args, **kwargs)

        self.patch(merge_module, "merge_answers", counting)
        memo = MergeMemo()
        tagged = [NodeAnswer("n2", b'[{"Id":"b"}]\n', b'"t2"'), NodeAnswer("n1", b'[{"Id":"a"}]\n', b'"t1"')]
        first = memo.merge(b"/containers/json", b"/containers/json", tagged)
        again = memo.merge(b"/containers/json", b"/containers/json", list(reversed(tagged)))
        self.assertEqual(first, again)
        self.assertEqual(len(merged), 1)
        self.assertEqual([item["Id"] for item in json.loads(first[0])], ["a", "b"])
        changed = [NodeAnswer("n1", b'[{"Id":"c"}]\n', b'"t3"'), tagged[0]]
        self.assertIn(b'"c"', memo.merge(b"/containers/json", b"/containers/json", changed)[0])
        untagged = [NodeAnswer("n1", b"[]\n")]
        memo.merge(b"/containers/json", b"/containers/json", untagged)
        memo.merge(b"/containers/json", b"/containers/json", untagged)
        memo.merge(b"/containers/json", b"/containers/json", tagged, [NodeFailure("n3", "down")])
        self.assertEqual(len(merged), 5)


class PeerStatesTests(SynchronousTestCase):
    def test_a_copy_is_trusted_only_in_the_state_last_heard_and_only_while_it_is_fresh(self) -> None:
        from portainer_agent.listcache.peer_states import TRUST_SECONDS, PeerListStates

        clock = Clock()
        states = PeerListStates(clock)
        self.assertFalse(states.trusts("n1", "b-1"), "nothing heard yet")
        states.heard("n1", "b", 1)
        self.assertTrue(states.trusts("n1", "b-1"))
        self.assertFalse(states.trusts("n1", "b-0"), "a copy from an older state")
        self.assertFalse(states.trusts("n1", None))
        self.assertFalse(states.trusts("n2", "b-1"))
        clock.advance(TRUST_SECONDS + 0.01)
        self.assertFalse(states.trusts("n1", "b-1"), "not heard for too long: asked again")
        states.heard("n1", "b", 2)
        self.assertFalse(states.trusts("n1", "b-1"), "changed")
        states.heard("n1", "c", 1)
        self.assertFalse(states.trusts("n1", "b-1"), "restarted")

    def test_the_beacon_tells_every_live_peer_and_the_barrier_waits_for_them_or_its_deadline(self) -> None:
        from portainer_agent.cluster.member import PeerAddress
        from portainer_agent.listcache.beacon import BARRIER_SECONDS, HEARTBEAT_SECONDS, ListBeacon

        clock = Clock()
        cache = ListCache(clock, FakeDocker())
        told: list[tuple[str, str, int, Deferred[Any]]] = []

        class Transport:
            def list_state(self, peer: PeerAddress, node: str, boot: str, generation: int) -> "Deferred[Any]":
                d: Deferred[Any] = Deferred()
                told.append((peer.host, node, generation, d))
                return d

        class Peer:
            def __init__(self, host: str) -> None:
                self.peer = PeerAddress(host, 9002)

        beacon = ListBeacon(clock, cache, Transport(), lambda: [Peer("10.0.0.1"), Peer("10.0.0.2")], lambda: "me")
        beacon.startService()
        cache.invalidate("event")
        clock.advance(0)
        self.assertEqual([(host, node, gen) for host, node, gen, _ in told], [("10.0.0.1", "me", 1), ("10.0.0.2", "me", 1)])
        clock.advance(HEARTBEAT_SECONDS)
        self.assertEqual(len(told), 4, "and as a heartbeat")
        result = cache.settled("the answer")
        self.assertNoResult(result)
        told[-2][3].callback({})
        self.assertNoResult(result)
        told[-1][3].errback(Failure(ConnectionRefusedError()))
        self.assertEqual(self.successResultOf(result), "the answer")
        late = cache.settled("late")
        clock.advance(BARRIER_SECONDS)
        self.assertEqual(self.successResultOf(late), "late", "a peer that does not answer holds a write 1 s at most")
        beacon.stopService()
        self.assertEqual(cache.settled("after"), "after")


class TrustedPeersTests(SynchronousTestCase):
    """The real FanOut in memory: a peer whose announced state is its copy's is not asked."""

    def test_unchanged_peers_are_not_asked_changed_ones_conditionally_and_trust_runs_out(self) -> None:
        from portainer_agent.listcache.peer_states import TRUST_SECONDS

        from .test_cluster_memory import Cluster

        cluster = Cluster(peer_copies=PeerCopies(100, 10_000_000), peer_states=True)
        self.addCleanup(cluster.stop)
        states = cluster.peer_states
        assert states is not None

        def peer(node: str) -> Any:
            def answer(request: Request) -> bytes:
                tag = b'"%s-tag"' % node.encode()
                request.setHeader(b"ETag", tag)
                request.setHeader(b"X-PortainerAgent-List-State", b"boot-1")
                if request.getHeader(b"if-none-match") == tag:
                    request.setResponseCode(304)
                    return b""
                request.setHeader(b"content-type", b"application/json")
                return json.dumps([{"Id": f"{node}-a"}]).encode()
            return answer

        for node in ("node1", "node2"):
            cluster.dockers[node].handler = peer(node)

        def asked() -> list[int]:
            return [len(cluster.dockers[node].seen) for node in ("node1", "node2")]

        first = cluster.get("/containers/json")[1]
        self.assertEqual(asked(), [1, 1])
        states.heard("node1", "boot", 1)
        states.heard("node2", "boot", 1)
        self.assertEqual(cluster.get("/containers/json")[1], first)
        self.assertEqual(asked(), [1, 1], "neither peer asked: both announced the copy's state")
        states.heard("node1", "boot", 2)
        self.assertEqual(cluster.get("/containers/json")[1], first)
        self.assertEqual(asked(), [2, 1], "node1 changed: asked, conditionally")
        self.assertEqual(cluster.dockers["node1"].seen[-1].header(b"if-none-match"), [b'"node1-tag"'])
        cluster.clock.advance(TRUST_SECONDS + 0.1)
        cluster.get("/containers/json")
        self.assertEqual(asked(), [3, 2], "nothing heard for too long: both asked")


class WriteOrderTests(SynchronousTestCase):
    def test_a_write_drops_the_cache_before_the_client_hears_and_again_when_it_ends(self) -> None:
        request = Request(DummyChannel())
        request.method, request.uri, request.path = b"POST", b"/containers/create", b"/containers/create"
        request.content = io.BytesIO(b"{}")
        sent = request.channel.transport.written
        answered: Deferred[Any] = Deferred()
        barrier: Deferred[Any] = Deferred()
        seen: list[int] = []

        class Upstream:
            def request(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
                return answered

        class Lists:
            def answer(self, *args: Any) -> None:
                raise AssertionError("a write is never answered from memory")

            def written(self, result: Any = None) -> Any:
                seen.append(len(sent.getvalue()))
                return result

            def settled(self, result: Any = None) -> Any:
                # The write barrier: the client hears nothing until the other agents heard.
                seen.append(-1)
                return barrier.addCallback(lambda _: result)

        DockerProxy(Upstream(), "/sock", lists=Lists()).render(request)
        answered.callback(MemoryResponse(201, b"Created", [], b'{"Id":"x"}'))
        self.assertEqual(seen, [0, -1], "dropped before anything reached the client, then the barrier")
        self.assertEqual(sent.getvalue(), b"", "held by the barrier")
        barrier.callback(None)
        self.assertTrue(sent.getvalue().endswith(b'{"Id":"x"}'), sent.getvalue())
        self.assertEqual(len(seen), 3, "and dropped once more when the exchange ended")
