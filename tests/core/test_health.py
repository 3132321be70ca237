"""Path health: verdicts, reasons, thresholds, hysteresis and deadlines, at exact virtual times.

Determinism rules: plain pytest, no clock.  Every test starts at ``now = 0.0``
and passes explicit times; RTTs are binary fractions of a second (0.03125,
0.0625, 0.375, 0.5) so the millisecond values are exact.

The policy is pinned here (``POLICY``), every field health.py reads set
explicitly, so retuning the laptop default never changes what these tests
mean: probe timeout 150 ms, DEAD after 3 missed, loss window 20, thresholds
10 % / 120 ms / 100 ms (loss / latency / jitter), recovery below 0.8 of each
(8 % / 96 ms / 80 ms), delivery TTL 30 s.  The thresholds sit under the probe
timeout, as the policy requires.  A "good" probe is 62.5 ms (0.0625 s): under
the recovery bound, so it is HEALTHY from any previous verdict and only the
metric a test drives can impair the path.  ``SLOW`` raises the probe timeout
to 1 s and the latency threshold to 400 ms (recovery below 320 ms) so that
RTTs of several hundred ms can be measured rather than counted lost.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from jvpn_trio.core.health import (
    JITTER_GAIN,
    RTT_HISTORY_LEN,
    SRTT_GAIN,
    PathHealth,
    PathStats,
    PathVerdict,
    Verdict,
)
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode as R

P = PathId(1)
# Pinned here rather than taken from the laptop default, so retuning the default
# never silently changes what these exact-time tests mean; kept local (not in
# tests/policies.py) because it pins only what health.py reads, to values no scenario uses.
POLICY = Policy(
    probe_timeout_ms=150,
    transport_loss_ttl_ms=30_000,
    dead_after_missed_probes=3,
    loss_window_probes=20,
    loss_threshold_pct=10.0,
    latency_threshold_ms=120.0,
    jitter_threshold_ms=100.0,
    healthy_below_fraction=0.8,
    silence_probe_after_ms=None,
)
#: Silence probing on: data unanswered 30 ms makes a path silent; its probes then time out after
#: srtt + 4 x jitter, at least 20 ms.
SILENCE = attrs.evolve(POLICY, silence_probe_after_ms=30, silence_probe_timeout_floor_ms=20)
#: Acks up to a second late still count, so RTTs above the latency threshold can be measured.
SLOW = attrs.evolve(POLICY, probe_timeout_ms=1_000, latency_threshold_ms=400.0)
TIMEOUT_S = POLICY.probe_timeout_ms / 1000
TTL_S = POLICY.transport_loss_ttl_ms / 1000


class Script:
    """Drives a tracker one probe per second; each probe is resolved before the next is sent."""

    def __init__(self, health: PathHealth, policy: Policy) -> None:
        self.health = health
        self.timeout_s = policy.probe_timeout_ms / 1000
        self.t = 0.0
        self.seq = 0

    def ok(self, rtt_s: float) -> float | None:
        sent = self.t
        self.health.on_probe_sent(self.seq, now=sent)
        rtt_ms = self.health.on_probe_acked(self.seq, now=sent + rtt_s)
        self.seq += 1
        self.t += 1.0
        return rtt_ms

    def lose(self) -> None:
        sent = self.t
        self.health.on_probe_sent(self.seq, now=sent)
        deadline = self.health.next_deadline()
        assert deadline == sent + self.timeout_s
        self.health.expire(now=deadline)
        self.seq += 1
        self.t += 1.0

    def verdict(self) -> PathVerdict:
        return self.health.verdict(now=self.t)

    def stats(self) -> PathStats:
        return self.health.stats(now=self.t)


def fresh(policy: Policy = POLICY, **kwargs: bool) -> tuple[PathHealth, Script]:
    health = PathHealth(P, policy, now=0.0, **kwargs)
    return health, Script(health, policy)


# -- starting out ----------------------------------------------------------------------


def test_starts_unknown() -> None:
    health, _ = fresh()
    assert health.path == P
    assert health.verdict(now=0.0) == PathVerdict(P, Verdict.UNKNOWN, R.NO_SAMPLES, None, None)
    assert health.next_deadline() is None
    assert health.stats(now=0.0) == PathStats(
        path=P,
        srtt_ms=None,
        jitter_ms=None,
        loss_pct=0.0,
        last_delivery=None,
        consecutive_missed=0,
        probes_sent=0,
        probes_acked=0,
        probes_lost=0,
        link_up=True,
        rtt_history_ms=(),
        healthy_since=None,
        late_acks=0,
        ignored_acks=0,
    )
    # No delivery yet, so no DELIVERY_TIMEOUT, however long it stays silent.
    assert health.verdict(now=10 * TTL_S).verdict is Verdict.UNKNOWN


def test_starts_link_down() -> None:
    health, _ = fresh(link_up=False)
    assert health.verdict(now=0.0) == PathVerdict(P, Verdict.DEAD, R.LINK_DOWN)
    assert not health.stats(now=0.0).link_up


def test_first_ack_makes_it_healthy() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    assert health.next_deadline() == 0.150
    assert health.verdict(now=0.03125).verdict is Verdict.UNKNOWN
    assert health.on_probe_acked(0, now=0.0625) == 62.5
    assert health.verdict(now=0.0625) == PathVerdict(P, Verdict.HEALTHY, R.WITHIN_THRESHOLDS)
    stats = health.stats(now=0.2)
    assert stats.srtt_ms == 62.5
    assert stats.jitter_ms is None  # one sample: no difference yet
    assert stats.loss_pct == 0.0
    assert stats.last_delivery == 0.0625
    assert (stats.probes_sent, stats.probes_acked, stats.probes_lost) == (1, 1, 0)
    assert stats.rtt_history_ms == (62.5,)
    assert stats.healthy_since == 0.0625


def test_healthy_since_is_kept_while_healthy() -> None:
    health, script = fresh()
    script.ok(0.0625)
    script.ok(0.03125)
    script.ok(0.0625)
    assert script.stats().healthy_since == 0.0625


# -- probe timeout boundary ------------------------------------------------------------------


def test_ack_just_before_timeout_counts() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    health.expire(now=0.149)
    assert health.stats(now=0.149).probes_lost == 0
    assert health.on_probe_acked(0, now=0.149) == pytest.approx(149.0)
    assert health.stats(now=0.149).probes_acked == 1


def test_probe_is_lost_exactly_at_timeout() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    health.expire(now=math.nextafter(0.150, 0.0))
    assert health.stats(now=0.1).consecutive_missed == 0
    health.expire(now=0.150)
    stats = health.stats(now=0.150)
    assert (stats.probes_lost, stats.consecutive_missed, stats.loss_pct) == (1, 1, 100.0)
    assert health.next_deadline() is None


def test_ack_exactly_at_timeout_is_late() -> None:
    # The ack's own call expires the probe first: same outcome as expire(0.150) then ack.
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    assert health.on_probe_acked(0, now=0.150) is None
    stats = health.stats(now=0.150)
    assert (stats.probes_lost, stats.probes_acked, stats.late_acks) == (1, 0, 1)
    assert stats.last_delivery == 0.150
    assert stats.srtt_ms is None


# -- DEAD and its precedence ----------------------------------------------------------------


def test_never_delivered_path_dies_by_missed_probes() -> None:
    health, script = fresh()
    script.lose()
    script.lose()
    assert script.verdict() == PathVerdict(P, Verdict.UNKNOWN, R.NO_SAMPLES)
    script.lose()
    assert script.verdict() == PathVerdict(P, Verdict.DEAD, R.MISSED_PROBES, 3.0, 3.0)


def test_missed_probes_counts_consecutive_only() -> None:
    health, script = fresh()
    script.ok(0.0625)
    script.lose()
    script.lose()
    assert script.stats().consecutive_missed == 2
    script.ok(0.0625)  # resets the run
    assert script.stats().consecutive_missed == 0
    script.lose()
    script.lose()
    assert script.verdict().verdict is Verdict.IMPAIRED  # 4 of 6 lost, but only 2 in a row
    script.lose()
    assert script.verdict() == PathVerdict(P, Verdict.DEAD, R.MISSED_PROBES, 3.0, 3.0)


def test_missed_probes_threshold_comes_from_policy() -> None:
    health, script = fresh(attrs.evolve(POLICY, dead_after_missed_probes=5))
    for _ in range(4):
        script.lose()
    assert script.verdict().verdict is Verdict.UNKNOWN
    script.lose()
    assert script.verdict() == PathVerdict(P, Verdict.DEAD, R.MISSED_PROBES, 5.0, 5.0)


def test_delivery_timeout_boundary_is_strict() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    health.on_probe_acked(0, now=0.0625)
    ttl_end = 0.0625 + TTL_S  # 30.0625: exact in binary
    assert health.next_deadline() == math.nextafter(ttl_end, math.inf)
    assert health.verdict(now=ttl_end).verdict is Verdict.HEALTHY  # silence of exactly the TTL is fine
    just_after = math.nextafter(ttl_end, math.inf)
    verdict = health.verdict(now=just_after)
    assert (verdict.verdict, verdict.reason) == (Verdict.DEAD, R.DELIVERY_TIMEOUT)
    assert verdict.measured == pytest.approx(30_000.0)
    assert verdict.threshold == 30_000.0
    assert health.stats(now=just_after).healthy_since is None


def test_delivery_timeout_committed_by_expire() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    health.on_probe_acked(0, now=0.0625)
    deadline = health.next_deadline()
    assert deadline is not None
    health.expire(now=deadline)
    assert health.verdict(now=deadline).reason is R.DELIVERY_TIMEOUT
    assert health.next_deadline() is None  # already in effect: a timer there would spin
    # Data arrives again: out of DEAD, and by metrics (srtt 62.5 < 96) straight to HEALTHY.
    health.on_delivery(now=40.0)
    assert health.verdict(now=40.0) == PathVerdict(P, Verdict.HEALTHY, R.WITHIN_THRESHOLDS)
    assert health.stats(now=40.0).healthy_since == 40.0
    assert health.next_deadline() == math.nextafter(40.0 + TTL_S, math.inf)


def test_data_delivery_alone_keeps_it_unknown_until_ttl() -> None:
    health, _ = fresh()
    health.on_delivery(now=1.0)
    assert health.verdict(now=1.0).verdict is Verdict.UNKNOWN
    assert health.stats(now=1.0).last_delivery == 1.0
    assert health.verdict(now=1.0 + TTL_S).verdict is Verdict.UNKNOWN
    late = math.nextafter(1.0 + TTL_S, math.inf)
    assert health.verdict(now=late).reason is R.DELIVERY_TIMEOUT


def test_dead_precedence_link_then_missed_then_timeout() -> None:
    health, script = fresh()
    script.ok(0.0625)  # delivered at 0.0625
    script.t = 40.0  # long silence: DELIVERY_TIMEOUT applies...
    assert script.verdict().reason is R.DELIVERY_TIMEOUT
    for _ in range(3):
        script.lose()  # ...and so does MISSED_PROBES, which wins
    assert script.verdict() == PathVerdict(P, Verdict.DEAD, R.MISSED_PROBES, 3.0, 3.0)
    health.on_link(False, now=script.t)
    assert script.verdict() == PathVerdict(P, Verdict.DEAD, R.LINK_DOWN)


def test_dead_beats_impaired() -> None:
    health, script = fresh()
    script.ok(0.0625)
    for _ in range(3):
        script.lose()
    verdict = script.verdict()
    assert verdict.reason is R.MISSED_PROBES  # loss is 75 %, but DEAD comes first
    assert script.stats().loss_pct == 75.0


def test_leaving_dead_by_ack_goes_by_metrics() -> None:
    health, script = fresh()
    for _ in range(16):
        script.ok(0.0625)
    for _ in range(3):
        script.lose()
    assert script.verdict().verdict is Verdict.DEAD
    script.ok(0.0625)  # 3 of the last 20 lost
    assert script.stats().consecutive_missed == 0
    assert script.verdict() == PathVerdict(P, Verdict.IMPAIRED, R.LOSS_ABOVE_THRESHOLD, 15.0, 10.0)


# -- link ------------------------------------------------------------------------------------


def test_link_down_and_up() -> None:
    health, script = fresh()
    script.ok(0.0625)
    assert script.stats().healthy_since == 0.0625
    health.on_link(False, now=5.0)
    assert health.verdict(now=5.0) == PathVerdict(P, Verdict.DEAD, R.LINK_DOWN)
    assert health.stats(now=5.0).healthy_since is None
    health.on_link(False, now=5.5)  # repeated: no change
    health.on_link(True, now=6.0)
    assert health.verdict(now=6.0) == PathVerdict(P, Verdict.HEALTHY, R.WITHIN_THRESHOLDS)
    assert health.stats(now=6.0).healthy_since == 6.0


def test_link_up_after_dead_needs_the_recovery_bound() -> None:
    health, script = fresh(SLOW)
    script.ok(0.375)  # 375 ms: under 400, so HEALTHY from UNKNOWN...
    assert script.verdict().verdict is Verdict.HEALTHY
    health.on_link(False, now=script.t)
    health.on_link(True, now=script.t)
    # ...but coming back from DEAD it must be under 0.8 x 400 = 320.
    assert script.verdict() == PathVerdict(P, Verdict.IMPAIRED, R.LATENCY_ABOVE_THRESHOLD, 375.0, 320.0)


def test_probes_still_expire_while_link_is_down() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    health.on_link(False, now=0.1)
    health.expire(now=0.150)
    assert health.stats(now=0.150).probes_lost == 1
    assert health.verdict(now=0.150).reason is R.LINK_DOWN


# -- IMPAIRED, precedence and hysteresis -----------------------------------------------------


def test_loss_threshold_and_recovery() -> None:
    health, script = fresh()
    for _ in range(9):
        script.ok(0.0625)
    script.lose()  # 1 of 10 = 10 %: at the threshold counts
    assert script.verdict() == PathVerdict(P, Verdict.IMPAIRED, R.LOSS_ABOVE_THRESHOLD, 10.0, 10.0)
    script.ok(0.0625)  # 1/11 = 9.09 %: under 10 but not under 8
    verdict = script.verdict()
    assert (verdict.verdict, verdict.reason, verdict.threshold) == (Verdict.IMPAIRED, R.LOSS_ABOVE_THRESHOLD, 8.0)
    assert verdict.measured == pytest.approx(100 / 11)
    script.ok(0.0625)  # 1/12 = 8.33 %
    assert script.verdict().verdict is Verdict.IMPAIRED
    assert script.stats().healthy_since is None
    script.ok(0.0625)  # 1/13 = 7.69 %
    assert script.verdict() == PathVerdict(P, Verdict.HEALTHY, R.WITHIN_THRESHOLDS)
    assert script.stats().healthy_since == script.t - 1.0 + 0.0625


def test_in_band_metrics_from_unknown_are_healthy() -> None:
    health, script = fresh(SLOW)
    script.ok(0.375)  # 375 ms: between 320 and 400; no previous impairment, so the plain threshold applies
    assert script.verdict() == PathVerdict(P, Verdict.HEALTHY, R.WITHIN_THRESHOLDS)


def test_early_loss_impairs_then_must_recover() -> None:
    health, script = fresh()
    script.lose()
    script.ok(0.0625)  # 1 of 2 lost
    assert script.verdict() == PathVerdict(P, Verdict.IMPAIRED, R.LOSS_ABOVE_THRESHOLD, 50.0, 10.0)
    for _ in range(10):
        script.ok(0.0625)  # 1/12 = 8.33 %: under the threshold, not under the recovery bound
    assert script.verdict().threshold == 8.0
    script.ok(0.0625)  # 1/13
    assert script.verdict().verdict is Verdict.HEALTHY


def test_loss_counts_only_the_last_window_of_resolved_probes() -> None:
    health, script = fresh()
    script.ok(0.0625)
    script.lose()
    for _ in range(POLICY.loss_window_probes - 1):
        script.ok(0.0625)
    assert script.stats().loss_pct == 100 / POLICY.loss_window_probes
    script.ok(0.0625)  # the loss leaves the window
    assert script.stats().loss_pct == 0.0
    health.on_probe_sent(script.seq, now=script.t)  # outstanding: counts neither way
    assert health.stats(now=script.t).loss_pct == 0.0


def test_latency_threshold_and_recovery() -> None:
    health, script = fresh(SLOW)
    assert script.ok(0.5) == 500.0
    assert script.verdict() == PathVerdict(P, Verdict.IMPAIRED, R.LATENCY_ABOVE_THRESHOLD, 500.0, 400.0)
    script.ok(0.0625)  # srtt 500 + (62.5 - 500) / 8
    assert script.verdict() == PathVerdict(P, Verdict.IMPAIRED, R.LATENCY_ABOVE_THRESHOLD, 445.3125, 400.0)
    script.ok(0.0625)
    assert script.verdict() == PathVerdict(P, Verdict.IMPAIRED, R.LATENCY_ABOVE_THRESHOLD, 397.4609375, 320.0)
    script.ok(0.0625)
    assert script.verdict() == PathVerdict(P, Verdict.IMPAIRED, R.LATENCY_ABOVE_THRESHOLD, 355.5908203125, 320.0)
    script.ok(0.0625)
    assert script.verdict() == PathVerdict(P, Verdict.HEALTHY, R.WITHIN_THRESHOLDS)
    assert script.stats().srtt_ms == 318.9544677734375


def test_jitter_threshold() -> None:
    health, script = fresh(SLOW)
    rtts = [0.0625, 0.5] * 3
    expected_jitter = 0.0
    for i, rtt in enumerate(rtts):
        script.ok(rtt)
        if i:
            expected_jitter += (437.5 - expected_jitter) * JITTER_GAIN
    stats = script.stats()
    assert stats.jitter_ms is not None and stats.srtt_ms is not None
    assert stats.jitter_ms == pytest.approx(expected_jitter)
    assert stats.jitter_ms > 100.0
    assert stats.srtt_ms < 320.0
    assert script.verdict() == PathVerdict(
        P, Verdict.IMPAIRED, R.JITTER_ABOVE_THRESHOLD, stats.jitter_ms, POLICY.jitter_threshold_ms
    )


def test_jitter_just_under_threshold_is_healthy() -> None:
    health, script = fresh(SLOW)
    for rtt in [0.0625, 0.5] * 2 + [0.0625]:  # four differences of 437.5 ms
        script.ok(rtt)
    assert script.stats().jitter_ms == pytest.approx(437.5 * (1 - (1 - JITTER_GAIN) ** 4))
    assert script.verdict().verdict is Verdict.HEALTHY


def test_srtt_and_jitter_estimators() -> None:
    health, script = fresh(SLOW)
    script.ok(0.125)
    script.ok(0.25)
    stats = script.stats()
    assert stats.srtt_ms == 125.0 + (250.0 - 125.0) * SRTT_GAIN
    assert stats.jitter_ms == 125.0 * JITTER_GAIN
    assert stats.rtt_history_ms == (125.0, 250.0)


@pytest.mark.parametrize(
    "changes, lose, expected",
    [
        # loss beats latency beats jitter
        ({"latency_threshold_ms": 50.0, "jitter_threshold_ms": 1.0}, True, R.LOSS_ABOVE_THRESHOLD),
        ({"latency_threshold_ms": 50.0, "jitter_threshold_ms": 1.0}, False, R.LATENCY_ABOVE_THRESHOLD),
        ({"jitter_threshold_ms": 1.0}, False, R.JITTER_ABOVE_THRESHOLD),
        ({}, False, R.WITHIN_THRESHOLDS),
    ],
)
def test_impairment_precedence(changes: dict[str, Any], lose: bool, expected: R) -> None:
    health, script = fresh(attrs.evolve(POLICY, **changes))
    script.ok(0.0625)
    script.ok(0.03125)  # srtt 58.59375 ms, jitter 1.953125 ms
    if lose:
        script.lose()  # 1 of 3 lost
    assert script.verdict().reason is expected


# -- acks that must not count -----------------------------------------------------------------


def test_duplicate_ack_counts_once() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    assert health.on_probe_acked(0, now=0.125) == 125.0
    assert health.on_probe_acked(0, now=0.130) is None
    stats = health.stats(now=0.130)
    assert (stats.probes_acked, stats.ignored_acks, stats.rtt_history_ms) == (1, 1, (125.0,))
    assert stats.last_delivery == 0.125


@pytest.mark.parametrize("seq", [1, 99, -1])
def test_unknown_seq_is_ignored(seq: int) -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    assert health.on_probe_acked(seq, now=0.1) is None
    stats = health.stats(now=0.1)
    assert (stats.probes_acked, stats.ignored_acks, stats.last_delivery) == (0, 1, None)
    assert health.verdict(now=0.1).verdict is Verdict.UNKNOWN


def test_late_ack_refreshes_delivery_but_loss_stays() -> None:
    health, script = fresh()
    script.ok(0.0625)
    script.lose()  # probe 1, sent at 1.0, lost at 1.15
    assert health.on_probe_acked(1, now=1.5) is None
    stats = health.stats(now=1.5)
    assert stats.late_acks == 1
    assert stats.last_delivery == 1.5
    assert (stats.probes_lost, stats.consecutive_missed, stats.loss_pct) == (1, 1, 50.0)
    assert stats.rtt_history_ms == (62.5,)
    assert health.on_probe_acked(1, now=1.6) is None  # a second late copy is just ignored
    assert health.stats(now=1.6).ignored_acks == 1
    assert health.stats(now=1.6).last_delivery == 1.5


def test_late_acks_do_not_save_a_path_that_always_misses() -> None:
    health, script = fresh()
    for _ in range(3):
        seq = script.seq
        script.lose()
        health.on_probe_acked(seq, now=script.t - 0.5)
    assert script.verdict().reason is R.MISSED_PROBES


# -- bounded memory ---------------------------------------------------------------------------


def test_outstanding_probes_are_bounded() -> None:
    health, _ = fresh()
    bound = POLICY.loss_window_probes + POLICY.dead_after_missed_probes
    for seq in range(bound):
        health.on_probe_sent(seq, now=0.0)
    assert health.stats(now=0.0).probes_lost == 0
    health.on_probe_sent(bound, now=0.01)  # one too many: probe 0 is given up as lost
    stats = health.stats(now=0.01)
    assert (stats.probes_sent, stats.probes_lost, stats.consecutive_missed) == (bound + 1, 1, 1)
    assert health.next_deadline() == 0.150
    assert health.on_probe_acked(0, now=0.02) is None  # late now
    assert health.stats(now=0.02).late_acks == 1
    assert health.on_probe_acked(1, now=0.02) == pytest.approx(20.0)


def test_late_ack_memory_is_bounded() -> None:
    health, script = fresh()
    bound = POLICY.loss_window_probes + POLICY.dead_after_missed_probes
    for _ in range(bound + 1):
        script.lose()
    assert health.on_probe_acked(0, now=script.t) is None  # forgotten: ignored, not late
    assert health.stats(now=script.t).ignored_acks == 1
    assert health.on_probe_acked(1, now=script.t) is None
    assert health.stats(now=script.t).late_acks == 1


def test_rtt_history_is_bounded() -> None:
    health, script = fresh()
    for i in range(RTT_HISTORY_LEN + 5):
        script.ok(0.0625 if i % 2 else 0.125)
    history = script.stats().rtt_history_ms
    assert len(history) == RTT_HISTORY_LEN
    assert history[-1] == 125.0


# -- deadlines, time and input checks -----------------------------------------------------------


def test_next_deadline_is_the_oldest_probe_then_the_ttl() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    health.on_probe_sent(1, now=0.05)
    assert health.next_deadline() == 0.150
    health.expire(now=0.150)
    assert health.next_deadline() == 0.05 + TIMEOUT_S
    health.on_probe_acked(1, now=0.125)  # clamped to 0.150: time does not run backwards
    assert health.stats(now=0.150).rtt_history_ms == pytest.approx((150.0 - 50.0,))
    assert health.next_deadline() == math.nextafter(0.150 + TTL_S, math.inf)


def test_ack_expires_older_probes_first() -> None:
    one, _ = fresh()
    other, _ = fresh()
    for health in (one, other):
        health.on_probe_sent(0, now=0.0)
        health.on_probe_sent(1, now=0.05)
    other.expire(now=0.16)
    assert one.on_probe_acked(1, now=0.16) == other.on_probe_acked(1, now=0.16)
    assert one.stats(now=0.16) == other.stats(now=0.16)
    assert one.verdict(now=0.16) == PathVerdict(P, Verdict.IMPAIRED, R.LOSS_ABOVE_THRESHOLD, 50.0, 10.0)


def test_queries_do_not_commit() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    health.on_probe_acked(0, now=0.0625)
    assert health.verdict(now=100.0).reason is R.DELIVERY_TIMEOUT
    # An earlier query time is clamped to the last mutation (0.0625), not to 100.0.
    assert health.verdict(now=1.0).verdict is Verdict.HEALTHY
    assert "HEALTHY" in repr(health)


def test_verdict_projects_pending_expiry() -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    health.on_probe_sent(1, now=0.05)
    health.on_probe_sent(2, now=0.1)
    projected = health.verdict(now=0.25)
    stats = health.stats(now=0.25)
    assert projected == PathVerdict(P, Verdict.DEAD, R.MISSED_PROBES, 3.0, 3.0)
    assert (stats.probes_lost, stats.consecutive_missed, stats.loss_pct) == (3, 3, 100.0)
    health.expire(now=0.25)
    assert health.verdict(now=0.25) == projected
    assert health.stats(now=0.25) == stats


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_probe_seq_must_increase(bad: object) -> None:
    health, _ = fresh()
    health.on_probe_sent(0, now=0.0)
    with pytest.raises(ValueError, match="probe seq"):
        health.on_probe_sent(bad, now=0.01)  # type: ignore[arg-type]
    assert health.stats(now=0.01).probes_sent == 1
    assert health.next_deadline() == 0.150


def test_values_are_frozen() -> None:
    health, _ = fresh()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        health.verdict(now=0.0).verdict = Verdict.DEAD  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        health.stats(now=0.0).loss_pct = 1.0  # type: ignore[misc]
    assert [v.value for v in Verdict] == ["UNKNOWN", "HEALTHY", "IMPAIRED", "DEAD"]


# -- determinism: expire() first never changes an outcome ---------------------------------------

Op = tuple[str, float, int]
OPS = st.tuples(
    st.sampled_from(
        ["probe"] * 4 + ["send"] * 3 + ["ack"] * 3 + ["dup", "delivery", "data", "down", "up", "up", "expire"]
    ),
    st.sampled_from([0.0, 0.01, 0.01, 0.03, 0.05, 0.05, 0.1, 0.149, 0.15, 0.2, 0.5, 1.0, TTL_S, TTL_S + 1.0]),
    st.integers(0, 30),
)


@settings(max_examples=300)
@given(st.lists(OPS, max_size=100), st.sampled_from([POLICY, SLOW]))
def test_expire_first_changes_nothing(ops: list[Op], policy: Policy) -> None:
    """A hook at ``now`` gives the same result whether or not ``expire(now)`` ran first,
    and ``verdict(now)`` always equals what ``expire(now)`` then commits.

    ``eager`` is also asked before every hook at the very ``now`` the hook runs, and after each
    hook both twins' remembered projection (``PathHealth._project``'s memo) is compared with a
    fresh one."""
    plain = PathHealth(P, policy, now=0.0)
    eager = PathHealth(P, policy, now=0.0)
    now = 0.0
    seq = 0
    bound = policy.loss_window_probes + policy.dead_after_missed_probes
    for kind, step, pick in ops:
        now += step
        projected = eager.verdict(now=now)
        projected_stats = eager.stats(now=now)
        eager.expire(now=now)
        assert eager.verdict(now=now) == projected
        assert eager.stats(now=now) == projected_stats
        results: list[float | None] = []
        for health in (plain, eager):
            if kind == "send":
                health.on_probe_sent(seq, now=now)
            elif kind == "probe":  # sent, and acked ``2 * pick`` ms later (late when pick is large)
                health.on_probe_sent(seq, now=now)
                results.append(health.on_probe_acked(seq, now=now + pick * 0.02))
            elif kind in ("ack", "dup"):
                # "ack": mostly the newest probe (pick % 4 back); "dup": any number at all
                target = max(seq - 1 - pick % 4, 0) if kind == "ack" else pick
                results.append(health.on_probe_acked(target, now=now))
            elif kind == "delivery":
                health.on_delivery(now=now)
            elif kind == "data":
                health.on_data_sent(now=now)
            elif kind in ("down", "up"):
                health.on_link(kind == "up", now=now)
            else:
                health.expire(now=now)
        if kind == "probe":
            now += pick * 0.02
        if kind in ("send", "probe"):
            seq += 1
        assert results[:1] == results[1:]
        for health in (plain, eager):  # white box: whatever a query remembers is what it would compute
            assert health._project(now) == health._fresh_projection(max(now, health._now))
        assert plain.verdict(now=now) == eager.verdict(now=now)
        stats = plain.stats(now=now)
        assert stats == eager.stats(now=now)
        assert plain.healthy_since(now=now) == eager.healthy_since(now=now) == stats.healthy_since
        assert plain.next_deadline() == eager.next_deadline()
        # invariants
        verdict = plain.verdict(now=now)
        assert (stats.healthy_since is not None) == (verdict.verdict is Verdict.HEALTHY)
        assert 0.0 <= stats.loss_pct <= 100.0
        outstanding = stats.probes_sent - stats.probes_acked - stats.probes_lost
        assert 0 <= outstanding <= bound
        deadline = plain.next_deadline()
        assert deadline is None or deadline > now  # a timer armed there always makes progress


# -- adaptive probe timeout (probe_timeout_floor_ms) ------------------------------------------

ADAPTIVE = attrs.evolve(POLICY, probe_timeout_floor_ms=40)


def test_timeout_is_fixed_without_a_floor() -> None:
    h = PathHealth(P, POLICY, now=0.0)
    h.on_probe_sent(1, now=0.0)
    h.on_probe_acked(1, now=0.0078125)
    assert h.probe_timeout_s() == POLICY.probe_timeout_ms / 1000


def test_timeout_adapts_to_srtt_plus_four_jitter_within_bounds() -> None:
    policy = attrs.evolve(ADAPTIVE, probe_timeout_floor_ms=20)
    h = PathHealth(P, policy, now=0.0)
    assert h.probe_timeout_s() == policy.probe_timeout_ms / 1000  # no sample yet: the maximum
    h.on_probe_sent(1, now=0.0)
    h.on_probe_acked(1, now=0.0078125)
    assert h.probe_timeout_s() == 0.020  # srtt 7.8 ms and no jitter yet: the floor
    # Alternate 1/128 s and 1/64 s replies (each inside the timeout) and follow the estimators by hand.
    srtt, jitter, previous = 7.8125, 0.0, 7.8125
    for i in range(2, 18):
        rtt = 15.625 if i % 2 == 0 else 7.8125
        h.on_probe_sent(i, now=float(i))
        h.on_probe_acked(i, now=i + rtt / 1000)
        srtt += (rtt - srtt) / 8
        jitter += (abs(rtt - previous) - jitter) / 16
        previous = rtt
    assert srtt + 4 * jitter > 20  # in the adaptive range
    assert h.probe_timeout_s() == pytest.approx((srtt + 4 * jitter) / 1000)
    capped = PathHealth(P, attrs.evolve(policy, latency_threshold_ms=20.0, jitter_threshold_ms=20.0, probe_timeout_ms=25), now=0.0)
    for i in range(1, 18):
        rtt = 15.625 if i % 2 == 0 else 7.8125
        capped.on_probe_sent(i, now=float(i))
        capped.on_probe_acked(i, now=i + rtt / 1000)
    assert capped.probe_timeout_s() == 0.025  # never above probe_timeout_ms


def test_a_silent_fast_path_is_dead_sooner_with_a_floor() -> None:
    def dead_at(policy: Policy) -> float:
        h = PathHealth(P, policy, now=0.0)
        t, seq = 0.0, 0
        for _ in range(5):  # a healthy path answering in 1/128 s
            seq += 1
            h.on_probe_sent(seq, now=t)
            h.on_probe_acked(seq, now=t + 0.0078125)
            t += 0.0625
        while h.verdict(now=t).verdict is not Verdict.DEAD:  # then silence
            seq += 1
            h.on_probe_sent(seq, now=t)
            t = min(t + 0.0625, h.next_deadline() or math.inf)
            h.expire(now=t)
        return t

    assert dead_at(ADAPTIVE) < dead_at(POLICY)


def test_deadlines_never_decrease_when_the_timeout_shrinks() -> None:
    h = PathHealth(P, ADAPTIVE, now=0.0)
    h.on_probe_sent(1, now=0.0)
    h.on_probe_sent(2, now=0.01)  # no sample yet: deadline 0.01 + 0.15
    h.on_probe_acked(1, now=0.0078125)  # now the timeout is the 40 ms floor
    h.on_probe_sent(3, now=0.02)  # 0.02 + 0.04 = 0.06 < probe 2's 0.16: held at 0.16
    assert h.next_deadline() == 0.16
    h.expire(now=0.16)
    assert h.stats(now=0.16).probes_lost == 2  # 2 and 3 together, in order


def test_an_ack_resolves_older_unanswered_probes_as_lost_first() -> None:
    # Probes sent while the link was down must not time out after it is back and count as misses.
    h = PathHealth(P, POLICY, now=0.0)
    h.on_probe_sent(1, now=0.0)
    h.on_probe_acked(1, now=0.0078125)
    h.on_link(False, now=0.05)
    for seq, t in ((2, 0.0625), (3, 0.125), (4, 0.1875)):  # sent into a dead link
        h.on_probe_sent(seq, now=t)
    h.on_link(True, now=0.19)
    h.on_probe_sent(5, now=0.25)
    h.on_probe_acked(5, now=0.2578125)  # the link delivers again
    stats = h.stats(now=0.2578125)
    assert (stats.probes_lost, stats.consecutive_missed) == (3, 0)
    h.expire(now=1.0)  # nothing left to time out later
    assert h.stats(now=1.0).consecutive_missed == 0
    assert h.verdict(now=1.0).verdict is not Verdict.DEAD


# -- silence: data out, nothing back ------------------------------------------------------------


def test_unanswered_data_makes_a_path_silent_after_the_threshold_or_its_round_trip() -> None:
    h = PathHealth(P, SILENCE, now=0.0)
    assert h.silent_from() is None
    h.on_data_sent(now=0.5)  # no RTT sample yet: the full probe timeout is the path's round trip
    assert h.silent_from() == 0.5 + TIMEOUT_S
    h.on_probe_sent(1, now=0.5)
    assert h.on_probe_acked(1, now=0.5625) == 62.5  # answers end the silence
    assert h.silent_from() is None
    h.on_data_sent(now=1.0)
    h.on_data_sent(now=1.01)  # the first unanswered packet counts, not the last
    assert h.silence_probe_timeout_s() == 0.0625  # srtt 62.5 ms, no jitter yet, above the 20 ms floor
    assert h.silent_from() == 1.0625  # a path answering at its pace is not silent before its round trip
    h.on_delivery(now=1.05)
    assert h.silent_from() is None


def test_a_fast_path_is_silent_after_the_threshold_and_its_probes_are_unanswered_at_the_floor() -> None:
    h = PathHealth(P, SILENCE, now=0.0)
    h.on_probe_sent(1, now=0.0)
    h.on_probe_acked(1, now=0.0009765625)  # about 1 ms
    h.on_data_sent(now=1.0)
    assert h.silent_from() == 1.03
    h.on_probe_sent(2, now=1.01)  # before the silence: only the ordinary clock
    assert h.next_deadline() == 1.01 + TIMEOUT_S
    h.on_probe_sent(3, now=1.03)  # silent: a 20 ms clock for it, and for probe 2 still out
    assert h.next_deadline() == 1.03 + 0.020
    h.expire(now=1.05)
    stats = h.stats(now=1.05)
    assert (stats.consecutive_missed, stats.probes_lost, stats.loss_pct) == (0, 0, 0.0)  # unanswered is not lost
    assert h.verdict(now=1.05).verdict is Verdict.HEALTHY  # two of three
    h.on_probe_sent(4, now=1.05)
    h.expire(now=1.07)
    # The third unanswered probe: IMPAIRED (a quality switch keeps the binding), 70 ms after the data.
    assert h.verdict(now=1.07) == PathVerdict(P, Verdict.IMPAIRED, R.DATA_UNANSWERED, 3.0, 3.0)
    # A blackhole is still declared DEAD by the ordinary clock, as before.
    h.expire(now=1.01 + TIMEOUT_S)
    assert h.verdict(now=1.01 + TIMEOUT_S).verdict is Verdict.IMPAIRED
    h.expire(now=1.05 + TIMEOUT_S)
    assert h.verdict(now=1.05 + TIMEOUT_S).reason is R.MISSED_PROBES


def test_the_silence_alarm_is_the_first_silence_deadline_still_out_and_answers_are_remembered() -> None:
    h = PathHealth(P, SILENCE, now=0.0)
    h.on_probe_sent(1, now=0.0)
    h.on_probe_acked(1, now=0.0009765625)
    assert h.recent_answers() == ((0.0, 0.0009765625),)
    h.on_data_sent(now=1.0)
    h.on_probe_sent(2, now=1.01)  # before the silence: no silence clock, no alarm
    assert h.silence_alarm_at() is None
    h.on_probe_sent(3, now=1.03)  # silent: probes 2 and 3 on the 20 ms clock
    assert h.silence_alarm_at() == 1.03 + 0.020  # known ahead: the session schedules by it
    h.on_probe_sent(4, now=1.05)
    assert h.silence_alarm_at() == 1.03 + 0.020  # the earliest one still out
    h.on_probe_acked(3, now=1.06)  # answers 3, so 2 is lost: 4 is the only one still out
    assert h.silence_alarm_at() == 1.05 + 0.020  # 4's own silence deadline, set when it left
    assert h.recent_answers()[-1] == (1.03, 1.06)
    h.on_probe_acked(4, now=1.07)
    assert h.silence_alarm_at() is None
    for seq in range(5, 5 + SILENCE.loss_window_probes + 3):  # only the last loss window is kept
        h.on_probe_sent(seq, now=2.0 + seq / 100)
        h.on_probe_acked(seq, now=2.0 + seq / 100)
    assert len(h.recent_answers()) == SILENCE.loss_window_probes


def test_a_path_that_only_got_slower_is_impaired_by_silence_never_dead() -> None:
    h = PathHealth(P, SILENCE, now=0.0)
    h.on_probe_sent(1, now=0.0)
    h.on_probe_acked(1, now=0.0009765625)
    h.on_data_sent(now=1.0)  # from here every answer takes 125 ms: under the 150 ms probe timeout
    t = 1.03
    for seq in range(2, 5):
        h.on_probe_sent(seq, now=t)
        t = round(t + 0.02, 6)
    h.expire(now=t)
    assert h.verdict(now=t).reason is R.DATA_UNANSWERED
    for acked in range(2, 5):
        sent = 1.03 + (acked - 2) * 0.02
        assert h.on_probe_acked(acked, now=sent + 0.125) == pytest.approx(125.0)
    stats = h.stats(now=1.2)
    assert (stats.consecutive_missed, stats.probes_lost, stats.loss_pct) == (0, 0, 0.0)
    assert h.silent_from() is None and h.verdict(now=1.2).verdict is not Verdict.DEAD


def test_silence_decides_no_verdict_and_is_off_without_a_threshold() -> None:
    for policy in (SILENCE, POLICY):
        h = PathHealth(P, policy, now=0.0)
        h.on_probe_sent(1, now=0.0)
        h.on_probe_acked(1, now=0.0625)
        before = (h.verdict(now=0.1), h.stats(now=0.1))
        h.on_data_sent(now=0.1)
        assert (h.verdict(now=0.1), h.stats(now=0.1)) == before
    assert PathHealth(P, POLICY, now=0.0).silent_from() is None
    off = PathHealth(P, POLICY, now=0.0)
    off.on_data_sent(now=0.0)
    assert off.silent_from() is None


def test_a_late_ack_ends_the_silence() -> None:
    h = PathHealth(P, SILENCE, now=0.0)
    h.on_probe_sent(1, now=0.0)
    h.on_data_sent(now=0.0)
    h.expire(now=TIMEOUT_S)  # probe 1 lost
    assert h.silent_from() is not None
    h.on_probe_acked(1, now=TIMEOUT_S + 0.01)  # late: proves the path delivers
    assert h.silent_from() is None
