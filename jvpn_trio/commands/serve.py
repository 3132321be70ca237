"""``jvpn-trio serve``: the gateway's composition root (listeners, TUN, control socket, events).

It only wires drivers together; every decision is the core's.  Resources are
acquired in one exit stack so that every way out (an error, Ctrl-C, SIGTERM)
removes the TUN, the control socket, the nft table and the forwarding sysctls
again (docs/gateway.md).  The first SIGINT/SIGTERM first sends every session
an authenticated CLOSE (bounded by :func:`close_grace_s`); a second one stops
at once.

Peers change without a restart: ``jvpn-trio reload`` (the control socket's
``reload``) or SIGHUP re-reads the config file and its ``peers_dir`` and hands
the new peer set to :meth:`GatewayRuntime.reload_peers` (docs/gateway.md,
"Peers").  A config that does not load changes nothing.

As a systemd service (docs/service.md) it speaks ``sd_notify`` through
``drivers/systemd.py``: ``READY=1`` once it listens on every address with its
TUN, nft table and control socket in place, ``STATUS=`` with the number of
sessions, ``STOPPING=1`` at the first SIGINT/SIGTERM, ``WATCHDOG=1`` pings
when the unit sets ``WatchdogSec=``.
"""

from __future__ import annotations

import functools
import ipaddress
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from jvpn_trio.commands.process import (
    EVENT_SINK_CAPACITY,
    AppError,
    address_family,
    close_on_signals,
    missing_privilege,
)
from jvpn_trio.config import ClusterConfig, ConfigError, GatewayConfig, PeerConfig, load_gateway_config
from jvpn_trio.core.mtu import Family
from jvpn_trio.core.noise import StaticKeypair
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.ownership import StoreError
from jvpn_trio.drivers import control, event_sink, forwarding, routes, tun, udp
from jvpn_trio.drivers.announce import AnnounceError, Announcer
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime, GatewayStatus
from jvpn_trio.drivers.recording import open_recorder
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore, OwnershipStore
from jvpn_trio.drivers.systemd import Notifier, publish_status, serve_watchdog, watchdog_interval
from jvpn_trio.keyfile import KeyFileError, load_private_key, load_public_key_text

if TYPE_CHECKING:
    from jvpn_trio.core.ownership import Lease
    from jvpn_trio.drivers.metrics import EventCounts, StoreCallTimes
    from jvpn_trio.drivers.store_etcd import StoreObserver

# What only some gateways run is imported where it runs (issue 16; tests/test_import_weight.py):
# the etcd store and httpx with ``[cluster] store = "etcd"``, the Prometheus endpoint with
# ``metrics_listen``, the plain event printer unless ``--quiet``, the status report on request.


def close_grace_s(policy: Policy) -> float:
    """How long a stopping gateway waits for its sessions' CLOSEs before tearing down: one probe timeout.

    The CLOSEs leave as soon as the supervisor takes them (milliseconds); the bound only
    keeps a backlog from holding up a stop, and a session still open then is closed by the
    runtime's way out all the same.
    """
    return policy.probe_timeout_ms / 1000.0


#: The control command that re-reads the peers (``jvpn-trio reload``).
RELOAD_COMMAND = "reload"
#: Prefix of the data ports' counters (all listeners summed) in the status report.
UDP_COUNTER_PREFIX = "udp."


def gateway_peers(peers: tuple[PeerConfig, ...]) -> list[GatewayPeer]:
    """The runtime's peers for the config's; raises KeyFileError for a public key that is not one."""
    return [
        GatewayPeer(name=p.name, public=load_public_key_text(p.public_key), address=p.address, address6=p.address6)
        for p in peers
    ]


def settings_needing_restart(running: GatewayConfig, loaded: GatewayConfig) -> list[str]:
    """The settings a reload read but cannot apply (anything but the peers), by name."""
    return sorted(
        field.name
        for field in attrs.fields(GatewayConfig)
        if field.name != "peers" and getattr(running, field.name) != getattr(loaded, field.name)
    )


class PeerReloader:
    """Re-reads the config's peers into a running gateway, one reload at a time."""

    def __init__(self, runtime: GatewayRuntime, config: GatewayConfig, path: Path | None) -> None:
        self._runtime = runtime
        self._running = config
        self._path = path
        self._lock = trio.Lock()

    async def reload(self) -> dict[str, Any]:
        """The changes made (``PeerChanges.to_dict`` plus ``restart_needed``); ControlError if nothing changed."""
        if self._path is None:
            raise control.ControlError("this gateway was started without a config file to re-read", code=control.ErrorCode.REFUSED)
        async with self._lock:
            try:
                loaded = load_gateway_config(self._path)
                peers = gateway_peers(loaded.peers)
                changes = await self._runtime.reload_peers(peers)
            except (ConfigError, KeyFileError, ValueError) as exc:
                raise control.ControlError(f"reload refused, nothing changed: {exc}", code=control.ErrorCode.BAD_REQUEST) from None
        return {**changes.to_dict(), "restart_needed": settings_needing_restart(self._running, loaded)}

    async def on_sighup(self) -> None:
        """SIGHUP (``systemctl reload``) reloads too; the outcome is one line on stderr."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                try:
                    result = await self.reload()
                except control.ControlError as exc:
                    stderr_line(str(exc))
                    continue
                stderr_line(describe_reload(result))


def describe_reload(result: dict[str, Any]) -> str:
    """A reload's outcome in one line."""
    parts = [f"{key} {', '.join(result[key])}" for key in ("added", "removed", "readdressed", "renamed") if result.get(key)]
    line = "peers reloaded: " + ("; ".join(parts) if parts else "no change")
    line += f"; {result.get('unchanged', 0)} unchanged; {result.get('sessions_closed', 0)} session(s) closed (PEER_REMOVED)"
    if result.get("restart_needed"):
        line += f"; changed but applied only by a restart: {', '.join(result['restart_needed'])}"
    return line


@asynccontextmanager
async def open_ownership_store(
    cluster: ClusterConfig, node_id: str, *, observer: StoreObserver | None = None
) -> AsyncIterator[OwnershipStore]:
    """The ``[cluster]`` store, started: in memory, or etcd with this gateway's lease kept alive.

    With etcd, ``node_id`` is registered under the lease first: a second live gateway with the
    same ``node_id`` stops at start (AppError), since ownership could not tell the two apart.

    etcd is tried once at start (each endpoint, each bounded by ``request_timeout_ms``); if no
    member grants the lease, AppError (exit 2) at once rather than a gateway that waits
    unserving: a service manager restarts it (docs/cluster.md, "Start").  The lease is revoked
    on the way out, so the sessions' records go with it.  ``observer`` hears how long each etcd
    call took (the metrics' ``StoreCallTimes.observe``); the memory store has nothing to time.
    """
    if cluster.store != "etcd":
        yield MemoryOwnershipStore()
        return
    from jvpn_trio.drivers.store_etcd import NodeIdInUse, open_etcd_ownership_store

    started = False
    try:
        async with open_etcd_ownership_store(
            cluster.etcd_endpoints,
            request_timeout_s=cluster.request_timeout_ms / 1000.0,
            lease_ttl_ms=cluster.lease_ttl_ms,
            lease_margin_s=cluster.lease_margin_ms / 1000.0,
            keepalive_interval_s=cluster.keepalive_interval_ms / 1000.0,
            prefix=cluster.key_prefix,
            node_id=node_id,
            observer=observer,
        ) as store:
            started = True
            yield store
    except NodeIdInUse as exc:
        if started:
            raise
        raise AppError(str(exc)) from None
    except StoreError as exc:
        if started:
            raise
        raise AppError(f"etcd not reachable at {', '.join(cluster.etcd_endpoints)}: {exc}") from None
    except ValueError as exc:  # the store's own check of the lease timings (config checks them first)
        if started:
            raise
        raise AppError(f"[cluster]: {exc}") from None


def etcd_lease(store: OwnershipStore, cluster: ClusterConfig) -> Lease | None:
    """The store's lease if it is etcd's (the only store with one); its module is loaded only then."""
    if cluster.store != "etcd":
        return None
    from jvpn_trio.drivers.store_etcd import EtcdOwnershipStore

    return store if isinstance(store, EtcdOwnershipStore) else None


def announce_problem(interface: str | None, plan: forwarding.ForwardingPlan) -> str | None:
    """Why ``announce_interface`` cannot work with this forwarding, or None.

    The kernel answers ARP for a proxy entry only on an interface with forwarding on, and the
    answers only help if the tunnel is forwarded there, routed (``nat = false``): masquerading
    hides the tunnel addresses the LAN would send to (docs/cluster.md, "Routing follows the owner").
    """
    if interface is None:
        return None
    egress = next((e for e in plan.table.egress if e.family is Family.IPV4), None)
    if egress is None or egress.ifname != interface:
        where = "no IPv4 egress" if egress is None else f"the IPv4 egress is {egress.ifname}"
        return (
            f"[cluster].announce_interface = {interface!r} must be the interface the tunnel is forwarded to "
            f"({where}; set [gateway].nat_egress = {interface!r})"
        )
    if egress.masquerade:
        return "[cluster].announce_interface needs [gateway].nat = false: masquerading hides the tunnel addresses it announces"
    return None


def service_status_line(value: GatewayStatus | None, *, listening: str) -> str:
    """The gateway in one line, for systemd's ``STATUS=``: its sessions and where it listens."""
    sessions = len(value.sessions) if value is not None else 0
    return f"{sessions} session(s); listening on {listening}"


async def serve_gateway(
    config: GatewayConfig,
    *,
    config_path: Path | None = None,
    record: Path | None = None,
    quiet: bool = False,
    notifier: Notifier | None = None,
) -> int:
    """Run the gateway until SIGINT/SIGTERM; 0 then.  Raises AppError for what stops it at start.

    ``config_path``: where a reload re-reads the peers (None: reload is refused).
    ``notifier`` (default: from ``$NOTIFY_SOCKET``) hears READY=1 once it serves, STATUS= and STOPPING=1.
    """
    notifier = Notifier.from_environ(log=stderr_line) if notifier is None else notifier
    try:
        return await _serve_gateway(config, config_path=config_path, record=record, quiet=quiet, notifier=notifier)
    finally:
        notifier.close()


async def _serve_gateway(
    config: GatewayConfig, *, config_path: Path | None, record: Path | None, quiet: bool, notifier: Notifier
) -> int:
    problem = missing_privilege()
    if problem:
        raise AppError(problem)
    static = StaticKeypair(load_private_key(config.private_key_file))
    peers = gateway_peers(config.peers)
    async with AsyncExitStack() as stack:
        # With a metrics endpoint, the sink also counts what only events say (switches, security events).
        # With etcd, the store's call latencies too.
        event_counts: EventCounts | None = None
        store_calls: StoreCallTimes | None = None
        if config.metrics_listen is not None:
            from jvpn_trio.drivers.metrics import EventCounts, StoreCallTimes

            event_counts = EventCounts()
            if config.cluster.store == "etcd":
                store_calls = StoreCallTimes()
        sink = await stack.enter_async_context(
            event_sink.open_event_sink(
                config.events_file,
                capacity=EVENT_SINK_CAPACITY,
                also=event_counts.count if event_counts is not None else None,
                limits=config.log_limits,
            )
        )
        recorder = await stack.enter_async_context(open_recorder(record))
        store = await stack.enter_async_context(
            open_ownership_store(
                config.cluster, config.node_id, observer=store_calls.observe if store_calls is not None else None
            )
        )
        announcer: Announcer | None = None
        if config.cluster.announce_interface is not None:  # return traffic follows the owner (docs/cluster.md)
            from jvpn_trio.drivers.announce import open_announcer

            try:
                announcer = await stack.enter_async_context(open_announcer(config.cluster.announce_interface))
            except AnnounceError as exc:
                raise AppError(f"[cluster].announce_interface: {exc}") from None
        runtime = GatewayRuntime(
            policy=config.policy,
            static=static,
            peers=peers,
            tunnel=config.tunnel_address,
            store=store,
            lease=etcd_lease(store, config.cluster),  # served only while proven
            handshake_limits=config.handshake,
            node_id=config.node_id,
            emit=sink.emit,
            recorder=recorder,
            tunnel6=config.tunnel_address6,
            announcer=announcer,
            store_calls_in_flight=config.cluster.store_calls_in_flight,
        )
        ports, control_ports = [], []
        for addr, control_addr in zip(config.listen, config.control_listen, strict=True):
            family = address_family(addr[0])
            # GRO: a client's GSO burst arrives as one receive (docs/benchmarks.md, "UDP GRO on the gateway").
            ports.append(await stack.enter_async_context(udp.open_listener_socket(addr, family=family, gro=True)))
            control_ports.append(await stack.enter_async_context(udp.open_listener_socket(control_addr, family=family)))
        device = await stack.enter_async_context(
            tun.open_tun(
                config.tun_name,
                address=str(config.tunnel_address.ip),
                prefixlen=config.tunnel_address.network.prefixlen,
                mtu=config.mtu,
                vnet_hdr=config.tun_offload,
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
        problem = announce_problem(config.cluster.announce_interface, plan)
        if problem is not None:
            raise AppError(problem)
        await stack.enter_async_context(forwarding.open_forwarding(plan))
        if config.tunnel_address6 is not None:  # the tunnel carries IPv6 too: the TUN gets its IPv6 address
            address6 = config.tunnel_address6
            try:
                await routes.set_tun_address(config.tun_name, str(address6.ip), address6.network.prefixlen, config.mtu)
            except routes.RouteError as exc:
                raise AppError(f"cannot give {config.tun_name} the address {address6}: {exc}") from None

        async def status(_request: dict[str, Any]) -> dict[str, Any]:
            # Every session taken afresh (the published status keeps an idle session's snapshot of
            # its last input); counters still at zero are left out: the report lists what happened.
            from jvpn_trio.ui.status import gateway_status, statistics_counters

            return gateway_status(
                runtime.peer_statuses(),
                node_id=config.node_id,
                statistics=runtime.statistics(),
                counters={
                    **statistics_counters(device.statistics(), prefix=tun.STATUS_COUNTER_PREFIX),
                    **statistics_counters(
                        udp.combined_statistics(port.statistics() for port in ports), prefix=UDP_COUNTER_PREFIX
                    ),
                },
                tunnel_address=str(config.tunnel_address),
                tunnel_address6=str(config.tunnel_address6) if config.tunnel_address6 is not None else None,
            )

        reloader = PeerReloader(runtime, config, config_path)

        async def reload(_request: dict[str, Any]) -> dict[str, Any]:
            return await reloader.reload()

        async with trio.open_nursery() as nursery:
            handler = control.command_handler({"status": status, RELOAD_COMMAND: reload})
            await nursery.start(
                lambda task_status: control.serve_control(config.control_socket, handler, task_status=task_status)
            )
            nursery.start_soon(reloader.on_sighup)
            if config.metrics_listen is not None:  # Prometheus scrapes it (docs/metrics.md)
                from jvpn_trio.drivers import metrics

                collector = metrics.GatewayCollector(runtime, sink=sink, events=event_counts, store_calls=store_calls)
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
                from jvpn_trio.ui.lines import PRINTER_CAPACITY, PlainPrinter

                printer = PlainPrinter(sys.stdout)  # times as the events carry them
                nursery.start_soon(printer.run, sink.subscribe(PRINTER_CAPACITY, name="printer"))
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
