"""``jvpn-trio serve``: the gateway's composition root (listeners, TUN, control socket, events).

It only wires drivers together; every decision is the core's.  Resources are
acquired in one exit stack so that every way out (an error, Ctrl-C, SIGTERM)
removes the TUN and the control socket again.

As a systemd service (docs/service.md) it speaks ``sd_notify`` through
``drivers/systemd.py``: ``READY=1`` once it listens on every address with its
TUN, nft table and control socket in place, ``STATUS=`` with the number of
sessions, ``STOPPING=1`` at the first SIGINT/SIGTERM, ``WATCHDOG=1`` pings
when the unit sets ``WatchdogSec=``.
"""

from __future__ import annotations

import functools
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
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime, GatewayStatus
from jvpn_trio.drivers.recording import open_recorder
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.drivers.systemd import Notifier, publish_status, serve_watchdog, watchdog_interval
from jvpn_trio.keyfile import load_private_key, load_public_key_text
from jvpn_trio.ui.lines import print_events
from jvpn_trio.ui.status import gateway_status


def service_status_line(value: GatewayStatus | None, *, listening: str) -> str:
    """The gateway in one line, for systemd's ``STATUS=``: its sessions and where it listens."""
    sessions = len(value.sessions) if value is not None else 0
    return f"{sessions} session(s); listening on {listening}"


async def serve_gateway(
    config: GatewayConfig, *, record: Path | None = None, quiet: bool = False, notifier: Notifier | None = None
) -> int:
    """Run the gateway until SIGINT/SIGTERM; 0 then.  Raises AppError for what stops it at start.

    ``notifier`` (default: from ``$NOTIFY_SOCKET``) hears READY=1 once it serves, STATUS= and STOPPING=1.
    """
    notifier = Notifier.from_environ(log=stderr_line) if notifier is None else notifier
    try:
        return await _serve_gateway(config, record=record, quiet=quiet, notifier=notifier)
    finally:
        notifier.close()


async def _serve_gateway(config: GatewayConfig, *, record: Path | None, quiet: bool, notifier: Notifier) -> int:
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
            # Counters still at zero are left out: the report lists what happened.
            return gateway_status(
                value.peers if value else (),
                node_id=config.node_id,
                statistics=runtime.statistics(),
                tunnel_address=str(config.tunnel_address),
                tunnel_address6=str(config.tunnel_address6) if config.tunnel_address6 is not None else None,
            )

        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: control.serve_control(
                    config.control_socket, control.command_handler({"status": status}), task_status=task_status
                )
            )
            def stop() -> None:
                notifier.stopping()
                nursery.cancel_scope.cancel()

            nursery.start_soon(close_on_signals, stop, nursery.cancel_scope)
            if not quiet:
                nursery.start_soon(print_events, sink, sys.stdout)
            await nursery.start(
                lambda task_status: runtime.serve(
                    ports, control_ports=control_ports, packets=device, task_status=task_status
                )
            )
            where = ", ".join(
                f"{f'[{h}]' if ':' in h else h}:{p} (control {c})"
                for (h, p), (_, c) in zip(config.listen, config.control_listen, strict=True)
            )
            if notifier.enabled:  # listening, TUN and nft table in place, control socket up: ready
                notifier.ready(service_status_line(runtime.status.value, listening=where))
                nursery.start_soon(
                    publish_status, notifier, runtime.status,
                    functools.partial(service_status_line, listening=where),
                )  # fmt: skip
                interval = watchdog_interval()
                if interval is not None:
                    nursery.start_soon(serve_watchdog, notifier, interval)
            if not quiet:
                tunnel = f"{config.tunnel_address}" + (f" {config.tunnel_address6}" if config.tunnel_address6 else "")
                print(f"jvpn-trio gateway {config.node_id} listening on {where}, tunnel {tunnel}", flush=True)
    return 0
