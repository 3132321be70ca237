"""Client and gateway runtimes end to end over an in-memory network, on Trio's mock clock.

Determinism rules: virtual time only (autojump_clock), no sockets, seeded
randomness; every wait is bounded by fail_after in virtual seconds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import struct
from collections.abc import Callable
from typing import TypeVar

import attrs
import pytest
import trio

from jvpn_trio.core import events as ev
from jvpn_trio.core import offload, wire
from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.keyring import Keypair
from jvpn_trio.core.noise import generate_static
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.drivers.client import (
    ClientPath,
    ClientRuntime,
    ClientStatistics,
    HandshakeFailed,
    _Tally,
)
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime, PeerChanges
from jvpn_trio.drivers.memory import MemoryDatagramPort, MemoryNetwork, MemoryPacketPort
from jvpn_trio.drivers.ports import Address, DatagramPort
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from tests.core import test_offload as offload_tests

GATEWAY = ("192.0.2.1", 51820)
GATEWAY_CONTROL = ("192.0.2.1", 51821)
TUNNEL = ipaddress.IPv4Interface("10.66.0.1/24")
TUNNEL6 = ipaddress.IPv6Interface("fd6a:7670::1/64")


def client_addr(i: int) -> tuple[str, int]:
    return (f"198.51.100.{i}", 40000 + i)


def ipv4_packet(src: str, dst: str, payload: bytes) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes) -> bytes:
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(payload), 17, 64,
        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


KINDS = {1: "ethernet", 2: "wifi", 3: "lte"}
Row = TypeVar("Row")


def client_path(i: int, port: DatagramPort, *, link_up: bool = True) -> ClientPath:
    """The laptop's path ``i`` (1..3): interface ``if<i>``, priority ``10 * i``, towards GATEWAY."""
    return ClientPath(
        path=PathId(i), name=f"if{i}", kind=KINDS[i], priority=10 * i, port=port, gateway=GATEWAY, link_up=link_up
    )


class MemoryWorld:
    """What every in-memory test world has: seeded keys, the network, both TUNs and both event logs."""

    def __init__(self, policy: Policy | None, *, seed: int, tunnel6: ipaddress.IPv6Interface | None = None) -> None:
        self.policy = policy or Policy()
        self.tunnel6 = tunnel6
        rng = random.Random(seed)
        self.random_bytes = lambda n: bytes(rng.getrandbits(8) for _ in range(n))
        self.gw_static = generate_static(self.random_bytes)
        self.cl_static = generate_static(self.random_bytes)
        self.net = MemoryNetwork()
        self.client_events: list[EmitEvent] = []
        self.gateway_events: list[EmitEvent] = []
        self.gw_packets = MemoryPacketPort()
        self.cl_packets = MemoryPacketPort()

    def new_gateway(self) -> GatewayRuntime:
        """A gateway process that knows the laptop's key (and no session yet)."""
        return GatewayRuntime(
            policy=self.policy,
            static=self.gw_static,
            peers=[GatewayPeer(name="laptop", public=self.cl_static.public)],
            tunnel=TUNNEL,
            store=MemoryOwnershipStore(),
            node_id="gw-test",
            emit=self.gateway_events.append,
            random_bytes=self.random_bytes,
            tunnel6=self.tunnel6,
        )


def tap(net: MemoryNetwork, msg_type: wire.MessageType, row: Callable[[bytes, Address, Address], Row]) -> list[Row]:
    """``row(data, src, dst)`` of every ``msg_type`` datagram the network carries, taken as it is sent."""
    rows: list[Row] = []
    original = net.deliver

    def deliver(data: bytes, src: Address, dst: Address) -> None:
        try:
            if wire.peek_type_untrusted(data) is msg_type:
                rows.append(row(data, src, dst))
        except wire.BadFrame:
            pass
        original(data, src, dst)

    net.deliver = deliver  # type: ignore[method-assign]
    return rows


class World(MemoryWorld):
    def __init__(
        self,
        policy: Policy | None = None,
        links: dict[int, bool] | None = None,
        *,
        tunnel6: ipaddress.IPv6Interface | None = None,
        port_capacity: int = 1024,
    ) -> None:
        super().__init__(policy, seed=7, tunnel6=tunnel6)
        self.gateway = self.new_gateway()
        self.ports: dict[int, MemoryDatagramPort] = {
            i: self.net.port(client_addr(i), port_capacity) for i in (1, 2, 3)
        }
        self.client = ClientRuntime(
            policy=self.policy,
            static=self.cl_static,
            gateway_public=self.gw_static.public,
            paths=[client_path(i, self.ports[i], link_up=(links or {}).get(i, True)) for i in (1, 2, 3)],
            emit=self.client_events.append,
            packets=self.cl_packets,
            set_address=self.set_address,
            random_bytes=self.random_bytes,
            wall_time_ns=lambda: 1_700_000_000_000_000_000,
        )
        self.assigned: ipaddress.IPv4Interface | None = None
        self.assigned6: ipaddress.IPv6Interface | None = None

    async def set_address(self, address: ipaddress.IPv4Interface, address6: ipaddress.IPv6Interface | None) -> None:
        self.assigned, self.assigned6 = address, address6

    def gateway_session(self):  # type: ignore[no-untyped-def]
        (served,) = self.gateway.sessions.values()
        return served


async def serve_gateway(nursery: trio.Nursery, world: World) -> None:
    """The gateway on its data and control ports, without a TUN."""
    gw_port, gw_control = world.net.port(GATEWAY), world.net.port(GATEWAY_CONTROL)
    await nursery.start(lambda task_status: world.gateway.serve([gw_port], control_ports=[gw_control], task_status=task_status))


def run_client_to_its_end(nursery: trio.Nursery, world: World) -> tuple[trio.Event, list[ReasonCode]]:
    """Start the client; once ``run`` returns, the list holds its end reason and the event is set."""
    done = trio.Event()
    result: list[ReasonCode] = []

    async def run_client() -> None:
        result.append(await world.client.run())
        done.set()

    nursery.start_soon(run_client)
    return done, result


async def start(nursery: trio.Nursery, world: World) -> None:
    await serve_gateway(nursery, world)
    world.gateway._packets = world.gw_packets
    nursery.start_soon(world.gateway._pump_packets, world.gw_packets)
    await nursery.start(lambda task_status: world.client.run(task_status=task_status))


async def test_handshake_then_data_both_ways(autojump_clock: trio.abc.Clock) -> None:
    world = World()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            served = world.gateway_session()
            assert served.core.record.state is SessionState.ATTACHED
            assert world.client.session is not None
            assert world.client.session.record.session_id == served.session_id
            assert world.assigned == ipaddress.IPv4Interface("10.66.0.2/24")
            assert world.assigned6 is None  # the gateway's tunnel carries no IPv6
            up = ipv4_packet("10.66.0.2", "10.66.0.1", b"hello gateway")
            world.cl_packets.inject(up)
            assert await world.gw_packets.delivered.receive() == up
            down = ipv4_packet("10.66.0.1", "10.66.0.2", b"hello laptop")
            world.gw_packets.inject(down)
            assert await world.cl_packets.delivered.receive() == down
            nursery.cancel_scope.cancel()


async def test_ipv6_in_the_tunnel_both_ways(autojump_clock: trio.abc.Clock) -> None:
    """A gateway with an IPv6 tunnel address: the client gets the IPv6 twin of its IPv4 address, and
    the gateway routes packets from its TUN to the session by IPv6 destination as by IPv4."""
    world = World(tunnel6=TUNNEL6)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            served = world.gateway_session()
            assert (served.address, served.address6) == (
                ipaddress.IPv4Address("10.66.0.2"), ipaddress.IPv6Address("fd6a:7670::2")
            )
            assert world.assigned == ipaddress.IPv4Interface("10.66.0.2/24")
            assert world.assigned6 == ipaddress.IPv6Interface("fd6a:7670::2/64")
            assert world.client.status.value is not None
            assert world.client.status.value.tunnel_address6 == "fd6a:7670::2/64"
            up = ipv6_packet("fd6a:7670::2", "fd6a:7670::1", b"hello gateway")
            world.cl_packets.inject(up)
            assert await world.gw_packets.delivered.receive() == up
            down = ipv6_packet("fd6a:7670::1", "fd6a:7670::2", b"hello laptop")
            world.gw_packets.inject(down)
            assert await world.cl_packets.delivered.receive() == down
            down4 = ipv4_packet("10.66.0.1", "10.66.0.2", b"and IPv4 still")
            world.gw_packets.inject(down4)
            assert await world.cl_packets.delivered.receive() == down4
            # An address nobody holds is dropped and counted, never sent to the session.
            before = world.gateway.statistics().tx_no_binding
            world.gw_packets.inject(ipv6_packet("fd6a:7670::1", "fd6a:7670::99", b"nobody"))
            await trio.sleep(0.1)
            assert world.gateway.statistics().tx_no_binding == before + 1
            nursery.cancel_scope.cancel()


async def test_blackholed_path_fails_over_and_gateway_follows(autojump_clock: trio.abc.Clock) -> None:
    world = World()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            assert world.client.active_path is not None and world.client.active_path.path == PathId(1)
            fault_at = trio.current_time()
            world.net.blocked.add(client_addr(1))
            await trio.sleep(2.0)
            assert world.client.active_path is not None and world.client.active_path.path == PathId(2)
            served = world.gateway_session()
            binding = served.core.record.binding
            assert binding is not None and binding.endpoint == client_addr(2)
            switches = [e for e in world.client_events if e.kind is EventKind.TRANSPORT_SWITCH]
            assert len(switches) == 1
            detect = switches[0].t - fault_at
            assert detect <= world.policy.death_detection_bound_ms / 1000.0 + 0.1
            # Data still flows, now over path 2; the SessionID never changed.
            down = ipv4_packet("10.66.0.1", "10.66.0.2", b"after switch")
            world.gw_packets.inject(down)
            assert await world.cl_packets.delivered.receive() == down
            sessions = {e.session for e in world.client_events + world.gateway_events}
            assert sessions == {served.session_id.hex}
            nursery.cancel_scope.cancel()


async def _failover_under_traffic(policy: Policy) -> float:
    """Blackhole the active path while the laptop sends a packet every millisecond; returns how long
    after the fault the client switched."""
    world = World(policy)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            assert world.client.active_path is not None and world.client.active_path.path == PathId(1)

            async def send_every_ms() -> None:
                up = ipv4_packet("10.66.0.2", "10.66.0.1", b"upload")
                while True:
                    world.cl_packets.inject(up)
                    await trio.sleep(0.001)

            async def drain() -> None:
                async for _packet in world.gw_packets.delivered:
                    pass

            nursery.start_soon(send_every_ms)
            nursery.start_soon(drain)
            await trio.sleep(policy.min_dwell_ms / 1000.0)  # a quality switch waits out the dwell; a death does not
            fault_at = trio.current_time()
            world.net.blocked.add(client_addr(1))
            await trio.sleep(1.0)
            switches = [e for e in world.client_events if e.kind is EventKind.TRANSPORT_SWITCH and e.t >= fault_at]
            assert switches and switches[0].detail("to_path") == str(PathId(2))
            nursery.cancel_scope.cancel()
    return switches[0].t - fault_at


async def test_a_blackhole_under_traffic_is_seen_on_the_silence_clock(autojump_clock: trio.abc.Clock) -> None:
    """The driver feeds the core's silence clock (DataSent without answers) and sends its probes
    when due, closer than the active cadence: the switch comes within the silence bound, where
    without it the same fault waits out the full probe timeouts (about 350 ms here)."""
    policy = Policy()
    assert policy.silence_probe_after_ms is not None
    took = await _failover_under_traffic(policy)
    bound_ms = (
        policy.traffic_report_ms
        + policy.silence_probe_after_ms
        + (policy.dead_after_missed_probes + 1) * policy.silence_probe_timeout_floor_ms
    )
    assert took <= bound_ms / 1000.0
    # Without silence probing the same fault waits out the full probe timeouts.
    without = await _failover_under_traffic(attrs.evolve(policy, silence_probe_after_ms=None))
    print(f"switched {took * 1000:.1f} ms after the fault with silence probing, {without * 1000:.1f} ms without")
    assert without > policy.probe_timeout_ms / 1000.0 > bound_ms / 1000.0


async def test_data_from_a_non_active_endpoint_is_not_data(autojump_clock: trio.abc.Clock) -> None:
    world = World()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            served = world.gateway_session()
            # Seal a DATA frame with the client's keys but send it from path 3's socket.
            datagram = world.client.channel.seal(
                __import__("jvpn_trio.core.wire", fromlist=["MessageType"]).MessageType.DATA,
                ipv4_packet("10.66.0.2", "10.66.0.1", b"sneaky"),
            )
            world.ports[3].send_nowait(datagram, GATEWAY)
            await trio.sleep(0.1)
            assert world.gateway.statistics().stray_data == 1
            assert served.core.record.binding is not None and served.core.record.binding.endpoint == client_addr(1)
            nursery.cancel_scope.cancel()


async def test_replayed_reattach_from_another_address_is_a_security_event(autojump_clock: trio.abc.Clock) -> None:
    world = World()
    captured: list[bytes] = []
    original = world.net.deliver

    def tap(data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        if dst == GATEWAY_CONTROL and len(data) > 1 and data[1] == 7:  # REATTACH
            captured.append(data)
        original(data, src, dst)

    world.net.deliver = tap  # type: ignore[method-assign]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            world.net.blocked.add(client_addr(1))
            await trio.sleep(2.0)
            assert captured
            served = world.gateway_session()
            before = (served.core.record, served.core.last_nonce)
            attacker = world.net.port(("203.0.113.66", 6666))
            attacker.send_nowait(captured[-1], GATEWAY_CONTROL)
            await trio.sleep(0.1)
            assert (served.core.record, served.core.last_nonce) == before
            security = [e for e in world.gateway_events if e.kind is EventKind.SECURITY_EVENT]
            assert security and security[-1].reason is ReasonCode.REPLAYED_COUNTER
            assert security[-1].detail("endpoint") == "203.0.113.66:6666"
            nursery.cancel_scope.cancel()


#: What opening one DATA costs the client on this machine (docs/benchmarks.md): the test's clock
#: pays it, so that a backlog takes the time to work off that it takes for real.
OPEN_COST_S = 40e-6


async def test_behind_a_flood_the_client_reads_the_close_queued_after_it_in_time(autojump_clock: trio.MockClock) -> None:
    """2,000 junk "DATA" from a stranger, 14,000 DATA from the gateway, then a CLOSE, all queued at once.

    Opened one by one that is 0.56 s of work, past ``probe_timeout_ms``: a PROBE_ACK or
    REATTACH_ACK in the CLOSE's place would be read too late, and the session flapped and ended
    (docs/benchmarks.md, "A UDP flood towards the client").  Once reads have come back full for
    RX_SWEEP_AFTER datagrams, one read looks RX_READ_AHEAD ahead and opens only its newest
    RX_BACKLOG_DATA of the gateway's DATA; the junk is counted as strays and pushes none of them
    out; what is opened stays in order (no replay drop).
    """
    world = World(port_capacity=20_000)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await serve_gateway(nursery, world)
            delivered: list[bytes] = []

            async def collect() -> None:  # the TUN's reader: the double holds only 1,024, so all at each turn
                while True:
                    delivered.append(await world.cl_packets.delivered.receive())
                    with contextlib.suppress(trio.WouldBlock):
                        while True:
                            delivered.append(world.cl_packets.delivered.receive_nowait())

            done, result = run_client_to_its_end(nursery, world)
            nursery.start_soon(collect)
            await trio.sleep(1.0)
            served, active = world.gateway_session(), world.client.active_path
            assert active is not None and isinstance(active.port, MemoryDatagramPort)
            channel = world.client.channel
            open_untrusted = channel.open_untrusted

            def costly_open(datagram: bytes, *, now: float):  # type: ignore[no-untyped-def]
                autojump_clock.jump(OPEN_COST_S)
                return open_untrusted(datagram, now=now)

            open_data_batch = channel.open_data_batch

            def costly_batch(datagrams: list[bytes], *, now: float):  # type: ignore[no-untyped-def]
                autojump_clock.jump(OPEN_COST_S * len(datagrams))
                return open_data_batch(datagrams, now=now)

            channel.open_untrusted = costly_open  # type: ignore[method-assign]
            channel.open_data_batch = costly_batch  # type: ignore[method-assign]
            stranger = ("198.51.100.9", 51820)
            junk = bytes([wire.PROTOCOL_VERSION, wire.MessageType.DATA]) + bytes(60)
            packets = [ipv4_packet("10.66.0.1", "10.66.0.2", b"%d" % n) for n in range(14_000)]
            close = wire.Close(session_id=served.session_id, reason=ReasonCode.PEER_REMOVED)
            for _ in range(2_000):  # no await from here on: all queued at once
                world.net.deliver(junk, stranger, active.port.addr)
            for datagram in served.channel.seal_data_batch(packets):
                world.net.deliver(datagram, GATEWAY, active.port.addr)
            world.net.deliver(served.channel.seal(wire.MessageType.CLOSE, wire.encode_close_plaintext(close)),
                              GATEWAY_CONTROL, active.port.addr)  # fmt: skip
            queued_at = trio.current_time()
            await done.wait()
            assert result == [ReasonCode.PEER_CLOSE]
            closed = next(e for e in world.client_events if e.reason is ReasonCode.PEER_CLOSE)
            assert closed.t - queued_at < world.policy.probe_timeout_ms / 1000.0
            await trio.sleep(0.1)
            stats = world.client.statistics()
            assert stats.stray_source == 2_000 and dict(stats.drop) == {}
            assert stats.rx_backlog_shed + len(delivered) == len(packets) and world.cl_packets.dropped == 0
            assert stats.rx_backlog_shed >= len(packets) // 2  # most of the flood was never opened
            indices = [packets.index(p) for p in delivered]
            assert indices == sorted(indices) and indices[-1] == len(packets) - 1
            nursery.cancel_scope.cancel()


async def test_close_terminates_both_sides_explicitly(autojump_clock: trio.abc.Clock) -> None:
    from jvpn_trio.core import events as ev

    world = World()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await serve_gateway(nursery, world)
            done, result = run_client_to_its_end(nursery, world)
            await trio.sleep(1.0)
            world.client.submit_nowait(ev.CloseRequested())
            await done.wait()
            await trio.sleep(0.1)
            assert result == [ReasonCode.LOCAL_CLOSE]
            assert world.gateway.sessions == {}
            gw_final = [e for e in world.gateway_events if e.kind is EventKind.STATE_CHANGE][-1]
            assert gw_final.detail("to_state") == "TERMINATED" and gw_final.reason is ReasonCode.PEER_CLOSE
            nursery.cancel_scope.cancel()


async def test_nat_rebinding_is_followed_by_an_explicit_reattach(autojump_clock: trio.abc.Clock) -> None:
    """The client's NAT gives path 1 a new public port: the gateway must move its binding there."""
    world = World()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            served = world.gateway_session()
            rebound = ("198.51.100.1", 50001)
            port = world.ports[1]
            del world.net._ports[port.addr]
            port.addr = rebound  # same socket, new source address as the gateway sees it
            world.net._ports[rebound] = port
            await trio.sleep(1.0)
            binding = served.core.record.binding
            assert binding is not None and binding.endpoint == rebound
            switch = [e for e in world.client_events if e.kind is EventKind.TRANSPORT_SWITCH][-1]
            assert switch.reason is ReasonCode.ENDPOINT_CHANGED
            assert switch.detail("from_path") == switch.detail("to_path") == "p1"
            down = ipv4_packet("10.66.0.1", "10.66.0.2", b"after the NAT moved")
            world.gw_packets.inject(down)
            assert await world.cl_packets.delivered.receive() == down
            up = ipv4_packet("10.66.0.2", "10.66.0.1", b"and back")
            world.cl_packets.inject(up)
            assert await world.gw_packets.delivered.receive() == up
            nursery.cancel_scope.cancel()


def handshake_inits(world: World) -> list[tuple[float, Address, Address]]:
    """Record (time, from, to) of every HANDSHAKE_INIT the network carries."""
    return tap(world.net, wire.MessageType.HANDSHAKE_INIT, lambda _data, src, dst: (trio.current_time(), src, dst))


async def test_handshake_skips_down_links_and_gives_up_at_the_ttl(autojump_clock: trio.abc.Clock) -> None:
    policy = Policy(handshake_retry_ms=1_000, transport_loss_ttl_ms=4_500)
    world = World(policy, links={1: False})
    sent = handshake_inits(world)  # no gateway: nobody answers
    start = trio.current_time()
    with trio.fail_after(30), pytest.raises(HandshakeFailed, match="on if2, if3 within 4500 ms"):
        await world.client.run()
    assert trio.current_time() - start == 5.0  # the attempt started at 4.0 runs its whole second
    assert [(t - start, src) for t, src, _dst in sent] == [
        (0.0, client_addr(2)), (1.0, client_addr(3)), (2.0, client_addr(2)), (3.0, client_addr(3)),
        (4.0, client_addr(2)),
    ]
    assert {dst for _t, _src, dst in sent} == {GATEWAY_CONTROL}
    assert world.client.statistics().handshake_sent == 5


async def test_a_link_coming_up_during_the_handshake_joins_the_rotation(autojump_clock: trio.abc.Clock) -> None:
    policy = Policy(handshake_retry_ms=1_000, transport_loss_ttl_ms=3_500)
    world = World(policy, links={1: False, 3: False})
    sent = handshake_inits(world)
    start = trio.current_time()

    async def link_up_later() -> None:
        await trio.sleep(0.5)
        world.client.submit_nowait(ev.LinkChanged(path=PathId(1), up=True))

    failures: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link_up_later)
            try:
                await world.client.run()
            except HandshakeFailed as exc:
                failures.append(str(exc))
    assert failures == ["no handshake answer from the gateway on if1, if2 within 3500 ms"]
    assert [(t - start, src) for t, src, _dst in sent] == [
        (0.0, client_addr(2)), (1.0, client_addr(1)), (2.0, client_addr(2)), (3.0, client_addr(1)),
    ]


async def test_statistics_are_typed_and_frozen(autojump_clock: trio.abc.Clock) -> None:
    assert [f.name for f in attrs.fields(_Tally)] == [f.name for f in attrs.fields(ClientStatistics)]
    world = World()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            up = ipv4_packet("10.66.0.2", "10.66.0.1", b"counted")
            world.cl_packets.inject(up)
            assert await world.gw_packets.delivered.receive() == up
            down = ipv4_packet("10.66.0.1", "10.66.0.2", b"counted too")
            world.gw_packets.inject(down)
            assert await world.cl_packets.delivered.receive() == down
            # An authenticated datagram delivered twice: the second copy is a replay.
            datagram = world.gateway_session().channel.seal(wire.MessageType.DATA, down)
            world.net.deliver(datagram, GATEWAY, client_addr(1))
            world.net.deliver(datagram, GATEWAY, client_addr(1))
            world.net.deliver(b"\xff", GATEWAY, client_addr(1))  # not even a header
            world.net.deliver(b"", ("203.0.113.9", 1), client_addr(1))  # from a stranger
            await trio.sleep(0.1)
            stats = world.client.statistics()
            assert (stats.handshake_sent, stats.tx_packets, stats.tx_bytes) == (1, 1, len(up))
            assert stats.rx_packets >= 2 and stats.rx_bytes >= 2 * len(down)
            assert dict(stats.drop) == {ReasonCode.REPLAYED_COUNTER: 1, ReasonCode.MALFORMED: 1}
            assert stats.stray_source == 1
            with pytest.raises(TypeError):
                stats.drop[ReasonCode.MALFORMED] = 0  # type: ignore[index]
            with pytest.raises(attrs.exceptions.FrozenInstanceError):
                stats.tx_packets = 0  # type: ignore[misc]
            status = world.client.status.value
            assert status is not None and isinstance(status.statistics, ClientStatistics)
            nursery.cancel_scope.cancel()


async def test_a_reload_adds_renames_and_removes_peers_and_leaves_the_others_untouched(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = World()
    laptop = world.cl_static.public
    phone = generate_static(world.random_bytes).public
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await serve_gateway(nursery, world)
            world.gateway._packets = world.gw_packets
            nursery.start_soon(world.gateway._pump_packets, world.gw_packets)
            inits = tap(world.net, wire.MessageType.HANDSHAKE_INIT, lambda data, src, dst: (data, src, dst))
            done, result = run_client_to_its_end(nursery, world)
            await trio.sleep(1.0)
            served = world.gateway_session()
            up = ipv4_packet("10.66.0.2", "10.66.0.1", b"still here")

            # An added peer and a renamed one: the live session goes on as it was.
            changes = await world.gateway.reload_peers(
                [GatewayPeer(name="laptop-2", public=laptop), GatewayPeer(name="phone", public=phone)]
            )
            assert changes == PeerChanges(added=("phone",), renamed=("laptop-2",), unchanged=0)
            await trio.sleep(0.5)
            assert world.gateway_session() is served and served.core.record.state is SessionState.ATTACHED
            assert served.peer.name == "laptop-2"
            world.cl_packets.inject(up)
            assert await world.gw_packets.delivered.receive() == up

            # A set that cannot work changes nothing.
            with pytest.raises(ValueError):
                await world.gateway.reload_peers([GatewayPeer(name="a", public=laptop), GatewayPeer(name="b", public=laptop)])
            with pytest.raises(ValueError):
                await world.gateway.reload_peers([GatewayPeer(name="x", public=laptop, address=ipaddress.IPv4Address("192.0.2.9"))])
            assert world.gateway_session() is served and served.peer.name == "laptop-2"

            # The laptop removed: its session ends with its own reason on both sides, and it cannot come back.
            changes = await world.gateway.reload_peers([GatewayPeer(name="phone", public=phone)])
            assert changes == PeerChanges(removed=("laptop-2",), unchanged=1, sessions_closed=1)
            await done.wait()
            assert result == [ReasonCode.PEER_CLOSE]
            gw_end = [e for e in world.gateway_events if e.kind is EventKind.STATE_CHANGE][-1]
            assert (gw_end.detail("to_state"), gw_end.reason) == ("TERMINATED", ReasonCode.PEER_REMOVED)
            cl_end = [e for e in world.client_events if e.kind is EventKind.STATE_CHANGE][-1]
            assert (cl_end.reason, cl_end.detail("peer_reason")) == (ReasonCode.PEER_CLOSE, "PEER_REMOVED")
            await trio.sleep(0.1)
            assert world.gateway.sessions == {}
            assert world.gateway.statistics().terminated_peer_removed == 1
            # Its handshake, sent again: the key is no longer known, so no session.
            data, src, dst = inits[0]
            world.net.deliver(data, src, dst)
            await trio.sleep(0.1)
            assert world.gateway.sessions == {} and world.gateway.statistics().handshake_unknown_peer == 1
            nursery.cancel_scope.cancel()


async def test_probes_follow_each_paths_role_and_a_failing_binding_probes_every_path_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = World()
    world.client.paths[PathId(3)] = attrs.evolve(world.client.paths[PathId(3)], metered=True)
    probes = tap(world.net, wire.MessageType.PROBE, lambda _data, src, _dst: (trio.current_time(), src))
    policy = world.policy

    def per_s(i: int, since: float, seconds: float) -> float:
        return sum(1 for t, src in probes if src == client_addr(i) and since <= t < since + seconds) / seconds

    async def traffic() -> None:
        up = ipv4_packet("10.66.0.2", "10.66.0.1", b"busy")
        while True:
            world.cl_packets.inject(up)
            await trio.sleep(0.1)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(policy.idle_ms / 1000 + 2.0)  # attached on p1, nothing sent: the tunnel idles
            since = trio.current_time()
            await trio.sleep(20.0)
            assert per_s(1, since, 20.0) == pytest.approx(1000 / policy.standby_probe_interval_ms, rel=0.1)
            assert per_s(2, since, 20.0) == pytest.approx(1000 / policy.standby_probe_interval_ms, rel=0.1)
            assert per_s(3, since, 20.0) * 20.0 in (2, 3)  # every metered_probe_interval_ms
            # Data flows: the active path is probed at once, then at the active cadence; the others keep theirs.
            busy = trio.current_time()
            nursery.start_soon(traffic)
            await trio.sleep(5.0)
            first = min(t for t, src in probes if src == client_addr(1) and t >= busy)
            assert first - busy <= policy.probe_interval_ms / 1000
            assert per_s(1, busy, 5.0) == pytest.approx(1000 / policy.probe_interval_ms, rel=0.05)
            assert per_s(2, busy, 5.0) == pytest.approx(1000 / policy.standby_probe_interval_ms, rel=0.2)
            # The active path is blackholed: once it is declared dead every standby is probed at once.
            world.net.blocked.add(client_addr(1))
            blackholed = trio.current_time()
            await trio.sleep(policy.death_detection_bound_ms / 1000 + 0.1)
            after = [(t, src) for t, src in probes if t > blackholed]
            for i in (2, 3):
                first = min(t for t, src in after if src == client_addr(i))
                assert first - blackholed <= policy.death_detection_bound_ms / 1000 + policy.probe_interval_ms / 1000
            nursery.cancel_scope.cancel()


async def test_a_partial_checksum_travels_as_data_partial_and_arrives_completed(autojump_clock: trio.abc.Clock) -> None:
    """A TCP segment whose checksum the sender's kernel left to finish crosses as DATA_PARTIAL, in both directions.

    The memory TUN has no offloads, so the receiving runtime's device completes the checksum:
    what comes out is the packet a kernel would have sent, byte for byte.
    """
    world = World()
    types = tap(world.net, wire.MessageType.DATA_PARTIAL, lambda data, src, dst: (src, dst))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            for src, dst, inject, out in (
                ("10.66.0.2", "10.66.0.1", world.cl_packets, world.gw_packets),
                ("10.66.0.1", "10.66.0.2", world.gw_packets, world.cl_packets),
            ):
                addresses = {"src": ipaddress.IPv4Address(src), "dst": ipaddress.IPv4Address(dst)}
                whole = offload_tests.tcp_packet(4, 1000, b"partial payload", **addresses)
                partial = offload_tests.tcp_packet(4, 1000, b"partial payload", partial=True, **addresses)
                assert type(partial) is offload.PartialPacket and partial != whole  # the checksum differs
                inject.inject(partial)
                arrived = await out.delivered.receive()
                assert arrived == whole
                assert offload_tests.transport_checksum_ok(arrived)
            assert len(types) == 2
            nursery.cancel_scope.cancel()


async def test_a_broken_partial_packet_from_a_valid_peer_is_dropped_and_counted(autojump_clock: trio.abc.Clock) -> None:
    """A holder of the session's keys sends DATA_PARTIAL cut inside its UDP header: nothing reaches the TUN."""
    world = World()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            world.cl_packets.inject(offload.PartialPacket(ipv4_packet("10.66.0.2", "10.66.0.1", b"abc")))
            good = ipv4_packet("10.66.0.2", "10.66.0.1", b"after")
            world.cl_packets.inject(good)
            assert await world.gw_packets.delivered.receive() == good  # the broken one never came out
            assert world.gw_packets.dropped == 0
            assert world.gateway.statistics().rx_tun_full == 1  # refused by the device, counted
            nursery.cancel_scope.cancel()


async def test_data_before_a_control_frame_is_opened_with_the_keys_before_it(autojump_clock: trio.abc.Clock) -> None:
    """The client opens DATA in runs, but a control frame ends the run before it.

    While the control frame's input awaits, another task may replace the keys (a takeover's
    ``install_alone``): the DATA read before that frame was sealed with the keys before it,
    and must open with them; the DATA after it meets the new keys.
    """
    world = World()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(1.0)
            client, served = world.client, world.gateway_session()
            path = client.active_path
            assert path is not None
            first, second = (served.channel.seal_data_batch([ipv4_packet("10.66.0.1", "10.66.0.2", text)])[0]
                             for text in (b"before", b"after"))
            ack = served.channel.seal(wire.MessageType.PROBE_ACK, wire.encode_probe_ack_plaintext(wire.ProbeAck(
                path_id=path.path, seq=1, echo_sent_us=0, gateway_state_version=1, bound_path_id=path.path)))
            submit = client.submit

            async def submit_while_the_keys_change(event, *, at=None):  # type: ignore[no-untyped-def]
                client.channel.install_alone(Keypair(send_key=bytes(32), recv_key=bytes([7]) * 32, local_index=4242,
                                                     remote_index=1, is_initiator=True, created_at=at or 0.0))
                await submit(event, at=at)

            client.submit = submit_while_the_keys_change  # type: ignore[method-assign]
            received = client.statistics().rx_packets
            await client._receive_batch(path, [(first, GATEWAY), (ack, GATEWAY_CONTROL), (second, GATEWAY)])
            stats = client.statistics()
            assert stats.rx_packets - received == 1  # "before" opened with the old keys
            assert stats.drop[ReasonCode.STRAY_PACKET] == 1  # "after" met keys it was not sealed with
            nursery.cancel_scope.cancel()
