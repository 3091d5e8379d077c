"""Property tests (Hypothesis) for the pure parts: wire encoding and the merge rule."""
from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.cluster.commands import MEMBER_FIELDS, PAGE_BUDGET, decode_members, paginate
from portainer_agent.cluster.dissemination import Update
from portainer_agent.cluster.member import Member, MemberState, member_from_fields, member_to_fields
from portainer_agent.cluster.simulation import SimNetwork
from portainer_agent.cluster.swim import SwimNode

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)
members = st.builds(
    Member,
    node_name=text,
    node_id=st.text(max_size=30),
    role=st.sampled_from(["manager", "worker", None]),
    is_leader=st.booleans(),
    api_addr=text,
    api_port=st.integers(1, 65535),
    cluster_addr=text,
    cluster_port=st.integers(1, 65535),
    version=st.text(max_size=20),
    cert_fingerprint=st.text("0123456789abcdef", max_size=64),
    incarnation=st.integers(0, 2**40),
    state=st.sampled_from(list(MemberState)),
    boot=st.integers(0, 2**45),
)


class EncodingProperties(SynchronousTestCase):
    @given(members)
    def test_fields_round_trip(self, member: Member) -> None:
        self.assertEqual(member_from_fields(member_to_fields(member)), member)

    @settings(max_examples=30, deadline=None)
    @given(st.lists(members, max_size=400))
    def test_pages_fit_one_amp_value_and_lose_nothing(self, records: list[Member]) -> None:
        codec = amp.AmpList(MEMBER_FIELDS)
        decoded = []
        for page in paginate(records):
            wire = codec.toStringProto(page, None)
            self.assertLessEqual(len(wire), PAGE_BUDGET)
            amp.AmpBox({b"members": wire}).serialize()  # raises TooLong past 65 535
            decoded.extend(decode_members(codec.fromStringProto(wire, None)))
        self.assertEqual(decoded, records)


class MergeProperties(SynchronousTestCase):
    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 3), st.sampled_from(list(MemberState))),
            min_size=1, max_size=12,
        ),
        st.randoms(use_true_random=False),
    )
    def test_order_does_not_matter_once_a_member_is_known(
        self, changes: list[tuple[int, int, int, MemberState]], rng: random.Random
    ) -> None:
        """Gossip arrives in any order; once a node knows a member, it ends with the record of
        highest (generation, incarnation, state) whatever the order."""
        factory = SimNetwork()
        records = [
            factory.make_member(1 + index, boot=boot, incarnation=incarnation, state=state)
            for index, boot, incarnation, state in changes
        ]
        finals = []
        for _ in range(3):
            shuffled = records[:]
            rng.shuffle(shuffled)
            node = SwimNode(factory.make_member(0), factory.clock, None, rng=random.Random(0))  # type: ignore[arg-type]
            # The first sighting of each member is a live record (how a node learns of one).
            known = {r.key: r.with_state(MemberState.ALIVE, 0) for r in records}
            for record in known.values():
                node.apply_updates([Update(attrs_evolve_boot(record, -1), "x")])
            for record in shuffled:
                node.apply_updates([Update(record, "x")])
            node.stop()
            finals.append({m.key: m for m in node.members() if m.key != node.local.key})
        for a, b in itertools.pairwise(finals):
            self.assertEqual(a, b)
        for key, final in finals[0].items():
            best = max((r for r in records if r.key == key), key=lambda r: r.precedence)
            self.assertEqual(final.precedence, best.precedence)


def attrs_evolve_boot(member: Member, boot: int) -> Member:
    """The member as an older generation (so any real record supersedes it)."""
    import attrs

    return attrs.evolve(member, boot=boot if boot >= 0 else 0, incarnation=0, state=MemberState.ALIVE)
