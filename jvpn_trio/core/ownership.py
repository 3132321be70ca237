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

import attrs

from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.states import ReasonCode

#: The revision a compare-and-swap expects when it creates a record: "no record yet".
ABSENT_REVISION = 0


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
    record: OwnershipRecord | None, *, session_id: SessionId, node_id: str, held_revision: int
) -> OwnershipVerdict:
    """Decide whether ``node_id`` may mutate ``session_id`` given the store's record."""
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
