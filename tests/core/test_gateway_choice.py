"""core/agent.py GatewayChoice: which gateway the agent's handshake rounds go to.

Pure and deterministic: ``now`` is a number given to each call.
"""

from __future__ import annotations

import pytest

from jvpn_trio.core.agent import GatewayChoice, GatewayMove
from jvpn_trio.core.states import ReasonCode

A, B, C = "192.0.2.1:51820", "192.0.2.2:51820", "192.0.2.3:51820"


def test_starts_at_the_preferred_gateway_and_keeps_it_while_it_answers() -> None:
    choice = GatewayChoice([A, B, C])
    assert (choice.current, choice.name) == (0, A)
    for reason in (ReasonCode.PEER_CLOSE, ReasonCode.LOCAL_CLOSE, ReasonCode.SESSION_TTL_EXPIRED, None):
        assert choice.session_ended(reason, 10.0) is None
    assert choice.name == A
    assert choice.moves == []


def test_a_failed_round_moves_to_the_next_and_wraps_around() -> None:
    choice = GatewayChoice([A, B, C])
    first = choice.round_failed(5.0)
    assert first == GatewayMove(
        from_index=0, to_index=1, from_name=A, to_name=B, reason=ReasonCode.NO_CANDIDATE, at=5.0
    )
    assert first.describe() == f"gateway {A} failed (no handshake answer on any path); next handshakes go to {B}"
    assert choice.name == B
    choice.round_failed(6.0)
    assert choice.name == C
    back = choice.round_failed(7.0)
    assert back is not None and (back.from_name, back.to_name) == (C, A)
    assert [m.at for m in choice.moves] == [5.0, 6.0, 7.0]


def test_no_return_to_the_preferred_while_the_current_works() -> None:
    choice = GatewayChoice([A, B])
    choice.round_failed(1.0)
    # B answers and serves: sessions end for ordinary reasons, the choice stays at B.
    for t in range(2, 50):
        assert choice.session_ended(ReasonCode.PEER_CLOSE, float(t)) is None
    assert choice.name == B
    # Only B failing brings it back to A.
    assert choice.round_failed(60.0) is not None
    assert choice.name == A


def test_a_session_ended_unbound_by_ttl_moves_on() -> None:
    choice = GatewayChoice([A, B])
    move = choice.session_ended(ReasonCode.TRANSPORT_LOSS_TTL_EXPIRED, 30.0)
    assert move is not None and move.to_name == B and move.reason is ReasonCode.TRANSPORT_LOSS_TTL_EXPIRED
    assert move.describe() == f"gateway {A} failed (TRANSPORT_LOSS_TTL_EXPIRED); next handshakes go to {B}"


def test_one_gateway_never_moves() -> None:
    choice = GatewayChoice([A])
    assert not choice.has_alternative
    assert choice.round_failed(1.0) is None
    assert choice.session_ended(ReasonCode.TRANSPORT_LOSS_TTL_EXPIRED, 2.0) is None
    assert choice.name == A and choice.moves == []


@pytest.mark.parametrize("names", [[], [A, A]])
def test_refuses_no_or_repeated_gateways(names: list[str]) -> None:
    with pytest.raises(ValueError):
        GatewayChoice(names)
