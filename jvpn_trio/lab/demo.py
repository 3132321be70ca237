"""``jvpn-trio demo``: the whole system on loopback, without root and without a TUN device.

Theory of operation
-------------------
One process, one Trio run, real protocol end to end::

    MemoryPacketPort ─ ClientRuntime ─ path socket ─ Relay(eth0) ─┐
    (synthetic up/       (handshake,    path socket ─ Relay(wifi0) ─┼─ listener ─ GatewayRuntime ─ MemoryPacketPort
     down traffic)        probes,       path socket ─ Relay(lte0) ─┘             (sessions,      (synthetic traffic)
                          reattach)                                               binding)

- keys are generated in memory (``os.urandom``); the gateway knows the
  client's public key, the client the gateway's;
- the gateway listens on ``127.0.0.1:<ephemeral>``; each scenario path gets
  a client UDP socket on loopback and an impairment relay
  (``jvpn_trio/lab/relay.py``) in front of the gateway, so the gateway sees one
  endpoint per path, exactly as it would see one source address per
  interface;
- the **scenario driver** applies the steps of a scenario (``lab/scenarios/*.toml``)
  at their times: it sets the relay's impairment and, for ``link`` steps,
  also submits ``LinkChanged`` to the client runtime, as netlink would for a
  real interface (a blackhole keeps the link up and is found by probing);
- **synthetic traffic** flows both ways through ``MemoryPacketPort`` TUN
  doubles: well-formed IPv4/UDP packets at a modest steady rate, so the
  byte and packet counters move and delivery feeds path liveness;
- every event goes to one event sink (``--events FILE``: JSON lines); the
  demo's client serves a control socket in a temporary directory with the
  same ``status`` and steering commands as ``up`` (``serve_control``,
  ``steering_commands``), and the live UI or the plain lines (``--no-tui``
  or stdout not a terminal) attach to it with ``open_control_client``,
  exactly as bare ``jvpn-trio`` attaches to a running agent
  (``ui/attached.py``).  The demo runs one session: ``d`` (disconnect) ends
  it as ``q`` does, and ``c`` (reconnect) is refused;
- the end (``--duration``, ``q``, Ctrl-C or SIGTERM) is an explicit close:
  ``CloseRequested`` -> the client's TERMINATED (LOCAL_CLOSE) -> its CLOSE
  reaches the gateway -> the gateway's TERMINATED (PEER_CLOSE).  If the CLOSE
  cannot get through (no path), stopping the gateway closes its session
  explicitly too (LOCAL_CLOSE).  A second ``q``/Ctrl-C stops at once.

Time: :func:`run` runs Trio with :class:`DemoClock`, whose zero is the
start of the demo, so event times in the log and on screen are the
scenario's own timeline.  Exit code 0 when the session ended by the local
close, 1 otherwise; expected failures are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio
import trio_util

from jvpn_trio.config import ConfigError
from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.noise import generate_static
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers import control, udp
from jvpn_trio.drivers.client import ClientPath, ClientRuntime, HandshakeFailed
from jvpn_trio.drivers.event_sink import open_event_sink
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.memory import MemoryPacketPort
from jvpn_trio.lab.relay import Relay, describe_impairment, open_relay
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.drivers.udp import PathSocketError
from jvpn_trio.lab.scenario import Impairment, Scenario, Step, load_scenario, shipped_scenario
from jvpn_trio.ui.app import Screen, use_tui
from jvpn_trio.ui.lines import PlainPrinter
from jvpn_trio.ui.attached import AttachedPrinter, AttachedUi, run_attached
from jvpn_trio.ui.status import client_status

#: The scenario used without ``--scenario`` (a source checkout's examples directory).
DEFAULT_SCENARIO = shipped_scenario("demo")
#: The gateway's tunnel address; the client is handed the first free one (10.66.0.2).
GATEWAY_TUNNEL = ipaddress.IPv4Interface("10.66.0.1/24")
LOOPBACK = "127.0.0.1"
EVENT_SINK_CAPACITY = 4096
#: Synthetic traffic: small packets up, larger ones down (a call plus a download, scaled down).
UP_PACKETS_PER_S = 20
UP_PAYLOAD_BYTES = 160
DOWN_PACKETS_PER_S = 40
DOWN_PAYLOAD_BYTES = 1000
TRAFFIC_UDP_PORT = 5004
TRAFFIC_MAGIC = b"jvpn-demo"
#: After the client's close, how long the gateway may take to see its CLOSE (a few relay delays) before
#: it is stopped, which closes the session on its side explicitly (no CLOSE when no path was bound).
GATEWAY_CLOSE_WAIT_S = 0.5
#: Ends the run if the close itself never completes (e.g. the handshake never finished).
CLOSE_TIMEOUT_S = 5.0
#: At the end, how long the UI may take to show the last events (they come through the control socket).
UI_CATCH_UP_S = 1.0
EXIT_OK = 0
EXIT_SESSION_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class DemoClock(trio.abc.Clock):
    """Trio's clock with its zero at the start of the run (Trio's own adds a random offset).

    So ``trio.current_time()``, every core ``now`` and every event's ``t`` are
    seconds since the demo started, on the same scale as the scenario's steps.
    """

    def __init__(self) -> None:
        self._base = 0.0

    def start_clock(self) -> None:
        self._base = time.perf_counter()

    def current_time(self) -> float:
        return time.perf_counter() - self._base

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - self.current_time()


@attrs.frozen(kw_only=True)
class DemoOptions:
    scenario: Path | None = None
    duration_s: float | None = None
    tui: bool | None = None  # None: when stdout is a terminal
    events: Path | None = None
    short: bool = False
    seed: int = 1


@attrs.frozen(kw_only=True)
class DemoResult:
    reason: ReasonCode | None  # None: stopped at once before the session closed
    session: str | None
    switches: int
    states: tuple[str, ...]  # client states in the order first reached
    final: tuple[tuple[str, str], ...]  # (role, "STATE (REASON)") of each side's last state change
    duration_s: float

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.reason is ReasonCode.LOCAL_CLOSE else EXIT_SESSION_FAILED


# =============================================================================
# Synthetic traffic
# =============================================================================


def ipv4_checksum(header: bytes) -> int:
    """RFC 791 header checksum: the ones' complement of the ones' complement sum of 16-bit words."""
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp_packet(
    src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, *, sport: int, dport: int, ident: int, payload: bytes
) -> bytes:
    """A well-formed IPv4/UDP packet (DF set, TTL 64, UDP checksum 0 = none, as IPv4 allows)."""
    total = 20 + 8 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF, 0x4000, 64, 17, 0, src.packed, dst.packed)
    header = header[:10] + struct.pack("!H", ipv4_checksum(header)) + header[12:]
    return header + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _payload(seq: int, size: int) -> bytes:
    head = TRAFFIC_MAGIC + seq.to_bytes(8, "big")
    return head + bytes(max(0, size - len(head)))


async def _send_traffic(
    port: MemoryPacketPort,
    src: ipaddress.IPv4Address,
    dst: ipaddress.IPv4Address,
    *,
    packets_per_s: float,
    payload_bytes: int,
    sport: int,
) -> None:
    seq = 0
    async for _ in trio_util.periodic(1.0 / packets_per_s):
        seq += 1
        port.inject(
            ipv4_udp_packet(src, dst, sport=sport, dport=TRAFFIC_UDP_PORT, ident=seq, payload=_payload(seq, payload_bytes))
        )


async def _sink_traffic(port: MemoryPacketPort) -> None:
    async for _packet in port.delivered:
        pass  # the runtimes count bytes and packets; the demo only keeps the channel drained


# =============================================================================
# The scenario driver
# =============================================================================


class ScenarioDriver:
    """Applies a scenario's steps to the relays (and tells the client about link changes)."""

    def __init__(
        self,
        scenario: Scenario,
        relays: dict[str, Relay],
        client: ClientRuntime,
        path_ids: dict[str, PathId],
        *,
        origin: float,
        duration_s: float,
        printer: PlainPrinter | None = None,
    ) -> None:
        self.scenario = scenario
        self._relays = relays
        self._client = client
        self._path_ids = path_ids
        self._origin = origin
        self._duration_s = duration_s
        self._printer = printer
        self.conditions: dict[str, Impairment] = {p.name: p.baseline for p in scenario.paths}
        self._pending = [s for s in scenario.steps if s.at_s <= duration_s]
        self.last: Step | None = None

    def apply(self, step: Step) -> None:
        for path in step.targets(self.scenario.paths):
            before = self.conditions[path.name]
            after = before.apply(dict(step.changes), path.baseline)
            self.conditions[path.name] = after
            self._relays[path.name].set_impairment(after)
            if after.link_up != before.link_up:
                self._client.submit_nowait(ev.LinkChanged(path=self._path_ids[path.name], up=after.link_up))
        self.last = step
        if self._printer is not None:
            self._printer.note(trio.current_time(), "SCENARIO_STEP", step.describe())

    def apply_initial(self) -> None:
        """Steps at time 0, before the client starts (an unplugged cable is unplugged from the start)."""
        while self._pending and self._pending[0].at_s <= 0:
            self.apply(self._pending.pop(0))

    async def run(self) -> None:
        while self._pending:
            step = self._pending[0]
            await trio.sleep_until(self._origin + step.at_s)
            self.apply(self._pending.pop(0))

    def footer(self, elapsed_s: float) -> tuple[str, ...]:
        """Two lines for the UI: what each relay emulates now, and the timeline."""
        emulated = "emulated: " + "  ·  ".join(
            f"{name} {describe_impairment(imp)}" for name, imp in self.conditions.items()
        )
        timeline = f"scenario {self.scenario.name}: {elapsed_s:5.1f} / {self._duration_s:g} s"
        if self.last is not None:
            timeline += f"  ·  at {self.last.at_s:g} s: {self.last.note or self.last.describe()}"
        if self._pending:
            nxt = self._pending[0]
            timeline += f"  ·  next at {nxt.at_s:g} s: {nxt.note or nxt.describe()}"
        return (emulated, timeline)


# =============================================================================
# Composition
# =============================================================================


class _Tally:
    """Counts what the summary line needs, from the sink's ``also`` hook (cheap and total)."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.switches = 0
        self.session: str | None = None
        self.final: dict[str, str] = {}  # role -> "STATE (REASON)" of its last state change

    def observe(self, event: EmitEvent) -> None:
        if event.kind is EventKind.STATE_CHANGE:
            self.final[event.role.value] = f"{event.detail('to_state')} ({event.reason.value})"
        if event.role is not Role.CLIENT:
            return
        self.session = event.session
        if event.kind is EventKind.TRANSPORT_SWITCH:
            self.switches += 1
        elif event.kind is EventKind.STATE_CHANGE:
            state = event.detail("to_state")
            if isinstance(state, str) and state not in self.states:
                self.states.append(state)


class _Stopper:
    """Ends the demo: the first request closes the session explicitly; a second interactive one stops at once."""

    def __init__(self, client: ClientRuntime, force: trio.CancelScope) -> None:
        self._client = client
        self._force = force
        self.requested = False
        self.forced = False

    def request(self, *, interactive: bool = True, by: str = "") -> None:
        if self.requested:
            if interactive:
                self.forced = True
                self._force.cancel()
            return
        self.requested = True
        action = ReasonCode.OPERATOR_DISCONNECT if by else None
        self._client.submit_nowait(ev.CloseRequested(by=by, action=action))


class _DemoSteering:
    """What ``steering_commands`` steers in the demo: its one ClientRuntime (no agent, one session).

    ``disconnect`` ends the demo as ``q`` does (an explicit close); ``reconnect`` is refused.
    """

    def __init__(self, client: ClientRuntime, stopper: _Stopper) -> None:
        self._client = client
        self._stopper = stopper

    @property
    def paths(self) -> Mapping[PathId, ClientPath]:
        return self._client.paths

    def submit_nowait(self, event: Any) -> bool:
        return self._client.submit_nowait(event)

    def disconnect_nowait(self, by: str = "operator") -> bool:
        self._stopper.request(interactive=False, by=by)
        return True

    def reconnect_nowait(self, by: str = "operator") -> bool:
        raise control.ControlError("the demo runs one session: there is nothing to reconnect", code=control.ErrorCode.REFUSED)


def demo_status(client: ClientRuntime) -> dict[str, Any]:
    """The demo's ``status`` reply: what ``up`` answers (``client_status``) for its ClientRuntime."""
    value = client.status.value
    if value is None:
        return client_status(None, interfaces={p.path: (p.name, p.kind) for p in client.paths.values()})
    return client_status(
        value.snapshot,
        statistics=value.statistics,
        interfaces={path: (name, kind) for path, name, kind in value.paths},
        tunnel_address=value.tunnel_address,
        tunnel_address6=value.tunnel_address6,
    )


async def _stop_at(deadline: float, stopper: _Stopper) -> None:
    await trio.sleep_until(deadline)
    stopper.request(interactive=False)


async def _stop_on_signals(stopper: _Stopper) -> None:
    """SIGINT/SIGTERM: an explicit close; a second one stops at once (as ``up`` does)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals are delivered to the main thread only
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stopper.request()


async def run_demo(
    options: DemoOptions, *, stdout: TextIO | None = None, screen: Screen | None = None
) -> DemoResult:
    """Run the demo until it ends; see the module docstring.  Raises ScenarioError, HandshakeFailed.

    ``screen`` (with ``options.tui``) draws the live UI somewhere else than the
    terminal, e.g. a screen that keeps frames for docs/tui.md's picture.
    """
    stream = sys.stdout if stdout is None else stdout
    scenario = load_scenario(options.scenario or DEFAULT_SCENARIO)
    if options.short:
        scenario = scenario.short()
    duration = scenario.duration_s if options.duration_s is None else options.duration_s
    if not duration > 0:
        raise ConfigError(f"--duration must be positive, got {duration}")
    tui = use_tui(False, stream) if options.tui is None else options.tui
    origin = trio.current_time()
    policy = scenario.policy
    gateway_static = generate_static(os.urandom)
    client_static = generate_static(os.urandom)
    tally = _Tally()
    printer = None if tui else PlainPrinter(stream, origin=origin)
    result_reason: ReasonCode | None = None

    async with AsyncExitStack() as stack:
        socket_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jvpn-demo-")))
        socket_path = socket_dir / "control.sock"
        sink = await stack.enter_async_context(
            open_event_sink(options.events, capacity=EVENT_SINK_CAPACITY, also=tally.observe)
        )
        # The gateway's data and control listeners (the control one need not be data + 1 here:
        # the client is told each relay front explicitly through ClientPath.control).
        listener = await stack.enter_async_context(udp.open_listener_socket((LOOPBACK, 0)))
        control_listener = await stack.enter_async_context(udp.open_listener_socket((LOOPBACK, 0)))
        gateway_address = _host_port(listener.local_address)
        control_address = _host_port(control_listener.local_address)
        relays: dict[str, Relay] = {}
        client_paths: list[ClientPath] = []
        path_ids: dict[str, PathId] = {}
        for index, path in enumerate(scenario.paths):
            relay = await stack.enter_async_context(
                open_relay(
                    [gateway_address, control_address],
                    bind_host=LOOPBACK,
                    impairment=path.baseline,
                    seed=options.seed * 1000 + index,
                    name=path.name,
                )
            )
            sock = await stack.enter_async_context(udp.open_path_socket(bind=(LOOPBACK, 0), device=None, fwmark=None))
            data_front, control_front = (_host_port(a) for a in relay.front_addresses if a is not None)
            path_id = PathId(index + 1)
            relays[path.name] = relay
            path_ids[path.name] = path_id
            client_paths.append(
                ClientPath(
                    path=path_id,
                    name=path.name,
                    kind=path.kind,
                    priority=path.priority,
                    port=sock,
                    gateway=data_front,
                    control=control_front,
                )
            )
        gateway = GatewayRuntime(
            policy=policy,
            static=gateway_static,
            peers=[GatewayPeer(name="demo-laptop", public=client_static.public)],
            tunnel=GATEWAY_TUNNEL,
            store=MemoryOwnershipStore(),
            node_id="demo-gw",
            emit=sink.emit,
        )
        client_packets = MemoryPacketPort()
        assigned: list[ipaddress.IPv4Interface] = []
        address_known = trio.Event()

        async def set_address(address: ipaddress.IPv4Interface, _address6: ipaddress.IPv6Interface | None) -> None:
            assigned.append(address)
            address_known.set()

        client = ClientRuntime(
            policy=policy,
            static=client_static,
            gateway_public=gateway_static.public,
            paths=client_paths,
            emit=sink.emit,
            packets=client_packets,
            set_address=set_address,
        )
        driver = ScenarioDriver(
            scenario, relays, client, path_ids, origin=origin, duration_s=duration, printer=printer
        )
        gateway_packets = MemoryPacketPort()

        async def traffic() -> None:
            await address_known.wait()
            me, gw = assigned[0].ip, GATEWAY_TUNNEL.ip
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sink_traffic, client_packets)
                nursery.start_soon(_sink_traffic, gateway_packets)
                nursery.start_soon(
                    lambda: _send_traffic(
                        client_packets, me, gw, packets_per_s=UP_PACKETS_PER_S, payload_bytes=UP_PAYLOAD_BYTES, sport=40000
                    )
                )
                nursery.start_soon(
                    lambda: _send_traffic(
                        gateway_packets, gw, me, packets_per_s=DOWN_PACKETS_PER_S, payload_bytes=DOWN_PAYLOAD_BYTES,
                        sport=40001,
                    )
                )

        async with trio.open_nursery() as root:
            gateway_scope = trio.CancelScope()
            gateway_done = trio.Event()

            async def serve_gateway(task_status: trio.TaskStatus[GatewayRuntime] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    with gateway_scope:
                        await gateway.serve(
                            [listener], control_ports=[control_listener], packets=gateway_packets, task_status=task_status
                        )
                finally:
                    gateway_done.set()

            console_scope = trio.CancelScope()
            console_done = trio.Event()
            stopper = _Stopper(client, root.cancel_scope)
            control_scope = trio.CancelScope()
            control_done = trio.Event()

            async def serve_socket(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
                # The same commands as `up`'s socket; the demo's user owns it (mode 0600).
                handler = control.command_handler(
                    {"status": lambda _request: demo_status(client), **control.steering_commands(_DemoSteering(client, stopper))}
                )
                try:
                    with control_scope:
                        await control.serve_control(
                            socket_path, handler, events=sink, access=control.ControlAccess(group=None),
                            log=lambda _line: None, task_status=task_status,
                        )  # fmt: skip
                finally:
                    control_done.set()

            async def show(task_status: trio.TaskStatus[AttachedUi | AttachedPrinter] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    with console_scope:
                        await run_attached(
                            socket_path,
                            tui=tui,
                            gateway=f"{gateway_address[0]}:{gateway_address[1]}",
                            title=f"jvpn-trio demo · {scenario.name}",
                            origin=origin,
                            on_quit=stopper.request,
                            footer=driver.footer,
                            printer=printer,
                            stdout=stream,
                            screen=screen,
                            task_status=task_status,
                        )
                finally:
                    console_done.set()

            await root.start(serve_socket)
            shown = await root.start(show)
            await root.start(serve_gateway)
            driver.apply_initial()
            async with trio.open_nursery() as work:
                work.start_soon(driver.run)
                work.start_soon(traffic)
                work.start_soon(_stop_at, origin + duration, stopper)
                work.start_soon(_stop_on_signals, stopper)
                # The core ends an unbound session by itself; this only guards against a hang.
                with trio.fail_after(duration + policy.transport_loss_ttl_ms / 1000.0 + CLOSE_TIMEOUT_S):
                    result_reason = await client.run()
                with trio.move_on_after(GATEWAY_CLOSE_WAIT_S):
                    await gateway.status.wait_value(lambda s: s is not None and not s.sessions)
                work.cancel_scope.cancel()
            gateway_scope.cancel()
            await gateway_done.wait()
            # The UI gets its events through the socket: let it show the last ones, then end it first.
            last = sink.next_seq - 1
            with trio.move_on_after(UI_CATCH_UP_S):
                await shown.seen.wait_value(lambda seq: seq >= last)
            console_scope.cancel()
            await console_done.wait()
            control_scope.cancel()
            await control_done.wait()
        if stopper.forced:
            result_reason = None
    elapsed = trio.current_time() - origin
    result = DemoResult(
        reason=result_reason,
        session=tally.session,
        switches=tally.switches,
        states=tuple(tally.states),
        final=tuple(sorted(tally.final.items(), key=lambda item: item[0] != "client")),
        duration_s=elapsed,
    )
    _print_summary(result, stream)
    return result


def _host_port(address: Sequence[object]) -> tuple[str, int]:
    return (str(address[0]), int(address[1]))  # type: ignore[call-overload]


def _print_summary(result: DemoResult, stream: TextIO) -> None:
    """Two lines after the run (the live UI's screen is gone by then)."""
    ended = ", ".join(f"{role} {final}" for role, final in result.final) or "no session"
    if result.reason is None:
        ended += "; stopped at once before the session closed"
    plural = "" if result.switches == 1 else "es"
    lines = (
        f"jvpn-trio demo: session {(result.session or '?')[:8]} after {result.duration_s:.1f} s: {ended}",
        f"  {result.switches} transport switch{plural}; client states: {' '.join(result.states) or '-'}",
    )
    try:
        print("\n".join(lines), file=stream, flush=True)
    except (BrokenPipeError, OSError, ValueError):
        pass


# =============================================================================
# Command line
# =============================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` options, for a stand-alone parser or the ``jvpn-trio demo`` subcommand."""
    parser.add_argument("--scenario", type=Path, metavar="FILE", help="scenario TOML (default: the shipped demo scenario)")
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="end after this long (default: the scenario's)")
    parser.add_argument("--no-tui", action="store_true", help="plain event lines instead of the live UI")
    parser.add_argument("--events", type=Path, metavar="FILE", help="also write every event to FILE (JSON lines, appended)")
    parser.add_argument("--short", action="store_true", help="the scenario's short form (for CI)")


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    return DemoOptions(
        scenario=getattr(args, "scenario", None),
        duration_s=getattr(args, "duration", None),
        tui=False if getattr(args, "no_tui", False) else None,
        events=getattr(args, "events", None),
        short=bool(getattr(args, "short", False)),
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed arguments; returns the exit code.  Expected errors propagate (for cli.py)."""
    result = trio.run(run_demo, options_from_args(args), clock=DemoClock())
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jvpn_trio.lab.demo [options]``: the demo without the full CLI."""
    parser = argparse.ArgumentParser(prog="jvpn-trio demo", description="the no-root demo on loopback")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ConfigError, HandshakeFailed, PathSocketError) as exc:
        print(f"jvpn-trio: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("jvpn-trio: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
