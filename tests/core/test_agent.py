"""core/agent.py: the back-off between sessions, what a new session inherits, and rescue timing.

Determinism: exact virtual times; no clock, no sockets.  The property test
drives real ClientSessions, one after another, each created from the seed
the Succession gives it, and checks Property 6 over the whole agent.
"""

from __future__ import annotations

import itertools

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent, EventKind, SendReattach
from jvpn_trio.core.agent import (
    HandshakeRound,
    PathIds,
    PathIdsExhausted,
    Succession,
    gateway_tolerance_s,
    outlived_gateway,
)
from jvpn_trio.core.candidates import DownReason
from jvpn_trio.core.connect import HandshakeAttempt, HandshakeCandidate, HandshakeGiveUp
from jvpn_trio.core.ids import MAX_PATH_ID, Binding, PathId, SessionId
from jvpn_trio.core.policy import SWITCH_RATE_WINDOW_S, Policy
from jvpn_trio.core.session import ClientSession, SessionRecord
from jvpn_trio.core.states import SessionState
from tests.pair import lone_client, lone_gateway

POLICY = Policy()
P1, P2 = PathId(1), PathId(2)
GW = ("192.0.2.1", 51820)


def sid(n: int) -> SessionId:
    return SessionId(n.to_bytes(16, "big"))


def record(
    n: int, *, created_at: float, bound: bool = True, switch_times: tuple[float, ...] = (), unbound_since: float | None = None
) -> SessionRecord:
    return SessionRecord(
        session_id=sid(n),
        state=SessionState.TERMINATED,
        version=3,
        binding=None,
        created_at=created_at,
        unbound_since=unbound_since,
        recovering_since=None,
        bound_since=None,
        last_path=P1 if bound else None,
        switch_times=switch_times,
    )


# -- back-off -----------------------------------------------------------------------------------


def test_the_first_handshake_waits_for_nothing() -> None:
    s = Succession(policy=POLICY, now=5.0)
    assert s.next_attempt_at() == 5.0 and s.reconnect_delay_ms() == 0


def test_failures_double_the_wait_up_to_the_ceiling() -> None:
    s = Succession(policy=POLICY, now=0.0)
    waits = []
    now = 0.0
    for _ in range(9):
        at = s.handshake_failed(now)
        waits.append(round((at - now) * 1000))
        now = at
    assert waits == [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]


def test_a_short_session_counts_as_a_failure_and_a_long_one_starts_over() -> None:
    s = Succession(policy=POLICY, now=0.0)
    s.handshake_failed(0.0)
    s.handshake_failed(0.25)
    assert s.failures == 2
    # Ended 31 s after birth (a transport-loss TTL): the gateway never proved itself for a minute.
    at = s.session_ended(record(1, created_at=1.0), now=32.0)
    assert s.failures == 3 and at == pytest.approx(33.0)
    # Served a whole rate window with a binding: the chain is healthy again, the next wait is the first.
    at = s.session_ended(record(2, created_at=33.0), now=33.0 + SWITCH_RATE_WINDOW_S)
    assert s.failures == 1 and at == pytest.approx(33.0 + SWITCH_RATE_WINDOW_S + 0.25)


def test_a_session_that_was_never_bound_does_not_reset_the_back_off() -> None:
    s = Succession(policy=POLICY, now=0.0)
    s.handshake_failed(0.0)
    s.session_ended(record(1, created_at=1.0, bound=False), now=100.0)
    assert s.failures == 2


# -- inheritance ----------------------------------------------------------------------------------


def test_a_new_session_names_the_one_before_and_inherits_its_counted_switches() -> None:
    s = Succession(policy=POLICY, now=0.0)
    first = s.session_started(sid(1), now=0.0)
    assert (first.number, first.previous_session, first.switch_times) == (1, None, ())
    s.session_ended(record(1, created_at=0.0, switch_times=(10.0, 20.0, 40.0)), now=45.0)
    second = s.session_started(sid(2), now=75.0)  # 10.0 left the window at 70.0
    assert second.number == 2 and second.previous_session == sid(1)
    assert second.switch_times == (20.0, 40.0)
    s.session_ended(record(2, created_at=75.0, switch_times=(20.0, 40.0, 80.0)), now=90.0)
    assert s.session_started(sid(3), now=95.0).switch_times == (40.0, 80.0)


def test_the_birth_event_carries_the_previous_session() -> None:
    session = ClientSession(policy=POLICY, session_id=sid(2), now=1.0, previous_session=sid(1))
    (birth,) = session.creation_events()
    assert isinstance(birth, EmitEvent) and birth.detail("previous_session") == sid(1).hex
    (plain,) = ClientSession(policy=POLICY, session_id=sid(1), now=0.0).creation_events()
    assert isinstance(plain, EmitEvent) and plain.detail("previous_session") is None


def test_inherited_switches_deny_a_switch_in_the_new_session() -> None:
    """A storm that ended a session cannot buy a fresh switch budget with the next one."""
    policy = attrs.evolve(POLICY, max_switches_per_minute=2)
    now = 100.0
    fresh = _attached_session(policy, now, switch_times=())
    inherited = _attached_session(policy, now, switch_times=(now - 20.0, now - 10.0))
    assert _switches_asked(fresh, now) == 1
    assert _switches_asked(inherited, now) == 0
    assert inherited.record.state is SessionState.DEGRADED


def _attached_session(policy: Policy, now: float, *, switch_times: tuple[float, ...]) -> ClientSession:
    session = lone_client(policy, session_id=sid(9), now=now, switch_times=switch_times)
    for seq in (1, 2, 3):  # p2 answers its probes: a healthy candidate
        session.handle(ev.ProbeSent(path=P2, seq=seq), now=now)
        session.handle(ev.ProbeAcked(path=P2, seq=seq, gateway_version=1, gateway_bound_path=P1), now=now + 0.01)
    return session


def _switches_asked(session: ClientSession, now: float) -> int:
    actions = session.handle(ev.LinkChanged(path=P1, up=False), now=now + 0.02)
    return sum(isinstance(a, SendReattach) for a in actions)


# -- rescue -----------------------------------------------------------------------------------------


def test_rescue_only_for_a_live_unbound_session_after_the_recovery_window() -> None:
    s = Succession(policy=POLICY, now=0.0)
    live = attrs.evolve(record(1, created_at=0.0), state=SessionState.RECOVERING, unbound_since=10.0)
    assert s.rescue_at(live) == pytest.approx(10.0 + POLICY.max_recovery_window_ms / 1000)
    assert s.rescue_at(attrs.evolve(live, binding=Binding(path=P1, endpoint=GW))) is None
    assert s.rescue_at(attrs.evolve(live, state=SessionState.BIRTH)) is None
    assert s.rescue_at(attrs.evolve(live, state=SessionState.TERMINATED)) is None
    s.handshake_failed(12.0)
    s.handshake_failed(13.5)
    assert s.rescue_at(live) == pytest.approx(13.5 + 0.5)  # a failed rescue backs off like any handshake


# -- Property 6 over the whole agent ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lifetimes=st.lists(st.floats(min_value=1.0, max_value=40.0), min_size=2, max_size=8),
    flaps=st.lists(st.floats(min_value=0.05, max_value=3.0), min_size=1, max_size=40),
)
def test_a_chain_of_sessions_never_switches_more_than_the_rate_allows(lifetimes: list[float], flaps: list[float]) -> None:
    """However a storm ends sessions, confirmed switches per minute stay within the policy, agent-wide."""
    policy = attrs.evolve(POLICY, max_switches_per_minute=3, min_dwell_ms=0)
    succession = Succession(policy=policy, now=0.0)
    now = 0.0
    confirmed: list[float] = []
    flap_iter = itertools.cycle(flaps)
    seqs = iter(range(10, 1 << 30))
    for n, lifetime in enumerate(lifetimes, start=1):
        now = max(now, succession.next_attempt_at())
        seed = succession.session_started(sid(n), now)
        session = _attached_session(policy, now, switch_times=seed.switch_times)
        end = now + lifetime
        active = P1
        while now < end:
            now += next(flap_iter)
            if session.terminated:
                break
            other = P2 if active == P1 else P1
            for seq in (next(seqs), next(seqs), next(seqs)):  # the other path answers: a candidate
                session.handle(ev.ProbeSent(path=other, seq=seq), now=now)
                session.handle(ev.ProbeAcked(path=other, seq=seq, gateway_version=1, gateway_bound_path=active), now=now)
            actions = session.handle(ev.LinkChanged(path=active, up=False), now=now)
            for send in (a for a in actions if isinstance(a, SendReattach)):
                done = session.handle(
                    ev.ReattachAcked(path=send.path, nonce=send.nonce, new_version=session.gateway_version + 1), now=now
                )
                if any(isinstance(a, EmitEvent) and a.kind is EventKind.TRANSPORT_SWITCH for a in done):
                    confirmed.append(now)
                    active = send.path
            session.handle(ev.LinkChanged(path=P1 if active == P2 else P2, up=True), now=now)
        session.handle(ev.CloseRequested(), now=now)
        assert session.record.state is SessionState.TERMINATED
        assert session.counters.get("invalid_transitions", 0) == 0
        succession.session_ended(session.record, now)
    for t in confirmed:
        in_the_minute_before = [s for s in confirmed if t - SWITCH_RATE_WINDOW_S < s <= t]
        assert len(in_the_minute_before) <= policy.max_switches_per_minute, (t, confirmed)


def test_the_chain_check_fails_without_inheritance() -> None:
    """The property above can fail: fresh budgets per session exceed the rate."""
    policy = attrs.evolve(POLICY, max_switches_per_minute=2)
    now = 100.0
    asked = sum(_switches_asked(_attached_session(policy, now, switch_times=()), now) for _ in range(3))
    assert asked == 3 > policy.max_switches_per_minute


# -- handshake rounds and their spacing ----------------------------------------------------------------


def _round(now: float, links: dict[PathId, bool]) -> HandshakeRound:
    candidates = [HandshakeCandidate(path=p, priority=10 * p.value, link_up=up) for p, up in links.items()]
    return HandshakeRound(policy=POLICY, candidates=candidates, now=now)


def test_a_round_tries_each_eligible_path_once_then_gives_up() -> None:
    plan = _round(0.0, {P1: True, P2: False, PathId(3): True})
    first, second, third = (plan.next_attempt(now=t) for t in (0.0, 1.0, 2.0))
    assert isinstance(first, HandshakeAttempt) and (first.path, first.deadline) == (P1, 1.0)
    assert isinstance(second, HandshakeAttempt) and second.path == PathId(3)
    assert isinstance(third, HandshakeGiveUp) and third.paths == (P1, PathId(3)) and third.after_ms == 2000
    assert plan.last_attempt_at == 1.0 and plan.attempts == 2


def test_a_round_follows_link_changes_for_its_remaining_attempts() -> None:
    plan = _round(0.0, {P1: True, P2: True})
    assert isinstance(first := plan.next_attempt(now=0.0), HandshakeAttempt) and first.path == P1
    plan.link_changed(P2, up=False)
    assert isinstance(again := plan.next_attempt(now=1.0), HandshakeAttempt) and again.path == P1


def test_the_wait_counts_from_the_last_init_so_inits_are_at_most_the_ceiling_apart() -> None:
    s = Succession(policy=POLICY, now=0.0)
    # The round's last init left at 2.0 and its wait ended at 3.0: 0.25 s from 2.0 is already over.
    assert s.handshake_failed(3.0, last_attempt_at=2.0) == 3.0
    for _ in range(10):
        s.handshake_failed(100.0, last_attempt_at=99.0)
    assert s.handshake_failed(100.0, last_attempt_at=99.0) == pytest.approx(99.0 + POLICY.reconnect_max_ms / 1000)
    # Without it, as before: from the end of the round.
    assert Succession(policy=POLICY, now=0.0).handshake_failed(3.0) == pytest.approx(3.25)


# -- resume after a suspend ---------------------------------------------------------------------------


def test_the_tolerance_is_what_the_gateway_core_does() -> None:
    # The gateway releases a silent binding after one TTL and ends the session one TTL later.
    policy = Policy(transport_loss_ttl_ms=30_000)
    gateway = lone_gateway(policy)
    ended_at = None
    while (deadline := gateway.next_deadline()) is not None:
        gateway.handle(ev.TimerFired(), now=deadline)
        if gateway.terminated:
            ended_at = deadline
    assert ended_at == gateway_tolerance_s(policy) == 60.0


@pytest.mark.parametrize(
    ("suspended_for_s", "outlived"), [(6.0, False), (45.0, False), (59.9, False), (60.0, True), (1_800.0, True)]
)
def test_outlived_gateway(suspended_for_s: float, outlived: bool) -> None:
    assert outlived_gateway(suspended_for_s, Policy(transport_loss_ttl_ms=30_000)) is outlived


def test_a_resume_past_the_gateways_tolerance_makes_a_rescue_due_at_once() -> None:
    s = Succession(policy=POLICY, now=0.0)
    s.session_started(sid(1), 0.0)
    bound = attrs.evolve(
        record(1, created_at=0.0), state=SessionState.ATTACHED, binding=Binding(path=P1, endpoint=GW)
    )
    assert s.rescue_at(bound) is None
    short = gateway_tolerance_s(POLICY) - 1.0
    assert s.resumed(short, 100.0) is False
    assert s.rescue_at(bound) is None  # a short suspend: probing decides
    assert s.resumed(gateway_tolerance_s(POLICY), 200.0) is True
    assert s.rescue_at(bound) == 200.0  # bound or not: the gateway has forgotten it
    assert s.next_attempt_at() <= 200.0
    s.handshake_failed(201.0)
    assert s.rescue_at(bound) is None  # the forced attempt was made; ordinary rules again


def test_a_resume_between_sessions_makes_the_next_round_due_at_once() -> None:
    s = Succession(policy=POLICY, now=0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        s.handshake_failed(t)
    assert s.next_attempt_at() > 5.0
    assert s.resumed(gateway_tolerance_s(POLICY), 5.0) is True
    assert s.next_attempt_at() == 5.0
    s.session_started(sid(2), 5.5)
    fresh = attrs.evolve(record(2, created_at=5.5), state=SessionState.ATTACHED, binding=Binding(path=P1, endpoint=GW))
    assert s.rescue_at(fresh) is None


# -- path ids -----------------------------------------------------------------------------------------


def test_path_ids_are_stable_round_robin_and_bounded() -> None:
    ids = PathIds()
    assert [ids.allocate(k) for k in (1, 2, 3)] == [PathId(1), PathId(2), PathId(3)]
    assert ids.allocate(2) == PathId(2)  # the same manager path keeps its id
    assert ids.free(2) == PathId(2) and ids.free(2) is None
    assert ids.allocate(4) == PathId(4)  # a freed id is not the next one given out
    for key in range(5, 5 + MAX_PATH_ID - 4):
        ids.allocate(key)
    assert ids.get(5 + MAX_PATH_ID - 5) == PathId(MAX_PATH_ID)
    assert ids.allocate(9_999) == PathId(2)  # only after every other id: wrapped to the freed one
    assert len(ids) == MAX_PATH_ID
    with pytest.raises(PathIdsExhausted):
        ids.allocate(10_000)
    ids.free(1)
    assert ids.allocate(10_000) == PathId(1)


def test_a_path_keeps_its_id_across_a_flap_and_loses_it_when_the_interface_goes() -> None:
    ids = PathIds()
    pid = ids.allocate(1, name="wlan0")
    for reason in (DownReason.LINK_DOWN, DownReason.NO_ADDRESS, DownReason.NO_ROUTE, DownReason.READ_ERROR):
        assert ids.path_down(1, reason) == pid and ids.get(1) == pid  # it will come back as itself
    assert ids.path_down(1, DownReason.INTERFACE_GONE) == pid and ids.get(1) is None
    assert ids.path_down(1, DownReason.INTERFACE_GONE) is None  # unknown now
    other = ids.allocate(2, name="wwan0")
    assert ids.path_down(2, DownReason.NOT_A_CANDIDATE) == other and len(ids) == 0


def test_a_configured_interface_keeps_its_place_whenever_it_appears() -> None:
    """Undocked at start: eth0 is still p1 when it appears, after wifi0 took p2."""
    ids = PathIds(configured=["eth0", "wlan0"])
    assert ids.allocate(1, name="wlan0") == PathId(2)
    assert ids.allocate(2, name="usb0") == PathId(3)  # not configured: after the reserved ids
    assert ids.allocate(3, name="eth0") == PathId(1)
    ids.free(3)
    assert ids.allocate(7, name="eth0") == PathId(1)  # re-plugged: the same id again
    with pytest.raises(PathIdsExhausted):
        ids.allocate(8, name="eth0")  # two live paths cannot share it
    assert ids.allocate(9, name="wwan0") == PathId(4)
