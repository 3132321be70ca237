"""Auditing event logs: does what a client or gateway logged prove that the invariants held?

    python -m jvpn_trio.tools.audit client-events.jsonl [gateway-events.jsonl ...] [--policy FILE] [--json]

Theory of operation
-------------------
An event log (``docs/events.md``) is what an operator keeps of a session.  Spec section 12 says
every transition must be auditable; this module is that audit.  It reads the log line by line
(streaming, bounded memory: one small record per session and the last minute of switches) and
re-derives each session's record -- state, ``state_version``, the single active binding and the
times the bounds need -- from its ``STATE_CHANGE`` lines, using **the** transition table
(``core/states.py``) the machines use.  Every line is then checked against that derived record.
The auditor never trusts a line to describe itself: a ``STATE_CHANGE`` must *follow* from the
previous one, by a row of the table.

Checks, each reported as a :class:`Violation` under its name:

``parse``        every line is a JSON object that ``EmitEvent.from_dict`` accepts.
``reason``       every event, and above all every transition, carries a ReasonCode (spec 4).
``role``         one role per log.
``clock``        ``t`` never decreases (drivers feed the core a monotonic ``now``).
``session_id``   a client's SessionID never changes mid-session (Property 1): a new ID is only
                 legitimate as a new session (``SESSION_CREATED``, version 0) after the
                 previous one TERMINATED; on a gateway, each ID is its own session, and every
                 line of a session follows that session's creation.
``version``      ``STATE_CHANGE`` versions are 0, 1, 2, ... with no gap; every other event
                 carries the current version (Property 8).
``transition``   ``(from_state, reason)`` is a row of the table, ``to_state`` is the row's,
                 ``from_state`` is the state the log was in; nothing transitions after
                 TERMINATED (spec 4, Property 3).
``binding``      one active binding at every point (Property 2): the binding changes only by a
                 BIND row (which replaces the old binding in the same step) or a RELEASE row;
                 the table's binding guard holds; a TERMINATED session is unbound.
``switch``       every ``REATTACH_CONFIRMED`` transition is announced by a ``TRANSPORT_SWITCH``
                 right after it, with the same version, moving from the previous binding's
                 path to the new one; no switch without that transition (spec 7, Property 5).
``recovery``     bounded recovery (Property 4, spec 11): no line of a session is stamped at or
                 after ``recovering_since + max_recovery_window_ms`` while it is RECOVERING, or
                 at or after ``unbound_since + transport_loss_ttl_ms`` while it is unbound and
                 alive -- the core enforces both bounds before anything else at every ``now``,
                 so such a line proves the bound was not enforced.  The transition that
                 enforces a bound may itself come late by the driver's timer latency; more
                 than ``timer_slack_s`` late is a violation too.
``switch_rate``  at most ``max_switches_per_minute`` switches in any 60 s window; a denied
                 switch (``SWITCH_DENIED``, or a ``RATE_LIMITED`` rejection) leaves the session
                 DEGRADED (Property 6).
``termination``  TERMINATED only with a reason in ``TERMINATION_REASONS`` (Property 10).
``policy``       every event names the audited policy's fingerprint (the bounds checked above
                 are that policy's).

A log written under attack needs no special case: the summary lines of the sink's limiter
(``core/loglimit.py``, docs/events.md "Bounded logging of attacks") are ordinary
``SECURITY_EVENT``s at the session's current version, with non-decreasing ``t``.

What a log cannot show is left alone: whether the gateway really held one binding between two
log lines is the core's business (``tests/properties``); the audit proves the record the log
describes was a legal one.  A log that simply ends while a session is alive is not a violation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from typing import Any, Iterable, Sequence

import attrs

from jvpn_trio.core.actions import FIXED_FIELDS, EmitEvent, EventKind, Role
from jvpn_trio.core.policy import SWITCH_RATE_WINDOW_S, Policy
from jvpn_trio.core.states import (
    TERMINATION_REASONS,
    TRANSITIONS,
    BindingEffect,
    Guard,
    ReasonCode,
    SessionState,
)

S = SessionState
R = ReasonCode

#: How late the transition that enforces a time bound may be stamped after the bound (the
#: driver fires its timer at ``max(deadline, clock)``; Trio's timer latency is milliseconds,
#: a starved process can be later).
DEFAULT_TIMER_SLACK_S = 0.25
#: A log with more violations than this keeps counting but stores no more of them.
MAX_VIOLATIONS = 1000

CHECKS = (
    "parse",
    "reason",
    "role",
    "clock",
    "session_id",
    "version",
    "transition",
    "binding",
    "switch",
    "recovery",
    "switch_rate",
    "termination",
    "policy",
)

#: Reasons that mean a switch was refused for the rate (Property 6).
_RATE_DENIALS = (R.SWITCH_RATE_EXCEEDED, R.RATE_LIMITED)


@attrs.frozen(kw_only=True)
class Violation:
    """One broken rule: which check, where (1-based line of the log), and why."""

    check: str
    line: int
    message: str
    session: str | None = None
    role: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def __str__(self) -> str:
        where = f"line {self.line}"
        if self.session:
            where += f" session {self.session[:8]}"
        return f"{where}: [{self.check}] {self.message}"


@attrs.frozen(kw_only=True)
class SessionSummary:
    """What the log says one session did."""

    session: str
    role: str | None
    first_t: float
    last_t: float
    final_state: str
    final_binding: str | None
    transitions: int
    switches: int
    max_recovering_s: float
    max_unbound_s: float
    termination: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            **attrs.asdict(self),
            "first_t": round(self.first_t, 6),
            "last_t": round(self.last_t, 6),
            "max_recovering_s": round(self.max_recovering_s, 6),
            "max_unbound_s": round(self.max_unbound_s, 6),
        }


@attrs.frozen(kw_only=True)
class AuditReport:
    """The outcome for one log.  ``ok`` iff no violation was found."""

    role: str | None
    lines: int
    events: int
    policy_fingerprint: str
    sessions: tuple[SessionSummary, ...]
    violations: tuple[Violation, ...]
    violation_count: int

    @property
    def ok(self) -> bool:
        return self.violation_count == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "role": self.role,
            "lines": self.lines,
            "events": self.events,
            "policy": self.policy_fingerprint,
            "sessions": [s.to_json() for s in self.sessions],
            "violation_count": self.violation_count,
            "violations": [v.to_json() for v in self.violations],
        }


def _path_of(binding: object) -> str | None:
    """``"p2@10.99.0.1:51820"`` -> ``"p2"``; None for no binding."""
    if binding is None:
        return None
    return str(binding).split("@", 1)[0]


@attrs.define
class _Track:
    """The record of one session as the log so far describes it."""

    session: str
    first_t: float
    state: SessionState = S.BIRTH
    version: int = 0
    binding: str | None = None
    last_path: str | None = None
    unbound_since: float | None = None
    recovering_since: float | None = None
    switch_times: deque[float] = attrs.Factory(deque)
    #: ("switch", version, binding, previous_path) after REATTACH_CONFIRMED; ("degraded",) after a denial.
    expect: tuple[Any, ...] | None = None
    expect_line: int = 0
    last_t: float = 0.0
    transitions: int = 0
    switches: int = 0
    max_recovering_s: float = 0.0
    max_unbound_s: float = 0.0
    termination: str | None = None
    flagged_recovery: bool = False
    flagged_unbound: bool = False

    @property
    def terminated(self) -> bool:
        return self.state is S.TERMINATED


class EventLogAuditor:
    """Streaming auditor of one event log; :meth:`feed` each line, then :meth:`finish`.

    ``role`` (``"client"``/``"gateway"``), if given, is what every line must say; otherwise the
    first line decides.  ``policy`` supplies the bounds (and the fingerprint every line must
    carry).  Raises nothing on bad input: everything wrong is a violation.
    """

    def __init__(self, *, policy: Policy, role: str | None = None, timer_slack_s: float = DEFAULT_TIMER_SLACK_S) -> None:
        if role is not None and role not in (r.value for r in Role):
            raise ValueError(f"role must be 'client' or 'gateway', got {role!r}")
        self.policy = policy
        self.role = role
        self.timer_slack_s = timer_slack_s
        self._recovery_s = policy.max_recovery_window_ms / 1000.0
        self._ttl_s = policy.transport_loss_ttl_ms / 1000.0
        self._sessions: dict[str, _Track] = {}
        self._current_client: _Track | None = None
        self._violations: list[Violation] = []
        self._violation_count = 0
        self._lines = 0
        self._events = 0
        self._last_t = -math.inf
        self._policy_flagged = False

    # -- reporting -----------------------------------------------------------------
    def _violate(self, check: str, line: int, message: str, session: str | None = None) -> None:
        self._violation_count += 1
        if len(self._violations) < MAX_VIOLATIONS:
            self._violations.append(Violation(check=check, line=line, message=message, session=session, role=self.role))

    # -- input ---------------------------------------------------------------------
    def feed_line(self, line_no: int, text: str) -> None:
        """Audit one raw log line (blank lines are skipped)."""
        self._lines = max(self._lines, line_no)
        if not text.strip():
            return
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            self._violate("parse", line_no, f"not a JSON object ({type(exc).__name__})")
            return
        if not isinstance(data, dict):
            self._violate("parse", line_no, "not a JSON object")
            return
        self.feed_mapping(line_no, data)

    def feed_mapping(self, line_no: int, data: dict[str, Any]) -> None:
        """Audit one decoded log line."""
        self._lines = max(self._lines, line_no)
        session = data.get("session") if isinstance(data.get("session"), str) else None
        if data.get("reason") in (None, ""):
            what = f"{data.get('kind', 'an event')} -> {data.get('to_state')}" if data.get("to_state") else data.get("kind", "an event")
            label = "termination" if data.get("to_state") == S.TERMINATED.value else "reason"
            self._violate(label, line_no, f"{what} carries no reason code", session)
            return
        missing = sorted(FIXED_FIELDS - set(data))
        if missing:
            self._violate("parse", line_no, f"event lacks {', '.join(missing)}", session)
            return
        try:
            event = EmitEvent.from_dict(data)
        except ValueError as exc:
            self._violate("parse", line_no, f"not a valid event: {exc}", session)
            return
        self.feed_event(line_no, event)

    def feed_event(self, line_no: int, event: EmitEvent) -> None:
        """Audit one event (the checks that need no JSON)."""
        self._lines = max(self._lines, line_no)
        self._events += 1
        role = event.role.value
        if self.role is None:
            self.role = role
        elif role != self.role:
            self._violate("role", line_no, f"a {role} line in a {self.role} log", event.session)
        if not math.isfinite(event.t):
            self._violate("clock", line_no, f"t is not finite ({event.t})", event.session)
            return
        if event.t < self._last_t:
            self._violate("clock", line_no, f"t went backwards ({event.t} after {self._last_t})", event.session)
        self._last_t = max(self._last_t, event.t)
        if event.policy != self.policy.fingerprint and not self._policy_flagged:
            self._policy_flagged = True
            self._violate(
                "policy",
                line_no,
                f"events carry policy {event.policy}, audited against {self.policy.fingerprint} "
                "(the bounds checked are the audited policy's)",
                event.session,
            )
        track = self._track_for(line_no, event)
        if track is None:
            return
        self._check_bounds(line_no, track, event)
        self._check_expectation(line_no, track, event)
        if event.kind is EventKind.STATE_CHANGE:
            self._on_state_change(line_no, track, event)
        elif event.kind is EventKind.TRANSPORT_SWITCH:
            self._on_switch(line_no, track, event)
        else:
            self._on_other(line_no, track, event)
        track.last_t = event.t

    # -- sessions ------------------------------------------------------------------
    def _is_creation(self, event: EmitEvent) -> bool:
        return (
            event.kind is EventKind.STATE_CHANGE
            and event.reason is R.SESSION_CREATED
            and event.version == 0
            and event.detail("from_state") is None
            and event.detail("to_state") == S.BIRTH.value
        )

    def _track_for(self, line_no: int, event: EmitEvent) -> _Track | None:
        sid = event.session
        track = self._sessions.get(sid)
        creation = self._is_creation(event)
        if creation:
            if track is not None:
                self._violate("session_id", line_no, f"session {sid[:8]} created twice", sid)
            current = self._current_client
            if self.role == Role.CLIENT.value and current is not None and not current.terminated:
                self._violate(
                    "termination",
                    line_no,
                    f"session {current.session[:8]} ended without TERMINATED (last seen in {current.state.value}) "
                    f"and a new session {sid[:8]} began: silence is forbidden (spec 11)",
                    current.session,
                )
            track = _Track(session=sid, first_t=event.t, unbound_since=event.t, last_t=event.t)
            self._sessions[sid] = track
            if self.role == Role.CLIENT.value:
                self._current_client = track
            return track
        if track is None:
            current = self._current_client
            if self.role == Role.CLIENT.value and current is not None:
                self._violate(
                    "session_id",
                    line_no,
                    f"SessionID changed from {current.session[:8]} to {sid[:8]} without a new session "
                    "(Property 1: the identity anchor never changes)",
                    sid,
                )
            else:
                self._violate(
                    "version",
                    line_no,
                    f"first line of session {sid[:8]} is {event.kind.value} v{event.version}, not its creation "
                    "(SESSION_CREATED, version 0): the log does not show the session from its birth",
                    sid,
                )
            # Follow it from here anyway, so one missing line does not drown the rest.
            track = _Track(session=sid, first_t=event.t, version=event.version, last_t=event.t)
            to_state = event.detail("to_state")
            if isinstance(to_state, str) and to_state in SessionState.__members__:
                track.state = SessionState(to_state)
            binding = event.detail("binding")
            track.binding = str(binding) if binding is not None else None
            track.unbound_since = None if track.binding else event.t
            self._sessions[sid] = track
            if self.role == Role.CLIENT.value:
                self._current_client = track
            return None
        if self.role == Role.CLIENT.value and self._current_client is not track:
            self._violate(
                "session_id",
                line_no,
                f"a line of the earlier session {sid[:8]} after session "
                f"{self._current_client.session[:8] if self._current_client else '?'} began",
                sid,
            )
        return track

    # -- the bounds (Property 4, spec 11) ---------------------------------------------
    def _check_bounds(self, line_no: int, track: _Track, event: EmitEvent) -> None:
        if track.terminated:
            return
        enforcing = event.kind is EventKind.STATE_CHANGE
        reason = event.reason
        t = event.t
        if track.state is S.RECOVERING and track.recovering_since is not None and not track.flagged_recovery:
            deadline = track.recovering_since + self._recovery_s
            if t >= deadline:
                leaves = enforcing and (reason is R.RECOVERY_WINDOW_EXCEEDED or reason in TERMINATION_REASONS)
                if not leaves:
                    track.flagged_recovery = True
                    self._violate(
                        "recovery",
                        line_no,
                        f"still RECOVERING at t={t:.3f}, {t - track.recovering_since:.3f} s after it began "
                        f"(max_recovery_window_ms {self.policy.max_recovery_window_ms}): the bound was not enforced",
                        track.session,
                    )
                elif t - deadline > self.timer_slack_s:
                    track.flagged_recovery = True
                    self._violate(
                        "recovery",
                        line_no,
                        f"RECOVERING lasted {t - track.recovering_since:.3f} s: the bound "
                        f"({self.policy.max_recovery_window_ms} ms) was enforced {t - deadline:.3f} s late",
                        track.session,
                    )
        if track.binding is None and track.unbound_since is not None and not track.flagged_unbound:
            deadline = track.unbound_since + self._ttl_s
            if t >= deadline:
                ends = enforcing and reason in TERMINATION_REASONS
                if not ends:
                    track.flagged_unbound = True
                    self._violate(
                        "recovery",
                        line_no,
                        f"unbound and alive at t={t:.3f}, {t - track.unbound_since:.3f} s after the binding was lost "
                        f"(transport_loss_ttl_ms {self.policy.transport_loss_ttl_ms}): Property 4 demands TERMINATED",
                        track.session,
                    )
                elif t - deadline > self.timer_slack_s:
                    track.flagged_unbound = True
                    self._violate(
                        "recovery",
                        line_no,
                        f"unbound for {t - track.unbound_since:.3f} s: termination came {t - deadline:.3f} s "
                        f"after transport_loss_ttl_ms ({self.policy.transport_loss_ttl_ms})",
                        track.session,
                    )

    # -- what a previous line promised -------------------------------------------------
    def _check_expectation(self, line_no: int, track: _Track, event: EmitEvent) -> None:
        expect = track.expect
        if expect is None:
            return
        track.expect = None
        if expect[0] == "switch":
            _, version, binding, previous = expect
            if event.kind is not EventKind.TRANSPORT_SWITCH:
                self._violate(
                    "switch",
                    track.expect_line,
                    f"REATTACH_CONFIRMED to {binding} (v{version}) is not followed by its TRANSPORT_SWITCH "
                    f"(next line of the session is {event.kind.value}, line {line_no})",
                    track.session,
                )
                return
            self._check_switch_event(line_no, track, event, version, binding, previous)
            track.expect = ("switched",)  # consumed: _on_switch must not complain
        elif expect[0] == "degraded":
            degraded = event.kind is EventKind.STATE_CHANGE and event.detail("to_state") == S.DEGRADED.value
            if not degraded:
                self._violate(
                    "switch_rate",
                    track.expect_line,
                    f"a switch was denied for the rate but the session did not become DEGRADED "
                    f"(next line of the session is {event.kind.value} {event.reason.value}, line {line_no}; Property 6)",
                    track.session,
                )

    def _check_switch_event(
        self, line_no: int, track: _Track, event: EmitEvent, version: int, binding: str, previous: str | None
    ) -> None:
        if event.version != version:
            self._violate(
                "switch",
                line_no,
                f"TRANSPORT_SWITCH carries v{event.version}, its transition was v{version} (Property 5: no reset)",
                track.session,
            )
        to_path, from_path = event.detail("to_path"), event.detail("from_path")
        if to_path != _path_of(binding) or (event.detail("binding") not in (None, binding)):
            self._violate(
                "binding",
                line_no,
                f"TRANSPORT_SWITCH to {to_path} ({event.detail('binding')}) but the transition bound {binding}",
                track.session,
            )
        if previous is not None and from_path != previous:
            self._violate(
                "binding",
                line_no,
                f"TRANSPORT_SWITCH from {from_path} but the binding before it was on {previous}: "
                f"{previous} was never released, two bindings (Property 2)",
                track.session,
            )
        self._count_switch(line_no, track, event.t)

    def _count_switch(self, line_no: int, track: _Track, t: float) -> None:
        track.switches += 1
        track.switch_times.append(t)
        while track.switch_times and not t < track.switch_times[0] + SWITCH_RATE_WINDOW_S:
            track.switch_times.popleft()
        if len(track.switch_times) > self.policy.max_switches_per_minute:
            self._violate(
                "switch_rate",
                line_no,
                f"{len(track.switch_times)} switches within {SWITCH_RATE_WINDOW_S:g} s "
                f"(max_switches_per_minute {self.policy.max_switches_per_minute}; Property 6)",
                track.session,
            )

    # -- per kind ------------------------------------------------------------------
    def _on_state_change(self, line_no: int, track: _Track, event: EmitEvent) -> None:
        sid = track.session
        if self._is_creation(event):
            track.transitions += 1
            return
        if event.reason is R.SESSION_CREATED:
            self._violate("transition", line_no, "SESSION_CREATED in the middle of a session", sid)
            return
        from_name, to_name = event.detail("from_state"), event.detail("to_state")
        if track.terminated:
            self._violate(
                "transition", line_no, f"{from_name} -> {to_name} ({event.reason.value}) after TERMINATED", sid
            )
            return
        if event.version != track.version + 1:
            self._violate(
                "version",
                line_no,
                f"STATE_CHANGE v{event.version} after v{track.version}: versions must be consecutive (Property 8)",
                sid,
            )
        if not (isinstance(from_name, str) and from_name in SessionState.__members__):
            self._violate("transition", line_no, f"from_state {from_name!r} is not a state", sid)
            return
        if not (isinstance(to_name, str) and to_name in SessionState.__members__):
            self._violate("transition", line_no, f"to_state {to_name!r} is not a state", sid)
            return
        from_state, to_state = SessionState(from_name), SessionState(to_name)
        if from_state is not track.state:
            self._violate(
                "transition",
                line_no,
                f"transition from {from_name}, but the session was {track.state.value}: a transition is missing",
                sid,
            )
        if to_state is S.TERMINATED and event.reason not in TERMINATION_REASONS:
            self._violate(
                "termination",
                line_no,
                f"TERMINATED for {event.reason.value}, which is not a termination reason (Property 10)",
                sid,
            )
        rule = TRANSITIONS.get((from_state, event.reason))
        new_binding_raw = event.detail("binding")
        new_binding = str(new_binding_raw) if new_binding_raw is not None else None
        if rule is None:
            self._violate(
                "transition",
                line_no,
                f"{from_name} -> {to_name} on {event.reason.value} is not in the transition table",
                sid,
            )
        else:
            if rule.to is not to_state:
                self._violate(
                    "transition",
                    line_no,
                    f"{from_name} on {event.reason.value} goes to {rule.to.value} by the table, the log says {to_name}",
                    sid,
                )
            self._check_binding_rule(line_no, track, event, rule.effect, rule.guard, new_binding)
        previous_path = _path_of(track.binding) or track.last_path
        # Commit what the log says, so one bad line yields one violation, not a cascade.
        if track.binding is not None:
            track.last_path = _path_of(track.binding)
        was_bound = track.binding is not None
        track.binding = new_binding
        track.state = to_state
        track.version = event.version
        track.transitions += 1
        if new_binding is None and was_bound:
            track.unbound_since = event.t
            track.flagged_unbound = False
        elif new_binding is not None and track.unbound_since is not None:
            track.max_unbound_s = max(track.max_unbound_s, event.t - track.unbound_since)
            track.unbound_since = None
        if to_state is S.RECOVERING:
            if from_state is not S.RECOVERING or track.recovering_since is None:
                track.recovering_since = event.t
                track.flagged_recovery = False
        elif track.recovering_since is not None:
            track.max_recovering_s = max(track.max_recovering_s, event.t - track.recovering_since)
            track.recovering_since = None
        if to_state is S.TERMINATED:
            track.termination = event.reason.value
            if track.unbound_since is not None:
                track.max_unbound_s = max(track.max_unbound_s, event.t - track.unbound_since)
            if new_binding is not None:
                self._violate("binding", line_no, f"TERMINATED but still bound to {new_binding}", sid)
        if event.reason is R.REATTACH_CONFIRMED:
            track.expect = ("switch", event.version, new_binding, previous_path)
            track.expect_line = line_no

    def _check_binding_rule(
        self,
        line_no: int,
        track: _Track,
        event: EmitEvent,
        effect: BindingEffect,
        guard: Guard,
        new_binding: str | None,
    ) -> None:
        sid = track.session
        old = track.binding
        if guard is Guard.BOUND and old is None:
            self._violate("binding", line_no, f"{event.reason.value} needs an active binding, the session had none", sid)
        if guard is Guard.UNBOUND and old is not None:
            self._violate("binding", line_no, f"{event.reason.value} needs the session unbound, it was bound to {old}", sid)
        if effect is BindingEffect.KEEP and new_binding != old:
            self._violate(
                "binding",
                line_no,
                f"{event.reason.value} keeps the binding, but it changed from {old} to {new_binding}"
                + (f": {old} was never released, two bindings (Property 2)" if old and new_binding else ""),
                sid,
            )
        elif effect is BindingEffect.RELEASE and new_binding is not None:
            self._violate("binding", line_no, f"{event.reason.value} releases the binding, but {new_binding} is still bound", sid)
        elif effect is BindingEffect.BIND and new_binding is None:
            self._violate("binding", line_no, f"{event.reason.value} binds, but no binding is named", sid)

    def _on_switch(self, line_no: int, track: _Track, event: EmitEvent) -> None:
        if track.expect == ("switched",):
            track.expect = None
            return
        self._violate(
            "switch",
            line_no,
            f"TRANSPORT_SWITCH {event.detail('from_path')} -> {event.detail('to_path')} without a REATTACH_CONFIRMED "
            "transition right before it: the binding moved without a transition",
            track.session,
        )
        if event.version != track.version:
            self._violate(
                "version", line_no, f"TRANSPORT_SWITCH carries v{event.version}, the session is at v{track.version}", track.session
            )
        self._count_switch(line_no, track, event.t)

    def _on_other(self, line_no: int, track: _Track, event: EmitEvent) -> None:
        if event.version != track.version:
            self._violate(
                "version",
                line_no,
                f"{event.kind.value} carries v{event.version}, the session is at v{track.version} (Property 8)",
                track.session,
            )
        denied = event.kind is EventKind.SWITCH_DENIED or (
            event.kind is EventKind.REATTACH_REJECTED and event.reason is R.RATE_LIMITED
        )
        if denied and not track.terminated and track.state is not S.DEGRADED:
            track.expect = ("degraded",)
            track.expect_line = line_no
        if event.kind is EventKind.SWITCH_DENIED and event.reason not in _RATE_DENIALS:
            self._violate(
                "switch_rate", line_no, f"SWITCH_DENIED for {event.reason.value}, not for the switch rate", track.session
            )

    # -- the end -------------------------------------------------------------------
    def finish(self) -> AuditReport:
        """Close the audit: pending promises at the end of the log, and the summaries."""
        end = self._last_t
        for track in self._sessions.values():
            if track.expect is not None and track.expect[0] in ("switch", "degraded") and track.expect_line:
                # The log ends right after the line that promised more: it may simply have been cut.
                track.expect = None
            if not track.terminated and math.isfinite(end):
                fake = EmitEvent(
                    kind=EventKind.PATH_HEALTH,
                    t=end,
                    role=Role(self.role) if self.role else Role.CLIENT,
                    session=track.session,
                    version=track.version,
                    reason=R.WITHIN_THRESHOLDS,
                    policy=self.policy.fingerprint,
                )
                self._check_bounds(self._lines, track, fake)
        summaries = tuple(
            SessionSummary(
                session=t.session,
                role=self.role,
                first_t=t.first_t,
                last_t=t.last_t,
                final_state=t.state.value,
                final_binding=t.binding,
                transitions=t.transitions,
                switches=t.switches,
                max_recovering_s=max(
                    t.max_recovering_s, (t.last_t - t.recovering_since) if t.recovering_since is not None else 0.0
                ),
                max_unbound_s=max(
                    t.max_unbound_s,
                    (t.last_t - t.unbound_since) if t.unbound_since is not None and not t.terminated else 0.0,
                ),
                termination=t.termination,
            )
            for t in self._sessions.values()
        )
        return AuditReport(
            role=self.role,
            lines=self._lines,
            events=self._events,
            policy_fingerprint=self.policy.fingerprint,
            sessions=summaries,
            violations=tuple(self._violations),
            violation_count=self._violation_count,
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def audit_lines(
    lines: Iterable[str],
    *,
    policy: Policy,
    role: str | None = None,
    timer_slack_s: float = DEFAULT_TIMER_SLACK_S,
) -> AuditReport:
    """Audit an event log given as lines of text (line numbers start at 1)."""
    auditor = EventLogAuditor(policy=policy, role=role, timer_slack_s=timer_slack_s)
    for number, line in enumerate(lines, start=1):
        auditor.feed_line(number, line)
    return auditor.finish()


def audit_events(
    events: Iterable[EmitEvent],
    *,
    policy: Policy,
    role: str | None = None,
    timer_slack_s: float = DEFAULT_TIMER_SLACK_S,
) -> AuditReport:
    """Audit events already decoded (e.g. a Pair's log); "line" numbers count events from 1."""
    return audit_lines((e.to_json_line() for e in events), policy=policy, role=role, timer_slack_s=timer_slack_s)


def audit_file(path: str, *, policy: Policy, role: str | None = None) -> AuditReport:
    """Audit an event log file (read line by line; OSError if it cannot be read)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return audit_lines(f, policy=policy, role=role)


def render_text(name: str, report: AuditReport) -> str:
    """A few lines for a person: the verdict, each session, each violation."""
    verdict = "ok" if report.ok else f"{report.violation_count} violation(s)"
    out = [f"{name}: {report.role or '?'} log, {report.events} events, policy {report.policy_fingerprint}: {verdict}"]
    for s in report.sessions:
        end = f"TERMINATED ({s.termination})" if s.termination else f"{s.final_state} (log ends)"
        out.append(
            f"  session {s.session[:8]}: {s.transitions} transitions, {s.switches} switches, "
            f"longest RECOVERING {s.max_recovering_s:.3f} s, longest unbound {s.max_unbound_s:.3f} s, {end}"
        )
    out += [f"  {v}" for v in report.violations]
    if report.violation_count > len(report.violations):
        out.append(f"  ... and {report.violation_count - len(report.violations)} more")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jvpn_trio.tools.audit LOG...``: exit 0 if every log passes, 1 if not, 2 if unreadable."""
    from jvpn_trio.config import ConfigError
    from jvpn_trio.core.policy import DEFAULT_POLICY
    from jvpn_trio.tools.replay import load_policy_any

    parser = argparse.ArgumentParser(prog="jvpn_trio.tools.audit", description="Check event logs against the invariants.")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="event log (JSON lines)")
    parser.add_argument(
        "--policy", metavar="FILE",
        help="the policy the logs were produced under: a policy file, or a client, gateway or scenario file (default: laptop)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON document")
    args = parser.parse_args(argv)
    try:
        policy = load_policy_any(args.policy) if args.policy else DEFAULT_POLICY
        reports = {name: audit_file(name, policy=policy) for name in args.logs}
    except (ConfigError, OSError) as exc:
        print(f"jvpn_trio.tools.audit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({name: r.to_json() for name, r in reports.items()}, sort_keys=True))
    else:
        print("\n".join(render_text(name, r) for name, r in reports.items()))
    return 0 if all(r.ok for r in reports.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
