"""The policy's documented minimums (docs/policy.md, "Minimums") against a path with a real round trip.

A client and a gateway over the in-memory network, every datagram held for a fixed one-way
delay.  At the documented least handshake retry, and with every field at its least value, a
handshake completes over a path whose round trip is under that retry.  The case the minimum
exists for is shown too, on a policy forced past validation: a retry shorter than the round
trip never completes, and the client sends an initiation per retry (in the field, the gateway
answered each: an X25519 computation and a session's keys apiece).

Determinism: Trio's mock clock (autojump), seeded keys, no sockets; every time is virtual.
"""

from __future__ import annotations

import collections

import trio

from jvpn_trio.core import wire
from jvpn_trio.core.policy import MIN_HANDSHAKE_RETRY_MS, Policy
from jvpn_trio.drivers.memory import MemoryNetwork
from tests.core.test_policy import ALL_LOW
from tests.drivers.test_runtime_memory import World, start

#: Just under half the least retry each way: a round trip the minimum must cover.
ONE_WAY_S = 0.045


def hold_every_datagram(
    net: MemoryNetwork, nursery: trio.Nursery, one_way_s: float
) -> collections.Counter[wire.MessageType]:
    """Every datagram arrives ``one_way_s`` after it was sent; returns the count of what was sent, by type."""
    original = net.deliver
    sent: collections.Counter[wire.MessageType] = collections.Counter()

    def deliver(data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        sent[wire.peek_type_untrusted(data)] += 1

        async def later() -> None:
            await trio.sleep(one_way_s)
            original(data, src, dst)

        nursery.start_soon(later)

    net.deliver = deliver  # type: ignore[method-assign]
    return sent


async def handshake_completes(policy: Policy, *, within_s: float) -> tuple[bool, int]:
    """Whether the client's first session comes up within ``within_s``, and how many initiations it sent."""
    world = World(policy)
    done = False
    async with trio.open_nursery() as nursery:
        sent = hold_every_datagram(world.net, nursery, ONE_WAY_S)
        with trio.move_on_after(within_s):
            await start(nursery, world)
            done = world.client.session is not None
        nursery.cancel_scope.cancel()
    return done, sent[wire.MessageType.HANDSHAKE_INIT]


async def test_the_least_retry_completes_a_handshake_over_a_real_round_trip(autojump_clock: trio.abc.Clock) -> None:
    assert 2 * ONE_WAY_S * 1000 < MIN_HANDSHAKE_RETRY_MS
    policy = Policy(handshake_retry_ms=MIN_HANDSHAKE_RETRY_MS, probe_timeout_ms=100, latency_threshold_ms=90.0)
    done, initiations = await handshake_completes(policy, within_s=5.0)
    assert done
    assert initiations == 1


async def test_every_field_at_its_least_value_still_completes_a_handshake(autojump_clock: trio.abc.Clock) -> None:
    done, initiations = await handshake_completes(Policy(**ALL_LOW), within_s=5.0)
    assert done
    assert initiations == 1


async def test_a_retry_under_the_round_trip_never_completes_and_sprays_initiations(autojump_clock: trio.abc.Clock) -> None:
    # What the minimum refuses, forced past validation: a retry of 50 ms on a 90 ms round trip.
    policy = Policy(handshake_retry_ms=MIN_HANDSHAKE_RETRY_MS, probe_timeout_ms=100, latency_threshold_ms=90.0)
    object.__setattr__(policy, "handshake_retry_ms", 50)
    done, initiations = await handshake_completes(policy, within_s=2.0)
    assert not done
    assert initiations == 2.0 / 0.050  # one per 50 ms, each answer too late for the one it answers
