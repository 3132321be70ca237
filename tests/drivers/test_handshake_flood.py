"""Handshakes cannot starve sessions (issue 15): the gateway under an initiation flood, in memory.

Virtual time (autojump_clock), the in-memory network and the scripted peers of
test_gateway_runtime.  The flood's inits carry a valid mac1 (the attacker knows
the gateway's public key, as every client does) from an unknown static key.
Virtual time shows the logic (nothing waits behind a handshake, nothing is
queued without bound, a new client gets in via a cookie), not CPU cost: that
is measured in namespaces (docs/threat-model.md, "Handshake floods").
"""

from __future__ import annotations

import random

import attrs
import trio

from jvpn_trio.core import wire
from jvpn_trio.core.cookie import HandshakeLimits, open_cookie_reply
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.noise import InitiatorHandshake, add_mac2, generate_static
from jvpn_trio.drivers.client import ClientPath, ClientRuntime
from jvpn_trio.drivers.gateway import GatewayRuntime
from tests.drivers.test_gateway_runtime import GATEWAY, GATEWAY_CONTROL, Peer, World

#: 20k inits per second, sent in ticks of this many every TICK_S (virtual).
TICK_S = 0.01
PER_TICK = 200
#: Probes of the live session: one per tick (100 Hz).
FLOOD_S = 1.0


def junk_inits(world: World, n: int) -> list[bytes]:
    """Inits with a valid mac1 from a static key the gateway does not know."""
    rng = random.Random(99)
    junk = generate_static(lambda k: bytes(rng.getrandbits(8) for _ in range(k)))
    out = []
    for i in range(n):
        _, init = InitiatorHandshake.create(
            junk, world.gw_static.public, sender_index=i, random_bytes=world.random_bytes, wall_time_ns=i, path_id=PathId(1)
        )
        out.append(wire.encode_handshake_init(init))
    return out


async def flood(world: World, inits: list[bytes], *, random_sources: bool, seconds: float) -> None:
    rng = random.Random(7)
    end = trio.current_time() + seconds
    i = 0
    while trio.current_time() < end:
        for _ in range(PER_TICK):
            if random_sources:
                src = (f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.randrange(1024, 65536))
            else:
                src = ("203.0.113.66", 6666)
            world.net.deliver(inits[i % len(inits)], src, GATEWAY_CONTROL)
            i += 1
        await trio.sleep(TICK_S)


async def attached(world: World, peer: Peer) -> None:
    assert await peer.handshake() is not None
    await probe_once(peer, seq=1)


async def probe_once(peer: Peer, *, seq: int) -> wire.ProbeAck:
    peer.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(wire.Probe(path_id=PathId(1), seq=seq, sent_us=seq)))
    while True:
        for data, _ in await peer.port.recv_batch(16):
            opened = peer.channel.open_untrusted(data, now=trio.current_time())
            ack = wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext)
            if isinstance(ack, wire.ProbeAck) and ack.seq == seq:
                return ack


async def probe_through(peer: Peer, seconds: float) -> list[float]:
    """Probe at 100 Hz; return each probe's answer time (virtual seconds); every probe must be answered."""
    delays = []
    for seq in range(2, 2 + round(seconds / TICK_S)):
        sent = trio.current_time()
        with trio.fail_after(TICK_S):
            await probe_once(peer, seq=seq)
        delays.append(trio.current_time() - sent)
        await trio.sleep(TICK_S)
    return delays


async def run_flood(autojump: trio.abc.Clock, *, random_sources: bool) -> tuple[World, list[float], bool]:
    world = World()
    alice, bob = Peer(world, 1), Peer(world, 2)
    inits = junk_inits(world, 64)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            await attached(world, alice)
            nursery.start_soon(lambda: flood(world, inits, random_sources=random_sources, seconds=FLOOD_S))
            await trio.sleep(0.2)  # well under load by now
            async with trio.open_nursery() as inner:
                results: dict[str, object] = {}

                async def newcomer() -> None:
                    results["bob"] = await bob.handshake()

                inner.start_soon(newcomer)
                delays = await probe_through(alice, FLOOD_S - 0.3)
            nursery.cancel_scope.cancel()
    return world, delays, results["bob"] is not None


async def test_a_flood_from_random_sources_starves_neither_the_live_session_nor_a_new_client(
    autojump_clock: trio.abc.Clock,
) -> None:
    world, delays, bob_in = await run_flood(autojump_clock, random_sources=True)
    stats = world.gateway.statistics()
    limits = HandshakeLimits()
    assert max(delays) < TICK_S  # every probe answered within its tick
    assert bob_in and stats.sessions_created == 2
    # Spoofed sources get a cookie and nothing more, within the cookie budget; the rest only cost a bucket.
    assert stats.handshake_cookie_reply + stats.handshake_cookie_limited > 15_000
    assert stats.handshake_cookie_reply <= limits.cookie_replies_per_s * (FLOOD_S + 1)
    # DH work: what got in before the load was measured, and bob.
    assert stats.handshake_unknown_peer <= limits.under_load_per_s + limits.queue_capacity
    assert stats.inbox_full == 0


async def test_a_flood_from_one_source_is_held_by_its_bucket(autojump_clock: trio.abc.Clock) -> None:
    world, delays, bob_in = await run_flood(autojump_clock, random_sources=False)
    stats = world.gateway.statistics()
    limits = HandshakeLimits()
    assert max(delays) < TICK_S
    assert bob_in
    assert stats.handshake_source_limited > 15_000
    # The source's burst, then its rate: everything else was dropped at a bucket's cost.
    let_through = stats.handshake_unknown_peer + stats.handshake_cookie_reply + stats.handshake_cookie_limited
    assert let_through <= limits.per_source_burst + limits.per_source_per_s * (FLOOD_S + 0.1)


async def test_a_cookie_from_another_address_and_a_forged_mac2_get_nothing_but_a_cookie(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = World()
    world.gateway = GatewayRuntime(  # always under load: any second init in a second
        policy=world.policy, static=world.gw_static, peers=list(world.gateway._peers.values()),
        tunnel=world.gateway.tunnel, store=world.gateway._store, node_id="gw-test", emit=lambda _e: None,
        random_bytes=world.random_bytes, handshake_limits=HandshakeLimits(under_load_per_s=1, load_hold_s=60),
    )  # fmt: skip
    attacker = world.net.port(("203.0.113.5", 5555))
    elsewhere = ("203.0.113.6", 6666)
    _, init = InitiatorHandshake.create(
        world.statics[3], world.gw_static.public, sender_index=1, random_bytes=world.random_bytes,
        wall_time_ns=10**18, path_id=PathId(1),
    )  # fmt: skip
    raw = wire.encode_handshake_init(init)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            for _ in range(2):  # the second finds the gateway under load
                attacker.send_nowait(raw, GATEWAY_CONTROL)
            await trio.sleep(0.1)
            batch = await attacker.recv_batch(16)
            replies = [d for d, _ in batch if wire.peek_type_untrusted(d) is wire.MessageType.COOKIE_REPLY]
            assert len(replies) >= 1 and world.gateway.statistics().sessions_created == 1  # the first got in
            cookie = open_cookie_reply(
                wire.decode_cookie_reply_untrusted(replies[0]), gateway_public=world.gw_static.public, init_mac1=init.mac1
            )
            assert cookie is not None
            before = world.gateway.statistics()
            # Another timestamp, mac2 with attacker's cookie, sent from elsewhere: only a cookie reply.
            world.net.deliver(wire.encode_handshake_init(add_mac2(init, cookie)), elsewhere, GATEWAY_CONTROL)
            forged = attrs.evolve(init, mac2=bytes(16))
            attacker.send_nowait(wire.encode_handshake_init(forged), GATEWAY_CONTROL)
            await trio.sleep(0.1)
            after = world.gateway.statistics()
            assert after.handshake_cookie_reply == before.handshake_cookie_reply + 2
            assert (after.sessions_created, after.handshake_handshake_replay) == (
                before.sessions_created,
                before.handshake_handshake_replay,
            )  # no DH work for either
            nursery.cancel_scope.cancel()


async def test_a_client_retries_with_mac2_once_and_a_replayed_cookie_reply_does_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = World()
    world.gateway = GatewayRuntime(
        policy=world.policy, static=world.gw_static, peers=list(world.gateway._peers.values()),
        tunnel=world.gateway.tunnel, store=world.gateway._store, node_id="gw-test", emit=lambda _e: None,
        random_bytes=world.random_bytes, handshake_limits=HandshakeLimits(under_load_per_s=1, load_hold_s=60),
    )  # fmt: skip
    port = world.net.port(("198.51.100.30", 43000))
    path = ClientPath(path=PathId(1), name="eth0", kind="ethernet", priority=1, port=port, gateway=GATEWAY, control=GATEWAY_CONTROL)
    client = ClientRuntime(
        policy=world.policy, static=world.statics[4], gateway_public=world.gw_static.public, paths=[path],
        emit=lambda _e: None, random_bytes=world.random_bytes, wall_time_ns=lambda: 2 * 10**18,
    )  # fmt: skip
    seen: list[bytes] = []
    original = client._on_cookie_reply

    def spy(data: bytes) -> None:
        seen.append(data)
        original(data)

    client._on_cookie_reply = spy  # type: ignore[method-assign]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            world.net.deliver(junk_inits(world, 1)[0], ("203.0.113.9", 1), GATEWAY_CONTROL)  # load
            await trio.sleep(0.01)
            done = await client.handshake()
            assert done.result.tunnel_ipv4 is not None
            tally = client._tally
            assert (len(seen), tally.cookie_replies) == (1, 1)
            sent, stray = port.sent, tally.handshake_stray
            client._on_handshake_response(seen[0], trio.current_time())  # replayed: its init is answered
            assert (port.sent, tally.handshake_stray, tally.cookie_replies) == (sent, stray + 1, 1)
            nursery.cancel_scope.cancel()
