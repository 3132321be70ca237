"""Cluster ownership of sessions, as pure decisions over store records.

Spec section 10 lets a cluster use sticky routing or an atomic shared store
with versioned compare-and-swap; we use the store (``OwnershipStore``: in
memory for one gateway; a shared store implements the same compare-and-swap).  A record says which node owns a session and at which store
revision it was written.  A node serves a session only while the record says
it owns it *at the revision it holds*: any other picture (no record, another
owner, a newer revision written by someone else) is ambiguity, and ambiguity
means rejection (invariant 6, Property 9).  Consistency over availability.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import math
from typing import Protocol

import attrs

from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.states import ReasonCode

#: The revision a compare-and-swap expects when it creates a record: "no record yet".
ABSENT_REVISION = 0


class StoreError(Exception):
    """The store could not give a certain answer; ``reason`` is short and fit for a log line.

    Whatever the store, the gateway treats it alike: the admission or reattach that needed the
    answer is denied (:func:`store_failure_reason`), nothing changes (fail closed).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreUnavailable(StoreError):
    """No answer (non-200, timeout, connection error, unparsable reply); nothing was changed by us."""


class StoreAmbiguous(StoreError):
    """A transaction was sent but its outcome is unknown: it may or may not have been applied."""


def store_failure_reason(exc: StoreError) -> ReasonCode:
    """The reason a denial names: an outcome we cannot know is ambiguity; no answer is unavailability."""
    return ReasonCode.OWNERSHIP_AMBIGUOUS if isinstance(exc, StoreAmbiguous) else ReasonCode.STORE_UNAVAILABLE


def lease_ttl_s(ttl_ms: int) -> int:
    """The lease TTL a store grants for ``ttl_ms``: etcd counts whole seconds, so rounded up."""
    return max(1, math.ceil(ttl_ms / 1000))


def lease_renewable(*, ttl_s: float, keepalive_interval_s: float, request_timeout_s: float, margin_s: float) -> bool:
    """Whether a keepalive can be sent and answered before the previous proof of the lease runs out."""
    return keepalive_interval_s + request_timeout_s < ttl_s - margin_s


class Lease(Protocol):
    """A shared store's proof that this node may still serve what it owns (etcd's lease).

    ``lease_valid(now)`` is False once the proof has run out on the local clock: serve nothing
    then.  ``wait_lost`` returns once the store knows the lease is gone for good.
    """

    def lease_valid(self, now: float) -> bool: ...

    async def wait_lost(self) -> None: ...


@attrs.frozen(kw_only=True)
class OwnershipRecord:
    """What the store holds for one session: its owner and the revision of that write."""

    session_id: SessionId
    owner: str
    revision: int


#: Bytes of a peer's fingerprint (BLAKE2s of its static public key) in a session ticket.
PEER_FINGERPRINT_BYTES = 16


def peer_fingerprint(public_key: bytes) -> str:
    """The name a ticket gives a peer: short, and the same on every gateway that knows the key."""
    return hashlib.blake2s(public_key, digest_size=PEER_FINGERPRINT_BYTES).hexdigest()


@attrs.frozen(kw_only=True)
class SessionTicket:
    """Whose a session is, kept per peer beside the ownership record and outliving its owner's lease.

    When a gateway dies its ownership records go with its lease, and with them any proof of
    which peer a session belongs to.  The ticket keeps that proof (and the session's tunnel
    addresses) so that another gateway can take the session over for the peer that
    authenticates as its owner, and for no one else (docs/cluster.md, "Takeover").  One per
    peer: a peer's new session overwrites it, so a ticket never names a session the peer
    replaced.  Nothing in it is secret.
    """

    peer: str
    session_id: SessionId
    owner: str
    address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address | None = None
    #: The store revision of the write that put the ticket there; 0 before it is written.
    revision: int = ABSENT_REVISION


@attrs.frozen(kw_only=True)
class Takeover:
    """How a gateway's session began when it took one over: the client's version, the owner before."""

    version: int = attrs.field(validator=attrs.validators.ge(0))
    previous_owner: str
    #: Where the resume came from: the answer went there, so a REATTACH from it sealed with the
    #: new keys proves the client receives there (return routability, as a challenge would).
    endpoint: tuple[str, int] | None = None


class TakeoverVerdict(enum.Enum):
    """Whether a ticket lets ``peer`` take ``session`` over here (:func:`judge_takeover`)."""

    ALLOWED = "ALLOWED"
    NO_TICKET = "NO_TICKET"  # the peer has no session anywhere the store knows of
    OTHER_SESSION = "OTHER_SESSION"  # the peer's ticket names another (newer) session
    ADDRESS_DIFFERS = "ADDRESS_DIFFERS"  # this gateway would give the peer another tunnel address


def judge_takeover(
    ticket: SessionTicket | None,
    *,
    peer: str,
    session_id: SessionId,
    address: ipaddress.IPv4Address | None,
) -> TakeoverVerdict:
    """May the authenticated ``peer`` resume ``session_id`` here, where it would hold ``address``?

    The session must be the one the peer's ticket names (a peer can resume only its latest
    session, never another peer's), and its tunnel address must stay the same, or the
    connections through the tunnel would break anyway.  ``address`` None: the peer has no
    configured address here, so its address is a pool address of another gateway, which this
    one cannot vouch for.
    """
    if ticket is None or ticket.peer != peer:
        return TakeoverVerdict.NO_TICKET
    if ticket.session_id != session_id:
        return TakeoverVerdict.OTHER_SESSION
    if address is None or ticket.address != address:
        return TakeoverVerdict.ADDRESS_DIFFERS
    return TakeoverVerdict.ALLOWED


class Ownership(enum.Enum):
    OWNED = "OWNED"
    NOT_OWNER = "NOT_OWNER"
    AMBIGUOUS = "AMBIGUOUS"


@attrs.frozen
class OwnershipVerdict:
    ownership: Ownership
    reason: ReasonCode | None
    why: str


def classify(
    record: OwnershipRecord | None,
    *,
    session_id: SessionId,
    node_id: str,
    held_revision: int,
    store_failure: ReasonCode | None = None,
) -> OwnershipVerdict:
    """Decide whether ``node_id`` may mutate ``session_id`` given the store's record.

    ``store_failure``: the store gave no certain answer (STORE_UNAVAILABLE, OWNERSHIP_AMBIGUOUS,
    or a lease no longer proven): that is ambiguity whatever ``record`` says.
    """
    if store_failure is not None:
        return OwnershipVerdict(Ownership.AMBIGUOUS, store_failure, "ownership store gave no certain answer")
    if record is None:
        return OwnershipVerdict(
            Ownership.AMBIGUOUS, ReasonCode.OWNERSHIP_AMBIGUOUS, "no ownership record (lease expired?)"
        )
    if record.session_id != session_id:
        return OwnershipVerdict(
            Ownership.AMBIGUOUS, ReasonCode.OWNERSHIP_AMBIGUOUS, "record is for another session"
        )
    if record.owner != node_id:
        return OwnershipVerdict(Ownership.NOT_OWNER, ReasonCode.NOT_OWNER, f"owned by {record.owner}")
    if record.revision != held_revision:
        return OwnershipVerdict(
            Ownership.AMBIGUOUS,
            ReasonCode.OWNERSHIP_AMBIGUOUS,
            f"store revision {record.revision} differs from held revision {held_revision}",
        )
    return OwnershipVerdict(Ownership.OWNED, None, "owned at the held revision")
