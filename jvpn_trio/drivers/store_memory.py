"""Session ownership records: the OwnershipStore protocol and an in-memory store.

The gateway claims a session's record when it creates the session and
re-reads it before every reattach decision (``core/ownership.py`` classifies
what it reads).  ``OwnershipStore`` is the seam a shared store implements so
that several gateways can serve one cluster: it must offer an atomic
compare-and-swap on a per-key revision, as etcd's transactions compare
``mod_revision`` (spec section 10).  :class:`MemoryOwnershipStore` is the
only implementation here; it serves a single gateway process (and, shared, the
in-memory cluster tests).

Beside each record the store keeps the peer's *ticket* (``core.ownership.SessionTicket``):
written with a new session's claim in the same atomic step, it outlives the owner's lease, so
that another gateway can take the session over (:meth:`take_over`) once the owner is gone.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import ABSENT_REVISION, OwnershipRecord, SessionTicket


@attrs.frozen
class CasResult:
    """Outcome of a compare-and-swap: the record now in the store, and whether ours won."""

    succeeded: bool
    record: OwnershipRecord | None


class OwnershipStore(Protocol):
    async def read(self, session_id: SessionId) -> OwnershipRecord | None: ...

    async def claim(
        self, session_id: SessionId, node_id: str, *, expected_revision: int, ticket: SessionTicket | None = None
    ) -> CasResult:
        """Write ``node_id`` as owner iff the record's revision is ``expected_revision``.

        ``ABSENT_REVISION`` expects no record at all: that is how a new session is claimed.
        ``ticket``: written in the same atomic step when the claim succeeds (replacing the
        peer's previous ticket), with the claim's revision.
        """
        ...

    async def release(self, session_id: SessionId, node_id: str, *, expected_revision: int) -> CasResult:
        """Delete the record iff ``node_id`` owns it at ``expected_revision``."""
        ...

    async def read_ticket(self, peer: str) -> SessionTicket | None:
        """The peer's ticket (its revision filled in), or None."""
        ...

    async def take_over(self, ticket: SessionTicket, node_id: str) -> CasResult:
        """Own ``ticket.session_id`` iff it has no owner record and the ticket is unchanged.

        No record: its owner released it or its lease ended.  Unchanged ticket (still at
        ``ticket.revision``): the peer made no newer session meanwhile and nobody else took
        this one over.  On success the record and the ticket (now naming ``node_id``) are
        written in one atomic step; the record's revision is the new fencing epoch.
        """
        ...

    async def forget_ticket(self, peer: str, *, expected_revision: int) -> bool:
        """Delete the peer's ticket iff it is still at ``expected_revision`` (its session ended cleanly)."""
        ...


class MemoryOwnershipStore:
    """A single-process store with etcd-like global revisions; the default for one gateway."""

    def __init__(self) -> None:
        self._records: dict[SessionId, OwnershipRecord] = {}
        self._tickets: dict[str, SessionTicket] = {}
        self._revision = 0

    async def read(self, session_id: SessionId) -> OwnershipRecord | None:
        return self._records.get(session_id)

    async def claim(
        self, session_id: SessionId, node_id: str, *, expected_revision: int, ticket: SessionTicket | None = None
    ) -> CasResult:
        current = self._records.get(session_id)
        current_revision = current.revision if current else ABSENT_REVISION
        if current_revision != expected_revision:
            return CasResult(False, current)
        return CasResult(True, self._write(session_id, node_id, ticket))

    def _write(self, session_id: SessionId, node_id: str, ticket: SessionTicket | None) -> OwnershipRecord:
        self._revision += 1
        record = OwnershipRecord(session_id=session_id, owner=node_id, revision=self._revision)
        self._records[session_id] = record
        if ticket is not None:
            self._tickets[ticket.peer] = attrs.evolve(ticket, owner=node_id, revision=self._revision)
        return record

    async def read_ticket(self, peer: str) -> SessionTicket | None:
        return self._tickets.get(peer)

    async def take_over(self, ticket: SessionTicket, node_id: str) -> CasResult:
        current = self._records.get(ticket.session_id)
        stored = self._tickets.get(ticket.peer)
        if current is not None or stored is None or stored.revision != ticket.revision:
            return CasResult(False, current)
        return CasResult(True, self._write(ticket.session_id, node_id, ticket))

    async def forget_ticket(self, peer: str, *, expected_revision: int) -> bool:
        stored = self._tickets.get(peer)
        if stored is None or stored.revision != expected_revision:
            return False
        del self._tickets[peer]
        return True

    def expire(self, node_id: str) -> int:
        """``node_id``'s lease ended (the node died): its records go, its tickets stay.  For tests."""
        gone = [sid for sid, record in self._records.items() if record.owner == node_id]
        for session_id in gone:
            del self._records[session_id]
        return len(gone)

    async def release(self, session_id: SessionId, node_id: str, *, expected_revision: int) -> CasResult:
        current = self._records.get(session_id)
        if current is None or current.owner != node_id or current.revision != expected_revision:
            return CasResult(False, current)
        del self._records[session_id]
        return CasResult(True, None)
