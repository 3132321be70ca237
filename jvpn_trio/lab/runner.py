"""``jvpn-trio lab``: a field scenario reproduced in network namespaces, measured and checked.

    jvpn-trio lab [--scenario FILE] [--short] [--json] [--keep] [--workdir DIR]
    python -m jvpn_trio.lab.runner ...                       (the same, without the CLI wrapper)

Theory of operation
-------------------
*The lab.*  One client namespace and one gateway namespace joined by one veth pair per
scenario path (``netns.open_lab``): the client end carries the path's name (``wifi0``), its
route metric is the path's priority, and the client's ``[[path]]`` list is in scenario order,
so path id ``p<i>`` is the scenario's i-th path.  A real ``jvpn-trio serve`` and ``jvpn-trio up``
run in them with TUN devices (``processes.py``), both recording their traces (``--record``).

*Conditions.*  A path's conditions are the scenario's :class:`~jvpn_trio.lab.scenario.Impairment`
(link, blackhole, loss, delay, jitter, rate).  ``conditions_at(0)`` -- the baselines plus every
step at ``at_s = 0`` -- are the *starting conditions*, installed before the session starts (so
"Ethernet unplugged" at 0 means the laptop starts undocked); every later step is a *fault*,
applied at ``t0 + at_s`` and reported.  A step is carried out as the difference between the
path's conditions before and after it: link with ``ip link`` (``netns.link_down``/``link_up``,
which re-adds the route the kernel deleted), blackhole and loss with nft on both ends (each
direction loses ``loss_pct`` independently), rate with a tbf qdisc on both ends, delay and
jitter with the in-path relay below.  All are per direction, as in the demo's relay.

*Delay and jitter: an in-path relay* (this kernel has no netem, ``docs/platform-notes.md``).
For each path that ever has a delay or a jitter, the lab process opens, per direction, an
``AF_PACKET`` tap on the *receiving* end of the veth pair and an ``AF_PACKET`` sender on the
*sending* end (each created inside its namespace with ``setns``).  A tap sees a frame before the
device's nft ingress hook runs; an nft rule in the lab's own ``jvrelay`` table (ingress,
priority -100, before netns's fault chains) then drops the original IPv4 frame, and the relay
re-sends a copy, marked with a locally administered source MAC so that its tap and nft let it
pass, ``delay_ms`` +- ``jitter_ms`` later (uniform, seeded, never reordering) from the sending
end with ``PACKET_QDISC_BYPASS``: the copy enters the receiver exactly as the original did, so
netns's loss and blackhole still apply to it (once), and the sender's tbf has already shaped
the original (once).  Both sockets use ``PACKET_VNET_HDR``: the data path batches with UDP GSO
and veth offloads checksums, so a tapped frame may be a 64 KB super-frame with a partial
checksum; the virtio header that comes with it says so, and re-sending frame and header
together gives the receiver exactly what the original would have (segmentation and checksum
included).  The copy differs from the original only in its source MAC.  Only IPv4 is delayed; ARP and IPv6 pass untouched.  When a path's delay and jitter are both 0 the drop
rule is removed and frames pass directly.

*A changing network.*  Steps that ``do`` something (``scenario.STEP_KINDS``) are carried out on
the lab and the processes: an interface appears (``netns.add_path``: veth pair, address,
default route, fault chains, then the path's baseline conditions) or is deleted
(``netns.delete_path``), an address is flushed or added (``netns.flush_address`` /
``add_address``), the gateway is killed with SIGKILL and started again from the same config
(``Tunnel.kill_gateway`` / ``start_gateway``; the killed process's event log and trace are moved
aside and audited and replayed on their own, since each process has its own clock), and the
laptop sleeps and wakes (``Tunnel.suspend_laptop`` / ``resume_laptop``: every process of the
client namespace stopped, then the clocks of both processes moved as the sleep's length says;
the processes run with ``--clock-offsets`` only in a scenario that sleeps).  A ``*``
step touches only the paths whose interface exists then.  The client's config lists every
scenario path by interface name from the start, including those that appear later.

*Traffic.*  A TCP stream (``traffic tcp-source``, paced, SHA-256 at both ends) and a 100 Hz UDP
probe stream run from the client namespace through the tunnel to the gateway's tunnel address,
starting :data:`WARMUP_S` before ``t0`` and ending :data:`TAIL_S` after the timeline.

*Clocks.*  Fault times and probe arrivals are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by
every process).  Event-log times ``t`` are the client's Trio clock: CLOCK_MONOTONIC plus a
random per-process offset.  The lab polls the client's control socket every
:data:`CLOCK_SAMPLE_S`; each reply's ``now_s`` is the client's last core call, made before the
reply left, so ``offset >= now_s - 0.0005 - monotonic_after_reply``; the largest such bound over
the run is the estimate (``processes.estimate_client_clock``); a simulated suspend moves the
client's clock by an amount the lab knows exactly, which the estimate takes out first and every
mapping adds back from its instant on (``ClientClock``).  The client calls its core every few
milliseconds (a probe per path every ``probe_interval_ms``), so the estimate is low by a few ms
at most, which makes detection and switch times conservative (slightly long), never short.

*The report*, per fault: detection (fault -> the client's first event naming a path the step
touched: PATH_HEALTH, a STATE_CHANGE or TRANSPORT_SWITCH on it, ...), switch (fault -> the
first TRANSPORT_SWITCH), the path chosen and its reason code, the tunnel outage (longest gap in
the probe stream from the fault to the next step) and the probes lost in that window.
Totals: switches, time in each state, invariant violations in both event logs
(``audit.py``), whether both traces replay identically (``replay.py``), and whether the TCP
stream arrived intact.  ``--json`` prints the document described in ``docs/lab-report.md``;
the text form is rendered from that same document.  Exit status: 0 all checks passed, 1 a
check failed (an invariant, the TCP stream, a replay, a process), 2 the lab cannot run as
asked, 130/143 interrupted (the lab is torn down first).

Every exit path tears the lab down: ``open_lab`` terminates every process and deletes the
namespaces in a shielded, bounded scope; Ctrl-C and SIGTERM become cancellation of the run.
``--keep`` leaves the namespaces (without processes) and prints how to remove them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import json
import math
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

import attrs
import trio

from jvpn_trio.errors import find_in_group
from jvpn_trio.tools.audit import AuditReport, audit_lines
from jvpn_trio.config import ConfigError
from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.health import Verdict
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.lab import soak
from jvpn_trio.lab.netns import Lab, LabError, LabPath, LabSpec, open_lab
from jvpn_trio.lab.processes import (
    GATEWAY_TUNNEL,
    ClientClock,
    ClockJump,
    ClockSample,
    GatewayRun,
    Tool,
    Tunnel,
    TunnelError,
    estimate_client_clock,
    sample_client_clock,
    start_tool,
    start_tunnel,
)
from jvpn_trio.tools.replay import INCOMPLETE as INCOMPLETE_STATUS
from jvpn_trio.tools.replay import OK as OK_STATUS
from jvpn_trio.tools.replay import ReplayResult, replay_lines
from jvpn_trio.lab.scenario import (
    ADD_ADDRESS,
    ADD_INTERFACE,
    DELETE_INTERFACE,
    FLUSH_ADDRESS,
    FREEZE_GATEWAY,
    GATEWAY_TARGET,
    KILL_GATEWAY,
    LAPTOP_TARGET,
    MACHINE_STEP_KINDS,
    RESUME,
    START_GATEWAY,
    SUSPEND,
    THAW_GATEWAY,
    Impairment,
    Scenario,
    Step,
    load_scenario,
    scenario_from_mapping,
)
from jvpn_trio.lab.traffic import longest_gap

PROG = "jvpn-trio lab"
REPORT_SCHEMA = "jvpn-trio/lab-report/1"

#: Traffic through the tunnel: a paced TCP stream and a probe stream (peers.md's outage measure).
TCP_RATE_MBIT = 2.0
PROBE_HZ = 100.0
TCP_PORT = 5001
PROBE_PORT = 5002
#: Traffic starts this long before the timeline's t0, and the probes run this long after its end.
WARMUP_S = 1.0
TAIL_S = 1.0
#: Bounds on the waits of a run.
ATTACH_TIMEOUT_S = 20.0
TOOL_START_TIMEOUT_S = 10.0
#: After the timeline, the TCP stream (which may have fallen behind during outages) must finish within this.
FINISH_TIMEOUT_S = 30.0
#: Extra lifetime given to the traffic tools beyond what the run needs (their own timeouts).
TOOL_MARGIN_S = 15.0
#: The client's control socket is sampled this often (clock offset; see the module docstring).
CLOCK_SAMPLE_S = 0.1
#: A restarted gateway must listen on its control socket within this.
GATEWAY_START_TIMEOUT_S = 10.0
#: The probe stream counts as interrupted after this long without an arrival (10 probes at 100 Hz):
#: well above scheduling noise, well below any outage a person notices.
INTERRUPTION_S = 0.1
#: Verdicts that a PATH_HEALTH event gives only after a probe on the path was answered.
ANSWERED_VERDICTS = (Verdict.HEALTHY.value, Verdict.IMPAIRED.value)
#: The two processes of a run, in report order (a killed gateway's audit and replay sit next to
#: theirs under ``GatewayRunData.key``).
SIDES = ("client", "gateway")

#: The relay: its nft table, the ingress priority (before netns's chains at 0), its MAC mark.
RELAY_NFT_TABLE = "jvrelay"
RELAY_PRIORITY = -100
RELAY_MAC = bytes.fromhex("026a76726c79")  # locally administered: 02:6a:76:72:6c:79 ("jvrly")
RELAY_QUEUE_FRAMES = 4096
RELAY_RECV_BYTES = 70_000  # a 64 KB GSO super-frame, its Ethernet and virtio headers
RELAY_RECV_BATCH = 64
RELAY_RCVBUF = 1 << 20
#: The report's times are rounded to this many decimals of a millisecond.
MS_DECIMALS = 1

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

#: When no --scenario is given: a tour of the three fault kinds on the active path.
BUILTIN_SCENARIO: dict[str, Any] = {
    "name": "tour",
    "description": "link down, blackhole and heavy loss on the active path (Ethernet), each restored",
    "duration_s": 18.0,
    "short_duration_s": 18.0,
    "policy": {"min_dwell_ms": 500, "return_dwell_ms": 1000, "max_switches_per_minute": 12},
    "step": [
        {"at_s": 1.5, "path": "eth0", "set": {"link": "down"}, "note": "cable pulled"},
        {"at_s": 3.5, "path": "eth0", "set": {"restore": True}, "note": "cable back"},
        {"at_s": 7.0, "path": "eth0", "set": {"blackhole": True}, "note": "upstream dead, link up"},
        {"at_s": 9.0, "path": "eth0", "set": {"restore": True}, "note": "upstream back"},
        {"at_s": 12.5, "path": "eth0", "set": {"loss_pct": 40.0}, "note": "heavy loss"},
        {"at_s": 14.5, "path": "eth0", "set": {"restore": True}, "note": "clean again"},
    ],
}


def builtin_scenario() -> Scenario:
    return scenario_from_mapping(BUILTIN_SCENARIO, source="(built-in tour)")


# =============================================================================
# The scenario in a lab
# =============================================================================


def lab_spec_for(scenario: Scenario, *, prefix: str | None = None) -> LabSpec:
    """One lab path per scenario path, in order: index i+1, route metric = priority.  LabError if unusable."""
    try:
        paths = [LabPath(name=p.name, kind=p.kind, metric=p.priority, index=i + 1) for i, p in enumerate(scenario.paths)]
        absent = frozenset(p.name for p in scenario.paths if not p.present)
        # mypy reads netns's ``converter=tuple`` as an unsolved generic: the call is fine at run time.
        if prefix is None:
            return LabSpec(paths=paths, absent=absent)  # type: ignore[arg-type]
        return LabSpec(prefix=prefix, paths=paths, absent=absent)  # type: ignore[arg-type]
    except ValueError as exc:
        raise LabError(f"scenario {scenario.name}: {exc}") from None


def relayed_paths(scenario: Scenario) -> list[str]:
    """Paths that ever need the in-path relay: a delay or a jitter at any time."""
    needs: set[str] = set()
    state = {p.name: p.baseline for p in scenario.paths}
    for name, cond in state.items():
        if cond.delay_ms > 0 or cond.jitter_ms > 0:
            needs.add(name)
    for step in scenario.steps:
        for p in step.targets(scenario.paths):
            state[p.name] = state[p.name].apply(dict(step.changes), p.baseline)
            if state[p.name].delay_ms > 0 or state[p.name].jitter_ms > 0:
                needs.add(p.name)
    return [p.name for p in scenario.paths if p.name in needs]


def describe_impairment(c: Impairment) -> str:
    parts = []
    if not c.link_up:
        parts.append("link down")
    if c.blackhole:
        parts.append("blackhole")
    if c.loss_pct:
        parts.append(f"{c.loss_pct:g}% loss")
    if c.delay_ms or c.jitter_ms:
        parts.append(f"{c.delay_ms:g} ms" + (f" ± {c.jitter_ms:g} ms" if c.jitter_ms else ""))
    if c.rate_mbit:
        parts.append(f"{c.rate_mbit:g} Mbit/s")
    return ", ".join(parts) or "clean"


def impairment_json(c: Impairment) -> dict[str, Any]:
    return attrs.asdict(c)


def changes_text(step: Step) -> str:
    if step.kind is not None:
        return step.what()
    return ", ".join("restore" if k == "restore" else f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in step.changes)


# =============================================================================
# Delay and jitter: the in-path relay (see the module docstring)
# =============================================================================

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
#: struct virtio_net_hdr, which PACKET_VNET_HDR puts before every frame: flags, gso_type, ...
VNET_HDR_BYTES = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
CLONE_NEWNET = 0x40000000
NETNS_DIRS = ("/run/netns", "/var/run/netns")
_ETH_IPV4 = b"\x08\x00"


def mark_frame(packet: bytes) -> bytes | None:
    """The copy the relay re-sends of a tapped ``virtio_net_hdr + Ethernet frame``, or None.

    Only IPv4 frames not already marked are relayed.  The copy's source MAC is
    :data:`RELAY_MAC`; of the header's flags only NEEDS_CSUM (with csum_start/offset, which
    the frame keeps) is meaningful when sending, so the receive-only DATA_VALID is cleared.
    GSO type and size go back as they came: the kernel segments where the original would be.
    """
    frame = packet[VNET_HDR_BYTES:]
    if len(packet) < VNET_HDR_BYTES or len(frame) < 34 or frame[12:14] != _ETH_IPV4 or frame[6:12] == RELAY_MAC:
        return None
    flags = packet[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM
    return bytes([flags]) + packet[1:VNET_HDR_BYTES] + frame[:6] + RELAY_MAC + frame[12:]


_libc: Any = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def socket_in_namespace(ns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """Create a socket inside network namespace ``ns`` (this thread returns to its own at once).

    Synchronous on purpose: no other task can run while this thread is in ``ns``.  A socket
    keeps the namespace it was created in.
    """
    target = next((os.path.join(d, ns) for d in NETNS_DIRS if os.path.exists(os.path.join(d, ns))), None)
    if target is None:
        raise LabError(f"namespace {ns} not found in {' or '.join(NETNS_DIRS)}")
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        other = os.open(target, os.O_RDONLY)
        try:
            _setns(other)
            try:
                return make()
            finally:
                _setns(own)  # if this fails the process is in the wrong namespace: let it crash loudly
        finally:
            os.close(other)
    finally:
        os.close(own)


def _capture_socket(device: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RELAY_RCVBUF)
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((device, ETH_P_ALL))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _inject_socket(device: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((device, 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@attrs.define
class _Lane:
    """One direction of one relayed path: tap on the receiving end, sender on the sending end."""

    name: str
    capture: socket.socket
    inject: socket.socket
    rng: random.Random
    delay_s: float = 0.0
    jitter_s: float = 0.0
    enabled: bool = False
    queue: deque[tuple[float, bytes]] = attrs.Factory(deque)
    last_due: float = 0.0
    wake: trio.Event = attrs.Factory(trio.Event)
    captured: int = 0
    relayed: int = 0
    dropped_queue_full: int = 0
    send_errors: dict[str, int] = attrs.Factory(dict)

    def push(self, frame: bytes, now: float) -> None:
        self.captured += 1
        if len(self.queue) >= RELAY_QUEUE_FRAMES:
            self.dropped_queue_full += 1
            return
        jitter = self.rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
        due = max(now + max(0.0, self.delay_s + jitter), self.last_due)  # jitter never reorders
        self.last_due = due
        self.queue.append((due, frame))
        self.wake.set()

    def statistics(self) -> dict[str, Any]:
        return {
            "captured": self.captured,
            "relayed": self.relayed,
            "queued": len(self.queue),
            "dropped_queue_full": self.dropped_queue_full,
            "send_errors": dict(self.send_errors),
        }


class WireRelay:
    """Delay and jitter on chosen lab paths; see :func:`open_wire_relay`."""

    def __init__(self, lab: Lab, names: Sequence[str], *, seed: int) -> None:
        self.lab = lab
        self.names = list(names)
        self.seed = seed
        self.lanes: dict[str, tuple[_Lane, _Lane]] = {}
        self._sockets: list[socket.socket] = []
        self.settings: dict[str, tuple[float, float]] = {name: (0.0, 0.0) for name in names}

    def _chain_script(self, device_of: Callable[[str], str]) -> str:
        lines = [f"table netdev {RELAY_NFT_TABLE} {{"]
        for name in self.names:
            lines += [
                f"  chain relay_{name} {{",
                f'    type filter hook ingress device "{device_of(name)}" priority {RELAY_PRIORITY}; policy accept;',
                "  }",
            ]
        return "\n".join(lines + ["}"]) + "\n"

    async def _nft_both(self, script: str) -> None:
        for ns in (self.lab.client_ns, self.lab.gateway_ns):
            await self.lab.run(ns, "nft", "-f", "-", stdin=script.encode())

    async def _setup(self) -> None:
        lab = self.lab
        await lab.run(lab.client_ns, "nft", "-f", "-", stdin=self._chain_script(lambda n: n).encode())
        await lab.run(lab.gateway_ns, "nft", "-f", "-", stdin=self._chain_script(lab.gateway_device).encode())
        for name in self.names:
            client_dev, gateway_dev = name, lab.gateway_device(name)
            up = _Lane(
                name=f"{name}/up",
                capture=self._open(lab.gateway_ns, lambda: _capture_socket(gateway_dev)),
                inject=self._open(lab.client_ns, lambda: _inject_socket(client_dev)),
                rng=random.Random(f"{self.seed}:{name}:up"),
            )
            down = _Lane(
                name=f"{name}/down",
                capture=self._open(lab.client_ns, lambda: _capture_socket(client_dev)),
                inject=self._open(lab.gateway_ns, lambda: _inject_socket(gateway_dev)),
                rng=random.Random(f"{self.seed}:{name}:down"),
            )
            self.lanes[name] = (up, down)

    def _open(self, ns: str, make: Callable[[], socket.socket]) -> socket.socket:
        sock = socket_in_namespace(ns, make)
        self._sockets.append(sock)  # closed by close_sockets, even if setup fails half-way
        return sock

    def close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    async def set(self, name: str, delay_ms: float, jitter_ms: float) -> None:
        """Set a path's one-way delay and jitter (each direction); 0 and 0 lets frames pass directly."""
        if name not in self.lanes:
            if delay_ms or jitter_ms:
                raise LabError(f"path {name} has no relay (it had no delay in the scenario's plan)")
            return
        on = bool(delay_ms or jitter_ms)
        was_on = any(lane.enabled for lane in self.lanes[name])
        for lane in self.lanes[name]:
            lane.delay_s, lane.jitter_s = delay_ms / 1000.0, jitter_ms / 1000.0
        self.settings[name] = (delay_ms, jitter_ms)
        flush = f"flush chain netdev {RELAY_NFT_TABLE} relay_{name}\n"
        if on and not was_on:
            for lane in self.lanes[name]:
                lane.enabled = True  # copies first, then drop the originals: never a gap, at most a duplicate
            rule = f"add rule netdev {RELAY_NFT_TABLE} relay_{name} meta protocol ip ether saddr != {RELAY_MAC.hex(':')} drop\n"
            await self._nft_both(flush + rule)
        elif was_on and not on:
            await self._nft_both(flush)
            for lane in self.lanes[name]:
                lane.enabled = False

    async def _receive(self, lane: _Lane) -> None:
        sock = lane.capture
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(RELAY_RECV_BATCH):
                try:
                    frame, addr = sock.recvfrom(RELAY_RECV_BYTES)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.ENETDOWN, errno.ENXIO):  # the link went down: nothing to read until it is up
                        break
                    raise
                if addr[2] != socket.PACKET_HOST or not lane.enabled:
                    continue
                copy = mark_frame(frame)
                if copy is not None:
                    lane.push(copy, trio.current_time())
            await trio.lowlevel.checkpoint()

    async def _send(self, lane: _Lane) -> None:
        while True:
            while not lane.queue:
                lane.wake = trio.Event()
                await lane.wake.wait()
            due, frame = lane.queue[0]
            await trio.sleep_until(due)
            lane.queue.popleft()
            try:
                lane.inject.send(frame)
                lane.relayed += 1
            except OSError as exc:  # a down link (ENETDOWN), a full device queue: the frame is lost
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                lane.send_errors[name] = lane.send_errors.get(name, 0) + 1

    async def _clear_rules(self) -> None:
        script = "".join(f"flush chain netdev {RELAY_NFT_TABLE} relay_{name}\n" for name in self.lanes)
        if script:
            with contextlib.suppress(LabError):
                await self._nft_both(script)

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, (up, down) in self.lanes.items():
            delay, jitter = self.settings[name]
            out[name] = {"delay_ms": delay, "jitter_ms": jitter, "up": up.statistics(), "down": down.statistics()}
        return out


@contextlib.asynccontextmanager
async def open_wire_relay(lab: Lab, names: Sequence[str], *, seed: int) -> AsyncIterator[WireRelay]:
    """Relay tasks for ``names`` for the duration of the block; every path starts with no delay.

    On exit the drop rules are removed (a kept lab then passes traffic undelayed) and the
    sockets are closed.
    """
    relay = WireRelay(lab, names, seed=seed)
    try:
        await relay._setup()
        async with trio.open_nursery() as nursery:
            for up, down in relay.lanes.values():
                for lane in (up, down):
                    nursery.start_soon(relay._receive, lane)
                    nursery.start_soon(relay._send, lane)
            try:
                yield relay
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            await relay._clear_rules()
        relay.close_sockets()


# =============================================================================
# Applying conditions
# =============================================================================


async def apply_conditions(lab: Lab, relay: WireRelay | None, name: str, old: Impairment, new: Impairment) -> list[str]:
    """Carry ``old -> new`` out on path ``name``; returns what was done, in order.

    A link that goes down goes first; one that comes up goes last, after its other
    conditions are set, so it never comes up with the old ones.
    """
    done: list[str] = []
    if old.link_up and not new.link_up:
        await lab.link_down(name)
        done.append("link down")
    if new.blackhole != old.blackhole:
        await lab.blackhole(name, new.blackhole)
        done.append("blackhole on" if new.blackhole else "blackhole off")
    if new.loss_pct != old.loss_pct:
        await lab.loss(name, new.loss_pct or None)
        done.append(f"loss {new.loss_pct:g}%")
    if new.rate_mbit != old.rate_mbit:
        await lab.rate(name, new.rate_mbit)
        done.append(f"rate {new.rate_mbit:g} Mbit/s" if new.rate_mbit else "rate unlimited")
    if (new.delay_ms, new.jitter_ms) != (old.delay_ms, old.jitter_ms):
        if relay is None:
            if new.delay_ms or new.jitter_ms:
                raise LabError(f"path {name}: delay needs the relay, which is not running")
        else:
            await relay.set(name, new.delay_ms, new.jitter_ms)
        done.append(f"delay {new.delay_ms:g} ms ± {new.jitter_ms:g} ms")
    if not old.link_up and new.link_up:
        await lab.link_up(name)
        done.append("link up")
    return done


# =============================================================================
# A run
# =============================================================================


@attrs.frozen(kw_only=True)
class StepRecord:
    """What the lab did for one step, and when (``time.monotonic()``)."""

    index: int
    at_s: float
    path: str
    targets: tuple[str, ...]
    changes: str
    note: str
    before: Mapping[str, Impairment]
    after: Mapping[str, Impairment]
    done: tuple[str, ...]
    started: float
    finished: float
    #: The step's ``do`` kind (None: an impairment step).
    kind: str | None = None
    #: The paths usable after the step (interface, address, link up, no blackhole); None: not tracked.
    usable_after: tuple[str, ...] | None = None
    #: ``resume``: how the client's clock jumped (the lab moved it).
    jump: ClockJump | None = None
    #: ``resume``: the sleep the laptop's clock saw, in seconds.
    slept_s: float | None = None
    #: The laptop was asleep after the step: the client could see nothing until the next resume.
    asleep: bool = False

    @property
    def origin(self) -> float:
        """When the step took effect: its start, except a resume, which takes effect once the laptop runs again."""
        return self.jump.at if self.jump is not None else self.started


@attrs.frozen(kw_only=True)
class GatewayRunData:
    """A gateway process the scenario killed: what the report audits and replays of it."""

    number: int
    exit_code: int
    events: tuple[str, ...]
    events_file: str
    trace_file: str

    @property
    def key(self) -> str:
        """Its key among the audits and replays of a run (``gateway.1``), next to :data:`SIDES`."""
        return f"gateway.{self.number}"


@attrs.frozen(kw_only=True)
class RunData:
    """Everything a run measured: the input of :func:`build_report`, which is pure."""

    scenario: Scenario
    scenario_file: str | None
    short: bool
    lab: Mapping[str, Any]
    kept: bool
    removal_command: str | None
    workdir: str
    path_names: tuple[str, ...]
    t0: float
    end: float
    steps: tuple[StepRecord, ...]
    clock_samples: tuple[ClockSample, ...]
    client_events: tuple[str, ...]
    gateway_events: tuple[str, ...]
    probe_source: Mapping[str, Any] | None
    probe_sink: Mapping[str, Any] | None
    tcp_source: Mapping[str, Any] | None
    tcp_sink: Mapping[str, Any] | None
    exit_codes: Mapping[str, int | None]
    stderr_tails: Mapping[str, str]
    relay: Mapping[str, Any] | None
    relay_seed: int | None
    errors: tuple[str, ...]
    #: Whether the ``up`` process was still running when the timeline ended (it never exits on its own).
    client_alive_at_end: bool = True
    #: Paths usable when the timeline started (before any fault).
    usable_at_start: tuple[str, ...] | None = None
    gateway_runs: tuple[GatewayRunData, ...] = ()


def _read_lines(path: Path) -> tuple[str, ...]:
    try:
        return tuple(line for line in path.read_text(errors="replace").splitlines() if line.strip())
    except FileNotFoundError:
        return ()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


async def run_scenario(
    scenario: Scenario,
    *,
    workdir: Path,
    short: bool = False,
    scenario_file: str | None = None,
    keep: bool = False,
    prefix: str | None = None,
    seed: int | None = None,
    progress: Progress = _quiet,
) -> RunData:
    """Build the lab, run ``scenario`` (already shortened if ``short``), tear down, return the measurements.

    Raises LabError (the lab cannot be built or a command failed) or TunnelError (a process died
    before the session started, or no session within ATTACH_TIMEOUT_S).  The lab is torn down
    whatever happens.
    """
    spec = lab_spec_for(scenario, prefix=prefix)
    names = tuple(p.name for p in scenario.paths)
    relayed = relayed_paths(scenario)
    relay_seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    initial = scenario.conditions_at(0.0)
    timeline = [s for s in scenario.steps if s.at_s > 0.0]
    stream_s = WARMUP_S + scenario.duration_s + TAIL_S
    errors: list[str] = []
    records: list[StepRecord] = []
    samples: list[ClockSample] = []
    reports: dict[str, dict[str, Any] | None] = {}
    exit_codes: dict[str, int | None] = {"client": None, "gateway": None}
    relay_stats: dict[str, Any] | None = None
    workdir.mkdir(parents=True, exist_ok=True)
    progress(f"building lab {spec.prefix}: {', '.join(names)}" + (f" (relay on {', '.join(relayed)})" if relayed else ""))
    async with open_lab(spec, keep=keep) as lab:
        lab_description = lab.describe()
        relay_cm: contextlib.AbstractAsyncContextManager[WireRelay | None] = (
            open_wire_relay(lab, relayed, seed=relay_seed) if relayed else contextlib.nullcontext(None)
        )
        async with relay_cm as relay:
            current = {name: Impairment() for name in names}
            for path in scenario.present_at_start():
                await apply_conditions(lab, relay, path.name, current[path.name], initial[path.name])
                current[path.name] = initial[path.name]
            usable_at_start = usable_paths(lab, current)
            sleeps = any(s.kind in MACHINE_STEP_KINDS for s in scenario.steps)
            tunnel = await start_tunnel(lab, workdir, policy=scenario.policy.to_mapping(), clock_offsets=sleeps)
            try:
                with trio.fail_after(ATTACH_TIMEOUT_S):
                    status = await tunnel.wait_attached()
            except trio.TooSlowError:
                raise TunnelError(
                    f"no session within {ATTACH_TIMEOUT_S:g} s (client: {_tail(workdir / 'client.err') or 'no stderr'})"
                ) from None
            progress(f"session {str(status.get('session', '?'))[:8]} ATTACHED on {status.get('binding')}")
            tools = await _start_traffic(lab, workdir, stream_s)
            t0_trio = trio.current_time() + WARMUP_S
            t0 = time.monotonic() + WARMUP_S
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sample_clock, tunnel, samples)
                for index, step in enumerate(timeline, start=1):
                    await trio.sleep_until(t0_trio + step.at_s)
                    record = await _apply_step(lab, relay, tunnel, scenario, step, index, current)
                    records.append(record)
                    progress(f"t={step.at_s:6.2f} s  step {index}/{len(timeline)}: {step.describe()}")
                await trio.sleep_until(t0_trio + scenario.duration_s)
                end = time.monotonic()
                progress("timeline done; waiting for the traffic to finish")
                reports.update(await _finish_traffic(tools, errors))
                nursery.cancel_scope.cancel()
            if relay is not None:
                relay_stats = relay.statistics()
            client_alive = tunnel.client.returncode is None
            codes = await tunnel.stop()
            exit_codes = {"client": codes[0], "gateway": codes[1]}
        removal = lab.removal_command() if keep else None

    def collect() -> dict[str, Any]:  # small files, read in a worker thread (no blocking I/O on the loop)
        for side, code in exit_codes.items():
            if code != 0:
                errors.append(f"{side} exited {code}: {_tail(workdir / f'{side}.err') or 'no stderr'}")
        return {
            "client_events": _read_lines(workdir / "client-events.jsonl"),
            "gateway_events": _read_lines(workdir / "gateway-events.jsonl"),
            "stderr_tails": {side: _tail(workdir / f"{side}.err") for side in SIDES},
            "gateway_runs": tuple(_gateway_run_data(run) for run in tunnel.killed),
        }

    files = await trio.to_thread.run_sync(collect)
    return RunData(
        scenario=scenario,
        scenario_file=scenario_file,
        short=short,
        lab=lab_description,
        kept=keep,
        removal_command=removal,
        workdir=str(workdir),
        path_names=names,
        t0=t0,
        end=end,
        steps=tuple(records),
        clock_samples=tuple(samples),
        client_events=files["client_events"],
        gateway_events=files["gateway_events"],
        probe_source=reports.get("probe-source"),
        probe_sink=reports.get("probe-sink"),
        tcp_source=reports.get("tcp-source"),
        tcp_sink=reports.get("tcp-sink"),
        exit_codes=exit_codes,
        stderr_tails=files["stderr_tails"],
        relay=relay_stats,
        relay_seed=relay_seed if relayed else None,
        errors=tuple(errors),
        client_alive_at_end=client_alive,
        usable_at_start=usable_at_start,
        gateway_runs=files["gateway_runs"],
    )


def _gateway_run_data(run: GatewayRun) -> GatewayRunData:
    return GatewayRunData(
        number=run.number, exit_code=run.exit_code, events=_read_lines(run.events),
        events_file=str(run.events), trace_file=str(run.trace),
    )  # fmt: skip


def usable_paths(lab: Lab, current: Mapping[str, Impairment]) -> tuple[str, ...]:
    """The paths that can carry packets now: interface present, an address, link up, no blackhole."""
    return tuple(
        p.name
        for p in lab.paths
        if lab.current_address(p) is not None and current[p.name].link_up and not current[p.name].blackhole
    )


async def _do_step(lab: Lab, relay: WireRelay | None, tunnel: Tunnel, scenario: Scenario, step: Step,
                   current: dict[str, Impairment], jumps: list[ClockJump]) -> list[str]:  # fmt: skip
    """Carry out a ``do`` step; returns what was done, in order (a resume's clock jump goes to ``jumps``)."""
    if step.kind == SUSPEND:
        stopped = await tunnel.suspend_laptop()
        return [f"laptop: {stopped} process(es) of the client namespace stopped (SIGSTOP)"]
    if step.kind == RESUME:
        jump = await tunnel.resume_laptop(step.slept_s)
        jumps.append(jump)
        slept = jump.wall_s + jump.seconds
        return [
            f"laptop: slept {slept:.3f} s by its clock ({jump.wall_s:.3f} s stopped): client boottime "
            f"+{jump.seconds:.3f} s, monotonic -{jump.wall_s:.3f} s; gateway clocks +{jump.seconds:.3f} s; SIGCONT"
        ]
    if step.kind == KILL_GATEWAY:
        run = await tunnel.kill_gateway()
        return [f"gateway: SIGKILL (exit {run.exit_code}), its files moved to *.{run.number}.*"]
    if step.kind == FREEZE_GATEWAY:
        return [f"gateway: frozen (SIGSTOP to pid {tunnel.freeze_gateway()}), a host that stalls"]
    if step.kind == THAW_GATEWAY:
        return [f"gateway: thawed (SIGCONT) after {tunnel.thaw_gateway() * 1000:.0f} ms"]
    if step.kind == START_GATEWAY:
        with trio.fail_after(GATEWAY_START_TIMEOUT_S):
            process = await tunnel.start_gateway()
        return [f"gateway: started again (pid {process.pid}), control socket up"]
    path = scenario.path(step.path)
    name = path.name
    if step.kind == ADD_INTERFACE:
        await lab.add_path(name)
        client_ip, gateway_ip = lab.current_address(name) or ("?", "?")
        done = [f"{name}: interface added, {client_ip} via {gateway_ip} metric {lab.path(name).metric}"]
        done += [f"{name}: {what}" for what in await apply_conditions(lab, relay, name, Impairment(), path.baseline)]
        current[name] = path.baseline
        return done
    if step.kind == DELETE_INTERFACE:
        await lab.delete_path(name)
        current[name] = Impairment()
        return [f"{name}: interface deleted"]
    if step.kind == FLUSH_ADDRESS:
        await lab.flush_address(name)
        return [f"{name}: address flushed"]
    if step.kind == ADD_ADDRESS:
        had = lab.current_address(name)
        client_ip, gateway_ip = await lab.add_address(name, subnet=step.subnet, host=step.host)
        moved = f" (was {had[0]})" if had else ""
        return [f"{name}: address {client_ip} via {gateway_ip}{moved}"]
    raise LabError(f"step kind {step.kind!r} is not known to the lab")


async def _apply_step(
    lab: Lab, relay: WireRelay | None, tunnel: Tunnel, scenario: Scenario, step: Step, index: int,
    current: dict[str, Impairment],
) -> StepRecord:  # fmt: skip
    targets = [p for p in step.targets(scenario.paths) if step.kind is not None or lab.present(p.name)]
    before = {p.name: current[p.name] for p in targets}
    started = time.monotonic()
    done: list[str] = []
    jumps: list[ClockJump] = []
    if step.kind is not None:
        done = await _do_step(lab, relay, tunnel, scenario, step, current, jumps)
    else:
        for p in targets:
            new = current[p.name].apply(dict(step.changes), p.baseline)
            done += [f"{p.name}: {what}" for what in await apply_conditions(lab, relay, p.name, current[p.name], new)]
            current[p.name] = new
    finished = time.monotonic()
    return StepRecord(
        index=index,
        at_s=step.at_s,
        path=step.path,
        targets=tuple(p.name for p in targets),
        changes=changes_text(step),
        note=step.note,
        before=before,
        after={p.name: current[p.name] for p in targets},
        done=tuple(done),
        started=started,
        finished=finished,
        kind=step.kind,
        usable_after=usable_paths(lab, current),
        jump=jumps[0] if jumps else None,
        asleep=tunnel.asleep,
        slept_s=jumps[0].wall_s + jumps[0].seconds if jumps else None,
    )


async def _start_traffic(lab: Lab, workdir: Path, stream_s: float) -> dict[str, Tool]:
    """Sinks in the gateway namespace (ready first), then the sources in the client namespace."""
    tools: dict[str, Tool] = {}
    sink_timeout = f"{stream_s + FINISH_TIMEOUT_S + TOOL_MARGIN_S:.1f}"
    with trio.fail_after(TOOL_START_TIMEOUT_S):
        tools["tcp-sink"] = await start_tool(
            lab, lab.gateway_ns, "tcp-sink", "--timeout", sink_timeout,
            directory=workdir, name="tcp-sink", listen=f"{GATEWAY_TUNNEL}:{TCP_PORT}",
        )  # fmt: skip
        tools["probe-sink"] = await start_tool(
            lab, lab.gateway_ns, "udp-probe-sink", "--timeout", sink_timeout,
            directory=workdir, name="probe-sink", listen=f"{GATEWAY_TUNNEL}:{PROBE_PORT}",
        )  # fmt: skip
    tcp_duration = stream_s - TAIL_S
    tools["tcp-source"] = await start_tool(
        lab, lab.client_ns, "tcp-source", "--connect", f"{GATEWAY_TUNNEL}:{TCP_PORT}",
        "--rate-mbit", f"{TCP_RATE_MBIT:g}", "--duration", f"{tcp_duration:.3f}",
        "--timeout", f"{stream_s + FINISH_TIMEOUT_S:.1f}",
        directory=workdir, name="tcp-source",
    )  # fmt: skip
    tools["probe-source"] = await start_tool(
        lab, lab.client_ns, "udp-probe-source", "--connect", f"{GATEWAY_TUNNEL}:{PROBE_PORT}",
        "--hz", f"{PROBE_HZ:g}", "--duration", f"{stream_s:.3f}",
        directory=workdir, name="probe-source",
    )  # fmt: skip
    return tools


async def _finish_traffic(tools: dict[str, Tool], errors: list[str]) -> dict[str, dict[str, Any] | None]:
    """Wait (bounded) for every tool to end by itself and collect its report."""
    out: dict[str, dict[str, Any] | None] = {}
    deadline = trio.current_time() + TAIL_S + FINISH_TIMEOUT_S
    for name in ("probe-source", "probe-sink", "tcp-source", "tcp-sink"):
        tool = tools[name]
        with trio.move_on_at(deadline):
            await tool.process.wait()
        if tool.process.returncode is None:
            errors.append(f"{name} did not finish within {TAIL_S + FINISH_TIMEOUT_S:g} s of the timeline's end")
            await tool.process.terminate()
        try:
            out[name] = await tool.read_report()
        except (TunnelError, ValueError) as exc:
            errors.append(str(exc))
            out[name] = None
    return out


async def _sample_clock(tunnel: Tunnel, samples: list[ClockSample]) -> None:
    while True:
        sample = await sample_client_clock(tunnel)
        if sample is not None:
            samples.append(sample)
        await trio.sleep(CLOCK_SAMPLE_S)


# =============================================================================
# The report (pure: RunData in, a JSON-able document out)
# =============================================================================


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, MS_DECIMALS)


def _events(lines: Iterable[str]) -> list[EmitEvent]:
    out = []
    for line in lines:
        try:
            out.append(EmitEvent.from_dict(json.loads(line)))
        except ValueError:
            continue  # the audit reports unreadable lines
    return out


def _path_name(pid: Any, names: Sequence[str]) -> str | None:
    text = str(pid) if pid is not None else ""
    if text.startswith("p") and text[1:].isdigit() and 1 <= int(text[1:]) <= len(names):
        return names[int(text[1:]) - 1]
    return None


def _path_id(name: str, names: Sequence[str]) -> str:
    """The client's path id of interface ``name`` (the inverse of :func:`_path_name`)."""
    return f"p{names.index(name) + 1}"


def _binding_path(binding: Any) -> str | None:
    return None if binding is None else str(binding).split("@", 1)[0]


def _names_path(event: EmitEvent, pids: set[str]) -> bool:
    """Whether ``event`` is about one of the paths ``pids`` (the step's targets)."""
    keys = {
        EventKind.PATH_HEALTH: ("path",),
        EventKind.STATE_CHANGE: ("path", "denied_path"),
        EventKind.TRANSPORT_SWITCH: ("from_path", "to_path"),
        EventKind.SWITCH_DENIED: ("target",),
        EventKind.REATTACH_REJECTED: ("path",),
        EventKind.SECURITY_EVENT: ("path",),
    }[event.kind]
    if any(str(event.detail(k)) in pids for k in keys if event.detail(k) is not None):
        return True
    return event.kind is EventKind.STATE_CHANGE and _binding_path(event.detail("binding")) in pids


def _describe_event(event: EmitEvent, names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": event.kind.value, "reason": event.reason.value}
    for key in ("path", "verdict", "from_state", "to_state", "from_path", "to_path", "target"):
        value = event.detail(key)
        if value is not None:
            out[key] = _path_name(value, names) or value if key in ("path", "from_path", "to_path", "target") else value
    return out


def _state_at(changes: Sequence[EmitEvent], t: float) -> tuple[str | None, str | None]:
    """(state, binding path id) after every STATE_CHANGE stamped before ``t``."""
    state, binding = None, None
    for e in changes:
        if e.t >= t:
            break
        state, binding = e.detail("to_state"), _binding_path(e.detail("binding"))
    return (str(state) if state is not None else None), binding


def attached_again(changes: Sequence[EmitEvent], c0: float, c1: float, *, state_before: str | None) -> float | None:
    """Milliseconds from ``c0`` until the client is ATTACHED for the rest of ``[c0, c1)``; None if it is not at ``c1``.

    0 when it was ATTACHED at ``c0`` and never left; otherwise the time of the window's last
    change to ATTACHED.
    """
    attached = SessionState.ATTACHED.value
    window = [e for e in changes if c0 <= e.t < c1]
    if not window:
        return 0.0 if state_before == attached else None
    if window[-1].detail("to_state") != attached:
        return None
    return _ms(window[-1].t - c0)


def time_in_state(changes: Sequence[EmitEvent], *, until: float | None = None) -> dict[str, float]:
    """Seconds spent in each state, from the first STATE_CHANGE to TERMINATED (or ``until``)."""
    out: dict[str, float] = {}
    for a, b in zip(changes, changes[1:]):
        state = str(a.detail("to_state"))
        out[state] = out.get(state, 0.0) + (b.t - a.t)
    if changes and until is not None and changes[-1].detail("to_state") != SessionState.TERMINATED.value:
        last = str(changes[-1].detail("to_state"))
        out[last] = out.get(last, 0.0) + max(0.0, until - changes[-1].t)
    return {s.value: round(out[s.value], 3) for s in SessionState if s.value in out}


def _probe_arrivals(sink: Mapping[str, Any] | None) -> tuple[float | None, int, dict[int, float]]:
    """(stream start, probes in the stream, seq -> first arrival), times on time.monotonic()."""
    if not sink or sink.get("start") is None:
        return None, 0, {}
    start = float(sink["start"])
    arrivals: dict[int, float] = {}
    for seq, rel in sink.get("arrivals", []):
        arrivals.setdefault(int(seq), start + float(rel))
    return start, int(sink.get("expected") or 0), arrivals


def window_probes(
    start: float | None, count: int, arrivals: Mapping[int, float], w0: float, w1: float, hz: float
) -> tuple[float | None, int, int]:
    """(outage seconds, probes scheduled in ``[w0, w1)``, how many of those never arrived).

    Probe ``k`` of a stream is scheduled at ``start + k / hz``.  The outage is the longest gap
    in the arrivals inside the part of the window the stream covers (None if it covers none).
    """
    if start is None or count <= 0:
        return None, 0, 0
    end = start + (count - 1) / hz
    lo, hi = max(w0, start), min(w1, end)
    k0 = max(0, math.ceil((w0 - start) * hz - 1e-9))
    k1 = min(count, math.ceil((w1 - start) * hz - 1e-9))
    scheduled = range(k0, k1) if k1 > k0 else range(0)
    lost = sum(1 for seq in scheduled if seq not in arrivals)
    if hi <= lo:
        return None, len(scheduled), lost
    return longest_gap(list(arrivals.values()), lo, hi).seconds, len(scheduled), lost


def traffic_back(arrivals: Sequence[float], w0: float, w1: float, *, gap_s: float = INTERRUPTION_S) -> float | None:
    """Seconds from ``w0`` until the probe stream flows again within ``[w0, w1)``; None if it does not.

    "Flows again" is the first arrival after the window's first interruption (``gap_s`` or
    more with no arrival, counting from ``w0``, so a stream already stopped at ``w0`` counts);
    a stream never interrupted in the window flows from its first arrival in it.  ``arrivals``
    are sorted.
    """
    previous = w0
    first: float | None = None
    for t in arrivals:
        if t < w0:
            continue
        if t >= w1:
            break
        if first is None:
            first = t
        if t - previous >= gap_s:
            return t - w0
        previous = t
    if w1 - previous >= gap_s or first is None:
        return None  # stopped in the window (or never flowed) and not back before its end
    return first - w0


def _first_answer(client: Sequence[EmitEvent], pid: str, since: float) -> EmitEvent | None:
    """The client's first PATH_HEALTH at or after ``since`` saying path ``pid`` answered a probe."""
    return next(
        (
            e for e in client
            if e.kind is EventKind.PATH_HEALTH and e.t >= since and str(e.detail("path")) == pid
            and e.detail("verdict") in ANSWERED_VERDICTS
        ),
        None,
    )  # fmt: skip


def analyze_step(
    record: StepRecord,
    window_end: float,
    *,
    clock: ClientClock | None,
    names: Sequence[str],
    client: Sequence[EmitEvent],
    changes: Sequence[EmitEvent],
    probes: tuple[float | None, int, dict[int, float]],
    hz: float,
    t0: float,
    usable_before: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """One fault's row of the report (see docs/lab-report.md)."""
    pids = {_path_id(n, names) for n in record.targets}
    newly = (
        [n for n in record.usable_after if n not in usable_before]
        if record.usable_after is not None and usable_before is not None
        else []
    )
    row: dict[str, Any] = {
        "index": record.index,
        "kind": record.kind,
        "at_s": record.at_s,
        "applied_at_s": round(record.started - t0, 3),
        "apply_ms": _ms(record.finished - record.started),
        "path": record.path,
        "targets": list(record.targets),
        "changes": record.changes,
        "note": record.note,
        "done": list(record.done),
        "conditions_after": {n: describe_impairment(c) for n, c in record.after.items()},
        "window_s": round(window_end - record.started, 3),
        "active_before": None,
        "on_active_path": None,
        "detection_ms": None,
        "detected_by": None,
        "switch_ms": None,
        "switched_to": None,
        "switched_from": None,
        "reason": None,
        "states": [],
        "state_after": None,
        "became_usable": newly,
        "first_answer_ms": {n: None for n in newly},
        "traffic_back_ms": _ms(traffic_back(sorted(probes[2].values()), record.origin, window_end)),
        "asleep": record.asleep,
    }
    if record.kind == RESUME:
        row["slept_s"] = record.slept_s
        row["attached_ms"] = None
    if clock is not None and not record.asleep:  # asleep, the client answers nothing until the resume's row
        # Searched from the step's start: the client may answer on the new interface before the
        # lab has finished the step's own bookkeeping (baseline conditions); that counts as 0.
        usable_at = clock.at(record.finished)
        for n in newly:
            answer = _first_answer(client, _path_id(n, names), clock.at(record.started))
            row["first_answer_ms"][n] = _ms(max(0.0, answer.t - usable_at)) if answer is not None else None
        c0, c1 = clock.at(record.origin), clock.at(window_end)
        state, active = _state_at(changes, c0)
        row["active_before"] = _path_name(active, names)
        row["on_active_path"] = active in pids if active is not None else False
        window = [e for e in client if c0 <= e.t < c1]
        detected = next((e for e in window if _names_path(e, pids)), None)
        if detected is not None:
            row["detection_ms"] = _ms(detected.t - c0)
            row["detected_by"] = _describe_event(detected, names)
        switch = next((e for e in window if e.kind is EventKind.TRANSPORT_SWITCH), None)
        if switch is not None:
            row["switch_ms"] = _ms(switch.t - c0)
            row["switched_to"] = _path_name(switch.detail("to_path"), names)
            row["switched_from"] = _path_name(switch.detail("from_path"), names)
            row["reason"] = switch.reason.value
        elif detected is not None:
            row["reason"] = detected.reason.value
        row["states"] = [str(e.detail("to_state")) for e in window if e.kind is EventKind.STATE_CHANGE]
        row["state_after"] = _state_at(changes, c1)[0]
        if record.kind == RESUME:
            row["attached_ms"] = attached_again(changes, c0, c1, state_before=state)
            row["new_session"] = any(e.kind is EventKind.STATE_CHANGE and e.detail("from_state") is None for e in window)
    outage, expected, lost = window_probes(*probes, record.started, window_end, hz)
    row["outage_ms"] = _ms(outage)
    row["probes_expected"] = expected
    row["probes_lost"] = lost
    return row


def _tcp_result(source: Mapping[str, Any] | None, sink: Mapping[str, Any] | None) -> dict[str, Any]:
    if not source or not sink:
        return {"intact": False, "error": "no report from the TCP " + ("source" if not source else "sink")}
    intact = (
        source.get("error") is None
        and sink.get("error") is None
        and not source.get("reset")
        and not sink.get("reset")
        and source.get("bytes") == sink.get("bytes")
        and (source.get("bytes") or 0) > 0
        and source.get("sha256") == sink.get("sha256")
    )
    return {
        "intact": bool(intact),
        "rate_mbit": TCP_RATE_MBIT,
        "bytes_sent": source.get("bytes"),
        "bytes_received": sink.get("bytes"),
        "sha256_sent": source.get("sha256"),
        "sha256_received": sink.get("sha256"),
        "reset": bool(source.get("reset") or sink.get("reset")),
        "error": source.get("error") or sink.get("error"),
        "seconds": source.get("seconds"),
    }


def _replay_json(result: ReplayResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    out: dict[str, Any] = {"status": result.status, "inputs": result.inputs, "problem": result.problem}
    if result.divergence is not None:
        out["divergence_line"] = result.divergence.line
    return out


def build_report(
    run: RunData,
    *,
    audits: Mapping[str, AuditReport],
    replays: Mapping[str, ReplayResult | None],
) -> dict[str, Any]:
    """The report document (``docs/lab-report.md``) from a run's measurements.  Pure."""
    scenario = run.scenario
    names = run.path_names
    clock = estimate_client_clock(run.clock_samples, [r.jump for r in run.steps if r.jump is not None])
    client = _events(run.client_events)
    gateway = _events(run.gateway_events)
    changes = [e for e in client if e.kind is EventKind.STATE_CHANGE]
    hz = float((run.probe_source or {}).get("hz") or PROBE_HZ)
    probes = _probe_arrivals(run.probe_sink)
    faults = []
    usable_before = run.usable_at_start
    for i, record in enumerate(run.steps):
        window_end = run.steps[i + 1].started if i + 1 < len(run.steps) else run.end
        faults.append(
            analyze_step(
                record, window_end, clock=clock, names=names, client=client, changes=changes,
                probes=probes, hz=hz, t0=run.t0, usable_before=usable_before,
            )  # fmt: skip
        )
        usable_before = record.usable_after
    end_c = clock.at(run.end) if clock is not None else None
    switches = {
        "client": sum(1 for e in client if e.kind is EventKind.TRANSPORT_SWITCH),
        "gateway": sum(1 for e in gateway if e.kind is EventKind.TRANSPORT_SWITCH),
    }
    terminated = next((e for e in changes if e.detail("to_state") == SessionState.TERMINATED.value), None)
    sink = run.probe_sink or {}
    tcp = _tcp_result(run.tcp_source, run.tcp_sink)
    earlier = [
        _gateway_run_json(g, audits.get(g.key), replays.get(g.key))
        for g in run.gateway_runs
    ]
    violations = sum(audits[side].violation_count for side in SIDES if side in audits)
    violations += sum(g["invariants"]["violation_count"] for g in earlier if g["invariants"] is not None)
    replay_ok = all(r is not None and r.status == OK_STATUS for side, r in replays.items() if side in SIDES)
    replay_ok = replay_ok and all(g["replay_ok"] for g in earlier)
    errors = list(run.errors)
    if clock is None:
        errors.append("the client never answered a status query: no clock offset, no detection or switch times")
    if not run.client_alive_at_end:
        errors.append("the client (jvpn-trio up) was not running at the end of the timeline")
    ok = violations == 0 and tcp["intact"] and replay_ok and not errors
    policy = scenario.policy
    return {
        "schema": REPORT_SCHEMA,
        "ok": ok,
        "scenario": {
            "name": scenario.name,
            "description": scenario.description,
            "file": run.scenario_file,
            "short": run.short,
            "duration_s": scenario.duration_s,
            "policy": policy.fingerprint,
            "max_switches_per_minute": policy.max_switches_per_minute,
            "paths": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "priority": p.priority,
                    "path_id": f"p{i + 1}",
                    "baseline": impairment_json(p.baseline),
                    "baseline_text": describe_impairment(p.baseline),
                }
                for i, p in enumerate(scenario.paths)
            ],
        },
        "lab": {
            "prefix": run.lab.get("prefix"),
            "client_ns": run.lab.get("client_ns"),
            "gateway_ns": run.lab.get("gateway_ns"),
            "kept": run.kept,
            "removal_command": run.removal_command,
            "workdir": run.workdir,
            "delay": {"method": "in-path AF_PACKET relay", "paths": list(run.relay or {}), "seed": run.relay_seed, "statistics": run.relay}
            if run.relay is not None
            else None,
        },
        "clock": {
            "offset_s": round(clock.offset, 6) if clock is not None else None,
            "jumps": [{"at_s": round(j.at - run.t0, 3), "seconds": round(j.seconds, 3)} for j in clock.jumps]
            if clock is not None
            else [],
            "samples": len(run.clock_samples),
            "method": "max over status samples of (now_s - 0.0005 - monotonic after the reply)",
        },
        "faults": faults,
        "totals": {
            "switches": switches,
            "switch_denied": sum(1 for e in client if e.kind is EventKind.SWITCH_DENIED),
            "degraded_entries": sum(1 for e in changes if e.detail("to_state") == SessionState.DEGRADED.value),
            "time_in_state_s": time_in_state(changes, until=end_c),
            "state_at_end": _state_at(changes, end_c)[0] if end_c is not None else None,
            "termination": terminated.reason.value if terminated else None,
            "probes": {
                "expected": sink.get("expected"),
                "received": sink.get("received"),
                "lost": sink.get("lost"),
                "longest_gap_ms": _ms(sink.get("longest_gap_s")),
                "expected_asleep": sum(f["probes_expected"] for f in faults if f["asleep"]),
            },
        },
        "tcp": tcp,
        "invariants": {
            "violations": violations,
            "client": audits["client"].to_json() if "client" in audits else None,
            "gateway": audits["gateway"].to_json() if "gateway" in audits else None,
        },
        "replay": {side: _replay_json(r) for side, r in replays.items() if side in SIDES},
        "gateway_runs": earlier,
        "laptop": laptop_figures(run, faults, audits),
        "processes": {
            side: {"exit": run.exit_codes.get(side), "stderr_tail": run.stderr_tails.get(side, "")} for side in SIDES
        },
        "files": {
            "workdir": run.workdir,
            "client_events": str(Path(run.workdir) / "client-events.jsonl"),
            "gateway_events": str(Path(run.workdir) / "gateway-events.jsonl"),
            "client_trace": str(Path(run.workdir) / "client.trace.jsonl"),
            "gateway_trace": str(Path(run.workdir) / "gateway.trace.jsonl"),
        },
        "errors": errors,
    }


def _gateway_run_json(run: GatewayRunData, audit: AuditReport | None, replay: ReplayResult | None) -> dict[str, Any]:
    """A killed gateway process: its audit and its replay.

    A SIGKILL may cut the trace's last record short, so ``incomplete`` counts as replayed
    (everything before the cut was checked); ``diverged`` or ``malformed`` does not.
    """
    return {
        "number": run.number,
        "exit": run.exit_code,
        "events_file": run.events_file,
        "trace_file": run.trace_file,
        "invariants": audit.to_json() if audit is not None else None,
        "replay": _replay_json(replay),
        "replay_ok": replay is not None and replay.status in (OK_STATUS, INCOMPLETE_STATUS),
    }


def _sessions(audit: AuditReport | None) -> list[dict[str, Any]]:
    """Per session of one audited log: its violations, final state and termination."""
    if audit is None:
        return []
    counts = collections.Counter(v.session for v in audit.violations)
    return [
        {"session": s.session, "violations": counts[s.session], "final_state": s.final_state, "termination": s.termination}
        for s in audit.sessions
    ]


def laptop_figures(run: RunData, faults: Sequence[Mapping[str, Any]], audits: Mapping[str, AuditReport]) -> dict[str, Any]:
    """The figures of the laptop scenarios (docs/lab-report.md, ``laptop``), from the fault rows.  Pure."""
    first_answer = [
        {"step": f["index"], "path": name, "ms": ms}
        for f in faults
        if not f["asleep"]
        for name, ms in f["first_answer_ms"].items()
    ]
    address = [
        {"step": f["index"], "path": f["path"], "kind": f["kind"], "traffic_back_ms": f["traffic_back_ms"]}
        for f in faults
        if f["kind"] in (FLUSH_ADDRESS, ADD_ADDRESS) and not f["asleep"]
    ]
    restarts = []
    all_down = []
    down_since: float | None = None if run.usable_at_start else run.t0
    killed_at: float | None = None
    for record, f in zip(run.steps, faults):
        if record.kind == KILL_GATEWAY:
            killed_at = record.started
        if record.kind == START_GATEWAY:
            down = round(record.started - killed_at, 3) if killed_at is not None else None
            restarts.append({"step": f["index"], "down_s": down, "traffic_back_ms": f["traffic_back_ms"]})
        if record.usable_after is None:
            continue
        if not record.usable_after and down_since is None:
            down_since = record.started
        elif record.usable_after and down_since is not None:
            all_down.append(
                {"step": f["index"], "down_s": round(record.started - down_since, 3), "traffic_back_ms": f["traffic_back_ms"]}
            )
            down_since = None
    resumes = [
        {
            "step": f["index"], "slept_s": f["slept_s"], "traffic_back_ms": f["traffic_back_ms"],
            "attached_ms": f["attached_ms"], "new_session": f.get("new_session"),
        }  # fmt: skip
        for f in faults
        if f["kind"] == RESUME
    ]
    logs = {key: _sessions(audits.get(key)) for key in (*SIDES, *(g.key for g in run.gateway_runs))}
    every_log = (run.client_events, run.gateway_events, *(g.events for g in run.gateway_runs))
    stale = sum(1 for lines in every_log for e in _events(lines) if e.reason is ReasonCode.STALE_TIMESTAMP)
    return {
        "agent_alive_at_end": run.client_alive_at_end,
        "first_answer": first_answer,
        "address_changes": address,
        "gateway_restarts": restarts,
        "all_down": all_down,
        "resumes": resumes,
        "stale_timestamps": stale,
        "sessions": logs,
    }


async def check_run(run: RunData) -> dict[str, Any]:
    """Audit both logs and replay both traces (in a worker thread: CPU-bound), then build the report."""
    policy = run.scenario.policy
    workdir = Path(run.workdir)

    def work() -> tuple[dict[str, AuditReport], dict[str, ReplayResult | None]]:
        audits = {
            "client": audit_lines(run.client_events, policy=policy, role="client"),
            "gateway": audit_lines(run.gateway_events, policy=policy, role="gateway"),
        }
        replays: dict[str, ReplayResult | None] = {}
        traces = {side: workdir / f"{side}.trace.jsonl" for side in SIDES}
        for g in run.gateway_runs:
            audits[g.key] = audit_lines(g.events, policy=policy, role="gateway")
            traces[g.key] = Path(g.trace_file)
        for side, trace in traces.items():
            if trace.exists():
                with open(trace, encoding="utf-8", errors="replace") as f:
                    replays[side] = replay_lines(f)
            else:
                replays[side] = None
        return audits, replays

    audits, replays = await trio.to_thread.run_sync(work)
    return build_report(run, audits=audits, replays=replays)


# =============================================================================
# Text
# =============================================================================


def _fmt_ms(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _render_laptop(laptop: Mapping[str, Any] | None, gateway_runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The laptop figures as text lines (none for a scenario that has none of them)."""
    if not laptop:
        return []
    out = []
    answers = ", ".join(f"#{a['step']} {a['path']} {_fmt_ms(a['ms'])}" for a in laptop["first_answer"])
    if answers:
        out.append(f"  usable -> first probe answer: {answers}")
    for row in laptop.get("resumes", ()):
        out.append(
            f"  resume #{row['step']} after {row['slept_s']:g} s asleep -> traffic flowing {_fmt_ms(row['traffic_back_ms'])}, "
            f"ATTACHED {_fmt_ms(row['attached_ms'])}" + (" (new session)" if row["new_session"] else "")
        )
    if laptop.get("resumes"):
        out.append(f"  STALE_TIMESTAMP rejections in every log: {laptop['stale_timestamps']}")
    for key, label in (("address_changes", "address change"), ("gateway_restarts", "gateway restart"), ("all_down", "all paths down")):
        rows = laptop[key]
        if rows:
            text = ", ".join(
                f"#{r['step']}" + (f" ({r['down_s']:g} s down)" if r.get("down_s") is not None else "")
                + f" {_fmt_ms(r['traffic_back_ms'])}"
                for r in rows
            )
            out.append(f"  {label} -> traffic flowing: {text}")
    for g in gateway_runs:
        inv = g["invariants"]
        replay = (g["replay"] or {}).get("status", "no trace")
        out.append(
            f"  killed gateway #{g['number']} (exit {g['exit']}): "
            f"{inv['violation_count'] if inv else '?'} violation(s), replay {replay}"
        )
    sessions = ", ".join(
        f"{log} {len(rows)} session(s), {sum(r['violations'] for r in rows)} violation(s)"
        for log, rows in laptop["sessions"].items()
    )
    out.append(f"  agent alive at the end: {'yes' if laptop['agent_alive_at_end'] else 'NO'}; {sessions}")
    return out


def render_report(doc: Mapping[str, Any]) -> str:
    """The report as text, derived only from the JSON document."""
    sc, totals, tcp = doc["scenario"], doc["totals"], doc["tcp"]
    form = "short form, " if sc["short"] else ""
    out = [
        f"jvpn-trio lab: {sc['name']} ({form}{sc['duration_s']:g} s), policy {sc['policy']}: {'PASS' if doc['ok'] else 'FAIL'}",
    ]
    if sc.get("description"):
        out.append(f"  {sc['description']}")
    out.append(
        "  paths: "
        + ", ".join(f"{p['name']} ({p['kind']}, prio {p['priority']}, {p['baseline_text']})" for p in sc["paths"])
    )
    lab = doc["lab"]
    where = f"kept: remove with `{lab['removal_command']}`" if lab.get("kept") else "removed"
    out.append(f"  lab {lab['prefix']} ({where}); files in {lab['workdir']}")
    out.append("")
    head = ["#", "at", "path", "change", "on active", "detected by", "detect", "switch", "to", "reason", "outage", "back", "lost", "after"]
    rows = []
    for f in doc["faults"]:
        by = f.get("detected_by") or {}
        detected = " ".join(str(by[k]) for k in ("kind", "verdict", "to_state") if k in by) + f" ({by['reason']})" if by else "-"
        active = "-" if f["on_active_path"] is None else ("yes" if f["on_active_path"] else f"no ({f['active_before'] or '-'})")
        rows.append(
            [
                str(f["index"]),
                f"{f['at_s']:g} s",
                {GATEWAY_TARGET: "gateway", LAPTOP_TARGET: "laptop"}.get(f["path"], f["path"]),
                f["changes"],
                active,
                detected,
                _fmt_ms(f["detection_ms"]),
                _fmt_ms(f["switch_ms"]),
                f["switched_to"] or "-",
                f["reason"] or "-",
                "asleep" if f.get("asleep") else _fmt_ms(f["outage_ms"]),
                _fmt_ms(f.get("traffic_back_ms")),
                "asleep" if f.get("asleep") else f"{f['probes_lost']}/{f['probes_expected']}",
                f["state_after"] or "-",
            ]
        )
    if rows:
        widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
        out.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        for r in rows:
            out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    else:
        out.append("  (no faults after t=0)")
    out.append("")
    out += _render_laptop(doc.get("laptop"), doc.get("gateway_runs") or [])
    sw = totals["switches"]
    out.append(
        f"  switches: {sw['client']} (gateway {sw['gateway']}), denied {totals['switch_denied']}, "
        f"DEGRADED entered {totals['degraded_entries']}x, state at the end {totals['state_at_end'] or '-'}, "
        f"closed {totals['termination'] or '-'}"
    )
    states = ", ".join(f"{k} {v:.2f} s" for k, v in totals["time_in_state_s"].items())
    out.append(f"  time in state: {states or '-'}")
    pr = totals["probes"]
    out.append(
        f"  probes: {pr['received']}/{pr['expected']} received, {pr['lost']} lost, longest gap {_fmt_ms(pr['longest_gap_ms'])}"
        + (f" ({pr['expected_asleep']} expected while the laptop slept, its programs stopped)" if pr.get("expected_asleep") else "")
    )
    if tcp["intact"]:
        out.append(f"  TCP: intact, {tcp['bytes_received']:,} bytes, sha256 {str(tcp['sha256_received'])[:16]}… at both ends, no reset")
    else:
        out.append(
            f"  TCP: BROKEN: sent {tcp.get('bytes_sent')} received {tcp.get('bytes_received')} bytes, "
            f"reset={tcp.get('reset')}, error={tcp.get('error')}"
        )
    inv = doc["invariants"]
    parts = []
    for side in ("client", "gateway"):
        a = inv.get(side)
        parts.append(f"{side} {a['violation_count']} violation(s)" if a else f"{side} no log")
    out.append(f"  invariants: {', '.join(parts)}")
    for side in ("client", "gateway"):
        a = inv.get(side)
        for v in (a or {}).get("violations", [])[:10]:
            out.append(f"    {side} line {v['line']}: [{v['check']}] {v['message']}")
    rp = doc["replay"]
    out.append(
        "  replay: "
        + ", ".join(
            f"{side} {r['status']} ({r['inputs']} inputs)" + (f" at line {r['divergence_line']}" if r.get("divergence_line") else "")
            if r
            else f"{side} no trace"
            for side, r in rp.items()
        )
    )
    for e in doc["errors"]:
        out.append(f"  error: {e}")
    if doc.get("soak") is not None:
        out += soak.render(doc["soak"])
    return "\n".join(out)


# =============================================================================
# Command line
# =============================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``jvpn-trio lab`` takes (``main`` expects exactly these attributes)."""
    parser.add_argument("--scenario", metavar="FILE", help="scenario TOML (default: a built-in tour of link down, blackhole, loss)")
    parser.add_argument("--short", action="store_true", help="run the scenario's short form (short_duration_s, for CI)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document (docs/lab-report.md)")
    parser.add_argument("--keep", action="store_true", help="leave the namespaces in place and print how to remove them")
    parser.add_argument("--workdir", metavar="DIR", help="where configs, event logs and traces go (default: a new /tmp directory)")
    parser.add_argument("--soak", type=float, metavar="MINUTES",
                        help="instead of a scenario: MINUTES of random faults, every outage held to its bound (lab/soak.py)")
    parser.add_argument("--seed", type=int, default=1, metavar="N", help="--soak: the faults drawn from this seed (default 1)")


def _load(args: argparse.Namespace) -> Scenario:
    minutes = getattr(args, "soak", None)
    if minutes is not None:
        if getattr(args, "scenario", None) or getattr(args, "short", False):
            raise ConfigError("--soak builds its own timeline: give it without --scenario or --short")
        try:
            return soak.soak_scenario(minutes, seed=getattr(args, "seed", 1))
        except soak.SoakError as exc:
            raise ConfigError(str(exc)) from None
    scenario = load_scenario(args.scenario) if getattr(args, "scenario", None) else builtin_scenario()
    return scenario.short() if getattr(args, "short", False) else scenario


def main(args: argparse.Namespace) -> int:
    """Run ``jvpn-trio lab``; see the module docstring for the exit status."""
    try:
        scenario = _load(args)
    except ConfigError as exc:  # ScenarioError is one
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print(f"{PROG}: needs root (network namespaces, veth links, nft, TUN devices)", file=sys.stderr)
        return EXIT_USAGE
    workdir = Path(args.workdir) if getattr(args, "workdir", None) else Path(tempfile.mkdtemp(prefix=f"jvpn-lab-{scenario.name}-"))
    as_json = bool(getattr(args, "json", False))

    def progress(message: str) -> None:
        if not as_json:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    outcome: dict[str, Any] = {}

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        outcome["signal"] = signum
                        nursery.cancel_scope.cancel()  # the run unwinds; open_lab tears down, shielded
                        return

                async def work() -> None:
                    data = await run_scenario(
                        scenario, workdir=workdir, short=bool(getattr(args, "short", False)),
                        scenario_file=getattr(args, "scenario", None), keep=bool(getattr(args, "keep", False)),
                        progress=progress,
                    )  # fmt: skip
                    report = await check_run(data)
                    if getattr(args, "soak", None) is not None:
                        report["soak"] = soak.judge(report, scenario.policy)
                        report["ok"] = report["soak"]["ok"]
                    outcome["report"] = report
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                nursery.start_soon(work)

    try:
        trio.run(run)
    except BaseException as exc:  # narrowed at once: only the lab's documented errors, inside Trio's groups
        found = find_in_group(exc, (LabError, TunnelError))
        if found is None:
            raise
        print(f"{PROG}: {found} (files in {workdir})", file=sys.stderr)
        return EXIT_CHECK_FAILED if isinstance(found, TunnelError) else EXIT_USAGE
    if "signal" in outcome:
        name = signal.Signals(outcome["signal"]).name
        print(f"{PROG}: interrupted by {name}; the lab was torn down (files in {workdir})", file=sys.stderr)
        return 128 + int(outcome["signal"])
    report = outcome["report"]
    print(json.dumps(report, sort_keys=True) if as_json else render_report(report), flush=True)
    return EXIT_OK if report["ok"] else EXIT_CHECK_FAILED


def _standalone(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jvpn_trio.lab.runner", description="Run a field scenario in a namespace lab.")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(_standalone())
