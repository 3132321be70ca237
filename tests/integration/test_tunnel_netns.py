"""The real thing: gateway and client processes, TUN devices, policy routing, faults.

A TCP stream and a 100 Hz UDP probe stream run through the tunnel (client
namespace -> gateway's tunnel address) while the test, in turn, takes the
active link down, blackholes the active path, drops a random share of its
packets above the loss threshold, and restores each.  Asserted: the TCP
connection never resets and every byte arrives intact; the SessionID never
changes; every switch is in both event logs with a reason code; the
gateway's log shows exactly one binding at every point and consecutive
versions; a REATTACH captured on the wire and replayed from another address
is rejected with no state change.  Each fault's outage (longest gap in the
probe stream) is printed: reported, not asserted.

Determinism rules: every wait is bounded (fail_after) and polls a real
condition (status, ready files); the assertions are causal (what arrived,
what the logs say), never wall-clock durations.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import trio

from jvpn_trio.core import wire
from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.config import DEFAULT_CONTROL_PORT_OFFSET as CONTROL_PORT_OFFSET
from jvpn_trio.lab.netns import Lab
from jvpn_trio.lab.traffic import longest_gap
from tests.integration.tunnel_lab import GATEWAY_TUNNEL, PORT, start_tunnel
from tests.netns import lab, requires_lab, start_server  # noqa: F401  (lab is a fixture)

#: Faster return to the preferred path than the laptop default, so each fault starts on eth0;
#: enough switches per minute for the whole scenario.
POLICY = {"min_dwell_ms": 500, "return_dwell_ms": 1000, "max_switches_per_minute": 12}
FAULT_S = 3.0
SETTLE_S = 3.5
TCP_RATE_MBIT = 8.0

CAPTURE = r"""
import socket, struct, sys, time
out, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.settimeout(0.2)
while time.monotonic() < deadline:
    try:
        pkt = s.recv(65535)
    except socket.timeout:
        continue
    ihl = (pkt[0] & 0x0F) * 4
    if pkt[9] != 17 or struct.unpack("!H", pkt[ihl + 2:ihl + 4])[0] != port:
        continue
    payload = pkt[ihl + 8:]
    if len(payload) > 1 and payload[0] == VERSION and payload[1] == REATTACH:
        open(out, "w").write(payload.hex())
        break
""".replace("VERSION", str(wire.PROTOCOL_VERSION), 1).replace("REATTACH:", f"{int(wire.MessageType.REATTACH)}:", 1)

REPLAY = r"""
import socket, sys
data = bytes.fromhex(open(sys.argv[1]).read())
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[4].encode())
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(sys.argv[6], 0))  # the path's mark: the kill switch lets it out
s.bind((sys.argv[5], 55555))
s.sendto(data, (sys.argv[2], int(sys.argv[3])))
"""


async def active_path(tunnel, lab: Lab) -> str:  # type: ignore[no-untyped-def]
    status = await tunnel.client_status()
    binding = status["binding"]
    index = int(binding.split("@")[0][1:])  # "p1@10.99.0.1:51820" -> 1
    return lab.paths[index - 1].name


def switches(events: list[EmitEvent]) -> list[EmitEvent]:
    return [e for e in events if e.kind is EventKind.TRANSPORT_SWITCH]


@requires_lab
async def test_tcp_survives_every_fault_and_replay_is_rejected(lab: Lab, tmp_path: Path) -> None:
    with trio.fail_after(150):
        tunnel = await start_tunnel(lab, tmp_path, policy=POLICY)
        await tunnel.wait_attached()
        session = (await tunnel.client_status())["session"]
        py = sys.executable
        capture = await lab.start_process(
            lab.gateway_ns,
            [py, "-c", CAPTURE, str(tmp_path / "reattach.hex"), str(PORT + CONTROL_PORT_OFFSET), "60"],
        )
        duration = 4 * (FAULT_S + SETTLE_S) + 2.0
        sink = await start_server(
            lab, lab.gateway_ns, "tcp-sink", f"{GATEWAY_TUNNEL}:5001", tmp_path=tmp_path, name="tcp-sink"
        )
        probes = await start_server(
            lab, lab.gateway_ns, "udp-probe-sink", f"{GATEWAY_TUNNEL}:5002", tmp_path=tmp_path, name="probe-sink"
        )
        tcp_source = await lab.start_process(
            lab.client_ns,
            [py, "-m", "jvpn_trio.lab.traffic", "tcp-source", "--connect", f"{GATEWAY_TUNNEL}:5001",
             "--rate-mbit", str(TCP_RATE_MBIT), "--duration", str(duration), "--report", str(tmp_path / "tcp-source.json")],
            stderr_path=tmp_path / "tcp-source.err",
        )
        probe_source = await lab.start_process(
            lab.client_ns,
            [py, "-m", "jvpn_trio.lab.traffic", "udp-probe-source", "--connect", f"{GATEWAY_TUNNEL}:5002",
             "--hz", "100", "--duration", str(duration), "--report", str(tmp_path / "probe-source.json")],
            stderr_path=tmp_path / "probe-source.err",
        )
        await trio.sleep(2.0)

        faults: list[tuple[str, str, float]] = []
        for name in ("link-down", "blackhole", "loss", "none (control)"):
            victim = await active_path(tunnel, lab)
            started = time.monotonic()
            if name == "link-down":
                await lab.link_down(victim)
            elif name == "blackhole":
                await lab.blackhole(victim, True)
            elif name == "loss":
                await lab.loss(victim, 60.0)
            faults.append((name, victim, started))
            await trio.sleep(FAULT_S)
            await lab.restore_all()
            await trio.sleep(SETTLE_S)

        await tcp_source.wait()
        tcp_sink = await sink.finish()
        tcp_sent = json.loads((tmp_path / "tcp-source.json").read_text())
        await probe_source.wait()
        probe_report = await probes.finish()
        await capture.wait()

        # A REATTACH captured on the wire, replayed from another address (lte0, port 55555).
        before = await tunnel.gateway_status()
        lte_client_ip, _ = lab.path_addresses("lte0")
        await lab.run(
            lab.client_ns, py, "-c", REPLAY, str(tmp_path / "reattach.hex"), lab.gateway_address,
            str(PORT + CONTROL_PORT_OFFSET),
            "lte0", lte_client_ip, hex(0x5100 + 3),  # fwmark_base + lte0's path id (p3)
        )
        await trio.sleep(0.5)
        after = await tunnel.gateway_status()

        await tunnel.client.terminate()
        await tunnel.gateway.terminate()

    # -- the stream survived, intact -------------------------------------------------------
    assert not tcp_sent["reset"] and tcp_sent["error"] is None, tcp_sent
    assert not tcp_sink["reset"] and tcp_sink["error"] is None, tcp_sink
    assert tcp_sink["bytes"] == tcp_sent["bytes"] > 0
    assert tcp_sink["sha256"] == tcp_sent["sha256"]

    # -- one session, every switch logged with a reason -----------------------------------
    client_events, gateway_events = tunnel.events("client"), tunnel.events("gateway")
    assert {e.session for e in client_events + gateway_events} == {session}
    client_switches = switches(client_events)
    causes = [e.reason for e in client_switches]
    assert ReasonCode.LINK_DOWN in causes
    assert {ReasonCode.MISSED_PROBES, ReasonCode.LOSS_ABOVE_THRESHOLD, ReasonCode.DATA_UNANSWERED} & set(causes)
    assert ReasonCode.PREFERRED_PATH_RESTORED in causes
    assert len(client_switches) >= 6  # away and back for each of the three faults
    assert len(switches(gateway_events)) == len(client_switches)

    # -- the gateway's log: one binding at every point, consecutive versions ------------------
    changes = [e for e in gateway_events if e.kind is EventKind.STATE_CHANGE]
    assert [e.version for e in changes] == list(range(len(changes)))
    # Replay the log: each STATE_CHANGE names the one binding after it; a TRANSPORT_SWITCH must move
    # from the binding before that change to the one after it, so two can never be active at once.
    previous, binding = None, None
    for e in gateway_events:
        if e.kind is EventKind.STATE_CHANGE:
            previous, binding = binding, e.detail("binding")
        elif e.kind is EventKind.TRANSPORT_SWITCH:
            assert binding is not None and str(binding).startswith(f"{e.detail('to_path')}@"), (binding, e)
            if previous is not None:
                assert str(previous).startswith(f"{e.detail('from_path')}@"), (previous, e)

    # -- the replayed REATTACH changed nothing and was logged as a security event -------------
    assert (tmp_path / "reattach.hex").exists(), "no REATTACH was captured on the wire"
    (s_before,), (s_after,) = before["sessions"], after["sessions"]
    assert (s_after["version"], s_after["binding"], s_after["state"]) == (
        s_before["version"], s_before["binding"], s_before["state"]
    )
    replays = [
        e for e in gateway_events
        if e.kind is EventKind.SECURITY_EVENT and e.detail("endpoint") == f"{lte_client_ip}:55555"
    ]
    assert replays and replays[0].reason in (ReasonCode.REPLAYED_COUNTER, ReasonCode.REPLAYED_NONCE)

    # -- reported, not asserted: each fault's outage ----------------------------------------------
    arrivals = [probe_report["start"] + t for _, t in probe_report["arrivals"]]  # relative to the stream start
    stream_end = probe_report["end"]
    for name, victim, started in faults:
        gap = longest_gap(arrivals, started, min(started + FAULT_S + SETTLE_S, stream_end))
        print(f"outage {name:14} on {victim:5}: {gap.seconds * 1000:7.1f} ms")
