"""A real network partition of a three-member etcd: the cut-off side fails closed, the majority serves.

Each etcd member runs in a network namespace of its own, joined to the others by a bridge
(``EtcdSpec(netns=True)``, jvpn_trio/lab/etcd.py); ``cut_off`` drops every frame between one
member and the other two at the bridge, silently, as a real partition does, while this process
still reaches every member through its unix socket.  Two real :class:`EtcdOwnershipStore`s:
``gw-a`` talks only to the member that will be cut off, ``gw-b`` only to the other two.

Determinism rules: a fresh cluster (namespaces, data, processes) per test, torn down on any
exit; the body runs under ``trio.fail_after`` and every wait polls a real condition (a call's
outcome, the key being gone) under its own bound.  Nothing asserts a duration: the checks are
outcomes (fail closed, never a success or stale data on the minority side; one owner at every
instant, from both stores and from the key's history in etcd).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import pytest
import trio

from jvpn_trio.core import wire
from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import ABSENT_REVISION
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers.store_etcd import (
    EtcdOwnershipStore,
    EtcdRecord,
    StoreAmbiguous,
    StoreUnavailable,
    b64,
    decode_range_reply_untrusted,
    open_etcd_ownership_store,
    session_key,
)
from jvpn_trio.lab.etcd import (
    EtcdCluster,
    EtcdMember,
    EtcdSpec,
    etcd_binary,
    open_etcd_cluster,
)
from tests.drivers.test_gateway_cluster import reattach
from tests.drivers.test_gateway_runtime import Peer
from tests.integration.test_cluster_etcd_real import EtcdWorld

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None,
        reason="needs root, iproute2 and nft to put etcd members in network namespaces",
    ),
    pytest.mark.skipif(etcd_binary() is None, reason="needs etcd (apt-get install etcd-server)"),
]

#: Per-request bound: the members answer across a bridge in milliseconds.
REQUEST_TIMEOUT_S = 0.5
#: gw-a's lease: short, so that the majority may take over soon (etcd's minimum with the lab's
#: 500 ms election timeout is 1 s); keepalive + request timeout < TTL - margin.
LEASE_TTL_MS = 2000
MARGIN_S = 0.2
KEEPALIVE_S = 0.4
#: Bound on the whole test, cluster start and teardown included.
TEST_TIMEOUT_S = 60
#: Bound on each wait for a real condition: the longest is a lease expiring after a leader
#: election (etcd extends every lease by an election timeout when a new leader takes over).
WAIT_BOUND_S = 15
POLL_S = 0.05

SESSION = SessionId((0x14).to_bytes(16, "big"))
OTHER = SessionId((0x15).to_bytes(16, "big"))
MAJORITY_ONLY = SessionId((0x16).to_bytes(16, "big"))


@asynccontextmanager
async def store_on(etcd: EtcdCluster, members: list[EtcdMember], heard: list[str]) -> AsyncIterator[EtcdOwnershipStore]:
    """A started store that talks only to ``members``; ``heard`` collects its calls' outcomes."""
    async with open_etcd_ownership_store(
        [m.client_url for m in members],
        request_timeout_s=REQUEST_TIMEOUT_S,
        lease_ttl_ms=LEASE_TTL_MS,
        lease_margin_s=MARGIN_S,
        keepalive_interval_s=KEEPALIVE_S,
        observer=lambda operation, outcome, _seconds: heard.append(f"{operation}:{outcome}"),
        transport=etcd.transport(),
    ) as store:
        yield store


async def history(store: EtcdOwnershipStore, session_id: SessionId, first: int) -> list[EtcdRecord | None]:
    """The session key as etcd had it at every revision from ``first`` to now, repeats dropped."""
    key = session_key(store.prefix, session_id)
    now = await store.client.post("/v3/kv/range", {"key": b64(key)})
    states: list[EtcdRecord | None] = []
    for revision in range(first, int(now["header"]["revision"]) + 1):
        reply = await store.client.post("/v3/kv/range", {"key": b64(key), "revision": str(revision)})
        state = decode_range_reply_untrusted(reply, key, session_id)
        if not states or states[-1] != state:
            states.append(state)
    return states


async def refused(call: Awaitable[object]) -> None:
    """A store call that must fail closed, in bounded time: StoreUnavailable or StoreAmbiguous."""
    with trio.fail_after(WAIT_BOUND_S), pytest.raises((StoreUnavailable, StoreAmbiguous)):
        await call


@pytest.mark.parametrize("cut_member", ["follower", "leader"])
async def test_a_member_cut_off_by_the_network_fails_closed_and_the_majority_takes_over(cut_member: str) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_etcd_cluster(EtcdSpec(members=3, netns=True)) as etcd:
            leader = await etcd.leader()
            cut = leader if cut_member == "leader" else next(m for m in etcd.members if m is not leader)
            majority = [m for m in etcd.members if m is not cut]
            heard_a: list[str] = []
            heard_b: list[str] = []
            async with store_on(etcd, [cut], heard_a) as a, store_on(etcd, majority, heard_b) as b:
                # Before the partition: gw-a owns the session, and both sides agree.
                claimed = await a.claim(SESSION, "gw-a", expected_revision=ABSENT_REVISION)
                assert claimed.succeeded and claimed.record is not None
                first = await a.read_record(SESSION)
                assert first is not None and first.record == claimed.record
                assert await b.read(SESSION) == claimed.record

                await etcd.cut_off(cut)

                # The cut-off side: no claim, no linearizable read, within the request timeout, never a success.
                await refused(a.read(SESSION))
                await refused(a.claim(OTHER, "gw-a", expected_revision=ABSENT_REVISION))
                await refused(a.claim(SESSION, "gw-a", expected_revision=claimed.record.revision))
                # Its keepalives go unanswered, so its lease proof runs out: gw-a stops serving.
                with trio.fail_after(WAIT_BOUND_S):
                    while a.lease_valid(trio.current_time()):
                        await trio.sleep(POLL_S)

                # The majority side serves (once it has a leader: if the cut member led, it elects one).
                with trio.fail_after(WAIT_BOUND_S):
                    while True:
                        try:
                            await b.read(SESSION)
                            break
                        except StoreUnavailable:
                            await trio.sleep(POLL_S)
                other = await b.claim(MAJORITY_ONLY, "gw-b", expected_revision=ABSENT_REVISION)
                assert other.succeeded
                # After gw-a's lease TTL etcd deletes its record; never while gw-a could still serve.
                with trio.fail_after(WAIT_BOUND_S):
                    while (record := await b.read(SESSION)) is not None:
                        assert record == claimed.record
                        await trio.sleep(POLL_S)
                assert not a.lease_valid(trio.current_time())  # both on this process's one clock
                taken = await b.claim(SESSION, "gw-b", expected_revision=ABSENT_REVISION)
                assert taken.succeeded and taken.record is not None
                assert taken.record.revision > claimed.record.revision  # the fencing epoch only grows

                # The cut-off side still refuses, and never shows the stale record it holds.
                await refused(a.read(SESSION))
                await refused(a.claim(SESSION, "gw-a", expected_revision=taken.record.revision))

                await etcd.heal()

                # The cut-off member catches up: gw-a, through it alone, reads gw-b's record ...
                with trio.fail_after(WAIT_BOUND_S):
                    while True:
                        try:
                            caught_up = await a.read(SESSION)
                            break
                        except StoreUnavailable:
                            await trio.sleep(POLL_S)
                assert caught_up == taken.record
                assert await a.read(MAJORITY_ONLY) == other.record
                # ... and hears that its lease is gone: it will never serve the session again.
                with trio.fail_after(WAIT_BOUND_S):
                    await a.wait_lost()
                assert not a.lease_valid(trio.current_time())
                with pytest.raises(StoreUnavailable, match="no live lease"):
                    await a.claim(SESSION, "gw-a", expected_revision=taken.record.revision)

                # etcd's own history of the key: gw-a's one write, then nothing, then gw-b's; no write
                # from the cut-off side ever landed.
                states = await history(b, SESSION, claimed.record.revision)
                assert states == [first, None, await b.read_record(SESSION)]
                assert states[-1] is not None and states[-1].record == taken.record

            # What the metrics would show: the cut-off side's calls failed closed, none succeeded.
            assert heard_a.count("claim:ok") == 1  # the one before the partition
            assert {"read:unavailable", "keepalive:unavailable", "keepalive:lease_lost"} <= set(heard_a)
            assert {"claim:ambiguous", "claim:unavailable"} & set(heard_a)
            assert heard_b.count("claim:ok") == 2


async def test_a_gateway_on_the_cut_off_member_denies_holds_then_ends_its_sessions() -> None:
    """The real gateway runtime on gw-a's store: what the partition does to its sessions.

    Cut off: a REATTACH is rejected STORE_UNAVAILABLE, a new handshake gets no session, and once
    the lease proof runs out nothing is forwarded (held, not ended).  Healed: the lease is gone
    in etcd, so the session ends OWNERSHIP_LOST and its record is not gw-a's any more.
    """
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_etcd_cluster(EtcdSpec(members=3, netns=True)) as etcd:
            leader = await etcd.leader()
            cut = next(m for m in etcd.members if m is not leader)
            heard: list[str] = []
            async with store_on(etcd, [cut], heard) as store:
                world = EtcdWorld(store)
                alice, bob = Peer(world, 1), Peer(world, 2)
                async with trio.open_nursery() as nursery:
                    await world.start(nursery)
                    result = await alice.handshake()
                    assert result is not None
                    (served,) = world.gateway.sessions.values()
                    assert isinstance(await reattach(alice, result, nonce=1), wire.ReattachAck)

                    await etcd.cut_off(cut)

                    answer = await reattach(alice, result, nonce=2)
                    assert isinstance(answer, wire.ReattachReject)
                    assert answer.reason is ReasonCode.STORE_UNAVAILABLE
                    assert await bob.handshake() is None
                    with trio.fail_after(WAIT_BOUND_S):
                        while store.lease_valid(trio.current_time()):
                            await trio.sleep(POLL_S)
                    world.tun.inject(bytes([0x45]) + bytes(15) + served.address.packed + bytes(8))
                    with trio.fail_after(WAIT_BOUND_S):
                        while world.gateway.statistics().tx_lease_unproven == 0:
                            await trio.sleep(POLL_S)
                    assert world.gateway.statistics().tx_packets == 0
                    assert served.session_id in world.gateway.sessions  # held, not ended

                    await etcd.heal()

                    with trio.fail_after(WAIT_BOUND_S):
                        while world.gateway.sessions:
                            await trio.sleep(POLL_S)
                    stats = world.gateway.statistics()
                    assert stats.terminated_ownership_lost == 1 and stats.sessions_created == 1
                    assert stats.handshake_store_unavailable + stats.handshake_ownership_ambiguous == 1
                    nursery.cancel_scope.cancel()
            # The record went with gw-a's lease: nobody owns the session now.
            async with store_on(etcd, etcd.members, []) as observer:
                assert await observer.read(result.session_id) is None
