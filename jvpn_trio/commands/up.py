"""``jvpn-trio up``: the client's composition root (path sockets, routes, TUN, UI, control socket).

It only wires drivers together; every decision is the core's.  ``up`` runs a
:class:`~jvpn_trio.drivers.agent.ClientAgent`, which keeps one session at a
time for as long as the process lives: the path sockets, the TUN and the
tunnel routes are opened once, here, and stay in place across sessions and
while none exists (the laptop's traffic never leaves the tunnel
unprotected).  ``up`` exits on SIGINT/SIGTERM (the first closes the live
session explicitly, a second exits at once) or on a configuration or
privilege error at start; never because a session ended.  Resources are
acquired in nested async context managers so that every way out removes the
TUN, the routes and the control socket again.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Callable

import trio

from jvpn_trio.commands.process import EVENT_SINK_CAPACITY, AppError, close_on_signals, missing_privilege
from jvpn_trio.config import DEFAULT_MTU, KIND_PRIORITY, ClientConfig
from jvpn_trio.core import events as ev
from jvpn_trio.core.noise import StaticKeypair
from jvpn_trio.core.ids import PathId
from jvpn_trio.drivers import control, event_sink, ifaces, netlink, routes, tun, udp
from jvpn_trio.drivers.agent import ClientAgent
from jvpn_trio.drivers.client import ClientPath
from jvpn_trio.drivers.recording import open_recorder
from jvpn_trio.keyfile import load_private_key, load_public_key_text
from jvpn_trio.ui.app import run_console, use_tui
from jvpn_trio.ui.status import CONNECTING, client_status, statistics_counters

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


def _tun_address_setter(tun_name: str, log: Callable[[str], None]) -> Callable[[ipaddress.IPv4Interface], Any]:
    """An async callback giving the TUN a session's address, replacing the one it had.

    A refusal by the kernel is logged, not raised: the session still runs
    (packets to the old address simply go unanswered), and the agent lives on.
    """
    current: list[ipaddress.IPv4Interface] = []

    async def set_address(address: ipaddress.IPv4Interface) -> None:
        try:
            await routes.set_tun_address(tun_name, str(address.ip), address.network.prefixlen, DEFAULT_MTU)
            for old in current:
                if old != address:
                    await trio.to_thread.run_sync(_delete_address_sync, tun_name, old)
        except (routes.RouteError, OSError) as exc:
            log(f"cannot give {tun_name} the address {address}: {exc}")
            return
        current[:] = [address]

    return set_address


def _delete_address_sync(tun_name: str, address: ipaddress.IPv4Interface) -> None:
    """Remove ``address`` from ``tun_name`` (blocking: run it in a worker thread)."""
    from pyroute2 import NetlinkError

    with netlink.open_iproute(None) as ipr:
        found = ipr.link_lookup(ifname=tun_name)
        if not found:
            return
        try:
            ipr.addr("del", index=found[0], address=str(address.ip), prefixlen=address.network.prefixlen)
        except NetlinkError as exc:
            raise OSError(exc.code, f"netlink: {exc}") from exc


def _stderr_line(line: str) -> None:
    print(f"jvpn-trio: {line}", file=sys.stderr, flush=True)


async def run_client(
    config: ClientConfig, *, record: Path | None = None, quiet: bool = False, no_tui: bool = False
) -> int:
    """Run the client agent until SIGINT/SIGTERM; 0 then.  Raises AppError for what stops it at start."""
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
                defer_tunnel=True,  # the TUN is created next
                best_effort=True,  # a path that is not routable yet is left to probing
            )
        )
        # The TUN and its routes live as long as the agent: between sessions the traffic they
        # capture is dropped (and counted), never sent around the tunnel.  The address comes
        # with each session's handshake.
        device = await stack.enter_async_context(
            tun.open_tun(config.tun_name, address=None, prefixlen=0, mtu=DEFAULT_MTU)
        )
        await stack.enter_async_context(routing.open_tunnel_routes())
        agent = ClientAgent(
            policy=config.policy,
            static=static,
            gateway_public=gateway_public,
            paths=client_paths,
            emit=sink.emit,
            packets=device,
            set_address=_tun_address_setter(config.tun_name, _stderr_line),
            recorder=recorder,
        )
        by_name = {p.name: p.path for p in client_paths}

        async def follow_links(monitor: netlink.LinkMonitor) -> None:
            async for item in monitor:
                if isinstance(item, netlink.LinkEvent) and item.ifname in by_name:
                    agent.submit_nowait(ev.LinkChanged(path=by_name[item.ifname], up=item.up))
                    if item.up:  # the kernel deleted the path's route when the link went down
                        await routing.reinstall_path(item.ifname)
                elif isinstance(item, netlink.Resync):
                    states = await netlink.read_link_states()
                    for name, path in by_name.items():
                        state = states.get(name)
                        agent.submit_nowait(ev.LinkChanged(path=path, up=bool(state and state.up)))

        async def status(_request: dict[str, Any]) -> dict[str, Any]:
            value = agent.status.value
            if value is None:
                return {"role": "client", "session": None, "state": CONNECTING, "sessions_started": 0}
            return client_status(
                value.snapshot,
                statistics=value.statistics,
                counters=statistics_counters(routing.statistics(), prefix=ROUTES_COUNTER_PREFIX),
                sessions_started=value.sessions_started,
            )

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
                        agent,
                        sink,
                        gateway=f"{config.gateway[0]}:{config.gateway[1]}",
                        tui=use_tui(no_tui),
                    )
                )
            nursery.start_soon(close_on_signals, agent.close_nowait, nursery.cancel_scope)
            await agent.serve()
            nursery.cancel_scope.cancel()
    if not quiet:
        print(f"jvpn-trio: stopped after {agent.sessions_started} session(s)", file=sys.stderr)
    return 0
