"""The switch decision: one pure function from what we know to what to do.

Theory of operation
-------------------
The client machine calls :func:`decide` after every input, with a frozen
:class:`SwitchView` of the session and one :class:`Candidate` per known
path.  The answer is STAY, SWITCH to a path, or DEGRADE, always with a
reason code.  Transitions that follow from the *active* path's own verdict
(DEAD -> RECOVERING, IMPAIRED -> VOLATILE) are taken by the machine before it
asks; this function only chooses where to go next.

Ranking (documented order, ties impossible): HEALTHY before IMPAIRED, then
unmetered before metered, then lower ``priority`` (the configured or
route-metric order: Ethernet, Wi-Fi, LTE by default), then lower path id.
UNKNOWN and DEAD paths are never chosen.  So a metered path is chosen only
when no unmetered path is HEALTHY.  RTT is deliberately not a ranking key: a noisy float would make the
choice flip between two equally good paths.

Hysteresis, so that a flapping link cannot make the session flap:
- leaving an IMPAIRED active path needs a HEALTHY target (not merely a less
  bad one) and ``min_dwell_ms`` on the current binding;
- leaving it for DATA_UNANSWERED also needs a second opinion
  (``silence_second_opinion``): the target must have answered a probe sent at
  or after the active path's silence alarm, and the active path must have had
  its silence-probe timeout since that answer to be answered too
  (:func:`second_opinion_at`; the session probes every other path at the
  alarm).  A gateway that stalls silences every path alike, and a switch then
  would only spend the rate budget;
- returning to a preferred path needs it HEALTHY for ``return_dwell_ms``;
- the health verdicts themselves have hysteresis (``health.py``).

Cost: a session on a metered path leaves it for an unmetered path as soon as
one has been HEALTHY for ``return_dwell_ms`` (UNMETERED_AVAILABLE), whatever
their priorities; a session on an unmetered path does not go back to a
preferred path that is metered (it stays: METERED_AVOIDED).  An operator's
pin overrides cost.

Rebinding: when the gateway's PROBE_ACKs on the active path say, several
times in a row, that the probe did not come from its bound endpoint (a NAT
rebinding, or a binding it released after silence), the answer is a SWITCH
to the *same* path with reason ENDPOINT_CHANGED: a REATTACH that moves the
gateway's binding to the endpoint it now sees.

Rate (Property 6): a switch is allowed only while fewer than
``max_switches_per_minute`` switches happened in the last minute.  A needed
switch (the active path is dead or impaired) that the rate forbids answers
DEGRADE; an optional one (a preferred path came back) just waits.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

from jvpn_trio.core.health import Verdict
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode, SessionState


@attrs.frozen(kw_only=True)
class Candidate:
    path: PathId
    priority: int
    verdict: Verdict
    reason: ReasonCode
    healthy_since: float | None
    metered: bool = False
    #: PathHealth.recent_answers: (sent, answered) of the probes answered in time lately.
    answers: tuple[tuple[float, float], ...] = ()
    #: PathHealth.silence_alarm_at: when its first probe still out counts as unanswered.
    silence_alarm_at: float | None = None
    #: PathHealth.silence_probe_timeout_s: how long it takes to answer at its usual pace.
    silence_probe_timeout_s: float = 0.0


@attrs.frozen(kw_only=True)
class SwitchView:
    state: SessionState
    active: PathId | None
    bound_since: float | None
    pinned: PathId | None
    reattach_in_flight: bool
    rate_has_room: bool
    recovery_cause: ReasonCode | None
    binding_disowned: bool = False  # the gateway says our active path's endpoint is not its binding


class DecisionKind(enum.Enum):
    STAY = "STAY"
    SWITCH = "SWITCH"
    DEGRADE = "DEGRADE"


@attrs.frozen
class Decision:
    kind: DecisionKind
    reason: ReasonCode
    target: PathId | None = None


def rank(c: Candidate) -> tuple[int, bool, int, int]:
    """Sort key: verdict, then cost, then priority, then path id (see module docstring)."""
    return (0 if c.verdict is Verdict.HEALTHY else 1, c.metered, c.priority, c.path.value)


def second_opinion_at(answers: Iterable[tuple[float, float]], alarm: float, timeout_s: float) -> float | None:
    """When another path's word on a silent path is in: the silent path's silence-probe timeout
    (``timeout_s``) after the other path answered a probe sent at or after its silence ``alarm``
    (``answers``: that path's ``(sent, answered)``, oldest first).  None: no such answer yet.

    The answer shows the gateway alive since the alarm.  A gateway that froze for a moment answers
    the probes it owes on every path when it wakes, the older ones (the silent path's) first, so a
    path whose only fault was the gateway is answered again within that timeout; a path still
    silent then is the one at fault."""
    return next((at + timeout_s for sent, at in answers if sent >= alarm), None)


def answered_during_silence(target: Candidate, active: Candidate, *, now: float) -> bool:
    """Whether ``target``'s second opinion on ``active``'s silence is in by ``now``
    (:func:`second_opinion_at`); True when ``active`` has no silence alarm."""
    if active.silence_alarm_at is None:
        return True
    at = second_opinion_at(target.answers, active.silence_alarm_at, active.silence_probe_timeout_s)
    return at is not None and now >= at


def _stay(reason: ReasonCode) -> Decision:
    return Decision(DecisionKind.STAY, reason)


def _needed_switch(view: SwitchView, target: PathId, cause: ReasonCode) -> Decision:
    if view.rate_has_room:
        return Decision(DecisionKind.SWITCH, cause, target)
    if view.state is SessionState.DEGRADED:
        return _stay(ReasonCode.RATE_LIMITED)
    return Decision(DecisionKind.DEGRADE, ReasonCode.SWITCH_RATE_EXCEEDED, target)


def decide(view: SwitchView, candidates: tuple[Candidate, ...], policy: Policy, *, now: float) -> Decision:
    """Choose stay / switch / degrade for the session described by ``view``."""
    if view.state in (SessionState.TERMINATED, SessionState.BIRTH):
        return _stay(ReasonCode.NO_CANDIDATE)
    if view.reattach_in_flight:
        return _stay(ReasonCode.REATTACH_IN_FLIGHT)
    by_path = {c.path: c for c in candidates}
    usable = sorted(
        (c for c in candidates if c.verdict in (Verdict.HEALTHY, Verdict.IMPAIRED) and c.path != view.active),
        key=rank,
    )
    pinned = by_path.get(view.pinned) if view.pinned is not None else None
    pinned_usable = pinned is not None and pinned in usable

    if view.active is None:
        if not usable:
            return _stay(ReasonCode.NO_CANDIDATE)
        target = pinned.path if pinned_usable and pinned is not None else usable[0].path
        return _needed_switch(view, target, view.recovery_cause or ReasonCode.LINK_DOWN)

    if view.binding_disowned:
        # The gateway answers our probes but no longer knows this endpoint as its binding (a NAT
        # rebinding, or it released a silent binding): our data is being dropped.  Reattach on
        # the same path, explicitly, before anything else.
        return _needed_switch(view, view.active, ReasonCode.ENDPOINT_CHANGED)
    if pinned is not None and pinned.path == view.active:
        return _stay(ReasonCode.PINNED)
    if pinned_usable and pinned is not None:
        if view.rate_has_room:
            return Decision(DecisionKind.SWITCH, ReasonCode.OPERATOR_PIN, pinned.path)
        return _stay(ReasonCode.RATE_LIMITED)

    active = by_path.get(view.active)
    if active is None or active.verdict in (Verdict.UNKNOWN, Verdict.DEAD):
        # UNKNOWN: just bound, not yet measured.  DEAD is handled by the machine
        # (it releases the binding first), so it cannot be seen here.
        return _stay(ReasonCode.NO_SAMPLES)
    dwell_met = view.bound_since is None or now >= view.bound_since + policy.min_dwell_ms / 1000.0

    if active.verdict is Verdict.IMPAIRED:
        healthy = [c for c in usable if c.verdict is Verdict.HEALTHY]
        if active.reason is ReasonCode.DATA_UNANSWERED and policy.silence_second_opinion:
            healthy = [c for c in healthy if answered_during_silence(c, active, now=now)]
        if not healthy:
            return _stay(ReasonCode.NO_BETTER_PATH)
        if not dwell_met:
            return _stay(ReasonCode.DWELL_NOT_MET)
        return _needed_switch(view, healthy[0].path, active.reason)

    settled = [
        c
        for c in usable
        if c.verdict is Verdict.HEALTHY
        and c.healthy_since is not None
        and now >= c.healthy_since + policy.return_dwell_ms / 1000.0
    ]
    if active.metered and any(not c.metered for c in settled):
        preferred, cause = [c for c in settled if not c.metered], ReasonCode.UNMETERED_AVAILABLE
    else:
        better = [c for c in settled if c.priority < active.priority]
        preferred = [c for c in better if c.metered <= active.metered]  # never onto a metered path from a free one
        cause = ReasonCode.PREFERRED_PATH_RESTORED
        if better and not preferred:
            return _stay(ReasonCode.METERED_AVOIDED)
    if not preferred:
        return _stay(ReasonCode.ACTIVE_PATH_HEALTHY)
    if not dwell_met:
        return _stay(ReasonCode.DWELL_NOT_MET)
    if not view.rate_has_room:
        return _stay(ReasonCode.RATE_LIMITED)
    return Decision(DecisionKind.SWITCH, cause, preferred[0].path)
