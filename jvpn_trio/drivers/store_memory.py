"""Session ownership records: the OwnershipStore protocol and an in-memory store.

The gateway claims a session's record when it creates the session and
re-reads it before every reattach decision (``core/ownership.py`` classifies
what it reads).  ``OwnershipStore`` is the seam a shared store implements so
that several gateways can serve one cluster: it must offer an atomic
compare-and-swap on a per-key revision, as etcd's transactions compare
``mod_revision`` (spec section 10).  :class:`MemoryOwnershipStore` is the
only implementation here; it serves a single gateway process.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from jvpn_trio.core.ownership import ABSENT_REVISION
from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import OwnershipRecord


@attrs.frozen
class CasResult:
    """Outcome of a compare-and-swap: the record now in the store, and whether ours won."""

    succeeded: bool
    record: OwnershipRecord | None


class OwnershipStore(Protocol):
    async def read(self, session_id: SessionId) -> OwnershipRecord | None: ...

    async def claim(self, session_id: SessionId, node_id: str, *, expected_revision: int) -> CasResult:
        """Write ``node_id`` as owner iff the record's revision is ``expected_revision``.

        ``ABSENT_REVISION`` expects no record at all: that is how a new session is claimed.
        """
        ...

    async def release(self, session_id: SessionId, node_id: str, *, expected_revision: int) -> CasResult:
        """Delete the record iff ``node_id`` owns it at ``expected_revision``."""
        ...


class MemoryOwnershipStore:
    """A single-process store with etcd-like global revisions; the default for one gateway."""

    def __init__(self) -> None:
        self._records: dict[SessionId, OwnershipRecord] = {}
        self._revision = 0

    async def read(self, session_id: SessionId) -> OwnershipRecord | None:
        return self._records.get(session_id)

    async def claim(self, session_id: SessionId, node_id: str, *, expected_revision: int) -> CasResult:
        current = self._records.get(session_id)
        current_revision = current.revision if current else ABSENT_REVISION
        if current_revision != expected_revision:
            return CasResult(False, current)
        self._revision += 1
        record = OwnershipRecord(session_id=session_id, owner=node_id, revision=self._revision)
        self._records[session_id] = record
        return CasResult(True, record)

    async def release(self, session_id: SessionId, node_id: str, *, expected_revision: int) -> CasResult:
        current = self._records.get(session_id)
        if current is None or current.owner != node_id or current.revision != expected_revision:
            return CasResult(False, current)
        del self._records[session_id]
        return CasResult(True, None)
