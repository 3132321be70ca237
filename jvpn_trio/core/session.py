"""Session machines: the client's and the gateway's view of one session.

Theory of operation
-------------------
Both machines keep a frozen :class:`SessionRecord` (SessionID, state,
state_version, the single active binding, and the timestamps the bounds
need) and replace it only in :meth:`_SessionCore._transition`, which looks
the change up in the transition table (``states.py``) and commits state,
binding and ``version + 1`` in one assignment.  Nothing else assigns a
record.  Each ``handle(event, now=...)`` call does three things in a fixed
order, so the same ``(now, event)`` sequence always yields the same actions:

1. enforce the time bounds up to ``now`` (session TTL, Property 4's
   transport-loss TTL, the recovery window, the end of a rate penalty);
2. apply the input;
3. evaluate: health verdicts -> transitions of the active path's state, then
   the switch decision (``switching.py``) -> REATTACH or DEGRADED.

The gateway is authoritative for binding and version: it validates a
REATTACH (``reattach.py``) and answers with the new version.  A move to an
address that has not shown it reaches the client waits for the answer to a
PATH_CHALLENGE sent there (docs/spec.md, "Path validation"); until then the
old binding stays.  The client runs
the same table on its own view: it decides *when* to move (it is the one
that can see every path's health) and tracks the gateway's version to put in
its next REATTACH.  Drivers call ``next_deadline()`` after every call and
deliver :class:`TimerFired` at that time (``now = max(deadline, clock)``).

Fencing (docs/cluster.md): the gateway sends the ownership store revision it
holds for the session (``held_revision``) as the *owner epoch* in
HANDSHAKE_RESP and every REATTACH_ACK.  The client remembers the highest epoch
it has seen and refuses an ack with a lower one (``STALE_EPOCH``, a
SECURITY_EVENT, nothing changes): a gateway that lost the session to another
node may still hold its keys, but it can no longer move the client.
"""

from __future__ import annotations

import enum
import math
from typing import Iterable

import attrs

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import (
    Action,
    BindTransport,
    EmitEvent,
    EventKind,
    ReleaseTransport,
    Role,
    Scalar,
    SendClose,
    SendPathChallenge,
    SendPathResponse,
    SendReattach,
    SendReattachAck,
    SendReattachReject,
    Terminate,
)
from jvpn_trio.core.health import PathHealth, PathStats, PathVerdict, Verdict
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.ownership import Takeover
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.reattach import (
    MAX_PENDING_CHALLENGES,
    MAX_VALIDATED_ADDRESSES,
    Accept,
    ReattachContext,
    Reject,
    rate_has_room,
    switch_expires_at,
    address_validated,
    switches_in_window,
    validate_reattach,
)
from jvpn_trio.core.states import (
    CLOSE_REASONS,
    BindingEffect,
    ReasonCode,
    Rejected,
    SessionState,
    plan_transition,
)
from jvpn_trio.core.switching import Candidate, DecisionKind, SwitchView, decide, second_opinion_at

S = SessionState
R = ReasonCode


@attrs.frozen(kw_only=True)
class SessionRecord:
    """The versioned session state.  Replaced whole, never edited in place."""

    session_id: SessionId
    state: SessionState
    version: int
    binding: Binding | None
    created_at: float
    unbound_since: float | None
    recovering_since: float | None
    bound_since: float | None
    last_path: PathId | None
    switch_times: tuple[float, ...]


def _min_deadline(candidates: Iterable[float | None]) -> float | None:
    present = [c for c in candidates if c is not None]
    return min(present) if present else None


class _SessionCore:
    """What both sides share: the record, the table-driven commit, the time bounds."""

    role: Role
    #: The session this one follows in an agent's chain (core/agent.py), named at BIRTH; a client's only.
    previous_session: SessionId | None = None
    reconnect_by = ""

    def __init__(self, *, policy: Policy, session_id: SessionId, now: float) -> None:
        self.policy = policy
        self.record = SessionRecord(
            session_id=session_id,
            state=S.BIRTH,
            version=0,
            binding=None,
            created_at=now,
            unbound_since=now,
            recovering_since=None,
            bound_since=None,
            last_path=None,
            switch_times=(),
        )
        self.counters: dict[str, int] = {}

    # -- observability ----------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _event(self, kind: EventKind, reason: ReasonCode, now: float, **details: Scalar) -> EmitEvent:
        return EmitEvent(
            kind=kind,
            t=now,
            role=self.role,
            session=self.record.session_id.hex,
            version=self.record.version,
            reason=reason,
            policy=self.policy.fingerprint,
            details=details,
        )

    def creation_events(self) -> list[Action]:
        """The record of the session's birth (version 0), for the first log line."""
        follows: dict[str, Scalar] = {}
        if self.previous_session is not None:
            follows["previous_session"] = self.previous_session.hex
        born: list[Action] = [
            self._event(
                EventKind.STATE_CHANGE,
                R.SESSION_CREATED,
                self.record.created_at,
                from_state=None,
                to_state=S.BIRTH.value,
                **follows,
            )
        ]
        if self.reconnect_by:  # a person's reconnect, asked while no session was live, is logged by the one it started
            born.append(
                self._event(EventKind.OPERATOR_ACTION, R.OPERATOR_RECONNECT, self.record.created_at, by=self.reconnect_by)
            )
        return born

    # -- the one place where state, binding and version change -----------------
    def _transition(
        self,
        reason: ReasonCode,
        now: float,
        *,
        binding: Binding | None = None,
        cause: ReasonCode | None = None,
        **details: Scalar,
    ) -> list[Action]:
        """Commit the table's transition for ``reason`` or, if it has none, change nothing."""
        old = self.record
        plan = plan_transition(old.state, reason, bound=old.binding is not None)
        if isinstance(plan, Rejected):
            self._count("invalid_transitions")
            return []
        actions: list[Action] = []
        new_binding = old.binding
        if plan.effect is BindingEffect.RELEASE:
            new_binding = None
            if old.binding is not None:
                actions.append(ReleaseTransport(old.binding))
        elif plan.effect is BindingEffect.BIND:
            if binding is None:  # a BIND rule always comes with the binding to make
                self._count("invalid_transitions")
                return []
            if old.binding is not None and old.binding != binding:
                actions.append(ReleaseTransport(old.binding))
            if old.binding != binding:
                actions.append(BindTransport(binding))
            new_binding = binding
        switch_times = old.switch_times
        if reason is R.REATTACH_CONFIRMED:
            switch_times = tuple(t for t in old.switch_times if now < switch_expires_at(t)) + (now,)
        self.record = attrs.evolve(
            old,
            state=plan.to,
            version=old.version + 1,
            binding=new_binding,
            unbound_since=None if new_binding is not None else (old.unbound_since if old.binding is None else now),
            recovering_since=(
                (old.recovering_since if old.state is S.RECOVERING else now) if plan.to is S.RECOVERING else None
            ),
            bound_since=now if plan.effect is BindingEffect.BIND else (old.bound_since if new_binding else None),
            last_path=old.binding.path if old.binding is not None else old.last_path,
            switch_times=switch_times,
        )
        actions.append(
            self._event(
                EventKind.STATE_CHANGE,
                reason,
                now,
                from_state=old.state.value,
                to_state=plan.to.value,
                binding=str(new_binding) if new_binding else None,
                **details,
            )
        )
        if plan.effect is BindingEffect.BIND and reason is R.REATTACH_CONFIRMED:
            previous = old.binding.path if old.binding is not None else old.last_path
            actions.append(
                self._event(
                    EventKind.TRANSPORT_SWITCH,
                    cause or reason,
                    now,
                    from_path=str(previous) if previous else None,
                    to_path=str(new_binding.path) if new_binding else None,
                    binding=str(new_binding) if new_binding else None,
                    switches_last_minute=switches_in_window(switch_times, now),
                )
            )
        if plan.to is S.TERMINATED:
            actions.append(Terminate(reason=reason))
        return actions

    # -- time bounds (spec 8, 11; Properties 4, 6, 10) --------------------------
    def session_deadline(self) -> float:
        return self.record.created_at + self.policy.session_ttl_s

    def unbound_deadline(self) -> float | None:
        since = self.record.unbound_since
        if self.record.binding is not None or since is None:
            return None
        return since + self.policy.transport_loss_ttl_ms / 1000.0

    def recovery_deadline(self) -> float | None:
        if self.record.state is not S.RECOVERING or self.record.recovering_since is None:
            return None
        return self.record.recovering_since + self.policy.max_recovery_window_ms / 1000.0

    def rate_clear_deadline(self) -> float | None:
        """When a DEGRADED-for-rate session may leave DEGRADED: its oldest switch leaves the window."""
        rec = self.record
        if rec.state is not S.DEGRADED or rec.binding is None or not rec.switch_times:
            return None
        return switch_expires_at(min(rec.switch_times))

    def _enforce_bounds(self, now: float) -> list[Action]:
        rec = self.record
        if rec.state is S.TERMINATED:
            return []
        if now >= self.session_deadline():
            return self._transition(R.SESSION_TTL_EXPIRED, now)
        unbound = self.unbound_deadline()
        if unbound is not None and now >= unbound:
            return self._transition(R.TRANSPORT_LOSS_TTL_EXPIRED, now)
        recovery = self.recovery_deadline()
        if recovery is not None and now >= recovery:
            return self._transition(R.RECOVERY_WINDOW_EXCEEDED, now)
        if (
            rec.state is S.DEGRADED
            and rec.binding is not None
            and rate_has_room(rec.switch_times, self.policy, now)
        ):
            return self._transition(R.RATE_WINDOW_CLEARED, now)
        return []

    def _bound_deadlines(self) -> list[float | None]:
        if self.record.state is S.TERMINATED:
            return []
        return [
            self.session_deadline(),
            self.unbound_deadline(),
            self.recovery_deadline(),
            self.rate_clear_deadline(),
        ]

    @property
    def terminated(self) -> bool:
        return self.record.state is S.TERMINATED

    def _degrade_for_rate(self, now: float, *, denied_path: PathId | None = None) -> list[Action]:
        """Property 6's DEGRADED on a refused switch; a session already DEGRADED stays as it is."""
        if self.record.state in (S.DEGRADED, S.BIRTH, S.TERMINATED):
            return []
        if denied_path is None:
            return self._transition(R.SWITCH_RATE_EXCEEDED, now)
        return self._transition(R.SWITCH_RATE_EXCEEDED, now, denied_path=str(denied_path))

    def _apply_ending(self, event: ev.CloseRequested | ev.PeerClosed | ev.KeysExhausted, now: float) -> list[Action]:
        """The inputs that end a session the same way on both sides."""
        if isinstance(event, ev.CloseRequested):
            reason = event.reason
            if reason not in CLOSE_REASONS:  # a driver's mistake: still an explicit close, never a silent one
                self._count("unknown_close_reasons")
                reason = R.LOCAL_CLOSE
            asked: list[Action] = []
            if event.by and event.action in (R.OPERATOR_DISCONNECT, R.OPERATOR_RECONNECT):
                asked.append(self._event(EventKind.OPERATOR_ACTION, event.action, now, by=event.by))
            return [*asked, SendClose(reason=reason, binding=self.record.binding), *self._transition(reason, now)]
        if isinstance(event, ev.PeerClosed):
            return self._transition(R.PEER_CLOSE, now, peer_reason=event.reason.value)
        return self._transition(R.KEY_EXHAUSTED, now)


# =============================================================================
# Client
# =============================================================================


class ProbeRole(enum.Enum):
    """Why a path is probed at the cadence it is (``ClientSession.probe_role``)."""

    ACTIVE = "active"  # probe_interval_ms
    #: The bound path with no traffic either way for idle_after_ms: its cost's standby cadence.
    IDLE = "idle"
    STANDBY = "standby"  # standby_probe_interval_ms
    METERED = "metered"  # metered_probe_interval_ms
    #: The bound path with our data unanswered (``PathHealth.silent_from``): every silence-probe timeout.
    SILENT = "silent"


@attrs.frozen(kw_only=True)
class PendingReattach:
    path: PathId
    nonce: int
    sent_at: float
    cause: ReasonCode


@attrs.frozen(kw_only=True)
class PathSnapshot:
    path: PathId
    priority: int
    endpoint: tuple[str, int]
    verdict: PathVerdict
    stats: PathStats
    active: bool
    pinned: bool
    metered: bool = False
    #: "active", "idle", "standby", "metered" or "silent": the cadence it is probed at (``ClientSession.probe_role``).
    probe_role: str = "active"


@attrs.frozen(kw_only=True)
class ClientSnapshot:
    """Everything the UI and `status` show, frozen at one ``now``."""

    now: float
    record: SessionRecord
    policy_fingerprint: str
    max_switches_per_minute: int
    switches_last_minute: int
    gateway_version: int
    paths: tuple[PathSnapshot, ...]
    pinned: PathId | None
    pending: PendingReattach | None
    recovery_deadline: float | None
    unbound_deadline: float | None
    counters: tuple[tuple[str, int], ...]
    #: The highest fencing epoch the gateway has shown (``ClientSession.owner_epoch``).
    owner_epoch: int = 0


@attrs.define
class _PathEntry:
    priority: int
    endpoint: tuple[str, int]
    health: PathHealth
    metered: bool = False
    #: When the last probe left (ProbeSent); None: never, so one is due at once.
    last_probe: float | None = None
    #: A link or address event on it: probe it at once, whatever its role.
    probe_now: bool = True


class ClientSession(_SessionCore):
    """The client's session: sees every path, decides when to move, asks the gateway."""

    role = Role.CLIENT

    def __init__(
        self,
        *,
        policy: Policy,
        session_id: SessionId,
        now: float,
        previous_session: SessionId | None = None,
        switch_times: tuple[float, ...] = (),
        reconnect_by: str = "",
    ) -> None:
        """``previous_session``, ``switch_times`` and ``reconnect_by`` come from the agent (``core/agent.py``)."""
        super().__init__(policy=policy, session_id=session_id, now=now)
        self.previous_session = previous_session
        self.reconnect_by = reconnect_by
        self.record = attrs.evolve(
            self.record, switch_times=tuple(t for t in switch_times if now < switch_expires_at(t))
        )
        self._paths: dict[PathId, _PathEntry] = {}
        self._reported: dict[PathId, tuple[Verdict, ReasonCode]] = {}
        self.gateway_version = 0
        #: The highest owner epoch seen (HANDSHAKE_RESP, REATTACH_ACK): an ack below it is stale.
        self._owner_epoch = 0
        #: Where the session clock of REATTACH timestamps starts: the creation, or the last takeover.
        self._clock_origin = now
        self.pinned: PathId | None = None
        self.pending: PendingReattach | None = None
        self._retry_not_before: float | None = None
        self._next_nonce = 1
        #: The latest ``now`` handled: a deadline at or before it would fire to no effect.
        self._latest_input_at = now
        self._recovery_cause: ReasonCode | None = None
        #: Consecutive PROBE_ACKs on the active path saying the gateway is bound elsewhere.
        self._disowned_acks = 0
        #: The active path was rebound to a new source address and no REATTACH has confirmed it yet.
        self._readdressed = False
        #: When data last went out (``DataSent``) or came in (``DeliveryObserved``): the tunnel is idle
        #: ``idle_after_ms`` later, and the bound path slows to its standby cadence.
        self._last_traffic: float | None = None

    # -- public API ----------------------------------------------------------------
    @property
    def owner_epoch(self) -> int:
        """The highest fencing epoch (ownership revision) a gateway has shown this session."""
        return self._owner_epoch

    def handle(self, event: ev.ClientInput, *, now: float) -> list[Action]:
        """Feed one input; returns the actions to carry out, in order."""
        self._latest_input_at = max(self._latest_input_at, now)
        actions = self._enforce_bounds(now)
        if self.terminated:
            self._count("inputs_after_termination")
            return actions
        actions += self._apply(event, now)
        if not self.terminated:
            actions += self._evaluate(now)
        return actions

    def next_deadline(self) -> float | None:
        if self.terminated:
            return None
        return _min_deadline(
            [
                *self._bound_deadlines(),
                *(entry.health.next_deadline() for entry in self._paths.values()),
                self.pending.sent_at + self.policy.reattach_timeout_ms / 1000.0 if self.pending else None,
                self._retry_not_before,
                self.second_opinion_deadline(),
            ]
        )

    def _silence_alarm(self) -> tuple[PathId, _PathEntry, float] | None:
        """The bound path, its entry and its silence alarm, while a second opinion is wanted."""
        binding = self.record.binding
        bound = self._paths.get(binding.path) if binding is not None else None
        if not self.policy.silence_second_opinion or binding is None or bound is None:
            return None
        alarm = bound.health.silence_alarm_at()
        return None if alarm is None else (binding.path, bound, alarm)

    def second_opinion_deadline(self) -> float | None:
        """When another path's answer makes the bound path's silence conclusive, if that is still
        ahead (``switching.second_opinion_at``): the switch is decided again then."""
        silence = self._silence_alarm()
        if silence is None:
            return None
        bound_path, bound, alarm = silence
        timeout_s = bound.health.silence_probe_timeout_s()
        instants = [
            second_opinion_at(entry.health.recent_answers(), alarm, timeout_s)
            for path, entry in self._paths.items()
            if path != bound_path
        ]
        return min((t for t in instants if t is not None and t > self._latest_input_at), default=None)

    # -- probing cadence (docs/policy.md, "Probing") ------------------------------------
    def probe_role(self, path: PathId, *, now: float) -> ProbeRole:
        """How ``path`` is probed at ``now`` (docs/policy.md, "Probing").

        At the active cadence: the bound path while traffic flows, a REATTACH's target, every path
        while the session is not ATTACHED (a failing binding needs a verified candidate fast), and an
        unmetered standby that answers but is IMPAIRED (earning HEALTHY back takes a loss window of
        fresh probes).  The bound path with no traffic for ``idle_after_ms`` is IDLE; the others are a
        standby, or a metered standby.
        """
        entry = self._paths[path]
        binding, pending = self.record.binding, self.pending
        if self.record.state is not S.ATTACHED or binding is None:
            return ProbeRole.ACTIVE
        if binding.path == path:
            if entry.health.is_silent(now):
                return ProbeRole.SILENT
            return ProbeRole.IDLE if now >= self._busy_until() else ProbeRole.ACTIVE
        if pending is not None and pending.path == path:
            return ProbeRole.ACTIVE
        if entry.metered:
            return ProbeRole.METERED
        return ProbeRole.ACTIVE if entry.health.committed.verdict is Verdict.IMPAIRED else ProbeRole.STANDBY

    def probe_due(self, path: PathId) -> float | None:
        """When the next PROBE on ``path`` should leave: its role's interval after the last one, or at
        once (``-inf``) for a path not probed yet or just changed (link up, new address).  None: unknown path.

        Deterministic: a pure function of the inputs so far.  The bound path's next probe is at the
        active cadence if it would leave while the tunnel is still busy, else at its idle cadence; so
        traffic after a quiet spell makes a probe due at once.  The driver sends at this time and reports
        ``ProbeSent``; a probe sent earlier (after a resume) is only extra evidence.
        """
        entry = self._paths.get(path)
        if entry is None:
            return None
        if entry.probe_now or entry.last_probe is None:
            return -math.inf
        policy = self.policy
        active_due = entry.last_probe + policy.probe_interval_ms / 1000.0
        role = self.probe_role(path, now=active_due)
        if role is ProbeRole.ACTIVE or role is ProbeRole.SILENT:
            due = active_due
        elif role is ProbeRole.METERED or (role is ProbeRole.IDLE and entry.metered):
            due = entry.last_probe + policy.metered_probe_ms / 1000.0
        else:
            due = entry.last_probe + policy.standby_probe_ms / 1000.0
        return min(due, self._silence_probe_due(path, entry), self._second_opinion_due(path, entry))

    def _second_opinion_due(self, path: PathId, entry: _PathEntry) -> float:
        """When a path other than the bound one is asked, once, whether it still gets answers: at the
        bound path's silence alarm (``PathHealth.silence_alarm_at``).  Only an answer to a probe sent
        since then lets the session leave a path for DATA_UNANSWERED (``switching.second_opinion_at``).
        A DEAD path (its link down, say) is not asked: it could not be the target anyway."""
        silence = self._silence_alarm()
        if silence is None or silence[0] == path:
            return math.inf
        if entry.last_probe is None or entry.health.committed.verdict is Verdict.DEAD:
            return math.inf
        alarm = silence[2]
        return alarm if entry.last_probe < alarm else math.inf

    def _silence_probe_due(self, path: PathId, entry: _PathEntry) -> float:
        """When the bound path, once silent, is probed next: when the silence begins, then every
        silence-probe timeout (``PathHealth.silent_from``); never while it answers."""
        binding = self.record.binding
        silent_from = entry.health.silent_from()
        if binding is None or binding.path != path or silent_from is None or entry.last_probe is None:
            return math.inf
        return max(silent_from, entry.last_probe + entry.health.silence_probe_timeout_s())

    def _busy_until(self) -> float:
        """The instant the tunnel turns idle: ``Policy.idle_ms`` after the last traffic or the binding."""
        last = max((t for t in (self._last_traffic, self.record.bound_since) if t is not None), default=-math.inf)
        return last + self.policy.idle_ms / 1000.0

    def snapshot(self, *, now: float) -> ClientSnapshot:
        active = self.record.binding.path if self.record.binding else None
        paths = tuple(
            PathSnapshot(
                path=path,
                priority=entry.priority,
                endpoint=entry.endpoint,
                verdict=entry.health.verdict(now=now),
                stats=entry.health.stats(now=now),
                active=path == active,
                pinned=path == self.pinned,
                metered=entry.metered,
                probe_role=self.probe_role(path, now=now).value,
            )
            for path, entry in sorted(self._paths.items())
        )
        return ClientSnapshot(
            now=now,
            record=self.record,
            policy_fingerprint=self.policy.fingerprint,
            max_switches_per_minute=self.policy.max_switches_per_minute,
            switches_last_minute=switches_in_window(self.record.switch_times, now),
            gateway_version=self.gateway_version,
            paths=paths,
            pinned=self.pinned,
            pending=self.pending,
            recovery_deadline=self.recovery_deadline(),
            unbound_deadline=self.unbound_deadline(),
            counters=tuple(sorted(self.counters.items())),
            owner_epoch=self._owner_epoch,
        )

    # -- inputs ----------------------------------------------------------------------
    def _apply(self, event: ev.ClientInput, now: float) -> list[Action]:
        if isinstance(event, ev.TimerFired):
            return []
        if isinstance(event, ev.ReevaluateRequested):  # the decision itself follows in handle()
            return [self._event(EventKind.OPERATOR_ACTION, R.OPERATOR_REEVALUATE, now, by=event.by)] if event.by else []
        if isinstance(event, ev.HandshakeCompleted):
            if event.session_id != self.record.session_id:
                self._count("session_mismatch")
                return []
            self.gateway_version = max(self.gateway_version, event.gateway_version)
            self._owner_epoch = max(self._owner_epoch, event.owner_epoch)
            return self._transition(R.HANDSHAKE_COMPLETE, now, binding=event.binding)
        if isinstance(event, ev.PathAdded):
            if event.path in self._paths:
                self._count("duplicate_path")
                return []
            health = PathHealth(event.path, self.policy, now=now, link_up=event.link_up)
            self._paths[event.path] = _PathEntry(event.priority, event.endpoint, health, metered=event.metered)
            return []
        if isinstance(event, ev.PathRemoved):
            # Removing the active path is its link's death: _evaluate releases the binding (LINK_DOWN).
            self._paths.pop(event.path, None)
            self._reported.pop(event.path, None)
            if self.pinned == event.path:
                self.pinned = None
            return []
        if isinstance(event, ev.PathCostChanged):
            entry = self._paths.get(event.path)
            if entry is None:
                self._count("unknown_path_inputs")
            else:
                entry.metered = event.metered  # the next decision ranks it by its new cost
            return []
        if isinstance(event, ev.TakenOver):
            return self._on_taken_over(event, now)
        if isinstance(event, ev.PathReaddressed):
            if event.path not in self._paths:
                self._count("unknown_path_inputs")
                return []
            self._paths[event.path].probe_now = True
            if self.record.binding is not None and self.record.binding.path == event.path:
                self._readdressed = True
            return []
        if isinstance(event, ev.PinRequested):
            return self._on_pin(event, now)
        if isinstance(event, ev.CloseRequested | ev.PeerClosed | ev.KeysExhausted):
            return self._apply_ending(event, now)
        if isinstance(event, ev.ReattachAcked):
            return self._on_reattach_acked(event, now)
        if isinstance(event, ev.ReattachRejected):
            return self._on_reattach_rejected(event, now)
        if isinstance(event, ev.PathChallenged):
            return self._on_path_challenged(event, now)
        entry = self._paths.get(event.path)
        if entry is None:
            self._count("unknown_path_inputs")
            return []
        if isinstance(event, ev.LinkChanged):
            entry.health.on_link(event.up, now=now)
            entry.probe_now = entry.probe_now or event.up
        elif isinstance(event, ev.ProbeSent):
            entry.health.on_probe_sent(event.seq, now=now)
            entry.last_probe, entry.probe_now = now, False
        elif isinstance(event, ev.ProbeAcked):
            entry.health.on_probe_acked(event.seq, now=now)
            self._note_gateway_binding(event)
            self.gateway_version = max(self.gateway_version, event.gateway_version)
        elif isinstance(event, ev.DeliveryObserved):
            entry.health.on_delivery(now=now)
            self._last_traffic = now
        elif isinstance(event, ev.DataSent):
            entry.health.on_data_sent(now=now)
            self._last_traffic = now
        return []

    def _on_pin(self, event: ev.PinRequested, now: float) -> list[Action]:
        """Pin (or unpin); a path that vanished meanwhile leaves the pin as it was, logged as not applied."""
        applied = event.path is None or event.path in self._paths
        if applied:
            self.pinned = event.path
        reason = R.OPERATOR_UNPIN if event.path is None else R.OPERATOR_PIN
        target = str(event.path) if event.path is not None else None
        return [self._event(EventKind.OPERATOR_ACTION, reason, now, by=event.by, path=target, applied=applied)]

    def _note_gateway_binding(self, ack: ev.ProbeAcked) -> None:
        """Count acks on the active path that say the gateway is not bound to it.

        Only acks at least as new as what we know count (``gateway_version``): one
        answered before the gateway processed our last REATTACH may still name the
        old binding, and must not trigger a rebind.
        """
        binding = self.record.binding
        if binding is None or ack.path != binding.path or self.pending is not None:
            return
        if ack.gateway_version < self.gateway_version:
            return
        self._disowned_acks = 0 if ack.gateway_bound_path == binding.path else self._disowned_acks + 1

    def _stale_epoch(self, epoch: int, now: float, **details: Scalar) -> EmitEvent:
        """The SECURITY_EVENT for an answer from a gateway fenced off by a later owner."""
        return self._event(
            EventKind.SECURITY_EVENT, R.STALE_EPOCH, now, owner_epoch=epoch, highest_epoch=self._owner_epoch, **details
        )

    def _on_taken_over(self, event: ev.TakenOver, now: float) -> list[Action]:
        """The session now lives at another gateway, which counts its age from the takeover.

        A REATTACH's timestamp is the session's age on the sender's clock, checked against the
        gateway's own count (core/reattach.py): the new owner began counting when it took the
        session over, so from now on ours does too.  Its epoch is the floor for every ack.
        """
        if event.owner_epoch < self._owner_epoch:  # an answer from a stale owner takes nothing over
            self._count("stale_epoch_takeovers")
            return [self._stale_epoch(event.owner_epoch, now)]
        self._owner_epoch = event.owner_epoch
        self._clock_origin = now
        self.pending = None  # a REATTACH still out went to the old gateway
        self._count("taken_over")
        return []

    def _on_reattach_acked(self, event: ev.ReattachAcked, now: float) -> list[Action]:
        """Commit the move the gateway confirmed, unless the ack is stray or fenced off.

        Fencing first: an ack whose owner epoch is below the highest seen comes from a
        gateway that no longer owns the session (it may still hold the keys), so it is a
        SECURITY_EVENT ``STALE_EPOCH`` and changes nothing, not even the pending REATTACH.
        """
        if event.owner_epoch < self._owner_epoch:
            self._count("stale_epoch_acks")
            return [self._stale_epoch(event.owner_epoch, now, path=str(event.path), nonce=event.nonce)]
        pending = self.pending
        if pending is None or event.nonce != pending.nonce or event.path != pending.path:
            self._count("stray_reattach_answers")
            return []
        entry = self._paths.get(pending.path)
        self.pending = None
        if entry is None:
            self._count("reattach_acked_for_removed_path")
            return []
        self.gateway_version = max(self.gateway_version, event.new_version)
        self._owner_epoch = event.owner_epoch  # not below it: checked above
        self._retry_not_before = None
        self._disowned_acks = 0
        self._readdressed = False
        return self._transition(
            R.REATTACH_CONFIRMED,
            now,
            binding=Binding(path=pending.path, endpoint=entry.endpoint),
            cause=pending.cause,
            gateway_version=event.new_version,
        )

    def _on_path_challenged(self, event: ev.PathChallenged, now: float) -> list[Action]:
        """Echo a challenge only for our own pending REATTACH, and only on the path it left by.

        The gateway moves the binding when the echo arrives from the address it challenged, so
        answering on any other path could prove an address we do not use.  The wait restarts:
        the echo and its REATTACH_ACK are one more round trip, given a full ``reattach_timeout_ms``.
        """
        pending = self.pending
        if pending is None or event.nonce != pending.nonce or not event.path == event.for_path == pending.path:
            self._count("stray_path_challenges")
            return []
        self.pending = attrs.evolve(pending, sent_at=now)
        self._count("path_responses_sent")
        return [SendPathResponse(path=pending.path, nonce=pending.nonce, challenge=event.challenge)]

    def _on_reattach_rejected(self, event: ev.ReattachRejected, now: float) -> list[Action]:
        pending = self.pending
        if pending is None or event.nonce != pending.nonce or event.path != pending.path:
            self._count("stray_reattach_answers")
            return []
        self.pending = None
        self._retry_not_before = now + self.policy.reattach_timeout_ms / 1000.0
        actions: list[Action] = [
            self._event(
                EventKind.REATTACH_REJECTED,
                event.reason,
                now,
                path=str(event.path),
                nonce=event.nonce,
                gateway_version=event.current_version,
            )
        ]
        if event.reason is R.STALE_VERSION:
            self.gateway_version = max(self.gateway_version, event.current_version)
            self._retry_not_before = None  # resynchronised: retry at once
        elif event.reason is R.RATE_LIMITED:
            actions += self._degrade_for_rate(now, denied_path=event.path)
        elif event.reason in (R.SESSION_TERMINATED, R.UNKNOWN_SESSION, R.SESSION_TTL_EXPIRED):
            actions += self._transition(R.PEER_CLOSE, now, peer_reason=event.reason.value)
        return actions

    # -- evaluation --------------------------------------------------------------------
    def _verdicts(self, now: float) -> dict[PathId, PathVerdict]:
        return {path: entry.health.verdict(now=now) for path, entry in sorted(self._paths.items())}

    def _evaluate(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for entry in self._paths.values():
            entry.health.expire(now=now)
        if self.pending is not None and now >= self.pending.sent_at + self.policy.reattach_timeout_ms / 1000.0:
            actions.append(
                self._event(
                    EventKind.REATTACH_REJECTED,
                    R.REATTACH_TIMEOUT,
                    now,
                    path=str(self.pending.path),
                    nonce=self.pending.nonce,
                )
            )
            self.pending = None
        if self._retry_not_before is not None and now >= self._retry_not_before:
            self._retry_not_before = None
        verdicts = self._verdicts(now)
        actions += self._report_health(verdicts, now)

        binding = self.record.binding
        if binding is not None:
            active = verdicts.get(binding.path)
            if active is None:
                self._recovery_cause = R.LINK_DOWN
                actions += self._transition(R.LINK_DOWN, now, path=str(binding.path), detail="path removed")
            elif active.verdict is Verdict.DEAD:
                self._recovery_cause = active.reason
                actions += self._transition(
                    active.reason, now, path=str(binding.path), measured=active.measured, threshold=active.threshold
                )
            elif active.verdict is Verdict.IMPAIRED and self.record.state is S.ATTACHED:
                actions += self._transition(
                    active.reason, now, path=str(binding.path), measured=active.measured, threshold=active.threshold
                )
            elif active.verdict is Verdict.HEALTHY and self.record.state is S.VOLATILE:
                actions += self._transition(R.PATH_HEALTHY_AGAIN, now, path=str(binding.path))
        if self.terminated:
            return actions
        actions += self._act_on_decision(verdicts, now)
        return actions

    def _act_on_decision(self, verdicts: dict[PathId, PathVerdict], now: float) -> list[Action]:
        rec = self.record
        view = SwitchView(
            state=rec.state,
            active=rec.binding.path if rec.binding else None,
            bound_since=rec.bound_since,
            pinned=self.pinned,
            reattach_in_flight=self.pending is not None or self._retry_not_before is not None,
            rate_has_room=rate_has_room(rec.switch_times, self.policy, now),
            recovery_cause=self._recovery_cause,
            binding_disowned=self._readdressed or self._disowned_acks >= self.policy.dead_after_missed_probes,
        )
        candidates = tuple(
            Candidate(
                path=path,
                priority=self._paths[path].priority,
                verdict=verdict.verdict,
                reason=verdict.reason,
                healthy_since=self._paths[path].health.healthy_since(now=now),
                metered=self._paths[path].metered,
                answers=self._paths[path].health.recent_answers(),
                silence_alarm_at=self._paths[path].health.silence_alarm_at(),
                silence_probe_timeout_s=self._paths[path].health.silence_probe_timeout_s(),
            )
            for path, verdict in verdicts.items()
        )
        decision = decide(view, candidates, self.policy, now=now)
        if decision.kind is DecisionKind.SWITCH and decision.target is not None:
            nonce = self._next_nonce
            self._next_nonce += 1
            self.pending = PendingReattach(path=decision.target, nonce=nonce, sent_at=now, cause=decision.reason)
            self._count("reattach_sent")
            return [
                SendReattach(
                    path=decision.target,
                    nonce=nonce,
                    client_ts_ms=round((now - self._clock_origin) * 1000.0),
                    expected_version=self.gateway_version,
                )
            ]
        if decision.kind is DecisionKind.DEGRADE:
            denied = [
                self._event(
                    EventKind.SWITCH_DENIED,
                    decision.reason,
                    now,
                    target=str(decision.target) if decision.target else None,
                    switches_last_minute=switches_in_window(rec.switch_times, now),
                    max_switches_per_minute=self.policy.max_switches_per_minute,
                )
            ]
            return denied + self._degrade_for_rate(now)
        return []

    def _report_health(self, verdicts: dict[PathId, PathVerdict], now: float) -> list[Action]:
        out: list[Action] = []
        for path, verdict in verdicts.items():
            key = (verdict.verdict, verdict.reason)
            if self._reported.get(path) != key:
                self._reported[path] = key
                out.append(
                    self._event(
                        EventKind.PATH_HEALTH,
                        verdict.reason,
                        now,
                        path=str(path),
                        verdict=verdict.verdict.value,
                        measured=verdict.measured,
                        threshold=verdict.threshold,
                    )
                )
        return out


# =============================================================================
# Gateway
# =============================================================================


@attrs.frozen(kw_only=True)
class GatewaySnapshot:
    now: float
    record: SessionRecord
    policy_fingerprint: str
    last_nonce: int
    last_delivery: float | None
    switches_last_minute: int
    counters: tuple[tuple[str, int], ...]


@attrs.frozen(kw_only=True)
class PendingChallenge:
    """A REATTACH that would be accepted, waiting for its address to echo ``challenge``."""

    request: ev.ReattachReceived
    challenge: int
    sent_at: float


class GatewaySession(_SessionCore):
    """The gateway's authoritative session: strict binding, reattach validation."""

    role = Role.GATEWAY

    def __init__(
        self,
        *,
        policy: Policy,
        session_id: SessionId,
        now: float,
        node_id: str,
        held_revision: int,
        handshake_binding: Binding | None = None,
        taken_over: Takeover | None = None,
    ) -> None:
        """``taken_over``: this gateway took the session over from another (docs/cluster.md,
        "Takeover"): it starts unbound (RECOVERING) at the version the client holds, and the
        client's REATTACH binds it, as after any loss of its path."""
        super().__init__(policy=policy, session_id=session_id, now=now)
        self.taken_over = taken_over
        if taken_over is not None:
            self.record = attrs.evolve(
                self.record, state=S.RECOVERING, version=taken_over.version, recovering_since=now
            )
        #: Where the handshake came from: the binding the client also starts on.  The
        #: first authenticated packet (on any path) confirms the keys and binds *this*,
        #: so both views agree whichever path's packet wins the race.  None: bind the
        #: confirming packet's source (unit tests without a handshake).
        self.handshake_binding = handshake_binding
        self.node_id = node_id
        self.held_revision = held_revision
        self.last_nonce = 0
        self.clock_offset_ms = 0.0
        self.last_delivery: float | None = None
        #: Challenged address -> the REATTACH waiting for its echo (at most MAX_PENDING_CHALLENGES).
        self.challenges: dict[tuple[str, int], PendingChallenge] = {}
        #: Address -> when it last showed return routability (at most MAX_VALIDATED_ADDRESSES).
        self.validated: dict[tuple[str, int], float] = {}
        self._next_challenge = 1
        if taken_over is not None and taken_over.endpoint is not None:
            self._remember_validated(taken_over.endpoint, now)

    def creation_events(self) -> list[Action]:
        """A new session's BIRTH, or a taken-over session's first line: where it came from, at which version."""
        if self.taken_over is None:
            return super().creation_events()
        return [
            self._event(
                EventKind.STATE_CHANGE,
                R.SESSION_TAKEN_OVER,
                self.record.created_at,
                from_state=None,
                to_state=S.RECOVERING.value,
                previous_owner=self.taken_over.previous_owner,
            )
        ]

    def handle(self, event: ev.GatewayInput, *, now: float) -> list[Action]:
        before = self.record.binding
        actions = self._enforce_bounds(now)
        actions += self._enforce_silence(now)
        actions += self._expire_challenges(now)
        if self.terminated and not isinstance(event, ev.ReattachReceived):
            self._count("inputs_after_termination")
        else:
            actions += self._apply(event, now)
        if before is not None and self.record.binding != before:  # it carried the binding: validated until now
            self._remember_validated(before.endpoint, now)
        if self.terminated and self.challenges:
            self._count("path_challenges_ended_with_session", len(self.challenges))
            self.challenges.clear()
        return actions

    def next_deadline(self) -> float | None:
        if self.terminated:
            return None
        return _min_deadline([*self._bound_deadlines(), self.silence_deadline(), self.challenge_deadline()])

    def challenge_deadline(self) -> float | None:
        """When the oldest unanswered PATH_CHALLENGE gives up (``reattach_timeout_ms`` after it left)."""
        timeout = self.policy.reattach_timeout_ms / 1000.0
        return _min_deadline(pending.sent_at + timeout for pending in self.challenges.values())

    def silence_deadline(self) -> float | None:
        """Spec 6: a binding that delivered nothing for TransportLossTTL is dead."""
        if self.record.binding is None or self.last_delivery is None:
            return None
        return self.last_delivery + self.policy.transport_loss_ttl_ms / 1000.0

    def accepts_data_from(self, endpoint: tuple[str, int]) -> bool:
        """Strict binding: only the active binding's endpoint carries data."""
        binding = self.record.binding
        return binding is not None and binding.endpoint == endpoint and not self.terminated

    def bound_path_seen_from(self, endpoint: tuple[str, int]) -> PathId | None:
        """What a PROBE_ACK to ``endpoint`` reports: the bound path if it is that endpoint's, else None.

        The client reattaches on the same path when told None repeatedly (a NAT rebinding, R17).
        """
        binding = self.record.binding
        return binding.path if binding is not None and binding.endpoint == endpoint else None

    @property
    def awaiting_confirmation(self) -> bool:
        """BIRTH: the handshake is answered, and the client's first packet will confirm it."""
        return self.record.state is S.BIRTH

    def snapshot(self, *, now: float) -> GatewaySnapshot:
        return GatewaySnapshot(
            now=now,
            record=self.record,
            policy_fingerprint=self.policy.fingerprint,
            last_nonce=self.last_nonce,
            last_delivery=self.last_delivery,
            switches_last_minute=switches_in_window(self.record.switch_times, now),
            counters=tuple(sorted(self.counters.items())),
        )

    def _enforce_silence(self, now: float) -> list[Action]:
        deadline = self.silence_deadline()
        if deadline is None or now < deadline or self.terminated:
            return []
        self.last_delivery = None
        return self._transition(R.DELIVERY_TIMEOUT, now)

    def _apply(self, event: ev.GatewayInput, now: float) -> list[Action]:
        if isinstance(event, ev.TimerFired):
            return []
        if isinstance(event, ev.PacketAuthenticated):
            binding = self.record.binding
            if self.record.state is S.BIRTH:
                self.last_delivery = now
                confirmed = self.handshake_binding or Binding(path=event.path, endpoint=event.endpoint)
                return self._transition(R.HANDSHAKE_COMPLETE, now, binding=confirmed)
            if binding is not None and binding.endpoint == event.endpoint:
                self.last_delivery = now
            else:
                self._count("packets_off_binding")
            return []
        if isinstance(event, ev.ReattachReceived):
            return self._on_reattach(event, now)
        if isinstance(event, ev.PathResponseReceived):
            return self._on_path_response(event, now)
        if isinstance(event, ev.FrameDropped):
            self._count(f"dropped_{event.reason.value.lower()}")
            return [
                self._event(
                    EventKind.SECURITY_EVENT,
                    event.reason,
                    now,
                    endpoint=f"{event.endpoint[0]}:{event.endpoint[1]}",
                    frame=event.frame,
                )
            ]
        if isinstance(event, ev.CloseRequested | ev.PeerClosed | ev.KeysExhausted):
            return self._apply_ending(event, now)
        if isinstance(event, ev.OwnershipLost):
            return self._transition(R.OWNERSHIP_LOST, now)
        return []  # pragma: no cover - the input union is closed

    def _reattach_context(self) -> ReattachContext:
        rec = self.record
        return ReattachContext(
            session_id=rec.session_id,
            state=rec.state,
            version=rec.version,
            binding=rec.binding,
            last_nonce=self.last_nonce,
            clock_offset_ms=self.clock_offset_ms,
            created_at=rec.created_at,
            switch_times=rec.switch_times,
            node_id=self.node_id,
            held_revision=self.held_revision,
        )

    def _on_reattach(self, req: ev.ReattachReceived, now: float) -> list[Action]:
        if self.record.state is not S.BIRTH:
            return self._judge_reattach(req, now)
        # In BIRTH a REATTACH is judged as if the handshake were confirmed: one that would then
        # be accepted proves the client holds the keys, as any first packet does, so confirm
        # and judge it for real.  One that would be refused (replayed, stale, foreign owner,
        # ...) is refused with that reason and changes nothing, not even the confirmation
        # (Properties 7 and 9).
        binding = self.handshake_binding or Binding(path=req.path, endpoint=req.endpoint)
        once_confirmed = attrs.evolve(
            self._reattach_context(), state=S.ATTACHED, version=self.record.version + 1, binding=binding
        )
        verdict = validate_reattach(once_confirmed, req, self.policy, now=now)
        if not isinstance(verdict, Accept):
            return self._refuse_reattach(req, verdict, now)
        confirmed = self._apply(ev.PacketAuthenticated(endpoint=req.endpoint, path=req.path), now)
        return confirmed + self._judge_reattach(req, now)

    def _judge_reattach(self, req: ev.ReattachReceived, now: float, *, answered: bool = False) -> list[Action]:
        """Accept, refuse or (a move to an unvalidated address) challenge; ``answered``: its echo just came."""
        verdict = validate_reattach(self._reattach_context(), req, self.policy, now=now)
        if isinstance(verdict, Accept):
            actions: list[Action] = []
            if verdict.already_bound:
                self._count("reattach_already_bound")
            else:
                if not answered and not self._address_validated(req.endpoint, now):
                    return self._challenge(req, now)
                actions += self._transition(
                    R.REATTACH_CONFIRMED,
                    now,
                    binding=verdict.binding,
                    cause=R.REATTACH_CONFIRMED,
                    nonce=req.nonce,
                    path_validation="challenge" if answered else "known",
                )
                if not actions:  # the table refused: nothing was committed, so nothing is answered
                    return []
            # Only now, with the transition committed, is the request's freshness consumed.
            self.last_nonce = verdict.new_last_nonce
            self.clock_offset_ms = verdict.new_clock_offset_ms
            self.last_delivery = now
            actions.append(
                SendReattachAck(
                    endpoint=req.endpoint,
                    nonce=req.nonce,
                    new_version=self.record.version,
                    path=req.path,
                    owner_epoch=self.held_revision,  # the fencing epoch the client checks
                )
            )
            return actions
        return self._refuse_reattach(req, verdict, now)

    def _refuse_reattach(self, req: ev.ReattachReceived, verdict: Reject, now: float) -> list[Action]:
        """Report a refused REATTACH; only a rate refusal may change state (into DEGRADED)."""
        self._count(f"reattach_rejected_{verdict.reason.value.lower()}")
        kind = EventKind.SECURITY_EVENT if verdict.security else EventKind.REATTACH_REJECTED
        actions: list[Action] = [
            self._event(
                kind,
                verdict.reason,
                now,
                path=str(req.path),
                endpoint=f"{req.endpoint[0]}:{req.endpoint[1]}",
                nonce=req.nonce,
                why=verdict.why,
            )
        ]
        if verdict.reason is R.RATE_LIMITED:
            actions += self._degrade_for_rate(now)
        if verdict.reply:
            actions.append(
                SendReattachReject(
                    endpoint=req.endpoint,
                    nonce=req.nonce,
                    reason=verdict.reason,
                    current_version=self.record.version,
                )
            )
        return actions

    # -- path validation (docs/spec.md, "Path validation") --------------------------------
    def _address_validated(self, endpoint: tuple[str, int], now: float) -> bool:
        return address_validated(
            endpoint, binding=self.record.binding, validated=self.validated, policy=self.policy, now=now
        )

    def _remember_validated(self, endpoint: tuple[str, int], now: float) -> None:
        self.validated.pop(endpoint, None)
        self.validated[endpoint] = now
        while len(self.validated) > MAX_VALIDATED_ADDRESSES:
            del self.validated[next(iter(self.validated))]  # the least recently validated

    def _challenge(self, req: ev.ReattachReceived, now: float) -> list[Action]:
        """Hold an acceptable move to an unvalidated address; send its challenge there, and only there.

        One challenge per (address, nonce): the same REATTACH again, or a copy, sends nothing
        more, so the address gets at most one frame, shorter than the request, per request.
        """
        actions: list[Action] = []
        held = self.challenges.get(req.endpoint)
        if held is not None:
            if held.request.nonce >= req.nonce:
                self._count("path_challenge_repeats")
                return []
            del self.challenges[req.endpoint]  # the client gave up on that one and asks anew
            self._count("path_challenges_superseded")
        elif len(self.challenges) >= MAX_PENDING_CHALLENGES:
            oldest = self.challenges.pop(next(iter(self.challenges)))
            actions.append(
                self._not_validated(
                    oldest.request.endpoint,
                    oldest.request.path,
                    oldest.request.nonce,
                    now,
                    why=f"pushed out by a newer challenge (at most {MAX_PENDING_CHALLENGES} pending)",
                )
            )
        challenge = self._next_challenge
        self._next_challenge += 1
        self.challenges[req.endpoint] = PendingChallenge(request=req, challenge=challenge, sent_at=now)
        self._count("path_challenges_sent")
        actions.append(SendPathChallenge(endpoint=req.endpoint, path=req.path, nonce=req.nonce, challenge=challenge))
        return actions

    def _on_path_response(self, event: ev.PathResponseReceived, now: float) -> list[Action]:
        """The echo from the challenged address moves the binding (the request is judged again now)."""
        held = self.challenges.get(event.endpoint)
        if held is None or (held.challenge, held.request.nonce, held.request.path) != (
            event.challenge,
            event.nonce,
            event.path,
        ):
            why = "no challenge pending for this address" if held is None else "echo does not match the challenge"
            return [self._not_validated(event.endpoint, event.path, event.nonce, now, why=why)]
        del self.challenges[event.endpoint]
        self._remember_validated(event.endpoint, now)
        self._count("path_responses_matched")
        return self._judge_reattach(held.request, now, answered=True)

    def _expire_challenges(self, now: float) -> list[Action]:
        timeout_ms = self.policy.reattach_timeout_ms
        actions: list[Action] = []
        for endpoint, held in list(self.challenges.items()):
            if now >= held.sent_at + timeout_ms / 1000.0:
                del self.challenges[endpoint]
                why = f"no PATH_RESPONSE within reattach_timeout_ms ({timeout_ms} ms); the binding stays"
                actions.append(self._not_validated(endpoint, held.request.path, held.request.nonce, now, why=why))
        return actions

    def _not_validated(
        self, endpoint: tuple[str, int], path: PathId, nonce: int, now: float, *, why: str
    ) -> EmitEvent:
        self._count("path_not_validated")
        return self._event(
            EventKind.SECURITY_EVENT,
            R.PATH_NOT_VALIDATED,
            now,
            path=str(path),
            endpoint=f"{endpoint[0]}:{endpoint[1]}",
            nonce=nonce,
            why=why,
        )
