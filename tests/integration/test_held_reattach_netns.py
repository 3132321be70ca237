"""An on-path attacker holds back the client's REATTACH and sends it himself: the binding stays (root).

Issue 15, item 1, replayed from the attacker's position against a real gateway and client.
Before path validation the gateway took the copy as an ordinary switch and moved the session
to the attacker's address; now it must only challenge that address (docs/wire-format.md,
PATH_CHALLENGE) and give up with a ``SECURITY_EVENT`` ``PATH_NOT_VALIDATED``.

Topology: a lab with two paths (eth0 preferred, wifi0), so that once eth0 is blackholed the
client has exactly one way out and every REATTACH it sends is one the attacker sees.  A third
namespace, the attacker's, is joined to the gateway namespace by its own veth and subnet::

    client ns  eth0  ---- gw-eth0  \\
               wifi0 ---- gw-wifi0  +-- gateway ns (10.99.0.1 on lo)
    attacker ns att0 ---- gw-att   /      10.88.0.2 <-> 10.88.0.1

The attacker sits on wifi0's wire: a packet socket on ``gw-wifi0`` sees each frame before the
device's netdev ingress hook, where an nft rule (a table of its own) drops the client's
REATTACHes so they never reach the gateway.  From its own address it sends the first one,
verbatim and at once (inside the freshness window), twice: the second copy is refused by the
transport counter's replay window (``REPLAYED_COUNTER``).

1. Real ``serve`` and ``up --no-tui``, bound on eth0, with a 100 Hz UDP probe stream through
   the tunnel.  The hold rule and the attacker go in; eth0 is blackholed, so the client
   reattaches on wifi0.
2. The gateway judges the attacker's copy acceptable (it is authentic, fresh, for the current
   version) and, its address being unvalidated, sends it one PATH_CHALLENGE; nobody answers
   it, and the gateway logs ``PATH_NOT_VALIDATED`` naming the attacker's address.
3. The hold is lifted: the client's next REATTACH from wifi0 is challenged there, answered,
   and confirmed; the stream flows again, and since eth0 drops everything, over wifi0.

Asserted, causally: the attacker received exactly one datagram, a PATH_CHALLENGE of the
documented size and no more bytes than it sent (the control that its copy reached the gateway
and was authenticated, and the amplification bound); no STATE_CHANGE or TRANSPORT_SWITCH ever
names its address; the gateway's version and binding were unchanged once it gave up; the
client's confirmed switch is the very next version, carries a later nonce than the attacker's
copy and was validated by challenge; probes arrived after it.

Determinism rules (tests/netns.py): every wait is bounded by ``trio.fail_after`` and polls a
real condition (event logs, status, report files); nothing asserts a duration.  Every process,
nft table and namespace is removed on any exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from jvpn_trio.config import DEFAULT_CONTROL_PORT_OFFSET
from jvpn_trio.core import wire
from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.lab.netns import (
    DEFAULT_PATHS,
    Lab,
    LabError,
    LabProcess,
    LabSpec,
    open_lab,
)
from jvpn_trio.lab.processes import (
    GATEWAY_TUNNEL,
    PORT,
    STATUS_POLL_S,
    Tunnel,
    start_tool,
    start_tunnel,
)
from tests.netns import requires_lab, unique_prefix

#: eth0 (preferred) and wifi0 only: with eth0 dead, wifi0 is the client's one way out.
PATHS = DEFAULT_PATHS[:2]
ACTIVE, ATTACKED = "eth0", "wifi0"
#: The gateway's control port: where REATTACH, PATH_CHALLENGE and PATH_RESPONSE travel.
CONTROL_PORT = PORT + DEFAULT_CONTROL_PORT_OFFSET
#: The attacker's link to the gateway namespace: its own /24, outside the lab's address plan.
ATTACKER_ROUTER_IP = "10.88.0.1"
ATTACKER_IP = "10.88.0.2"
ATTACKER_PREFIXLEN = 24
ATTACKER_PORT = 40404
ATTACKER_DEVICE, ATTACKER_ROUTER_DEVICE = "att0", "gw-att"
#: Copies of the held-back REATTACH the attacker sends: more than one, so the test sees that a
#: second copy earns nothing (the transport counter makes each copy single use: REPLAYED_COUNTER).
COPIES = 2
#: The nft table (netdev family, gateway namespace) holding the attacker's drop rule; its own,
#: so the lab's fault chains on the same device are untouched.
HOLD_TABLE = "jvt_hold_reattach"
#: The hold runs before the lab's fault chains on the same ingress hook.
HOLD_PRIORITY = -10
#: ``@th,OFFSET,8``: bit offsets of the protocol version and message type bytes behind the
#: 8-byte UDP header (the type travels in clear, docs/wire-format.md).
UDP_HEADER_BITS = 64
VERSION_BITS, TYPE_BITS = UDP_HEADER_BITS, UDP_HEADER_BITS + 8
#: The policy: defaults, except a recovery window long enough that the client's session
#: outlives the hold (the test lifts it only after the gateway gave up on the attacker's copy);
#: still under transport_loss_ttl_ms, as the policy requires.
MAX_RECOVERY_WINDOW_MS = 10_000
POLICY = {"max_recovery_window_ms": MAX_RECOVERY_WINDOW_MS}
#: The probe stream: it must outlast start-up, the hold and the whole recovery window, so that
#: it still runs after the switch to wifi0 whenever that happens within the window.
STREAM_HZ = 100
STREAM_S = 20.0
STREAM_PORT = 5002
#: The attacker process's own lifetime (it also stops when its stop file appears).
ATTACKER_LIFETIME_S = 60.0
TEST_TIMEOUT_S = 120.0
#: Bound on removing the attacker's namespace and table on the way out.
CLEANUP_TIMEOUT_S = 10.0

#: argv: REPORT DEVICE CLIENT_IP PORT NETNS_FILE OWN_IP OWN_PORT GATEWAY_IP COPIES STOP_FILE
#: VERSION REATTACH LIFETIME_S.  Started in the gateway namespace: opens a packet socket on
#: DEVICE there (it sees ingress frames before the netdev hook drops them), then moves itself
#: into the attacker's namespace (setns) and sends from its own address.  Keeps REPORT (JSON)
#: up to date: REATTACHes seen from CLIENT_IP to PORT, what it sent, every datagram it got.
ATTACKER_SCRIPT = r"""
import ctypes, json, os, select, socket, struct, sys, time
(report, device, client_ip, port, netns_file, own_ip, own_port, gateway_ip, copies, stop_file,
 version, reattach, lifetime) = sys.argv[1:]
port, own_port, copies, version, reattach = int(port), int(own_port), int(copies), int(version), int(reattach)
deadline = time.monotonic() + float(lifetime)
ETH_P_ALL, ETH_P_IP, PACKET_HOST, CLONE_NEWNET, IPPROTO_UDP = 0x0003, 0x0800, 0, 0x40000000, 17
# ETH_P_ALL: a tap, served before the ingress hook; a socket for ETH_P_IP only would be served after it.
tap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
tap.bind((device, ETH_P_ALL))
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(netns_file, os.O_RDONLY)
if libc.setns(fd, CLONE_NEWNET) != 0:
    raise OSError(ctypes.get_errno(), "setns " + netns_file)
os.close(fd)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((own_ip, own_port))
state = {"held_back": 0, "sent": [], "received": []}
def save():
    with open(report + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(report + ".tmp", report)
save()
first = None
while time.monotonic() < deadline and not os.path.exists(stop_file):
    readable, _, _ = select.select([tap, udp], [], [], 0.05)
    if tap in readable:
        frame, where = tap.recvfrom(65535)
        ihl = (frame[0] & 0x0F) * 4
        total = struct.unpack("!H", frame[2:4])[0]
        if (where[1] == ETH_P_IP and where[2] == PACKET_HOST and frame[9] == IPPROTO_UDP and socket.inet_ntoa(frame[12:16]) == client_ip
                and struct.unpack("!H", frame[ihl + 2:ihl + 4])[0] == port):
            payload = frame[ihl + 8:total]
            if len(payload) > 1 and payload[0] == version and payload[1] == reattach:
                state["held_back"] += 1
                if first is None:
                    first = payload
                    for _ in range(copies):
                        udp.sendto(first, (gateway_ip, port))
                        state["sent"].append(len(first))
                save()
    if udp in readable:
        data, source = udp.recvfrom(65535)
        state["received"].append({
            "source": "%s:%d" % source[:2], "len": len(data),
            "version": data[0] if data else None, "type": data[1] if len(data) > 1 else None,
        })
        save()
"""


@attrs.frozen
class Attacker:
    """The attacker's namespace (name and the file ``setns`` opens)."""

    ns: str

    @property
    def netns_file(self) -> Path:
        return Path("/run/netns") / self.ns

    @property
    def endpoint(self) -> str:
        return f"{ATTACKER_IP}:{ATTACKER_PORT}"


async def _ip(*argv: str) -> None:
    await trio.run_process(["ip", *argv], capture_stdout=True, capture_stderr=True)


async def _link(ns: str, device: str) -> dict[str, Any]:
    result = await trio.run_process(["ip", "-j", "-n", ns, "link", "show", device], capture_stdout=True)
    (link,) = json.loads(result.stdout)
    assert isinstance(link, dict)
    return link


async def _wait_operational(attacker: Attacker, lab: Lab) -> None:
    """Until the attacker's veth carries packets: carrier on both ends and one end UP (as the lab waits)."""
    while True:
        ends = [await _link(attacker.ns, ATTACKER_DEVICE), await _link(lab.gateway_ns, ATTACKER_ROUTER_DEVICE)]
        if all("LOWER_UP" in end.get("flags", ()) for end in ends) and any(end.get("operstate") == "UP" for end in ends):
            return
        await trio.sleep(STATUS_POLL_S)


@contextlib.asynccontextmanager
async def attacker_namespace(lab: Lab) -> AsyncIterator[Attacker]:
    """A namespace joined to the gateway namespace by a veth with its own /24; deleted on any exit."""
    attacker = Attacker(ns=f"{lab.spec.prefix}-att")
    await _ip("netns", "add", attacker.ns)
    try:
        await _ip(
            "link", "add", ATTACKER_DEVICE, "netns", attacker.ns,
            "type", "veth", "peer", "name", ATTACKER_ROUTER_DEVICE, "netns", lab.gateway_ns,
        )  # fmt: skip
        await _ip("-n", attacker.ns, "link", "set", "lo", "up")
        await _ip("-n", attacker.ns, "addr", "add", f"{ATTACKER_IP}/{ATTACKER_PREFIXLEN}", "dev", ATTACKER_DEVICE)
        await _ip(
            "-n", lab.gateway_ns, "addr", "add", f"{ATTACKER_ROUTER_IP}/{ATTACKER_PREFIXLEN}", "dev", ATTACKER_ROUTER_DEVICE
        )  # fmt: skip
        await _ip("-n", attacker.ns, "link", "set", ATTACKER_DEVICE, "up")
        await _ip("-n", lab.gateway_ns, "link", "set", ATTACKER_ROUTER_DEVICE, "up")
        # The gateway's address is on its loopback: reached through the router end, as from a client.
        await _ip("-n", attacker.ns, "route", "add", "default", "via", ATTACKER_ROUTER_IP, "dev", ATTACKER_DEVICE)
        await _wait_operational(attacker, lab)
        yield attacker
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT_S):
            # Whatever still runs in it was started by this test (the attacker moved itself there).
            pids = await trio.run_process(["ip", "netns", "pids", attacker.ns], capture_stdout=True, check=False)
            for word in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(word), signal.SIGKILL)
            await trio.run_process(["ip", "netns", "del", attacker.ns], capture_stderr=True, check=False)


def hold_script(lab: Lab, client_ip: str) -> str:
    """nft: on ``gw-wifi0``'s ingress, drop the client's REATTACHes to the control port."""
    return (
        f"table netdev {HOLD_TABLE} {{\n"
        "  chain hold {\n"
        f'    type filter hook ingress device "{lab.gateway_device(ATTACKED)}" priority {HOLD_PRIORITY}; policy accept;\n'
        f"    ip saddr {client_ip} udp dport {CONTROL_PORT}"
        f" @th,{VERSION_BITS},8 {wire.PROTOCOL_VERSION} @th,{TYPE_BITS},8 {int(wire.MessageType.REATTACH)} counter drop\n"
        "  }\n"
        "}\n"
    )


@contextlib.asynccontextmanager
async def reattach_hold(lab: Lab, client_ip: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Install the hold; yield a function that lifts it (idempotent); lifted on any exit."""
    await lab.run(lab.gateway_ns, "nft", "-f", "-", stdin=hold_script(lab, client_ip).encode())
    held = True

    async def lift() -> None:
        nonlocal held
        if held:
            await lab.run(lab.gateway_ns, "nft", "delete", "table", "netdev", HOLD_TABLE)
            held = False

    try:
        yield lift
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT_S), contextlib.suppress(LabError):
            await lift()


def two_path_spec() -> LabSpec:
    """A fresh lab of :data:`PATHS`."""
    return LabSpec(prefix=unique_prefix(), paths=PATHS)


def events(path: Path) -> list[EmitEvent]:
    """The event log's complete lines, decoded (the process may be writing the next one)."""
    text = path.read_text() if path.exists() else ""
    return [EmitEvent.from_dict(json.loads(line)) for line in text.split("\n")[:-1] if line]


def read_report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def until(condition: Callable[[], object], *alive: LabProcess) -> None:
    """Poll ``condition()`` until true; fail at once if one of ``alive`` exits (the caller bounds it)."""
    while not condition():
        for process in alive:
            assert process.returncode is None, f"{process!r} exited"
        await trio.sleep(STATUS_POLL_S)


def unbroken(log: list[EmitEvent]) -> list[EmitEvent]:
    """``log``, or AssertionError at once if the attack succeeded or the session under attack ended.

    A binding on the attacker's address is the failure itself (the issue's symptom); a session
    the gateway ended means the client started over, so what the test waits for cannot happen.
    """
    assert bound_at(log, ATTACKER_IP) == [], f"the gateway bound the session to the attacker: {bound_at(log, ATTACKER_IP)}"
    ended = [e for e in log if e.kind is EventKind.STATE_CHANGE and e.detail("to_state") == "TERMINATED"]
    assert not ended, ended
    return log


def gave_up_on(log: list[EmitEvent], endpoint: str) -> list[EmitEvent]:
    return [
        e for e in log
        if e.kind is EventKind.SECURITY_EVENT and e.reason is ReasonCode.PATH_NOT_VALIDATED
        and e.detail("endpoint") == endpoint
    ]  # fmt: skip


def bound_at(log: list[EmitEvent], host: str) -> list[EmitEvent]:
    """The gateway's STATE_CHANGEs whose new binding's endpoint is ``host``."""
    return [
        e for e in log
        if e.kind is EventKind.STATE_CHANGE and str(e.detail("binding") or "").split("@")[-1].startswith(f"{host}:")
    ]  # fmt: skip


def mentions(event: EmitEvent, host: str) -> bool:
    return any(host in str(value) for _, value in event.details)


async def session_status(tunnel: Tunnel) -> dict[str, Any]:
    """The gateway's one session, as its status reports it."""
    (session,) = (await tunnel.gateway_status())["sessions"]
    assert isinstance(session, dict)
    return session


@requires_lab
async def test_held_back_reattach_sent_by_an_on_path_attacker_is_challenged_and_never_moves_the_binding(
    tmp_path: Path,
) -> None:
    spec = two_path_spec()
    (wifi,) = [p for p in PATHS if p.name == ATTACKED]
    wifi_ip, _ = spec.link_addresses(wifi)
    py = sys.executable
    attacker_report, stop_file = tmp_path / "attacker.json", tmp_path / "attacker.stop"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_lab(spec) as lab, attacker_namespace(lab) as attacker:
            assert lab.path_addresses(ATTACKED)[0] == wifi_ip
            tunnel = await start_tunnel(lab, tmp_path, policy=POLICY)
            await tunnel.wait_status(lambda s: s.get("state") == "ATTACHED" and str(s.get("binding")).startswith("p1@"))
            first_probe = tmp_path / "probe-sink.first"
            sink = await start_tool(
                lab, lab.gateway_ns, "udp-probe-sink", "--first-probe", str(first_probe),
                directory=tmp_path, name="probe-sink", listen=f"{GATEWAY_TUNNEL}:{STREAM_PORT}",
            )  # fmt: skip
            source = await start_tool(
                lab, lab.client_ns, "udp-probe-source", "--connect", f"{GATEWAY_TUNNEL}:{STREAM_PORT}",
                "--hz", str(STREAM_HZ), "--duration", str(STREAM_S), directory=tmp_path, name="probe-source",
            )  # fmt: skip
            await until(first_probe.exists, tunnel.client, tunnel.gateway, sink.process)

            async with reattach_hold(lab, wifi_ip) as lift_hold:
                attacker_process = await lab.start_process(
                    lab.gateway_ns,
                    [py, "-c", ATTACKER_SCRIPT, str(attacker_report), lab.gateway_device(ATTACKED), wifi_ip,
                     str(CONTROL_PORT), str(attacker.netns_file), ATTACKER_IP, str(ATTACKER_PORT),
                     lab.gateway_address, str(COPIES), str(stop_file), str(wire.PROTOCOL_VERSION),
                     str(int(wire.MessageType.REATTACH)), str(ATTACKER_LIFETIME_S)],
                    stderr_path=tmp_path / "attacker.err",
                )  # fmt: skip
                await until(attacker_report.exists, attacker_process)
                before = await session_status(tunnel)

                # The active path dies; the client reattaches on wifi0, where the attacker waits.
                await lab.blackhole(ACTIVE, True)
                gateway_log = tunnel.events_path("gateway")
                await until(
                    lambda: gave_up_on(unbroken(events(gateway_log)), attacker.endpoint),
                    tunnel.client, tunnel.gateway, attacker_process,
                )  # fmt: skip
                while_held = await session_status(tunnel)
                stop_file.touch()
                await attacker_process.wait()
                await lift_hold()

            # The client's own retry from wifi0 now reaches the gateway: challenged there, answered, bound.
            await until(lambda: bound_at(unbroken(events(gateway_log)), wifi_ip), tunnel.client, tunnel.gateway)
            confirmed_seen_at = time.monotonic()
            after = await tunnel.wait_status(lambda s: str(s.get("binding")).startswith("p2@"))
            source_report = await source.finish()
            sink_report = await sink.finish()
            await tunnel.stop()
            errors = {side: (tmp_path / f"{side}.err").read_text() for side in ("gateway", "client", "attacker")}

    gateway_events, client_events = tunnel.events("gateway"), tunnel.events("client")
    seen = read_report(attacker_report)
    for side, text in errors.items():
        assert "Traceback" not in text, (side, text)

    # -- the attack is real: the client's REATTACH was held back, the copy reached the gateway ----
    assert seen["held_back"] >= 1, seen
    assert seen["sent"] and len(seen["sent"]) == COPIES, seen
    timeouts = [e for e in client_events if e.kind is EventKind.REATTACH_REJECTED and e.reason is ReasonCode.REATTACH_TIMEOUT]
    assert any(e.detail("path") == "p2" for e in timeouts), timeouts  # the client waited in vain on wifi0
    # The gateway authenticated the copy, found it fresh and acceptable (before path validation it
    # would have switched here) and challenged the attacker's address: exactly one challenge.
    challenge_len = wire.TRANSPORT_OVERHEAD + wire.PATH_CHECK_LEN
    assert seen["received"] == [
        {"source": f"{lab.gateway_address}:{CONTROL_PORT}", "len": challenge_len,
         "version": wire.PROTOCOL_VERSION, "type": int(wire.MessageType.PATH_CHALLENGE)},
    ], seen  # fmt: skip
    # Amplification: no more datagrams than distinct requests, no more bytes than one request.
    assert sum(r["len"] for r in seen["received"]) <= min(seen["sent"]), seen

    # -- the defence: a SECURITY_EVENT, the binding and the version never moved --------------------
    (unvalidated, *_) = gave_up_on(gateway_events, attacker.endpoint)
    copies_refused = [
        e for e in gateway_events
        if e.kind is EventKind.SECURITY_EVENT and e.reason is ReasonCode.REPLAYED_COUNTER
        and e.detail("endpoint") == attacker.endpoint
    ]  # fmt: skip
    assert len(copies_refused) == COPIES - 1, copies_refused
    assert unvalidated.detail("path") == "p2", unvalidated
    assert [e for e in gateway_events if mentions(e, ATTACKER_IP) and e.kind is not EventKind.SECURITY_EVENT] == []
    assert bound_at(gateway_events, ATTACKER_IP) == []
    assert [e for e in gateway_events if e.kind is EventKind.TRANSPORT_SWITCH and mentions(e, ATTACKER_IP)] == []
    assert (while_held["version"], while_held["binding"]) == (before["version"], before["binding"]), (before, while_held)
    assert str(before["binding"]).startswith("p1@"), before

    # -- the client's own retry was validated on wifi0 and is the very next version ----------------
    (to_wifi, *later) = bound_at(gateway_events, wifi_ip)
    assert later == [], later
    assert to_wifi.reason is ReasonCode.REATTACH_CONFIRMED, to_wifi
    assert to_wifi.version == before["version"] + 1, (before, to_wifi)
    assert to_wifi.detail("path_validation") == "challenge", to_wifi
    assert int(str(to_wifi.detail("nonce"))) > int(str(unvalidated.detail("nonce"))), (to_wifi, unvalidated)
    changes = [e for e in gateway_events if e.kind is EventKind.STATE_CHANGE]
    assert [e.version for e in changes] == list(range(len(changes))), changes
    assert {e.session for e in gateway_events + client_events} == {after["session"]}

    # -- the stream resumed, over wifi0 (eth0 dropped everything from the blackhole on) -----------
    assert source_report["sent"] > 0, source_report
    arrivals = [sink_report["start"] + t for _, t in sink_report["arrivals"]]
    resumed = [t for t in arrivals if t > confirmed_seen_at]
    assert resumed, (confirmed_seen_at, sink_report["end"])
