"""A checker for the ten formal properties, over one machine's execution trace.

Theory of operation
-------------------
A *trace* is what one session machine (client or gateway) did, one
:class:`Step` per ``handle(event, now=...)`` call: the input, the ``now``, the
actions it returned (``EmitEvent``, ``BindTransport``, ``ReleaseTransport``,
``Terminate``, ...) and a snapshot of ``machine.record`` right after the call
(plus, on the gateway, ``last_nonce`` and ``clock_offset_ms``).  Step 0 is the
session's creation: no input, the ``creation_events()`` and the BIRTH record.

:class:`TraceChecker` consumes steps one at a time (so a hypothesis state
machine can check after every rule without re-reading the whole trace) and
raises :class:`PropertyViolation` -- an ``AssertionError`` naming the property,
the side, the step and what was wrong -- at the first step that breaks one of
the ten properties of ``formal-properties.md``, read for our design as:

1. Identity: ``record.session_id`` and every event's ``session`` never change.
2. Single binding: replaying Bind/Release in order, a Bind never happens while
   something is bound (the Release must come first, in the same step), a
   Release names the bound binding, and the replay agrees with
   ``record.binding`` after every step; a TERMINATED session is unbound.
3. Explicit transitions: every state/version/binding change between two
   snapshots is announced by STATE_CHANGE events, chained from the previous
   state, each a row ``(from, reason) -> to`` of ``states.TRANSITIONS`` whose
   binding guard and effect match the Bind/Release actions around it; every
   event is stamped with the step's ``now``; the gateway acknowledges a
   REATTACH only if its binding is then the active one (spec 7: accepting
   means binding, logged), never as an accept with no transition.
   Return routability (docs/spec.md, "Path validation"): outside the handshake,
   the gateway binds an address only if it was the bound one, answered a
   challenge within ``path_validation_cache_ms``, or echoes its pending
   PATH_CHALLENGE in this very step; a PATH_CHALLENGE goes only to the address
   of the REATTACH in that step.  A matching PATH_RESPONSE is checked as the
   REATTACH it completes, judged at the response's ``now`` (so 7, 8 and 9 hold
   for it too); one that matches nothing changes nothing.
4. Bounded recovery: unbound for longer than ``transport_loss_ttl_ms`` at a
   step's ``now`` means TERMINATED after that step; RECOVERING for longer than
   ``max_recovery_window_ms`` means no longer RECOVERING after it.
5. Identity continuity: a TRANSPORT_SWITCH directly follows a
   REATTACH_CONFIRMED STATE_CHANGE (and vice versa), carries the same session
   and that transition's version (no reset), and names the new binding's
   path; a Bind outside a handshake always comes with one.
6. Switch rate: at most ``max_switches_per_minute`` TRANSPORT_SWITCH events
   in any window ``(t - 60 s, t]`` (a switch at ``s`` counts while
   ``t < s + 60``); after a denied switch (SWITCH_DENIED, or a
   RATE_LIMITED rejection) the state is DEGRADED or TERMINATED.
7. Replay safety (gateway): a REATTACH that is forged (no proof), for another
   SessionID, with a nonce not above ``last_nonce``, or outside the freshness
   window is rejected with ``(record, last_nonce, clock_offset_ms)``
   unchanged and no Bind/Release/ack; ``last_nonce`` only ever grows, and
   only to the nonce of the REATTACH in that step.
8. Versions: STATE_CHANGE versions are exactly 0 (SESSION_CREATED), 1, 2, ...;
   every other event carries the current version; ``record.version`` grows by
   exactly the number of transitions in the step; a REATTACH with a stale
   expected version does not mutate (as in 7).
9. Ownership (gateway): a REATTACH whose record is missing, names another
   owner or session, or another revision than the one held is rejected
   without mutation (as in 7); the gateway binds only on its handshake or on a
   REATTACH it owns; after OwnershipLost it is TERMINATED and unbound.
10. Termination: only for a reason in ``states.TERMINATION_REASONS``, by a
    STATE_CHANGE -> TERMINATED with that reason and a ``Terminate`` action with
    the same reason in the same step; ``Terminate`` never otherwise; after
    TERMINATED nothing changes (no transition, Bind, Release, switch).

An illegal transition is a bug, whatever the trace looks like: the machine's
``counters["invalid_transitions"]`` (what ``_transition`` counts when the table
has no row for the change it was asked to make, or a BIND row comes without a
binding) is snapshotted with every step and must stay 0 from step 0 on.  The
table refused the change, so the record and the events may well look fine; the
counter is the only trace of the attempt, and a non-zero one fails Property 3
at the step that moved it.

The oracle for 7 and 9 is written from the spec, not from ``reattach.py``.  It
assumes what the Trio driver guarantees: a REATTACH is handled when the
machine is settled (every deadline ``<= now`` has fired), so the step's only
possible cause of change is the REATTACH itself (``Pair.advance`` settles).
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Sequence

import attrs

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import (
    Action,
    BindTransport,
    EmitEvent,
    EventKind,
    ReleaseTransport,
    Role,
    SendPathChallenge,
    SendReattachAck,
    Terminate,
)
from jvpn_trio.core.ids import Binding, SessionId
from jvpn_trio.core.policy import SWITCH_RATE_WINDOW_S, Policy
from jvpn_trio.core.session import ClientSession, GatewaySession, PendingChallenge, SessionRecord
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

PROPERTY_NAMES = {
    1: "session identity stability",
    2: "single transport binding",
    3: "explicit transition rule",
    4: "bounded recovery window",
    5: "identity continuity",
    6: "bounded switch rate",
    7: "replay safety",
    8: "state version monotonicity",
    9: "no dual ownership",
    10: "deterministic termination",
}


class PropertyViolation(AssertionError):
    """A trace broke one of the ten properties; ``prop`` says which."""

    def __init__(self, prop: int, role: str, index: int, step: Step, message: str) -> None:
        self.prop = prop
        self.role = role
        self.index = index
        self.step = step
        super().__init__(
            f"Property {prop} ({PROPERTY_NAMES[prop]}) violated on the {role} at step {index} "
            f"(now={step.now!r}, input={step.input!r}): {message}"
        )


def _to_actions(actions: Iterable[Action]) -> tuple[Action, ...]:
    return tuple(actions)


@attrs.frozen(kw_only=True)
class Step:
    """One ``handle`` call (or, for step 0, the session's creation)."""

    now: float
    input: object | None
    actions: tuple[Action, ...] = attrs.field(converter=_to_actions)
    record: SessionRecord
    last_nonce: int | None = None  # gateway only
    clock_offset_ms: float | None = None  # gateway only
    invalid_transitions: int = 0  # the machine's counter of rejected (illegal) transitions after the step
    #: Gateway only, after the step: pending PATH_CHALLENGEs and validated addresses (copies).
    challenges: dict[tuple[str, int], PendingChallenge] = attrs.Factory(dict)
    validated: dict[tuple[str, int], float] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class GatewayIdentity:
    """What the gateway holds that ownership is checked against (Property 9)."""

    node_id: str
    held_revision: int


def _detail(event: EmitEvent, key: str) -> object:
    return dict(event.details).get(key)


def ownership_valid(req: ev.ReattachReceived, sid: SessionId, gateway: GatewayIdentity) -> bool:
    """Spec 10: the record exists, is for this session, names this node, at the held revision."""
    record = req.ownership
    return (
        record is not None
        and record.session_id == sid
        and record.owner == gateway.node_id
        and record.revision == gateway.held_revision
    )


def reattach_defects(
    req: ev.ReattachReceived,
    *,
    before: Step,
    policy: Policy,
    gateway: GatewayIdentity,
    now: float,
) -> list[tuple[int, str]]:
    """Why the spec says this REATTACH must be rejected: (property, defect) pairs, possibly none."""
    rec = before.record
    out: list[tuple[int, str]] = []
    if not req.proof_valid:
        out.append((7, "forged (no proof of possession)"))
    if req.session_id != rec.session_id:
        out.append((7, "for another SessionID"))
    if before.last_nonce is not None and req.nonce <= before.last_nonce:
        out.append((7, f"nonce {req.nonce} not above last accepted {before.last_nonce}"))
    offset = before.clock_offset_ms or 0.0
    expected_ts = (now - rec.created_at) * 1000.0 - offset
    if abs(req.client_ts_ms - expected_ts) > policy.freshness_window_ms:
        out.append((7, f"timestamp {req.client_ts_ms} ms outside the freshness window around {expected_ts:.0f}"))
    if not ownership_valid(req, rec.session_id, gateway):
        out.append((9, f"ownership record {req.ownership!r} is not ours at revision {gateway.held_revision}"))
    # In BIRTH the gateway judges a REATTACH as if the handshake were confirmed (the confirmation
    # is one transition, so one version on): core/session.py, GatewaySession._on_reattach.
    current = rec.version + 1 if rec.state is S.BIRTH else rec.version
    if req.expected_version != current:
        out.append((8, f"stale version {req.expected_version} (current {current})"))
    return out


def _check_no_invalid_transition(
    prev: Step | None, step: Step, fail: Callable[[int, str], PropertyViolation]
) -> None:
    """Property 3: ``invalid_transitions`` stays 0 (see the module docstring)."""
    if step.invalid_transitions:
        before = prev.invalid_transitions if prev is not None else 0
        raise fail(
            3,
            f"the machine attempted a transition the table has no row for: "
            f"counters['invalid_transitions'] went {before} -> {step.invalid_transitions} "
            f"(in {step.record.state.value}, bound={step.record.binding is not None})",
        )


class TraceChecker:
    """Checks the ten properties step by step; see the module docstring."""

    def __init__(self, *, role: Role, policy: Policy, gateway: GatewayIdentity | None = None) -> None:
        if role is Role.GATEWAY and gateway is None:
            raise ValueError("a gateway trace needs the gateway's node id and held revision")
        self.role = role
        self.policy = policy
        self.gateway = gateway
        self.steps_checked = 0
        self._prev: Step | None = None
        self._sid: SessionId | None = None
        self._bound: Binding | None = None
        self._unbound_since: float | None = None
        self._recovering_since: float | None = None
        self._switches: collections.deque[float] = collections.deque()
        self._max_switches_seen = 0

    # -- public -------------------------------------------------------------------
    def feed(self, step: Step) -> None:
        """Check one more step; raises :class:`PropertyViolation` on the first broken property."""
        index = self.steps_checked
        if self._prev is None:
            self._check_creation(index, step)
        else:
            self._check_step(index, self._prev, step)
        # Only the snapshots of the previous step are needed later; dropping its
        # actions and input keeps a checker small to copy (test_exhaustive clones it).
        self._prev = Step(
            now=step.now,
            input=None,
            actions=(),
            record=step.record,
            last_nonce=step.last_nonce,
            clock_offset_ms=step.clock_offset_ms,
            invalid_transitions=step.invalid_transitions,
            challenges=step.challenges,
            validated=step.validated,
        )
        self.steps_checked += 1

    def feed_all(self, steps: Iterable[Step]) -> None:
        for step in steps:
            self.feed(step)

    @property
    def max_switches_in_window(self) -> int:
        """The most TRANSPORT_SWITCH events seen in one rate window (for reports)."""
        return self._max_switches_seen

    # -- step 0 ---------------------------------------------------------------------
    def _check_creation(self, index: int, step: Step) -> None:
        def fail(prop: int, message: str) -> PropertyViolation:
            return PropertyViolation(prop, self.role.value, index, step, message)

        rec = step.record
        self._sid = rec.session_id
        _check_no_invalid_transition(None, step, fail)
        if rec.state is not S.BIRTH or rec.binding is not None:
            raise fail(3, f"a session must be born in BIRTH, unbound; got {rec.state.value} / {rec.binding}")
        if rec.version != 0:
            raise fail(8, f"a new session has version 0, not {rec.version}")
        changes = [a for a in step.actions if isinstance(a, EmitEvent) and a.kind is EventKind.STATE_CHANGE]
        if (
            len(changes) != 1
            or changes[0].reason is not R.SESSION_CREATED
            or _detail(changes[0], "to_state") != S.BIRTH.value
        ):
            raise fail(3, f"creation must log exactly one STATE_CHANGE SESSION_CREATED -> BIRTH, got {changes}")
        if changes[0].version != 0:
            raise fail(8, f"SESSION_CREATED must carry version 0, not {changes[0].version}")
        for action in step.actions:
            if isinstance(action, EmitEvent) and action.session != rec.session_id.hex:
                raise fail(1, f"event names session {action.session}, the record {rec.session_id.hex}")
            if isinstance(action, (BindTransport, ReleaseTransport, Terminate)):
                raise fail(3, f"creation may not {type(action).__name__}")
        self._bound = None
        self._unbound_since = rec.created_at

    # -- every later step ---------------------------------------------------------------
    def _check_step(self, index: int, prev: Step, step: Step) -> None:  # noqa: C901 - one pass, ten properties
        policy = self.policy
        sid = self._sid
        assert sid is not None

        def fail(prop: int, message: str) -> PropertyViolation:
            return PropertyViolation(prop, self.role.value, index, step, message)

        before, after = prev.record, step.record

        # Property 3, first: the machine attempted no transition that the table refused.
        _check_no_invalid_transition(prev, step, fail)

        # Property 1: identity never changes.
        if after.session_id != sid:
            raise fail(1, f"record.session_id changed from {sid.hex} to {after.session_id.hex}")

        # Property 10: nothing happens after TERMINATED.
        if before.state is S.TERMINATED:
            for action in step.actions:
                if isinstance(action, (BindTransport, ReleaseTransport, Terminate)):
                    raise fail(10, f"{type(action).__name__} after TERMINATED")
                if isinstance(action, EmitEvent) and action.kind in (
                    EventKind.STATE_CHANGE,
                    EventKind.TRANSPORT_SWITCH,
                ):
                    raise fail(10, f"{action.kind.value} {action.reason.value} after TERMINATED")
                if isinstance(action, SendReattachAck):
                    raise fail(10, "a REATTACH was acknowledged after TERMINATED")
            if after != before:
                raise fail(10, f"the record changed after TERMINATED: {before} -> {after}")
            if self.role is Role.GATEWAY and (
                step.last_nonce != prev.last_nonce or step.clock_offset_ms != prev.clock_offset_ms
            ):
                raise fail(10, "replay state changed after TERMINATED")

        # Bounds that must already hold at this step's `now` (measured from the
        # state at the end of the previous step: nothing happened in between).
        ttl_s = policy.transport_loss_ttl_ms / 1000.0
        window_s = policy.max_recovery_window_ms / 1000.0
        unbound_since, recovering_since = self._unbound_since, self._recovering_since

        # One ordered walk over the actions: Properties 1, 2, 3, 5, 6, 8, 10.
        state, version = before.state, before.version
        bound = self._bound
        boundary_binding = bound  # the binding as of the last STATE_CHANGE (or step start)
        was_bound_in_step = bound is not None
        last_change: EmitEvent | None = None  # the previous event, if it was a STATE_CHANGE
        last_rule_reason: ReasonCode | None = None
        pending_switches = 0  # REATTACH_CONFIRMED binds still owed a TRANSPORT_SWITCH
        terminated_by: ReasonCode | None = None
        terminate_actions: list[Terminate] = []
        transitions = 0
        denied = False
        for action in step.actions:
            if isinstance(action, EmitEvent):
                if action.session != sid.hex:
                    raise fail(1, f"{action.kind.value} names session {action.session}, not {sid.hex}")
                if action.t != step.now:
                    raise fail(3, f"{action.kind.value} stamped t={action.t}, the step ran at now={step.now}")
                if action.role is not self.role:
                    raise fail(3, f"{action.kind.value} claims role {action.role.value}")
                if pending_switches and action.kind is not EventKind.TRANSPORT_SWITCH:
                    raise fail(5, "a REATTACH_CONFIRMED rebind is not followed by its TRANSPORT_SWITCH")
                if action.kind is EventKind.STATE_CHANGE:
                    from_state = _detail(action, "from_state")
                    to_state = _detail(action, "to_state")
                    if state is S.TERMINATED:
                        raise fail(10, f"STATE_CHANGE {action.reason.value} after TERMINATED")
                    if from_state != state.value:
                        raise fail(3, f"STATE_CHANGE says from {from_state}, the session was {state.value}")
                    if to_state == S.TERMINATED.value and action.reason not in TERMINATION_REASONS:
                        raise fail(10, f"terminated for {action.reason.value}, not a listed termination reason")
                    rule = TRANSITIONS.get((state, action.reason))
                    if rule is None:
                        raise fail(3, f"({state.value}, {action.reason.value}) is not a row of the table")
                    if rule.to.value != to_state:
                        raise fail(3, f"({state.value}, {action.reason.value}) -> {rule.to.value}, logged {to_state}")
                    if action.version != version + 1:
                        raise fail(8, f"STATE_CHANGE version {action.version} after version {version}")
                    if rule.guard is Guard.BOUND and boundary_binding is None:
                        raise fail(3, f"{action.reason.value} needs a binding, the session had none")
                    if rule.guard is Guard.UNBOUND and boundary_binding is not None:
                        raise fail(3, f"{action.reason.value} needs an unbound session, it had {boundary_binding}")
                    if rule.effect is BindingEffect.KEEP and bound != boundary_binding:
                        raise fail(
                            3, f"{action.reason.value} keeps the binding, but it went {boundary_binding} -> {bound}"
                        )
                    if rule.effect is BindingEffect.RELEASE and bound is not None:
                        raise fail(3, f"{action.reason.value} releases the binding, still bound to {bound}")
                    if rule.effect is BindingEffect.BIND and bound is None:
                        raise fail(3, f"{action.reason.value} binds, but nothing is bound")
                    logged = _detail(action, "binding")
                    if logged != (str(bound) if bound is not None else None):
                        raise fail(3, f"STATE_CHANGE logs binding {logged}, the actions left {bound}")
                    if action.reason is R.REATTACH_CONFIRMED and rule.effect is BindingEffect.BIND:
                        # Every confirmed REATTACH is a switch, including a rebind on the same
                        # path after a NAT change (the local binding stays, the transport moved).
                        pending_switches += 1
                    if rule.effect is BindingEffect.BIND and bound != boundary_binding:
                        if action.reason is not R.REATTACH_CONFIRMED and action.reason is not R.HANDSHAKE_COMPLETE:
                            raise fail(5, f"rebound by {action.reason.value}, not by a confirmed reattach")
                    if rule.to is S.TERMINATED:
                        terminated_by = action.reason
                    if rule.to is S.RECOVERING and state is not S.RECOVERING:
                        self._recovering_since = step.now
                    elif rule.to is not S.RECOVERING:
                        self._recovering_since = None
                    state, version = rule.to, version + 1
                    boundary_binding = bound
                    transitions += 1
                    last_change = action
                    last_rule_reason = action.reason
                    continue
                if action.kind is EventKind.TRANSPORT_SWITCH:
                    if last_change is None or last_rule_reason is not R.REATTACH_CONFIRMED or not pending_switches:
                        raise fail(5, "TRANSPORT_SWITCH without a REATTACH_CONFIRMED rebind right before it")
                    if action.version != last_change.version or action.version < 1:
                        raise fail(
                            5, f"TRANSPORT_SWITCH version {action.version} does not continue {last_change.version}"
                        )
                    to_path = _detail(action, "to_path")
                    if bound is None or to_path != str(bound.path):
                        raise fail(5, f"TRANSPORT_SWITCH to {to_path}, but bound to {bound}")
                    pending_switches -= 1
                    self._count_switch(action.t, fail)
                elif action.version != version:
                    raise fail(8, f"{action.kind.value} carries version {action.version}, current is {version}")
                if action.kind is EventKind.SWITCH_DENIED:
                    denied = True
                elif action.kind is EventKind.REATTACH_REJECTED and action.reason is R.RATE_LIMITED:
                    denied = True
                last_change = None
            elif isinstance(action, BindTransport):
                if state is S.TERMINATED:
                    raise fail(10, f"BindTransport({action.binding}) after TERMINATED")
                if bound is not None:
                    raise fail(2, f"BindTransport({action.binding}) while {bound} is still bound (no Release first)")
                bound = action.binding
                was_bound_in_step = True
                last_change = None
            elif isinstance(action, ReleaseTransport):
                if bound != action.binding:
                    raise fail(2, f"ReleaseTransport({action.binding}) but the active binding is {bound}")
                bound = None
                last_change = None
            elif isinstance(action, Terminate):
                if state is not S.TERMINATED or terminated_by is None:
                    raise fail(10, f"Terminate({action.reason.value}) without a STATE_CHANGE -> TERMINATED before it")
                if action.reason is not terminated_by:
                    raise fail(10, f"Terminate({action.reason.value}) after terminating for {terminated_by.value}")
                terminate_actions.append(action)
                last_change = None
            else:
                last_change = None
        if pending_switches:
            raise fail(5, "a REATTACH_CONFIRMED rebind without its TRANSPORT_SWITCH")

        # Property 2: the replayed binding is the record's.
        if bound != after.binding:
            raise fail(2, f"Bind/Release actions leave {bound}, but record.binding is {after.binding}")
        if bound != boundary_binding:
            raise fail(3, f"binding changed {boundary_binding} -> {bound} with no STATE_CHANGE after it")
        # Property 3 / 8: the record moved exactly as announced.
        if after.state is not state:
            raise fail(3, f"state went {before.state.value} -> {after.state.value}, events say {state.value}")
        if after.version != before.version + transitions:
            raise fail(
                8, f"version went {before.version} -> {after.version} over {transitions} logged transition(s)"
            )
        # Property 10: a termination carries its Terminate; a terminated session is unbound.
        if terminated_by is not None and len(terminate_actions) != 1:
            raise fail(10, f"terminated for {terminated_by.value} with {len(terminate_actions)} Terminate actions")
        if after.state is S.TERMINATED and after.binding is not None:
            raise fail(2, f"TERMINATED but still bound to {after.binding}")

        # Property 4: bounded recovery, measured at this step's `now`.
        if before.binding is None and unbound_since is not None and step.now > unbound_since + ttl_s:
            if after.state is not S.TERMINATED:
                raise fail(
                    4,
                    f"unbound since t={unbound_since} ({(step.now - unbound_since) * 1000:.0f} ms > "
                    f"transport_loss_ttl_ms {policy.transport_loss_ttl_ms}) but {after.state.value}",
                )
        if (
            before.state is S.RECOVERING
            and recovering_since is not None
            and step.now > recovering_since + window_s
            and after.state is S.RECOVERING
        ):
            raise fail(
                4,
                f"RECOVERING since t={recovering_since}, over max_recovery_window_ms "
                f"{policy.max_recovery_window_ms} at t={step.now}",
            )
        if after.binding is not None:
            self._unbound_since = None
        elif was_bound_in_step:
            self._unbound_since = step.now
        if after.state is not S.RECOVERING:
            self._recovering_since = None

        # Property 6: a denied switch leaves the session DEGRADED (or over).
        if denied and after.state not in (S.DEGRADED, S.TERMINATED):
            raise fail(6, f"a needed switch was denied but the session is {after.state.value}")

        if self.role is Role.GATEWAY:
            self._check_gateway(prev, step, fail)
        self._bound = bound

    def _count_switch(self, t: float, fail: Callable[[int, str], PropertyViolation]) -> None:
        self._switches.append(t)
        # A switch at s counts against the rate while t < s + 60 s (the window ending at t).
        while self._switches and not t < self._switches[0] + SWITCH_RATE_WINDOW_S:
            self._switches.popleft()
        count = len(self._switches)
        self._max_switches_seen = max(self._max_switches_seen, count)
        if count > self.policy.max_switches_per_minute:
            raise fail(
                6,
                f"{count} TRANSPORT_SWITCH events in the 60 s window ending at t={t} "
                f"(max_switches_per_minute {self.policy.max_switches_per_minute})",
            )

    def _check_return_routability(
        self, prev: Step, step: Step, fail: Callable[[int, str], PropertyViolation]
    ) -> None:
        """Property 3, path validation: no binding moves to an address that has not shown it reaches the client."""
        req = step.input
        for action in step.actions:
            if isinstance(action, SendPathChallenge) and not (
                isinstance(req, ev.ReattachReceived) and action.endpoint == req.endpoint
            ):
                raise fail(3, f"{action} is not addressed to the REATTACH of this step ({type(req).__name__})")
        if prev.record.state is S.BIRTH:
            return  # the handshake's own round trip shows the first address
        cache_s = self.policy.path_validation_cache_ms / 1000.0
        for bind in (a for a in step.actions if isinstance(a, BindTransport)):
            endpoint = bind.binding.endpoint
            was_bound = prev.record.binding is not None and prev.record.binding.endpoint == endpoint
            at = prev.validated.get(endpoint)
            cached = at is not None and step.now - at <= cache_s
            held = prev.challenges.get(endpoint)
            echoed = (
                isinstance(req, ev.PathResponseReceived)
                and req.endpoint == endpoint
                and held is not None
                and held.challenge == req.challenge
            )
            if not (was_bound or cached or echoed):
                raise fail(3, f"bound {bind.binding}: its address never answered a PATH_CHALLENGE")

    def _check_gateway(self, prev: Step, step: Step, fail: Callable[[int, str], PropertyViolation]) -> None:
        gateway = self.gateway
        assert gateway is not None
        req = step.input
        if isinstance(req, ev.PathResponseReceived):
            held = prev.challenges.get(req.endpoint)
            if held is not None and (held.challenge, held.request.nonce, held.request.path) == (
                req.challenge,
                req.nonce,
                req.path,
            ):
                req = held.request  # the echo completes this REATTACH: check it as that request, now
            elif step.record != prev.record or step.last_nonce != prev.last_nonce:
                raise fail(3, f"a PATH_RESPONSE that matches no challenge changed the session: {req}")
        # Property 7: the accepted nonce only grows, and only by an accepted REATTACH.
        if step.last_nonce != prev.last_nonce:
            if not isinstance(req, ev.ReattachReceived):
                raise fail(7, f"last_nonce moved {prev.last_nonce} -> {step.last_nonce} without a REATTACH")
            if step.last_nonce != req.nonce or (prev.last_nonce is not None and req.nonce <= prev.last_nonce):
                raise fail(7, f"last_nonce moved {prev.last_nonce} -> {step.last_nonce} on nonce {req.nonce}")
        binds = [a for a in step.actions if isinstance(a, BindTransport)]
        if isinstance(req, ev.ReattachReceived):
            # Property 3 (and spec 7): an ACK tells the client the switch happened, so it may
            # only answer a REATTACH whose binding is then the active one (by a logged
            # REATTACH_CONFIRMED, or because it was already bound): never an implicit accept.
            requested = Binding(path=req.path, endpoint=req.endpoint)
            if any(isinstance(a, SendReattachAck) for a in step.actions) and step.record.binding != requested:
                raise fail(
                    3,
                    f"acknowledged a REATTACH for {requested} but is {step.record.state.value} "
                    f"bound to {step.record.binding} (accepted with no transition)",
                )
            defects = reattach_defects(req, before=prev, policy=self.policy, gateway=gateway, now=step.now)
            if defects:
                prop, why = defects[0]  # in the spec's order: 7 (proof, identity, freshness), 9, 8
                mutated = (
                    step.record != prev.record
                    or step.last_nonce != prev.last_nonce
                    or step.clock_offset_ms != prev.clock_offset_ms
                )
                if mutated:
                    raise fail(
                        prop,
                        f"a REATTACH that must be rejected ({why}) mutated the session: "
                        f"record {prev.record} -> {step.record}, last_nonce {prev.last_nonce} -> "
                        f"{step.last_nonce}, clock_offset_ms {prev.clock_offset_ms} -> {step.clock_offset_ms}",
                    )
                for action in step.actions:
                    if isinstance(action, (BindTransport, ReleaseTransport, SendReattachAck, Terminate)):
                        raise fail(prop, f"a REATTACH that must be rejected ({why}) produced {action}")
            if binds and not ownership_valid(req, prev.record.session_id, gateway):
                raise fail(9, f"bound {binds[0].binding} on a REATTACH whose ownership is {req.ownership!r}")
        elif binds and not (prev.record.state is S.BIRTH and isinstance(req, ev.PacketAuthenticated)):
            raise fail(9, f"bound {binds[0].binding} on {type(req).__name__}, neither a handshake nor a REATTACH")
        if isinstance(req, ev.OwnershipLost) and prev.record.state is not S.TERMINATED:
            if step.record.state is not S.TERMINATED or step.record.binding is not None:
                raise fail(9, f"ownership lost, but {step.record.state.value} bound to {step.record.binding}")
        self._check_return_routability(prev, step, fail)


# =============================================================================
# Recording traces from live machines
# =============================================================================


class Recorder:
    """Collects a machine's steps: step 0 from ``creation_events()``, then one per ``handle`` call.

    Use :meth:`tap` as the tap of ``Pair.start(attach=...)``; :meth:`drain` hands the
    steps recorded since the last drain to a checker.
    """

    def __init__(self, machine: ClientSession | GatewaySession, *, resume: bool = False) -> None:
        """Start recording ``machine``; ``resume=True`` skips step 0 (a copy whose creation was checked)."""
        self.machine = machine
        self.role = machine.role
        self.steps: list[Step] = []
        self.last: Step | None = None  # kept when drain(forget=True) drops the steps
        self._drained = 0
        if not resume:
            self._append(None, machine.record.created_at, machine.creation_events())

    def _append(self, event: object | None, now: float, actions: Sequence[Action]) -> None:
        machine = self.machine
        invalid = machine.counters.get("invalid_transitions", 0)
        if isinstance(machine, GatewaySession):
            step = Step(
                now=now,
                input=event,
                actions=tuple(actions),
                record=machine.record,
                last_nonce=machine.last_nonce,
                clock_offset_ms=machine.clock_offset_ms,
                invalid_transitions=invalid,
                challenges=dict(machine.challenges),
                validated=dict(machine.validated),
            )
        else:
            step = Step(
                now=now, input=event, actions=tuple(actions), record=machine.record, invalid_transitions=invalid
            )
        self.steps.append(step)
        self.last = step

    def tap(self, event: object, now: float, actions: list[Action]) -> None:
        self._append(event, now, actions)

    def drain(self, *, forget: bool = False) -> list[Step]:
        """The steps recorded since the last drain; ``forget=True`` also drops them from memory."""
        new = self.steps[self._drained :]
        if forget:
            self.steps = []
            self._drained = 0
        else:
            self._drained = len(self.steps)
        return new

    def check_live_counter(self, index: int) -> None:
        """The machine's own ``invalid_transitions`` is still 0 now (not only at its recorded steps).

        The steps already carry the counter; this also catches a transition attempted
        outside ``handle`` (a test poking ``_transition``), which no step would show.
        ``index`` is the last step's number, for the message.
        """
        live = self.machine.counters.get("invalid_transitions", 0)
        if live:
            machine = self.machine
            last = self.last or Step(now=machine.record.created_at, input=None, actions=(), record=machine.record)
            raise PropertyViolation(
                3,
                self.role.value,
                index,
                last,
                f"counters['invalid_transitions'] is {live} at the end of the trace: "
                "the machine attempted a transition the table has no row for",
            )

    def checker(self) -> TraceChecker:
        machine = self.machine
        gateway = (
            GatewayIdentity(node_id=machine.node_id, held_revision=machine.held_revision)
            if isinstance(machine, GatewaySession)
            else None
        )
        return TraceChecker(role=self.role, policy=machine.policy, gateway=gateway)


class PairTracer:
    """Records both sides of a ``Pair`` and checks them incrementally.

    ``tracer = PairTracer(); pair = Pair.start(attach=tracer.attach, ...)``;
    then ``tracer.check()`` after any number of inputs.
    """

    def __init__(self) -> None:
        self.recorders: dict[str, Recorder] = {}
        self.checkers: dict[str, TraceChecker] = {}
        self.violation: PropertyViolation | None = None

    def attach(
        self, side: str, machine: ClientSession | GatewaySession
    ) -> Callable[[object, float, list[Action]], None]:
        recorder = Recorder(machine)
        self.recorders[side] = recorder
        self.checkers[side] = recorder.checker()
        return recorder.tap

    def check(self) -> None:
        """Feed every step recorded since the last call to its side's checker; then the live counters.

        After a violation, later calls check nothing: a state machine's teardown must not
        replace the first violation with a consequence of it.
        """
        if self.violation is not None:
            return
        try:
            check_recorded(self.checkers, self.recorders)
        except PropertyViolation as violation:
            self.violation = violation
            raise

    def steps(self, side: str) -> list[Step]:
        return self.recorders[side].steps


def check_recorded(
    checkers: dict[str, TraceChecker], recorders: dict[str, Recorder], *, forget: bool = False
) -> None:
    """Both sides: the steps recorded since the last drain through their checker, then the live counter.

    ``forget=True`` drops the drained steps (the exhaustive exploration keeps no history).
    """
    for side in ("gateway", "client"):
        checkers[side].feed_all(recorders[side].drain(forget=forget))
        recorders[side].check_live_counter(checkers[side].steps_checked - 1)


def check_trace(
    steps: Sequence[Step], *, role: Role, policy: Policy, gateway: GatewayIdentity | None = None
) -> TraceChecker:
    """Check a whole trace at once; returns the checker (for its counters) or raises."""
    checker = TraceChecker(role=role, policy=policy, gateway=gateway)
    checker.feed_all(steps)
    return checker
