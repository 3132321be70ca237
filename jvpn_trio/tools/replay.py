"""Replaying a recorded trace through fresh session machines: ``jvpn-trio replay TRACE``.

Theory of operation
-------------------
``jvpn-trio serve/up --record FILE`` (``drivers/recording.py``) writes, per session machine, a
*start* line with everything needed to build the machine again (side, ``now``, SessionID, the
full policy, and on the gateway its node id, held store revision and handshake binding), the
*outputs* of its creation, and then for every core call an *input* line followed at once by
the *outputs* line: the actions that call returned.  Because the machines are pure functions
of ``(state, input, now)`` (STYLE.md section 1), feeding the inputs, in order and with their
recorded ``now``, to fresh machines must reproduce every action byte for byte.

:func:`replay_lines` does exactly that and compares each call's actions, as the JSON the
recorder wrote (``core.trace.encode_action``), with the recorded ones.  The first difference
stops the replay: :class:`Divergence` names the outputs line, the input line, the input, and
both action lists; :func:`render_divergence` shows them side by side, field by field.

A trace can also be incomplete: the recorder stops with ``{"incomplete": N}`` when it had to
drop N lines (it never blocks a decision), and a process killed mid-write leaves a partial last
line or an input without its outputs.  Everything before that point is still checked; the
result says ``incomplete`` and where, rather than claiming a divergence.

What-if (:func:`whatif_lines`, ``--policy FILE``): the same inputs are fed to machines built
with another policy, open loop.  The inputs are what the world answered to the *recorded*
decisions, so after the first different decision the what-if machine sees answers to requests
it may never have made; the core ignores those (a REATTACH_ACK with an unknown nonce is counted
as a stray answer, for example), which is also what a real machine would do.  Time-driven
decisions (recovery window, dwell, the rate window) happen at the next recorded input at or
after their deadline; a lab or laptop trace has an input at least every probe interval.  The
result is a summary per machine under each policy (switches, denials, time in each state,
termination) and the first decisions that differ.  As a baseline, the trace is checked under
its own policy at the same time.

Everything here is pure: lines in, results out.  ``main`` is the only part that touches files.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterable, Iterator, Sequence

import attrs

from jvpn_trio.core import events as ev
from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.policy import Policy, PolicyError
from jvpn_trio.core.session import ClientSession, GatewaySession
from jvpn_trio.core.states import SessionState
from jvpn_trio.core.trace import BadTrace, Outputs, SessionStart, TraceEntry, decode_line_untrusted, encode_action

#: How many differing decisions a what-if lists per machine by default.
DEFAULT_MAX_DIFFERENCES = 5

OK = "ok"
DIVERGED = "diverged"
INCOMPLETE = "incomplete"
MALFORMED = "malformed"

Machine = ClientSession | GatewaySession
Key = tuple[str, str]  # (side, session hex)
ActionDict = dict[str, Any]

_INPUTS_OF_SIDE: dict[str, Any] = {"client": ev.ClientInput, "gateway": ev.GatewayInput}


# =============================================================================
# Results
# =============================================================================


@attrs.frozen(kw_only=True)
class Divergence:
    """The first core call whose replayed actions differ from the recorded ones."""

    line: int  # the recorded outputs line (1-based)
    input_line: int | None  # the input line; None for a machine's creation
    side: str
    session: str
    now: float
    input_text: str  # the input line as recorded, or a description of the start line
    expected: tuple[ActionDict, ...]
    got: tuple[ActionDict, ...]
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "hint": self.hint,
            "line": self.line,
            "input_line": self.input_line,
            "side": self.side,
            "session": self.session,
            "now": self.now,
            "input": self.input_text,
            "expected": list(self.expected),
            "got": list(self.got),
            "first_difference": first_difference_index(self.expected, self.got),
        }


@attrs.frozen(kw_only=True)
class MachineInfo:
    """One machine the trace created, and how far the replay took it."""

    side: str
    session: str
    start_line: int
    policy_fingerprint: str
    inputs: int
    final_state: str
    last_now: float

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class ReplayResult:
    """The outcome: ``ok``, ``diverged``, ``incomplete`` or ``malformed`` (not a usable trace)."""

    status: str
    lines: int
    inputs: int
    machines: tuple[MachineInfo, ...]
    divergence: Divergence | None = None
    problem: str | None = None
    problem_line: int | None = None
    dropped: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "replay",
            "status": self.status,
            "lines": self.lines,
            "inputs": self.inputs,
            "machines": [m.to_json() for m in self.machines],
            "divergence": self.divergence.to_json() if self.divergence else None,
            "problem": self.problem,
            "problem_line": self.problem_line,
            "dropped": self.dropped,
        }


# =============================================================================
# Walking a trace
# =============================================================================


@attrs.frozen
class _Step:
    """One core call found in the trace: the input (None for creation) and the recorded actions."""

    key: Key
    now: float
    input_line: int | None
    input_text: str
    event: Any
    outputs_line: int
    recorded: tuple[ActionDict, ...]


class _TraceProblem(Exception):
    def __init__(self, status: str, line: int, message: str, dropped: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.line = line
        self.dropped = dropped


def _incomplete_marker(text: str) -> int | None:
    """N for the recorder's ``{"incomplete": N}`` line, else None."""
    stripped = text.strip()
    if not stripped.startswith('{"incomplete"'):
        return None
    try:
        body = json.loads(stripped)
    except ValueError:
        return None
    value = body.get("incomplete") if isinstance(body, dict) and set(body) == {"incomplete"} else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _numbered(lines: Iterable[str]) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, is_last_nonblank)`` with one line of lookahead (streaming)."""
    pending: tuple[int, str] | None = None
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        if pending is not None:
            yield pending[0], pending[1], False
        pending = (number, text)
    if pending is not None:
        yield pending[0], pending[1], True


def _walk(lines: Iterable[str], starts: dict[Key, tuple[SessionStart, int]]) -> Iterator[_Step]:
    """The trace's core calls in order; raises _TraceProblem where it ends early or is not a trace.

    ``starts`` is filled with each machine's start line as it is met (before its creation step).
    """
    waiting: tuple[Key, float, int | None, str, Any] | None = None
    last_key_of_side: dict[str, Key] = {}
    last = 0
    for number, text, is_last in _numbered(lines):
        last = number
        dropped = _incomplete_marker(text)
        if dropped is not None:
            raise _TraceProblem(
                INCOMPLETE, number, f"the recorder dropped {dropped} line(s) from line {number} on (its buffer was full)", dropped
            )
        try:
            item = decode_line_untrusted(text, lineno=number)
        except BadTrace as exc:
            if is_last:
                raise _TraceProblem(INCOMPLETE, number, f"the trace ends with a partial line ({exc})") from None
            raise _TraceProblem(MALFORMED, number, str(exc)) from None
        if isinstance(item, Outputs):
            if waiting is None:
                raise _TraceProblem(MALFORMED, number, "outputs line with no input or session start before it")
            key, now, input_line, input_text, event = waiting
            if (item.side, item.session) != key:
                raise _TraceProblem(
                    MALFORMED, number, f"outputs for {item.side} {item.session[:8]} after an input for {key[0]} {key[1][:8]}"
                )
            waiting = None
            yield _Step(key, now, input_line, input_text, event, number, item.actions)
            continue
        if waiting is not None:
            where = f"input on line {waiting[2]}" if waiting[2] is not None else "session start"
            raise _TraceProblem(MALFORMED, number, f"the {where} has no outputs line")
        if isinstance(item, SessionStart):
            key = (item.side, item.session)
            starts[key] = (item, number)
            last_key_of_side[item.side] = key
            waiting = (key, item.now, None, f"session start ({item.side} {item.session[:8]})", None)
            continue
        assert isinstance(item, TraceEntry)
        session = item.session
        if session is None:  # a trace from before inputs named their session: one machine per side
            if item.side not in last_key_of_side:
                raise _TraceProblem(MALFORMED, number, f"{item.side} input before any {item.side} session start")
            key = last_key_of_side[item.side]
        else:
            key = (item.side, session)
            if key not in starts:
                raise _TraceProblem(MALFORMED, number, f"input for {item.side} session {session[:8]}, which has no start line")
        waiting = (key, item.now, number, text.strip(), item.event)
    if waiting is not None:
        where = f"input on line {waiting[2]}" if waiting[2] is not None else "session start"
        raise _TraceProblem(INCOMPLETE, last, f"the trace ends after the {where}, without its outputs")


def build_machine(start: SessionStart, *, policy: Policy | None = None) -> Machine:
    """A fresh machine as the start line describes it (under ``policy`` if given); BadTrace if it cannot be."""
    try:
        use = policy if policy is not None else Policy.from_recording(start.policy)
    except PolicyError as exc:
        raise BadTrace(f"session {start.session[:8]}: recorded policy is not valid: {exc}") from None
    session_id = SessionId.from_hex(start.session)
    if start.side == "client":
        previous = SessionId.from_hex(start.previous_session) if start.previous_session else None
        return ClientSession(
            policy=use,
            session_id=session_id,
            now=start.now,
            previous_session=previous,
            switch_times=start.switch_times,
            reconnect_by=start.reconnect_by,
        )
    if start.node_id is None or start.held_revision is None:
        raise BadTrace(f"gateway session {start.session[:8]}: start line lacks node_id/held_revision")
    return GatewaySession(
        policy=use,
        session_id=session_id,
        now=start.now,
        node_id=start.node_id,
        held_revision=start.held_revision,
        handshake_binding=start.handshake_binding,
        taken_over=start.taken_over,
    )


def _call(machine: Machine, step: _Step) -> list[Any]:
    """The actions of one replayed core call; BadTrace if the input is not one this side takes."""
    if step.event is None:
        return list(machine.creation_events())
    if not isinstance(step.event, _INPUTS_OF_SIDE[step.key[0]]):
        raise BadTrace(f"line {step.input_line}: {type(step.event).__name__} is not a {step.key[0]} input")
    actions: list[Any] = machine.handle(step.event, now=step.now)
    return actions


def as_recorded(actions: Iterable[Any]) -> tuple[ActionDict, ...]:
    """Actions as the recorder writes them, after a JSON round trip (so they compare with a trace)."""
    loaded: list[ActionDict] = json.loads(json.dumps([encode_action(a) for a in actions]))
    return tuple(loaded)


class _Replayer:
    """Machines keyed by (side, session); each step is fed to its machine."""

    def __init__(self, *, policy: Policy | None) -> None:
        self.policy = policy
        self.machines: dict[Key, Machine] = {}
        self.info: dict[Key, dict[str, Any]] = {}

    def feed(self, step: _Step, starts: dict[Key, tuple[SessionStart, int]]) -> list[Any]:
        if step.event is None:
            start, line = starts[step.key]
            machine = build_machine(start, policy=self.policy)
            self.machines[step.key] = machine
            missing = sorted(set(Policy().to_mapping()) - set(start.policy))
            self.info[step.key] = {"start_line": line, "inputs": 0, "last_now": step.now, "policy_missing": missing}
        machine = self.machines[step.key]
        actions = _call(machine, step)
        info = self.info[step.key]
        if step.event is not None:
            info["inputs"] += 1
        info["last_now"] = step.now
        return actions

    def hint(self, key: Key) -> str | None:
        """Why a replay may diverge for reasons other than the core: a policy recorded by an older version."""
        missing = self.info.get(key, {}).get("policy_missing")
        if not missing:
            return None
        return (
            f"the trace's policy lacks {', '.join(missing)}: it was recorded by an older jvpn-trio; the missing "
            "fields took their defaults, so at least the policy fingerprint differs (replay it with that version)"
        )

    def summary(self) -> tuple[MachineInfo, ...]:
        return tuple(
            MachineInfo(
                side=key[0],
                session=key[1],
                start_line=info["start_line"],
                policy_fingerprint=self.machines[key].policy.fingerprint,
                inputs=info["inputs"],
                final_state=self.machines[key].record.state.value,
                last_now=info["last_now"],
            )
            for key, info in self.info.items()
        )


def replay_lines(lines: Iterable[str]) -> ReplayResult:
    """Replay a trace (its lines, in order) and compare every action with the recording."""
    starts: dict[Key, tuple[SessionStart, int]] = {}
    replayer = _Replayer(policy=None)
    inputs = 0
    last_line = 0
    try:
        for step in _walk(lines, starts):
            last_line = step.outputs_line
            got = as_recorded(replayer.feed(step, starts))
            if step.event is not None:
                inputs += 1
            if got != tuple(step.recorded):
                return ReplayResult(
                    status=DIVERGED,
                    lines=step.outputs_line,
                    inputs=inputs,
                    machines=replayer.summary(),
                    divergence=Divergence(
                        line=step.outputs_line,
                        input_line=step.input_line,
                        side=step.key[0],
                        session=step.key[1],
                        now=step.now,
                        input_text=step.input_text,
                        expected=tuple(step.recorded),
                        got=got,
                        hint=replayer.hint(step.key),
                    ),
                )
    except _TraceProblem as problem:
        return ReplayResult(
            status=problem.status,
            lines=problem.line,
            inputs=inputs,
            machines=replayer.summary(),
            problem=str(problem),
            problem_line=problem.line,
            dropped=problem.dropped,
        )
    except BadTrace as exc:
        return ReplayResult(
            status=MALFORMED, lines=last_line, inputs=inputs, machines=replayer.summary(), problem=str(exc)
        )
    if not starts:
        return ReplayResult(status=MALFORMED, lines=last_line, inputs=0, machines=(), problem="no session start line: not a trace")
    return ReplayResult(status=OK, lines=last_line, inputs=inputs, machines=replayer.summary())


# =============================================================================
# Showing a divergence
# =============================================================================


def first_difference_index(expected: Sequence[ActionDict], got: Sequence[ActionDict]) -> int | None:
    for i in range(max(len(expected), len(got))):
        if i >= len(expected) or i >= len(got) or expected[i] != got[i]:
            return i
    return None


def describe_action(action: ActionDict) -> str:
    """One short line for an action dict: its type and the fields that say what it does."""
    name = action.get("action", "?")
    if name == "EmitEvent":
        kind = action.get("kind", "?")
        parts = [f"{kind} {action.get('reason', '?')} v{action.get('version', '?')}"]
        if kind == "STATE_CHANGE":
            parts.append(f"{action.get('from_state')}->{action.get('to_state')} binding={action.get('binding')}")
        elif kind == "TRANSPORT_SWITCH":
            parts.append(f"{action.get('from_path')}->{action.get('to_path')}")
        elif kind == "PATH_HEALTH":
            parts.append(f"{action.get('path')} {action.get('verdict')} measured={action.get('measured')}")
        elif kind in ("SWITCH_DENIED",):
            parts.append(f"target={action.get('target')} {action.get('switches_last_minute')}/{action.get('max_switches_per_minute')}")
        elif "path" in action:
            parts.append(f"path={action.get('path')}")
        return " ".join(parts)
    fields = " ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(action.items()) if k != "action")
    return f"{name} {fields}".rstrip()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_divergence(d: Divergence, *, width: int = 60) -> str:
    """The first difference, side by side: each action expected vs got, then the fields that differ."""
    where = f"input on line {d.input_line}" if d.input_line is not None else "the machine's creation"
    out = [
        f"DIVERGED at line {d.line}: {d.side} session {d.session[:8]}, {where}, now={d.now!r}",
        f"  input: {d.input_text}",
        f"  {'#':>3}  {'expected (recorded)':<{width}}   got (replayed)",
    ]
    for i in range(max(len(d.expected), len(d.got))):
        left = describe_action(d.expected[i]) if i < len(d.expected) else "(nothing)"
        right = describe_action(d.got[i]) if i < len(d.got) else "(nothing)"
        same = i < len(d.expected) and i < len(d.got) and d.expected[i] == d.got[i]
        out.append(f"  {i:>3}{' ' if same else '!'} {_clip(left, width):<{width}} {'=' if same else '|'} {_clip(right, width)}")
    index = first_difference_index(d.expected, d.got)
    if index is not None and index < len(d.expected) and index < len(d.got):
        exp, got = d.expected[index], d.got[index]
        out.append(f"  fields of action {index} that differ:")
        for key in sorted(set(exp) | set(got)):
            if exp.get(key, _MISSING) != got.get(key, _MISSING):
                left = json.dumps(exp[key]) if key in exp else "(absent)"
                right = json.dumps(got[key]) if key in got else "(absent)"
                out.append(f"    {key}: {left} | {right}")
    if d.hint:
        out.append(f"  note: {d.hint}")
    return "\n".join(out)


_MISSING = object()


def render_replay(result: ReplayResult) -> str:
    """The plain-text report of a replay."""
    machines = ", ".join(f"{m.side} {m.session[:8]} ({m.inputs} inputs, {m.final_state})" for m in result.machines) or "none"
    if result.status == OK:
        return f"replay ok: {result.inputs} inputs on {len(result.machines)} machine(s) reproduced every action exactly\n  machines: {machines}"
    if result.status == DIVERGED and result.divergence is not None:
        before = result.inputs - 1 if result.divergence.input_line is not None else result.inputs
        return render_divergence(result.divergence) + f"\n  replayed before it: {before} inputs identical; machines: {machines}"
    head = "replay INCOMPLETE" if result.status == INCOMPLETE else "not a usable trace"
    return (
        f"{head}: {result.problem}\n"
        f"  checked before that: {result.inputs} inputs, all identical; machines: {machines}"
    )


# =============================================================================
# What-if: the same inputs under another policy
# =============================================================================


@attrs.define
class Tally:
    """What one machine decided over a run: counts, time in each state, how it ended."""

    switches: int = 0
    switch_denied: int = 0
    reattach_sent: int = 0
    reattach_rejected: int = 0
    security_events: int = 0
    path_verdicts: int = 0
    transitions: int = 0
    entered: dict[str, int] = attrs.Factory(dict)
    time_in_state_s: dict[str, float] = attrs.Factory(dict)
    final_state: str = SessionState.BIRTH.value
    termination: str | None = None
    _state_since: float | None = None
    _last_now: float | None = None

    def add(self, actions: Sequence[ActionDict], now: float) -> None:
        self._last_now = now
        for a in actions:
            name, kind = a.get("action"), a.get("kind")
            if name == "SendReattach":
                self.reattach_sent += 1
            if name != "EmitEvent":
                continue
            if kind == "TRANSPORT_SWITCH":
                self.switches += 1
            elif kind == "SWITCH_DENIED" or (kind == "REATTACH_REJECTED" and a.get("reason") == "RATE_LIMITED"):
                self.switch_denied += 1
            if kind == "REATTACH_REJECTED":
                self.reattach_rejected += 1
            elif kind == "SECURITY_EVENT":
                self.security_events += 1
            elif kind == "PATH_HEALTH":
                self.path_verdicts += 1
            elif kind == "STATE_CHANGE":
                self._state_change(a)

    def _state_change(self, a: ActionDict) -> None:
        t, to_state = float(a.get("t", 0.0)), str(a.get("to_state"))
        if self._state_since is not None:
            self.time_in_state_s[self.final_state] = self.time_in_state_s.get(self.final_state, 0.0) + t - self._state_since
        self._state_since = t
        self.transitions += 1
        self.entered[to_state] = self.entered.get(to_state, 0) + 1
        self.final_state = to_state
        if to_state == SessionState.TERMINATED.value:
            self.termination = str(a.get("reason"))

    def closed(self) -> dict[str, float]:
        """Time in each state, the current one counted up to the last input."""
        out = dict(self.time_in_state_s)
        if self._state_since is not None and self._last_now is not None and self.final_state != SessionState.TERMINATED.value:
            out[self.final_state] = out.get(self.final_state, 0.0) + self._last_now - self._state_since
        return {k: round(v, 6) for k, v in out.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "switches": self.switches,
            "switch_denied": self.switch_denied,
            "reattach_sent": self.reattach_sent,
            "reattach_rejected": self.reattach_rejected,
            "security_events": self.security_events,
            "path_verdicts": self.path_verdicts,
            "transitions": self.transitions,
            "entered": dict(sorted(self.entered.items())),
            "time_in_state_s": dict(sorted(self.closed().items())),
            "final_state": self.final_state,
            "termination": self.termination,
        }


def decision_signature(action: ActionDict) -> tuple[Any, ...]:
    """What a decision *is*, leaving out what changes with the policy but decides nothing
    (fingerprint, thresholds, measured values) or drifts after a first difference (versions, nonces)."""
    name = action.get("action")
    if name == "EmitEvent":
        kind = action.get("kind")
        keys = {
            "STATE_CHANGE": ("from_state", "to_state", "binding"),
            "TRANSPORT_SWITCH": ("from_path", "to_path"),
            "PATH_HEALTH": ("path", "verdict"),
            "SWITCH_DENIED": ("target",),
            "REATTACH_REJECTED": ("path",),
            "SECURITY_EVENT": ("path", "endpoint"),
        }.get(str(kind), ())
        return (name, kind, action.get("reason"), *(action.get(k) for k in keys))
    if name in ("BindTransport", "ReleaseTransport"):
        return (name, json.dumps(action.get("binding"), sort_keys=True))
    if name == "SendReattach":
        return (name, action.get("path"))
    if name in ("Terminate", "SendClose"):
        return (name, action.get("reason"))
    return (name,)


@attrs.frozen(kw_only=True)
class Difference:
    """One input after which the what-if machine decided differently."""

    line: int | None
    now: float
    input_text: str
    recorded: tuple[str, ...]
    whatif: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "now": self.now, "input": self.input_text, "recorded": list(self.recorded), "whatif": list(self.whatif)}


@attrs.frozen(kw_only=True)
class MachineWhatIf:
    side: str
    session: str
    inputs: int
    recorded_policy: str
    recorded: dict[str, Any]
    whatif: dict[str, Any]
    differences: tuple[Difference, ...]
    difference_count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "session": self.session,
            "inputs": self.inputs,
            "recorded_policy": self.recorded_policy,
            "recorded": self.recorded,
            "whatif": self.whatif,
            "difference_count": self.difference_count,
            "differences": [d.to_json() for d in self.differences],
        }


@attrs.frozen(kw_only=True)
class WhatIfResult:
    policy_fingerprint: str
    baseline: ReplayResult
    machines: tuple[MachineWhatIf, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "whatif",
            "status": "whatif" if self.baseline.status != MALFORMED else MALFORMED,
            "policy": self.policy_fingerprint,
            "baseline": self.baseline.to_json(),
            "machines": [m.to_json() for m in self.machines],
        }


def whatif_lines(lines: Iterable[str], policy: Policy, *, max_differences: int = DEFAULT_MAX_DIFFERENCES) -> WhatIfResult:
    """Replay a trace under ``policy`` and compare the decisions with the recorded ones.

    ``lines`` is read once; the recorded policy's replay (the baseline) runs alongside.
    """
    starts: dict[Key, tuple[SessionStart, int]] = {}
    baseline = _Replayer(policy=None)
    whatif = _Replayer(policy=policy)
    recorded_tally: dict[Key, Tally] = {}
    whatif_tally: dict[Key, Tally] = {}
    differences: dict[Key, list[Difference]] = {}
    counts: dict[Key, int] = {}
    divergence: Divergence | None = None
    problem: _TraceProblem | None = None
    bad: str | None = None
    inputs = 0
    last_line = 0
    try:
        for step in _walk(lines, starts):
            last_line = step.outputs_line
            if step.event is not None:
                inputs += 1
            recorded = tuple(step.recorded)
            replayed = as_recorded(baseline.feed(step, starts))
            if divergence is None and replayed != recorded:
                divergence = Divergence(
                    line=step.outputs_line, input_line=step.input_line, side=step.key[0], session=step.key[1],
                    now=step.now, input_text=step.input_text, expected=recorded, got=replayed,
                    hint=baseline.hint(step.key),
                )  # fmt: skip
            alternative = as_recorded(whatif.feed(step, starts))
            recorded_tally.setdefault(step.key, Tally()).add(recorded, step.now)
            whatif_tally.setdefault(step.key, Tally()).add(alternative, step.now)
            if [decision_signature(a) for a in recorded] != [decision_signature(a) for a in alternative]:
                counts[step.key] = counts.get(step.key, 0) + 1
                found = differences.setdefault(step.key, [])
                if len(found) < max_differences:
                    found.append(
                        Difference(
                            line=step.input_line,
                            now=step.now,
                            input_text=step.input_text,
                            recorded=tuple(describe_action(a) for a in recorded),
                            whatif=tuple(describe_action(a) for a in alternative),
                        )
                    )
    except _TraceProblem as exc:
        problem = exc
    except BadTrace as exc:
        bad = str(exc)
    if problem is not None:
        base = ReplayResult(
            status=problem.status, lines=problem.line, inputs=inputs, machines=baseline.summary(),
            divergence=divergence, problem=str(problem), problem_line=problem.line, dropped=problem.dropped,
        )  # fmt: skip
    elif bad is not None or not starts:
        base = ReplayResult(
            status=MALFORMED, lines=last_line, inputs=inputs, machines=baseline.summary(),
            problem=bad or "no session start line: not a trace",
        )  # fmt: skip
    else:
        base = ReplayResult(
            status=DIVERGED if divergence else OK, lines=last_line, inputs=inputs, machines=baseline.summary(),
            divergence=divergence,
        )  # fmt: skip
    machines = tuple(
        MachineWhatIf(
            side=key[0],
            session=key[1],
            inputs=baseline.info[key]["inputs"],
            recorded_policy=baseline.machines[key].policy.fingerprint,
            recorded=recorded_tally[key].to_json(),
            whatif=whatif_tally[key].to_json(),
            differences=tuple(differences.get(key, ())),
            difference_count=counts.get(key, 0),
        )
        for key in baseline.info
        if key in recorded_tally
    )
    return WhatIfResult(policy_fingerprint=policy.fingerprint, baseline=base, machines=machines)


def _summary_rows(recorded: dict[str, Any], whatif: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [
        ("switches", str(recorded["switches"]), str(whatif["switches"])),
        ("switches denied (rate)", str(recorded["switch_denied"]), str(whatif["switch_denied"])),
        ("reattaches sent", str(recorded["reattach_sent"]), str(whatif["reattach_sent"])),
        ("reattaches rejected", str(recorded["reattach_rejected"]), str(whatif["reattach_rejected"])),
        ("transitions", str(recorded["transitions"]), str(whatif["transitions"])),
        ("path verdict changes", str(recorded["path_verdicts"]), str(whatif["path_verdicts"])),
    ]
    states = [s.value for s in SessionState if s.value in recorded["time_in_state_s"] or s.value in whatif["time_in_state_s"]]
    for state in states:
        left = recorded["time_in_state_s"].get(state)
        right = whatif["time_in_state_s"].get(state)
        rows.append(
            (
                f"time {state} (entered)",
                f"{left or 0.0:.3f} s ({recorded['entered'].get(state, 0)}x)",
                f"{right or 0.0:.3f} s ({whatif['entered'].get(state, 0)}x)",
            )
        )

    def end(t: dict[str, Any]) -> str:
        return f"{t['final_state']} ({t['termination']})" if t["termination"] else t["final_state"]

    rows.append(("final state", end(recorded), end(whatif)))
    return rows


def render_whatif(result: WhatIfResult) -> str:
    """Plain text: the baseline verdict, then per machine a two-column summary and the first differences."""
    out: list[str] = []
    base = result.baseline
    if base.status == OK:
        out.append(f"baseline: the trace replays identically under its own policy ({base.inputs} inputs)")
    elif base.status == DIVERGED and base.divergence is not None:
        out.append(f"baseline: WARNING, the trace does not replay identically under its own policy (line {base.divergence.line}); "
                   "the what-if below compares with the recording anyway")  # fmt: skip
    else:
        out.append(f"baseline: {base.status}: {base.problem}")
    for m in result.machines:
        out.append("")
        out.append(f"{m.side} session {m.session[:8]}: {m.inputs} inputs")
        left_head, right_head = f"recorded ({m.recorded_policy})", f"what-if ({result.policy_fingerprint})"
        rows = _summary_rows(m.recorded, m.whatif)
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(left_head), *(len(r[1]) for r in rows))
        out.append(f"  {'':<{w0}}  {left_head:<{w1}}  {right_head}")
        for name, left, right in rows:
            mark = " " if left == right else "*"
            out.append(f" {mark}{name:<{w0}}  {left:<{w1}}  {right}")
        if not m.difference_count:
            out.append("  no decision differs")
            continue
        out.append(f"  first {len(m.differences)} of {m.difference_count} inputs after which the decisions differ:")
        for d in m.differences:
            out.append(f"    line {d.line} (now={d.now:.3f}): {_clip(d.input_text, 110)}")
            out.append(f"      recorded: {'; '.join(d.recorded) or '(nothing)'}")
            out.append(f"      what-if:  {'; '.join(d.whatif) or '(nothing)'}")
    return "\n".join(out)


# =============================================================================
# Command line
# =============================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``jvpn-trio replay`` takes (``main`` expects exactly these attributes)."""
    parser.add_argument("trace", metavar="TRACE", help="trace file written by `serve/up --record`")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--policy", metavar="FILE",
        help="what-if: replay under this policy (a policy file, or a client, gateway or scenario file's [policy])",
    )  # fmt: skip
    parser.add_argument(
        "--max-differences", type=int, default=DEFAULT_MAX_DIFFERENCES, metavar="N",
        help=f"what-if: list at most N differing decisions per machine (default {DEFAULT_MAX_DIFFERENCES})",
    )  # fmt: skip


EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


def load_policy_any(path: str) -> Policy:
    """The policy in ``path``: a policy file, or the ``[policy]`` table of a client, gateway or scenario file.

    Raises ConfigError naming the file and the problem.
    """
    from jvpn_trio.config import load_policy, policy_from_table, read_toml

    data = read_toml(path)
    if "policy" in data and isinstance(data["policy"], dict):
        return policy_from_table(data["policy"], source=str(path))
    return load_policy(path)


def main(args: argparse.Namespace) -> int:
    """``jvpn-trio replay TRACE [--json] [--policy FILE]``.

    Exit 0: identical (or any what-if); 1: diverged or incomplete; 2: not a usable trace, or the
    trace or policy file cannot be read.
    """
    from jvpn_trio.config import ConfigError

    try:
        policy = load_policy_any(args.policy) if getattr(args, "policy", None) else None
    except ConfigError as exc:
        print(f"jvpn-trio replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with open(args.trace, encoding="utf-8", errors="replace") as f:
            if policy is None:
                result: ReplayResult | WhatIfResult = replay_lines(f)
            else:
                limit = getattr(args, "max_differences", DEFAULT_MAX_DIFFERENCES)
                result = whatif_lines(f, policy, max_differences=max(0, limit))
    except OSError as exc:
        print(f"jvpn-trio replay: {args.trace}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True))
    else:
        print(render_whatif(result) if isinstance(result, WhatIfResult) else render_replay(result))
    if isinstance(result, WhatIfResult):
        if result.baseline.status == MALFORMED:
            if not args.json:
                print(f"jvpn-trio replay: {args.trace}: not a usable trace", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK
    if result.status == OK:
        return EXIT_OK
    if result.status == MALFORMED:
        return EXIT_USAGE
    return EXIT_CHECK_FAILED


def _standalone(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jvpn_trio.tools.replay", description="Replay a recorded trace through the core.")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(_standalone())
