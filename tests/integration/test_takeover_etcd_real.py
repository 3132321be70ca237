"""Takeover on real etcd: a session's ticket outlives its owner, and only then may another gateway own it.

Determinism rules: each test starts its own etcd (``lab/etcd.py``) on free loopback ports and
tears it down on any exit; every body runs under ``trio.fail_after``; waits poll a real
condition (the dead owner's record is gone) and are bounded.  The race asserts an
order-independent outcome: exactly one winner per trial, whatever order Trio and etcd pick.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator

import pytest
import trio

from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import ABSENT_REVISION, SessionTicket, peer_fingerprint
from jvpn_trio.drivers.store_etcd import (
    EtcdClient,
    EtcdOwnershipStore,
    open_etcd_ownership_store,
)
from jvpn_trio.lab.etcd import EtcdSpec, etcd_binary, open_etcd_cluster

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="needs etcd (apt-get install etcd-server)")

REQUEST_TIMEOUT_S = 0.5
SHORT_TTL_MS = 1000
LONG_TTL_MS = 3000
MARGIN_S = 0.1
KEEPALIVE_S = 0.3
TEST_TIMEOUT_S = 60
POLL_S = 0.05
RACE_TRIALS = 200
ADDRESS = ipaddress.IPv4Address("10.66.0.2")


def sid(n: int) -> SessionId:
    return SessionId(n.to_bytes(16, "big"))


def peer(n: int) -> str:
    return peer_fingerprint(n.to_bytes(32, "big"))


def ticket(session_id: SessionId, peer_name: str, owner: str) -> SessionTicket:
    return SessionTicket(peer=peer_name, session_id=session_id, owner=owner, address=ADDRESS)


@contextlib.asynccontextmanager
async def store_on(endpoints: list[str]) -> AsyncIterator[EtcdOwnershipStore]:
    async with open_etcd_ownership_store(
        endpoints,
        request_timeout_s=REQUEST_TIMEOUT_S,
        lease_ttl_ms=LONG_TTL_MS,
        lease_margin_s=MARGIN_S,
        keepalive_interval_s=KEEPALIVE_S,
    ) as store:
        yield store


async def test_the_ticket_outlives_a_dead_owner_and_lets_one_gateway_take_over() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_etcd_cluster(EtcdSpec(members=1)) as etcd, store_on(etcd.endpoints) as b:
            client = EtcdClient(etcd.endpoints, request_timeout_s=REQUEST_TIMEOUT_S)
            a = EtcdOwnershipStore(client, lease_ttl_ms=SHORT_TTL_MS, lease_margin_s=MARGIN_S, keepalive_interval_s=KEEPALIVE_S)
            s, p = sid(1), peer(1)
            async with trio.open_nursery() as nursery:
                await a.start(nursery)
                claimed = await a.claim(s, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket(s, p, "gw-a"))
                assert claimed.succeeded and claimed.record is not None
                seen = await b.read_ticket(p)
                assert seen is not None and seen.session_id == s and seen.owner == "gw-a"
                assert seen.revision == claimed.record.revision  # written in the claim's transaction
                # gw-a is alive: its record stands, the takeover loses and learns who owns it.
                refused = await b.take_over(seen, "gw-b")
                assert not refused.succeeded and refused.record is not None and refused.record.owner == "gw-a"
                nursery.cancel_scope.cancel()  # gw-a dies: no keepalive, no revoke
            valid_until = a.lease.valid_until if a.lease is not None else 0.0
            while await b.read(s) is not None:  # etcd deletes gw-a's record when its lease expires
                await trio.sleep(POLL_S)
            assert trio.current_time() > valid_until  # never while gw-a could still believe it owned it
            assert await b.read_ticket(p) == seen  # the ticket outlived the lease
            taken = await b.take_over(seen, "gw-b")
            assert taken.succeeded and taken.record is not None
            assert taken.record.owner == "gw-b" and taken.record.revision > claimed.record.revision  # the fencing epoch
            moved = await b.read_ticket(p)
            assert moved is not None and moved.owner == "gw-b" and moved.revision == taken.record.revision
            stored = await b.read_record(s)
            assert stored is not None and b.lease is not None and stored.lease_id == b.lease.lease_id
            # The same stale ticket cannot be used twice.
            assert not (await b.take_over(seen, "gw-c")).succeeded
            # A clean end forgets the ticket, but only at the revision the session wrote.
            assert (await b.release(s, "gw-b", expected_revision=taken.record.revision)).succeeded
            assert not await b.forget_ticket(p, expected_revision=claimed.record.revision)
            assert await b.forget_ticket(p, expected_revision=taken.record.revision)
            assert await b.read_ticket(p) is None
            await client.aclose()


async def test_a_newer_session_of_the_peer_voids_the_old_ticket() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_etcd_cluster(EtcdSpec(members=1)) as etcd, store_on(etcd.endpoints) as a, store_on(
            etcd.endpoints
        ) as b:
            old, new, p = sid(2), sid(3), peer(2)
            await a.claim(old, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket(old, p, "gw-a"))
            stale = await b.read_ticket(p)
            assert stale is not None
            first = await a.read_record(old)
            assert first is not None
            await a.release(old, "gw-a", expected_revision=first.record.revision)  # its record is gone...
            await a.claim(new, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket(new, p, "gw-a"))
            # ...but the peer's ticket names its newer session now: the old one cannot be resumed.
            assert not (await b.take_over(stale, "gw-b")).succeeded
            assert await b.read(old) is None


async def take(seen: SessionTicket, node: str, store: EtcdOwnershipStore, winners: list[str]) -> None:
    if (await store.take_over(seen, node)).succeeded:
        winners.append(node)


async def test_racing_takeovers_through_two_gateways_never_both_win() -> None:
    """Two gateways take the same orphaned session over at once, many times: one winner each time."""
    with trio.fail_after(TEST_TIMEOUT_S * 3):
        async with open_etcd_cluster(EtcdSpec(members=1)) as etcd, store_on(etcd.endpoints) as b, store_on(
            etcd.endpoints
        ) as c, store_on(etcd.endpoints) as origin:
            for trial in range(RACE_TRIALS):
                s, p = sid(1000 + trial), peer(1000 + trial)
                made = await origin.claim(s, "gw-a", expected_revision=ABSENT_REVISION, ticket=ticket(s, p, "gw-a"))
                assert made.record is not None
                await origin.release(s, "gw-a", expected_revision=made.record.revision)  # as if its lease ended
                seen = await b.read_ticket(p)
                assert seen is not None
                winners: list[str] = []

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(take, seen, "gw-b", b, winners)
                    nursery.start_soon(take, seen, "gw-c", c, winners)
                assert len(winners) == 1, (trial, winners)
                record = await b.read(s)
                final = await b.read_ticket(p)
                assert record is not None and record.owner == winners[0]
                assert final is not None and final.owner == winners[0] and final.revision == record.revision
