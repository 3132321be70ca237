"""The client agent with two gateways over the in-memory network, on Trio's mock clock.

Gateway A (preferred) and B have their own static keys and addresses.  A killed gateway
stops as SIGKILL would (its ports blackholed first).  Virtual time only; every test is
bounded by fail_after in virtual seconds.
"""

from __future__ import annotations

import trio

from jvpn_trio.core import wire
from jvpn_trio.core.actions import EventKind
from jvpn_trio.core.noise import generate_static
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers.agent import ClientAgent, GatewayTarget
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.ports import Address
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from tests.drivers.test_agent import WALL_EPOCH_NS, AgentWorld, session_of
from tests.drivers.test_runtime_memory import GATEWAY, GATEWAY_CONTROL, TUNNEL, tap

GATEWAY_B = ("192.0.2.9", 51820)
GATEWAY_B_CONTROL = ("192.0.2.9", 51821)


class TwoGatewayWorld(AgentWorld):
    """AgentWorld's agent, remade with two gateways: A at GATEWAY (the world's key), B with a key of its own."""

    def __init__(self, *, cluster: bool = False) -> None:
        super().__init__()
        self.gw_b_static = generate_static(self.random_bytes)
        self.targets = (
            GatewayTarget(endpoint=GATEWAY, control=GATEWAY_CONTROL, public_key=self.gw_static.public),
            GatewayTarget(endpoint=GATEWAY_B, control=GATEWAY_B_CONTROL, public_key=self.gw_b_static.public),
        )
        self.agent = ClientAgent(
            policy=self.policy,
            static=self.cl_static,
            gateways=self.targets,
            paths=[self.client_path(i) for i in (1, 2, 3)],
            emit=self.client_events.append,
            packets=self.cl_packets,
            set_address=self._set_address,
            random_bytes=self.random_bytes,
            wall_time_ns=lambda: WALL_EPOCH_NS + int(trio.current_time() * 1e9),
            log=self.logs.append,
            cluster=cluster,
        )
        self.gateway_b: GatewayRuntime | None = None

    async def start_gateway_b(self, nursery: trio.Nursery) -> GatewayRuntime:
        gateway = GatewayRuntime(
            policy=self.policy,
            static=self.gw_b_static,
            peers=[GatewayPeer(name="laptop", public=self.cl_static.public)],
            tunnel=TUNNEL,
            store=MemoryOwnershipStore(),
            node_id="gw-b",
            emit=self.gateway_events.append,
            random_bytes=self.random_bytes,
        )
        data, control = self.net.port(GATEWAY_B), self.net.port(GATEWAY_B_CONTROL)
        await nursery.start(
            lambda task_status: gateway.serve([data], control_ports=[control], packets=self.gw_packets, task_status=task_status)
        )
        self.gateway_b = gateway
        return gateway


def init_destinations(world: TwoGatewayWorld) -> list[tuple[float, Address]]:
    """(time, destination) of every HANDSHAKE_INIT the network carries."""
    return tap(world.net, wire.MessageType.HANDSHAKE_INIT, lambda _data, _src, dst: (trio.current_time(), dst))


async def test_gateway_a_killed_the_client_comes_back_through_b(autojump_clock: trio.abc.Clock) -> None:
    world = TwoGatewayWorld()
    inits = init_destinations(world)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await world.start_gateway(nursery)
            await world.start_gateway_b(nursery)
            await world.start_agent(nursery)
            first = session_of(await world.wait_attached(1))
            await world.data_flows()
            assert world.agent.gateway == "192.0.2.1:51820"
            assert {dst for _t, dst in inits} == {GATEWAY_CONTROL}  # the preferred one only, while it answers
            await world.kill_gateway()
            killed_at = trio.current_time()
            second = session_of(await world.wait_attached(2))
            await world.data_flows()
            took = trio.current_time() - killed_at
            nursery.cancel_scope.cancel()
    assert second != first
    assert world.agent.gateway == "192.0.2.9:51820"
    # A fresh handshake at B (docs/cluster.md): a new SessionID, whose BIRTH names the old one.
    birth = world.births()[-1]
    assert birth.session == second.hex and birth.detail("previous_session") == first.hex
    # The old session was closed by the agent once a rescue round to A went unanswered on every path.
    end = world.final_state_change(first)
    assert (end.detail("to_state"), end.reason) == ("TERMINATED", ReasonCode.LOCAL_CLOSE)
    assert [m.to_name for m in world.agent.gateway_choice.moves] == ["192.0.2.9:51820"]
    assert "gateway 192.0.2.1:51820 failed (no handshake answer on any path); next handshakes go to 192.0.2.9:51820" in world.logs
    # Every init after the move went to B; B's session is bound to B's endpoint.
    moved_at = world.agent.gateway_choice.moves[0].at
    assert {dst for t, dst in inits if t > moved_at} == {GATEWAY_B_CONTROL}
    bound = [
        e for e in world.client_events
        if e.session == second.hex and e.kind is EventKind.STATE_CHANGE and e.reason is ReasonCode.HANDSHAKE_COMPLETE
    ]  # fmt: skip
    assert bound and str(GATEWAY_B[0]) in str(bound[0].details)
    bound_policy = world.policy
    # Recovery window, one rescue round (one init per path), the back-off, then B answers at once.
    assert took <= (
        bound_policy.max_recovery_window_ms + 3 * bound_policy.handshake_retry_ms + 2 * bound_policy.reconnect_max_ms
    ) / 1000.0
    print(f"gateway A killed -> data through B: {took:.3f} s (virtual)")


async def test_a_round_unanswered_by_a_moves_on_and_b_is_kept_when_a_returns(autojump_clock: trio.abc.Clock) -> None:
    world = TwoGatewayWorld()
    inits = init_destinations(world)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await world.start_gateway_b(nursery)  # A never started: nothing answers there
            await world.start_agent(nursery)
            session_of(await world.wait_attached(1))
            assert world.agent.gateway == "192.0.2.9:51820"
            assert {dst for _t, dst in inits[:3]} == {GATEWAY_CONTROL}  # the first round went to A
            await world.start_gateway(nursery)  # A is back: B works, so the agent stays (no flapping)
            await trio.sleep(60)
            assert world.agent.sessions_started == 1
            assert world.agent.gateway == "192.0.2.9:51820"
            nursery.cancel_scope.cancel()
    assert len(world.agent.gateway_choice.moves) == 1
