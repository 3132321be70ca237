"""MemoryOwnershipStore: compare-and-swap claims and releases with etcd-like global revisions (spec 10).

Determinism: in-memory only, no I/O and no clock; every await is a plain
coroutine call, so results do not depend on Trio's scheduling order, except
in the concurrent-claim test, which asserts an order-independent outcome.
"""

from __future__ import annotations

import trio

from jvpn_trio.core.ownership import ABSENT_REVISION
from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import Ownership, OwnershipRecord, classify
from jvpn_trio.drivers.store_memory import CasResult, MemoryOwnershipStore, OwnershipStore

A = SessionId(bytes(range(16)))
B = SessionId(bytes(range(16, 32)))


def rec(session_id: SessionId, owner: str, revision: int) -> OwnershipRecord:
    return OwnershipRecord(session_id=session_id, owner=owner, revision=revision)


async def test_read_absent() -> None:
    store = MemoryOwnershipStore()
    assert await store.read(A) is None


async def test_claim_absent_at_revision_zero() -> None:
    store = MemoryOwnershipStore()
    result = await store.claim(A, "gw-a", expected_revision=0)
    assert result == CasResult(True, rec(A, "gw-a", 1))
    assert await store.read(A) == rec(A, "gw-a", 1)


async def test_a_new_session_is_claimed_at_the_absent_revision() -> None:
    """``core.admission`` builds new-session claims with ABSENT_REVISION: this store must honour it."""
    store = MemoryOwnershipStore()
    first = await store.claim(A, "gw-a", expected_revision=ABSENT_REVISION)
    assert first.succeeded and first.record == rec(A, "gw-a", 1)
    again = await store.claim(A, "gw-b", expected_revision=ABSENT_REVISION)
    assert again == CasResult(False, rec(A, "gw-a", 1))


async def test_claim_absent_with_a_nonzero_expected_revision_fails() -> None:
    store = MemoryOwnershipStore()
    assert await store.claim(A, "gw-a", expected_revision=5) == CasResult(False, None)
    assert await store.read(A) is None


async def test_cas_conflict_returns_the_current_record() -> None:
    store = MemoryOwnershipStore()
    await store.claim(A, "gw-a", expected_revision=0)
    # A second node that still believes the key is absent loses and learns the owner.
    assert await store.claim(A, "gw-b", expected_revision=0) == CasResult(False, rec(A, "gw-a", 1))
    assert await store.claim(A, "gw-b", expected_revision=2) == CasResult(False, rec(A, "gw-a", 1))
    assert await store.read(A) == rec(A, "gw-a", 1)


async def test_claim_at_the_current_revision_takes_over() -> None:
    store = MemoryOwnershipStore()
    await store.claim(A, "gw-a", expected_revision=0)
    assert await store.claim(A, "gw-b", expected_revision=1) == CasResult(True, rec(A, "gw-b", 2))
    # The old owner's view is now stale: its next write conflicts.
    assert await store.claim(A, "gw-a", expected_revision=1) == CasResult(False, rec(A, "gw-b", 2))


async def test_revisions_increase_globally_across_sessions() -> None:
    store = MemoryOwnershipStore()
    assert (await store.claim(A, "gw-a", expected_revision=0)).record == rec(A, "gw-a", 1)
    assert (await store.claim(B, "gw-a", expected_revision=0)).record == rec(B, "gw-a", 2)
    assert (await store.claim(A, "gw-a", expected_revision=1)).record == rec(A, "gw-a", 3)
    assert (await store.claim(B, "gw-b", expected_revision=2)).record == rec(B, "gw-b", 4)


async def test_failed_claims_do_not_consume_revisions() -> None:
    store = MemoryOwnershipStore()
    await store.claim(A, "gw-a", expected_revision=0)
    await store.claim(A, "gw-b", expected_revision=0)
    await store.claim(B, "gw-b", expected_revision=7)
    assert (await store.claim(B, "gw-b", expected_revision=0)).record == rec(B, "gw-b", 2)


async def test_release_only_by_the_owner_at_its_revision() -> None:
    store = MemoryOwnershipStore()
    await store.claim(A, "gw-a", expected_revision=0)
    current = rec(A, "gw-a", 1)
    assert await store.release(A, "gw-b", expected_revision=1) == CasResult(False, current)
    assert await store.release(A, "gw-a", expected_revision=2) == CasResult(False, current)
    assert await store.release(A, "gw-a", expected_revision=0) == CasResult(False, current)
    assert await store.read(A) == current
    assert await store.release(A, "gw-a", expected_revision=1) == CasResult(True, None)
    assert await store.read(A) is None


async def test_release_absent_fails() -> None:
    store = MemoryOwnershipStore()
    assert await store.release(A, "gw-a", expected_revision=0) == CasResult(False, None)


async def test_release_leaves_other_sessions_alone() -> None:
    store = MemoryOwnershipStore()
    await store.claim(A, "gw-a", expected_revision=0)
    await store.claim(B, "gw-a", expected_revision=0)
    assert (await store.release(A, "gw-a", expected_revision=1)).succeeded
    assert await store.read(B) == rec(B, "gw-a", 2)


async def test_revision_keeps_growing_after_release() -> None:
    store = MemoryOwnershipStore()
    await store.claim(A, "gw-a", expected_revision=0)
    await store.release(A, "gw-a", expected_revision=1)
    # A re-created key never reuses an old revision, so a stale holder cannot match it.
    assert await store.claim(A, "gw-b", expected_revision=0) == CasResult(True, rec(A, "gw-b", 2))


async def test_claimed_record_classifies_as_owned_only_for_the_winner() -> None:
    store: OwnershipStore = MemoryOwnershipStore()
    won = await store.claim(A, "gw-a", expected_revision=0)
    assert won.record is not None
    record = await store.read(A)
    mine = classify(record, session_id=A, node_id="gw-a", held_revision=won.record.revision)
    theirs = classify(record, session_id=A, node_id="gw-b", held_revision=won.record.revision)
    assert mine.ownership is Ownership.OWNED
    assert theirs.ownership is Ownership.NOT_OWNER


async def test_concurrent_claims_have_exactly_one_winner() -> None:
    store = MemoryOwnershipStore()
    results: dict[str, CasResult] = {}

    async def claim(node: str) -> None:
        await trio.lowlevel.checkpoint()
        results[node] = await store.claim(A, node, expected_revision=0)

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            for node in ("gw-a", "gw-b", "gw-c"):
                nursery.start_soon(claim, node)
    winners = [node for node, r in results.items() if r.succeeded]
    assert len(winners) == 1
    winner_record = rec(A, winners[0], 1)
    assert await store.read(A) == winner_record
    assert all(r.record == winner_record for r in results.values())
