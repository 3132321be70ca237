"""The gateway's work per input does not grow with the number of sessions.

Counted, not timed: how many ``snapshot()`` and ``next_deadline()`` calls
one input costs with 1 and with 200 sessions in the in-memory world
(virtual time, scripted peers from test_gateway_runtime).  Also: the
aggregate status still follows sessions starting and ending, timers still
fire through the deadline heap, and the heap stays bounded.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import pytest
import trio

from jvpn_trio.core import wire
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.noise import StaticKeypair, generate_static
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import GatewaySession
from jvpn_trio.core.states import SessionState
from jvpn_trio.drivers import gateway as gw
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.memory import MemoryNetwork, MemoryPacketPort
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from tests.drivers.test_gateway_runtime import GATEWAY, GATEWAY_CONTROL, Peer

#: The two table sizes compared: the cost of one input must be the same for both.
FEW, MANY = 1, 200
#: Float rounding of virtual-clock sums (a publication due exactly ``gap`` later).
CLOCK_SLACK_S = 1e-9


class World:
    """``n`` peers of one gateway on an in-memory network (what ``Peer`` needs, any size)."""

    def __init__(self, n: int, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.rng = random.Random(13)
        self.gw_static = generate_static(self.random_bytes)
        self.statics: dict[int, StaticKeypair] = {k: generate_static(self.random_bytes) for k in range(1, n + 1)}
        self.net = MemoryNetwork()
        self.tun = MemoryPacketPort()
        self.gateway = GatewayRuntime(
            policy=self.policy,
            static=self.gw_static,
            peers=[GatewayPeer(name=f"peer{k}", public=s.public) for k, s in self.statics.items()],
            tunnel=ipaddress.IPv4Interface("10.64.0.1/16"),
            store=MemoryOwnershipStore(),
            node_id="gw-scale",
            emit=lambda _event: None,
            random_bytes=self.random_bytes,
        )
        self.peers = [Peer(self, k) for k in self.statics]  # type: ignore[arg-type]  # Peer reads only the above

    def random_bytes(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))

    async def start(self, nursery: trio.Nursery) -> None:
        ports, control = [self.net.port(GATEWAY)], [self.net.port(GATEWAY_CONTROL)]
        await nursery.start(
            lambda task_status: self.gateway.serve(ports, control_ports=control, packets=self.tun, task_status=task_status)
        )

    async def attach_all(self) -> None:
        """Every peer handshakes and confirms with a probe: ATTACHED, bound, with deadlines."""
        for peer in self.peers:
            assert await peer.handshake() is not None
            await probe(peer, seq=1)


async def probe(peer: Peer, *, seq: int) -> None:
    peer.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(wire.Probe(path_id=PathId(1), seq=seq, sent_us=seq)))
    await peer.port.recv_batch(1)  # its PROBE_ACK


@contextmanager
def counting(monkeypatch: pytest.MonkeyPatch, *names: str) -> Iterator[Counter[str]]:
    """Count calls of ``GatewaySession`` methods ``names`` (all sessions) while the block runs."""
    calls: Counter[str] = Counter()

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: GatewaySession, *args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return method(self, *args, **kwargs)

        return counted

    with monkeypatch.context() as patch:
        for name in names:
            patch.setattr(GatewaySession, name, wrap(name, getattr(GatewaySession, name)))
        yield calls


async def cost_of_one_probe(n: int, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The snapshot / next_deadline calls one supervisor input (a live probe's report) and its publication cost."""
    world = World(n)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            await world.attach_all()
            await trio.sleep(2 * gw.STATUS_INTERVAL_S)  # everything published: nothing left dirty
            assert world.gateway.status.value is not None and len(world.gateway.status.value.peers) == n
            before = world.gateway.status.value
            with counting(monkeypatch, "snapshot", "next_deadline", "handle") as calls:
                await probe(world.peers[0], seq=2)  # a report is due: one PacketAuthenticated step
                await trio.sleep(2 * gw.STATUS_INTERVAL_S)
            assert world.gateway.status.value is not before  # the step was published
            nursery.cancel_scope.cancel()
    return calls


async def test_one_input_costs_as_many_snapshots_and_deadline_reads_with_200_sessions_as_with_one(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    few = await cost_of_one_probe(FEW, monkeypatch)
    many = await cost_of_one_probe(MANY, monkeypatch)
    assert few["handle"] == many["handle"] == 1
    assert few == many
    assert many["snapshot"] == 1  # only the touched session is taken again
    assert many["next_deadline"] <= 2


async def test_the_status_follows_sessions_starting_and_ending_and_is_fresh_on_request(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = World(3)
    runtime = world.gateway
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            status = runtime.status.value
            assert status is not None and status.sessions == ()  # published as it starts
            started = trio.current_time()
            await world.attach_all()
            await runtime.status.wait_value(lambda v: v is not None and len(v.sessions) == 3)
            assert trio.current_time() - started <= gw.STATUS_MEMBERSHIP_GAP_S + CLOCK_SLACK_S
            await trio.sleep(10.0)
            # Untouched since: the published snapshots are of then; a status request takes them now.
            status = runtime.status.value
            assert status is not None and max(p.snapshot.now for p in status.peers) < trio.current_time() - 9
            fresh = runtime.peer_statuses()
            assert [p.snapshot.now for p in fresh] == [trio.current_time()] * 3
            assert [p.snapshot.record.session_id for p in fresh] == [p.snapshot.record.session_id for p in status.peers]
            # A session replaced by its peer's new handshake ends, and the status says so soon.
            replaced = world.peers[0]
            old = status.peers[0].snapshot.record.session_id
            assert await replaced.handshake() is not None
            ended = trio.current_time()
            status = await runtime.status.wait_value(
                lambda v: v is not None and old not in {p.snapshot.record.session_id for p in v.peers}
            )
            assert trio.current_time() - ended <= gw.STATUS_MEMBERSHIP_GAP_S + CLOCK_SLACK_S
            assert len(status.peers) == 3 and status.statistics.terminated_session_replaced == 1
            assert len(runtime.sessions) == 3  # the replaced session was reaped, not only unlisted
            # serve's stop path: close everything, wait for a status without sessions (published at once).
            await trio.sleep(2 * gw.STATUS_INTERVAL_S)  # the publisher is idle
            assert runtime.close_all_nowait() == 3
            closing = trio.current_time()
            await runtime.status.wait_value(lambda v: v is not None and not v.sessions)
            assert trio.current_time() - closing <= gw.STATUS_MEMBERSHIP_GAP_S + CLOCK_SLACK_S
            nursery.cancel_scope.cancel()


async def test_timers_fire_through_the_heap_for_the_silent_sessions_only(autojump_clock: trio.abc.Clock) -> None:
    policy = attrs.evolve(Policy(), transport_loss_ttl_ms=5_000)
    world = World(4, policy)
    runtime = world.gateway
    ttl = policy.transport_loss_ttl_ms / 1000.0
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            await world.attach_all()
            talker = world.peers[0]
            for seq in range(2, 2 + int(2 * ttl)):  # one probe a second: its session stays
                await trio.sleep(1.0)
                await probe(talker, seq=seq)
            await trio.sleep(gw.STATUS_MEMBERSHIP_GAP_S)
            (served,) = runtime.sessions.values()
            assert served.peer.name == "peer1" and served.core.record.state is SessionState.ATTACHED
            assert runtime.statistics().terminated_transport_loss_ttl_expired == 3
            status = runtime.status.value
            assert status is not None and [p.name for p in status.peers] == ["peer1"]
            # Stale heap entries are dropped: the heap holds about one entry per live session.
            assert len(runtime._deadlines) <= 2 * len(runtime._scheduled) + gw.DEADLINE_HEAP_SLACK
            nursery.cancel_scope.cancel()
