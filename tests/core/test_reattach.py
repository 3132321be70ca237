"""validate_reattach: each rejection, the documented check order, freshness and rate edges (spec 7, 9, 10).

Determinism: pure function; exact floats.  The base case is a gateway session
created at t=100.0 and asked at NOW=110.0, so the session clock reads exactly
10000.0 ms and a client with no clock offset sends ``client_ts_ms=10000``.
POLICY pins the freshness window at 5000 ms and the rate at 6 switches per minute.
"""

from __future__ import annotations

from typing import Callable

import attrs
import pytest

from jvpn_trio.core.events import ReattachReceived
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.ownership import OwnershipRecord
from jvpn_trio.core.policy import DEFAULT_POLICY, SWITCH_RATE_WINDOW_S
from jvpn_trio.core.reattach import (
    Accept,
    ReattachContext,
    Reject,
    rate_has_room,
    session_clock_ms,
    switches_in_window,
    validate_reattach,
)
from jvpn_trio.core.states import ReasonCode as R
from jvpn_trio.core.states import SessionState as S

POLICY = attrs.evolve(DEFAULT_POLICY, freshness_window_ms=5_000, max_switches_per_minute=6)
SID = SessionId(bytes(range(16)))
OTHER_SID = SessionId(bytes(range(16, 32)))
NODE = "gw-a"
P1, P2 = PathId(1), PathId(2)
EP1 = ("198.51.100.1", 40001)
EP2 = ("198.51.100.2", 40002)
CREATED = 100.0
NOW = 110.0
OWNED = OwnershipRecord(session_id=SID, owner=NODE, revision=7)
# Six switches inside the minute before NOW: the default maximum, so no room.
FULL_MINUTE = (50.5, 60.0, 70.0, 80.0, 90.0, 100.0)


def ctx(**overrides: object) -> ReattachContext:
    fields: dict[str, object] = dict(
        session_id=SID,
        state=S.ATTACHED,
        version=3,
        binding=Binding(path=P1, endpoint=EP1),
        last_nonce=5,
        clock_offset_ms=0.0,
        created_at=CREATED,
        switch_times=(),
        node_id=NODE,
        held_revision=7,
    )
    fields.update(overrides)
    return ReattachContext(**fields)  # type: ignore[arg-type]


def req(**overrides: object) -> ReattachReceived:
    fields: dict[str, object] = dict(
        session_id=SID,
        path=P2,
        endpoint=EP2,
        nonce=6,
        client_ts_ms=10_000,
        expected_version=3,
        proof_valid=True,
        ownership=OWNED,
    )
    fields.update(overrides)
    return ReattachReceived(**fields)  # type: ignore[arg-type]


def check(c: ReattachContext, r: ReattachReceived, *, now: float = NOW) -> Accept | Reject:
    return validate_reattach(c, r, POLICY, now=now)


def test_accept() -> None:
    assert check(ctx(), req()) == Accept(
        binding=Binding(path=P2, endpoint=EP2), already_bound=False, new_last_nonce=6, new_clock_offset_ms=0.0
    )


def test_accept_from_recovery_when_unbound() -> None:
    result = check(ctx(state=S.RECOVERING, binding=None), req(nonce=99))
    assert result == Accept(
        binding=Binding(path=P2, endpoint=EP2), already_bound=False, new_last_nonce=99, new_clock_offset_ms=0.0
    )


def test_session_clock_ms() -> None:
    assert session_clock_ms(NOW, CREATED) == 10_000.0
    assert session_clock_ms(100.25, 100.0) == 250.0


# -- each rejection, with its flags ---------------------------------------------------------------

# (id, context overrides, request overrides, reason, security, reply, why)
REJECTS = [
    ("terminated", dict(state=S.TERMINATED), {}, R.SESSION_TERMINATED, False, True, "session is over"),
    ("bad proof", {}, dict(proof_valid=False), R.DECRYPT_FAILED, True, False, "proof of possession failed"),
    (
        "other session",
        {},
        dict(session_id=OTHER_SID),
        R.SESSION_MISMATCH,
        True,
        False,
        "SessionID in the request differs from the keys' session",
    ),
    ("same nonce", {}, dict(nonce=5), R.REPLAYED_NONCE, True, False, "nonce 5 not above last accepted 5"),
    ("older nonce", {}, dict(nonce=4), R.REPLAYED_NONCE, True, False, "nonce 4 not above last accepted 5"),
    (
        "timestamp ahead",
        {},
        dict(client_ts_ms=15_001),
        R.STALE_TIMESTAMP,
        True,
        True,
        "timestamp off by 5001 ms (window 5000 ms)",
    ),
    (
        "timestamp behind",
        {},
        dict(client_ts_ms=4_999),
        R.STALE_TIMESTAMP,
        True,
        True,
        "timestamp off by -5001 ms (window 5000 ms)",
    ),
    (
        "another owner",
        {},
        dict(ownership=OwnershipRecord(session_id=SID, owner="gw-b", revision=7)),
        R.NOT_OWNER,
        True,
        True,
        "owned by gw-b",
    ),
    (
        "no ownership record",
        {},
        dict(ownership=None),
        R.OWNERSHIP_AMBIGUOUS,
        True,
        True,
        "no ownership record (lease expired?)",
    ),
    (
        "ownership record for another session",
        {},
        dict(ownership=OwnershipRecord(session_id=OTHER_SID, owner=NODE, revision=7)),
        R.OWNERSHIP_AMBIGUOUS,
        True,
        True,
        "record is for another session",
    ),
    (
        "ownership at a newer revision",
        {},
        dict(ownership=OwnershipRecord(session_id=SID, owner=NODE, revision=8)),
        R.OWNERSHIP_AMBIGUOUS,
        True,
        True,
        "store revision 8 differs from held revision 7",
    ),
    (
        "stale version",
        {},
        dict(expected_version=2),
        R.STALE_VERSION,
        False,
        True,
        "expected version 2, current 3",
    ),
    (
        "future version",
        {},
        dict(expected_version=4),
        R.STALE_VERSION,
        False,
        True,
        "expected version 4, current 3",
    ),
    (
        "rate exhausted",
        dict(switch_times=FULL_MINUTE),
        {},
        R.RATE_LIMITED,
        False,
        True,
        "6 switches in the last minute (max 6)",
    ),
]


@pytest.mark.parametrize(
    ("ctx_over", "req_over", "reason", "security", "reply", "why"),
    [c[1:] for c in REJECTS],
    ids=[c[0] for c in REJECTS],
)
def test_reject(
    ctx_over: dict[str, object],
    req_over: dict[str, object],
    reason: R,
    security: bool,
    reply: bool,
    why: str,
) -> None:
    assert check(ctx(**ctx_over), req(**req_over)) == Reject(reason=reason, security=security, reply=reply, why=why)


def test_silent_rejections_are_exactly_the_unauthenticated_or_replayed_ones() -> None:
    silent = {reason for _id, _c, _r, reason, _sec, reply, _why in REJECTS if not reply}
    assert silent == {R.DECRYPT_FAILED, R.SESSION_MISMATCH, R.REPLAYED_NONCE}


# -- check order: the earlier failing check always wins ---------------------------------------------

Break = tuple[str, Callable[[dict[str, object], dict[str, object]], None], R]

# In the documented order.  Each breaker makes exactly one check fail and keeps the earlier ones passing.
BREAKERS: list[Break] = [
    ("terminated", lambda c, r: c.update(state=S.TERMINATED), R.SESSION_TERMINATED),
    ("bad proof", lambda c, r: r.update(proof_valid=False), R.DECRYPT_FAILED),
    ("other session", lambda c, r: r.update(session_id=OTHER_SID), R.SESSION_MISMATCH),
    ("replayed nonce", lambda c, r: r.update(nonce=5), R.REPLAYED_NONCE),
    ("stale timestamp", lambda c, r: r.update(client_ts_ms=20_000), R.STALE_TIMESTAMP),
    (
        "not owner",
        lambda c, r: r.update(ownership=OwnershipRecord(session_id=SID, owner="gw-b", revision=7)),
        R.NOT_OWNER,
    ),
    ("stale version", lambda c, r: r.update(expected_version=2), R.STALE_VERSION),
    ("rate exhausted", lambda c, r: c.update(switch_times=FULL_MINUTE), R.RATE_LIMITED),
]


def _build(breakers: list[Break]) -> tuple[ReattachContext, ReattachReceived]:
    c: dict[str, object] = {}
    r: dict[str, object] = {}
    for _name, apply, _reason in breakers:
        apply(c, r)
    return ctx(**c), req(**r)


@pytest.mark.parametrize("first", range(len(BREAKERS)), ids=[b[0] for b in BREAKERS])
def test_each_check_fails_alone(first: int) -> None:
    c, r = _build([BREAKERS[first]])
    result = check(c, r)
    assert isinstance(result, Reject)
    assert result.reason is BREAKERS[first][2]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [(i, j) for i in range(len(BREAKERS)) for j in range(i + 1, len(BREAKERS))],
    ids=[f"{BREAKERS[i][0]}>{BREAKERS[j][0]}" for i in range(len(BREAKERS)) for j in range(i + 1, len(BREAKERS))],
)
def test_earlier_check_wins_over_a_later_one(earlier: int, later: int) -> None:
    c, r = _build([BREAKERS[earlier], BREAKERS[later]])
    result = check(c, r)
    assert isinstance(result, Reject)
    assert result.reason is BREAKERS[earlier][2]


@pytest.mark.parametrize("first", range(len(BREAKERS)), ids=[b[0] for b in BREAKERS])
def test_earliest_check_wins_when_all_later_ones_fail_too(first: int) -> None:
    c, r = _build(BREAKERS[first:])
    result = check(c, r)
    assert isinstance(result, Reject)
    assert result.reason is BREAKERS[first][2]


def test_ambiguous_ownership_is_checked_before_the_version() -> None:
    result = check(ctx(), req(ownership=None, expected_version=2))
    assert isinstance(result, Reject) and result.reason is R.OWNERSHIP_AMBIGUOUS


def test_version_is_checked_before_already_bound() -> None:
    result = check(ctx(), req(path=P1, endpoint=EP1, expected_version=2))
    assert isinstance(result, Reject) and result.reason is R.STALE_VERSION


# -- freshness window ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_ts_ms", "accepted"),
    [
        (10_000, True),
        (15_000, True),  # exactly the window ahead
        (15_001, False),  # 1 ms beyond
        (5_000, True),  # exactly the window behind
        (4_999, False),
    ],
)
def test_freshness_window_boundaries(client_ts_ms: int, accepted: bool) -> None:
    result = check(ctx(), req(client_ts_ms=client_ts_ms))
    if accepted:
        assert isinstance(result, Accept)
        assert result.new_clock_offset_ms == 10_000.0 - client_ts_ms
    else:
        assert isinstance(result, Reject) and result.reason is R.STALE_TIMESTAMP


@pytest.mark.parametrize(
    ("client_ts_ms", "accepted"),
    [(7_500, True), (12_500, True), (12_501, False), (2_500, True), (2_499, False)],
)
def test_freshness_window_is_anchored_on_the_clock_offset(client_ts_ms: int, accepted: bool) -> None:
    # The client's clock runs 2500 ms behind the session clock: it should say 7500 at NOW.
    result = check(ctx(clock_offset_ms=2_500.0), req(client_ts_ms=client_ts_ms))
    assert isinstance(result, Accept) is accepted


def test_freshness_window_comes_from_the_policy() -> None:
    policy = attrs.evolve(POLICY, freshness_window_ms=1_000)
    assert isinstance(validate_reattach(ctx(), req(client_ts_ms=11_000), policy, now=NOW), Accept)
    rejected = validate_reattach(ctx(), req(client_ts_ms=11_001), policy, now=NOW)
    assert rejected == Reject(
        reason=R.STALE_TIMESTAMP, security=True, reply=True, why="timestamp off by 1001 ms (window 1000 ms)"
    )


def test_accept_re_anchors_the_clock_offset() -> None:
    # First reattach: the client says 8000 at session clock 10000 -> offset 2000.
    first = check(ctx(), req(client_ts_ms=8_000))
    assert isinstance(first, Accept)
    assert first.new_clock_offset_ms == 2_000.0
    later = ctx(
        binding=first.binding,
        last_nonce=first.new_last_nonce,
        clock_offset_ms=first.new_clock_offset_ms,
        version=4,
        switch_times=(NOW,),
    )
    at = 170.0  # session clock 70000 -> the client should say 68000
    on_time = check(later, req(path=P1, endpoint=EP1, nonce=7, client_ts_ms=68_000, expected_version=4), now=at)
    assert on_time == Accept(
        binding=Binding(path=P1, endpoint=EP1), already_bound=False, new_last_nonce=7, new_clock_offset_ms=2_000.0
    )
    # 73500 would be fresh against the old anchor (offset 0) but is 5500 ms off against the new one.
    late = req(path=P1, endpoint=EP1, nonce=7, client_ts_ms=73_500, expected_version=4)
    assert isinstance(check(attrs.evolve(later, clock_offset_ms=0.0), late, now=at), Accept)
    stale = check(later, late, now=at)
    assert stale == Reject(
        reason=R.STALE_TIMESTAMP, security=True, reply=True, why="timestamp off by 5500 ms (window 5000 ms)"
    )


# -- already bound -------------------------------------------------------------------------------------------


def test_same_binding_is_accepted_as_already_bound() -> None:
    result = check(ctx(), req(path=P1, endpoint=EP1, nonce=9, client_ts_ms=9_000))
    assert result == Accept(
        binding=Binding(path=P1, endpoint=EP1), already_bound=True, new_last_nonce=9, new_clock_offset_ms=1_000.0
    )


def test_already_bound_needs_no_rate_room() -> None:
    result = check(ctx(switch_times=FULL_MINUTE), req(path=P1, endpoint=EP1))
    assert isinstance(result, Accept) and result.already_bound


def test_same_path_from_a_new_endpoint_is_a_switch() -> None:
    result = check(ctx(), req(path=P1, endpoint=("198.51.100.1", 50000)))
    assert isinstance(result, Accept) and not result.already_bound
    limited = check(ctx(switch_times=FULL_MINUTE), req(path=P1, endpoint=("198.51.100.1", 50000)))
    assert isinstance(limited, Reject) and limited.reason is R.RATE_LIMITED


# -- switch-rate window ----------------------------------------------------------------------------------------


def test_switches_in_window_counts_strictly_inside_the_last_minute() -> None:
    assert SWITCH_RATE_WINDOW_S == 60.0
    assert switches_in_window((), NOW) == 0
    assert switches_in_window((50.0,), NOW) == 0  # exactly 60 s ago: no longer counts
    assert switches_in_window((50.001,), NOW) == 1
    assert switches_in_window((10.0, 50.0, 50.001, 109.0, 110.0), NOW) == 3


def test_rate_has_room() -> None:
    five = (60.0, 70.0, 80.0, 90.0, 100.0)
    assert rate_has_room(five, POLICY, NOW)
    assert not rate_has_room((*five, 105.0), POLICY, NOW)
    assert rate_has_room((50.0, *five), POLICY, NOW)
    assert not rate_has_room((*five,), attrs.evolve(POLICY, max_switches_per_minute=5), NOW)


def test_rate_boundary_a_switch_exactly_60s_ago_no_longer_counts() -> None:
    five = (60.0, 70.0, 80.0, 90.0, 100.0)
    assert isinstance(check(ctx(switch_times=(50.0, *five)), req()), Accept)
    limited = check(ctx(switch_times=(50.001, *five)), req())
    assert limited == Reject(
        reason=R.RATE_LIMITED, security=False, reply=True, why="6 switches in the last minute (max 6)"
    )


def test_switch_leaves_the_window_at_exactly_t_plus_window() -> None:
    t = 0.3
    assert switches_in_window((t,), t + SWITCH_RATE_WINDOW_S) == 0


def test_a_reject_changes_nothing() -> None:
    c = ctx(switch_times=FULL_MINUTE)
    before = attrs.asdict(c, recurse=False)
    for r in (req(nonce=1), req(proof_valid=False), req(), req(ownership=None)):
        assert isinstance(check(c, r), Reject)
    assert attrs.asdict(c, recurse=False) == before
