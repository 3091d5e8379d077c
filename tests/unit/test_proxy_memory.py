"""The agent root, the Docker proxy and the response relay, end to end in memory.

Client (``StubTreq`` or raw bytes) -> ``AgentRoot`` -> ``DockerProxy`` ->
``RequestTraversalAgent`` -> fake Docker resource.
"""
from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import fail
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent import AGENT_API_VERSION, AGENT_PLATFORM, __version__
from portainer_agent.errors import AgentError

from .memory import SOCKET, FakeDocker, Memory, RecordingHandler, raw_request

AGENT = {
    b"portainer-agent": __version__.encode(),
    b"portainer-agent-api-version": AGENT_API_VERSION.encode(),
    b"portainer-agent-platform": AGENT_PLATFORM.encode(),
}


class MemoryTestCase(SynchronousTestCase):
    def memory(self, **kwargs: Any) -> Memory:
        memory = Memory(**kwargs)
        self.addCleanup(memory.stop)
        return memory

    def fetch(self, memory: Memory, method: str, url: str, **kwargs: Any) -> tuple[Any, bytes]:
        d = memory.client.request(method, url, **kwargs)
        memory.pump()
        response = self.successResultOf(d)
        body = memory.client.content(response)
        memory.pump()
        return response, self.successResultOf(body)

    def assertAgentHeadersOnce(self, headers: Any) -> None:
        for name, value in AGENT.items():
            self.assertEqual(headers.getRawHeaders(name), [value], name)

    def assertAgentHeadersOnceOnWire(self, wire: Any) -> None:
        for name, value in AGENT.items():
            self.assertEqual(wire.values(name), [value], name)


class AgentHeaderTests(MemoryTestCase):
    def test_proxied_response(self) -> None:
        response, _ = self.fetch(self.memory(), "GET", "http://agent/containers/json")
        self.assertEqual(response.code, 200)
        self.assertAgentHeadersOnce(response.headers)

    def test_upstream_agent_headers_are_not_duplicated(self) -> None:
        def answer(request: Request) -> bytes:
            request.setHeader(b"Portainer-Agent", b"9.9.9")
            request.setHeader(b"Portainer-Agent-Api-Version", b"9")
            request.setHeader(b"Portainer-Agent-Platform", b"9")
            return b"{}"

        memory = self.memory(docker=FakeDocker(answer))
        response, _ = self.fetch(memory, "GET", "http://agent/info")
        self.assertAgentHeadersOnce(response.headers)
        self.assertAgentHeadersOnceOnWire(memory.raw(raw_request(b"GET", b"/info")))

    def test_public_ping(self) -> None:
        memory = self.memory()
        for url in ("http://agent/ping", "http://agent/v2/ping"):
            response, body = self.fetch(memory, "GET", url)
            self.assertEqual((response.code, body), (204, b""))
            self.assertAgentHeadersOnce(response.headers)
        self.assertEqual(memory.docker.seen, [])

    def test_ping_204_has_no_content_length(self) -> None:
        # RFC 9110 §8.6: a server MUST NOT send Content-Length in a 204.
        wire = self.memory().raw(raw_request(b"GET", b"/ping"))
        self.assertTrue(wire.status().startswith(b"HTTP/1.1 204"), wire.data)
        self.assertEqual(wire.values(b"content-length"), [])
        self.assertEqual(wire.values(b"transfer-encoding"), [])
        self.assertAgentHeadersOnceOnWire(wire)

    def test_agent_endpoint(self) -> None:
        endpoint = RecordingHandler(b'{"agents":[]}')
        memory = self.memory(endpoints={b"/agents": endpoint})
        for url in ("http://agent/agents", "http://agent/v2/agents", "http://agent/v1/agents/"):
            response, body = self.fetch(memory, "GET", url)
            self.assertEqual((response.code, body), (200, b'{"agents":[]}'), url)
            self.assertAgentHeadersOnce(response.headers)
        self.assertEqual(len(endpoint.requests), 3)
        self.assertEqual(memory.docker.seen, [])

    def test_unknown_agent_endpoint_is_a_404_json(self) -> None:
        memory = self.memory()
        response, body = self.fetch(memory, "GET", "http://agent/v2/host/nothing")
        self.assertEqual(response.code, 404)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(body)["message"], "page not found")
        self.assertIn("/host/nothing", json.loads(body)["details"])
        self.assertAgentHeadersOnce(response.headers)
        self.assertEqual(memory.docker.seen, [])

    def test_guard_refusal(self) -> None:
        class Refuse:
            calls: list[bytes] = []

            def check(self, request: Request) -> None:
                self.calls.append(request.path)
                raise AgentError(403, "Unauthorized", "bad signature")

        guard = Refuse()
        memory = self.memory(guard=guard)
        for url in ("http://agent/containers/json", "http://agent/v2/agents"):
            response, body = self.fetch(memory, "GET", url)
            self.assertEqual(response.code, 403, url)
            self.assertEqual(json.loads(body), {"message": "Unauthorized", "details": "bad signature"})
            self.assertAgentHeadersOnce(response.headers)
        # The public ping skips the guard; nothing refused reaches Docker.
        response, _ = self.fetch(memory, "GET", "http://agent/ping")
        self.assertEqual(response.code, 204)
        self.assertEqual(guard.calls, [b"/containers/json", b"/v2/agents"])
        self.assertEqual(memory.docker.seen, [])

    def test_only_the_public_pings_skip_the_guard(self) -> None:
        class Refuse:
            def check(self, request: Request) -> None:
                raise AgentError(403, "Unauthorized", "bad signature")

        memory = self.memory(guard=Refuse())
        for method, url in (("GET", "http://agent/v1/ping"), ("POST", "http://agent/ping"),
                            ("GET", "http://agent/_ping"), ("GET", "http://agent/v2/ping/x")):
            response, _ = self.fetch(memory, method, url)
            self.assertEqual(response.code, 403, (method, url))
        for method, url in (("GET", "http://agent/ping"), ("HEAD", "http://agent/v2/ping")):
            response, _ = self.fetch(memory, method, url)
            self.assertEqual(response.code, 204, (method, url))
        self.assertEqual(memory.docker.seen, [])

    def test_upstream_error_status_is_relayed_with_agent_headers(self) -> None:
        def answer(request: Request) -> bytes:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return b'{"message":"No such container: x"}\n'

        response, body = self.fetch(self.memory(docker=FakeDocker(answer)), "GET", "http://agent/containers/x/json")
        self.assertEqual((response.code, body), (404, b'{"message":"No such container: x"}\n'))
        self.assertAgentHeadersOnce(response.headers)


class FailingAgent:
    """An IAgent whose connection always fails (Docker socket missing)."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        self.calls = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        self.calls += 1
        return fail(self.failure)


class UpstreamFailureTests(MemoryTestCase):
    def test_connect_error_is_a_502_naming_the_socket(self) -> None:
        upstream = FailingAgent(Failure(ConnectError(string="No such file or directory")))
        memory = self.memory(upstream=upstream)
        response, body = self.fetch(memory, "GET", "http://agent/containers/json")
        self.assertEqual(response.code, 502)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        error = json.loads(body)
        self.assertIn(SOCKET, error["message"])
        self.assertIn("No such file or directory", error["details"])
        self.assertAgentHeadersOnce(response.headers)
        self.assertEqual(upstream.calls, 1)

    def test_response_never_received_names_the_inner_reasons(self) -> None:
        upstream = FailingAgent(Failure(ResponseNeverReceived([Failure(ConnectionLost("docker went away"))])))
        response, body = self.fetch(self.memory(upstream=upstream), "POST", "http://agent/containers/create", data=b"{}")
        self.assertEqual(response.code, 502)
        self.assertIn("docker went away", json.loads(body)["details"])


class RequestForwardingTests(MemoryTestCase):
    def test_hop_by_hop_request_headers_are_not_forwarded(self) -> None:
        memory = self.memory()
        self.fetch(memory, "GET", "http://agent/containers/json", headers={
            b"Connection": [b"keep-alive, X-Drop-Me"],
            b"Keep-Alive": [b"timeout=5"],
            b"TE": [b"trailers"],
            b"Trailer": [b"X-Checksum"],
            b"Proxy-Authorization": [b"Basic c2VjcmV0"],
            b"Proxy-Connection": [b"keep-alive"],
            b"Upgrade": [b"tcp"],  # without "Connection: upgrade": not a hijack, and not forwarded
            b"X-Drop-Me": [b"1"],
        })
        [seen] = memory.docker.seen
        for name in (b"keep-alive", b"te", b"trailer", b"proxy-authorization", b"proxy-connection", b"upgrade",
                     b"x-drop-me"):
            self.assertIsNone(seen.header(name), name)
        self.assertNotIn(b"X-Drop-Me", b",".join(seen.header(b"connection") or []))
        self.assertEqual(seen.header(b"host"), [b"docker"])
        self.assertEqual(memory.hijack.requests, [])

    def test_end_to_end_headers_are_forwarded(self) -> None:
        memory = self.memory()
        sent = {
            b"X-PortainerAgent-Target": [b"node-2"],
            b"X-PortainerAgent-PublicKey": [b"3059301306"],
            b"X-PortainerAgent-Signature": [b"c2lnbmF0dXJl"],
            b"X-Registry-Auth": [b"eyJ1c2VybmFtZSI6ImEifQ=="],
            b"User-Agent": [b"Docker-Client/28.2.2 (linux)"],
            b"Accept": [b"application/json", b"text/plain"],
            b"Content-Type": [b"application/json"],
        }
        self.fetch(memory, "POST", "http://agent/v1.41/containers/create?name=web", headers=sent, data=b"{}")
        [seen] = memory.docker.seen
        for name, values in sent.items():
            self.assertEqual(seen.header(name), values, name)

    def test_query_string_and_version_prefix_reach_docker_unchanged(self) -> None:
        memory = self.memory()
        for target in (b"/v1.41/containers/json?all=1&filters=%7B%22status%22%3A%5B%22running%22%5D%7D",
                       b"/containers/json?all=true&limit=5",
                       b"/v1.24/images/ubuntu%3Alatest/json",
                       b"/v2/containers/json?size=1",
                       b"/v1.41/volumes?filters=%7B%7D&x=a+b&x=c"):
            self.fetch(memory, "GET", "http://agent" + target.decode())
            self.assertEqual(memory.docker.seen[-1].uri, target)

    def test_small_post_body_is_forwarded_with_its_length(self) -> None:
        memory = self.memory()
        body = json.dumps({"Image": "busybox", "Cmd": ["true"]}).encode()
        response, _ = self.fetch(memory, "POST", "http://agent/v1.41/containers/create", data=body,
                                 headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 200)
        [seen] = memory.docker.seen
        self.assertEqual((seen.method, seen.body), (b"POST", body))
        self.assertEqual(seen.header(b"content-length"), [b"%d" % len(body)])

    def test_large_post_body_is_forwarded_intact(self) -> None:
        memory = self.memory()
        body = bytes(range(256)) * 1000  # 256 kB: spooled to a temporary file by twisted.web
        self.fetch(memory, "PUT", "http://agent/containers/abc/archive?path=/tmp", data=body,
                   headers={b"Content-Type": [b"application/x-tar"]})
        [seen] = memory.docker.seen
        self.assertEqual(len(seen.body), len(body))
        self.assertEqual(seen.body, body)
        self.assertEqual(seen.header(b"content-length"), [b"%d" % len(body)])

    def test_expect_and_client_host_are_not_forwarded(self) -> None:
        memory = self.memory()
        memory.raw(raw_request(b"POST", b"/build", [(b"Expect", b"100-continue")], b"tar"))
        [seen] = memory.docker.seen
        self.assertIsNone(seen.header(b"expect"))
        self.assertEqual(seen.header(b"host"), [b"docker"])
        self.assertEqual((seen.body, seen.header(b"content-length")), (b"tar", [b"3"]))

    def test_chunked_upload_streams_to_docker_chunked(self) -> None:
        # ``docker build`` streams its context chunked; the agent starts the Docker
        # request when the headers are in and passes the body on chunked as it arrives.
        memory = self.memory()
        chunks = [b"a" * 70_000, b"b" * 50_000, b"c"]
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
        request = (b"POST /v1.41/build?t=x HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\n"
                   b"Content-Type: application/x-tar\r\n\r\n" + body)
        wire = memory.raw(request)
        self.assertTrue(wire.status().startswith(b"HTTP/1.1 200"), wire.data)
        [seen] = memory.docker.seen
        self.assertEqual(seen.body, b"".join(chunks))
        self.assertEqual(seen.header(b"transfer-encoding"), [b"chunked"])
        self.assertIsNone(seen.header(b"content-length"))

    def test_small_chunked_upload_reaches_docker_with_a_length(self) -> None:
        # Below the streaming threshold with a known length, the body is read whole
        # and sent with its length in the same write as the head.
        memory = self.memory()
        body = b"x" * 1000
        memory.raw(raw_request(b"POST", b"/build", [(b"Content-Type", b"application/x-tar")], body))
        [seen] = memory.docker.seen
        self.assertEqual((seen.body, seen.header(b"content-length")), (body, [b"1000"]))
        self.assertIsNone(seen.header(b"transfer-encoding"))

    def test_upgrade_request_goes_to_the_hijack_handler(self) -> None:
        memory = self.memory()
        response, body = self.fetch(memory, "POST", "http://agent/v1.41/containers/abc/attach?stream=1",
                                    headers={b"Connection": [b"Upgrade"], b"Upgrade": [b"tcp"]}, data=b"")
        self.assertEqual(body, b"hijacked")
        self.assertEqual(len(memory.hijack.requests), 1)
        self.assertEqual(memory.docker.seen, [])


class ResponseRelayTests(MemoryTestCase):
    def test_status_headers_and_body_are_relayed(self) -> None:
        def answer(request: Request) -> bytes:
            request.setResponseCode(201, b"Created")
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"api-version", b"1.41")
            request.responseHeaders.setRawHeaders(b"x-multi", [b"a", b"b"])
            return b'{"Id":"4f1c","Warnings":[]}'

        response, body = self.fetch(self.memory(docker=FakeDocker(answer)), "POST",
                                    "http://agent/containers/create", data=b"{}")
        self.assertEqual((response.code, response.phrase, body), (201, b"Created", b'{"Id":"4f1c","Warnings":[]}'))
        self.assertEqual(response.headers.getRawHeaders(b"api-version"), [b"1.41"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(response.headers.getRawHeaders(b"x-multi"), [b"a", b"b"])

    def test_content_length_is_preserved(self) -> None:
        memory = self.memory()
        response, body = self.fetch(memory, "GET", "http://agent/containers/json")
        self.assertEqual(response.length, len(body))
        wire = memory.raw(raw_request(b"GET", b"/containers/json"))
        self.assertEqual(wire.values(b"content-length"), [b"%d" % len(b'[{"Id":"abc"}]')])
        self.assertEqual(wire.values(b"transfer-encoding"), [])
        self.assertEqual(wire.body(), b'[{"Id":"abc"}]')

    def test_head_keeps_the_length_and_sends_no_body(self) -> None:
        memory = self.memory()
        response, body = self.fetch(memory, "HEAD", "http://agent/images/busybox/json")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(memory.docker.seen[-1].method, b"HEAD")
        wire = memory.raw(raw_request(b"HEAD", b"/images/busybox/json"))
        self.assertEqual(wire.values(b"content-length"), [b"%d" % len(b'[{"Id":"abc"}]')])
        self.assertEqual(wire.body(), b"")
        self.assertAgentHeadersOnceOnWire(wire)

    def test_docker_ping_headers_reach_the_cli(self) -> None:
        # The CLI negotiates its API version from ``HEAD /_ping`` (GET as fallback).
        def answer(request: Request) -> bytes:
            request.setHeader(b"api-version", b"1.41")
            request.setHeader(b"ostype", b"linux")
            request.setHeader(b"docker-experimental", b"false")
            request.setHeader(b"server", b"Docker/20.10.24 (linux)")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"OK"

        memory = self.memory(docker=FakeDocker(answer))
        for method in (b"HEAD", b"GET"):
            wire = memory.raw(raw_request(method, b"/_ping"))
            self.assertTrue(wire.status().startswith(b"HTTP/1.1 200"), wire.data)
            self.assertEqual(wire.values(b"api-version"), [b"1.41"])
            self.assertEqual(wire.values(b"ostype"), [b"linux"])
            self.assertEqual(wire.values(b"docker-experimental"), [b"false"])
            self.assertEqual(wire.values(b"server"), [b"Docker/20.10.24 (linux)"])
            self.assertEqual(len(wire.values(b"date")), 1)
            self.assertEqual(wire.values(b"content-length"), [b"2"])
            self.assertEqual(wire.body(), b"" if method == b"HEAD" else b"OK")
            self.assertAgentHeadersOnceOnWire(wire)

    def test_head_ping_is_public_and_empty(self) -> None:
        memory = self.memory()
        response, body = self.fetch(memory, "HEAD", "http://agent/ping")
        self.assertEqual((response.code, body), (204, b""))
        self.assertEqual(memory.docker.seen, [])

    def test_204_has_no_body(self) -> None:
        def answer(request: Request) -> bytes:
            if request.method == b"DELETE":
                request.setResponseCode(204)
                return b""
            return b"OK"

        memory = self.memory(docker=FakeDocker(answer))
        response, body = self.fetch(memory, "DELETE", "http://agent/containers/abc?force=1")
        self.assertEqual((response.code, body), (204, b""))
        self.assertAgentHeadersOnce(response.headers)
        wire = memory.raw(raw_request(b"DELETE", b"/containers/abc") + raw_request(b"GET", b"/_ping"))
        self.assertTrue(wire.data.startswith(b"HTTP/1.1 204 "), wire.data)
        self.assertEqual(wire.values(b"content-length"), [])
        self.assertEqual(wire.values(b"transfer-encoding"), [])
        # The 204 ends at its blank line: the next response on the connection follows at once.
        self.assertTrue(wire.body().startswith(b"HTTP/1.1 200 OK\r\n"), wire.data)
        self.assertTrue(wire.body().endswith(b"\r\n\r\nOK"), wire.data)

    def test_answer_before_the_body_is_read_leaves_no_error(self) -> None:
        # Go clients send ``Content-Length: 0`` on POSTs without a body (start, stop,
        # kill...). Docker may answer before the body producer has run; the finished
        # client request then closes its content file, and the producer must not read it.
        def answer(request: Request) -> bytes:
            request.setResponseCode(204)
            return b""

        memory = self.memory(docker=FakeDocker(answer))
        response, body = self.fetch(memory, "POST", "http://agent/v1.41/containers/abc/start", data=b"")
        self.assertEqual((response.code, body), (204, b""))
        self.assertEqual(memory.docker.seen[0].header(b"content-length"), [b"0"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unknown_length_is_streamed_chunked(self) -> None:
        def answer(request: Request) -> Any:
            request.write(b"part one,")
            request.write(b"part two")
            request.finish()
            return NOT_DONE_YET

        memory = self.memory(docker=FakeDocker(answer))
        response, body = self.fetch(memory, "GET", "http://agent/containers/abc/export")
        self.assertEqual(body, b"part one,part two")
        self.assertIs(response.length, UNKNOWN_LENGTH)


class StreamingTests(MemoryTestCase):
    def streaming_docker(self) -> FakeDocker:
        def answer(request: Request) -> Any:
            request.setHeader(b"content-type", b"application/json")
            request.write(b"")  # dockerd sends the headers at once (/events, /containers/{id}/wait)
            return NOT_DONE_YET

        return FakeDocker(answer)

    def test_headers_arrive_before_the_body_ends(self) -> None:
        docker = self.streaming_docker()
        memory = self.memory(docker=docker)
        d = memory.client.get("http://agent/v1.41/events?since=0", unbuffered=True)
        memory.pump()
        # Headers are through while Docker has not sent a single body byte.
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertAgentHeadersOnce(response.headers)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])

        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        memory.pump()
        self.assertEqual(chunks, [])
        [upstream] = docker.pending
        upstream.write(b'{"status":"start"}\n')
        memory.pump()
        self.assertEqual(b"".join(chunks), b'{"status":"start"}\n')
        self.assertNoResult(done)
        upstream.write(b'{"status":"die"}\n')
        memory.pump()
        self.assertEqual(b"".join(chunks), b'{"status":"start"}\n{"status":"die"}\n')
        self.assertNoResult(done)
        upstream.finish()
        memory.pump()
        self.successResultOf(done)

    def test_wait_headers_are_flushed_before_the_exit(self) -> None:
        # `docker run` waits for these headers before it sends /start.
        docker = self.streaming_docker()
        memory = self.memory(docker=docker)
        wire = memory.raw(raw_request(b"POST", b"/v1.41/containers/abc/wait?condition=next-exit"))
        self.assertTrue(wire.status().startswith(b"HTTP/1.1 200"), wire.data)
        self.assertEqual(wire.body(), b"")
        docker.pending[0].write(b'{"StatusCode":0}\n')
        docker.pending[0].finish()
        memory.pump()
        self.assertIn(b'{"StatusCode":0}\n', wire.body())



class InvalidURITests(MemoryTestCase):
    """The Docker client refuses control characters that twisted.web's server lets
    through: the client gets a 400 JSON error, not a 500 page and a traceback."""

    def test_control_character_in_the_uri_is_a_400_json_error(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from portainer_agent.docker.client import DockerClient

        reactor = MemoryReactorClock()
        upstream = DockerClient.for_socket(reactor, "/nonexistent/docker.sock")
        wire = self.memory(upstream=upstream).raw(raw_request(b"GET", b"/containers/json?x=\x7f"))
        self.assertEqual(wire.status(), b"HTTP/1.1 400 Bad Request")
        self.assertEqual(json.loads(wire.body())["message"], "Invalid request URL or method")
        self.assertEqual(wire.values(b"portainer-agent"), [__version__.encode()])
        self.assertEqual(reactor.unixClients, [])  # refused before any connection
        self.assertEqual(self.flushLoggedErrors(), [])
