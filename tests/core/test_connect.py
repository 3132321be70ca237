"""connect.HandshakePlanner: the order, deadlines and give-up of the client's first handshake.

Determinism: pure calls with exact virtual times; each step is taken at the
previous attempt's deadline, as the driver does when nobody answers.
POLICY pins ``handshake_retry_ms`` = 1000 and ``transport_loss_ttl_ms`` = 3500.
"""

from __future__ import annotations

import attrs
import pytest

from jvpn_trio.core.connect import HandshakeAttempt, HandshakeCandidate, HandshakeGiveUp, HandshakePlanner
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.policy import DEFAULT_POLICY
from jvpn_trio.core.states import ReasonCode

POLICY = attrs.evolve(DEFAULT_POLICY, handshake_retry_ms=1_000, transport_loss_ttl_ms=3_500)
P1, P2, P3 = PathId(1), PathId(2), PathId(3)
START = 100.0


def candidates(*links: bool) -> list[HandshakeCandidate]:
    """p1, p2, p3 with priorities 10, 20, 30 and the given link states."""
    return [HandshakeCandidate(path=PathId(i + 1), priority=10 * (i + 1), link_up=up) for i, up in enumerate(links)]


def run_silent(planner: HandshakePlanner, now: float) -> tuple[list[tuple[PathId, float, float]], HandshakeGiveUp]:
    """Step until the give-up, nobody answering: [(path, sent at, deadline)], and the give-up."""
    attempts: list[tuple[PathId, float, float]] = []
    while True:
        step = planner.next_attempt(now=now)
        if isinstance(step, HandshakeGiveUp):
            return attempts, step
        attempts.append((step.path, now, step.deadline))
        now = step.deadline


def test_round_robin_by_priority_until_the_ttl() -> None:
    planner = HandshakePlanner(policy=POLICY, candidates=candidates(True, True, True), now=START)
    attempts, give_up = run_silent(planner, START)
    assert attempts == [(P1, 100.0, 101.0), (P2, 101.0, 102.0), (P3, 102.0, 103.0), (P1, 103.0, 104.0)]
    assert give_up == HandshakeGiveUp(reason=ReasonCode.TRANSPORT_LOSS_TTL_EXPIRED, paths=(P1, P2, P3), after_ms=3_500)
    assert planner.attempts == 4 and planner.give_up_at == 103.5


def test_priority_not_input_order_decides_and_ties_go_to_the_lower_path_id() -> None:
    mixed = [
        HandshakeCandidate(path=P3, priority=5),
        HandshakeCandidate(path=P2, priority=20),
        HandshakeCandidate(path=P1, priority=20),
    ]
    planner = HandshakePlanner(policy=POLICY, candidates=mixed, now=0.0)
    assert [path for path, _, _ in run_silent(planner, 0.0)[0]] == [P3, P1, P2, P3]


def test_paths_with_a_link_down_are_skipped() -> None:
    planner = HandshakePlanner(policy=POLICY, candidates=candidates(False, True, False), now=START)
    attempts, give_up = run_silent(planner, START)
    assert [path for path, _, _ in attempts] == [P2, P2, P2, P2]
    assert give_up.paths == (P2,)


def test_all_links_down_means_try_them_all() -> None:
    planner = HandshakePlanner(policy=POLICY, candidates=candidates(False, False, False), now=START)
    attempts, give_up = run_silent(planner, START)
    assert [path for path, _, _ in attempts] == [P1, P2, P3, P1]
    assert give_up.paths == (P1, P2, P3)


def test_each_deadline_counts_from_when_the_driver_asks() -> None:
    planner = HandshakePlanner(policy=POLICY, candidates=candidates(True, True, True), now=START)
    first = planner.next_attempt(now=START)
    second = planner.next_attempt(now=START + 0.25)
    assert first == HandshakeAttempt(path=P1, deadline=101.0, number=1)
    assert second == HandshakeAttempt(path=P2, deadline=101.25, number=2)


def test_link_changes_move_the_rotation() -> None:
    planner = HandshakePlanner(policy=POLICY, candidates=candidates(True, False, True), now=START)
    assert planner.next_attempt(now=100.0) == HandshakeAttempt(path=P1, deadline=101.0, number=1)
    planner.link_changed(P2, up=True)
    assert planner.next_attempt(now=101.0) == HandshakeAttempt(path=P2, deadline=102.0, number=2)
    planner.link_changed(P3, up=False)
    planner.link_changed(P1, up=False)
    assert planner.eligible() == (P2,)
    assert planner.next_attempt(now=102.0) == HandshakeAttempt(path=P2, deadline=103.0, number=3)
    planner.link_changed(PathId(9), up=True)  # not a candidate: ignored
    planner.link_changed(P2, up=False)  # now all down: all are tried again, after the last one
    assert planner.eligible() == (P1, P2, P3)
    assert planner.next_attempt(now=103.0) == HandshakeAttempt(path=P3, deadline=104.0, number=4)


def test_the_ttl_is_checked_before_each_attempt_and_the_give_up_stays() -> None:
    planner = HandshakePlanner(policy=POLICY, candidates=candidates(True), now=0.0)
    assert isinstance(planner.next_attempt(now=3.4999), HandshakeAttempt)
    give_up = planner.next_attempt(now=3.5)
    assert isinstance(give_up, HandshakeGiveUp)
    assert planner.next_attempt(now=10.0) == give_up
    assert planner.attempts == 1


def test_the_first_attempt_is_immediate_even_with_a_tiny_ttl() -> None:
    policy = attrs.evolve(
        DEFAULT_POLICY,
        transport_loss_ttl_ms=400,
        max_recovery_window_ms=400,
        reattach_timeout_ms=250,
        handshake_retry_ms=1_000,
    )
    planner = HandshakePlanner(policy=policy, candidates=candidates(True, True), now=0.0)
    # An attempt that started keeps its whole retry interval, past the TTL.
    assert planner.next_attempt(now=0.0) == HandshakeAttempt(path=P1, deadline=1.0, number=1)
    assert planner.next_attempt(now=1.0) == HandshakeGiveUp(
        reason=ReasonCode.TRANSPORT_LOSS_TTL_EXPIRED, paths=(P1, P2), after_ms=400
    )


def test_candidates_must_be_present_and_distinct() -> None:
    with pytest.raises(ValueError, match="at least one"):
        HandshakePlanner(policy=POLICY, candidates=[], now=0.0)
    with pytest.raises(ValueError, match="repeat"):
        HandshakePlanner(
            policy=POLICY,
            candidates=[HandshakeCandidate(path=P1, priority=10), HandshakeCandidate(path=P1, priority=20)],
            now=0.0,
        )
