"""``jvpn-trio up``: the client's composition root (path sockets, routes, TUN, UI, control socket).

It only wires drivers together; every decision is the core's.  Resources are
acquired in nested async context managers so that every way out (an error,
Ctrl-C, SIGTERM, the session ending) removes the TUN, the routes and the
control socket again.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from jvpn_trio.commands.process import EVENT_SINK_CAPACITY, AppError, close_on_signals, missing_privilege
from jvpn_trio.config import DEFAULT_MTU, KIND_PRIORITY, ClientConfig
from jvpn_trio.core import events as ev
from jvpn_trio.core.noise import StaticKeypair
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers import control, event_sink, ifaces, netlink, routes, tun, udp
from jvpn_trio.drivers.client import ClientPath, ClientRuntime
from jvpn_trio.drivers.ports import PacketPort
from jvpn_trio.drivers.recording import open_recorder
from jvpn_trio.keyfile import load_private_key, load_public_key_text
from jvpn_trio.ui.app import run_console, use_tui
from jvpn_trio.ui.status import client_status, statistics_counters

#: Routing tables: the tunnel's, then one per path after it.
TUNNEL_TABLE = 51820
#: Prefix of the routing's counters in the status report.
ROUTES_COUNTER_PREFIX = "routes."


async def _client_paths(config: ClientConfig) -> list[tuple[str, str, int]]:
    """(interface, kind, priority) for each candidate: configured, or discovered."""
    if config.paths:
        out: list[tuple[str, str, int]] = []
        for i, p in enumerate(config.paths):
            kind: str = p.kind if p.kind is not None else await trio.to_thread.run_sync(ifaces.classify, p.interface)
            out.append((p.interface, kind, p.priority if p.priority is not None else KIND_PRIORITY[kind] + i))
        return out
    found = await ifaces.discover({config.tun_name})
    if not found:
        raise AppError("no usable network interface found (up, not loopback, with an IPv4 address)")
    return [(c.ifname, c.kind, KIND_PRIORITY[c.kind] + i) for i, c in enumerate(found)]


async def run_client(
    config: ClientConfig, *, record: Path | None = None, quiet: bool = False, no_tui: bool = False
) -> int:
    problem = missing_privilege()
    if problem:
        raise AppError(problem)
    static = StaticKeypair(load_private_key(config.private_key_file))
    gateway_public = load_public_key_text(config.gateway_public_key)
    candidates = await _client_paths(config)
    gateway_host = config.gateway[0]
    async with AsyncExitStack() as stack:
        sink = await stack.enter_async_context(
            event_sink.open_event_sink(config.events_file, capacity=EVENT_SINK_CAPACITY)
        )
        recorder = await stack.enter_async_context(open_recorder(record))
        # Listen first, then read: no link change can fall between the two (netlink.py).
        monitor = await stack.enter_async_context(netlink.open_link_monitor())
        link_states = await netlink.read_link_states()
        path_routes: list[routes.PathRoute] = []
        client_paths: list[ClientPath] = []
        for i, (ifname, kind, priority) in enumerate(candidates):
            fwmark = config.fwmark_base + i + 1
            path_routes.append(routes.PathRoute(ifname=ifname, table=TUNNEL_TABLE + i + 1, fwmark=fwmark))
            family = socket.AF_INET6 if ":" in config.gateway[0] else socket.AF_INET
            bind = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
            sock = await stack.enter_async_context(
                udp.open_path_socket(bind=bind, device=ifname, fwmark=fwmark, family=family, gro=False)
            )
            state = link_states.get(ifname)
            client_paths.append(
                ClientPath(
                    path=PathId(i + 1),
                    name=ifname,
                    kind=kind,
                    priority=priority,
                    port=sock,
                    gateway=config.gateway,
                    control=config.gateway_control,
                    link_up=bool(state and state.up),
                )
            )
        tunnel_routes = routes.TunnelRoutes(
            tun_name=config.tun_name, prefixes=tuple(str(p) for p in config.routes), table=TUNNEL_TABLE
        )
        routing = await stack.enter_async_context(
            routes.open_routing(
                tunnel=tunnel_routes,
                paths=path_routes,
                gateway_address=gateway_host,
                defer_tunnel=True,  # the TUN exists only once the handshake assigned its address
                best_effort=True,  # a path that is not routable yet is left to probing
            )
        )
        runtime = ClientRuntime(
            policy=config.policy,
            static=static,
            gateway_public=gateway_public,
            paths=client_paths,
            emit=sink.emit,
            recorder=recorder,
        )
        by_name = {p.name: p.path for p in client_paths}

        @asynccontextmanager
        async def tunnel(address: ipaddress.IPv4Interface) -> AsyncIterator[PacketPort]:
            async with tun.open_tun(
                config.tun_name, address=str(address.ip), prefixlen=address.network.prefixlen, mtu=DEFAULT_MTU
            ) as device, routing.open_tunnel_routes():
                yield device

        async def follow_links(monitor: netlink.LinkMonitor) -> None:
            async for item in monitor:
                if isinstance(item, netlink.LinkEvent) and item.ifname in by_name:
                    runtime.submit_nowait(ev.LinkChanged(path=by_name[item.ifname], up=item.up))
                    if item.up:  # the kernel deleted the path's route when the link went down
                        await routing.reinstall_path(item.ifname)
                elif isinstance(item, netlink.Resync):
                    states = await netlink.read_link_states()
                    for name, path in by_name.items():
                        state = states.get(name)
                        runtime.submit_nowait(ev.LinkChanged(path=path, up=bool(state and state.up)))

        async def status(_request: dict[str, Any]) -> dict[str, Any]:
            value = runtime.status.value
            if value is None:
                return {"role": "client", "state": "HANDSHAKING"}
            return client_status(
                value.snapshot,
                statistics=value.statistics,
                counters=statistics_counters(routing.statistics(), prefix=ROUTES_COUNTER_PREFIX),
            )

        reason = ReasonCode.LOCAL_CLOSE
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: control.serve_control(
                    config.control_socket, control.command_handler({"status": status}), task_status=task_status
                )
            )
            nursery.start_soon(follow_links, monitor)
            if not quiet:
                await nursery.start(
                    functools.partial(
                        run_console,
                        runtime,
                        sink,
                        gateway=f"{config.gateway[0]}:{config.gateway[1]}",
                        tui=use_tui(no_tui),
                    )
                )
            nursery.start_soon(
                close_on_signals, lambda: runtime.submit_nowait(ev.CloseRequested()), nursery.cancel_scope
            )
            reason = await runtime.run(packets=tunnel)
            nursery.cancel_scope.cancel()
    if not quiet:
        print(f"jvpn-trio: session ended: {reason.value}", file=sys.stderr)
    return 0 if reason is ReasonCode.LOCAL_CLOSE else 1
