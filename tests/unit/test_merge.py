"""Merging per-node lists: tagging, order, lossless JSON, volumes and warnings."""
from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.proxy.merge import (
    NodeAnswer,
    NodeFailure,
    docker_error_message,
    merge_answers,
    unreachable_header,
)


class ArrayMergeTests(SynchronousTestCase):
    def test_items_are_concatenated_in_node_name_order_and_tagged(self) -> None:
        body, failures = merge_answers(b"/containers/json", [
            NodeAnswer("node2", b'[{"Id":"c"}]'),
            NodeAnswer("node1", b'[{"Id":"a"},{"Id":"b"}]'),
        ])
        self.assertEqual(failures, [])
        self.assertEqual(json.loads(body), [
            {"Id": "a", "Portainer": {"Agent": {"NodeName": "node1"}}},
            {"Id": "b", "Portainer": {"Agent": {"NodeName": "node1"}}},
            {"Id": "c", "Portainer": {"Agent": {"NodeName": "node2"}}},
        ])

    def test_bytes_of_values_and_key_order_pass_through_untouched(self) -> None:
        raw = (b'[{"Size":123456789012345678901234567890,"Z":1.50,"A":"\\u00e9<&>","Nested":{"b":1,"a":2},'
               b'"Neg":-0.0,"Big":9007199254740993}]')
        body, _ = merge_answers(b"/images/json", [NodeAnswer("n", raw)])
        self.assertEqual(body, raw[:-2] + b',"Portainer":{"Agent":{"NodeName":"n"}}}]\n')
        self.assertEqual(json.loads(body)[0]["Size"], 123456789012345678901234567890)

    def test_an_existing_portainer_object_is_merged_not_replaced(self) -> None:
        raw = b'[{"Id":"a","Portainer":{"ResourceControl":{"Id":7},"Agent":{"Other":true}}}]'
        body, _ = merge_answers(b"/networks", [NodeAnswer("n1", raw)])
        self.assertEqual(json.loads(body)[0]["Portainer"],
                         {"ResourceControl": {"Id": 7}, "Agent": {"Other": True, "NodeName": "n1"}})

    def test_a_node_answering_garbage_becomes_a_failure(self) -> None:
        for bad in (b'{"message":"x"}', b"not json", b"[1, 2]", b'{"Volumes": []}'):
            body, failures = merge_answers(b"/containers/json", [NodeAnswer("ok", b"[]"), NodeAnswer("bad", bad)])
            self.assertEqual(json.loads(body), [])
            self.assertEqual([f.node for f in failures], ["bad"], bad)

    def test_node_names_are_json_escaped(self) -> None:
        body, _ = merge_answers(b"/containers/json", [NodeAnswer('we"ird\\', b'[{}]')])
        self.assertEqual(json.loads(body)[0]["Portainer"]["Agent"]["NodeName"], 'we"ird\\')

    @settings(max_examples=100, deadline=None)
    @given(st.dictionaries(st.sampled_from(["n1", "n2", "n3"]),
                           st.lists(st.dictionaries(st.text(min_size=1, max_size=5).filter(lambda k: k != "Portainer"),
                                                    st.one_of(st.integers(), st.text(), st.booleans(), st.none()),
                                                    max_size=4), max_size=4)))
    def test_merge_equals_the_reference(self, nodes: dict[str, list[dict]]) -> None:
        answers = [NodeAnswer(name, json.dumps(items).encode()) for name, items in nodes.items()]
        body, failures = merge_answers(b"/containers/json", answers)
        expected = [dict(item, Portainer={"Agent": {"NodeName": name}})
                    for name in sorted(nodes) for item in nodes[name]]
        self.assertEqual(failures, [])
        self.assertEqual(json.loads(body), expected)


class VolumeMergeTests(SynchronousTestCase):
    def test_volumes_and_every_warning_are_kept(self) -> None:
        body, failures = merge_answers(b"/volumes", [
            NodeAnswer("n2", b'{"Volumes":[{"Name":"v2"}],"Warnings":["w2"]}'),
            NodeAnswer("n1", b'{"Volumes":null,"Warnings":null}'),
        ], [NodeFailure("n3", "connection refused")])
        value = json.loads(body)
        self.assertEqual(value["Volumes"], [{"Name": "v2", "Portainer": {"Agent": {"NodeName": "n2"}}}])
        self.assertEqual(value["Warnings"][0], "w2")
        self.assertIn("n3", value["Warnings"][1])
        self.assertEqual([f.node for f in failures], ["n3"])

    def test_no_warnings_is_null_as_docker_says(self) -> None:
        body, _ = merge_answers(b"/volumes", [NodeAnswer("n1", b'{"Volumes":[],"Warnings":null}')])
        self.assertEqual(json.loads(body), {"Volumes": [], "Warnings": None})


class HelpersTests(SynchronousTestCase):
    def test_docker_error_message(self) -> None:
        self.assertEqual(docker_error_message(b'{"message":"bad filter"}'), "bad filter")
        self.assertIsNone(docker_error_message(b"[]"))
        self.assertIsNone(docker_error_message(b"<html>"))

    def test_unreachable_header_is_sorted_and_unique(self) -> None:
        self.assertEqual(unreachable_header([NodeFailure("n3", "x"), NodeFailure("n1", "y"), NodeFailure("n3", "z")]),
                         b"n1, n3")
