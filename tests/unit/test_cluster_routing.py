"""Cluster routing decisions (pure): target node, manager operations, aggregation, loop guard."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.cluster.member import Member
from portainer_agent.routing import AGGREGATED_PATHS, ClusterSnapshot, RouteKind, route


def member(name: str, role: str = "worker", leader: bool = False, addr: str | None = None) -> Member:
    address = addr or f"10.0.0.{ord(name[-1]) % 200}"
    return Member(node_name=name, node_id=name.upper(), role=role, is_leader=leader, api_addr=address,
                  api_port=9001, cluster_addr=address, cluster_port=9002, version="1.2.1", cert_fingerprint="ab")


MGR1 = member("mgr1", "manager", leader=False)
MGR2 = member("mgr2", "manager", leader=True)
WRK1 = member("wrk1")
WRK2 = member("wrk2")
ALL = (MGR1, MGR2, WRK1, WRK2)


def on(local: Member) -> ClusterSnapshot:
    return ClusterSnapshot(local, ALL)


class StandaloneTests(SynchronousTestCase):
    def test_everything_is_local_and_the_target_is_ignored(self) -> None:
        for method, path in ((b"GET", b"/containers/json"), (b"GET", b"/services"), (b"POST", b"/info"),
                             (b"GET", b"/containers/x/json")):
            decision = route(method, path, target="elsewhere", manager_operation=True)
            self.assertIs(decision.kind, RouteKind.DOCKER, path)

    def test_agent_endpoints_stay_local(self) -> None:
        self.assertIs(route(b"GET", b"/v2/browse/ls", target="x").kind, RouteKind.AGENT)


class TargetRuleTests(SynchronousTestCase):
    def test_no_target_or_own_name_is_local(self) -> None:
        for target in (None, "wrk1"):
            self.assertIs(route(b"GET", b"/containers/abc/json", target=target, cluster=on(WRK1)).kind,
                          RouteKind.DOCKER)

    def test_other_node_is_forwarded_to_that_member(self) -> None:
        decision = route(b"GET", b"/containers/abc/json", target="wrk2", cluster=on(WRK1))
        self.assertIs(decision.kind, RouteKind.FORWARD)
        self.assertEqual(decision.members, (WRK2,))
        self.assertFalse(decision.upgrade)

    def test_hijack_follows_the_target_rule(self) -> None:
        local = route(b"POST", b"/exec/abc/start", upgrade=True, cluster=on(WRK1))
        self.assertIs(local.kind, RouteKind.HIJACK)
        remote = route(b"POST", b"/exec/abc/start", upgrade=True, target="mgr1", cluster=on(WRK1))
        self.assertIs(remote.kind, RouteKind.FORWARD)
        self.assertTrue(remote.upgrade)
        self.assertEqual(remote.members, (MGR1,))

    def test_unknown_target_is_the_originals_500(self) -> None:
        decision = route(b"GET", b"/containers/abc/json", target="nope", cluster=on(WRK1))
        self.assertIs(decision.kind, RouteKind.REFUSED)
        assert decision.error is not None
        self.assertEqual(decision.error.status, 500)
        self.assertEqual(decision.error.message, "The agent was unable to contact any other agent")
        self.assertIn("nope", decision.error.details)

    def test_one_node_agent_endpoints_follow_the_target(self) -> None:
        for path in (b"/browse/ls", b"/v2/browse/get", b"/v1/browse/vol/ls", b"/host/info", b"/v2/host/info",
                     b"/websocket/exec", b"/v1/websocket/attach"):
            local = route(b"GET", path, cluster=on(WRK1))
            self.assertIs(local.kind, RouteKind.AGENT, path)
            remote = route(b"GET", path, target="wrk2", cluster=on(WRK1))
            self.assertIs(remote.kind, RouteKind.FORWARD, path)
            self.assertEqual(remote.members, (WRK2,))

    def test_websocket_upgrade_to_another_node_is_spliced(self) -> None:
        decision = route(b"GET", b"/websocket/exec", upgrade=True, target="wrk2", cluster=on(WRK1))
        self.assertEqual((decision.kind, decision.upgrade), (RouteKind.FORWARD, True))

    def test_agents_and_ping_are_always_local(self) -> None:
        self.assertIs(route(b"GET", b"/v2/agents", target="wrk2", cluster=on(WRK1)).kind, RouteKind.AGENT)
        self.assertIs(route(b"GET", b"/ping", target="wrk2", cluster=on(WRK1)).kind, RouteKind.PING)


class ManagerRuleTests(SynchronousTestCase):
    def test_manager_paths_on_a_worker_go_to_managers_leader_first(self) -> None:
        for path in (b"/services", b"/services/create", b"/tasks", b"/secrets/x", b"/configs", b"/swarm",
                     b"/nodes", b"/nodes/abc", b"/info"):
            decision = route(b"GET", path, cluster=on(WRK1))
            self.assertIs(decision.kind, RouteKind.MANAGER, path)
            self.assertEqual(decision.members, (MGR2, MGR1), path)

    def test_whole_segments_only(self) -> None:
        for path in (b"/infoX", b"/nodesfoo", b"/servicesx/y", b"/swarmy"):
            self.assertIs(route(b"GET", path, cluster=on(WRK1)).kind, RouteKind.DOCKER, path)

    def test_a_manager_serves_manager_operations_itself(self) -> None:
        self.assertIs(route(b"GET", b"/nodes", cluster=on(MGR1)).kind, RouteKind.DOCKER)
        self.assertIs(route(b"GET", b"/nodes", target="wrk2", cluster=on(MGR1)).kind, RouteKind.DOCKER)

    def test_the_header_makes_any_path_a_manager_operation(self) -> None:
        decision = route(b"POST", b"/containers/create", manager_operation=True, cluster=on(WRK1))
        self.assertIs(decision.kind, RouteKind.MANAGER)
        self.assertIs(route(b"GET", b"/containers/json", manager_operation=True, cluster=on(WRK1)).kind,
                      RouteKind.MANAGER)

    def test_the_local_manager_is_not_a_candidate(self) -> None:
        snapshot = ClusterSnapshot(WRK1, (WRK1, WRK2))
        decision = route(b"GET", b"/services", cluster=snapshot)
        self.assertIs(decision.kind, RouteKind.REFUSED)
        assert decision.error is not None
        self.assertEqual(decision.error.details, "Unable to find an agent on any manager node")


class AggregateRuleTests(SynchronousTestCase):
    def test_lists_fan_out_to_every_node(self) -> None:
        for path in sorted(AGGREGATED_PATHS):
            decision = route(b"GET", path, cluster=on(WRK1))
            self.assertIs(decision.kind, RouteKind.AGGREGATE, path)
            self.assertEqual(decision.members, ALL)

    def test_a_target_picks_that_nodes_list(self) -> None:
        self.assertIs(route(b"GET", b"/volumes", target="wrk1", cluster=on(WRK1)).kind, RouteKind.DOCKER)
        decision = route(b"GET", b"/images/json", target="mgr1", cluster=on(WRK1))
        self.assertEqual((decision.kind, decision.members), (RouteKind.FORWARD, (MGR1,)))

    def test_other_methods_and_lookalikes_are_node_operations(self) -> None:
        self.assertIs(route(b"POST", b"/volumes", cluster=on(WRK1)).kind, RouteKind.DOCKER)
        self.assertIs(route(b"GET", b"/volumes/data", cluster=on(WRK1)).kind, RouteKind.DOCKER)
        self.assertIs(route(b"GET", b"/v2/containers/json", cluster=on(WRK1)).kind, RouteKind.DOCKER)


class LoopGuardTests(SynchronousTestCase):
    def test_a_forwarded_request_for_this_node_is_served_here(self) -> None:
        for path in (b"/containers/json", b"/services", b"/containers/x/logs"):
            decision = route(b"GET", path, target="mgr1", forwarded_by="wrk1", cluster=on(MGR1))
            self.assertIs(decision.kind, RouteKind.DOCKER, path)
        # even a manager operation on a node that was demoted meanwhile: Docker answers
        self.assertIs(route(b"GET", b"/services", target="wrk2", forwarded_by="wrk1",
                            cluster=on(WRK2)).kind, RouteKind.DOCKER)

    def test_a_forwarded_request_for_another_node_is_refused(self) -> None:
        decision = route(b"GET", b"/containers/x/json", target="wrk2", forwarded_by="wrk1", cluster=on(MGR1))
        self.assertIs(decision.kind, RouteKind.REFUSED)
        assert decision.error is not None
        self.assertEqual(decision.error.status, 508)

    @settings(max_examples=300, deadline=None)
    @given(
        method=st.sampled_from([b"GET", b"POST", b"DELETE", b"HEAD"]),
        path=st.sampled_from([b"/containers/json", b"/volumes", b"/services", b"/info", b"/exec/a/start",
                              b"/browse/ls", b"/v2/host/info", b"/websocket/exec", b"/networks"]),
        upgrade=st.booleans(), manager=st.booleans(),
        target=st.sampled_from([None, "mgr1", "mgr2", "wrk1", "wrk2", "ghost"]),
        local=st.sampled_from(ALL),
    )
    def test_a_forwarded_request_never_leaves_again(self, method: bytes, path: bytes, upgrade: bool, manager: bool,
                                                    target: str | None, local: Member) -> None:
        decision = route(method, path, upgrade, target=target, manager_operation=manager, forwarded_by="x",
                         cluster=on(local))
        self.assertNotIn(decision.kind, (RouteKind.FORWARD, RouteKind.MANAGER, RouteKind.AGGREGATE))
