"""Session states, reason codes, and the one transition table.

Theory of operation
-------------------
Everything that can change a session's state or its binding is listed in
``TRANSITIONS`` below, as data: ``(from_state, reason) -> Rule(to, binding
effect, binding guard)``.  :func:`plan_transition` is the only reader of that
table; it answers with the rule or with a deterministic rejection, and never
mutates anything.  The session machines (``session.py``) commit a planned
transition in one step: new state, new binding, ``state_version + 1``, and the
events that announce it (spec 4: explicit, deterministic, reason-coded,
logged).  A ``(state, reason)`` pair that is not in the table is rejected with
no state change, exactly like h11 rejects an event its table does not list.

``docs/state-machine.md`` is generated from this table
(``python -m jvpn_trio.core.states``), so the picture cannot drift from code.
"""

from __future__ import annotations

import enum
from typing import Mapping

import attrs


class SessionState(enum.Enum):
    """Spec section 4.  The string values are what event logs carry."""

    BIRTH = "BIRTH"
    ATTACHED = "ATTACHED"
    VOLATILE = "VOLATILE"
    DEGRADED = "DEGRADED"
    RECOVERING = "RECOVERING"
    TERMINATED = "TERMINATED"


class ReasonCode(enum.Enum):
    """The closed set of reasons the system ever gives.

    One enum serves transitions, switch causes, health verdicts, rejections
    and security events, so a reason means the same thing in every log line.
    """

    # -- creation and transitions --------------------------------------------
    SESSION_CREATED = "SESSION_CREATED"
    HANDSHAKE_COMPLETE = "HANDSHAKE_COMPLETE"
    LINK_DOWN = "LINK_DOWN"
    MISSED_PROBES = "MISSED_PROBES"
    DELIVERY_TIMEOUT = "DELIVERY_TIMEOUT"
    LOSS_ABOVE_THRESHOLD = "LOSS_ABOVE_THRESHOLD"
    LATENCY_ABOVE_THRESHOLD = "LATENCY_ABOVE_THRESHOLD"
    JITTER_ABOVE_THRESHOLD = "JITTER_ABOVE_THRESHOLD"
    #: The bound path carried data and its silence probes went unanswered (docs/policy.md, "Silence").
    DATA_UNANSWERED = "DATA_UNANSWERED"
    PATH_HEALTHY_AGAIN = "PATH_HEALTHY_AGAIN"
    REATTACH_CONFIRMED = "REATTACH_CONFIRMED"
    RECOVERY_WINDOW_EXCEEDED = "RECOVERY_WINDOW_EXCEEDED"
    SWITCH_RATE_EXCEEDED = "SWITCH_RATE_EXCEEDED"
    RATE_WINDOW_CLEARED = "RATE_WINDOW_CLEARED"
    SESSION_TTL_EXPIRED = "SESSION_TTL_EXPIRED"
    TRANSPORT_LOSS_TTL_EXPIRED = "TRANSPORT_LOSS_TTL_EXPIRED"
    KEY_EXHAUSTED = "KEY_EXHAUSTED"
    OWNERSHIP_LOST = "OWNERSHIP_LOST"
    LOCAL_CLOSE = "LOCAL_CLOSE"
    PEER_CLOSE = "PEER_CLOSE"
    PEER_REMOVED = "PEER_REMOVED"  # the gateway's operator removed the peer: its key is no longer authorised
    SESSION_REPLACED = "SESSION_REPLACED"  # a newer handshake with the same static key took the peer's address
    #: A gateway's first line for a session it took over from another (docs/cluster.md, "Takeover").
    SESSION_TAKEN_OVER = "SESSION_TAKEN_OVER"

    # -- switch causes that are not themselves transitions ------------------
    PREFERRED_PATH_RESTORED = "PREFERRED_PATH_RESTORED"
    OPERATOR_PIN = "OPERATOR_PIN"
    ENDPOINT_CHANGED = "ENDPOINT_CHANGED"  # the gateway no longer knows our endpoint (NAT rebinding)
    UNMETERED_AVAILABLE = "UNMETERED_AVAILABLE"  # leaving a metered path: an unmetered one is healthy again

    # -- operator actions (OPERATOR_ACTION events; OPERATOR_PIN above is also the switch cause) --
    OPERATOR_UNPIN = "OPERATOR_UNPIN"
    OPERATOR_REEVALUATE = "OPERATOR_REEVALUATE"
    OPERATOR_DISCONNECT = "OPERATOR_DISCONNECT"
    OPERATOR_RECONNECT = "OPERATOR_RECONNECT"

    # -- health verdicts -----------------------------------------------------
    NO_SAMPLES = "NO_SAMPLES"
    WITHIN_THRESHOLDS = "WITHIN_THRESHOLDS"

    # -- switch decisions that keep things as they are ----------------------
    ACTIVE_PATH_HEALTHY = "ACTIVE_PATH_HEALTHY"
    NO_BETTER_PATH = "NO_BETTER_PATH"
    NO_CANDIDATE = "NO_CANDIDATE"
    DWELL_NOT_MET = "DWELL_NOT_MET"
    REATTACH_IN_FLIGHT = "REATTACH_IN_FLIGHT"
    REATTACH_TIMEOUT = "REATTACH_TIMEOUT"
    PINNED = "PINNED"
    METERED_AVOIDED = "METERED_AVOIDED"  # a preferred path is back, but it is metered and the active one is not

    # -- reattach rejections (spec 7, 9, 10) --------------------------------
    REPLAYED_NONCE = "REPLAYED_NONCE"
    STALE_TIMESTAMP = "STALE_TIMESTAMP"
    STALE_VERSION = "STALE_VERSION"
    RATE_LIMITED = "RATE_LIMITED"
    NOT_OWNER = "NOT_OWNER"
    OWNERSHIP_AMBIGUOUS = "OWNERSHIP_AMBIGUOUS"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"  # the cluster's ownership store gave no answer (docs/cluster.md)
    SESSION_TERMINATED = "SESSION_TERMINATED"
    UNKNOWN_SESSION = "UNKNOWN_SESSION"
    SESSION_MISMATCH = "SESSION_MISMATCH"
    ALREADY_BOUND = "ALREADY_BOUND"
    #: A REATTACH from an address not yet shown to reach the client: its PATH_CHALLENGE went
    #: unanswered (or was answered wrongly), so the binding did not move (docs/spec.md, "Path validation").
    PATH_NOT_VALIDATED = "PATH_NOT_VALIDATED"
    #: The client's side of fencing (docs/cluster.md): a REATTACH_ACK carrying an owner epoch below
    #: the highest the client has seen comes from a stale owner; it changes nothing.
    STALE_EPOCH = "STALE_EPOCH"

    # -- dropped input (counted; SECURITY_EVENT where it is one) -------------
    MALFORMED = "MALFORMED"
    BAD_MAC = "BAD_MAC"
    DECRYPT_FAILED = "DECRYPT_FAILED"
    REPLAYED_COUNTER = "REPLAYED_COUNTER"
    STRAY_PACKET = "STRAY_PACKET"
    HANDSHAKE_REPLAY = "HANDSHAKE_REPLAY"
    UNKNOWN_PEER = "UNKNOWN_PEER"
    INVALID_TRANSITION = "INVALID_TRANSITION"


class BindingEffect(enum.Enum):
    """What a transition does to the single active binding (Property 2)."""

    KEEP = "KEEP"  # binding unchanged
    BIND = "BIND"  # a new binding becomes active; any old one is released in the same step
    RELEASE = "RELEASE"  # the binding is dropped; the session is unbound afterwards


class Guard(enum.Enum):
    """A condition on the binding that the table checks before a transition."""

    ANY = "ANY"
    BOUND = "BOUND"
    UNBOUND = "UNBOUND"


@attrs.frozen
class Rule:
    to: SessionState
    effect: BindingEffect
    guard: Guard = Guard.ANY


S = SessionState
R = ReasonCode
B = BindingEffect

#: Path-death causes (spec 6): each moves a bound session into recovery.
PATH_DEATH_REASONS = (R.LINK_DOWN, R.MISSED_PROBES, R.DELIVERY_TIMEOUT)
#: Quality causes: the active path still delivers but crossed a threshold.
IMPAIRMENT_REASONS = (
    R.LOSS_ABOVE_THRESHOLD, R.LATENCY_ABOVE_THRESHOLD, R.JITTER_ABOVE_THRESHOLD, R.DATA_UNANSWERED,
)  # fmt: skip
#: Property 10: the only ways a session ends (plus an explicit close, see docs/spec.md).
TERMINATION_REASONS = (
    R.SESSION_TTL_EXPIRED,
    R.TRANSPORT_LOSS_TTL_EXPIRED,
    R.KEY_EXHAUSTED,
    R.OWNERSHIP_LOST,
    R.LOCAL_CLOSE,
    R.PEER_CLOSE,
    R.PEER_REMOVED,
    R.SESSION_REPLACED,
)
#: What an operator can ask of a live client session; each is logged as an OPERATOR_ACTION event.
OPERATOR_REASONS = (R.OPERATOR_PIN, R.OPERATOR_UNPIN, R.OPERATOR_REEVALUATE, R.OPERATOR_DISCONNECT, R.OPERATOR_RECONNECT)
#: The reasons an explicit ``CloseRequested`` may end a session with.
CLOSE_REASONS = (R.LOCAL_CLOSE, R.PEER_REMOVED, R.SESSION_REPLACED)
LIVE_STATES = tuple(s for s in SessionState if s is not S.TERMINATED)


def _build_table() -> dict[tuple[SessionState, ReasonCode], Rule]:
    table: dict[tuple[SessionState, ReasonCode], Rule] = {
        (S.BIRTH, R.HANDSHAKE_COMPLETE): Rule(S.ATTACHED, B.BIND, Guard.UNBOUND),
        (S.VOLATILE, R.PATH_HEALTHY_AGAIN): Rule(S.ATTACHED, B.KEEP, Guard.BOUND),
        (S.RECOVERING, R.RECOVERY_WINDOW_EXCEEDED): Rule(S.DEGRADED, B.KEEP, Guard.UNBOUND),
        (S.DEGRADED, R.RATE_WINDOW_CLEARED): Rule(S.ATTACHED, B.KEEP, Guard.BOUND),
        (S.BIRTH, R.TRANSPORT_LOSS_TTL_EXPIRED): Rule(S.TERMINATED, B.KEEP, Guard.UNBOUND),
        (S.RECOVERING, R.TRANSPORT_LOSS_TTL_EXPIRED): Rule(S.TERMINATED, B.KEEP, Guard.UNBOUND),
        (S.DEGRADED, R.TRANSPORT_LOSS_TTL_EXPIRED): Rule(S.TERMINATED, B.KEEP, Guard.UNBOUND),
    }
    for reason in PATH_DEATH_REASONS:
        table[(S.ATTACHED, reason)] = Rule(S.RECOVERING, B.RELEASE, Guard.BOUND)
        table[(S.VOLATILE, reason)] = Rule(S.RECOVERING, B.RELEASE, Guard.BOUND)
        table[(S.DEGRADED, reason)] = Rule(S.DEGRADED, B.RELEASE, Guard.BOUND)
    for reason in IMPAIRMENT_REASONS:
        table[(S.ATTACHED, reason)] = Rule(S.VOLATILE, B.KEEP, Guard.BOUND)
    for state in (S.ATTACHED, S.VOLATILE, S.RECOVERING, S.DEGRADED):
        table[(state, R.REATTACH_CONFIRMED)] = Rule(S.ATTACHED, B.BIND)
    for state in (S.ATTACHED, S.VOLATILE, S.RECOVERING):
        table[(state, R.SWITCH_RATE_EXCEEDED)] = Rule(S.DEGRADED, B.KEEP)
    for state in LIVE_STATES:
        for reason in (
            R.SESSION_TTL_EXPIRED, R.KEY_EXHAUSTED, R.OWNERSHIP_LOST, R.LOCAL_CLOSE, R.PEER_CLOSE, R.PEER_REMOVED,
            R.SESSION_REPLACED,
        ):  # fmt: skip
            table[(state, reason)] = Rule(S.TERMINATED, B.RELEASE)
    return table


#: The transition table.  Read-only by convention: nothing assigns into it.
TRANSITIONS: Mapping[tuple[SessionState, ReasonCode], Rule] = _build_table()


@attrs.frozen
class Rejected:
    """A transition the table does not allow; nothing was changed."""

    state: SessionState
    reason: ReasonCode
    why: str


def plan_transition(state: SessionState, reason: ReasonCode, *, bound: bool) -> Rule | Rejected:
    """Look a transition up in the table, checking its binding guard.

    Pure: returns the rule to commit, or :class:`Rejected` (the caller then
    changes nothing and may count an ``INVALID_TRANSITION``).
    """
    rule = TRANSITIONS.get((state, reason))
    if rule is None:
        return Rejected(state, reason, f"no transition from {state.value} on {reason.value}")
    if rule.guard is Guard.BOUND and not bound:
        return Rejected(state, reason, f"{reason.value} needs an active binding")
    if rule.guard is Guard.UNBOUND and bound:
        return Rejected(state, reason, f"{reason.value} needs the session to be unbound")
    return rule


def render_markdown() -> str:
    """The table as Markdown plus a Mermaid diagram, for docs/state-machine.md."""
    lines = [
        "# State machine",
        "",
        "Generated from `jvpn_trio/core/states.py` by `python -m jvpn_trio.core.states`;",
        "do not edit by hand.  Any `(state, reason)` pair not listed is rejected with no",
        "state change.  Every row commits `state_version + 1`.",
        "",
        "```mermaid",
        "stateDiagram-v2",
    ]
    edges: dict[tuple[str, str], list[str]] = {}
    for (src, reason), rule in TRANSITIONS.items():
        edges.setdefault((src.value, rule.to.value), []).append(reason.value)
    for (src_name, dst_name), reasons in edges.items():
        lines.append(f"    {src_name} --> {dst_name}: {', '.join(reasons)}")
    lines += ["```", "", "| from | reason | to | binding | guard |", "|---|---|---|---|---|"]
    for (src, reason), rule in TRANSITIONS.items():
        lines.append(
            f"| {src.value} | {reason.value} | {rule.to.value} | {rule.effect.value} | {rule.guard.value} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
