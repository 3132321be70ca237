"""Path validation through the real Trio runtimes over the in-memory network (autojump clock).

The held-back REATTACH of issue 15: the attacker takes the client's REATTACH off the wire
and sends it from his own socket.  The gateway answers his address with one PATH_CHALLENGE
he cannot read, keeps the binding, and logs PATH_NOT_VALIDATED; the client's retry then
switches for real.  And the price: with a one-way delay on every datagram, the time from
the client's REATTACH to its switch is two round trips (REATTACH, challenge, echo, ACK).
"""

from __future__ import annotations

import trio

from jvpn_trio.core import wire
from jvpn_trio.core.actions import EventKind
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.states import ReasonCode
from tests.drivers.test_runtime_memory import GATEWAY_CONTROL, World, client_addr, start

ATTACKER = ("203.0.113.66", 6666)


def _type(data: bytes) -> int:
    return data[1] if len(data) > 1 else -1


async def test_a_held_back_reattach_from_the_attackers_socket_gets_one_challenge_and_no_binding(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = World()
    original = world.net.deliver
    held: list[bytes] = []
    to_attacker: list[bytes] = []
    armed = False

    def on_path(data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        if armed and not held and dst == GATEWAY_CONTROL and _type(data) == wire.MessageType.REATTACH:
            held.append(data)  # suppressed: it never reaches the gateway from the client
            return
        if dst == ATTACKER:
            to_attacker.append(data)
        original(data, src, dst)

    world.net.deliver = on_path  # type: ignore[method-assign]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            attacker = world.net.port(ATTACKER)
            await trio.sleep(1.0)
            served = world.gateway_session()  # type: ignore[no-untyped-call]
            armed = True
            world.net.blocked.add(client_addr(1))
            while not held:
                await trio.sleep(0.001)
            attacker.send_nowait(held[0], GATEWAY_CONTROL)  # at once: well inside the freshness window
            await trio.sleep(0.01)
            binding = served.core.record.binding
            assert binding is not None and binding.endpoint == client_addr(1)  # the old binding stays
            assert [_type(d) for d in to_attacker] == [wire.MessageType.PATH_CHALLENGE]
            await trio.sleep(2.0)
            # The client's retry is validated at its own address and wins; the attacker got nothing more.
            binding = served.core.record.binding
            assert binding is not None and binding.endpoint == client_addr(2)
            assert world.client.active_path is not None and world.client.active_path.path == PathId(2)
            assert [_type(d) for d in to_attacker] == [wire.MessageType.PATH_CHALLENGE]
            refused = [
                e
                for e in world.gateway_events
                if e.kind is EventKind.SECURITY_EVENT and e.reason is ReasonCode.PATH_NOT_VALIDATED
            ]
            assert [e.detail("endpoint") for e in refused] == ["203.0.113.66:6666"]
            switches = [e for e in world.gateway_events if e.kind is EventKind.TRANSPORT_SWITCH]
            assert [e.detail("binding") for e in switches] == [f"p2@{client_addr(2)[0]}:{client_addr(2)[1]}"]
            nursery.cancel_scope.cancel()


async def test_failover_with_a_round_trip_delay_takes_two_round_trips_from_reattach_to_switch(
    autojump_clock: trio.abc.Clock,
) -> None:
    one_way = 0.020
    world = World()
    original = world.net.deliver
    sent_reattach: list[float] = []

    async def later(data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        await trio.sleep(one_way)
        original(data, src, dst)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            def delayed(data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
                if dst == GATEWAY_CONTROL and _type(data) == wire.MessageType.REATTACH:
                    sent_reattach.append(trio.current_time())
                nursery.start_soon(later, data, src, dst)

            world.net.deliver = delayed  # type: ignore[method-assign]
            await start(nursery, world)
            await trio.sleep(1.0)
            world.net.blocked.add(client_addr(1))
            await trio.sleep(2.0)
            switches = [e for e in world.client_events if e.kind is EventKind.TRANSPORT_SWITCH]
            assert len(switches) == 1 and sent_reattach
            took = switches[0].t - sent_reattach[0]
            print(
                f"REATTACH sent -> client switched: {took * 1000:.1f} ms at RTT {2 * one_way * 1000:.0f} ms "
                f"(one RTT before path validation; the challenge adds one)"
            )
            assert abs(took - 4 * one_way) < 0.002
            nursery.cancel_scope.cancel()
