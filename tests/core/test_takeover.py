"""Takeover decisions: who may resume a session another gateway made, and at which address.

Pure: no clock, no store; session ids from counters.
"""

from __future__ import annotations

import ipaddress

import attrs
import pytest

from jvpn_trio.core.actions import EmitEvent, SendPathChallenge, SendReattachAck
from jvpn_trio.core.admission import Admissions, Admit, Claimed, Refusal, Refuse
from jvpn_trio.core.events import TimerFired
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.ownership import (
    OwnershipRecord,
    SessionTicket,
    Takeover,
    TakeoverVerdict,
    judge_takeover,
    peer_fingerprint,
)
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import GatewaySession
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.core.trace import (
    BadTrace,
    SessionStart,
    decode_line_untrusted,
    encode_session_start,
)
from tests.pair import NODE as PAIR_NODE
from tests.pair import SID, client_endpoint, valid_reattach

NODE = "gw-b"
TUNNEL = ipaddress.IPv4Interface("10.66.0.1/24")
ALICE, BOB = b"A" * 32, b"B" * 32
ALICE_ADDRESS = ipaddress.IPv4Address("10.66.0.2")
S1 = SessionId(bytes(15) + b"\x01")
S2 = SessionId(bytes(15) + b"\x02")


def ticket(session_id: SessionId = S1, *, peer: bytes = ALICE, address: str = "10.66.0.2") -> SessionTicket:
    return SessionTicket(
        peer=peer_fingerprint(peer), session_id=session_id, owner="gw-a", address=ipaddress.IPv4Address(address), revision=9
    )


def table() -> Admissions:
    return Admissions(tunnel=TUNNEL, fixed={ALICE: ALICE_ADDRESS}, node_id=NODE)


def test_the_fingerprint_is_stable_short_and_per_key() -> None:
    assert peer_fingerprint(ALICE) == peer_fingerprint(bytes(ALICE))
    assert peer_fingerprint(ALICE) != peer_fingerprint(BOB)
    assert len(peer_fingerprint(ALICE)) == 32


def test_only_the_peer_its_ticket_names_may_resume_its_latest_session_at_the_same_address() -> None:
    alice = peer_fingerprint(ALICE)
    ok = judge_takeover(ticket(), peer=alice, session_id=S1, address=ALICE_ADDRESS)
    assert ok is TakeoverVerdict.ALLOWED
    # A holder of another valid key asking for Alice's session: Alice's ticket is not under its name.
    assert judge_takeover(ticket(), peer=peer_fingerprint(BOB), session_id=S1, address=ALICE_ADDRESS) is (
        TakeoverVerdict.NO_TICKET
    )
    assert judge_takeover(None, peer=alice, session_id=S1, address=ALICE_ADDRESS) is TakeoverVerdict.NO_TICKET
    # An older session of Alice's, replaced since: the ticket names the newer one.
    assert judge_takeover(ticket(S2), peer=alice, session_id=S1, address=ALICE_ADDRESS) is TakeoverVerdict.OTHER_SESSION
    # Here Alice would get another address (or a pool one): the tunnel's connections could not survive.
    assert judge_takeover(ticket(), peer=alice, session_id=S1, address=None) is TakeoverVerdict.ADDRESS_DIFFERS
    other = ipaddress.IPv4Address("10.66.0.3")
    assert judge_takeover(ticket(), peer=alice, session_id=S1, address=other) is TakeoverVerdict.ADDRESS_DIFFERS


def test_adopt_keeps_the_session_id_and_the_configured_address() -> None:
    admissions = table()
    decision = admissions.adopt(ALICE, session_id=S1, ticket_revision=9)
    assert isinstance(decision, Admit)
    assert decision.session_id == S1 and decision.address == ALICE_ADDRESS and decision.replaces is None
    assert decision.claim.ticket_revision == 9 and decision.claim.owner == NODE
    claimed = admissions.settle_claim(
        S1, succeeded=True, record=OwnershipRecord(session_id=S1, owner=NODE, revision=12)
    )
    assert isinstance(claimed, Claimed) and claimed.held_revision == 12 and claimed.address == ALICE_ADDRESS
    assert admissions.session_of(ALICE) == S1


def test_adopt_refuses_a_peer_without_a_configured_address() -> None:
    admissions = table()
    assert admissions.adopt(BOB, session_id=S2, ticket_revision=9) == Refuse(reason=Refusal.NOT_PORTABLE)
    assert admissions.session_of(BOB) is None


def test_a_lost_takeover_claim_leaves_nothing_held() -> None:
    admissions = table()
    assert isinstance(admissions.adopt(ALICE, session_id=S1, ticket_revision=9), Admit)
    # A second resume of the same session while the first claim is out is refused.
    assert admissions.adopt(ALICE, session_id=S1, ticket_revision=9) == Refuse(reason=Refusal.ADMISSION_IN_FLIGHT)
    lost = admissions.settle_claim(S1, succeeded=False, record=OwnershipRecord(session_id=S1, owner="gw-a", revision=9))
    assert lost == Refuse(reason=Refusal.CLAIM_FAILED)
    assert admissions.session_of(ALICE) is None and admissions.address_of(S1) is None


def test_adopt_replaces_the_session_the_peer_holds_here() -> None:
    admissions = table()
    first = admissions.admit(ALICE, session_id=S2)
    assert isinstance(first, Admit)
    admissions.settle_claim(S2, succeeded=True, record=OwnershipRecord(session_id=S2, owner=NODE, revision=3))
    decision = admissions.adopt(ALICE, session_id=S1, ticket_revision=9)
    assert isinstance(decision, Admit) and decision.replaces == S2 and decision.address == ALICE_ADDRESS


def test_a_takeover_starts_from_a_version_that_cannot_be_negative() -> None:
    assert Takeover(version=7, previous_owner="gw-a").version == 7
    with pytest.raises(ValueError):
        Takeover(version=-1, previous_owner="gw-a")


def taken_over_session(*, now: float = 100.0) -> GatewaySession:
    return GatewaySession(
        policy=Policy(),
        session_id=SID,
        now=now,
        node_id=PAIR_NODE,
        held_revision=12,
        taken_over=Takeover(version=7, previous_owner="gw-a", endpoint=client_endpoint(PathId(1))),
    )


def test_a_taken_over_session_starts_unbound_at_the_clients_version_and_says_where_from() -> None:
    gw = taken_over_session()
    assert gw.record.state is SessionState.RECOVERING and gw.record.version == 7 and gw.record.binding is None
    (first,) = gw.creation_events()
    assert isinstance(first, EmitEvent) and first.reason is ReasonCode.SESSION_TAKEN_OVER
    assert (first.version, first.detail("from_state"), first.detail("to_state")) == (7, None, "RECOVERING")
    assert first.detail("previous_owner") == "gw-a"


def test_the_resumes_address_needs_no_challenge_another_does() -> None:
    gw = taken_over_session()
    here = gw.handle(valid_reattach(gw, path=PathId(1), now=100.5), now=100.5)
    acks = [a for a in here if isinstance(a, SendReattachAck)]
    assert acks and acks[0].new_version == 8 and acks[0].owner_epoch == 12  # the epoch of its own claim
    assert not any(isinstance(a, SendPathChallenge) for a in here)
    elsewhere = gw.handle(valid_reattach(gw, path=PathId(2), now=101.0), now=101.0)
    assert any(isinstance(a, SendPathChallenge) for a in elsewhere)  # an address the resume did not come from


def test_a_taken_over_session_unclaimed_by_reattach_ends_at_its_ttl() -> None:
    gw = taken_over_session()
    deadline = gw.next_deadline()
    assert deadline is not None and deadline <= 100.0 + Policy().transport_loss_ttl_ms / 1000.0
    gw.handle(TimerFired(), now=100.0 + Policy().transport_loss_ttl_ms / 1000.0)
    assert gw.record.state is SessionState.TERMINATED


def test_the_takeover_round_trips_through_a_trace_start() -> None:
    start = SessionStart(
        side="gateway",
        now=5.0,
        session=SID.hex,
        policy=Policy().to_mapping(),
        node_id=PAIR_NODE,
        held_revision=12,
        taken_over=Takeover(version=7, previous_owner="gw-a", endpoint=("198.51.100.1", 40001)),
    )
    assert decode_line_untrusted(encode_session_start(start)) == start
    bare = attrs.evolve(start, taken_over=Takeover(version=7, previous_owner="gw-a"))
    assert decode_line_untrusted(encode_session_start(bare)) == bare
    with pytest.raises(BadTrace):
        decode_line_untrusted(encode_session_start(start).replace('"from":"gw-a"', '"owner":"gw-a"'))
