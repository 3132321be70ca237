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
