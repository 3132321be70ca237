"""Session tickets and takeover in the in-memory store (docs/cluster.md, "Takeover").

Determinism: in-memory only, no clock; the race test asserts an order-independent outcome.
The same rules hold for etcd: tests/integration/test_takeover_etcd_real.py.
"""

from __future__ import annotations

import ipaddress

import trio

from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import ABSENT_REVISION, SessionTicket, peer_fingerprint
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore

S1 = SessionId(bytes(range(16)))
S2 = SessionId(bytes(range(16, 32)))
PEER = peer_fingerprint(b"P" * 32)
ADDRESS = ipaddress.IPv4Address("10.66.0.2")


def ticket(session_id: SessionId = S1, *, owner: str = "gw-a", revision: int = ABSENT_REVISION) -> SessionTicket:
    return SessionTicket(peer=PEER, session_id=session_id, owner=owner, address=ADDRESS, revision=revision)


async def test_a_claim_writes_the_ticket_in_the_same_step() -> None:
    store = MemoryOwnershipStore()
    claimed = await store.claim(S1, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket())
    assert claimed.succeeded and claimed.record is not None
    stored = await store.read_ticket(PEER)
    assert stored == ticket(revision=claimed.record.revision)


async def test_a_lost_claim_writes_no_ticket() -> None:
    store = MemoryOwnershipStore()
    await store.claim(S1, "gw-a", expected_revision=ABSENT_REVISION)
    lost = await store.claim(S1, "gw-b", expected_revision=ABSENT_REVISION, ticket=ticket(owner="gw-b"))
    assert not lost.succeeded
    assert await store.read_ticket(PEER) is None


async def test_takeover_waits_for_the_owner_to_be_gone() -> None:
    store = MemoryOwnershipStore()
    claimed = await store.claim(S1, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket())
    assert claimed.record is not None
    current = await store.read_ticket(PEER)
    assert current is not None
    refused = await store.take_over(current, "gw-b")
    assert not refused.succeeded and refused.record == claimed.record  # gw-a's lease lives: its record stands
    assert store.expire("gw-a") == 1  # gw-a dies; its lease ends
    taken = await store.take_over(current, "gw-b")
    assert taken.succeeded and taken.record is not None
    assert taken.record.owner == "gw-b" and taken.record.revision > claimed.record.revision  # the fencing epoch grew
    assert await store.read_ticket(PEER) == ticket(owner="gw-b", revision=taken.record.revision)
    # A second takeover on the same (now stale) ticket loses: the record is gw-b's.
    assert not (await store.take_over(current, "gw-c")).succeeded


async def test_a_newer_session_of_the_peer_makes_the_old_ticket_useless() -> None:
    store = MemoryOwnershipStore()
    await store.claim(S1, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket())
    old = await store.read_ticket(PEER)
    assert old is not None
    await store.claim(S2, "gw-c", expected_revision=ABSENT_REVISION, ticket=ticket(S2, owner="gw-c"))
    store.expire("gw-a")
    assert not (await store.take_over(old, "gw-b")).succeeded
    assert await store.read(S1) is None


async def test_forget_only_the_ticket_the_session_wrote() -> None:
    store = MemoryOwnershipStore()
    first = await store.claim(S1, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket())
    second = await store.claim(S2, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket(S2))
    assert first.record is not None and second.record is not None
    assert not await store.forget_ticket(PEER, expected_revision=first.record.revision)  # S2's ticket now
    assert await store.forget_ticket(PEER, expected_revision=second.record.revision)
    assert await store.read_ticket(PEER) is None


async def test_racing_takeovers_have_one_winner() -> None:
    store = MemoryOwnershipStore()
    await store.claim(S1, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket())
    store.expire("gw-a")
    current = await store.read_ticket(PEER)
    assert current is not None
    winners: list[str] = []

    async def take(node: str) -> None:
        if (await store.take_over(current, node)).succeeded:
            winners.append(node)

    async with trio.open_nursery() as nursery:
        for node in ("gw-b", "gw-c", "gw-d"):
            nursery.start_soon(take, node)
    assert len(winners) == 1
    record = await store.read(S1)
    assert record is not None and record.owner == winners[0]
