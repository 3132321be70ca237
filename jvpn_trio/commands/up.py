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
rebind them (docs/paths.md); where NetworkManager runs, its ``Metered`` for a
path's interface may change the path's cost (``drivers/networkmanager.py``).
An interface absent at start is not an error:
its path appears when the interface does.  ``up`` exits on SIGINT/SIGTERM (the first closes the live
session explicitly, a second exits at once) or on a configuration or
privilege error at start; never because a session ended.  Resources are
acquired in nested async context managers so that every way out removes the
TUN, the routes, the DNS settings and the control socket again.

The kill switch (``drivers/killswitch.py``, with ``kill_switch = true``, the
default for a full tunnel) is installed *first*, before any route or the TUN,
so ``up`` fails closed, and removed *last*.  It is removed on every clean way
out (SIGINT/SIGTERM, ``jvpn-trio down`` through the control socket's ``down``
command, a failure at start); once the agent runs, a crash leaves it in place
until ``jvpn-trio down`` (docs/threat-model.md).  ``up`` refuses to start over
what a killed agent left behind (``drivers/leftovers.py``) and names ``down``;
with ``--take-over`` (the systemd unit's restart after a crash) it removes
those leftovers itself, once its own kill switch has replaced the dead one's.

As a systemd service (docs/service.md) ``up`` runs headless (plain event
lines) and speaks ``sd_notify`` through ``drivers/systemd.py``: ``READY=1``
once the kill switch, the TUN, its routes, DNS and the control socket are in
place and the agent runs (``--ready-when installed``, the default) or once
the first session is ATTACHED (``--ready-when attached``); ``STATUS=`` lines
follow the session (:func:`service_status_line`); ``STOPPING=1`` when a
SIGTERM or ``jvpn-trio down`` begins the shutdown; ``WATCHDOG=1`` pings when
the unit sets ``WatchdogSec=``.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import sys
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import attrs
import trio

from jvpn_trio.commands.process import (
    EVENT_SINK_CAPACITY,
    AppError,
    address_family,
    close_on_signals,
    missing_privilege,
)
from jvpn_trio.config import ClientConfig, control_endpoint
from jvpn_trio.core.agent import PathIds, PathIdsExhausted
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.mtu import Family, client_tun_mtu
from jvpn_trio.core.noise import StaticKeypair
from jvpn_trio.core.states import SessionState
from jvpn_trio.drivers import control, dns, event_sink, killswitch, routes, tun, udp
from jvpn_trio.drivers.agent import ClientAgent, GatewayTarget
from jvpn_trio.drivers.client import ClientPath, RuntimeStatus
from jvpn_trio.drivers.clock import SuspendDetector
from jvpn_trio.drivers.leftovers import Leftovers, find_leftovers, remove_leftovers
from jvpn_trio.drivers.logind import SleepSignals
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.core.candidates import DownReason, PathCost
from jvpn_trio.drivers.networkmanager import NetworkManagerCosts, cost_change
from jvpn_trio.drivers.paths import (
    PathAddressChanged,
    PathDown,
    PathForgotten,
    PathEvent,
    PathUp,
    open_path_manager,
)
from jvpn_trio.drivers.recording import open_recorder
from jvpn_trio.drivers.systemd import (
    Notifier,
    publish_status,
    serve_watchdog,
    under_systemd,
    watchdog_interval,
)
from jvpn_trio.keyfile import KeyFileError, load_private_key, load_public_key_text
from jvpn_trio.ui.lines import PRINTER_CAPACITY, PlainPrinter, use_tui
from jvpn_trio.ui.status import CONNECTING, client_status, statistics_counters

#: Routing tables: the tunnel's, then one per path after it.
TUNNEL_TABLE = 51820
#: Prefix of the routing's counters in the status report.
ROUTES_COUNTER_PREFIX = "routes."
#: Prefix of the path follower's counters (paths added, removed, readdressed, refused).
PATHS_COUNTER_PREFIX = "paths."
#: Prefix of the path manager's counters.
PATH_MANAGER_COUNTER_PREFIX = "path_manager."
#: The control command that makes the agent close its session and exit as on SIGTERM (``jvpn-trio down``).
DOWN_COMMAND = "down"
#: How long ``up`` waits for an agent that may already run to answer at the control socket.
RUNNING_PROBE_TIMEOUT_S = 1.0
#: At most this many leftovers are named in ``up``'s refusal (``down`` lists them all).
LEFTOVERS_SHOWN = 3
#: ``--ready-when``: systemd hears READY=1 once everything is in place and the agent runs...
READY_INSTALLED = "installed"
#: ... or once the first session is ATTACHED (docs/service.md says why the first is the default).
READY_ATTACHED = "attached"
READY_WHEN = (READY_INSTALLED, READY_ATTACHED)


def service_status_line(value: RuntimeStatus | None) -> str:
    """The agent's state in one line, for systemd's ``STATUS=`` (``systemctl status``).

    ``ATTACHED on p1 (eth0)``, ``RECOVERING, no path``, ``CONNECTING``: what
    changes only when the session's state or its path does, so the line is
    not re-sent for every probe.
    """
    if value is None or value.snapshot is None:
        after = f" (after {value.sessions_started} session(s))" if value is not None and value.sessions_started else ""
        return f"{CONNECTING}{after}"
    record = value.snapshot.record
    if record.binding is None:
        return f"{record.state.value}, no path"
    names = {path: name for path, name, _kind in value.paths}
    path = record.binding.path
    name = names.get(path)
    return f"{record.state.value} on {path}" + (f" ({name})" if name else "")


def wants_tui(no_tui: bool, *, environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """The live UI only on a terminal, without ``--no-tui`` and not as a systemd service (docs/service.md)."""
    return use_tui(no_tui or under_systemd(environ), stream)


def is_attached(value: RuntimeStatus | None) -> bool:
    """Whether the agent's live session is ATTACHED (``--ready-when attached``)."""
    return value is not None and value.snapshot is not None and value.snapshot.record.state is SessionState.ATTACHED


def dns_system(config: ClientConfig) -> dns.DnsSystem:
    """Where the DNS state of this client lives: beside its control socket (/run/jvpn-trio by default).

    ``up`` writes it and ``down`` reads it, so both must derive it the same way.
    """
    return dns.DnsSystem(state_dir=config.control_socket.parent)


async def refuse_leftovers(config: ClientConfig, *, take_over: bool = False) -> Leftovers | None:
    """Raise AppError naming ``jvpn-trio down`` if an agent runs or a killed one left something behind.

    With ``take_over`` what a killed one left is returned instead (None: nothing),
    for :func:`take_over_leftovers`; a running agent is refused all the same.
    """
    try:
        await control.query_control(config.control_socket, control.STATUS_REQUEST, timeout=RUNNING_PROBE_TIMEOUT_S)
    except control.ControlError:
        pass
    else:
        raise AppError(f"jvpn-trio is already running (control socket {config.control_socket}); `jvpn-trio down` stops it")
    found = await find_leftovers(config.tun_name)
    if take_over:
        return None if found.empty else found
    if not found.empty:
        lines = found.lines()
        more = f" and {len(lines) - LEFTOVERS_SHOWN} more" if len(lines) > LEFTOVERS_SHOWN else ""
        raise AppError(
            f"an earlier jvpn-trio left {', '.join(lines[:LEFTOVERS_SHOWN])}{more}: run `jvpn-trio down` first"
        )
    return None


async def take_over_leftovers(
    config: ClientConfig, kill_switch: killswitch.KillSwitch | None, *, log: Callable[[str], None]
) -> None:
    """Remove what a killed agent left (DNS, rules, routes, TUN), keeping the machine blocked.

    Called with this agent's kill switch installed: it replaced the dead one's
    table atomically.  ``remove_leftovers`` removes the table last, and it is
    installed again at once (one ``nft`` run later: milliseconds, the only
    moment the block is off; docs/service.md).  Raises what ``down`` would.
    """
    with trio.CancelScope(shield=True):
        reverted = await dns.revert_dns(system=dns_system(config), log=log)
        removed = await remove_leftovers(config.tun_name)
        if kill_switch is not None:
            await killswitch.install(kill_switch.spec)
    what = removed.lines() + ([f"DNS ({reverted.detail})"] if reverted is not None else [])
    log(f"took over after an earlier agent: removed {', '.join(what) or 'nothing'}")


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
        tun_address: routes.TunAddress | None = None,
        network_manager: NetworkManagerCosts | None = None,
    ) -> None:
        self._config = config
        self._agent = agent
        self._routing = routing
        self._log = log
        self._tun_address = tun_address
        self._network_manager = network_manager
        #: Each live path's cost inputs: its rule's ``metered`` and its kind's default (NM's opinion comes later).
        self._costs: dict[PathId, PathCost] = {}
        self._ids = PathIds(configured=[p.interface for p in config.paths])
        self._sockets: dict[PathId, AsyncExitStack] = {}
        #: Each live path's interface MTU: the TUN's MTU follows the smallest (docs/mtu.md).
        self._mtus: dict[PathId, int] = {}
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
                elif isinstance(event, PathForgotten):  # down already; now its interface is gone: free the id
                    self._ids.path_down(event.path_id, DownReason.INTERFACE_GONE)
                    if await self._routing.remove_path(event.ifname):  # kept since its link went down
                        self.counters["path_routes_removed_late"] += 1
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
                metered=event.metered,
            )
        )
        cost = self._costs[pid] = PathCost.of(self._config.path_rules, label=event.label, kind=event.kind)
        if self._network_manager is not None and cost.follows_network_manager:
            self._network_manager.watch_nowait(event.ifname)
        self.counters["paths_added"] += 1
        self._log(f"path {pid} up: {event.ifname} ({event.kind}) from {event.source_address} via {event.next_hop or 'on-link'}")
        mtu = await interface_mtu(event.ifname)
        if mtu is not None:
            self._mtus[pid] = mtu
            await self._follow_mtu()

    async def _down(self, event: PathDown) -> None:
        pid = self._ids.path_down(event.path_id, event.reason)
        if pid is None:
            return
        self._agent.remove_path(pid)  # queues PathRemoved before any later path can get the id
        self._costs.pop(pid, None)
        if self._network_manager is not None:
            self._network_manager.unwatch_nowait(event.ifname)
        stack = self._sockets.pop(pid, None)
        if stack is not None:
            await stack.aclose()
        if event.reason is DownReason.LINK_DOWN:
            # Its interface is still there, and so is its id.  Its socket is closed, so nothing
            # carries its mark; the table's route through the link is gone (admin down) or points
            # at a dead link (carrier lost), and its unreachable default keeps it failing closed
            # (routes.py).  All stays until the path is up again (add_path replaces it), the
            # interface goes (PathForgotten) or the agent exits.  Removing it now would run netlink
            # dumps in a worker thread, competing for the GIL with the failover this event started.
            self.counters["path_routes_kept"] += 1
        else:
            await self._routing.remove_path(event.ifname)
        self.counters["paths_removed"] += 1
        self._log(f"path {pid} down: {event.ifname} ({event.reason.value})")
        if self._mtus.pop(pid, None) is not None:
            await self._follow_mtu()

    async def _follow_mtu(self) -> None:
        """Set the TUN's MTU to what the smallest live path carries, unless ``[client].mtu`` fixes it."""
        if self._tun_address is None or self._config.mtu is not None or not self._mtus:
            return
        wanted = client_tun_mtu(None, self._mtus.values(), gateway_family(self._config), inner_ipv6=carries_ipv6(self._config))
        if wanted != self._tun_address.mtu and await self._tun_address.set_mtu(wanted):
            self.counters["tun_mtu_changes"] += 1
            self._log(f"tunnel MTU {wanted} (the smallest path carries {min(self._mtus.values())})")

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

    def network_manager_said(self, ifname: str, opinion: bool | None) -> None:
        """NetworkManager's ``Metered`` for ``ifname`` (None: no opinion): the agent hears of a new cost."""
        change = cost_change(self._agent.paths, self._costs, ifname, opinion)
        if change is None:
            return
        self._agent.submit_nowait(change)
        self.counters["cost_changes"] += 1
        self._log(
            f"path {change.path} ({ifname}) is {'metered' if change.metered else 'unmetered'} now (NetworkManager)"
        )

    async def aclose(self) -> None:
        """Close every path's socket (the routes go with the routing)."""
        stacks, self._sockets = list(self._sockets.values()), {}
        for stack in stacks:
            await stack.aclose()


def gateway_targets(config: ClientConfig) -> list[GatewayTarget]:
    """The agent's gateways in order of preference; a bad public key is named by its gateway."""
    targets = []
    for g in config.gateway_entries:
        target = GatewayTarget(
            endpoint=g.endpoint, control=control_endpoint(g.endpoint, config.control_port_offset), public_key=b""
        )
        try:
            public = load_public_key_text(g.public_key)
        except KeyFileError as exc:
            raise KeyFileError(f"gateway {target.name}: {exc}") from None
        targets.append(attrs.evolve(target, public_key=public))
    return targets


def gateway_family(config: ClientConfig) -> Family:
    return Family(ipaddress.ip_address(config.gateway[0]).version)


def carries_ipv6(config: ClientConfig) -> bool:
    return any(r.version == 6 for r in config.routes)


async def interface_mtu(ifname: str) -> int | None:
    """The interface's MTU from sysfs; None if it is gone or unreadable (the path is then left out of the minimum)."""
    try:
        return int(await trio.Path(f"/sys/class/net/{ifname}/mtu").read_text())
    except (OSError, ValueError):
        return None


async def run_client(
    config: ClientConfig,
    *,
    record: Path | None = None,
    quiet: bool = False,
    no_tui: bool = False,
    suspend_detector: SuspendDetector | None = None,
    ready_when: str = READY_INSTALLED,
    take_over: bool = False,
    notifier: Notifier | None = None,
) -> int:
    """Run the client agent until SIGINT/SIGTERM; 0 then.  Raises AppError for what stops it at start.

    ``notifier`` (default: from ``$NOTIFY_SOCKET``) hears READY=1 at the
    moment ``ready_when`` names, STATUS= lines and STOPPING=1; under systemd
    the live UI is never used.
    """
    if ready_when not in READY_WHEN:
        raise AppError(f"--ready-when must be one of {', '.join(READY_WHEN)}, not {ready_when!r}")
    notifier = Notifier.from_environ(log=stderr_line) if notifier is None else notifier
    try:
        return await _run_client(
            config, record=record, quiet=quiet, tui=wants_tui(no_tui),
            suspend_detector=suspend_detector, ready_when=ready_when, take_over=take_over, notifier=notifier,
        )  # fmt: skip
    finally:
        notifier.close()


async def _run_client(
    config: ClientConfig,
    *,
    record: Path | None,
    quiet: bool,
    tui: bool,
    suspend_detector: SuspendDetector | None,
    ready_when: str,
    take_over: bool,
    notifier: Notifier,
) -> int:
    problem = missing_privilege()
    if problem:
        raise AppError(problem)
    static = StaticKeypair(load_private_key(config.private_key_file))
    gateways = gateway_targets(config)
    gateway_host = config.gateway[0]
    # A path's table routes the gateway's own address; with several hosts (IPv4 only, config.py) its default.
    routed_host = gateway_host if len({g.endpoint[0] for g in gateways}) == 1 else None
    leftovers = await refuse_leftovers(config, take_over=take_over)
    async with AsyncExitStack() as stack:
        sink = await stack.enter_async_context(
            event_sink.open_event_sink(config.events_file, capacity=EVENT_SINK_CAPACITY, limits=config.log_limits)
        )
        recorder = await stack.enter_async_context(open_recorder(record))
        # Fail closed: the block is in place before any route or the TUN, and goes last.
        kill_switch = (
            await stack.enter_async_context(
                killswitch.open_kill_switch(killswitch.KillSwitchSpec.from_config(config), log=stderr_line)
            )
            if config.kill_switch
            else None
        )
        if leftovers is not None:
            await take_over_leftovers(config, kill_switch, log=stderr_line)
        tunnel_routes = routes.TunnelRoutes(
            tun_name=config.tun_name, prefixes=tuple(str(p) for p in config.routes), table=TUNNEL_TABLE
        )
        routing = await stack.enter_async_context(
            routes.open_routing(
                tunnel=tunnel_routes,
                paths=(),  # paths come and go with the path manager
                gateway_address=routed_host,
                defer_tunnel=True,  # the TUN is created next
                best_effort=True,  # a path that is not routable yet is left to probing
            )
        )
        # The TUN and its routes live as long as the agent: between sessions the traffic they
        # capture is dropped (and counted), never sent around the tunnel.  The address comes
        # with each session's handshake.  The MTU starts from a standard path and follows the
        # paths that appear (docs/mtu.md), unless [client].mtu fixes it.
        mtu = client_tun_mtu(config.mtu, [], gateway_family(config), inner_ipv6=carries_ipv6(config))
        tun_address = routes.TunAddress(config.tun_name, mtu=mtu, log=stderr_line)
        device = await stack.enter_async_context(
            tun.open_tun(config.tun_name, address=None, prefixlen=0, mtu=mtu, vnet_hdr=config.tun_offload)
        )
        await stack.enter_async_context(routing.open_tunnel_routes())
        if config.dns:
            system = dns_system(config)
            await dns.apply_dns(
                config.tun_name, config.dns, config.dns_search, full_tunnel=config.full_tunnel, system=system,
                log=stderr_line,
            )  # fmt: skip
            stack.push_async_callback(_revert_dns, system)
        agent = ClientAgent(
            policy=config.policy,
            static=static,
            gateways=gateways,
            emit=sink.emit,
            packets=device,
            set_address=tun_address,
            recorder=recorder,
            suspend_detector=suspend_detector,
            sleep_signals=SleepSignals(log=stderr_line),
            cluster=config.cluster,
        )
        network_manager = NetworkManagerCosts(log=stderr_line)
        follower = PathFollower(
            config=config, agent=agent, routing=routing, log=stderr_line, tun_address=tun_address,
            network_manager=network_manager,
        )  # fmt: skip
        stack.push_async_callback(follower.aclose)
        manager, path_events = await stack.enter_async_context(
            open_path_manager(
                config.path_rules, gateway_host, lookup_mark=tunnel_routes.lookup_mark(config.fwmark_base)
            )
        )

        async def status(_request: dict[str, Any]) -> dict[str, Any]:
            value = agent.status.value
            if value is None:
                return {"role": "client", "session": None, "state": CONNECTING, "sessions_started": 0, "gateway": agent.gateway}
            return {"gateway": agent.gateway} | client_status(
                value.snapshot,
                statistics=value.statistics,
                counters={
                    **statistics_counters(device.statistics(), prefix=tun.STATUS_COUNTER_PREFIX),
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
                tunnel_address=value.tunnel_address,
                tunnel_address6=value.tunnel_address6,
                held=agent.held_reason,
            )  # fmt: skip

        def stop() -> None:
            """The first SIGINT/SIGTERM, or ``jvpn-trio down``: tell systemd, then CLOSE the live session."""
            notifier.stopping(f"closing ({service_status_line(agent.status.value)})")
            agent.close_nowait()

        def down(_request: dict[str, Any]) -> dict[str, Any]:
            stop()  # as the first SIGTERM: CLOSE the live session, then every resource goes
            return {"closing": True, "pid": os.getpid()}

        async def ready_when_attached() -> None:
            await agent.status.wait_value(is_attached)
            notifier.ready(service_status_line(agent.status.value))

        async with trio.open_nursery() as nursery:
            handler = control.command_handler(
                {"status": status, DOWN_COMMAND: down, **control.steering_commands(agent)}
            )
            access = control.ControlAccess(group=config.control_group, steer_group=config.control_steer_group)
            await nursery.start(
                functools.partial(control.serve_control, config.control_socket, handler, events=sink, access=access)
            )
            # NM's Metered, where it runs: paths queue their lookups, so nothing waits for the bus.
            nursery.start_soon(functools.partial(network_manager.serve, follower.network_manager_said))
            nursery.start_soon(follower.follow, path_events)
            if not quiet and tui:
                # The foreground UI is the attached UI, on the agent's own socket: one UI, one way in.
                # `q` ends the agent as the first Ctrl-C does; it comes back to exit code 0.
                nursery.start_soon(
                    functools.partial(
                        foreground_ui, config.control_socket, gateway=f"{config.gateway[0]}:{config.gateway[1]}", on_quit=stop
                    )
                )
            elif not quiet:  # the journal's lines: straight from the sink, whoever may use the socket
                printer = PlainPrinter(sys.stdout, origin=trio.current_time())
                nursery.start_soon(printer.run, sink.subscribe(PRINTER_CAPACITY, name="printer"))
            nursery.start_soon(close_on_signals, stop, nursery.cancel_scope)
            if kill_switch is not None:
                kill_switch.hold()  # running: from here a crash leaves the block for `jvpn-trio down`
            if notifier.enabled:
                nursery.start_soon(publish_status, notifier, agent.status, service_status_line)
                interval = watchdog_interval()
                if interval is not None:
                    nursery.start_soon(serve_watchdog, notifier, interval)
                if ready_when == READY_ATTACHED:
                    nursery.start_soon(ready_when_attached)
                else:  # kill switch, TUN, routes, DNS and control socket in place; the agent starts now
                    notifier.ready(service_status_line(agent.status.value))
            await agent.serve()
            notifier.stopping()  # also after the UI's quit; systemd ignores a repeat
            nursery.cancel_scope.cancel()
    if not quiet:
        print(f"jvpn-trio: stopped after {agent.sessions_started} session(s)", file=sys.stderr)
    return 0


async def foreground_ui(socket: Path, *, gateway: str, on_quit: Callable[[], object]) -> None:
    """``up``'s live UI: the attached UI on the agent's own socket; if it fails, the agent goes on without it."""
    # rich: only an agent that draws the live UI loads it (tests/test_import_weight.py)
    from jvpn_trio.ui.attached import run_attached

    try:
        await run_attached(socket, tui=True, gateway=gateway, on_quit=on_quit)
    except control.ControlError as exc:
        stderr_line(f"the live UI stopped: {exc}; the tunnel stays up (`jvpn-trio` attaches again)")


async def _revert_dns(system: dns.DnsSystem) -> None:
    """Give the machine its DNS back (shielded: it runs on every way out)."""
    with trio.CancelScope(shield=True):
        try:
            await dns.revert_dns(system=system, log=stderr_line)
        except dns.DnsError as exc:
            stderr_line(f"{exc}; `jvpn-trio down` tries again")
