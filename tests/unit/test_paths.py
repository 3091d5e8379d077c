"""Pure path and header rules: the Docker version prefix and hop-by-hop filtering."""
from __future__ import annotations

import re

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.toolbox.paths import (
    AGENT_RESPONSE_HEADERS,
    HOP_BY_HOP,
    RECOMPUTED_REQUEST,
    connection_tokens,
    forwardable_request_headers,
    forwardable_response_headers,
    is_upgrade_request,
    split_version_prefix,
)

VERSION = re.compile(rb"\A\d+\.\d+\Z")

#: Bytes a request path can hold once twisted.web has split the request line
#: (no space, CR or LF).
PATH_BYTES = st.binary(max_size=40).map(lambda b: b.replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b""))
VERSIONED_PATHS = st.builds(
    lambda major, minor, rest: b"/v%d.%d" % (major, minor) + rest,
    st.integers(0, 200), st.integers(0, 200), PATH_BYTES,
)


class SplitVersionPrefixTests(SynchronousTestCase):
    def test_docker_version_is_split_off(self) -> None:
        self.assertEqual(split_version_prefix(b"/v1.41/containers/json"), (b"1.41", b"/containers/json"))

    def test_bare_version_becomes_root(self) -> None:
        self.assertEqual(split_version_prefix(b"/v1.41"), (b"1.41", b"/"))
        self.assertEqual(split_version_prefix(b"/v1.41/"), (b"1.41", b"/"))

    def test_agent_api_versions_are_not_docker_versions(self) -> None:
        for path in (b"/v2/agents", b"/v1/browse/ls", b"/v2", b"/v1.41x/info", b"/v1./info", b"/v.41/info"):
            self.assertEqual(split_version_prefix(path), (None, path), path)

    def test_only_a_leading_segment_is_a_prefix(self) -> None:
        for path in (b"/volumes/v1.5data", b"/containers/v1.41/json", b"v1.41/info", b"//v1.41/info", b""):
            self.assertEqual(split_version_prefix(path), (None, path), path)

    def test_only_the_first_version_is_stripped(self) -> None:
        self.assertEqual(split_version_prefix(b"/v1.41/v1.40/info"), (b"1.41", b"/v1.40/info"))

    def test_version_followed_by_newline_is_not_a_prefix(self) -> None:
        # ``$`` also matches before a trailing newline: the "rest" must still be a path.
        self.assertEqual(split_version_prefix(b"/v1.41\n"), (None, b"/v1.41\n"))

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(PATH_BYTES, VERSIONED_PATHS))
    def test_never_raises_and_only_strips_a_leading_version_segment(self, path: bytes) -> None:
        version, rest = split_version_prefix(path)
        if version is None:
            self.assertEqual(rest, path)
            return
        self.assertRegex(version, VERSION)
        self.assertTrue(rest.startswith(b"/"), rest)
        prefix = b"/v" + version
        self.assertTrue(path == prefix + rest or (rest == b"/" and path == prefix), (path, version, rest))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=60))
    def test_never_raises_on_arbitrary_bytes(self, path: bytes) -> None:
        version, rest = split_version_prefix(path)
        if version is None:
            self.assertEqual(rest, path)
        else:
            self.assertTrue(path.startswith(b"/v" + version))


def _mixed_case(name: bytes, flips: list[bool]) -> bytes:
    return bytes(c ^ 0x20 if flip and chr(c).isalpha() else c for c, flip in zip(name, flips + [False] * len(name)))


HEADER_NAMES = st.one_of(
    st.sampled_from(sorted(HOP_BY_HOP | RECOMPUTED_REQUEST | AGENT_RESPONSE_HEADERS)),
    st.sampled_from([b"x-portaineragent-target", b"x-portaineragent-signature", b"content-type",
                     b"x-registry-auth", b"user-agent", b"x-custom", b"accept"]),
    st.from_regex(rb"\A[a-z][a-z0-9-]{0,12}\Z"),
)
CASED_NAMES = st.builds(_mixed_case, HEADER_NAMES, st.lists(st.booleans(), max_size=30))
HEADER_LISTS = st.lists(st.tuples(CASED_NAMES, st.lists(st.binary(max_size=8), min_size=1, max_size=3)), max_size=12)
CONNECTION_VALUES = st.lists(
    st.lists(CASED_NAMES, max_size=4).map(lambda names: b" , ".join(names)), max_size=3
)


class HeaderFilterTests(SynchronousTestCase):
    def test_connection_tokens_are_lowercased_and_trimmed(self) -> None:
        self.assertEqual(connection_tokens([b"Keep-Alive, X-Foo", b" Upgrade ,,"]), {b"keep-alive", b"x-foo", b"upgrade"})

    def test_request_headers_drop_hop_by_hop_recomputed_and_connection_listed(self) -> None:
        headers = [
            (b"Connection", [b"keep-alive, X-Drop-Me"]),
            (b"Keep-Alive", [b"timeout=5"]),
            (b"TE", [b"trailers"]),
            (b"Transfer-Encoding", [b"chunked"]),
            (b"Proxy-Authorization", [b"Basic x"]),
            (b"Content-Length", [b"3"]),
            (b"Expect", [b"100-continue"]),
            (b"Host", [b"agent:9001"]),
            (b"X-Drop-Me", [b"1"]),
            (b"X-PortainerAgent-Target", [b"node-2"]),
            (b"X-Registry-Auth", [b"e30="]),
            (b"Accept", [b"a", b"b"]),
        ]
        kept = forwardable_request_headers(headers, [b"keep-alive, X-Drop-Me"])
        self.assertEqual(kept, [(b"X-PortainerAgent-Target", [b"node-2"]), (b"X-Registry-Auth", [b"e30="]),
                                (b"Accept", [b"a", b"b"])])

    def test_response_headers_drop_agent_headers_and_length(self) -> None:
        headers = [
            (b"Portainer-Agent", [b"9.9.9"]),
            (b"Portainer-Agent-Api-Version", [b"9"]),
            (b"Content-Length", [b"10"]),
            (b"Transfer-Encoding", [b"chunked"]),
            (b"Api-Version", [b"1.41"]),
            (b"Content-Type", [b"application/json"]),
        ]
        self.assertEqual(forwardable_response_headers(headers),
                         [(b"Api-Version", [b"1.41"]), (b"Content-Type", [b"application/json"])])

    def test_upgrade_needs_both_headers(self) -> None:
        self.assertTrue(is_upgrade_request(b"POST", [b"keep-alive, Upgrade"], [b"tcp"]))
        self.assertFalse(is_upgrade_request(b"POST", [b"keep-alive"], [b"tcp"]))
        self.assertFalse(is_upgrade_request(b"POST", [b"Upgrade"], []))

    @settings(max_examples=200, deadline=None)
    @given(HEADER_LISTS, CONNECTION_VALUES)
    def test_forwardable_request_headers_never_contain_hop_by_hop_names(self, headers, connection) -> None:
        kept = forwardable_request_headers(headers, connection)
        drop = HOP_BY_HOP | RECOMPUTED_REQUEST | connection_tokens(connection)
        self.assertFalse([name for name, _ in kept if name.lower() in drop])
        # Everything else survives, in order, values untouched.
        self.assertEqual(kept, [(n, v) for n, v in headers if n.lower() not in drop])

    @settings(max_examples=200, deadline=None)
    @given(HEADER_LISTS, CONNECTION_VALUES)
    def test_forwardable_response_headers_never_contain_hop_by_hop_or_agent_names(self, headers, connection) -> None:
        kept = forwardable_response_headers(headers, connection)
        drop = HOP_BY_HOP | AGENT_RESPONSE_HEADERS | {b"content-length"} | connection_tokens(connection)
        self.assertFalse([name for name, _ in kept if name.lower() in drop])
        self.assertEqual(kept, [(n, v) for n, v in headers if n.lower() not in drop])
