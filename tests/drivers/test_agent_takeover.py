"""Takeover in a cluster: gateway A killed, the session resumes at B with the same SessionID.

Two gateways share one ownership store (the in-memory one, shared as etcd would be); the laptop
has a configured tunnel address at both, and the agent is told they are a cluster.  A dies as
SIGKILL would; its lease ends ``LEASE_TTL_S`` later (``MemoryOwnershipStore.expire``), and only
then may B take the session over.  Virtual time only; every test bounded by fail_after.
"""

from __future__ import annotations

import ipaddress

import trio

from jvpn_trio.core.actions import EventKind
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.drivers.client import RuntimeStatus
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from tests.drivers.test_agent_gateways import (
    GATEWAY_B,
    GATEWAY_B_CONTROL,
    TwoGatewayWorld,
)
from tests.drivers.test_runtime_memory import TUNNEL

#: The laptop's configured address at both gateways: what lets its connections survive a takeover.
LAPTOP = ipaddress.IPv4Address("10.66.0.7")
#: When A's lease ends after its death (etcd's TTL in a real cluster).
LEASE_TTL_S = 10.0


class ClusterWorld(TwoGatewayWorld):
    def __init__(self, *, cluster: bool = True) -> None:
        super().__init__(cluster=cluster)
        self.store = MemoryOwnershipStore()

    def _gateway(self, static: object, node_id: str) -> GatewayRuntime:
        return GatewayRuntime(
            policy=self.policy,
            static=static,  # type: ignore[arg-type]
            peers=[GatewayPeer(name="laptop", public=self.cl_static.public, address=LAPTOP)],
            tunnel=TUNNEL,
            store=self.store,
            node_id=node_id,
            emit=self.gateway_events.append,
            random_bytes=self.random_bytes,
        )

    def new_gateway(self) -> GatewayRuntime:
        return self._gateway(self.gw_static, "gw-a")

    async def start_gateway_b(self, nursery: trio.Nursery) -> GatewayRuntime:
        gateway = self._gateway(self.gw_b_static, "gw-b")
        data, control = self.net.port(GATEWAY_B), self.net.port(GATEWAY_B_CONTROL)
        await nursery.start(
            lambda task_status: gateway.serve([data], control_ports=[control], packets=self.gw_packets, task_status=task_status)
        )
        self.gateway_b = gateway
        return gateway

    async def wait_bound_at_b(self) -> RuntimeStatus:
        def ready(status: RuntimeStatus | None) -> bool:
            return (
                status is not None
                and status.snapshot is not None
                and status.snapshot.record.state is SessionState.ATTACHED
                and self.agent.gateway == "192.0.2.9:51820"
            )

        await self.agent.status.wait_value(ready)
        status = self.agent.status.value
        assert status is not None
        return status


async def test_a_killed_gateways_session_resumes_at_b_with_its_id_and_address(autojump_clock: trio.abc.Clock) -> None:
    world = ClusterWorld()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await world.start_gateway(nursery)
            await world.start_gateway_b(nursery)
            await world.start_agent(nursery)
            first = await world.wait_attached(1)
            assert first.snapshot is not None
            session = first.snapshot.record.session_id
            version_at_a = first.snapshot.record.version
            await world.data_flows()
            owned = await world.store.read(session)
            assert owned is not None and owned.owner == "gw-a"
            await world.kill_gateway()
            killed_at = trio.current_time()
            await trio.sleep(LEASE_TTL_S)
            assert world.gateway_b is not None
            early = world.gateway_b.statistics()
            # While A's lease lived, B refused to take the session over (its claim lost to A's record).
            assert early.takeovers == 0 and early.handshake_claim_failed >= 1
            assert world.store.expire("gw-a") == 1
            status = await world.wait_bound_at_b()
            await world.data_flows()
            took = trio.current_time() - killed_at
            nursery.cancel_scope.cancel()
    assert status.snapshot is not None
    record = status.snapshot.record
    assert record.session_id == session  # Property 1: the same session, at another gateway
    assert record.version > version_at_a
    assert world.agent.sessions_started == 1 and len(world.births()) == 1  # never a new session
    assert world.addresses[-1].ip == LAPTOP and {a.ip for a in world.addresses} == {LAPTOP}
    assert world.gateway_b.statistics().takeovers == 1
    owned = await world.store.read(session)
    assert owned is not None and owned.owner == "gw-b"
    # The fencing epoch B showed the client (resume answer, REATTACH_ACK) is its claim's revision.
    assert status.snapshot.owner_epoch == owned.revision > 0
    # B's log begins the session with the takeover, at the client's version, naming the old owner.
    taken = [
        e for e in world.gateway_events
        if e.session == session.hex and e.kind is EventKind.STATE_CHANGE and e.reason is ReasonCode.SESSION_TAKEN_OVER
    ]  # fmt: skip
    assert len(taken) == 1 and taken[0].detail("previous_owner") == "gw-a"
    # The client reattached to B by the ordinary REATTACH (no other way to move a binding).
    confirmed = [
        e for e in world.client_events
        if e.session == session.hex and e.kind is EventKind.STATE_CHANGE and e.reason is ReasonCode.REATTACH_CONFIRMED
    ]  # fmt: skip
    assert confirmed and str(GATEWAY_B[0]) in str(confirmed[-1].details)
    assert any("resumed at gateway 192.0.2.9:51820" in line for line in world.logs)
    print(f"gateway A killed -> data through B on the same session: {took:.3f} s (virtual, lease {LEASE_TTL_S} s)")


async def test_without_cluster_the_agent_starts_a_new_session_as_before(autojump_clock: trio.abc.Clock) -> None:
    world = ClusterWorld(cluster=False)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await world.start_gateway(nursery)
            await world.start_gateway_b(nursery)
            await world.start_agent(nursery)
            first = await world.wait_attached(1)
            await world.kill_gateway()
            world.store.expire("gw-a")
            second = await world.wait_attached(2)
            nursery.cancel_scope.cancel()
    assert first.snapshot is not None and second.snapshot is not None
    assert second.snapshot.record.session_id != first.snapshot.record.session_id
    assert world.gateway_b is not None and world.gateway_b.statistics().takeovers == 0
