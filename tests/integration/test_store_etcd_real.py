"""EtcdOwnershipStore against real etcd processes (``jvpn_trio.lab.etcd``): one member, or three.

Determinism rules: every test starts its own etcd in a fresh temporary directory on free
loopback ports and tears it down on any exit; every test body runs under ``trio.fail_after``.
Waits poll a real condition (the key is gone, a member answers) and are bounded; the only
timed assertions are upper bounds many times wider than the parameter they check (a stopped
etcd fails a call within its request timeout).  The race test asserts an order-independent
outcome (exactly one winner), whatever order Trio and etcd pick.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio

from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import ABSENT_REVISION, OwnershipRecord
from jvpn_trio.drivers.store_etcd import (
    EtcdClient,
    EtcdOwnershipStore,
    StoreAmbiguous,
    StoreError,
    StoreUnavailable,
    open_etcd_ownership_store,
)
from jvpn_trio.drivers.store_memory import CasResult
from jvpn_trio.lab.etcd import EtcdCluster, EtcdSpec, etcd_binary, open_etcd_cluster

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="needs etcd (apt-get install etcd-server)")

#: Per-request bound: loopback etcd answers in milliseconds.
REQUEST_TIMEOUT_S = 0.5
#: The shortest lease etcd grants with the lab's 500 ms election timeout is 1 s.
SHORT_TTL_MS = 1000
LONG_TTL_MS = 3000
MARGIN_S = 0.1
KEEPALIVE_S = 0.3
#: Bound on each test body (etcd start-up included).
TEST_TIMEOUT_S = 30
POLL_S = 0.05
RACE_TRIALS = 200


def sid(n: int) -> SessionId:
    return SessionId(n.to_bytes(16, "big"))


@contextlib.asynccontextmanager
async def store_on(
    endpoints: list[str], *, ttl_ms: int = LONG_TTL_MS, keepalive_s: float = KEEPALIVE_S
) -> AsyncIterator[EtcdOwnershipStore]:
    async with open_etcd_ownership_store(
        endpoints,
        request_timeout_s=REQUEST_TIMEOUT_S,
        lease_ttl_ms=ttl_ms,
        lease_margin_s=MARGIN_S,
        keepalive_interval_s=keepalive_s,
    ) as store:
        yield store


@contextlib.asynccontextmanager
async def one_etcd() -> AsyncIterator[EtcdCluster]:
    async with open_etcd_cluster(EtcdSpec(members=1)) as cluster:
        yield cluster


async def test_claims_compare_and_swap_on_the_mod_revision() -> None:
    """Create-if-absent once; a stale claim loses and returns the record that won; owner-only release."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with one_etcd() as etcd, store_on(etcd.endpoints) as a, store_on(etcd.endpoints) as b:
            s = sid(1)
            assert await a.read(s) is None
            first = await a.claim(s, "gw-a", expected_revision=ABSENT_REVISION)
            assert first.succeeded and first.record is not None and first.record.owner == "gw-a"
            assert await a.read(s) == first.record
            # Create-if-absent again: the key exists, so it loses and sees gw-a's record.
            assert await b.claim(s, "gw-b", expected_revision=ABSENT_REVISION) == CasResult(False, first.record)
            # A takeover at the held revision wins, with a higher revision: the fencing epoch.
            taken = await b.claim(s, "gw-b", expected_revision=first.record.revision)
            assert taken.succeeded and taken.record is not None
            assert taken.record.owner == "gw-b" and taken.record.revision > first.record.revision
            # gw-a's stale claim loses and learns the current record.
            assert await a.claim(s, "gw-a", expected_revision=first.record.revision) == CasResult(False, taken.record)
            # Release: not by gw-a, not at a stale revision; by gw-b at its revision.
            assert await a.release(s, "gw-a", expected_revision=taken.record.revision) == CasResult(False, taken.record)
            assert await b.release(s, "gw-b", expected_revision=first.record.revision) == CasResult(False, taken.record)
            assert await b.release(s, "gw-b", expected_revision=taken.record.revision) == CasResult(True, None)
            assert await a.read(s) is None
            # The claim rode on gw-b's lease (checked on a fresh claim).
            again = await b.claim(s, "gw-b", expected_revision=ABSENT_REVISION)
            stored = await a.read_record(s)
            assert again.succeeded and stored is not None and b.lease is not None
            assert stored.lease_id == b.lease.lease_id


async def test_a_lease_kept_alive_keeps_the_record_and_an_expired_one_deletes_it() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with one_etcd() as etcd, store_on(etcd.endpoints) as observer:
            client = EtcdClient(etcd.endpoints, request_timeout_s=REQUEST_TIMEOUT_S)
            store = EtcdOwnershipStore(
                client, lease_ttl_ms=SHORT_TTL_MS, lease_margin_s=MARGIN_S, keepalive_interval_s=KEEPALIVE_S
            )
            s = sid(2)
            async with trio.open_nursery() as nursery:
                await store.start(nursery)
                assert store.lease is not None
                lease_id = store.lease.lease_id
                claimed = await store.claim(s, "gw-a", expected_revision=ABSENT_REVISION)
                assert claimed.succeeded
                # Three TTLs with the keepalive running: the record stays, the lease stays valid.
                await trio.sleep(3 * SHORT_TTL_MS / 1000)
                assert await observer.read(s) == claimed.record
                assert store.lease_valid(trio.current_time())
                # The node "dies": the keepalive stops, nothing is revoked.
                nursery.cancel_scope.cancel()
            valid_until = store.lease.valid_until
            while await observer.read(s) is not None:
                await trio.sleep(POLL_S)
            assert await observer.lease_time_to_live(lease_id) is None
            # Our own validity had run out before etcd deleted the record.
            assert trio.current_time() > valid_until and not store.lease_valid(trio.current_time())
            await client.aclose()


async def test_a_clean_close_revokes_the_lease_and_its_records() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with one_etcd() as etcd, store_on(etcd.endpoints) as observer:
            async with store_on(etcd.endpoints) as store:
                assert store.lease is not None
                lease_id = store.lease.lease_id
                assert (await store.claim(sid(3), "gw-a", expected_revision=ABSENT_REVISION)).succeeded
            assert await observer.read(sid(3)) is None
            assert await observer.lease_time_to_live(lease_id) is None


async def test_a_stopped_or_hung_etcd_fails_closed_within_the_request_timeout() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with one_etcd() as etcd, store_on(etcd.endpoints) as store:
            claimed = await store.claim(sid(4), "gw-a", expected_revision=ABSENT_REVISION)
            assert claimed.succeeded and claimed.record is not None
            member = etcd.members[0]
            # Hung (SIGSTOP): reads time out; a claim was sent, so its outcome is ambiguous.
            member.pause()
            with trio.fail_after(4 * REQUEST_TIMEOUT_S):
                with pytest.raises(StoreUnavailable, match="no reply|timed out"):
                    await store.read(sid(4))
            with trio.fail_after(4 * REQUEST_TIMEOUT_S):
                with pytest.raises(StoreAmbiguous):
                    await store.claim(sid(5), "gw-a", expected_revision=ABSENT_REVISION)
            member.resume()
            await etcd.wait_healthy()
            assert await store.read(sid(4)) == claimed.record
            # Stopped: the connection is refused, nothing was sent, so it is plainly unavailable.
            await member.stop(etcd.spec.stop_timeout_s)
            with trio.fail_after(2 * REQUEST_TIMEOUT_S):
                with pytest.raises(StoreUnavailable, match="cannot connect"):
                    await store.read(sid(4))
                with pytest.raises(StoreUnavailable, match="cannot connect"):
                    await store.claim(sid(6), "gw-a", expected_revision=ABSENT_REVISION)
                with pytest.raises(StoreUnavailable, match="cannot connect"):
                    await store.release(sid(4), "gw-a", expected_revision=claimed.record.revision)


async def until_served(store: EtcdOwnershipStore, s: SessionId, node_id: str) -> OwnershipRecord:
    """Claim ``s`` (create-if-absent, then at whatever revision a lost race shows) until it is ours."""
    expected = ABSENT_REVISION
    while True:
        try:
            result = await store.claim(s, node_id, expected_revision=expected)
        except StoreError:
            await trio.sleep(POLL_S)
            continue
        if result.succeeded and result.record is not None:
            return result.record
        expected = result.record.revision if result.record else ABSENT_REVISION


async def test_three_members_with_the_leader_hung_or_a_follower_killed_still_serve() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_etcd_cluster(EtcdSpec(members=3)) as etcd:
            leader = await etcd.leader()
            others = [m for m in etcd.members if m is not leader]
            # The hung member comes first, so the store must move on to the others.
            endpoints = [leader.client_url] + [m.client_url for m in others]
            async with store_on(endpoints) as store:
                leader.pause()
                record = await until_served(store, sid(7), "gw-a")
                assert await store.read(sid(7)) == record
                async with store_on([others[1].client_url]) as other:
                    assert await other.read(sid(7)) == record
                assert store.lease_valid(trio.current_time())
                # Back: the old leader catches up and serves the same record.
                leader.resume()
                await etcd.wait_healthy([leader])
                async with store_on([leader.client_url]) as old:
                    assert await old.read(sid(7)) == record
                # A follower killed outright: two of three still make a quorum.
                others[0].kill()
                assert (await until_served(store, sid(8), "gw-a")).owner == "gw-a"
                assert await store.read(sid(7)) == record


async def test_two_nodes_racing_for_a_session_never_both_win() -> None:
    """200 trials: odd ones race to create, even ones race to take over the same revision."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with one_etcd() as etcd, store_on(etcd.endpoints) as a, store_on(etcd.endpoints) as b:
            nodes = {"gw-a": a, "gw-b": b}
            for trial in range(RACE_TRIALS):
                s = sid(1000 + trial)
                expected = ABSENT_REVISION
                if trial % 2 == 0:
                    seeded = await a.claim(s, "gw-seed", expected_revision=ABSENT_REVISION)
                    assert seeded.record is not None
                    expected = seeded.record.revision
                results: dict[str, CasResult] = {}

                async def claim(node_id: str, store: EtcdOwnershipStore) -> None:
                    results[node_id] = await store.claim(s, node_id, expected_revision=expected)  # noqa: B023

                async with trio.open_nursery() as nursery:
                    for node_id, store in nodes.items():
                        nursery.start_soon(claim, node_id, store)
                winners = [n for n, r in results.items() if r.succeeded]
                assert len(winners) == 1, f"trial {trial}: winners {winners}"
                won = results[winners[0]].record
                assert won is not None and won.owner == winners[0] and won.revision > expected
                (loser,) = set(nodes) - set(winners)
                assert results[loser] == CasResult(False, won)
                assert await b.read(s) == won
