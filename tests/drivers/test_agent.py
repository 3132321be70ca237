"""The client agent end to end over the in-memory network, on Trio's mock clock.

Determinism rules: virtual time only (autojump_clock), no sockets, seeded
randomness, a wall clock derived from the virtual one; every test is bounded
by fail_after in virtual seconds, and the times asserted are virtual.
A gateway "killed" here stops as SIGKILL would: its ports are blackholed
before it is cancelled, so the CLOSE it sends on the way out never arrives.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio
import trio_util

from jvpn_trio.core import events as ev
from jvpn_trio.core import wire
from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.agent import Succession
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.drivers.agent import ClientAgent
from jvpn_trio.drivers.client import ClientPath, RuntimeStatus
from jvpn_trio.drivers.clock import SuspendDetector
from jvpn_trio.drivers.gateway import GatewayRuntime
from jvpn_trio.drivers.memory import MemoryDatagramPort
from jvpn_trio.drivers.ports import Address, DatagramPort
from jvpn_trio.drivers.recording import Recorder
from jvpn_trio.tools.audit import audit_events
from jvpn_trio.tools.replay import OK, render_replay, replay_lines
from tests.drivers.test_clock import MockKernel
from tests.drivers.test_runtime_memory import (
    GATEWAY,
    GATEWAY_CONTROL,
    TUNNEL,
    MemoryWorld,
    client_addr,
    client_path,
    ipv4_packet,
    tap,
)
from tests.tools.test_replay import MemoryRecorder

P1, P2, P3 = PathId(1), PathId(2), PathId(3)
WALL_EPOCH_NS = 1_700_000_000_000_000_000


class FailingPort:
    """A path socket whose interface can be deleted: then recv and send raise OSError(ENODEV)."""

    def __init__(self, inner: MemoryDatagramPort) -> None:
        self.inner = inner
        self.failing = False
        self._deleted = trio.Event()

    def delete_interface(self) -> None:
        self.failing = True
        self._deleted.set()

    def _raise(self) -> None:
        raise OSError(errno.ENODEV, "No such device")

    def send_nowait(self, data: bytes, addr: Address) -> bool:
        if self.failing:
            self._raise()
        return self.inner.send_nowait(data, addr)

    def send_segments_nowait(self, segments: Sequence[bytes], addr: Address) -> bool:
        if self.failing:
            self._raise()
        return self.inner.send_segments_nowait(segments, addr)

    async def recv_batch(self, max_datagrams: int) -> list[tuple[bytes, Address]]:
        if not self.failing:
            async with trio_util.move_on_when(self._deleted.wait):
                return await self.inner.recv_batch(max_datagrams)
        await trio.lowlevel.checkpoint()
        self._raise()
        raise AssertionError("unreachable")


class AgentWorld(MemoryWorld):
    """One agent with three paths and a gateway that can be killed and started again."""

    def __init__(
        self,
        policy: Policy | None = None,
        recorder: Recorder | None = None,
        *,
        initial: Sequence[int] = (1, 2, 3),
        suspend_detector: SuspendDetector | None = None,
    ) -> None:
        super().__init__(policy, seed=11)
        self.logs: list[str] = []
        self.addresses: list[ipaddress.IPv4Interface] = []
        self.memory_ports = {i: self.net.port(client_addr(i)) for i in (1, 2, 3)}
        self.path1 = FailingPort(self.memory_ports[1])
        ports: dict[int, DatagramPort] = {1: self.path1, 2: self.memory_ports[2], 3: self.memory_ports[3]}
        self.ports = ports
        self.agent = ClientAgent(
            policy=self.policy,
            static=self.cl_static,
            gateway_public=self.gw_static.public,
            paths=[self.client_path(i) for i in initial],
            emit=self.client_events.append,
            packets=self.cl_packets,
            set_address=self._set_address,
            random_bytes=self.random_bytes,
            wall_time_ns=lambda: WALL_EPOCH_NS + int(trio.current_time() * 1e9),
            recorder=recorder,
            log=self.logs.append,
            suspend_detector=suspend_detector,
        )
        self.gateway: GatewayRuntime | None = None
        self._gateway_scope: trio.CancelScope | None = None
        self._gateway_done: trio.Event | None = None
        self.agent_returned = False

    def client_path(self, i: int, port: DatagramPort | None = None) -> ClientPath:
        return client_path(i, self.ports[i] if port is None else port)

    async def _set_address(self, address: ipaddress.IPv4Interface, address6: ipaddress.IPv6Interface | None) -> None:
        self.addresses.append(address)

    async def start_gateway(self, nursery: trio.Nursery) -> GatewayRuntime:
        """A new gateway process: same static key, same addresses, no memory of sessions."""
        self.net.blocked.difference_update({GATEWAY, GATEWAY_CONTROL})
        gateway = self.new_gateway()
        scope = trio.CancelScope()
        done = trio.Event()
        data, control = self.net.port(GATEWAY), self.net.port(GATEWAY_CONTROL)

        async def serve(task_status: trio.TaskStatus[GatewayRuntime] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await gateway.serve([data], control_ports=[control], packets=self.gw_packets, task_status=task_status)
            finally:
                done.set()

        await nursery.start(serve)
        self.gateway, self._gateway_scope, self._gateway_done = gateway, scope, done
        return gateway

    async def kill_gateway(self) -> None:
        """As SIGKILL: nothing the gateway sends on its way out reaches anyone."""
        assert self._gateway_scope is not None and self._gateway_done is not None
        self.net.blocked.update({GATEWAY, GATEWAY_CONTROL})
        self._gateway_scope.cancel()
        await self._gateway_done.wait()
        self.gateway = None

    async def start_agent(self, nursery: trio.Nursery) -> None:
        async def serve(task_status: trio.TaskStatus[ClientAgent] = trio.TASK_STATUS_IGNORED) -> None:
            await self.agent.serve(task_status=task_status)
            self.agent_returned = True

        await nursery.start(serve)

    async def wait_attached(self, sessions_started: int) -> RuntimeStatus:
        def ready(status: RuntimeStatus | None) -> bool:
            return (
                status is not None
                and status.sessions_started == sessions_started
                and status.snapshot is not None
                and status.snapshot.record.state is SessionState.ATTACHED
            )

        await self.agent.status.wait_value(ready)
        status: RuntimeStatus | None = self.agent.status.value
        assert status is not None
        return status

    def births(self) -> list[EmitEvent]:
        return [e for e in self.client_events if e.kind is EventKind.STATE_CHANGE and e.detail("to_state") == "BIRTH"]

    def final_state_change(self, session: SessionId) -> EmitEvent:
        return [e for e in self.client_events if e.kind is EventKind.STATE_CHANGE and e.session == session.hex][-1]

    async def data_flows(self) -> None:
        """A packet from the laptop's TUN comes out of the gateway's TUN.

        One packet per probe interval until one does: the gateway takes data only once the
        client's first packet has confirmed the new session (its BIRTH -> ATTACHED).
        """
        address = self.addresses[-1]
        up = ipv4_packet(str(address.ip), str(TUNNEL.ip), b"through the new session")
        while True:
            self.cl_packets.inject(up)
            with trio.move_on_after(self.policy.probe_interval_ms / 1000.0):
                assert await self.gw_packets.delivered.receive() == up
                return


def handshake_inits(world: AgentWorld) -> list[tuple[float, Address]]:
    """(time, source) of every HANDSHAKE_INIT the network carries."""
    return tap(world.net, wire.MessageType.HANDSHAKE_INIT, lambda _data, src, _dst: (trio.current_time(), src))


@asynccontextmanager
async def running(world: AgentWorld, *, within: float, gateway: bool = True) -> AsyncIterator[trio.Nursery]:
    """The gateway (unless ``gateway`` is False) and the agent in a nursery that is cancelled when the block ends.

    All of it must finish within ``within`` virtual seconds.
    """
    with trio.fail_after(within):
        async with trio.open_nursery() as nursery:
            if gateway:
                await world.start_gateway(nursery)
            await world.start_agent(nursery)
            yield nursery
            nursery.cancel_scope.cancel()


def session_of(status: RuntimeStatus) -> SessionId:
    assert status.snapshot is not None
    return status.snapshot.record.session_id


# -- (a) the gateway restarts -------------------------------------------------------------------


async def test_a_restarted_gateway_gets_a_new_session_within_ten_seconds(autojump_clock: trio.abc.Clock) -> None:
    world = AgentWorld()
    async with running(world, within=60) as nursery:
        first = session_of(await world.wait_attached(1))
        await world.data_flows()
        await world.kill_gateway()
        await trio.sleep(5.0)
        await world.start_gateway(nursery)
        back_at = trio.current_time()
        second = session_of(await world.wait_attached(2))
        await world.data_flows()
        took = trio.current_time() - back_at
        assert took <= 10.0
        assert second != first and not world.agent_returned
        birth = world.births()[-1]
        assert birth.session == second.hex and birth.detail("previous_session") == first.hex
        # The gateway lost the old session, so a rescue replaced it explicitly.
        end = world.final_state_change(first)
        assert (end.detail("to_state"), end.reason) == ("TERMINATED", ReasonCode.LOCAL_CLOSE)
        assert world.agent.statistics().rescues == 1
        assert world.addresses == [ipaddress.IPv4Interface("10.66.0.2/24")]  # set once: it did not change
    print(f"gateway back -> data on a new session: {took:.3f} s (virtual)")


# -- (b) every path down for longer than the transport-loss TTL -----------------------------------


async def test_all_paths_down_past_the_ttl_then_one_returns(autojump_clock: trio.abc.Clock) -> None:
    world = AgentWorld()
    ttl_s = world.policy.transport_loss_ttl_ms / 1000.0
    async with running(world, within=120):
        first = session_of(await world.wait_attached(1))
        down_at = trio.current_time()
        world.net.blocked.update(client_addr(i) for i in (1, 2, 3))
        for path in (P1, P2, P3):
            world.agent.submit_nowait(ev.LinkChanged(path=path, up=False))
        await trio.sleep(ttl_s + 5.0)
        end = world.final_state_change(first)
        assert end.detail("to_state") == "TERMINATED"
        assert end.reason in (ReasonCode.TRANSPORT_LOSS_TTL_EXPIRED, ReasonCode.LOCAL_CLOSE)
        assert end.t - down_at <= ttl_s + 1.0
        status = world.agent.status.value
        assert status is not None and status.snapshot is None and status.sessions_started == 1  # CONNECTING
        back_at = trio.current_time()
        world.net.blocked.discard(client_addr(2))
        world.agent.submit_nowait(ev.LinkChanged(path=P2, up=True))
        second = session_of(await world.wait_attached(2))
        recovered = trio.current_time() - back_at
        await world.data_flows()
        assert world.agent.sessions_started == 2 and not world.agent_returned
        assert recovered <= world.policy.reconnect_max_ms / 1000.0 + world.policy.handshake_retry_ms / 1000.0
        assert world.births()[-1].detail("previous_session") == first.hex
        assert second != first
    print(f"all paths down {ttl_s + 5.0:.0f} s, one back -> new session attached: {recovered:.3f} s (virtual)")


# -- (c) nothing unauthenticated ends a session or starts one -----------------------------------------


async def test_forged_and_garbage_packets_change_no_session(autojump_clock: trio.abc.Clock) -> None:
    world = AgentWorld()
    inits = tap(world.net, wire.MessageType.HANDSHAKE_INIT, lambda data, src, _dst: (data, src))
    rng = random.Random(5)

    def forge_response(init: bytes) -> bytes:
        """A HANDSHAKE_RESP naming the init's index, from someone without the gateway's key."""
        sender = wire.decode_handshake_init_untrusted(init).sender_index
        return wire.encode_handshake_resp(
            wire.HandshakeResp(
                sender_index=rng.getrandbits(32),
                receiver_index=sender,
                ephemeral=rng.randbytes(32),
                encrypted_payload=rng.randbytes(wire.ENCRYPTED_RESP_PAYLOAD_LEN),
                mac1=rng.randbytes(wire.MAC_LEN),
            )
        )

    def spoof(data: bytes, source: Address, to: Address) -> None:
        """Straight into the client's socket: the attacker is on the path, the gateway need not be up."""
        world.memory_ports[to[1] - 40000]._enqueue(data, source)

    def attack() -> None:
        for i in (1, 2, 3):
            for source in (GATEWAY, GATEWAY_CONTROL):  # spoofed: the gateway's own addresses
                spoof(b"\x01\x03garbage", source, client_addr(i))
                spoof(bytes(rng.getrandbits(8) for _ in range(wire.HANDSHAKE_RESP_LEN)), source, client_addr(i))
        for data, src in inits[-3:]:
            spoof(forge_response(data), GATEWAY_CONTROL, src)

    async with running(world, within=60):
        first = session_of(await world.wait_attached(1))
        attack()  # while bound
        await trio.sleep(1.0)
        await world.kill_gateway()
        await trio.sleep(5.0)  # unbound, past rescue_at: a rescue round is sending inits now
        assert inits and inits[-1][0] != inits[0][0]
        for _ in range(10):  # answer every rescue init with a forgery, for 10 s
            attack()
            await trio.sleep(1.0)
        assert world.agent.sessions_started == 1 and world.agent.session is not None
        assert world.agent.session.record.session_id == first
        assert world.agent.session.record.state is not SessionState.TERMINATED
        stats = world.agent.statistics()
        assert stats.rescues == 0
        assert stats.handshake.get(ReasonCode.BAD_MAC, 0) > 0  # forged answers to live inits: refused
        assert stats.drop.get(ReasonCode.MALFORMED, 0) > 0  # garbage: dropped
        assert [e for e in world.client_events if e.session != first.hex] == []


# -- (d) a path's interface is deleted ------------------------------------------------------------------


async def test_a_socket_error_takes_the_path_down_not_the_agent(autojump_clock: trio.abc.Clock) -> None:
    world = AgentWorld()
    async with running(world, within=60):
        first = session_of(await world.wait_attached(1))
        assert world.agent.runtime is not None and world.agent.runtime.active_path is not None
        assert world.agent.runtime.active_path.path == P1
        deleted_at = trio.current_time()
        world.path1.delete_interface()
        await trio.sleep(5.0)
        runtime = world.agent.runtime
        assert runtime is not None and runtime.active_path is not None and runtime.active_path.path in (P2, P3)
        assert runtime.link_up[P1] is False
        stats = world.agent.statistics()
        assert stats.path_errors["ENODEV"] >= 5  # the receiver retried once a second, and every send failed
        assert len(world.logs) == 1 and "if1" in world.logs[0] and "ENODEV" in world.logs[0]
        switch = [e for e in world.client_events if e.kind is EventKind.TRANSPORT_SWITCH][-1]
        assert switch.reason is ReasonCode.LINK_DOWN and switch.detail("to_path") == str(runtime.active_path.path)
        assert switch.t - deleted_at <= world.policy.reattach_timeout_ms / 1000.0
        assert world.agent.sessions_started == 1 and world.agent.session is not None
        assert world.agent.session.record.session_id == first
        await world.data_flows()
        assert not world.agent_returned


# -- (e) the back-off between handshake rounds ---------------------------------------------------------------


def expected_inits(policy: Policy, paths: int, rounds: int) -> list[float]:
    """When core/agent.py says the inits of the first ``rounds`` rounds leave, with no gateway."""
    retry = policy.handshake_retry_ms / 1000.0
    succession = Succession(policy=policy, now=0.0)
    times: list[float] = []
    for _ in range(rounds):
        start = succession.next_attempt_at()
        attempts = [start + k * retry for k in range(paths)]
        times += attempts
        succession.handshake_failed(attempts[-1] + retry, last_attempt_at=attempts[-1])
    return times


def test_the_expected_spacing_is_bounded_exponential() -> None:
    times = expected_inits(Policy(), paths=3, rounds=9)
    starts = times[::3]
    assert starts == [0.0, 3.0, 6.0, 9.0, 13.0, 19.0, 29.0, 41.0, 53.0]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) == Policy().reconnect_max_ms / 1000.0


async def test_handshake_rounds_back_off_as_the_succession_says(autojump_clock: trio.abc.Clock) -> None:
    world = AgentWorld()
    sent = handshake_inits(world)  # no gateway at all
    start = trio.current_time()
    async with running(world, within=120, gateway=False):
        await trio.sleep(63.5)
        status = world.agent.status.value
        assert status is not None and status.snapshot is None and status.sessions_started == 0
        assert not world.agent_returned
    assert [round(t - start, 6) for t, _src in sent] == expected_inits(world.policy, paths=3, rounds=9)
    assert [src for _t, src in sent[:6]] == [client_addr(i) for i in (1, 2, 3, 1, 2, 3)]
    assert world.agent.statistics().handshake_sent == len(sent)


async def test_packets_from_the_tun_between_sessions_are_dropped_and_counted(autojump_clock: trio.abc.Clock) -> None:
    world = AgentWorld()
    async with running(world, within=30, gateway=False):
        await trio.sleep(0.5)
        for n in range(3):
            world.cl_packets.inject(ipv4_packet("10.66.0.2", "10.66.0.1", bytes([n])))
        await trio.sleep(0.1)
        assert world.agent.statistics().tx_dropped_unbound == 3


# -- (f) the whole life of the agent passes the event-log audit ---------------------------------------------


async def test_the_event_log_across_sessions_passes_the_audit(autojump_clock: trio.abc.Clock) -> None:
    world = AgentWorld()
    async with running(world, within=150) as nursery:
        await world.wait_attached(1)
        await world.kill_gateway()  # a rescue replaces session 1
        await trio.sleep(5.0)
        await world.start_gateway(nursery)
        await world.wait_attached(2)
        world.net.blocked.update(client_addr(i) for i in (1, 2, 3))  # session 2 ends by its TTL or a rescue
        await trio.sleep(world.policy.transport_loss_ttl_ms / 1000.0 + 5.0)
        world.net.blocked.clear()
        await world.wait_attached(3)
        world.agent.close_nowait()
        with trio.fail_after(5):
            while not world.agent_returned:
                await trio.sleep(0.1)
    sessions = {e.session for e in world.client_events}
    assert len(sessions) == 3
    report = audit_events(world.client_events, policy=world.policy, role="client")
    assert report.ok, [str(v) for v in report.violations]
    assert len(report.sessions) == 3
    last = world.client_events[-1]
    assert (last.detail("to_state"), last.reason) == ("TERMINATED", ReasonCode.LOCAL_CLOSE)
    # Each session's versions go up by one per STATE_CHANGE, each with a reason.
    for session in sessions:
        versions = [e.version for e in world.client_events if e.session == session and e.kind is EventKind.STATE_CHANGE]
        assert versions == list(range(len(versions)))


async def test_a_recorded_chain_of_sessions_replays_with_its_seeds(autojump_clock: trio.abc.Clock) -> None:
    """Each session's start line carries its seed, so the trace of a rescue replays identically."""
    recorder = MemoryRecorder()
    world = AgentWorld(recorder=recorder)
    async with running(world, within=60) as nursery:
        first = session_of(await world.wait_attached(1))
        await world.kill_gateway()
        await trio.sleep(5.0)
        await world.start_gateway(nursery)
        await world.wait_attached(2)
        world.agent.close_nowait()
        await trio.sleep(1.0)
        assert world.agent_returned
    starts = [json.loads(line) for line in recorder.lines if '"start"' in line]
    assert [s.get("previous_session") for s in starts] == [None, first.hex]
    result = replay_lines(recorder.lines)
    assert result.status == OK, render_replay(result)
    assert [m.final_state for m in result.machines] == ["TERMINATED", "TERMINATED"]


# -- (h) paths that come and go while a session is live --------------------------------------------------


def switches(world: AgentWorld) -> list[EmitEvent]:
    return [e for e in world.client_events if e.kind is EventKind.TRANSPORT_SWITCH]


async def test_a_path_added_mid_session_is_probed_and_takes_over_when_the_active_one_goes(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = AgentWorld(initial=(1,))
    async with running(world, within=60):
        first = session_of(await world.wait_attached(1))
        assert world.agent.add_path(world.client_path(2))
        assert not world.agent.add_path(world.client_path(2))  # its id is taken
        added_at = trio.current_time()
        await trio.sleep(2.0)
        status = world.agent.status.value
        assert status is not None and status.snapshot is not None
        p2 = [p for p in status.snapshot.paths if p.path == P2][0]
        assert p2.stats.probes_acked > 0  # probed, and the gateway answered
        assert (P2, "if2", "wifi") in status.paths
        health = [e for e in world.client_events if e.kind is EventKind.PATH_HEALTH and e.detail("path") == "p2"]
        assert health and health[0].t - added_at <= world.policy.probe_interval_ms / 1000.0
        removed = world.agent.remove_path(P1)
        assert removed is not None and removed.name == "if1"
        removed_at = trio.current_time()
        await trio.sleep(1.0)
        switch = switches(world)[-1]
        assert (switch.reason, switch.detail("from_path"), switch.detail("to_path")) == (
            ReasonCode.LINK_DOWN, "p1", "p2"
        )
        assert switch.t - removed_at <= world.policy.reattach_timeout_ms / 1000.0
        assert world.agent.session is not None and world.agent.session.record.session_id == first
        status = world.agent.status.value
        assert status is not None and status.snapshot is not None
        assert [p.path for p in status.snapshot.paths] == [P2] and [p[0] for p in status.paths] == [P2]
        await world.data_flows()
        assert not world.agent_returned and world.agent.sessions_started == 1


async def test_an_agent_without_paths_waits_then_connects_when_one_appears(autojump_clock: trio.abc.Clock) -> None:
    world = AgentWorld(initial=())
    async with running(world, within=60):
        await trio.sleep(10.0)
        assert world.agent.sessions_started == 0 and world.agent.statistics().handshake_sent == 0
        world.agent.add_path(world.client_path(3))
        await world.wait_attached(1)
        await world.data_flows()
        # Removing the only path: the session loses its binding, nothing crashes.
        world.agent.remove_path(PathId(3))
        await trio.sleep(1.0)
        assert world.agent.session is not None and world.agent.session.record.binding is None
        world.agent.add_path(world.client_path(2))
        await world.wait_attached(1) if world.agent.sessions_started == 1 else None
        await world.data_flows()
        assert not world.agent_returned


async def test_a_new_address_on_the_active_path_reattaches_on_it(autojump_clock: trio.abc.Clock) -> None:
    world = AgentWorld(initial=(1, 2))
    async with running(world, within=60):
        first = session_of(await world.wait_attached(1))
        await trio.sleep(1.0)
        new_port = world.net.port(("198.51.100.201", 40201))  # DHCP gave if1 another address
        old = world.agent.readdress_path(world.client_path(1, port=new_port))
        assert old is not None and old.port is world.path1
        changed_at = trio.current_time()
        await trio.sleep(1.0)
        switch = switches(world)[-1]
        assert (switch.reason, switch.detail("from_path"), switch.detail("to_path")) == (
            ReasonCode.ENDPOINT_CHANGED, "p1", "p1"
        )
        assert switch.t - changed_at <= world.policy.reattach_timeout_ms / 1000.0
        assert world.gateway is not None
        gw_switch = [e for e in world.gateway_events if e.kind is EventKind.TRANSPORT_SWITCH][-1]
        assert gw_switch.reason is ReasonCode.REATTACH_CONFIRMED and gw_switch.t >= changed_at
        assert world.agent.session is not None and world.agent.session.record.session_id == first
        await world.data_flows()


# -- (i) suspend ---------------------------------------------------------------------------------------


async def test_a_long_suspend_starts_a_new_session_at_once(autojump_clock: trio.abc.Clock) -> None:
    """The gateway forgot the session while the laptop slept: a rescue at the resume, not after the TTL."""
    kernel = MockKernel()
    detector = SuspendDetector(read_boottime=kernel.boottime, read_monotonic=kernel.monotonic)
    world = AgentWorld(suspend_detector=detector)
    inits = handshake_inits(world)
    async with running(world, within=60) as nursery:
        first = session_of(await world.wait_attached(1))
        await world.kill_gateway()
        await world.start_gateway(nursery)  # it restarted while we slept: it knows no session
        kernel.suspend(1_800.0)
        await trio.sleep(detector.interval_s)
        resumed_at = trio.current_time()
        second = session_of(await world.wait_attached(2))
        took = trio.current_time() - resumed_at
        assert [t for t, _src in inits if t >= resumed_at] == [resumed_at]  # the rescue left at the resume
        assert second != first
        assert took < world.policy.probe_interval_ms * world.policy.dead_after_missed_probes / 1000.0
        assert [round(r.suspended_for_s) for r in world.agent.resumes] == [1_800]
        end = world.final_state_change(first)
        assert (end.detail("to_state"), end.reason) == ("TERMINATED", ReasonCode.LOCAL_CLOSE)
        await world.data_flows()
    print(f"resume -> new session: {took:.3f} s (virtual)")


def probe_sends(world: AgentWorld) -> list[tuple[float, Address]]:
    """(time, source) of every PROBE the network carries."""
    return tap(world.net, wire.MessageType.PROBE, lambda _data, src, _dst: (trio.current_time(), src))


async def test_a_short_suspend_probes_every_path_at_once(autojump_clock: trio.abc.Clock) -> None:
    kernel = MockKernel()
    detector = SuspendDetector(read_boottime=kernel.boottime, read_monotonic=kernel.monotonic)
    world = AgentWorld(suspend_detector=detector)
    probes = probe_sends(world)
    async with running(world, within=60):
        first = session_of(await world.wait_attached(1))
        await trio.sleep(0.05)  # off the probe schedule
        kernel.suspend(5.0)
        await trio.sleep(detector.interval_s)
        noticed = world.agent.resumes[-1].at
        await trio.sleep(0.001)
        at_resume = {src for t, src in probes if t == noticed}
        assert at_resume == {client_addr(i) for i in (1, 2, 3)}
        assert world.agent.sessions_started == 1 and session_of(await world.wait_attached(1)) == first


# -- an operator's disconnect and reconnect -------------------------------------------------------


async def test_disconnect_holds_the_agent_and_reconnect_starts_a_session_logged_with_who_asked(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = AgentWorld()
    async with running(world, within=120):
        first = session_of(await world.wait_attached(1))
        assert world.agent.disconnect_nowait("uid 1000") is True
        await world.agent.status.wait_value(lambda s: s is not None and s.snapshot is None)
        # Held: however long it waits, no handshake leaves and no session starts.
        inits = handshake_inits(world)
        await trio.sleep(world.policy.reconnect_max_ms / 1000.0 * 3)
        assert inits == [] and world.agent.held and world.agent.sessions_started == 1
        ended = [e for e in world.client_events if e.session == first.hex][-2:]
        assert [(e.kind, e.reason, e.detail("by")) for e in ended] == [
            (EventKind.OPERATOR_ACTION, ReasonCode.OPERATOR_DISCONNECT, "uid 1000"),
            (EventKind.STATE_CHANGE, ReasonCode.LOCAL_CLOSE, None),
        ]
        asked_at = trio.current_time()
        assert world.agent.reconnect_nowait("uid 0") is False  # no live session to close
        second = session_of(await world.wait_attached(2))
        assert inits and inits[0][0] <= asked_at + world.policy.reconnect_initial_ms / 1000.0
        born = [e for e in world.client_events if e.session == second.hex][:2]
        assert [(e.reason, e.detail("by")) for e in born] == [
            (ReasonCode.SESSION_CREATED, None),
            (ReasonCode.OPERATOR_RECONNECT, "uid 0"),
        ]
        await world.data_flows()
        # On a live session, reconnect closes it (logged) and the next one follows.
        assert world.agent.reconnect_nowait("uid 0") is True
        third = session_of(await world.wait_attached(3))
        closing = [e for e in world.client_events if e.session == second.hex][-2:]
        assert [e.reason for e in closing] == [ReasonCode.OPERATOR_RECONNECT, ReasonCode.LOCAL_CLOSE]
        assert third not in (first, second) and not world.agent_returned
    report = audit_events(world.client_events, policy=world.policy, role="client")
    assert report.ok, [str(v) for v in report.violations]
