"""The gateway's DATA fast path (issue 16): the same decisions as the general path, without a coroutine.

Scripted peers and virtual time, as in ``test_gateway_runtime``.
"""

from __future__ import annotations

import trio

from jvpn_trio.core import wire
from jvpn_trio.core.channel import SecureChannel
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.noise import HandshakeResult, InitiatorHandshake
from tests.drivers.test_gateway_runtime import GATEWAY, GATEWAY_CONTROL, Peer, World, ip

#: An IPv4 header to the gateway's own tunnel address and 20 bytes of payload.
PACKET = bytes([0x45]) + bytes(15) + ip(1).packed + bytes(20)


async def confirmed(world: World, peer: Peer) -> HandshakeResult:
    """Handshake and one probe, so the session is ATTACHED on the peer's endpoint."""
    result = await peer.handshake()
    assert result is not None
    probe = wire.Probe(path_id=PathId(1), seq=1, sent_us=5)
    peer.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(probe))
    await peer.port.recv_batch(1)
    return result


async def rekey(world: World, peer: Peer, session_id: SessionId) -> None:
    """A rekey handshake for ``session_id``; the peer then sends with the new keys (as an initiator does)."""
    peer.wall_time_ns += 1_000_000_000
    state, init = InitiatorHandshake.create(
        peer.static, world.gw_static.public, sender_index=world.rng.getrandbits(32),
        random_bytes=world.random_bytes, wall_time_ns=peer.wall_time_ns, path_id=PathId(1),
        rekey_session=session_id,
    )  # fmt: skip
    peer.port.send_nowait(wire.encode_handshake_init(init), GATEWAY_CONTROL)
    while True:
        for data, _ in await peer.port.recv_batch(16):
            if wire.peek_type_untrusted(data) is wire.MessageType.HANDSHAKE_RESP:
                result = state.consume_response(wire.decode_handshake_resp_untrusted(data))
                peer.channel = SecureChannel(world.policy)
                peer.channel.install_current(result.keypair(created_at=trio.current_time()))
                return


def written(world: World) -> list[bytes]:
    """What the gateway wrote to its TUN so far."""
    out = []
    while True:
        try:
            out.append(world.tun.delivered.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_data_is_delivered_once_and_replays_forgeries_and_strays_are_counted(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = World()
    alice = Peer(world, 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            await confirmed(world, alice)
            datagrams = alice.channel.seal_data_batch([PACKET, PACKET + b"x"])
            for datagram in datagrams:
                alice.port.send_nowait(datagram, GATEWAY)
            alice.port.send_nowait(datagrams[0], GATEWAY)  # a replay
            third = alice.channel.seal_data_batch([PACKET])[0]
            forged = bytearray(third)
            forged[-1] ^= 1  # a bad tag: must not mark its counter seen, so the genuine one still opens
            alice.port.send_nowait(bytes(forged), GATEWAY)
            alice.port.send_nowait(third, GATEWAY)
            stranger = world.net.port(("203.0.113.7", 7))  # alice's keys, another endpoint: not bound
            stranger.send_nowait(alice.channel.seal_data_batch([PACKET])[0], GATEWAY)
            await trio.sleep(0.1)
            stats = world.gateway.statistics()
            assert (stats.rx_packets, stats.rx_bytes) == (3, 3 * len(PACKET) + 1)
            assert (stats.drop_replayed_counter, stats.drop_decrypt_failed, stats.stray_data) == (1, 1, 1)
            assert written(world) == [PACKET, PACKET + b"x", PACKET]
            nursery.cancel_scope.cancel()


async def test_a_rekeyed_session_is_found_by_its_new_index(autojump_clock: trio.abc.Clock) -> None:
    """The fast path finds sessions by receiver index: the rekey's new index must lead to the same session."""
    world = World()
    alice = Peer(world, 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            first = await confirmed(world, alice)
            old_index = first.remote_index
            await rekey(world, alice, first.session_id)
            assert world.gateway.statistics().rekeys == 1
            new = alice.channel.keyring.current
            assert new is not None and new.remote_index != old_index
            alice.port.send_nowait(alice.channel.seal_data_batch([PACKET])[0], GATEWAY)
            await trio.sleep(0.1)
            stats = world.gateway.statistics()
            assert (stats.rx_packets, stats.drop_unknown_index) == (1, 0)
            assert written(world) == [PACKET]
            nursery.cancel_scope.cancel()


async def _mixed_traffic(*, burst: bool) -> tuple[object, list[bytes]]:
    """Two sessions' DATA interleaved with what an attacker adds, read in one batch or one datagram per read.

    Returns the gateway's statistics and what it wrote to the TUN.
    """
    world = World()
    alice, bob = Peer(world, 1), Peer(world, 2)
    stranger = world.net.port(("203.0.113.7", 7))  # holds alice's datagrams, sends from elsewhere
    async with trio.open_nursery() as nursery:
        await world.start(nursery)
        await confirmed(world, alice)
        await confirmed(world, bob)
        a = alice.channel.seal_data_batch([PACKET, PACKET + b"a1", PACKET + b"a2", PACKET + b"a3"])
        b = bob.channel.seal_data_batch([PACKET + b"b0", PACKET + b"b1"])
        forged = a[3][:-1] + bytes([a[3][-1] ^ 1])
        unknown = a[2][:4] + (0xDEADBEEF).to_bytes(4, "big") + a[2][8:]
        short = bytes([wire.PROTOCOL_VERSION, wire.MessageType.DATA.value, 0, 0, 1])
        probe = alice.channel.seal(wire.MessageType.PROBE, wire.encode_probe_plaintext(
            wire.Probe(path_id=PathId(1), seq=2, sent_us=9)))
        sends = [
            (alice.port, a[0]), (alice.port, a[1]), (bob.port, b[0]), (alice.port, forged), (alice.port, a[1]),
            (alice.port, unknown), (alice.port, short), (stranger, a[2]), (alice.port, a[2]), (alice.port, probe),
            (alice.port, a[3]), (bob.port, b[1]), (bob.port, b[0]),
        ]
        for port, datagram in sends:
            port.send_nowait(datagram, GATEWAY)
            if not burst:
                await trio.sleep(0.01)  # the gateway reads each datagram on its own
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    return world.gateway.statistics(), written(world)


async def test_runs_in_one_read_decide_as_one_datagram_per_read(autojump_clock: trio.abc.Clock) -> None:
    """Runs of DATA are opened together (``_feed_datagrams``): a run's boundaries must change no outcome.

    Other sessions' DATA, replays, a forgery, an unknown index, a short frame, a PROBE and the
    session's own DATA from a stranger's endpoint, all in one read, count and deliver exactly
    as when each datagram is read alone.
    """
    with trio.fail_after(60):
        together, written_together = await _mixed_traffic(burst=True)
        alone, written_alone = await _mixed_traffic(burst=False)
    assert together == alone
    assert written_together == written_alone
    # a2 reached the gateway first from the stranger: authenticated, not delivered, its counter spent
    assert written_together == [PACKET, PACKET + b"a1", PACKET + b"b0", PACKET + b"a3", PACKET + b"b1"]
    counts = {name: getattr(together, name) for name in (
        "rx_packets", "stray_data", "drop_replayed_counter", "drop_decrypt_failed", "drop_unknown_index")}
    # replays: a1 and b0 sent twice, a2 after the stranger's copy; unknown index: the forged index and the short frame
    assert counts == {"rx_packets": 5, "stray_data": 1, "drop_replayed_counter": 3, "drop_decrypt_failed": 1,
                      "drop_unknown_index": 2}
