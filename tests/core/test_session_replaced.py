"""Same key twice: SESSION_REPLACED as a reason, a close, a wire code, an admission and an agent rule.

Determinism: pure cores only; no clock, no sockets, no randomness (fixed
keys and counters).  The drivers' side is tests/drivers/test_session_replaced.py.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from jvpn_trio.core import events as ev
from jvpn_trio.core import wire
from jvpn_trio.core.actions import EventKind, SendClose, Terminate
from jvpn_trio.core.admission import Admissions, Admit, Claimed, Refusal, Refuse
from jvpn_trio.core.agent import HOLD_PEER_REASONS, Succession
from jvpn_trio.core.channel import ChannelDrop
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.ownership import OwnershipRecord
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import SessionRecord
from jvpn_trio.core.states import (
    CLOSE_REASONS,
    LIVE_STATES,
    TERMINATION_REASONS,
    TRANSITIONS,
    BindingEffect,
    ReasonCode,
    SessionState,
)
from tests.core.test_channel import pair as channel_pair
from tests.core.test_session import kinds
from tests.pair import Pair

R = ReasonCode
POLICY = Policy()
NODE = "gw-a"
TUNNEL = ipaddress.IPv4Interface("10.66.0.1/29")
ALICE, BOB = b"A" * 32, b"B" * 32
_ids = itertools.count(1)


def sid() -> SessionId:
    return SessionId(next(_ids).to_bytes(16, "big"))


# -- the reason -----------------------------------------------------------------------------------


def test_session_replaced_is_an_explicit_close_that_ends_every_live_state() -> None:
    assert R.SESSION_REPLACED in TERMINATION_REASONS and R.SESSION_REPLACED in CLOSE_REASONS
    for state in LIVE_STATES:
        rule = TRANSITIONS[(state, R.SESSION_REPLACED)]
        assert (rule.to, rule.effect) == (SessionState.TERMINATED, BindingEffect.RELEASE)


def test_session_replaced_has_the_next_wire_code_and_a_close_carries_it() -> None:
    assert wire.reason_to_wire(R.SESSION_REPLACED) == 57
    close = wire.Close(session_id=sid(), reason=R.SESSION_REPLACED)
    decoded = wire.decode_plaintext_untrusted(wire.MessageType.CLOSE, wire.encode_close_plaintext(close))
    assert decoded == close


def test_a_replaced_session_ends_with_its_own_reason_and_the_client_hears_it() -> None:
    """The gateway's side logs SESSION_REPLACED (not PEER_CLOSE) and sends the CLOSE on its binding;
    the client ends with PEER_CLOSE and ``peer_reason=SESSION_REPLACED``."""
    pair = Pair.start()
    pair.run(1.0)
    binding = pair.gateway.record.binding
    assert binding is not None
    actions = pair.close("gateway", ev.CloseRequested(reason=R.SESSION_REPLACED))
    assert [(a.reason, a.binding) for a in actions if isinstance(a, SendClose)] == [(R.SESSION_REPLACED, binding)]
    assert [a.reason for a in actions if isinstance(a, Terminate)] == [R.SESSION_REPLACED]
    gateway_end = kinds(pair.events("gateway"), EventKind.STATE_CHANGE)[-1]
    assert (gateway_end.detail("to_state"), gateway_end.reason) == ("TERMINATED", R.SESSION_REPLACED)
    client_end = kinds(pair.events("client"), EventKind.STATE_CHANGE)[-1]
    assert (client_end.detail("to_state"), client_end.reason, client_end.detail("peer_reason")) == (
        "TERMINATED", R.PEER_CLOSE, "SESSION_REPLACED",
    )  # fmt: skip


def test_a_replayed_close_is_dropped_by_the_replay_window() -> None:
    """The CLOSE is sealed like any transport frame: a second delivery of the same bytes opens nothing."""
    gateway, client = channel_pair()
    close = wire.Close(session_id=sid(), reason=R.SESSION_REPLACED)
    datagram = gateway.seal(wire.MessageType.CLOSE, wire.encode_close_plaintext(close))
    opened = client.open_untrusted(datagram, now=0.0)
    assert wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext) == close
    with pytest.raises(ChannelDrop) as dropped:
        client.open_untrusted(datagram, now=0.1)
    assert dropped.value.reason is R.REPLAYED_COUNTER


def test_a_close_after_the_end_changes_nothing() -> None:
    """A replayed CLOSE that got past the channel would still find the session over: counted, not applied."""
    pair = Pair.start()
    pair.run(1.0)
    pair.close("gateway", ev.CloseRequested(reason=R.SESSION_REPLACED))
    record = pair.client.record
    assert pair.client.handle(ev.PeerClosed(reason=R.SESSION_REPLACED), now=pair.now + 1.0) == []
    assert pair.client.record == record


# -- admission: only the same key replaces ---------------------------------------------------------


def settle(table: Admissions, decision: Admit) -> Claimed:
    record = OwnershipRecord(session_id=decision.session_id, owner=NODE, revision=3)
    claimed = table.settle_claim(decision.session_id, succeeded=True, record=record)
    assert isinstance(claimed, Claimed)
    return claimed


def test_only_a_new_session_of_the_same_key_replaces_one() -> None:
    table = Admissions(tunnel=TUNNEL, fixed={}, node_id=NODE)
    alice = table.admit(ALICE, session_id=sid())
    assert isinstance(alice, Admit) and alice.replaces is None
    settle(table, alice)
    bob = table.admit(BOB, session_id=sid())
    assert isinstance(bob, Admit) and bob.replaces is None  # another key never displaces Alice
    settle(table, bob)
    assert table.session_of(ALICE) == alice.session_id
    again = table.admit(ALICE, session_id=sid())
    assert isinstance(again, Admit) and (again.replaces, again.address) == (alice.session_id, alice.address)
    assert table.session_of(BOB) == bob.session_id and table.address_of(alice.session_id) is None


def test_a_burst_of_the_same_key_replaces_at_most_once_per_claim() -> None:
    """While the replacing session waits for its claim, more inits of the key are refused, replacing nothing."""
    table = Admissions(tunnel=TUNNEL, fixed={}, node_id=NODE)
    first = table.admit(ALICE, session_id=sid())
    assert isinstance(first, Admit)
    settle(table, first)
    second = table.admit(ALICE, session_id=sid())
    assert isinstance(second, Admit) and second.replaces == first.session_id
    for _ in range(5):
        assert table.admit(ALICE, session_id=sid()) == Refuse(reason=Refusal.ADMISSION_IN_FLIGHT)
    assert table.session_of(ALICE) == second.session_id


# -- the agent: a replaced session holds it -----------------------------------------------------------


def ended(*, created_at: float = 0.0) -> SessionRecord:
    return SessionRecord(
        session_id=sid(), state=SessionState.TERMINATED, version=4, binding=None, created_at=created_at,
        unbound_since=None, recovering_since=None, bound_since=None, last_path=PathId(1), switch_times=(),
    )  # fmt: skip


def test_a_replaced_session_holds_the_agent_until_a_person_reconnects() -> None:
    s = Succession(policy=POLICY, now=0.0)
    s.session_started(sid(), now=0.0)
    assert s.session_ended(ended(), now=100.0, peer_reason=R.SESSION_REPLACED) == float("inf")
    assert s.hold is R.SESSION_REPLACED and s.next_attempt_at() == float("inf")
    assert R.SESSION_REPLACED in HOLD_PEER_REASONS
    # A resume, however long, does not end the hold: only a person does.
    s.resumed(10 * POLICY.transport_loss_ttl_ms / 1000.0, now=200.0)
    assert s.next_attempt_at() == float("inf")
    at = s.reconnect_requested("uid 1000", now=300.0)
    assert s.hold is None and at <= 300.0 + POLICY.reconnect_initial_ms / 1000.0 and s.next_attempt_at() == at
    assert s.session_started(sid(), now=at).reconnect_by == "uid 1000"


def test_a_replacement_the_agents_own_rescue_made_does_not_hold() -> None:
    s = Succession(policy=POLICY, now=0.0)
    s.session_started(sid(), now=0.0)
    at = s.session_ended(ended(), now=100.0, peer_reason=R.SESSION_REPLACED, rescued=True)
    assert s.hold is None and at < float("inf")


@pytest.mark.parametrize("peer_reason", [None, R.LOCAL_CLOSE, R.PEER_REMOVED, R.SESSION_TERMINATED])
def test_other_endings_reconnect_by_themselves(peer_reason: ReasonCode | None) -> None:
    s = Succession(policy=POLICY, now=0.0)
    s.session_started(sid(), now=0.0)
    at = s.session_ended(ended(), now=100.0, peer_reason=peer_reason)
    assert s.hold is None and at <= 100.0 + POLICY.reconnect_max_ms / 1000.0
