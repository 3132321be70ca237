"""``jvpn-trio serve``: the gateway's composition root (listeners, TUN, control socket, events).

It only wires drivers together; every decision is the core's.  Resources are
acquired in one exit stack so that every way out (an error, Ctrl-C, SIGTERM)
removes the TUN and the control socket again.
"""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from jvpn_trio.commands.process import (
    EVENT_SINK_CAPACITY,
    AppError,
    address_family,
    close_on_signals,
    missing_privilege,
)
from jvpn_trio.config import GatewayConfig
from jvpn_trio.core.noise import StaticKeypair
from jvpn_trio.drivers import control, event_sink, forwarding, routes, tun, udp
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.recording import open_recorder
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.keyfile import load_private_key, load_public_key_text
from jvpn_trio.ui.lines import print_events
from jvpn_trio.ui.status import gateway_status


async def serve_gateway(config: GatewayConfig, *, record: Path | None = None, quiet: bool = False) -> int:
    problem = missing_privilege()
    if problem:
        raise AppError(problem)
    static = StaticKeypair(load_private_key(config.private_key_file))
    peers = [
        GatewayPeer(name=p.name, public=load_public_key_text(p.public_key), address=p.address, address6=p.address6)
        for p in config.peers
    ]
    async with AsyncExitStack() as stack:
        sink = await stack.enter_async_context(
            event_sink.open_event_sink(config.events_file, capacity=EVENT_SINK_CAPACITY)
        )
        recorder = await stack.enter_async_context(open_recorder(record))
        runtime = GatewayRuntime(
            policy=config.policy,
            static=static,
            peers=peers,
            tunnel=config.tunnel_address,
            store=MemoryOwnershipStore(),
            node_id=config.node_id,
            emit=sink.emit,
            recorder=recorder,
            tunnel6=config.tunnel_address6,
        )
        ports, control_ports = [], []
        for addr, control_addr in zip(config.listen, config.control_listen, strict=True):
            family = address_family(addr[0])
            ports.append(await stack.enter_async_context(udp.open_listener_socket(addr, family=family, gro=False)))
            control_ports.append(await stack.enter_async_context(udp.open_listener_socket(control_addr, family=family)))
        device = await stack.enter_async_context(
            tun.open_tun(
                config.tun_name,
                address=str(config.tunnel_address.ip),
                prefixlen=config.tunnel_address.network.prefixlen,
                mtu=config.mtu,
            )
        )
        # The gateway's nft table: TCP SYNs through the tunnel get an MSS the tunnel carries (docs/mtu.md).
        await stack.enter_async_context(
            forwarding.open_gateway_table(forwarding.GatewayTable(tun_name=config.tun_name, mtu=config.mtu))
        )
        if config.tunnel_address6 is not None:  # the tunnel carries IPv6 too: the TUN gets its IPv6 address
            address6 = config.tunnel_address6
            try:
                await routes.set_tun_address(config.tun_name, str(address6.ip), address6.network.prefixlen, config.mtu)
            except routes.RouteError as exc:
                raise AppError(f"cannot give {config.tun_name} the address {address6}: {exc}") from None

        async def status(_request: dict[str, Any]) -> dict[str, Any]:
            value = runtime.status.value
            snapshots = [s for s, _, _ in value.sessions] if value else []
            # Counters still at zero are left out: the report lists what happened.
            return gateway_status(snapshots, node_id=config.node_id, statistics=runtime.statistics())

        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: control.serve_control(
                    config.control_socket, control.command_handler({"status": status}), task_status=task_status
                )
            )
            nursery.start_soon(close_on_signals, nursery.cancel_scope.cancel, nursery.cancel_scope)
            if not quiet:
                nursery.start_soon(print_events, sink, sys.stdout)
            await nursery.start(
                lambda task_status: runtime.serve(
                    ports, control_ports=control_ports, packets=device, task_status=task_status
                )
            )
            if not quiet:
                where = ", ".join(
                    f"{f'[{h}]' if ':' in h else h}:{p} (control {c})"
                    for (h, p), (_, c) in zip(config.listen, config.control_listen, strict=True)
                )
                tunnel = f"{config.tunnel_address}" + (f" {config.tunnel_address6}" if config.tunnel_address6 else "")
                print(f"jvpn-trio gateway {config.node_id} listening on {where}, tunnel {tunnel}", flush=True)
    return 0
