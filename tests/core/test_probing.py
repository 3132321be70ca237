"""Probing cadence per role: the core says when each path's next PROBE is due (docs/policy.md, "Probing").

Driven with the pair harness on exact times; the harness itself probes every path on its own
rhythm, so these tests read ``probe_due`` and ``probe_role`` after the inputs that set them.
"""

from __future__ import annotations

import math

import attrs
import pytest

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EventKind
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import ProbeRole
from jvpn_trio.core.states import ReasonCode as R
from jvpn_trio.core.states import SessionState as S
from tests.pair import Pair

P1, P2, P3 = PathId(1), PathId(2), PathId(3)
POLICY = Policy()


def sent(pair: Pair, path: PathId) -> float:
    """A probe leaves on ``path`` now; returns when the core wants the next one."""
    pair.seq += 1
    pair._client(ev.ProbeSent(path=path, seq=pair.seq))
    due = pair.client.probe_due(path)
    assert due is not None
    return due


def test_each_role_has_its_cadence_while_attached() -> None:
    pair = Pair.start(metered={3})
    pair.run(1.0)
    assert pair.client.record.state is S.ATTACHED and pair.client.record.binding is not None
    roles = {p: pair.client.probe_role(p, now=pair.now) for p in (P1, P2, P3)}
    assert roles == {P1: ProbeRole.ACTIVE, P2: ProbeRole.STANDBY, P3: ProbeRole.METERED}
    now = pair.now
    assert sent(pair, P1) == now + POLICY.probe_interval_ms / 1000
    assert sent(pair, P2) == now + POLICY.standby_probe_interval_ms / 1000
    assert sent(pair, P3) == now + POLICY.metered_probe_interval_ms / 1000


def test_a_path_not_probed_yet_is_due_at_once_and_an_unknown_one_never() -> None:
    pair = Pair.start(handshake=False)
    assert pair.client.probe_due(P2) == -math.inf
    assert pair.client.probe_due(PathId(9)) is None


def test_every_path_is_probed_at_the_active_cadence_once_the_session_is_not_attached() -> None:
    pair = Pair.start(metered={3})
    pair.run(1.0)
    for p in (P2, P3):
        sent(pair, p)
    pair.blackhole(1)
    while pair.client.record.state is S.ATTACHED:  # only p1 is probed, and it no longer answers
        pair.advance(POLICY.probe_interval_ms / 1000)
        pair.seq += 1
        pair._client(ev.ProbeSent(path=P1, seq=pair.seq))
    # The binding is failing: the standby paths are due at once (within one active interval of their last probe).
    assert pair.client.probe_role(P2, now=pair.now) is ProbeRole.ACTIVE and pair.client.probe_role(P3, now=pair.now) is ProbeRole.ACTIVE
    for p in (P2, P3):
        due = pair.client.probe_due(p)
        assert due is not None and due <= pair.now


def test_a_link_or_address_event_on_a_standby_path_makes_it_due_at_once() -> None:
    pair = Pair.start()
    pair.run(1.0)
    assert sent(pair, P2) > pair.now
    pair._client(ev.LinkChanged(path=P2, up=False))
    assert pair.client.probe_due(P2) > pair.now  # type: ignore[operator]  # down: nothing to learn yet
    pair._client(ev.LinkChanged(path=P2, up=True))
    assert pair.client.probe_due(P2) == -math.inf
    sent(pair, P2)
    pair._client(ev.PathReaddressed(path=P2))
    assert pair.client.probe_due(P2) == -math.inf


def test_an_impaired_standby_earns_healthy_back_at_the_active_cadence() -> None:
    pair = Pair.start()
    pair.run(1.0)
    for i in range(POLICY.loss_window_probes):  # p2 loses every other probe: IMPAIRED, never DEAD
        pair.advance(POLICY.probe_interval_ms / 1000)
        pair.probe_round_lossy([1, 3] if i % 2 else [1, 2, 3])
    assert pair.client.snapshot(now=pair.now).paths[1].verdict.verdict.value == "IMPAIRED"
    assert pair.client.probe_role(P2, now=pair.now) is ProbeRole.ACTIVE
    pair.run(3.0)  # acks again: HEALTHY, and back to the standby cadence
    assert pair.client.snapshot(now=pair.now).paths[1].verdict.verdict.value == "HEALTHY"
    assert pair.client.probe_role(P2, now=pair.now) is ProbeRole.STANDBY


def test_the_standby_cadence_never_lets_a_healthy_path_go_silent_for_a_ttl() -> None:
    policy = attrs.evolve(POLICY, transport_loss_ttl_ms=4_000, max_recovery_window_ms=1_000)
    pair = Pair.start(policy=policy, metered={3})
    pair.run(1.0)
    assert sent(pair, P3) - pair.now == 2.0  # metered 10 s, held to half the 4 s TTL


def test_a_path_that_becomes_metered_is_left_for_a_free_one_and_probed_as_metered() -> None:
    pair = Pair.start(policy=attrs.evolve(POLICY, return_dwell_ms=1_000, min_dwell_ms=0))
    pair.run(2.0)
    assert pair.client.record.binding is not None and pair.client.record.binding.path == P1
    pair._client(ev.PathCostChanged(path=P1, metered=True))  # NetworkManager: the Ethernet is a phone's tether
    pair.run(2.0)
    binding = pair.client.record.binding
    assert binding is not None and binding.path == P2
    switches = [e for e in pair.events("client") if e.kind.value == "TRANSPORT_SWITCH"]
    assert switches[-1].reason.value == "UNMETERED_AVAILABLE"
    assert pair.client.probe_role(P1, now=pair.now) is ProbeRole.METERED
    pair._client(ev.PathCostChanged(path=PathId(9), metered=True))
    assert pair.client.counters["unknown_path_inputs"] >= 1


# -- the bound path while the tunnel is idle ---------------------------------------------------------


def idle(pair: Pair) -> None:
    """Run past ``idle_after_ms`` with no data either way."""
    pair.run(POLICY.idle_after_ms / 1000 + 1.0)
    assert pair.client.record.state is S.ATTACHED


def test_a_fresh_binding_is_watched_at_the_active_cadence_until_the_tunnel_has_been_idle_a_while() -> None:
    pair = Pair.start()
    pair.run(1.0)
    assert pair.client.probe_role(P1, now=pair.now) is ProbeRole.ACTIVE
    idle(pair)
    assert pair.client.probe_role(P1, now=pair.now) is ProbeRole.IDLE
    now = pair.now
    assert sent(pair, P1) == now + POLICY.standby_probe_interval_ms / 1000


def test_traffic_either_way_brings_the_active_cadence_back_within_one_interval() -> None:
    for traffic in (ev.DataSent(path=P1), ev.DeliveryObserved(path=P1)):
        pair = Pair.start()
        idle(pair)
        last = pair.now
        sent(pair, P1)
        pair.advance(0.3)
        pair._client(traffic)
        assert pair.client.probe_role(P1, now=pair.now) is ProbeRole.ACTIVE
        assert pair.client.probe_due(P1) == last + POLICY.probe_interval_ms / 1000 < pair.now  # at once
        pair._client(ev.DeliveryObserved(path=P1))  # answered (data left unanswered is a silence: below)
        pair.advance(POLICY.idle_after_ms / 1000)  # the next quiet spell
        assert pair.client.probe_role(P1, now=pair.now) is ProbeRole.IDLE


def test_the_last_probe_before_the_tunnel_turns_idle_is_at_the_active_cadence() -> None:
    pair = Pair.start()
    idle(pair)
    pair._client(ev.DataSent(path=P1))
    pair._client(ev.DeliveryObserved(path=P1))  # answered: no silence
    busy_until = pair.now + POLICY.idle_after_ms / 1000
    pair.advance(POLICY.idle_after_ms / 1000 - 0.03)
    now = pair.now
    assert sent(pair, P1) == now + POLICY.standby_probe_interval_ms / 1000  # now + 50 ms is past busy_until
    assert now + POLICY.probe_interval_ms / 1000 >= busy_until


def test_an_idle_metered_binding_is_probed_at_the_metered_cadence() -> None:
    pair = Pair.start(metered={1, 2, 3})
    idle(pair)
    binding = pair.client.record.binding
    assert binding is not None
    assert pair.client.probe_role(binding.path, now=pair.now) is ProbeRole.IDLE
    now = pair.now
    assert sent(pair, binding.path) == now + POLICY.metered_probe_interval_ms / 1000


def test_data_on_an_idle_tunnel_is_no_evidence_of_health() -> None:
    pair = Pair.start()
    idle(pair)
    before = pair.client.snapshot(now=pair.now).paths[0].stats
    pair._client(ev.DataSent(path=P1))
    after = pair.client.snapshot(now=pair.now).paths[0].stats
    assert after == before
    pair._client(ev.DataSent(path=PathId(9)))
    assert pair.client.counters["unknown_path_inputs"] >= 1


# -- silence: data out, nothing back (docs/policy.md, "Silence") ---------------------------------------


def _attached() -> tuple[Pair, float]:
    """An attached pair whose active path has just been probed and acked, bound longer than the
    dwell (so a switch is allowed); returns that probe's time."""
    pair = Pair.start()
    pair.run(POLICY.min_dwell_ms / 1000 + 0.5)
    assert pair.client.record.binding is not None and pair.client.record.binding.path == P1
    pair.probe_round()
    return pair, pair.now


def test_data_left_unanswered_makes_the_bound_path_silent_and_probed_at_once() -> None:
    pair, last_probe = _attached()
    pair._client(ev.DataSent(path=P1))
    sent_at = pair.now
    silent_from = sent_at + POLICY.silence_probe_after_ms / 1000  # type: ignore[operator]
    # Before the silence threshold: the ordinary cadence, and the silence probe already scheduled.
    assert pair.client.probe_role(P1, now=sent_at) is ProbeRole.ACTIVE
    assert pair.client.probe_due(P1) == min(last_probe + POLICY.probe_interval_ms / 1000, silent_from)
    pair.advance(POLICY.silence_probe_after_ms / 1000)  # type: ignore[operator]
    assert pair.client.probe_role(P1, now=pair.now) is ProbeRole.SILENT
    # While silent, the next probe follows the last one by the silence-probe timeout (the floor on this
    # near-zero-RTT path), faster than the active cadence.
    nxt = sent(pair, P1)
    assert nxt == pair.now + POLICY.silence_probe_timeout_floor_ms / 1000 < pair.now + POLICY.probe_interval_ms / 1000
    # A standby path never turns silent: data only leaves on the bound one.
    assert pair.client.probe_role(P2, now=pair.now) is ProbeRole.STANDBY


def test_an_answer_ends_the_silence() -> None:
    pair, _ = _attached()
    pair._client(ev.DataSent(path=P1))
    pair.advance(POLICY.silence_probe_after_ms / 1000)  # type: ignore[operator]
    assert pair.client.probe_role(P1, now=pair.now) is ProbeRole.SILENT
    pair._client(ev.DeliveryObserved(path=P1))
    assert pair.client.probe_role(P1, now=pair.now) is ProbeRole.ACTIVE
    now = pair.now
    assert sent(pair, P1) == now + POLICY.probe_interval_ms / 1000


def _silent_p1(pair: Pair, *, p2_answers: bool) -> tuple[float, dict[PathId, list[int]]]:
    """P1 goes dark under data; its silence probes go out when due, and P2's whenever the core wants
    one (answered at once if ``p2_answers``), until P1's verdict.  Returns when the data left and the
    probe numbers sent on each path meanwhile."""
    pair.blackhole(1)
    pair._client(ev.DataSent(path=P1))
    start = pair.now
    out: dict[PathId, list[int]] = {P1: [], P2: []}
    for _ in range(100):
        binding = pair.client.record.binding
        if pair.client.record.state is not S.ATTACHED or binding is None or binding.path != P1:
            break
        dues = {p: pair.client.probe_due(p) for p in out}
        nxt = min(d for d in dues.values() if d is not None)
        pair.advance(max(nxt - pair.now, 0.0))
        for p in out:
            due = pair.client.probe_due(p)
            if due is not None and due <= pair.now:
                sent(pair, p)
                out[p].append(pair.seq)
                if p == P2 and p2_answers:
                    pair.ack_probes(pair.seq, [2])
    else:
        raise AssertionError("P1 never got its verdict")
    return start, out


def test_a_silent_path_is_left_after_the_unanswered_silence_probes_not_after_the_full_timeouts() -> None:
    pair, _ = _attached()
    start, out = _silent_p1(pair, p2_answers=True)
    floor_s = POLICY.silence_probe_timeout_floor_ms / 1000
    assert len(out[P2]) == 1, "the standby path is asked once, at the silence alarm, not at every silence probe"
    verdicts = [e for e in pair.events() if e.kind is EventKind.PATH_HEALTH and e.detail("path") == str(P1)
                and e.t >= start and e.detail("verdict") != "HEALTHY"]
    assert verdicts and verdicts[0].reason is R.DATA_UNANSWERED and verdicts[0].detail("verdict") == "IMPAIRED"
    # The silence threshold, then one floor per unanswered probe: under a third of the default's
    # worst case (three intervals and the full probe timeout).
    expected = start + POLICY.silence_probe_after_ms / 1000 + POLICY.dead_after_missed_probes * floor_s  # type: ignore[operator]
    assert verdicts[0].t <= expected + 1e-9
    assert expected - start < POLICY.death_detection_bound_ms / 1000 / 3
    # The session leaves for the healthy standby at once, for that reason: the standby answered at the
    # alarm, a silence timeout before the verdict, so its word is in by then.
    switches = [e for e in pair.events() if e.kind is EventKind.TRANSPORT_SWITCH and e.t >= start]
    assert switches and switches[0].reason is R.DATA_UNANSWERED and switches[0].detail("to_path") == str(P2)
    assert switches[0].t <= expected + 1e-9, "the second opinion costs the switch no time on a fast path"


def test_the_other_paths_are_asked_once_at_the_silence_alarm_before_the_verdict() -> None:
    """The second opinion leaves when the first probes count as unanswered, a silence timeout before
    the verdict, so a standby path's round trip is over by the time the session wants to move."""
    pair, _ = _attached()
    pair.blackhole(1)
    pair._client(ev.DataSent(path=P1))
    pair.advance(POLICY.silence_probe_after_ms / 1000)  # type: ignore[operator]
    standby_due = pair.client.probe_due(P2)
    sent(pair, P1)  # the first silence probe: it, and the probe still out, are on the silence clock
    alarm = pair.now + POLICY.silence_probe_timeout_floor_ms / 1000
    assert standby_due is not None and standby_due > alarm
    assert pair.client.probe_due(P2) == alarm
    assert pair.client.probe_due(P3) == alarm
    pair.set_link(3, up=False)  # a dead path could not be the target: it is not asked
    assert pair.client.probe_due(P3) > alarm  # type: ignore[operator]
    pair.advance(alarm - pair.now)
    assert pair.client.record.state is S.ATTACHED  # no verdict yet: two unanswered of three
    assert sent(pair, P2) > pair.now + POLICY.probe_interval_ms / 1000, "asked once, then back to its cadence"


def _gateway_wakes(pair: Pair, out: dict[PathId, list[int]], first: PathId, gap_s: float) -> None:
    """The frozen gateway answers every probe it owes: on ``first`` at once, on the other path
    ``gap_s`` later (the paths' round trips differ)."""
    pair.blackhole(1, on=False)
    second = P2 if first == P1 else P1
    for seq in out[first]:
        pair.ack_probes(seq, [first.value])
    pair.advance(gap_s)
    for seq in out[second]:
        pair.ack_probes(seq, [second.value])


def _switches_since(pair: Pair, start: float) -> list[tuple[R, str | None]]:
    return [(e.reason, e.detail("to_path")) for e in pair.events() if e.kind is EventKind.TRANSPORT_SWITCH and e.t >= start]


def test_silence_on_every_path_at_once_is_not_a_reason_to_switch() -> None:
    """A gateway that freezes for a moment (a busy host, a VM paused) silences every path alike: the
    standby path asked at the alarm does not answer either, so the session stays on its path, and its
    late answers bring the path back without a switch or a spent rate budget."""
    pair, _ = _attached()
    start, out = _silent_p1(pair, p2_answers=False)
    assert pair.client.record.state is S.VOLATILE  # the silence is reported, not hidden
    assert pair.client.pending is None, "no REATTACH towards a path that has not answered since the alarm"
    pair.advance(0.05)  # frozen a while longer; every path is probed at the active cadence meanwhile
    _gateway_wakes(pair, out, first=P1, gap_s=0.002)
    assert _switches_since(pair, start) == []
    assert pair.client.record.state is S.ATTACHED and pair.client.record.binding is not None
    assert pair.client.record.binding.path == P1


def test_a_gateway_that_wakes_answers_the_faster_standby_first_and_still_no_switch() -> None:
    """The standby's late answers come first (its round trip is shorter); some were sent just before
    the gateway woke, so they are not even late.  The bound path's answers follow within its silence
    timeout, before the standby's word is in, and the session stays."""
    pair, _ = _attached()
    start, out = _silent_p1(pair, p2_answers=False)
    pair.advance(0.05)
    sent(pair, P2)  # a probe the frozen gateway receives just before it wakes
    out[P2].append(pair.seq)
    _gateway_wakes(pair, out, first=P2, gap_s=POLICY.silence_probe_timeout_floor_ms / 1000 / 2)
    assert _switches_since(pair, start) == []
    assert pair.client.record.state is S.ATTACHED


def test_a_path_that_stays_silent_after_the_standby_answered_is_left_when_the_word_is_in() -> None:
    pair, _ = _attached()
    start, out = _silent_p1(pair, p2_answers=False)
    pair.advance(0.01)
    sent(pair, P2)
    pair.ack_probes(pair.seq, [2])  # the standby answers; P1 stays dark
    answered = pair.now
    assert _switches_since(pair, start) == []  # not yet: P1 gets a silence timeout to answer too
    pair.advance(POLICY.silence_probe_timeout_floor_ms / 1000)  # the core's own timer decides then
    assert _switches_since(pair, start) == [(R.DATA_UNANSWERED, str(P2))]
    switch = [e for e in pair.events() if e.kind is EventKind.TRANSPORT_SWITCH][-1]
    assert switch.t == pytest.approx(answered + POLICY.silence_probe_timeout_floor_ms / 1000)


def test_without_the_second_opinion_a_silent_path_is_left_for_any_healthy_one_at_once() -> None:
    policy = attrs.evolve(POLICY, silence_second_opinion=False)
    pair = Pair.start(policy=policy)
    pair.run(policy.min_dwell_ms / 1000 + 0.5)
    pair.probe_round()
    start, _out = _silent_p1(pair, p2_answers=False)  # the standby answers nothing since the alarm
    assert _switches_since(pair, start) == [(R.DATA_UNANSWERED, str(P2))]


def test_a_probe_outstanding_when_the_path_turns_silent_goes_on_the_silence_clock() -> None:
    pair, _ = _attached()
    pair.blackhole(1)
    first = sent(pair, P1)  # an ordinary probe: 200 ms to answer
    assert first > pair.now
    pair._client(ev.DataSent(path=P1))
    pair.advance(POLICY.silence_probe_after_ms / 1000)  # type: ignore[operator]
    sent(pair, P1)  # the first silence probe
    pair.advance(POLICY.silence_probe_timeout_floor_ms / 1000)
    health = pair.client._paths[P1].health
    assert health._unanswered(pair.now, 0) == 2  # both, long before the ordinary 200 ms
    assert pair.client.snapshot(now=pair.now).paths[0].stats.consecutive_missed == 0  # and neither lost yet


def test_without_silence_probing_unanswered_data_changes_nothing() -> None:
    off = attrs.evolve(POLICY, silence_probe_after_ms=None)
    pair = Pair.start(policy=off)
    pair.run(1.0)
    pair.probe_round()
    last = pair.now
    pair._client(ev.DataSent(path=P1))
    pair.advance(1.0)
    assert pair.client.probe_role(P1, now=pair.now) is ProbeRole.ACTIVE
    assert pair.client.probe_due(P1) == last + off.probe_interval_ms / 1000
