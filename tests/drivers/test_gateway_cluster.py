"""The gateway fails closed on its ownership store: no certain answer, no session and no move.

A store that raises (StoreUnavailable, StoreAmbiguous) turns a handshake into a refusal with a
SECURITY_EVENT and a REATTACH into a REATTACH_REJECT naming the reason; a lease that is no
longer proven stops forwarding both ways, and a lease etcd says is gone ends every session
OWNERSHIP_LOST (docs/cluster.md).  Virtual time, in-memory network, scripted peers (the
harness of ``test_gateway_runtime``).
"""

from __future__ import annotations

import ipaddress

import trio

from jvpn_trio.core import wire
from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.noise import HandshakeResult
from jvpn_trio.core.ownership import OwnershipRecord, SessionTicket, StoreAmbiguous, StoreError, StoreUnavailable
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.store_memory import CasResult, MemoryOwnershipStore
from tests.drivers.test_gateway_runtime import Peer, World, ip


class FlakyStore(MemoryOwnershipStore):
    """The memory store, with a switch that makes every call raise ``failure`` instead."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: StoreError | None = None

    async def read(self, session_id: SessionId) -> OwnershipRecord | None:
        if self.failure is not None:
            raise self.failure
        return await super().read(session_id)

    async def claim(
        self, session_id: SessionId, node_id: str, *, expected_revision: int, ticket: SessionTicket | None = None
    ) -> CasResult:
        if self.failure is not None:
            raise self.failure
        return await super().claim(session_id, node_id, expected_revision=expected_revision, ticket=ticket)

    async def read_ticket(self, peer: str) -> SessionTicket | None:
        if self.failure is not None:
            raise self.failure
        return await super().read_ticket(peer)

    async def take_over(self, ticket: SessionTicket, node_id: str) -> CasResult:
        if self.failure is not None:
            raise self.failure
        return await super().take_over(ticket, node_id)

    async def forget_ticket(self, peer: str, *, expected_revision: int) -> bool:
        if self.failure is not None:
            raise self.failure
        return await super().forget_ticket(peer, expected_revision=expected_revision)

    async def release(self, session_id: SessionId, node_id: str, *, expected_revision: int) -> CasResult:
        if self.failure is not None:
            raise self.failure
        return await super().release(session_id, node_id, expected_revision=expected_revision)


class FakeLease:
    """A lease the test proves or withdraws at will."""

    def __init__(self) -> None:
        self.valid = True
        self.lost = trio.Event()

    def lease_valid(self, now: float) -> bool:
        return self.valid and not self.lost.is_set()

    async def wait_lost(self) -> None:
        await self.lost.wait()


class ClusterWorld(World):
    def __init__(self, store: FlakyStore | None = None, *, store_calls_in_flight: int | None = None) -> None:
        super().__init__()
        self.store = store if store is not None else FlakyStore()
        self.lease = FakeLease()
        self.events: list[EmitEvent] = []
        self.gateway = GatewayRuntime(
            policy=self.policy,
            static=self.gw_static,
            peers=[GatewayPeer(name=f"peer{n}", public=s.public, address=None) for n, s in self.statics.items()],
            tunnel=ipaddress.IPv4Interface("10.66.0.1/29"),
            store=self.store,
            node_id="gw-a",
            emit=self.events.append,
            random_bytes=self.random_bytes,
            lease=self.lease,
            store_calls_in_flight=store_calls_in_flight,
        )

    def security_events(self, reason: ReasonCode) -> list[EmitEvent]:
        return [e for e in self.events if e.kind is EventKind.SECURITY_EVENT and e.reason is reason]


async def reattach(peer: Peer, result: HandshakeResult, *, nonce: int) -> wire.ReattachReject | wire.ReattachAck | None:
    """One REATTACH for the peer's session on path 2; the gateway's answer, if one comes."""
    request = wire.Reattach(
        session_id=result.session_id,
        path_id=PathId(2),
        nonce=nonce,
        client_ts_ms=0,
        expected_version=result.state_version,
    )
    peer.send(wire.MessageType.REATTACH, wire.encode_reattach_plaintext(request))
    with trio.move_on_after(1.0):
        while True:
            for data, _ in await peer.port.recv_batch(16):
                opened = peer.channel.open_untrusted(data, now=trio.current_time())
                if opened.msg_type is wire.MessageType.REATTACH_REJECT:
                    return wire.decode_reattach_reject_plaintext_untrusted(opened.plaintext)
                if opened.msg_type is wire.MessageType.REATTACH_ACK:
                    return wire.decode_reattach_ack_plaintext_untrusted(opened.plaintext)
    return None


async def test_a_claim_without_answer_refuses_the_handshake_and_frees_the_address(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = ClusterWorld()
    alice = Peer(world, 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            world.store.failure = StoreUnavailable("etcd: cannot connect")
            assert await alice.handshake() is None
            world.store.failure = StoreAmbiguous("etcd: txn timed out")
            assert await alice.handshake() is None
            stats = world.gateway.statistics()
            assert (stats.handshake_store_unavailable, stats.handshake_ownership_ambiguous) == (1, 1)
            assert stats.sessions_created == 0 and not world.gateway.sessions
            assert len(world.security_events(ReasonCode.STORE_UNAVAILABLE)) == 1
            assert len(world.security_events(ReasonCode.OWNERSHIP_AMBIGUOUS)) == 1
            world.store.failure = None  # etcd is back: the same address is free again
            result = await alice.handshake()
            assert result is not None and result.tunnel_ipv4 == ip(2)
            nursery.cancel_scope.cancel()


async def test_an_unproven_lease_refuses_new_sessions(autojump_clock: trio.abc.Clock) -> None:
    world = ClusterWorld()
    world.lease.valid = False
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            assert await Peer(world, 1).handshake() is None
            assert world.gateway.statistics().handshake_store_unavailable == 1
            nursery.cancel_scope.cancel()


async def test_a_reattach_the_store_cannot_judge_is_rejected_and_changes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = ClusterWorld()
    alice = Peer(world, 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            result = await alice.handshake()
            assert result is not None
            (served,) = world.gateway.sessions.values()
            for failure, reason in (
                (StoreUnavailable("etcd: 503"), ReasonCode.STORE_UNAVAILABLE),
                (StoreAmbiguous("etcd: 500"), ReasonCode.OWNERSHIP_AMBIGUOUS),
            ):
                world.store.failure = failure
                before = served.core.record
                answer = await reattach(alice, result, nonce=1)
                assert isinstance(answer, wire.ReattachReject) and answer.reason is reason
                assert served.core.record == before and served.core.last_nonce == 0
                assert world.security_events(reason)
            world.lease.valid = False  # no store call at all: the lease alone denies
            answer = await reattach(alice, result, nonce=1)
            assert isinstance(answer, wire.ReattachReject) and answer.reason is ReasonCode.STORE_UNAVAILABLE
            world.lease.valid, world.store.failure = True, None
            answer = await reattach(alice, result, nonce=1)  # the same nonce: nothing was consumed
            assert isinstance(answer, wire.ReattachAck)
            assert world.gateway.statistics().reattach_store_unavailable == 2
            nursery.cancel_scope.cancel()


async def test_an_unproven_lease_forwards_nothing_until_proven_again(autojump_clock: trio.abc.Clock) -> None:
    world = ClusterWorld()
    alice = Peer(world, 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            result = await alice.handshake()
            assert result is not None
            assert isinstance(await reattach(alice, result, nonce=1), wire.ReattachAck)  # bound on path 2
            packet = bytes([0x45]) + bytes(15) + ip(2).packed + bytes(8)  # an IPv4 header to alice
            world.lease.valid = False
            world.tun.inject(packet)
            alice.send(wire.MessageType.DATA, wire.encode_data_plaintext(wire.Data(packet=packet)))
            await trio.sleep(0.5)
            stats = world.gateway.statistics()
            assert (stats.tx_lease_unproven, stats.drop_lease_unproven) == (1, 1)
            assert world.gateway.statistics().tx_packets == 0
            (served,) = world.gateway.sessions.values()
            assert served.core.record.state is not SessionState.TERMINATED  # held, not ended
            world.lease.valid = True
            world.tun.inject(packet)
            await trio.sleep(0.5)
            assert world.gateway.statistics().tx_packets == 1
            nursery.cancel_scope.cancel()


async def test_a_lost_lease_ends_every_session_ownership_lost(autojump_clock: trio.abc.Clock) -> None:
    world = ClusterWorld()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            assert await Peer(world, 1).handshake() is not None
            assert await Peer(world, 2).handshake() is not None
            world.store.failure = StoreUnavailable("etcd: gone")  # the releases fail too: counted
            world.lease.lost.set()
            await trio.sleep(0.5)
            stats = world.gateway.statistics()
            assert stats.terminated_ownership_lost == 2 and not world.gateway.sessions
            assert stats.store_release_failed == 2
            nursery.cancel_scope.cancel()


async def test_a_replacing_handshake_the_store_cannot_confirm_ends_nobody(autojump_clock: trio.abc.Clock) -> None:
    """The same key handshakes again while etcd is down: refused, and the session it would replace goes on."""
    world = ClusterWorld()
    alice = Peer(world, 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            first = await alice.handshake()
            assert first is not None
            world.store.failure = StoreUnavailable("etcd: cannot connect")
            assert await alice.handshake() is None
            assert not world.gateway.sessions[first.session_id].core.terminated
            assert world.gateway.statistics().handshake_store_unavailable == 1
            assert [e for e in world.events if e.reason is ReasonCode.SESSION_REPLACED] == []
            world.store.failure = None
            bob = await Peer(world, 2).handshake()  # alice's address was not freed for someone else
            assert bob is not None and bob.tunnel_ipv4 != first.tunnel_ipv4
            second = await alice.handshake()  # etcd is back: now it replaces her session, at the same address
            assert second is not None and second.tunnel_ipv4 == first.tunnel_ipv4
            await trio.sleep(0.1)
            ended = [e for e in world.events if e.kind is EventKind.STATE_CHANGE and e.session == first.session_id.hex]
            assert ended[-1].reason is ReasonCode.SESSION_REPLACED
            nursery.cancel_scope.cancel()


class SlowStore(FlakyStore):
    """Reads take ``READ_DELAY_S`` (etcd under load), until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = True
        self.reads_started = 0

    async def read(self, session_id: SessionId) -> OwnershipRecord | None:
        self.reads_started += 1
        if self.slow:
            await trio.sleep(READ_DELAY_S)
        return await super().read(session_id)


#: How long a slow store takes to answer a read: far longer than a probe's timeout.
READ_DELAY_S = 5.0


async def test_a_slow_store_holds_up_no_probe_and_a_full_set_of_calls_denies_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = SlowStore()
    world = ClusterWorld(store, store_calls_in_flight=1)
    alice = Peer(world, 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            result = await alice.handshake()
            assert result is not None
            first = wire.Reattach(
                session_id=result.session_id, path_id=PathId(2), nonce=1, client_ts_ms=0, expected_version=result.state_version
            )
            alice.send(wire.MessageType.REATTACH, wire.encode_reattach_plaintext(first))
            await trio.sleep(0.01)
            assert store.reads_started == 1  # its read waits for the store, in a task of its own
            # A probe on the same control port is answered at once, not after the read.
            sent = trio.current_time()
            probe = wire.Probe(path_id=PathId(1), seq=7, sent_us=5)
            alice.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(probe))
            answers = []
            while not answers:
                for data, _ in await alice.port.recv_batch(16):
                    opened = alice.channel.open_untrusted(data, now=trio.current_time())
                    answers.append(wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext))
            assert isinstance(answers[0], wire.ProbeAck) and answers[0].seq == 7
            assert trio.current_time() - sent < READ_DELAY_S
            # The one call slot is taken: a second REATTACH is denied at once, fail closed.
            answer = await reattach(alice, result, nonce=2)
            assert isinstance(answer, wire.ReattachReject) and answer.reason is ReasonCode.STORE_UNAVAILABLE
            assert trio.current_time() - sent < READ_DELAY_S
            assert world.gateway.statistics().reattach_store_busy == 1
            # The first read completes: its REATTACH is judged on what the store said.
            store.slow = False
            with trio.move_on_after(READ_DELAY_S * 2):
                while world.gateway.statistics().reattach_accepted == 0:
                    await trio.sleep(0.1)
            assert world.gateway.statistics().reattach_accepted == 1
            nursery.cancel_scope.cancel()
