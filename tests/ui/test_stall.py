"""A stalled attached UI delays none of the agent's decisions (issues 4 and 11).

Both runtimes run on the in-memory network (as in
``tests/drivers/test_runtime_memory.py``) on the autojump mock clock, and the
client serves the agent's control socket (``serve_control`` on a unix socket
in ``tmp_path``, with the event sink and a ``status`` handler, as the demo's
``serve_socket`` does).  Path 1 is blackholed one virtual second after the
start; the client must fail over to path 2.  The same run is repeated:

1. without any UI (twice, with and without the control socket: the
   reference, and a check that it is reproducible and that serving the
   socket changes nothing);
2. with ``run_attached`` on a screen whose ``show`` awaits an Event that is
   never set (a renderer that blocks the frame loop for good);
3. with ``run_attached`` drawing on the real :class:`LiveScreen` over a rich
   ``Console`` whose file's ``write`` blocks its thread until the test lets
   it go: the first terminal write (entering the alternate screen) never
   returns during the run;
4. with a raw socket client that says hello, subscribes to the events and
   then never reads a byte;
5. with all three at once.

The decisions (every client STATE_CHANGE and TRANSPORT_SWITCH, with their
virtual times relative to the start of the run) must be identical in all of
them.  In case 3 the test releases the terminal only after it has seen the
switch: had the UI written on the Trio thread, the event loop would have
been frozen inside ``write`` and the switch could never have been seen (the
write gives up after 30 real seconds and records that, failing the test).

Determinism rules: virtual time only, seeded keys, fixed wall time; every
run is bounded by ``fail_after`` in virtual seconds.  The unix sockets are
real but local: a sender's bytes are in the kernel before ``send`` returns,
so the autojump clock (threshold 0) only jumps when every task is really
waiting, and the control server's timeouts (virtual) are the defaults: a
UI that polls and subscribes never comes near them.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import random
import socket as stdlib_socket
import threading
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.noise import generate_static
from jvpn_trio.core.policy import Policy
from jvpn_trio.drivers import control
from jvpn_trio.drivers.client import ClientPath, ClientRuntime
from jvpn_trio.drivers.event_sink import open_event_sink
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.memory import MemoryNetwork, MemoryPacketPort
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.lab.demo import demo_status
from jvpn_trio.ui.app import LiveScreen
from jvpn_trio.ui.attached import AttachedUi, run_attached

GATEWAY = ("192.0.2.1", 51820)
GATEWAY_CONTROL = ("192.0.2.1", 51821)
TUNNEL = ipaddress.IPv4Interface("10.66.0.1/24")
#: Off the probe grid (multiples of probe_interval_ms), so no probe leaves at the very instant of the
#: fault: which of two things at the same virtual instant runs first is Trio's (randomised) choice.
FAULT_AFTER_S = 1.0125
OBSERVE_S = 3.0
#: What the stalled reader sends, then it never reads (its replies and the events pile up in the kernel).
SUBSCRIBE_AND_STALL = b'{"hello":1}\n{"v":1,"id":1,"cmd":"events"}\n'

STALLED_SCREEN = "stalled-screen"
BLOCKED_TERMINAL = "blocked-terminal"
STALLED_READER = "stalled-reader"


def client_addr(i: int) -> tuple[str, int]:
    return (f"198.51.100.{i}", 40000 + i)


class StalledScreen:
    """A renderer that never finishes its first frame."""

    def __init__(self) -> None:
        self.entered = False

    async def start(self) -> None:
        return None

    async def show(self, renderable: Any) -> None:
        self.entered = True
        await trio.Event().wait()

    async def stop(self) -> None:
        return None


class BlockingTerminal(io.StringIO):
    """A terminal whose writes block (in whatever thread makes them) until ``gate`` is set."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.blocked = threading.Event()
        self.timed_out = False

    def write(self, text: str) -> int:
        self.blocked.set()
        if not self.gate.wait(timeout=30):
            self.timed_out = True
        return super().write(text)

    def isatty(self) -> bool:
        return True


Decision = tuple[float, str, str, Any]


class World:
    """What one run saw: the client's decisions and the UIs' own witnesses."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.screen: StalledScreen | None = None
        self.terminal: BlockingTerminal | None = None
        self.uis: list[AttachedUi] = []
        self.control: control.ControlStatistics | None = None


async def run_world(
    socket_path: Path, uis: frozenset[str] = frozenset(), gate: threading.Event | None = None, *, serve: bool = True
) -> World:
    """One run: the agent's control socket at ``socket_path`` (unless not ``serve``) and the UIs named in ``uis``."""
    world = World()
    policy = Policy()
    rng = random.Random(7)

    def random_bytes(n: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(n))

    gw_static, cl_static = generate_static(random_bytes), generate_static(random_bytes)
    net = MemoryNetwork()
    emitted: list[EmitEvent] = []
    async with open_event_sink(None, capacity=4096, also=emitted.append) as sink:
        gateway = GatewayRuntime(
            policy=policy,
            static=gw_static,
            peers=[GatewayPeer(name="laptop", public=cl_static.public)],
            tunnel=TUNNEL,
            store=MemoryOwnershipStore(),
            node_id="gw-test",
            emit=sink.emit,
            random_bytes=random_bytes,
        )
        kinds = {1: "ethernet", 2: "wifi", 3: "lte"}
        cl_packets, gw_packets = MemoryPacketPort(), MemoryPacketPort()
        client = ClientRuntime(
            policy=policy,
            static=cl_static,
            gateway_public=gw_static.public,
            paths=[
                ClientPath(path=PathId(i), name=f"if{i}", kind=kinds[i], priority=10 * i,
                           port=net.port(client_addr(i)), gateway=GATEWAY)
                for i in (1, 2, 3)
            ],
            emit=sink.emit,
            packets=cl_packets,
            random_bytes=random_bytes,
            wall_time_ns=lambda: 1_700_000_000_000_000_000,
        )
        handler = control.command_handler({"status": lambda _request: demo_status(client)})
        stalled_reader: stdlib_socket.socket | None = None

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                server: control.ControlServer | None = None
                if serve:
                    server = await nursery.start(
                        functools.partial(
                            control.serve_control, socket_path, handler, events=sink,
                            access=control.ControlAccess(group=None), log=lambda _line: None,
                        )
                    )  # fmt: skip
                    assert trio.current_time() == start  # serving the socket costs no virtual time
                attach = functools.partial(run_attached, socket_path, tui=True, gateway="gw", keys=False)
                if STALLED_SCREEN in uis:
                    world.screen = StalledScreen()
                    world.uis.append(await nursery.start(functools.partial(attach, screen=world.screen)))
                if BLOCKED_TERMINAL in uis:
                    assert gate is not None
                    world.terminal = BlockingTerminal(gate)
                    console = Console(file=world.terminal, width=100, height=30, force_terminal=True, _environ={})
                    # nursery.start: the UI reports started even though its first write never returns.
                    world.uis.append(await nursery.start(functools.partial(attach, screen=LiveScreen(console))))
                if STALLED_READER in uis:
                    assert server is not None
                    stalled_reader = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
                    stalled_reader.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 1024)
                    stalled_reader.connect(str(socket_path))
                    stalled_reader.sendall(SUBSCRIBE_AND_STALL)
                await nursery.start(
                    lambda task_status: gateway.serve(
                        [net.port(GATEWAY)], control_ports=[net.port(GATEWAY_CONTROL)], packets=gw_packets,
                        task_status=task_status,
                    )
                )
                await nursery.start(lambda task_status: client.run(task_status=task_status))
                await trio.sleep_until(start + FAULT_AFTER_S)
                net.blocked.add(client_addr(1))
                await trio.sleep(OBSERVE_S)
                world.decisions = [
                    (round(e.t - start, 9), e.kind.value, e.reason.value, e.detail("to_state") or e.detail("to_path"))
                    for e in emitted
                    if e.role is Role.CLIENT and e.kind in (EventKind.STATE_CHANGE, EventKind.TRANSPORT_SWITCH)
                ]
                if server is not None:
                    world.control = server.statistics()
                if gate is not None:
                    gate.set()  # only now, after the switch was seen, may the terminal write again
                nursery.cancel_scope.cancel()
        if stalled_reader is not None:
            stalled_reader.close()
    return world


async def test_a_stalled_ui_delays_no_decision(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    reference = (await run_world(tmp_path / "none.sock", serve=False)).decisions
    again = await run_world(tmp_path / "idle.sock")
    assert again.decisions == reference  # reproducible, and the socket itself changes nothing
    assert again.control is not None and again.control.connections == 0
    switches = [d for d in reference if d[1] == "TRANSPORT_SWITCH"]
    assert len(switches) == 1 and switches[0][3] == "p2"
    assert FAULT_AFTER_S < switches[0][0] <= FAULT_AFTER_S + Policy().death_detection_bound_ms / 1000.0 + 0.1

    stalled = await run_world(tmp_path / "screen.sock", frozenset({STALLED_SCREEN}))
    assert stalled.screen is not None and stalled.screen.entered  # the UI really was stuck in its first frame
    assert stalled.uis[0].frames == 0
    assert stalled.decisions == reference

    gate = threading.Event()
    try:
        blocked = await run_world(tmp_path / "terminal.sock", frozenset({BLOCKED_TERMINAL}), gate)
    finally:
        gate.set()
    assert blocked.terminal is not None and blocked.terminal.blocked.is_set() and not blocked.terminal.timed_out
    assert blocked.uis[0].frames == 0  # not one frame got through the terminal during the run
    assert blocked.decisions == reference

    reader = await run_world(tmp_path / "reader.sock", frozenset({STALLED_READER}))
    assert reader.control is not None and reader.control.subscribers == 1  # subscribed, and never read
    assert reader.decisions == reference

    gate = threading.Event()
    try:
        everything = await run_world(
            tmp_path / "all.sock", frozenset({STALLED_SCREEN, BLOCKED_TERMINAL, STALLED_READER}), gate
        )
    finally:
        gate.set()
    assert everything.control is not None and everything.control.subscribers == 3
    assert everything.decisions == reference
