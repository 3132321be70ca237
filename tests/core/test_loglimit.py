"""The security-log limiter: first N in full, then counted and summed up, within a bound in bytes per second.

Determinism rules: pure calls with an injected ``now`` (no clock, no Trio);
floods are generated at exact simulated rates; the gateway cores that make
real events come from ``tests/pair.py``.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.loglimit import (
    DEFAULT_LOG_LIMITS,
    SUMMARY_DETAILS,
    LogLimits,
    SecurityLogLimiter,
)
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.tools.audit import audit_events
from tests.pair import client_endpoint, lone_gateway, valid_reattach

R = ReasonCode
SESSION = "000102030405060708090a0b0c0d0e0f"
POLICY = "0123456789abcdef"
ATTACKER = ("203.0.113.66", 6666)


def security(t: float, *, session: str = SESSION, reason: ReasonCode = R.REPLAYED_COUNTER, version: int = 1) -> EmitEvent:
    return EmitEvent(
        kind=EventKind.SECURITY_EVENT,
        t=t,
        role=Role.GATEWAY,
        session=session,
        version=version,
        reason=reason,
        policy=POLICY,
        details={"endpoint": "203.0.113.66:6666", "frame": "REATTACH"},
    )


def state_change(t: float, version: int, to_state: SessionState, *, session: str = SESSION) -> EmitEvent:
    return EmitEvent(
        kind=EventKind.STATE_CHANGE,
        t=t,
        role=Role.GATEWAY,
        session=session,
        version=version,
        reason=R.LOCAL_CLOSE if to_state is SessionState.TERMINATED else R.MISSED_PROBES,
        policy=POLICY,
        details={"from_state": "ATTACHED", "to_state": to_state.value},
    )


def is_summary(event: EmitEvent) -> bool:
    return event.detail("suppressed") is not None


def line_bytes(event: EmitEvent) -> int:
    return len(event.to_json_line().encode()) + 1


# -- the rule: first N in full, then a summary with the count ------------------------------------------


def test_the_first_burst_is_logged_in_full_then_held_back_and_summed_up_at_the_interval() -> None:
    limits = LogLimits(burst=3, refill_ms=60_000, summary_interval_ms=5_000)
    limiter = SecurityLogLimiter(limits)
    out = [line for i in range(10) for line in limiter.admit(security(i * 0.1), now=i * 0.1)]
    assert [e.t for e in out] == [0.0, 0.1, 0.2]
    assert not any(is_summary(e) for e in out)
    # The first event held back came at 0.3: its summary is due 5 s later, not before.
    assert limiter.next_deadline() == pytest.approx(5.3)
    assert limiter.tick(now=5.29) == []
    (summary,) = limiter.tick(now=5.3)
    assert summary.kind is EventKind.SECURITY_EVENT and summary.reason is R.REPLAYED_COUNTER
    assert summary.session == SESSION and summary.version == 1 and summary.role is Role.GATEWAY
    assert summary.detail("suppressed") == 7
    assert summary.detail("suppressed_first_t") == pytest.approx(0.3)
    assert summary.detail("suppressed_last_t") == pytest.approx(0.9)
    assert summary.detail("endpoint") == "203.0.113.66:6666"  # the last one held back, as a sample
    # Stamped with the latest t seen, not the tick's now: the log's times never go backwards.
    assert summary.t == pytest.approx(0.9)
    assert limiter.next_deadline() is None
    stats = limiter.statistics()
    assert (stats.seen, stats.logged, stats.held, stats.summaries, stats.pending) == (10, 3, 7, 1, 0)


def test_each_session_and_reason_has_its_own_burst() -> None:
    limiter = SecurityLogLimiter(LogLimits(burst=2, refill_ms=60_000))
    keys = [(SESSION, R.REPLAYED_COUNTER), (SESSION, R.DECRYPT_FAILED), ("ff" * 16, R.REPLAYED_COUNTER)]
    logged: Counter[tuple[str, ReasonCode]] = Counter()
    for i in range(30):
        session, reason = keys[i % 3]
        for line in limiter.admit(security(i * 0.01, session=session, reason=reason), now=i * 0.01):
            logged[(line.session, line.reason)] += 1
    assert logged == {key: 2 for key in keys}


def test_the_bucket_refills_so_a_later_event_is_logged_in_full_again() -> None:
    limiter = SecurityLogLimiter(LogLimits(burst=1, refill_ms=1_000, summary_interval_ms=10_000))
    assert limiter.admit(security(0.0), now=0.0) != []
    assert limiter.admit(security(0.5), now=0.5) == []
    assert [e.t for e in limiter.admit(security(1.0), now=1.0)] == [1.0]


def test_other_kinds_pass_unchanged_and_summaries_carry_the_sessions_latest_version() -> None:
    limiter = SecurityLogLimiter(LogLimits(burst=1, summary_interval_ms=1_000))
    assert len(limiter.admit(security(0.0, version=1), now=0.0)) == 1
    assert limiter.admit(security(0.1, version=1), now=0.1) == []
    degraded = state_change(0.2, 2, SessionState.DEGRADED)
    assert limiter.admit(degraded, now=0.2) == [degraded]
    assert limiter.observe(degraded) == [degraded]
    (summary,) = limiter.tick(now=1.1)
    assert summary.version == 2  # Property 8: a non-transition line carries the current version
    assert summary.t == pytest.approx(0.2)


def test_a_sessions_end_writes_its_pending_summaries_right_after_the_terminated_line() -> None:
    limiter = SecurityLogLimiter(LogLimits(burst=1, summary_interval_ms=60_000))
    limiter.admit(security(0.0), now=0.0)
    limiter.admit(security(0.1, reason=R.DECRYPT_FAILED), now=0.1)
    for i in range(5):
        limiter.admit(security(0.2 + i * 0.01), now=0.2 + i * 0.01)
    limiter.admit(security(0.3, reason=R.DECRYPT_FAILED), now=0.3)
    end = state_change(1.0, 2, SessionState.TERMINATED)
    out = limiter.observe(end)
    assert out[0] == end
    assert {(e.reason, e.detail("suppressed"), e.version, e.t) for e in out[1:]} == {
        (R.REPLAYED_COUNTER, 5, 2, 1.0),
        (R.DECRYPT_FAILED, 1, 2, 1.0),
    }
    assert limiter.next_deadline() is None and limiter.statistics().keys == 0


def test_flush_gives_every_pending_summary_at_once() -> None:
    limiter = SecurityLogLimiter(LogLimits(burst=1, summary_interval_ms=60_000, summaries_per_interval=1))
    for i, session in enumerate(["aa" * 16, "bb" * 16, "cc" * 16] * 2):
        limiter.admit(security(i * 0.1, session=session), now=i * 0.1)
    assert [e.detail("suppressed") for e in limiter.flush()] == [1, 1, 1]
    assert limiter.flush() == [] and limiter.statistics().pending == 0


def test_summaries_beyond_the_per_interval_budget_wait_and_keep_counting() -> None:
    limits = LogLimits(burst=1, summary_interval_ms=1_000, summaries_per_interval=2, lines_per_s=1000)
    limiter = SecurityLogLimiter(limits)
    sessions = [f"{n:032x}" for n in range(5)]
    for session in sessions * 2:
        limiter.admit(security(0.0, session=session), now=0.0)
    first = limiter.tick(now=1.0)
    assert len(first) == 2
    deadline = limiter.next_deadline()
    assert deadline is not None and deadline == pytest.approx(1.5)  # a summary token comes back every 0.5 s
    assert len(limiter.tick(now=deadline)) == 1
    later = limiter.tick(now=10.0)
    assert len(later) == 2
    assert sum(e.detail("suppressed") for e in [*first, *later]) + 1 == 5  # type: ignore[misc]


def test_keys_beyond_the_memory_bound_are_counted_without_a_summary() -> None:
    limiter = SecurityLogLimiter(LogLimits(burst=1, max_keys=2))
    for n in range(4):
        limiter.admit(security(0.0, session=f"{n:032x}"), now=0.0)
    stats = limiter.statistics()
    assert (stats.keys, stats.logged, stats.overflowed) == (2, 2, 2)


def test_idle_keys_are_forgotten() -> None:
    limiter = SecurityLogLimiter(LogLimits(burst=2, refill_ms=100, summary_interval_ms=1_000, max_keys=1))
    limiter.admit(security(0.0), now=0.0)
    assert limiter.statistics().keys == 1
    limiter.tick(now=2.0)
    assert limiter.statistics().keys == 0
    assert limiter.admit(security(2.0, session="ee" * 16), now=2.0) != []


def test_a_line_too_long_for_the_bound_is_held_back_and_its_summary_drops_the_sample() -> None:
    limiter = SecurityLogLimiter(LogLimits(max_line_bytes=256, summary_interval_ms=1_000))
    long = EmitEvent(
        kind=EventKind.SECURITY_EVENT, t=0.0, role=Role.GATEWAY, session=SESSION, version=1,
        reason=R.DECRYPT_FAILED, policy=POLICY, details={"endpoint": "x" * 400},
    )  # fmt: skip
    assert limiter.admit(long, now=0.0) == []
    (summary,) = limiter.tick(now=1.0)
    assert summary.detail("endpoint") is None and summary.detail("suppressed") == 1
    assert line_bytes(summary) <= 256


@pytest.mark.parametrize(
    ("field", "value"),
    [("burst", 0), ("refill_ms", 0), ("lines_per_s", 0), ("summary_interval_ms", 99), ("max_line_bytes", 255),
     ("summaries_per_interval", 0), ("max_keys", 0), ("burst", 1.5), ("burst", True)],
)  # fmt: skip
def test_limits_out_of_range_are_refused_with_a_one_line_reason(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        LogLimits(**{field: value})  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_the_default_bound_in_bytes_per_second() -> None:
    # 20 full lines and 10 summaries a second at most 1,024 bytes each, plus one second's burst of each.
    assert DEFAULT_LOG_LIMITS.max_bytes(1.0) == (20 * 2 + 50 * 1.2) * 1024
    assert DEFAULT_LOG_LIMITS.max_bytes(10.0) == (20 * 11 + 50 * 3) * 1024


# -- floods: the bound holds whatever the rate, and every event is accounted for -------------------------


def flood(limiter: SecurityLogLimiter, events: list[EmitEvent], summed: list[int] | None = None) -> dict[int, int]:
    """Feed ``events`` at their own times, ticking at each deadline; bytes logged per simulated second.

    ``summed`` collects the counts the summaries report.
    """
    per_second: dict[int, int] = defaultdict(int)

    def log(lines: list[EmitEvent], now: float) -> None:
        for line in lines:
            per_second[math.floor(now)] += line_bytes(line)
            if summed is not None and is_summary(line):
                summed.append(int(line.detail("suppressed")))  # type: ignore[arg-type]

    for event in events:
        deadline = limiter.next_deadline()
        while deadline is not None and deadline <= event.t:
            log(limiter.tick(now=deadline), deadline)
            deadline = limiter.next_deadline()
        log(limiter.admit(event, now=event.t), event.t)
    end = events[-1].t + 60.0
    while (deadline := limiter.next_deadline()) is not None and deadline <= end:
        log(limiter.tick(now=deadline), deadline)
    return per_second


def test_100k_security_events_at_10k_per_s_stay_within_the_bound_and_are_all_counted() -> None:
    limits = DEFAULT_LOG_LIMITS
    limiter = SecurityLogLimiter(limits)
    counted = 0
    events = []
    for i in range(100_000):
        events.append(security(i / 10_000))
        counted += 1  # what the metrics' ``also`` hook sees: every event
    summed: list[int] = []
    per_second = flood(limiter, events, summed=summed)
    assert counted == 100_000
    bound = limits.max_bytes(1.0)
    assert max(per_second.values()) <= bound
    stats = limiter.statistics()
    assert stats.seen == 100_000 and stats.pending == 0
    assert stats.logged + stats.held + stats.overflowed == 100_000
    assert stats.overflowed == 0 and sum(summed) == stats.held  # the summaries report every one held back
    # One session, one reason: the burst, one more line per refill, a summary per interval.
    assert stats.logged <= limits.burst + 15 * 1000 / limits.refill_ms + 1
    assert sum(per_second.values()) < 20_000  # versus ~30 MB unlimited


def test_a_flood_over_many_sessions_and_reasons_still_stays_within_the_bound() -> None:
    limits = LogLimits(max_keys=10_000)
    limiter = SecurityLogLimiter(limits)
    rng = random.Random(15)
    reasons = [R.REPLAYED_COUNTER, R.DECRYPT_FAILED, R.REPLAYED_NONCE]
    events = [
        security(i / 20_000, session=f"{rng.randrange(2_000):032x}", reason=rng.choice(reasons))
        for i in range(200_000)
    ]
    summed: list[int] = []
    per_second = flood(limiter, events, summed=summed)
    assert max(per_second.values()) <= limits.max_bytes(1.0)
    # 6,000 keys but 10 summaries a second: the rest wait (oldest first), still counting; exit flushes them.
    stats = limiter.statistics()
    assert stats.logged + stats.held + stats.overflowed == 200_000
    assert stats.pending > 0
    summed.extend(int(e.detail("suppressed")) for e in limiter.flush())  # type: ignore[arg-type]
    assert sum(summed) == stats.held and limiter.statistics().pending == 0


# -- the tools accept a limited log -------------------------------------------------------------------


def test_the_audit_accepts_a_gateway_log_written_under_a_flood() -> None:
    """Real gateway core events, flooded with junk REATTACHes and a genuine switch mid-flood, limited, audited."""
    policy = Policy()
    gw = lone_gateway(policy, bound=False)
    limiter = SecurityLogLimiter(LogLimits(burst=2, summary_interval_ms=1_000))
    log: list[EmitEvent] = []

    def feed(event: object, now: float) -> None:
        for deadline in iter(limiter.next_deadline, None):
            if deadline > now:
                break
            log.extend(limiter.tick(now=deadline))
        for action in gw.handle(event, now=now):  # type: ignore[arg-type]
            if isinstance(action, EmitEvent):
                log.extend(limiter.admit(action, now=now))

    for action in gw.creation_events():
        if isinstance(action, EmitEvent):
            log.extend(limiter.admit(action, now=0.0))
    feed(ev.PacketAuthenticated(endpoint=client_endpoint(PathId(1)), path=PathId(1)), 0.0)
    now = 0.0
    for i in range(3_000):
        now = 0.001 * i
        feed(ev.FrameDropped(reason=R.DECRYPT_FAILED, endpoint=ATTACKER, frame="REATTACH"), now)
        if i == 1_500:  # a genuine switch in the middle of the flood: its pair of lines stays together
            feed(valid_reattach(gw, path=PathId(2), now=now), now)
            held = gw.challenges[client_endpoint(PathId(2))]  # a new address: the client echoes its challenge
            echo = ev.PathResponseReceived(
                endpoint=client_endpoint(PathId(2)), path=PathId(2), nonce=held.request.nonce, challenge=held.challenge
            )
            feed(echo, now)
    feed(ev.TimerFired(), now + 0.5)
    feed(ev.CloseRequested(), now + 1.0)
    kinds = Counter(e.kind for e in log)
    assert kinds[EventKind.TRANSPORT_SWITCH] == 1
    summaries = [e for e in log if is_summary(e)]
    full = [e for e in log if e.kind is EventKind.SECURITY_EVENT and not is_summary(e)]
    assert summaries and len(full) + sum(e.detail("suppressed") for e in summaries) == 3_000  # type: ignore[misc]
    assert log[-1].detail("to_state") == SessionState.TERMINATED.value
    report = audit_events(log, policy=policy, role="gateway")
    assert report.ok, report.violations


def test_summary_details_are_named_in_the_module() -> None:
    summary = SecurityLogLimiter(LogLimits(burst=1, summary_interval_ms=100))
    summary.admit(security(0.0), now=0.0)
    summary.admit(security(0.0), now=0.0)
    (line,) = summary.tick(now=1.0)
    assert set(SUMMARY_DETAILS) <= {k for k, _ in line.details}


# -- the bound as a property: any arrival pattern, every sliding window ---------------------------------


@given(
    gaps=st.lists(st.sampled_from([0.0, 0.0, 0.0001, 0.001, 0.01, 0.1, 0.7, 3.0]), min_size=1, max_size=400),
    keys=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2)), min_size=1, max_size=400),
    window_s=st.sampled_from([0.25, 1.0, 2.5]),
)
@settings(max_examples=200, deadline=None)
def test_no_arrival_pattern_writes_more_than_the_bound_in_any_window(
    gaps: list[float], keys: list[tuple[int, int]], window_s: float
) -> None:
    limits = LogLimits(burst=2, refill_ms=300, lines_per_s=3, summary_interval_ms=500, summaries_per_interval=2)
    limiter = SecurityLogLimiter(limits)
    reasons = [R.REPLAYED_COUNTER, R.DECRYPT_FAILED, R.REPLAYED_NONCE]
    written: list[tuple[float, int]] = []
    now = 0.0
    events = []
    for i, gap in enumerate(gaps):
        now += gap
        session, reason = keys[i % len(keys)]
        events.append(security(now, session=f"{session:032x}", reason=reasons[reason]))
    for event in events:
        for deadline in iter(limiter.next_deadline, None):
            if deadline > event.t:
                break
            written += [(deadline, line_bytes(line)) for line in limiter.tick(now=deadline)]
        written += [(event.t, line_bytes(line)) for line in limiter.admit(event, now=event.t)]
    for deadline in iter(limiter.next_deadline, None):
        written += [(deadline, line_bytes(line)) for line in limiter.tick(now=deadline)]
    for start, _ in written:
        in_window = sum(size for at, size in written if start <= at < start + window_s)
        assert in_window <= limits.max_bytes(window_s)
    lines_in_window = max(sum(1 for at, _ in written if start <= at < start + window_s) for start, _ in written)
    assert lines_in_window <= limits.max_lines(window_s)
    stats = limiter.statistics()
    assert stats.pending == 0 and stats.logged + stats.held == len(events)
