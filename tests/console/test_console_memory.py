"""The websocket console driven in memory: a wsproto client on a StringTransport in
front of the agent root, the Docker socket on a MemoryReactor. Proves the text rules
(no cut characters, U+FFFD, no padding), the relay both ways, the close rules, the
keepalive, and the HTTP answers given before any upgrade."""
from __future__ import annotations

import json
from typing import Any

import attrs
from hypothesis import given, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from portainer_agent.docker.client import DockerClient
from portainer_agent.docker.testing import MemoryDocker
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Event, Ping, Pong, Request,
                            TextMessage)

from portainer_agent import __version__
from portainer_agent.console.docker_stream import (EXEC_START_BODY, TERMINAL_HANGUP, ConsoleTarget, console_opener,
                                                   hangup_for, open_docker_stream)
from portainer_agent.http.console import ConsoleResource
from portainer_agent.console.session import END_OF_INPUT, HANGUP_REPEAT, HANGUP_TRIES
from portainer_agent.console.sessions import ConsoleSessions
from portainer_agent.console.text import TerminalText
from portainer_agent.http.inflight import InFlight
from portainer_agent.http.root import AgentRoot
from portainer_agent.proxy.dispatch import Destinations
from portainer_agent.http.site import AgentSite
from portainer_agent.http.request import AgentRequests
from tests.unit.memory import SOCKET, FakeDocker, RecordingHandler, raw_request

UPGRADED = (b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
            b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
PING_INTERVAL = 30.0
CLOSE_TIMEOUT = 5.0


class TerminalTextTests(SynchronousTestCase):
    SAMPLE = "A😀B中文é\n".encode()

    def test_every_split_point_gives_the_whole_text(self) -> None:
        for cut in range(len(self.SAMPLE) + 1):
            text = TerminalText()
            first, second = text.feed(self.SAMPLE[:cut]), text.feed(self.SAMPLE[cut:])
            self.assertEqual(first + second + text.end(), self.SAMPLE.decode())
            # Each piece is whole characters: encodable on its own.
            first.encode("utf-8"), second.encode("utf-8")

    def test_byte_by_byte(self) -> None:
        text = TerminalText()
        pieces = [text.feed(self.SAMPLE[i:i + 1]) for i in range(len(self.SAMPLE))]
        self.assertEqual("".join(pieces), self.SAMPLE.decode())

    def test_invalid_bytes_become_replacement_characters(self) -> None:
        text = TerminalText()
        self.assertEqual(text.feed(b"X\xffY\xc3(") + text.end(), "X\ufffdY\ufffd(")

    def test_dangling_partial_character_at_the_end(self) -> None:
        text = TerminalText()
        self.assertEqual(text.feed(b"ok\xe4\xb8"), "ok")
        self.assertEqual(text.end(), "\ufffd")

    @given(st.binary(max_size=64), st.lists(st.integers(0, 64), max_size=6))
    def test_any_bytes_any_splits_decode_as_a_whole(self, data: bytes, cuts: list[int]) -> None:
        text = TerminalText()
        points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
        out = "".join(text.feed(data[a:b]) for a, b in zip(points, points[1:])) + text.end()
        self.assertEqual(out, data.decode("utf-8", errors="replace"))


class ConsoleInMemory:
    """One client connection to the agent and the Docker socket connection it makes."""

    def __init__(self, target: bytes = b"/websocket/exec?id=ab12", kind: str = "exec",
                 extra: list[tuple[bytes, bytes]] | None = None, raw: bytes | None = None,
                 hangup: bytes = b"") -> None:
        self.reactor = MemoryReactor()
        self.clock = Clock()
        self.closed: list[Any] = []
        # Wired as tap.py does: the site, the root and the consoles share one registry.
        self.inflight = InFlight()

        # The agent's one Docker client, on the socket (its connections land in the MemoryReactor).
        docker = DockerClient.for_socket(self.reactor, SOCKET)

        def opener(target: ConsoleTarget) -> Any:
            return open_docker_stream(docker, attrs.evolve(target, hangup=hangup))

        resources = {
            b"/websocket/" + k.encode(): ConsoleResource(
                k, opener, self.clock, PING_INTERVAL,
                track=self._track, close_timeout=CLOSE_TIMEOUT, hand_over=self.inflight.hand_over)
            for k in ("exec", "attach")
        }
        self.root = AgentRoot(Destinations(RecordingHandler(), RecordingHandler()), guard=None, endpoints=resources,
                              inflight=self.inflight)
        self.client = StringTransport()
        self.site = AgentSite(self.root, AgentRequests(self.root.router), reactor=Clock(), inflight=self.inflight)
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        self.channel.makeConnection(self.client)
        self.ws = WSConnection(ConnectionType.CLIENT)
        if raw is None:
            raw = self.ws.send(Request(host="agent", target=target.decode(), extra_headers=extra or []))
        self.channel.dataReceived(raw)
        self.upstream = StringTransport()
        self.docker: Any = None
        self._read = 0

    def _track(self, session: Any) -> Any:
        self.session = session
        return lambda: self.closed.append(session)

    def connect_docker(self) -> bytes:
        address, factory, _, _ = self.reactor.unixClients[-1]
        assert address == SOCKET
        self.docker = factory.buildProtocol(None)
        self.docker.makeConnection(self.upstream)
        return self.upstream.value()

    def open(self) -> list[Event]:
        self.connect_docker()
        self.docker.dataReceived(UPGRADED)
        return self.events()

    def events(self) -> list[Event]:
        data = self.client.value()
        new, self._read = data[self._read:], len(data)
        self.ws.receive_data(new)
        return list(self.ws.events())

    def texts(self) -> str:
        return "".join(e.data for e in self.events() if isinstance(e, TextMessage))

    def client_sends(self, event: Event) -> None:
        self.client.protocol.dataReceived(self.ws.send(event))

    def http_answer(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        head, _, body = self.client.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(b":") for line in lines[1:])}
        return lines[0], headers, body


class HandshakeTests(SynchronousTestCase):
    def test_nothing_is_accepted_before_docker_upgrades(self) -> None:
        console = ConsoleInMemory()
        sent = console.connect_docker()
        self.assertEqual(console.client.value(), b"")
        head, _, body = sent.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /exec/ab12/start HTTP/1.1")
        self.assertIn(b"Upgrade: tcp", lines)
        self.assertIn(b"Connection: Upgrade", lines)
        self.assertEqual(body, EXEC_START_BODY)

    def test_attach_asks_for_every_stream(self) -> None:
        console = ConsoleInMemory(b"/v2/websocket/attach?id=CAFE01&nodeName=n1&token=jwt")
        lines = console.connect_docker().split(b"\r\n")
        self.assertEqual(lines[0], b"POST /containers/CAFE01/attach?stdin=1&stdout=1&stderr=1&stream=1 HTTP/1.1")

    def test_accepted_with_agent_headers_after_101(self) -> None:
        console = ConsoleInMemory(b"/v1/websocket/exec?id=ab12")
        events = console.open()
        self.assertEqual([type(e) for e in events], [AcceptConnection])
        status, headers, _ = console.http_answer()
        self.assertEqual(status, b"HTTP/1.1 101 Switching Protocols")
        self.assertEqual(headers[b"portainer-agent"], __version__.encode())
        # The HTTP request lives on as the session: in flight (a drain waits for it and
        # cuts it), released when the session closes.
        self.assertEqual({k: n for k, n in console.site.inflight.by_kind().items() if n}, {"agent": 1})
        self.assertEqual(console.site.inflight.streams(), 1)
        self.assertEqual(console.closed, [])

    def test_missing_id_is_400(self) -> None:
        console = ConsoleInMemory(b"/websocket/exec")
        status, _, body = console.http_answer()
        self.assertEqual(status, b"HTTP/1.1 400 Bad Request")
        self.assertEqual(json.loads(body)["message"], "Invalid query parameter: id")
        self.assertEqual(console.reactor.unixClients, [])

    def test_non_hex_id_is_400(self) -> None:
        for bad in (b"xyz", b"ab12%2F..%2F", b"12-34", b"%20ab"):
            console = ConsoleInMemory(b"/websocket/attach?id=" + bad)
            status, headers, body = console.http_answer()
            self.assertEqual(status, b"HTTP/1.1 400 Bad Request", bad)
            self.assertEqual(json.loads(body)["message"], "Invalid query parameter: id (must be hexadecimal identifier)")
            self.assertEqual(headers[b"content-type"], b"application/json")
            self.assertEqual(console.reactor.unixClients, [])

    def test_plain_get_is_a_400_json(self) -> None:
        console = ConsoleInMemory(raw=raw_request(b"GET", b"/websocket/exec?id=ab12"))
        status, headers, body = console.http_answer()
        self.assertEqual(status, b"HTTP/1.1 400 Bad Request")
        self.assertEqual(json.loads(body)["message"], "Invalid websocket request")
        self.assertEqual(headers[b"sec-websocket-version"], b"13")
        self.assertEqual(console.reactor.unixClients, [])

    def test_post_is_405(self) -> None:
        console = ConsoleInMemory(raw=raw_request(b"POST", b"/websocket/exec?id=ab12"))
        status, headers, _ = console.http_answer()
        self.assertEqual(status, b"HTTP/1.1 405 Method Not Allowed")
        self.assertEqual(headers[b"allow"], b"GET")

    def test_docker_refusal_is_answered_with_its_message(self) -> None:
        console = ConsoleInMemory()
        console.connect_docker()
        body = b'{"message":"No such exec instance: ab12"}\n'
        console.docker.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        status, _, answer = console.http_answer()
        self.assertEqual(status, b"HTTP/1.1 404 Not Found")
        self.assertEqual(json.loads(answer)["message"], "No such exec instance: ab12")
        self.assertTrue(console.upstream.disconnecting or console.upstream.disconnected)

    def test_docker_unreachable_is_502(self) -> None:
        console = ConsoleInMemory()
        _, factory, _, _ = console.reactor.unixClients[-1]
        factory.clientConnectionFailed(None, Failure(ConnectError(string="no socket")))
        status, _, body = console.http_answer()
        self.assertEqual(status, b"HTTP/1.1 502 Bad Gateway")
        self.assertIn(SOCKET, json.loads(body)["message"])

    def test_client_gone_before_docker_answers_drops_docker(self) -> None:
        console = ConsoleInMemory()
        console.connect_docker()
        console.channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(console.upstream.disconnected)


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.console = ConsoleInMemory()
        self.console.open()

    def test_character_split_across_docker_reads_is_never_cut(self) -> None:
        data = "A😀B中文\r\n".encode()
        pieces = []
        for i in range(len(data)):
            self.console.docker.dataReceived(data[i:i + 1])
            pieces += [e.data for e in self.console.events() if isinstance(e, TextMessage)]
        self.assertEqual("".join(pieces), "A😀B中文\r\n")
        self.assertEqual(pieces, ["A", "😀", "B", "中", "文", "\r", "\n"])

    def test_invalid_bytes_arrive_as_replacement_characters(self) -> None:
        self.console.docker.dataReceived(b"X\xffY")
        self.assertEqual(self.console.texts(), "X\ufffdY")

    def test_frames_carry_exactly_the_bytes_read(self) -> None:
        self.console.docker.dataReceived(b"hi")
        events = self.console.events()
        self.assertEqual(events, [TextMessage(data="hi", frame_finished=True, message_finished=True)])

    def test_large_docker_output_is_relayed_whole(self) -> None:
        blob = b"x" * (1 << 20)
        for i in range(0, len(blob), 65536):
            self.console.docker.dataReceived(blob[i:i + 65536])
        self.assertEqual(self.console.texts(), "x" * (1 << 20))

    def test_client_messages_go_to_docker_verbatim_without_a_size_limit(self) -> None:
        self.console.upstream.clear()
        self.console.client_sends(TextMessage("ls -l\r"))
        self.console.client_sends(BytesMessage(b"\x03\x04"))
        paste = "é" * 5000
        self.console.client_sends(TextMessage(paste))
        self.assertEqual(self.console.upstream.value(), b"ls -l\r\x03\x04" + paste.encode())

    def test_client_ping_is_answered(self) -> None:
        self.console.client_sends(Ping(b"p1"))
        self.assertEqual(self.console.events(), [Pong(b"p1")])

    def test_client_close_ends_the_docker_stream(self) -> None:
        self.console.client_sends(CloseConnection(1000))
        events = self.console.events()
        self.assertEqual([(type(e), e.code) for e in events], [(CloseConnection, 1000)])
        self.assertTrue(self.console.upstream.disconnecting)
        self.assertTrue(self.console.client.disconnecting)

    def test_client_drop_ends_the_docker_stream_and_untracks_once_both_are_gone(self) -> None:
        self.console.client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.console.upstream.disconnecting)
        self.assertEqual(self.console.closed, [])
        self.assertEqual(len(self.console.inflight), 1, "in flight until both ends are gone")
        self.console.docker.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.console.closed, [self.console.session])
        self.assertEqual(len(self.console.inflight), 0, "released once the session is over")

    def test_docker_end_closes_the_websocket_normally(self) -> None:
        self.console.docker.dataReceived(b"bye\xe4")
        self.console.docker.connectionLost(Failure(ConnectionDone()))
        events = self.console.events()
        self.assertEqual(events[0], TextMessage(data="bye", frame_finished=True, message_finished=True))
        self.assertEqual(events[1].data, "\ufffd")  # the dangling partial character
        self.assertEqual((type(events[2]), events[2].code), (CloseConnection, 1000))
        self.assertFalse(self.console.client.disconnecting)  # waits for the client's answer
        self.console.client_sends(events[2].response())
        self.assertTrue(self.console.client.disconnecting)

    def test_client_that_never_answers_the_close_is_cut(self) -> None:
        self.console.docker.connectionLost(Failure(ConnectionDone()))
        self.console.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(self.console.client.disconnecting)
        self.console.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(self.console.client.disconnected)  # aborted

    def test_keepalive_pings_and_cuts_a_silent_client(self) -> None:
        self.console.clock.advance(PING_INTERVAL)
        pings = [e for e in self.console.events() if isinstance(e, Ping)]
        self.assertEqual(len(pings), 1)
        self.console.client_sends(pings[0].response())
        self.console.clock.advance(PING_INTERVAL)
        self.assertEqual(len([e for e in self.console.events() if isinstance(e, Ping)]), 1)
        self.assertFalse(self.console.client.disconnected)
        self.console.clock.advance(PING_INTERVAL)  # no pong, nothing else either
        self.assertTrue(self.console.client.disconnected)

    def test_backpressure_is_registered_both_ways(self) -> None:
        self.assertIs(self.console.client.producer, self.console.upstream)
        self.assertIs(self.console.upstream.producer, self.console.client)
        self.assertTrue(self.console.client.streaming and self.console.upstream.streaming)


class HangupTests(SynchronousTestCase):
    def test_only_tty_execs_are_hung_up(self) -> None:
        exec_target, attach = ConsoleTarget("exec", "ab"), ConsoleTarget("attach", "ab")
        self.assertEqual(hangup_for(exec_target, {"ProcessConfig": {"tty": True}}).hangup, TERMINAL_HANGUP)
        self.assertEqual(hangup_for(exec_target, {"ProcessConfig": {"tty": False}}).hangup, b"")
        self.assertEqual(hangup_for(exec_target, {}).hangup, b"")
        self.assertEqual(hangup_for(attach, {"ProcessConfig": {"tty": True}}).hangup, b"")

    def test_client_leaving_types_the_hangup_then_ends_of_input_then_closes(self) -> None:
        console = ConsoleInMemory(hangup=TERMINAL_HANGUP)
        console.open()
        console.upstream.clear()
        console.client_sends(CloseConnection(1001))
        self.assertEqual(console.upstream.value(), TERMINAL_HANGUP)
        self.assertFalse(console.upstream.disconnecting)
        console.clock.advance(HANGUP_REPEAT)
        self.assertEqual(console.upstream.value(), TERMINAL_HANGUP + END_OF_INPUT)
        console.clock.pump([HANGUP_REPEAT] * HANGUP_TRIES)
        self.assertEqual(console.upstream.value(), TERMINAL_HANGUP + END_OF_INPUT * (HANGUP_TRIES - 1))
        self.assertTrue(console.upstream.disconnecting)

    def test_shell_ending_after_the_hangup_closes_at_once(self) -> None:
        console = ConsoleInMemory(hangup=TERMINAL_HANGUP)
        console.open()
        console.client.protocol.connectionLost(Failure(ConnectionDone()))
        console.docker.readConnectionLost()  # the shell exited: Docker ends the stream
        self.assertTrue(console.upstream.disconnecting)
        self.assertEqual(console.clock.getDelayedCalls(), [])

    def test_docker_ending_types_nothing(self) -> None:
        console = ConsoleInMemory(hangup=TERMINAL_HANGUP)
        console.open()
        console.upstream.clear()
        console.docker.connectionLost(Failure(ConnectionDone()))
        console.client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(console.upstream.value(), b"")


class OpenerTests(SynchronousTestCase):
    """The exec inspection and the upgrade through the one Docker client, over a fake
    Docker in memory: both are requests of that client, on connections of its own."""

    def opener(self, answer: Any) -> tuple[Any, FakeDocker]:
        def handler(request: Any) -> bytes:
            if request.method == b"POST":  # the upgrade
                request.setResponseCode(101, b"UPGRADED")
                request.setHeader(b"connection", b"Upgrade")
                request.setHeader(b"upgrade", b"tcp")
                return b""
            code, document = answer(request)
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(document).encode()

        fake = FakeDocker(handler)
        docker = MemoryDocker(fake)
        open_stream = console_opener(docker)

        def opening(target: ConsoleTarget) -> Any:
            d = open_stream(target)
            docker.flush()  # the inspection, then the upgrade, in memory
            return d

        return opening, fake

    def test_unknown_exec_is_refused_before_any_upgrade(self) -> None:
        opener, fake = self.opener(lambda r: (404, {"message": "No such exec instance: ab"}))
        failure = self.failureResultOf(opener(ConsoleTarget("exec", "ab")))
        self.assertEqual((failure.value.status, failure.value.message), (404, "No such exec instance: ab"))
        self.assertEqual([(s.method, s.uri) for s in fake.seen], [(b"GET", b"/exec/ab/json")])

    def test_tty_exec_is_opened_with_its_hangup(self) -> None:
        opener, fake = self.opener(lambda r: (200, {"ProcessConfig": {"tty": True}}))
        opening = opener(ConsoleTarget("exec", "ab"))
        self.assertEqual([(s.method, s.uri, s.body) for s in fake.seen],
                         [(b"GET", b"/exec/ab/json", b""), (b"POST", b"/exec/ab/start", EXEC_START_BODY)])
        self.assertEqual(fake.seen[1].headers.getRawHeaders(b"upgrade"), [b"tcp"])
        self.assertEqual(self.successResultOf(opening).target.hangup, TERMINAL_HANGUP)

    def test_attach_is_not_inspected(self) -> None:
        opener, fake = self.opener(lambda r: (500, {}))
        self.successResultOf(opener(ConsoleTarget("attach", "ab")))
        self.assertEqual([(s.method, s.uri) for s in fake.seen],
                         [(b"POST", b"/containers/ab/attach?stdin=1&stdout=1&stderr=1&stream=1")])

    def test_docker_unreachable_names_the_clients_socket(self) -> None:
        docker = MemoryDocker(FakeDocker())
        docker.endpoint.refuse = Failure(ConnectError(string="no socket"))
        failure = self.failureResultOf(console_opener(docker)(ConsoleTarget("attach", "ab")))
        self.assertEqual(failure.value.status, 502)
        self.assertIn(docker.label, failure.value.message)


class StopTests(SynchronousTestCase):
    """A stopping agent says goodbye to every console (ConsoleSessions service)."""

    def setUp(self) -> None:
        self.console = ConsoleInMemory(hangup=TERMINAL_HANGUP)
        self.console.open()
        self.sessions = ConsoleSessions(self.console.clock)
        self.console.session.on_close = self.sessions.track(self.console.session)
        self.console.upstream.clear()

    def test_stop_hangs_up_says_going_away_and_waits_for_both_ends(self) -> None:
        stopping = self.sessions.stopService()
        self.assertEqual(self.console.upstream.value(), TERMINAL_HANGUP)
        events = self.console.events()
        self.assertEqual([(type(e), e.code) for e in events], [(CloseConnection, 1001)])
        self.assertNoResult(stopping)
        self.console.client_sends(events[0].response())  # the client answers the close
        self.console.client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(stopping)
        self.console.docker.readConnectionLost()  # the shell exited
        self.successResultOf(stopping)
        self.assertEqual(len(self.sessions), 0)

    def test_stop_cuts_what_does_not_end_in_time(self) -> None:
        stopping = self.sessions.stopService()
        self.console.clock.pump([HANGUP_REPEAT] * (HANGUP_TRIES + 1))
        self.successResultOf(stopping)
        self.assertTrue(self.console.upstream.disconnected)  # aborted
        self.assertTrue(self.console.client.disconnected)

    def test_stop_without_consoles_is_immediate(self) -> None:
        self.successResultOf(ConsoleSessions(Clock()).stopService())
