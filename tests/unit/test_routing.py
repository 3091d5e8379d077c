"""The routing decision: ping, agent namespaces, hijack, Docker."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.routing import Route, RouteKind, route


class PingTests(SynchronousTestCase):
    def test_get_and_head_ping_are_public(self) -> None:
        for method in (b"GET", b"HEAD"):
            self.assertEqual(route(method, b"/ping"), Route(RouteKind.PING, b"/ping", None))
            self.assertEqual(route(method, b"/v2/ping"), Route(RouteKind.PING, b"/ping", b"v2"))
            self.assertTrue(route(method, b"/ping").is_public)

    def test_v1_ping_is_not_the_public_ping(self) -> None:
        decision = route(b"GET", b"/v1/ping")
        self.assertEqual(decision, Route(RouteKind.DOCKER, b"/v1/ping"))
        self.assertFalse(decision.is_public)

    def test_other_methods_on_ping_are_not_public(self) -> None:
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS"):
            self.assertEqual(route(method, b"/ping"), Route(RouteKind.DOCKER, b"/ping"), method)
            self.assertEqual(route(method, b"/v2/ping").kind, RouteKind.DOCKER, method)

    def test_ping_lookalikes_are_not_public(self) -> None:
        for path in (b"/ping/", b"/pingx", b"/_ping", b"/v2/ping/x", b"/v3/ping", b"/containers/ping"):
            self.assertFalse(route(b"GET", path).is_public, path)

    def test_only_ping_is_public(self) -> None:
        for path in (b"/agents", b"/v2/agents", b"/host/info", b"/containers/json", b"/_ping"):
            self.assertFalse(route(b"GET", path).is_public, path)


class AgentNamespaceTests(SynchronousTestCase):
    def test_namespaces_under_every_agent_api_prefix(self) -> None:
        for prefix, api in ((b"", None), (b"/v1", b"v1"), (b"/v2", b"v2")):
            for path, endpoint in (
                (b"/agents", b"/agents"),
                (b"/agents/", b"/agents"),
                (b"/host/info", b"/host/info"),
                (b"/browse/ls", b"/browse/ls"),
                (b"/browse/get/", b"/browse/get"),
                (b"/websocket/exec", b"/websocket/exec"),
            ):
                self.assertEqual(route(b"GET", prefix + path), Route(RouteKind.AGENT, endpoint, api), prefix + path)

    def test_namespace_lookalikes_go_to_docker_with_the_original_path(self) -> None:
        for path in (b"/agentsx", b"/host", b"/hosts/x", b"/browse", b"/websocketx/exec", b"/v3/agents",
                     b"/containers/agents", b"/v2agents"):
            self.assertEqual(route(b"GET", path), Route(RouteKind.DOCKER, path), path)

    def test_websocket_upgrade_stays_an_agent_endpoint(self) -> None:
        self.assertEqual(route(b"GET", b"/websocket/attach", upgrade=True),
                         Route(RouteKind.AGENT, b"/websocket/attach", None, upgrade=True))


class DockerAndHijackTests(SynchronousTestCase):
    def test_docker_paths_are_passed_unchanged(self) -> None:
        for path in (b"/containers/json", b"/v2/containers/json", b"/v1/info", b"/", b"/images/ab/json"):
            self.assertEqual(route(b"GET", path), Route(RouteKind.DOCKER, path, None), path)

    def test_upgrade_is_a_hijack_with_the_original_path(self) -> None:
        for path in (b"/containers/abc/attach", b"/exec/abc/start", b"/session", b"/v2/exec/x/start"):
            self.assertEqual(route(b"POST", path, upgrade=True), Route(RouteKind.HIJACK, path, upgrade=True), path)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE"]), st.binary(max_size=30), st.booleans())
    def test_route_is_total_and_non_agent_routes_keep_the_path(self, method: bytes, path: bytes, upgrade: bool) -> None:
        decision = route(method, path, upgrade)
        if decision.kind in (RouteKind.DOCKER, RouteKind.HIJACK):
            self.assertEqual(decision.path, path)
            self.assertEqual(decision.kind is RouteKind.HIJACK, upgrade)
        if decision.kind is RouteKind.PING:
            self.assertIn(method, (b"GET", b"HEAD"))
            self.assertIn(path, (b"/ping", b"/v2/ping"))


class LegacyBrowseTests(SynchronousTestCase):
    def test_volume_in_the_path_under_v1(self) -> None:
        for action in (b"ls", b"get", b"put", b"rename", b"delete"):
            self.assertEqual(route(b"GET", b"/v1/browse/myvol/" + action),
                             Route(RouteKind.AGENT, b"/browse/" + action, b"v1", volume_id=b"myvol"))

    def test_only_v1_and_known_actions(self) -> None:
        self.assertEqual(route(b"GET", b"/v2/browse/myvol/ls").volume_id, None)
        self.assertEqual(route(b"GET", b"/browse/myvol/ls").volume_id, None)
        self.assertEqual(route(b"GET", b"/v1/browse/myvol/cat"), Route(RouteKind.AGENT, b"/browse/myvol/cat", b"v1"))
        self.assertEqual(route(b"GET", b"/v1/browse/ls"), Route(RouteKind.AGENT, b"/browse/ls", b"v1"))
