"""``jvpn-trio serve``: the gateway's composition root (listeners, TUN, control socket, events).

It only wires drivers together; every decision is the core's.  Resources are
acquired in one exit stack so that every way out (an error, Ctrl-C, SIGTERM)
removes the TUN, the control socket, the nft table and the forwarding sysctls
again (docs/gateway.md).  The first SIGINT/SIGTERM first sends every session
an authenticated CLOSE (bounded by :func:`close_grace_s`); a second one stops
at once.

As a systemd service (docs/service.md) it speaks ``sd_notify`` through
``drivers/systemd.py``: ``READY=1`` once it listens on every address with its
TUN, nft table and control socket in place, ``STATUS=`` with the number of
sessions, ``STOPPING=1`` at the first SIGINT/SIGTERM, ``WATCHDOG=1`` pings
when the unit sets ``WatchdogSec=``.
"""

from __future__ import annotations

import functools
import ipaddress
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
from jvpn_trio.core.mtu import Family
from jvpn_trio.core.noise import StaticKeypair
from jvpn_trio.core.policy import Policy
from jvpn_trio.drivers import control, event_sink, forwarding, metrics, routes, tun, udp
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime, GatewayStatus
from jvpn_trio.drivers.recording import open_recorder
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.drivers.systemd import Notifier, publish_status, serve_watchdog, watchdog_interval
from jvpn_trio.keyfile import load_private_key, load_public_key_text
from jvpn_trio.ui.lines import print_events
from jvpn_trio.ui.status import gateway_status


def close_grace_s(policy: Policy) -> float:
    """How long a stopping gateway waits for its sessions' CLOSEs before tearing down: one probe timeout.

    The CLOSEs leave as soon as the supervisor takes them (milliseconds); the bound only
    keeps a backlog from holding up a stop, and a session still open then is closed by the
    runtime's way out all the same.
    """
    return policy.probe_timeout_ms / 1000.0


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
        # With a metrics endpoint, the sink also counts what only events say (switches, security events).
        event_counts = metrics.EventCounts() if config.metrics_listen is not None else None
        sink = await stack.enter_async_context(
            event_sink.open_event_sink(
                config.events_file,
                capacity=EVENT_SINK_CAPACITY,
                also=event_counts.count if event_counts is not None else None,
            )
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
        # The gateway's nft table and sysctls: TCP SYNs through the tunnel get an MSS the tunnel carries
        # (docs/mtu.md); the tunnel is forwarded to the egress, masqueraded with nat (docs/gateway.md).
        subnets: dict[Family, ipaddress.IPv4Network | ipaddress.IPv6Network] = {
            Family.IPV4: config.tunnel_address.network
        }
        if config.tunnel_address6 is not None:
            subnets[Family.IPV6] = config.tunnel_address6.network
        plan = await forwarding.plan_forwarding(
            tun_name=config.tun_name, mtu=config.mtu, subnets=subnets, nat=config.nat, nat_egress=config.nat_egress
        )
        for note in plan.notes:
            stderr_line(note)
        await stack.enter_async_context(forwarding.open_forwarding(plan))
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
            if config.metrics_listen is not None:  # Prometheus scrapes it (docs/metrics.md)
                collector = metrics.GatewayCollector(runtime, sink=sink, events=event_counts)
                try:
                    await nursery.start(functools.partial(metrics.serve_metrics, config.metrics_listen, collector))
                except metrics.MetricsError as exc:
                    raise AppError(str(exc)) from None

            async def close_then_cancel() -> None:
                if runtime.close_all_nowait():
                    with trio.move_on_after(close_grace_s(config.policy)):
                        await runtime.status.wait_value(lambda value: value is None or not value.sessions)
                nursery.cancel_scope.cancel()

            def stop() -> None:
                """The first SIGINT/SIGTERM: CLOSE every session, then everything serve installed goes."""
                notifier.stopping()
                nursery.start_soon(close_then_cancel)

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
