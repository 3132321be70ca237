"""A stalled UI delays none of the supervisor's decisions (issue 4).

Both runtimes run on the in-memory network (as in
``tests/drivers/test_runtime_memory.py``) on the autojump mock clock.  Path 1
is blackholed one virtual second after the start; the client must fail over
to path 2.  The same run is repeated three ways:

1. without any UI (twice: the reference, and a check that it is reproducible);
2. with the live UI on a screen whose ``show`` awaits an Event that is
   never set (a renderer that blocks the frame loop for good);
3. with the real ``run_ui`` on a rich ``Console`` whose file's ``write``
   blocks its thread until the test lets it go: the first terminal write
   (entering the alternate screen) never returns during the run.

The decisions (every client STATE_CHANGE and TRANSPORT_SWITCH, with their
virtual times relative to the start of the run) must be identical in all
three.  In case 3 the test releases the terminal only after it has seen the
switch: had the UI written on the Trio thread, the event loop would have
been frozen inside ``write`` and the switch could never have been seen (the
write gives up after 30 real seconds and records that, failing the test).

Determinism rules: virtual time only, seeded keys, fixed wall time, no
sockets; every run is bounded by ``fail_after`` in virtual seconds.
"""

from __future__ import annotations

import io
import ipaddress
import random
import threading
from typing import Any

import trio
from rich.console import Console

from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.noise import generate_static
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.policy import Policy
from jvpn_trio.drivers.client import ClientPath, ClientRuntime
from jvpn_trio.drivers.event_sink import open_event_sink
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.memory import MemoryNetwork, MemoryPacketPort
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.ui.app import LiveUi, run_ui

GATEWAY = ("192.0.2.1", 51820)
GATEWAY_CONTROL = ("192.0.2.1", 51821)
TUNNEL = ipaddress.IPv4Interface("10.66.0.1/24")
#: Off the probe grid (multiples of probe_interval_ms), so no probe leaves at the very instant of the
#: fault: which of two things at the same virtual instant runs first is Trio's (randomised) choice.
FAULT_AFTER_S = 1.0125
OBSERVE_S = 3.0


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


async def run_world(ui: str, gate: threading.Event | None = None) -> tuple[list[tuple[float, str, str, Any]], Any]:
    """One run; returns the client's decisions as (t - start, kind, reason, to_state/to_path) and the UI object."""
    policy = Policy()
    rng = random.Random(7)

    def random_bytes(n: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(n))

    gw_static, cl_static = generate_static(random_bytes), generate_static(random_bytes)
    net = MemoryNetwork()
    emitted: list[EmitEvent] = []
    ui_object: Any = None
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

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                if ui == "stalled-screen":
                    ui_object = StalledScreen()
                    live = LiveUi(client, screen=ui_object, gateway="gw", events=sink.subscribe(64, name="ui"))
                    await nursery.start(live.run)
                elif ui == "blocked-terminal":
                    assert gate is not None
                    ui_object = BlockingTerminal(gate)
                    console = Console(file=ui_object, width=100, height=30, force_terminal=True, _environ={})
                    # nursery.start: the UI reports started even though its first write never returns.
                    await nursery.start(
                        lambda task_status: run_ui(client, gateway="gw", events=sink.subscribe(64, name="ui"),
                                                   console=console, keys=False, task_status=task_status)
                    )
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
                decisions = [
                    (round(e.t - start, 9), e.kind.value, e.reason.value, e.detail("to_state") or e.detail("to_path"))
                    for e in emitted
                    if e.role is Role.CLIENT and e.kind in (EventKind.STATE_CHANGE, EventKind.TRANSPORT_SWITCH)
                ]
                if gate is not None:
                    gate.set()  # only now, after the switch was seen, may the terminal write again
                nursery.cancel_scope.cancel()
    return decisions, ui_object


async def test_a_stalled_ui_delays_no_decision(autojump_clock: trio.abc.Clock) -> None:
    reference, _ = await run_world("none")
    again, _ = await run_world("none")
    assert again == reference  # the comparison below is meaningful: runs are reproducible
    switches = [d for d in reference if d[1] == "TRANSPORT_SWITCH"]
    assert len(switches) == 1 and switches[0][3] == "p2"
    assert FAULT_AFTER_S < switches[0][0] <= FAULT_AFTER_S + Policy().death_detection_bound_ms / 1000.0 + 0.1

    stalled, screen = await run_world("stalled-screen")
    assert screen.entered  # the UI really was stuck in its first frame
    assert stalled == reference

    gate = threading.Event()
    try:
        blocked, terminal = await run_world("blocked-terminal", gate)
    finally:
        gate.set()
    assert terminal.blocked.is_set() and not terminal.timed_out
    assert blocked == reference
