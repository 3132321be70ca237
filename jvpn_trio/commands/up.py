"""``jvpn-trio up``: the client's composition root (path sockets, routes, TUN, UI, control socket).

It only wires drivers together; every decision is the core's.  ``up`` runs a
:class:`~jvpn_trio.drivers.agent.ClientAgent`, which keeps one session at a
time for as long as the process lives: the TUN and the tunnel routes are
opened once, here, and stay in place across sessions and while none exists
(the laptop's traffic never leaves the tunnel unprotected).  The paths follow
the machine: the path manager (``drivers/paths.py``) runs for the agent's
whole life, and :class:`PathFollower` turns each ``PathUp`` into a socket
pinned to the interface, a policy route via the next hop the event carries
and a path of the agent; ``PathDown`` and ``PathAddressChanged`` undo or
rebind them (docs/paths.md).  An interface absent at start is not an error:
its path appears when the interface does.  ``up`` exits on SIGINT/SIGTERM (the first closes the live
session explicitly, a second exits at once) or on a configuration or
privilege error at start; never because a session ended.  Resources are
acquired in nested async context managers so that every way out removes the
TUN, the routes and the control socket again.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Callable

import attrs
import trio

from jvpn_trio.commands.process import (
    EVENT_SINK_CAPACITY,
    AppError,
    address_family,
    close_on_signals,
    missing_privilege,
)
from jvpn_trio.config import DEFAULT_MTU, ClientConfig
from jvpn_trio.core.agent import PathIds, PathIdsExhausted
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.noise import StaticKeypair
from jvpn_trio.drivers import control, event_sink, routes, tun, udp
from jvpn_trio.drivers.agent import ClientAgent
from jvpn_trio.drivers.client import ClientPath
from jvpn_trio.drivers.clock import SuspendDetector
from jvpn_trio.drivers.logind import SleepSignals
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.drivers.paths import (
    PathAddressChanged,
    PathDown,
    PathEvent,
    PathUp,
    open_path_manager,
)
from jvpn_trio.drivers.recording import open_recorder
from jvpn_trio.keyfile import load_private_key, load_public_key_text
from jvpn_trio.ui.app import run_console, use_tui
from jvpn_trio.ui.status import CONNECTING, client_status, statistics_counters

#: Routing tables: the tunnel's, then one per path after it.
TUNNEL_TABLE = 51820
#: Prefix of the routing's counters in the status report.
ROUTES_COUNTER_PREFIX = "routes."
#: Prefix of the path follower's counters (paths added, removed, readdressed, refused).
PATHS_COUNTER_PREFIX = "paths."
#: Prefix of the path manager's counters.
PATH_MANAGER_COUNTER_PREFIX = "path_manager."


class PathFollower:
    """Follows the path manager: each usable interface gets a socket, a policy route and a place in the agent.

    One task (:meth:`follow`) owns every path's resources; a failure on one
    path (a socket or route the kernel refuses, an interface that vanished
    between the event and the call) is that path's news: counted in
    :attr:`counters`, logged, and the path is left out until the manager
    reports it again.  PathIds come from :class:`~jvpn_trio.core.agent.PathIds`:
    a path keeps its PathId for as long as its interface exists (the manager's
    id does too), across a link flap or a lost address, so status and event
    logs keep naming it the same; the id is freed only when the interface is
    gone (or no longer a candidate), after the agent has queued ``PathRemoved``.
    """

    def __init__(
        self,
        *,
        config: ClientConfig,
        agent: ClientAgent,
        routing: routes.Routing,
        log: Callable[[str], None],
    ) -> None:
        self._config = config
        self._agent = agent
        self._routing = routing
        self._log = log
        self._ids = PathIds(configured=[p.interface for p in config.paths])
        self._sockets: dict[PathId, AsyncExitStack] = {}
        self.counters: Counter[str] = Counter()

    def _route(self, pid: PathId, ifname: str, next_hop: str | None) -> routes.PathRoute:
        return routes.PathRoute.given(
            ifname, table=TUNNEL_TABLE + pid.value, fwmark=self._config.fwmark_base + pid.value, next_hop=next_hop
        )

    async def _open_socket(self, pid: PathId, ifname: str, source: str) -> tuple[AsyncExitStack, udp.PathSocket]:
        stack = AsyncExitStack()
        try:
            sock = await stack.enter_async_context(
                udp.open_path_socket(
                    bind=(source, 0),
                    device=ifname,
                    fwmark=self._config.fwmark_base + pid.value,
                    family=address_family(self._config.gateway[0]),
                    gro=False,
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        return stack, sock

    async def follow(self, events: trio.MemoryReceiveChannel[PathEvent]) -> None:
        """Apply the manager's events in order until the channel ends."""
        async for event in events:
            try:
                if isinstance(event, PathUp):
                    await self._up(event)
                elif isinstance(event, PathDown):
                    await self._down(event)
                elif isinstance(event, PathAddressChanged):
                    await self._readdressed(event)
            except (OSError, routes.RouteError, ValueError, PathIdsExhausted) as exc:
                self.counters["path_errors"] += 1
                self._log(f"path {event.ifname}: {exc}; left out until the path manager reports it again")

    async def _up(self, event: PathUp) -> None:
        known = self._ids.get(event.path_id)
        current = self._agent.paths.get(known) if known is not None else None
        if current is not None:  # live already: a change of address
            await self._rebind(current, event.ifname, event.source_address, event.next_hop)
            return
        pid = self._ids.allocate(event.path_id, name=event.ifname)
        try:
            stack, sock = await self._open_socket(pid, event.ifname, event.source_address)
        except BaseException:
            self._ids.free(event.path_id)
            raise
        self._sockets[pid] = stack
        await self._routing.add_path(self._route(pid, event.ifname, event.next_hop))
        self._agent.add_path(
            ClientPath(
                path=pid,
                name=event.ifname,
                kind=event.kind,
                priority=event.priority,
                port=sock,
                gateway=self._config.gateway,
                control=self._config.gateway_control,
            )
        )
        self.counters["paths_added"] += 1
        self._log(f"path {pid} up: {event.ifname} ({event.kind}) from {event.source_address} via {event.next_hop or 'on-link'}")

    async def _down(self, event: PathDown) -> None:
        pid = self._ids.path_down(event.path_id, event.reason)
        if pid is None:
            return
        self._agent.remove_path(pid)  # queues PathRemoved before any later path can get the id
        stack = self._sockets.pop(pid, None)
        if stack is not None:
            await stack.aclose()
        await self._routing.remove_path(event.ifname)
        self.counters["paths_removed"] += 1
        self._log(f"path {pid} down: {event.ifname} ({event.reason.value})")

    async def _readdressed(self, event: PathAddressChanged) -> None:
        pid = self._ids.get(event.path_id)
        current = self._agent.paths.get(pid) if pid is not None else None
        if current is not None:
            await self._rebind(current, event.ifname, event.source_address, event.next_hop)

    async def _rebind(self, current: ClientPath, ifname: str, source_address: str, next_hop: str | None) -> None:
        """Move a live path to a new socket on ``source_address`` and re-route it via ``next_hop``."""
        pid = current.path
        stack, sock = await self._open_socket(pid, ifname, source_address)
        old_stack = self._sockets.get(pid)
        self._sockets[pid] = stack
        self._agent.readdress_path(attrs.evolve(current, port=sock))
        if old_stack is not None:
            await old_stack.aclose()
        await self._routing.add_path(self._route(pid, ifname, next_hop))
        self.counters["paths_readdressed"] += 1
        self._log(f"path {pid} readdressed: {ifname} now {source_address} via {next_hop or 'on-link'}")

    async def aclose(self) -> None:
        """Close every path's socket (the routes go with the routing)."""
        stacks, self._sockets = list(self._sockets.values()), {}
        for stack in stacks:
            await stack.aclose()


async def run_client(
    config: ClientConfig,
    *,
    record: Path | None = None,
    quiet: bool = False,
    no_tui: bool = False,
    suspend_detector: SuspendDetector | None = None,
) -> int:
    """Run the client agent until SIGINT/SIGTERM; 0 then.  Raises AppError for what stops it at start."""
    problem = missing_privilege()
    if problem:
        raise AppError(problem)
    static = StaticKeypair(load_private_key(config.private_key_file))
    gateway_public = load_public_key_text(config.gateway_public_key)
    gateway_host = config.gateway[0]
    async with AsyncExitStack() as stack:
        sink = await stack.enter_async_context(
            event_sink.open_event_sink(config.events_file, capacity=EVENT_SINK_CAPACITY)
        )
        recorder = await stack.enter_async_context(open_recorder(record))
        tunnel_routes = routes.TunnelRoutes(
            tun_name=config.tun_name, prefixes=tuple(str(p) for p in config.routes), table=TUNNEL_TABLE
        )
        routing = await stack.enter_async_context(
            routes.open_routing(
                tunnel=tunnel_routes,
                paths=(),  # paths come and go with the path manager
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
            emit=sink.emit,
            packets=device,
            set_address=routes.TunAddress(config.tun_name, mtu=DEFAULT_MTU, log=stderr_line),
            recorder=recorder,
            suspend_detector=suspend_detector,
            sleep_signals=SleepSignals(log=stderr_line),
        )
        follower = PathFollower(config=config, agent=agent, routing=routing, log=stderr_line)
        stack.push_async_callback(follower.aclose)
        manager, path_events = await stack.enter_async_context(
            open_path_manager(config.path_rules, gateway_host)
        )

        async def status(_request: dict[str, Any]) -> dict[str, Any]:
            value = agent.status.value
            if value is None:
                return {"role": "client", "session": None, "state": CONNECTING, "sessions_started": 0}
            return client_status(
                value.snapshot,
                statistics=value.statistics,
                counters={
                    **statistics_counters(routing.statistics(), prefix=ROUTES_COUNTER_PREFIX),
                    **{f"{PATHS_COUNTER_PREFIX}{k}": v for k, v in sorted(follower.counters.items())},
                    **{
                        f"{PATH_MANAGER_COUNTER_PREFIX}{k}": v
                        for k, v in attrs.asdict(manager.statistics()).items()
                        if isinstance(v, int) and v  # last_error is text, not a count
                    },
                },
                sessions_started=value.sessions_started,
                interfaces={path: (name, kind) for path, name, kind in value.paths},
            )

        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: control.serve_control(
                    config.control_socket, control.command_handler({"status": status}), task_status=task_status
                )
            )
            nursery.start_soon(follower.follow, path_events)
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
