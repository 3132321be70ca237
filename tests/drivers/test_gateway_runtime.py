"""The gateway runtime carries out admission and dispatch decisions; it counts what it drops.

Determinism rules: virtual time only (autojump_clock), an in-memory network,
seeded randomness; peers are scripted (raw handshakes and sealed frames, no
ClientRuntime) and every wait is bounded by fail_after in virtual seconds.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
import trio

from jvpn_trio.core import wire
from jvpn_trio.core.admission import Refusal
from jvpn_trio.core.channel import SecureChannel
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.cookie import open_cookie_reply
from jvpn_trio.core.noise import HandshakeResult, InitiatorHandshake, StaticKeypair, add_mac2, generate_static
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import TERMINATION_REASONS, TRANSITIONS, ReasonCode, SessionState
from jvpn_trio.drivers import gateway as gw
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime, GatewayStatistics
from jvpn_trio.drivers.memory import MemoryNetwork, MemoryPacketPort
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.ui.status import gateway_status, render_status_text

GATEWAY = ("192.0.2.1", 51820)
GATEWAY_CONTROL = ("192.0.2.1", 51821)
#: The answer to a handshake the gateway ignores never comes; this is long enough to be sure.
NO_ANSWER_S = 1.0

#: Every counter name ``jvpn-trio status --json`` has reported: consumers read these keys.
REPORTED_COUNTER_NAMES = {
    "inbox_full", "input_for_unknown_session", "send_no_port", "keys_exhausted",
    "drop_malformed", "drop_unexpected_handshake_resp", "drop_unknown_index", "drop_stray_packet",
    "drop_replayed_counter", "drop_decrypt_failed", "drop_malformed_plaintext", "drop_unexpected_type",
    "stray_data", "rx_packets", "rx_bytes", "rx_tun_full", "tx_not_ipv4", "tx_no_binding", "tx_packets", "tx_bytes",
    "handshake_malformed", "handshake_bad_mac", "handshake_decrypt_failed", "handshake_unknown_peer",
    "handshake_handshake_replay", "handshake_pool_exhausted", "handshake_claim_failed",
    "sessions_created", "rekey_unknown_session", "rekeys",
    "terminated_session_ttl_expired", "terminated_transport_loss_ttl_expired", "terminated_key_exhausted",
    "terminated_ownership_lost", "terminated_local_close", "terminated_peer_close",
}  # fmt: skip


def ip(last: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"10.66.0.{last}")


class Peer:
    """A scripted client: sends HANDSHAKE_INITs and sealed frames from its own port."""

    def __init__(self, world: World, number: int) -> None:
        self.world = world
        self.static = world.statics[number]
        self.port = world.net.port((f"198.51.100.{number}", 40000 + number))
        self.wall_time_ns = 1_700_000_000_000_000_000
        self.channel = SecureChannel(world.policy)

    async def handshake(self) -> HandshakeResult | None:
        """One new-session handshake; None if the gateway never answers."""
        self.wall_time_ns += 1_000_000_000  # each init must be fresher than the last
        state, init = InitiatorHandshake.create(
            self.static,
            self.world.gw_static.public,
            sender_index=self.world.rng.getrandbits(32),
            random_bytes=self.world.random_bytes,
            wall_time_ns=self.wall_time_ns,
            path_id=PathId(1),
        )
        self.port.send_nowait(wire.encode_handshake_init(init), GATEWAY_CONTROL)
        with trio.move_on_after(NO_ANSWER_S):
            while True:
                for data, _ in await self.port.recv_batch(16):
                    if wire.peek_type_untrusted(data) is wire.MessageType.COOKIE_REPLY:  # under load: again, with mac2
                        reply = wire.decode_cookie_reply_untrusted(data)
                        cookie = open_cookie_reply(reply, gateway_public=self.world.gw_static.public, init_mac1=init.mac1)
                        assert cookie is not None
                        self.port.send_nowait(wire.encode_handshake_init(add_mac2(init, cookie)), GATEWAY_CONTROL)
                    if wire.peek_type_untrusted(data) is wire.MessageType.HANDSHAKE_RESP:
                        result = state.consume_response(wire.decode_handshake_resp_untrusted(data))
                        self.channel = SecureChannel(self.world.policy)
                        self.channel.install_current(result.keypair(created_at=trio.current_time()))
                        return result
        return None

    def send(self, msg_type: wire.MessageType, plaintext: bytes) -> None:
        self.port.send_nowait(self.channel.seal(msg_type, plaintext), GATEWAY_CONTROL)


class World:
    def __init__(
        self,
        tunnel: str = "10.66.0.1/29",
        fixed: dict[int, ipaddress.IPv4Address] | None = None,
        tunnel6: str | None = None,
    ) -> None:
        self.policy = Policy()
        self.rng = random.Random(11)
        self.gw_static = generate_static(self.random_bytes)
        self.statics: dict[int, StaticKeypair] = {n: generate_static(self.random_bytes) for n in range(1, 5)}
        self.net = MemoryNetwork()
        self.tun = MemoryPacketPort()
        fixed = fixed or {}
        self.gateway = GatewayRuntime(
            policy=self.policy,
            static=self.gw_static,
            peers=[GatewayPeer(name=f"peer{n}", public=s.public, address=fixed.get(n)) for n, s in self.statics.items()],
            tunnel=ipaddress.IPv4Interface(tunnel),
            store=MemoryOwnershipStore(),
            node_id="gw-test",
            emit=lambda _event: None,
            random_bytes=self.random_bytes,
            tunnel6=ipaddress.IPv6Interface(tunnel6) if tunnel6 is not None else None,
        )

    def random_bytes(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))

    async def start(self, nursery: trio.Nursery) -> None:
        ports = [self.net.port(GATEWAY)]
        control = [self.net.port(GATEWAY_CONTROL)]
        await nursery.start(
            lambda task_status: self.gateway.serve(ports, control_ports=control, packets=self.tun, task_status=task_status)
        )


# -- statistics ------------------------------------------------------------------------------


def test_statistics_is_a_frozen_record_with_every_reported_counter() -> None:
    stats = World().gateway.statistics()
    assert isinstance(stats, GatewayStatistics)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.rx_packets = 1  # type: ignore[misc]
    names = set(attrs.asdict(stats))
    assert REPORTED_COUNTER_NAMES <= names
    assert all(value == 0 for value in attrs.asdict(stats).values())


def test_every_counter_a_reason_can_name_is_a_field() -> None:
    names = set(attrs.fields_dict(GatewayStatistics))
    tables: list[Mapping[Any, str]] = [gw.CHANNEL_DROP_COUNTERS, gw.HANDSHAKE_ERROR_COUNTERS, gw.TERMINATION_COUNTERS, gw.REFUSAL_COUNTERS]
    assert {name for table in tables for name in table.values()} <= names
    assert set(gw.REFUSAL_COUNTERS) == set(Refusal)
    # Every reason the state table can end a session with has its own counter.
    ending = {reason for (_, reason), rule in TRANSITIONS.items() if rule.to is SessionState.TERMINATED}
    assert ending <= set(TERMINATION_REASONS) == set(gw.TERMINATION_COUNTERS)


def test_a_reason_no_table_lists_is_counted_not_raised() -> None:
    runtime = World().gateway
    runtime._count_reason(gw.CHANNEL_DROP_COUNTERS, ReasonCode.NOT_OWNER, "drop_other")
    runtime._count_reason(gw.CHANNEL_DROP_COUNTERS, ReasonCode.DECRYPT_FAILED, "drop_other")
    assert (runtime.statistics().drop_other, runtime.statistics().drop_decrypt_failed) == (1, 1)


# -- admission, carried out ------------------------------------------------------------------


async def test_handshaking_again_replaces_the_session_and_keeps_the_address(autojump_clock: trio.abc.Clock) -> None:
    world = World()  # a pool of five addresses
    alice, bob = Peer(world, 1), Peer(world, 2)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            results = [await alice.handshake() for _ in range(12)]
            assert all(r is not None and r.tunnel_ipv4 == ip(2) for r in results)
            assert len({r.session_id for r in results if r is not None}) == 12
            await trio.sleep(0.1)
            (served,) = world.gateway.sessions.values()
            assert results[-1] is not None and served.session_id == results[-1].session_id
            stats = world.gateway.statistics()
            assert (stats.sessions_created, stats.terminated_session_replaced, stats.terminated_peer_close) == (12, 11, 0)
            second = await bob.handshake()
            assert second is not None and second.tunnel_ipv4 == ip(3)
            status = world.gateway.status.value
            # Published by the supervisor once it had ended the eleventh replaced session.
            assert status is not None and status.statistics.terminated_session_replaced == 11
            nursery.cancel_scope.cancel()


async def test_an_exhausted_pool_refuses_new_peers_only(autojump_clock: trio.abc.Clock) -> None:
    world = World(tunnel="10.66.0.1/30")  # one pool address: .2
    alice, bob = Peer(world, 1), Peer(world, 2)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            first = await alice.handshake()
            assert first is not None and first.tunnel_ipv4 == ip(2)
            assert await bob.handshake() is None
            assert world.gateway.statistics().handshake_pool_exhausted == 1
            again = await alice.handshake()  # her own address passes to her new session
            assert again is not None and again.tunnel_ipv4 == ip(2)
            nursery.cancel_scope.cancel()


async def test_a_configured_address_goes_only_to_its_peer(autojump_clock: trio.abc.Clock) -> None:
    world = World(fixed={3: ip(2)})
    alice, carol = Peer(world, 1), Peer(world, 3)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            a = await alice.handshake()
            c = await carol.handshake()
            assert a is not None and c is not None
            assert (a.tunnel_ipv4, c.tunnel_ipv4) == (ip(3), ip(2))
            nursery.cancel_scope.cancel()


# -- receiving ------------------------------------------------------------------------------


async def test_authenticated_messages_are_dispatched_by_their_type(autojump_clock: trio.abc.Clock) -> None:
    world = World()
    alice = Peer(world, 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            assert await alice.handshake() is not None
            probe = wire.Probe(path_id=PathId(1), seq=1, sent_us=5)
            alice.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(probe))
            ((reply, _),) = await alice.port.recv_batch(1)
            opened = alice.channel.open_untrusted(reply, now=trio.current_time())
            ack = wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext)
            assert isinstance(ack, wire.ProbeAck) and (ack.seq, ack.echo_sent_us) == (1, 5)

            # A message only a gateway sends, and a probe whose path id is 0.
            ack_from_client = wire.ProbeAck(
                path_id=PathId(1), seq=1, echo_sent_us=0, gateway_state_version=0, bound_path_id=None
            )
            alice.send(wire.MessageType.PROBE_ACK, wire.encode_probe_ack_plaintext(ack_from_client))
            alice.send(wire.MessageType.PROBE, bytes(wire.PROBE_LEN))
            await trio.sleep(0.1)
            stats = world.gateway.statistics()
            assert (stats.drop_unexpected_type, stats.drop_malformed_plaintext) == (1, 1)
            nursery.cancel_scope.cancel()


async def test_datagrams_without_a_session_or_ipv4_packets_are_counted(autojump_clock: trio.abc.Clock) -> None:
    world = World()
    stranger = world.net.port(("203.0.113.9", 9))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            stranger.send_nowait(bytes([wire.PROTOCOL_VERSION, wire.MessageType.DATA, 0, 0, 0]), GATEWAY)  # no index
            stranger.send_nowait(bytes([wire.PROTOCOL_VERSION, wire.MessageType.DATA]) + bytes(30), GATEWAY)
            stranger.send_nowait(b"\x09", GATEWAY)
            world.tun.inject(bytes([0x60]) + bytes(39))  # IPv6, to :: (nobody holds it)
            world.tun.inject(bytes([0x60]) + bytes(20))  # IPv6, too short for its header
            world.tun.inject(bytes([0x00]) + bytes(39))  # neither IPv4 nor IPv6
            world.tun.inject(ipaddress.IPv4Address("10.66.0.2").packed)  # far too short
            world.tun.inject(bytes([0x45]) + bytes(15) + ip(2).packed)  # IPv4, but nobody holds .2
            await trio.sleep(0.1)
            stats = world.gateway.statistics()
            assert (stats.drop_unknown_index, stats.drop_malformed) == (2, 1)
            assert (stats.tx_not_ipv4, stats.tx_no_binding) == (3, 2)
            nursery.cancel_scope.cancel()


async def test_a_stopping_gateway_closes_every_live_session_to_its_binding(autojump_clock: trio.abc.Clock) -> None:
    """A gateway that stops says so, authenticated, to each client: no one waits out a TTL."""
    world = World()
    alice, bob = Peer(world, 1), Peer(world, 2)
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            serving = trio.CancelScope()

            async def serve() -> None:
                with serving:
                    async with trio.open_nursery() as nursery:
                        await world.start(nursery)
                        await trio.sleep_forever()

            outer.start_soon(serve)
            await trio.sleep(0.1)
            for peer in (alice, bob):
                assert await peer.handshake() is not None
                probe = wire.Probe(path_id=PathId(1), seq=1, sent_us=5)
                peer.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(probe))  # confirms: ATTACHED
                await peer.port.recv_batch(1)  # its PROBE_ACK
            assert all(s.core.record.binding is not None for s in world.gateway.sessions.values())
            serving.cancel()
            for peer in (alice, bob):
                ((datagram, source),) = await peer.port.recv_batch(1)
                opened = peer.channel.open_untrusted(datagram, now=trio.current_time())
                close = wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext)
                assert isinstance(close, wire.Close) and close.reason is ReasonCode.LOCAL_CLOSE
                assert source == GATEWAY_CONTROL
            assert all(s.core.record.state is SessionState.TERMINATED for s in world.gateway.sessions.values())


async def test_close_all_closes_every_live_session_while_the_gateway_still_serves(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``serve``'s first SIGTERM: each client gets an authenticated CLOSE before anything is torn down."""
    world = World()
    alice, bob = Peer(world, 1), Peer(world, 2)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            for peer in (alice, bob):
                assert await peer.handshake() is not None
                probe = wire.Probe(path_id=PathId(1), seq=1, sent_us=5)
                peer.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(probe))  # confirms: ATTACHED
                await peer.port.recv_batch(1)  # its PROBE_ACK
            assert world.gateway.close_all_nowait() == 2
            for peer in (alice, bob):
                ((datagram, source),) = await peer.port.recv_batch(1)
                opened = peer.channel.open_untrusted(datagram, now=trio.current_time())
                close = wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext)
                assert isinstance(close, wire.Close) and close.reason is ReasonCode.LOCAL_CLOSE
                assert source == GATEWAY_CONTROL
            status = await world.gateway.status.wait_value(lambda v: v is not None and not v.sessions)
            assert status is not None and status.statistics.terminated_local_close == 2
            assert world.gateway.close_all_nowait() == 0  # nothing left to close
            nursery.cancel_scope.cancel()


# -- what status shows per peer ------------------------------------------------------------


async def test_the_published_status_carries_each_peers_name_addresses_bytes_and_handshake(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = World(tunnel6="fd6a:7670::1/64")
    alice, bob = Peer(world, 1), Peer(world, 2)
    to_alice = [bytes([0x45]) + bytes(15) + ip(2).packed + bytes(n) for n in (0, 20)]  # 20 and 40 bytes
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            await trio.sleep(1.0)
            handshake_at = trio.current_time()
            assert await alice.handshake() is not None  # the network has no delay: answered right now
            assert await bob.handshake() is not None
            await trio.sleep(0.5)
            probe = wire.Probe(path_id=PathId(1), seq=1, sent_us=5)
            alice.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(probe))  # confirms her keys: ATTACHED
            await alice.port.recv_batch(1)
            for size in (100, 200, 300):
                alice.send(wire.MessageType.DATA, bytes(size))
            for packet in to_alice:
                world.tun.inject(packet)
            assert len(await alice.port.recv_batch(2)) == 2
            await trio.sleep(1.0)
            alice.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(attrs.evolve(probe, seq=2)))
            await alice.port.recv_batch(1)
            await trio.sleep(0.01)  # the supervisor takes her probe's report and publishes

            status = world.gateway.status.value
            assert status is not None
            peers = {p.name: p for p in status.peers}
            a, b = peers["peer1"], peers["peer2"]
            assert (a.public_key, a.address, a.address6) == (
                world.statics[1].public,
                ip(2),
                ipaddress.IPv6Address("fd6a:7670::2"),
            )
            record = a.snapshot.record
            assert (record.state, record.version) == (SessionState.ATTACHED, 1)
            assert record.binding is not None and record.binding.endpoint == alice.port.addr
            assert (a.rx_packets, a.rx_bytes, a.tx_packets, a.tx_bytes) == (3, 600, 2, 60)
            assert a.last_handshake == handshake_at  # on the gateway's clock, once the client confirmed
            assert a.snapshot.now == trio.current_time() - 0.01
            # Bob never sent a packet with his keys: no completed handshake, nothing carried, unbound.
            assert (b.last_handshake, b.rx_bytes, b.tx_bytes, b.snapshot.record.binding) == (None, 0, 0, None)
            # The old shape of ``sessions`` is kept, in the same order.
            assert status.sessions == tuple((p.snapshot, p.name, str(p.address)) for p in status.peers)
            totals = world.gateway.statistics()
            assert (totals.rx_bytes, totals.tx_bytes) == (600, 60)

            report = gateway_status(status.peers, node_id="gw-test")
            entry = next(s for s in report["sessions"] if s["peer"] == "peer1")
            assert entry["session"] == record.session_id.hex
            assert (entry["tunnel_ipv4"], entry["tunnel_ipv6"], entry["endpoint"]) == (
                "10.66.0.2",
                "fd6a:7670::2",
                "198.51.100.1:40001",
            )
            assert (entry["rx_bytes"], entry["tx_bytes"], entry["last_handshake_ago_s"]) == (600, 60, 1.5)
            assert "peer: peer1" in render_status_text(report).splitlines()
            nursery.cancel_scope.cancel()
