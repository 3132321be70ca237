"""Reattach validation on the gateway: one pure function, accept or reject.

Spec section 7 lists what the server validates; this module checks exactly
that list, in a fixed order, and returns a verdict without touching any
state.  The caller (``GatewaySession``) commits an :class:`Accept` in one
step; a :class:`Reject` changes nothing (spec 9, Property 7), with one
deliberate exception documented in docs/spec.md: a request refused for the
switch rate moves the session to DEGRADED, because Property 6 says so.

Order of checks (cheapest and most security-relevant first, as wireguard-go
authenticates before it lets a packet move an endpoint):

1. session alive                    -> SESSION_TERMINATED
2. proof of possession (AEAD)       -> DECRYPT_FAILED      (security, silent)
3. SessionID matches the keys       -> SESSION_MISMATCH    (security, silent)
4. nonce strictly increasing        -> REPLAYED_NONCE      (security, silent)
5. timestamp inside freshness window-> STALE_TIMESTAMP     (security)
6. ownership unambiguous            -> NOT_OWNER / OWNERSHIP_AMBIGUOUS (security)
7. expected state_version current   -> STALE_VERSION
8. same binding again               -> Accept(already_bound)  no transition
9. switch rate                      -> RATE_LIMITED
10. accept: new binding, version + 1, TRANSPORT_SWITCH

An accepted move to an address the session has not validated is not committed
yet: the gateway first sends a PATH_CHALLENGE there and moves the binding only
when the client echoes it from there (return routability, as QUIC's path
validation; docs/spec.md, "Path validation").  The request is judged again,
with this same function, when the echo arrives.

"Silent" rejections get no REJECT reply: answering unauthenticated or
replayed input would let anyone make the gateway talk (wireguard-go never
answers invalid packets).  They are counted and logged as SECURITY_EVENTs.
"""

from __future__ import annotations

from typing import Mapping

import attrs

from jvpn_trio.core.events import ReattachReceived
from jvpn_trio.core.ids import Binding, SessionId
from jvpn_trio.core.ownership import Ownership, classify
from jvpn_trio.core.policy import SWITCH_RATE_WINDOW_S, Policy
from jvpn_trio.core.states import ReasonCode, SessionState


@attrs.frozen(kw_only=True)
class ReattachContext:
    """What the gateway knows when a request arrives (all read-only here)."""

    session_id: SessionId
    state: SessionState
    version: int
    binding: Binding | None
    last_nonce: int
    clock_offset_ms: float
    created_at: float
    switch_times: tuple[float, ...]
    node_id: str
    held_revision: int


@attrs.frozen(kw_only=True)
class Accept:
    binding: Binding
    already_bound: bool
    new_last_nonce: int
    new_clock_offset_ms: float


@attrs.frozen(kw_only=True)
class Reject:
    reason: ReasonCode
    security: bool
    reply: bool
    why: str


def session_clock_ms(now: float, created_at: float) -> float:
    """Milliseconds since the session was created, on the local monotonic clock."""
    return (now - created_at) * 1000.0


def switch_expires_at(t: float) -> float:
    """When a switch made at ``t`` stops counting against the rate (the timer uses the same value)."""
    return t + SWITCH_RATE_WINDOW_S


def switches_in_window(switch_times: tuple[float, ...], now: float) -> int:
    """Confirmed switches in the last rate window: a switch counts while ``now`` is before it expires."""
    return sum(1 for t in switch_times if now < switch_expires_at(t))


def rate_has_room(switch_times: tuple[float, ...], policy: Policy, now: float) -> bool:
    """Property 6: a new switch is allowed only while fewer than the maximum happened this minute."""
    return switches_in_window(switch_times, now) < policy.max_switches_per_minute


def validate_reattach(
    ctx: ReattachContext, req: ReattachReceived, policy: Policy, *, now: float
) -> Accept | Reject:
    """Check a REATTACH against spec 7 and decide; pure, raises nothing."""
    if ctx.state is SessionState.TERMINATED:
        return Reject(reason=ReasonCode.SESSION_TERMINATED, security=False, reply=True, why="session is over")
    if not req.proof_valid:
        return Reject(
            reason=ReasonCode.DECRYPT_FAILED, security=True, reply=False, why="proof of possession failed"
        )
    if req.session_id != ctx.session_id:
        return Reject(
            reason=ReasonCode.SESSION_MISMATCH,
            security=True,
            reply=False,
            why="SessionID in the request differs from the keys' session",
        )
    if req.nonce <= ctx.last_nonce:
        return Reject(
            reason=ReasonCode.REPLAYED_NONCE,
            security=True,
            reply=False,
            why=f"nonce {req.nonce} not above last accepted {ctx.last_nonce}",
        )
    expected_ts = session_clock_ms(now, ctx.created_at) - ctx.clock_offset_ms
    skew_ms = req.client_ts_ms - expected_ts
    if abs(skew_ms) > policy.freshness_window_ms:
        return Reject(
            reason=ReasonCode.STALE_TIMESTAMP,
            security=True,
            reply=True,
            why=f"timestamp off by {skew_ms:.0f} ms (window {policy.freshness_window_ms} ms)",
        )
    owner = classify(
        req.ownership,
        session_id=ctx.session_id,
        node_id=ctx.node_id,
        held_revision=ctx.held_revision,
        store_failure=req.store_failure,
    )
    if owner.ownership is not Ownership.OWNED:
        assert owner.reason is not None  # classify names a reason for every non-OWNED verdict
        return Reject(reason=owner.reason, security=True, reply=True, why=owner.why)
    if req.expected_version != ctx.version:
        return Reject(
            reason=ReasonCode.STALE_VERSION,
            security=False,
            reply=True,
            why=f"expected version {req.expected_version}, current {ctx.version}",
        )
    binding = Binding(path=req.path, endpoint=req.endpoint)
    new_offset = session_clock_ms(now, ctx.created_at) - req.client_ts_ms
    if binding == ctx.binding:
        return Accept(binding=binding, already_bound=True, new_last_nonce=req.nonce, new_clock_offset_ms=new_offset)
    if not rate_has_room(ctx.switch_times, policy, now):
        return Reject(
            reason=ReasonCode.RATE_LIMITED,
            security=False,
            reply=True,
            why=f"{switches_in_window(ctx.switch_times, now)} switches in the last minute "
            f"(max {policy.max_switches_per_minute})",
        )
    return Accept(binding=binding, already_bound=False, new_last_nonce=req.nonce, new_clock_offset_ms=new_offset)


#: Unanswered PATH_CHALLENGEs one session keeps (one per address): bounds the state a copied
#: REATTACH sent from many addresses can create; a new one pushes the oldest out.
MAX_PENDING_CHALLENGES = 4
#: Addresses one session remembers as validated; the least recently validated is forgotten first.
MAX_VALIDATED_ADDRESSES = 8


def address_validated(
    endpoint: tuple[str, int],
    *,
    binding: Binding | None,
    validated: Mapping[tuple[str, int], float],
    policy: Policy,
    now: float,
) -> bool:
    """Return routability shown: the bound address, or one validated at most ``path_validation_cache_ms`` ago.

    An authenticated packet *from* an address proves nothing about reaching the client *at*
    it (anyone on the path can re-send a sealed frame from elsewhere); only an answered
    challenge, or having carried the binding, does.
    """
    if binding is not None and binding.endpoint == endpoint:
        return True
    at = validated.get(endpoint)
    return at is not None and now - at <= policy.path_validation_cache_ms / 1000.0
