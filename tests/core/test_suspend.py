"""A laptop suspend, in the core: the client's clock stops (CLOCK_MONOTONIC) or keeps counting (CLOCK_BOOTTIME).

docs/spec.md, "Freshness across a suspend".  A client and a gateway core are
wired back to back (``tests.pair``) with one difference: the client's clock
may lag the gateway's.  While the client is suspended its timers do not fire
and it sends nothing; the gateway's timers run.  On resume a client on the
monotonic clock lags by the whole suspend; one on the boottime clock (what
``jvpn-trio up`` runs on, ``drivers/clock.py``) does not.  The Wi-Fi (p1) is
gone after the resume; the runtime then does what it does on ``Resumed``:
fire the session timer, report the link, probe every path at once.

Determinism: exact virtual times, no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import attrs
import pytest

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import Action, EmitEvent, EventKind, SendPathResponse, SendReattach
from jvpn_trio.core.ids import Binding, PathId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode as R
from jvpn_trio.core.states import SessionState as S
from tests.pair import Pair, client_endpoint, gateway_endpoint

#: The laptop bounds this scenario exercises, pinned: 50 ms probes, a 30 s loss TTL, a 5 s
#: freshness window and a 250 ms back-off after a rejected REATTACH.
POLICY = Policy(
    max_recovery_window_ms=3_000,
    max_switches_per_minute=6,
    transport_loss_ttl_ms=30_000,
    probe_interval_ms=50,
    probe_timeout_ms=200,
    dead_after_missed_probes=3,
    min_dwell_ms=2_000,
    return_dwell_ms=5_000,
    reattach_timeout_ms=250,
    freshness_window_ms=5_000,
)
TTL_S = POLICY.transport_loss_ttl_ms / 1000.0
#: The client suspends at this (gateway) time, after two seconds attached on p1.
SUSPEND_AT = 2.0
P1, P2 = PathId(1), PathId(2)

Clock = Literal["monotonic", "boottime"]


@attrs.define
class SuspendPair(Pair):
    """A :class:`Pair` whose client clock reads ``lag`` seconds behind the gateway's (``now``).

    ``gateway_forgets``: once the gateway's session has ended, the gateway
    discards everything for it unanswered, as the gateway runtime does after
    reaping it; otherwise the ended machine still answers (SESSION_TERMINATED).
    """

    lag: float = 0.0
    gateway_forgets: bool = False

    def client_now(self) -> float:
        return round(self.now - self.lag, 9)

    def _client(self, event: ev.ClientInput, *, at: float | None = None) -> list[Action]:
        actions = self.client.handle(event, now=self.client_now() if at is None else at)
        self.client_log += actions
        for action in actions:
            if isinstance(action, SendReattach):
                self._deliver_reattach(action)
            elif isinstance(action, SendPathResponse):
                self._deliver_path_response(action)
        return actions

    def _deliver_reattach(self, send: SendReattach) -> None:
        if not (self.gateway_forgets and self.gateway.terminated):
            super()._deliver_reattach(send)

    def ack_probes(self, seq: int, acked: Iterable[int] | None = None) -> None:
        if not (self.gateway_forgets and self.gateway.terminated):
            super().ack_probes(seq, acked)

    def advance(self, seconds: float, *, max_repeats: int = 100, client_awake: bool = True) -> None:
        """Fire every due timer up to ``now + seconds``; the client's deadlines are on its own clock."""
        target = round(self.now + seconds, 9)
        for _ in range(1_000_000):
            client_due = self.client.next_deadline() if client_awake else None
            gateway_due = self.gateway.next_deadline()
            due = [d for d in (None if client_due is None else client_due + self.lag, gateway_due) if d is not None]
            if not due or min(due) > target:
                self.now = target
                return
            self.now = max(self.now, min(due))
            if client_due is not None and client_due <= self.client_now() + 1e-9:
                # The driver's rule: now = max(deadline, clock).
                self._client(ev.TimerFired(), at=max(client_due, self.client_now()))
            gateway_due = self.gateway.next_deadline()
            if gateway_due is not None and gateway_due <= self.now:
                self._gateway(ev.TimerFired())
        raise AssertionError("timers fired a million times without reaching the target")

    def suspend(self, seconds: float, *, clock: Clock) -> None:
        """The client sleeps ``seconds``: its timers stop, the gateway's run; then it resumes.

        On resume the runtime fires the client's timer at once: on the boottime
        clock everything that came due while it slept is handled now.
        """
        self.advance(seconds, client_awake=False)
        if clock == "monotonic":
            self.lag = round(self.lag + seconds, 9)
        self._client(ev.TimerFired())

    def events_of(self, side: str, kind: EventKind, reason: R | None = None) -> list[EmitEvent]:
        return [e for e in self.events(side) if e.kind is kind and (reason is None or e.reason is reason)]

    def ended(self, side: str) -> tuple[float, R] | None:
        """When (on that side's clock) and why the session ended, if it did."""
        for e in self.events_of(side, EventKind.STATE_CHANGE):
            if dict(e.details).get("to_state") == S.TERMINATED.value:
                return e.t, e.reason
        return None


def start() -> SuspendPair:
    pair = SuspendPair.start(policy=POLICY)
    assert isinstance(pair, SuspendPair)
    return pair


def suspended(seconds: float, clock: Clock, *, gateway_forgets: bool = False) -> SuspendPair:
    """Attached on p1 for 2 s, suspended ``seconds``; on resume p1 (the old Wi-Fi) is gone.

    Returns at the resume instant, after the runtime's response to ``Resumed``:
    the session timer, the link report, one probe round on every path.
    """
    pair = start()
    pair.gateway_forgets = gateway_forgets
    pair.run(SUSPEND_AT)
    pair.links[P1].up = False  # the Wi-Fi changed while the lid was closed
    pair.suspend(seconds, clock=clock)
    pair.set_link(1, up=False)
    pair.probe_round()
    return pair


def stale_timestamps(pair: SuspendPair) -> list[EmitEvent]:
    return pair.events_of("gateway", EventKind.SECURITY_EVENT, R.STALE_TIMESTAMP)


# -- the problem: the client's clock stopped, the gateway's did not --------------------------------------


def test_a_6s_suspend_on_the_monotonic_clock_is_a_storm_of_stale_timestamps_then_both_sides_end() -> None:
    pair = suspended(6.0, "monotonic")
    resume = SUSPEND_AT + 6.0
    pair.run(TTL_S * 2)
    storm = stale_timestamps(pair)
    # Every REATTACH is 6 s behind the gateway's session clock (window 5 s), and the client,
    # rejected, retries every reattach_timeout_ms for the whole loss TTL: 30 s / 250 ms.
    assert "timestamp off by -6000 ms" in str(dict(storm[0].details)["why"])
    assert len(storm) == 120
    assert pair.ended("client") == (resume - 6.0 + TTL_S, R.TRANSPORT_LOSS_TTL_EXPIRED)
    # The gateway never heard an acceptable packet after the suspend began: silence, then the TTL.
    assert pair.ended("gateway") == (SUSPEND_AT + 2 * TTL_S, R.TRANSPORT_LOSS_TTL_EXPIRED)


def test_a_45s_suspend_on_the_monotonic_clock_storms_until_the_gateway_gives_up() -> None:
    pair = suspended(45.0, "monotonic")
    pair.run(TTL_S * 2)
    # The gateway released the silent binding at 32 s and ends the session at 62 s; until
    # then (15 s after the resume) it rejects every REATTACH as stale, then answers SESSION_TERMINATED.
    assert len(stale_timestamps(pair)) == 60
    assert pair.ended("gateway") == (SUSPEND_AT + 2 * TTL_S, R.TRANSPORT_LOSS_TTL_EXPIRED)
    ended_at, reason = pair.ended("client") or (None, None)
    assert reason is R.PEER_CLOSE and ended_at == SUSPEND_AT + 2 * TTL_S - 45.0  # the client's clock lags 45 s


def test_a_30min_suspend_on_the_monotonic_clock_ends_30s_after_the_resume() -> None:
    # The gateway ended the session at 62 s and forgot it: later probes and REATTACHes go
    # unanswered, so the client sees only silence and waits out its own loss TTL.
    pair = suspended(1_800.0, "monotonic", gateway_forgets=True)
    pair.run(TTL_S + 5.0)
    assert stale_timestamps(pair) == []
    assert pair.ended("client") == (SUSPEND_AT + TTL_S, R.TRANSPORT_LOSS_TTL_EXPIRED)  # resume + 30 s


# -- the fix: both session clocks count the suspend --------------------------------------------------------


@pytest.mark.parametrize("seconds", [6.0, 45.0])
def test_on_the_boottime_clock_the_session_reattaches_on_the_new_path_without_a_stale_timestamp(
    seconds: float,
) -> None:
    pair = suspended(seconds, "boottime")
    resume = SUSPEND_AT + seconds
    pair.run(TTL_S * 2)
    assert stale_timestamps(pair) == []
    assert pair.ended("client") is None and pair.ended("gateway") is None
    assert pair.client.record.state is S.ATTACHED
    assert pair.client.record.binding == Binding(path=P2, endpoint=gateway_endpoint(P2))
    assert pair.gateway.record.binding == Binding(path=P2, endpoint=client_endpoint(P2))
    # Reattached at the resume instant: no timeout had to pass first.
    switch = pair.events_of("client", EventKind.TRANSPORT_SWITCH)[-1]
    assert switch.t == resume and dict(switch.details)["to_path"] == "p2"


def test_after_45s_the_resume_probe_round_revives_the_paths_and_resynchronises_the_version() -> None:
    # 45 s without a delivery is past the TTL: on the resume's timer every path is DEAD
    # (DELIVERY_TIMEOUT) and there is nowhere to reattach.  The probe round the runtime sends on
    # Resumed brings p2 back and tells the client the gateway's new version (it released the
    # silent p1 at 32 s): the REATTACH that follows, in the same instant, is accepted first time.
    pair = start()
    pair.run(SUSPEND_AT)
    pair.links[P1].up = False
    pair.suspend(45.0, clock="boottime")
    pair.set_link(1, up=False)
    assert pair.client.record.state is S.RECOVERING and pair.client.pending is None
    assert pair.gateway.record.state is S.DEGRADED and pair.gateway.record.binding is None
    pair.probe_round()
    assert pair.client.record.state is S.ATTACHED and pair.gateway.record.state is S.ATTACHED
    assert pair.events_of("client", EventKind.REATTACH_REJECTED) == []
    assert pair.events_of("gateway", EventKind.SECURITY_EVENT) == []


def test_a_deadline_that_came_due_during_the_suspend_ends_the_session_at_the_resume() -> None:
    # Already unbound when the lid closed (every path dark): the loss TTL ran out while the
    # client slept.  On the boottime clock the session ends on the resume's timer, so a new
    # handshake can follow at once; on the monotonic clock only when the deadline comes round on
    # the stopped clock, 29.35 s after the resume.
    clocks: tuple[Clock, ...] = ("boottime", "monotonic")
    for clock in clocks:
        pair = start()
        pair.run(SUSPEND_AT)
        for path in pair.links:
            pair.blackhole(path.value)
        pair.run(1.0)  # missed probes: dead, RECOVERING, unbound from about 2.3 s
        assert pair.client.record.binding is None
        unbound_deadline = pair.client.unbound_deadline()
        assert unbound_deadline is not None
        pair.suspend(45.0, clock=clock)
        resume_client_clock = pair.client_now()
        pair.advance(TTL_S)
        ended = pair.ended("client")
        assert ended is not None and ended[1] is R.TRANSPORT_LOSS_TTL_EXPIRED
        assert ended[0] == (resume_client_clock if clock == "boottime" else unbound_deadline)
        assert round(ended[0] - resume_client_clock, 9) == (0.0 if clock == "boottime" else 29.35)


def test_a_30min_suspend_on_the_boottime_clock_ends_at_once_when_the_gateway_says_so() -> None:
    # A gateway that still answers for the ended session: the first REATTACH after the resume
    # is refused SESSION_TERMINATED, and the client's session ends in the resume's probe round.
    pair = suspended(1_800.0, "boottime")
    assert pair.ended("client") == (SUSPEND_AT + 1_800.0, R.PEER_CLOSE)
    assert stale_timestamps(pair) == []


def test_a_30min_suspend_past_the_gateways_tolerance_is_closed_at_the_resume_by_the_runtime() -> None:
    # A gateway that forgot the session answers nothing; the core alone cannot tell that from
    # loss and would wait out its TTL.  The suspend (30 min) exceeds what the gateway keeps of a
    # silent session (one TTL bound, one unbound), so on Resumed the runtime handshakes at once
    # (core/agent.py, Succession.resumed) and closes the old session when that is answered:
    # here at the resume instant, as if the answer took no time.
    alone = suspended(1_800.0, "boottime", gateway_forgets=True)
    alone.run(TTL_S + 5.0)
    resume = SUSPEND_AT + 1_800.0
    assert alone.ended("client") == (resume + TTL_S, R.TRANSPORT_LOSS_TTL_EXPIRED)

    assert 1_800.0 >= 2 * TTL_S
    pair = suspended(1_800.0, "boottime", gateway_forgets=True)
    pair.close("client")
    assert pair.ended("client") == (resume, R.LOCAL_CLOSE)
    assert stale_timestamps(pair) == [] and stale_timestamps(alone) == []
