#!/usr/bin/env python
"""httptools (llhttp) vs h11: one whole Docker-like response, parser set-up included.

    python bench/parsers.py        (needs h11 installed: pip install h11)

The reason ``portainer_agent/docker/wire.py`` uses httptools; figures in bench/README.md.
"""
from __future__ import annotations

import timeit

import httptools

HEAD = (b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\nDocker-Experimental: false\r\n"
        b"Ostype: linux\r\nServer: Docker/20.10.24 (linux)\r\nDate: Wed, 25 Nov 2026 18:00:00 GMT\r\n")
BODY = b"x" * 20000
CASES = {
    "/_ping": HEAD + b"Content-Length: 2\r\n\r\nOK",
    "20 kB, length": HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY,
    "20 kB, 5 chunks": HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    + b"".join(b"%x\r\n%s\r\n" % (4000, BODY[:4000]) for _ in range(5)) + b"0\r\n\r\n",
}


class Sink:
    __slots__ = ("headers", "body", "done")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.done = True


def with_httptools(data: bytes) -> None:
    sink = Sink()
    httptools.HttpResponseParser(sink).feed_data(data)
    assert sink.done


def with_h11(data: bytes) -> None:
    import h11

    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "docker")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(data)
    while True:
        event = connection.next_event()
        if isinstance(event, h11.EndOfMessage) or event is h11.NEED_DATA:
            break


def main() -> None:
    for name, data in CASES.items():
        for parse in (with_httptools, with_h11):
            try:
                runs = min(timeit.repeat(lambda: parse(data), number=5000, repeat=3)) / 5000
            except ImportError:
                print(f"{name:16s} {parse.__name__}: not installed")
                continue
            print(f"{name:16s} {parse.__name__}: {runs * 1e6:6.1f} µs")


if __name__ == "__main__":
    main()
