"""The response parser (llhttp through httptools) fed the way a socket delivers bytes:
any split of a response gives the same head, body, trailers and upgrade rest."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.docker import wire


class Events:
    def __init__(self) -> None:
        self.code = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.received = b""
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.rest: bytes | None = None

    def head(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.code, self.headers, self.keep_alive = code, headers, keep_alive

    def body(self, data: bytes) -> None:
        self.received += data

    def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = trailers

    def upgraded(self, rest: bytes) -> None:
        self.rest = rest


def feed_in_pieces(data: bytes, cuts: list[int], head_only: bool = False) -> tuple[Events, wire.ResponseReader]:
    events = Events()
    reader = wire.ResponseReader(events, head_only=head_only)
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    for start, end in zip(points, points[1:]):
        reader.feed(data[start:end])
    return events, reader


cuts = st.lists(st.integers(0, 10_000), max_size=12)


class SplitTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=300), max_size=6), cuts)
    def test_chunked_body_and_trailers(self, chunks: list[bytes], split: list[int]) -> None:
        data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                + b"".join(wire.chunk(c) for c in chunks) + b"0\r\nX-Sum: 7\r\n\r\n")
        events, reader = feed_in_pieces(data, split)
        self.assertTrue(reader.done)
        self.assertEqual((events.code, events.received, events.trailers), (200, b"".join(chunks), [(b"X-Sum", b"7")]))
        self.assertTrue(events.keep_alive)

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=2000), cuts)
    def test_length_delimited_body(self, body: bytes, split: list[int]) -> None:
        data = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        events, reader = feed_in_pieces(data, split)
        self.assertTrue(reader.done)
        self.assertEqual((events.code, events.received), (404, body))

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=500), cuts)
    def test_upgrade_rest_is_every_byte_after_the_head(self, rest: bytes, split: list[int]) -> None:
        data = b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n" + rest
        events = Events()
        reader = wire.ResponseReader(events)
        points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in split)})
        after = b""
        for start, end in zip(points, points[1:]):
            if reader.done:
                after += data[start:end]  # the connection's later bytes go to the splice
            else:
                reader.feed(data[start:end])
        self.assertTrue(reader.upgrade)
        self.assertEqual((events.rest or b"") + after, rest)

    def test_close_delimited_body_ends_at_eof(self) -> None:
        events, reader = feed_in_pieces(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nabc", [20, 40])
        self.assertFalse(reader.done)
        self.assertFalse(events.keep_alive)
        self.assertTrue(reader.eof())
        self.assertEqual((events.received, events.trailers), (b"abc", []))

    def test_cut_length_delimited_body_is_not_a_proper_end(self) -> None:
        _, reader = feed_in_pieces(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", [])
        self.assertFalse(reader.eof())

    def test_head_answer_ends_with_its_head(self) -> None:
        events, reader = feed_in_pieces(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", [], head_only=True)
        self.assertTrue(reader.done)
        self.assertEqual(events.trailers, [])

    def test_next_response_on_the_same_parser(self) -> None:
        first = Events()
        reader = wire.ResponseReader(first)
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
        second = Events()
        reader.reset(second)
        reader.feed(b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew")
        self.assertEqual((first.received, second.code, second.received), (b"OK", 201, b"new"))

    def test_request_head(self) -> None:
        head = wire.request_head(b"PUT", b"/v1.41/containers/x/archive?path=/", wire.DOCKER_HOST,
                                 [(b"Content-Type", b"application/x-tar")], wire.CHUNKED)
        self.assertEqual(head, b"PUT /v1.41/containers/x/archive?path=/ HTTP/1.1\r\nHost: docker\r\n"
                               b"Content-Type: application/x-tar\r\nTransfer-Encoding: chunked\r\n\r\n")
