"""Hypothesis state machine: over any sequence of valid and invalid requests from several
keys, the notary accepts exactly what the association rules say."""
from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.security.notary import Notary
from portainer_agent.security.signature import SignatureError
from portainer_agent.testing.signing import PortainerSigner

KEYS = [PortainerSigner.generate() for _ in range(3)]
# A few pre-computed signatures per key: signing is slow and the nonce does not matter here.
SIGNATURES = {index: [key.sign() for _ in range(3)] for index, key in enumerate(KEYS)}
BAD = {index: key.sign("not Portainer-App") for index, key in enumerate(KEYS)}


class AssociationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.notary = Notary()
        self.owner: int | None = None  # the model: index of the associated key

    def send(self, index: int, signature: str) -> bool:
        try:
            self.notary.verify(KEYS[index].public_key_hex, signature)
        except SignatureError:
            return False
        return True

    @rule(index=st.integers(0, 2), which=st.integers(0, 2))
    def valid_request(self, index: int, which: int) -> None:
        accepted = self.send(index, SIGNATURES[index][which])
        if self.owner is None:
            self.owner = index
        assert accepted == (index == self.owner)

    @rule(index=st.integers(0, 2))
    def badly_signed_request(self, index: int) -> None:
        assert not self.send(index, BAD[index])

    @rule(index=st.integers(0, 2), owner_signature=st.integers(0, 2))
    def key_with_someone_elses_signature(self, index: int, owner_signature: int) -> None:
        other = (index + 1) % 3
        assert not self.send(index, SIGNATURES[other][owner_signature])

    @invariant()
    def association_matches_model(self) -> None:
        assert self.notary.is_associated == (self.owner is not None)
        if self.owner is not None:
            assert self.notary.associated_key is not None
            assert self.notary.associated_key.spki.hex() == KEYS[self.owner].public_key_hex


AssociationMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=25, deadline=None)


class AssociationStateMachineTests(AssociationMachine.TestCase, SynchronousTestCase):  # type: ignore[misc]
    def test_association_rules(self) -> None:
        # Hypothesis names its state-machine test ``runTest``, which trial's loader (it
        # collects ``test*`` methods only) would not find; pytest runs this one instead too.
        self.runTest()
