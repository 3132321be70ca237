"""Nothing leaks: a capture on every interface of the client namespace while the tunnel is hit by faults.

Real ``jvpn-trio serve`` and ``jvpn-trio up`` processes in a lab (full tunnel,
so the kill switch is on by default).  One AF_PACKET socket, opened inside the
client namespace and bound to no interface, sees every frame that *leaves*
any interface there (``PACKET_OUTGOING``) except loopback and the TUN; a frame
is allowed only if it is ARP, UDP to the gateway's data or control port, DHCP
(v4 68->67, v6 546->547), ICMPv6 router/neighbour solicitation/advertisement
or MLD, or IGMP.  Anything else is a leak, recorded with the phase it
happened in.  A 100 Hz UDP stream and a TCP stream run through the tunnel
while, in turn:

1. steady state;
2. the active link goes down (the session moves);
3. every path goes down, and comes back;
4. the gateway is killed (the agent reconnects in vain), and started again:
   the agent goes from one session to the next;
5. the agent is killed with SIGKILL: the block stays (a UDP send to the
   router and to the gateway from the namespace fails with EPERM), ``up``
   refuses to start over the leftovers with one line naming ``down``, and
   ``jvpn-trio down`` removes them;

then ``ip rule``, ``ip route show table all`` (both families), ``nft list
ruleset`` and the resolver are compared with the snapshot taken before ``up``.
Last, a control: with the kill switch gone, the same UDP send leaves and the
capture sees it, so the capture is not blind.  The capture's own drop counter
(PACKET_STATISTICS) must be zero, or "nothing seen" would prove nothing.

A second test stops a running agent with ``jvpn-trio down`` (authenticated
CLOSE, the gateway logs it), starts it again, stops it with SIGTERM, and
compares the snapshot after each with the one from before.

Determinism rules: every wait is bounded (``trio.fail_after``) and polls a real
condition (the client's status, the kernel's state); the assertions are
causal (what left an interface, what the kernel holds), never durations.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Callable

import attrs
import trio

from jvpn_trio.config import DEFAULT_CONTROL_PORT_OFFSET
from jvpn_trio.core.actions import EventKind
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers import killswitch
from jvpn_trio.drivers.control import ControlError
from jvpn_trio.lab.netns import Lab
from jvpn_trio.lab.processes import CLIENT_TUN, GATEWAY_TUNNEL, PORT, STATUS_POLL_S, Tunnel, Tool, start_tool, start_tunnel
from jvpn_trio.lab.runner import socket_in_namespace
from tests.netns import lab, requires_lab  # noqa: F401  (lab is a fixture)

POLICY = {"handshake_retry_ms": 300, "return_dwell_ms": 500, "max_switches_per_minute": 30}
GATEWAY_PORTS = frozenset({PORT, PORT + DEFAULT_CONTROL_PORT_OFFSET})
#: Bound on each test, and on each wait for the client's state.
TEST_BOUND_S = 60.0
STATE_BOUND_S = 15.0
#: How long the streams run: longer than every phase together (the lab stops them at teardown).
STREAM_S = 60.0
TCP_RATE_MBIT = 2.0
#: Frames the capture must have seen in steady state before the faults start (the streams flow).
STEADY_FRAMES = 200
#: While blocked, sends are also given this long to show up anywhere (an observation window, not a verdict).
OBSERVE_S = 0.5
CAPTURE_RCVBUF = 32 * 1024 * 1024
SNAPSHOT_POLL_S = 0.1

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
ICMPV6_ALLOWED = frozenset({131, 132, 133, 135, 136, 143})  # MLD report/done, RS, NS, NA, MLDv2 report
IPV6_EXTENSION_HEADERS = frozenset({0, 43, 60})  # hop-by-hop (MLD's router alert), routing, destination

#: Sends one UDP datagram to each ADDR:PORT argument and prints what happened to each (JSON).
SEND_UDP = r"""
import errno, json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"does this leak?", (host, int(port)))
            out[target] = "sent"
        except OSError as e:
            out[target] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def classify(frame: bytes, *, gateway: str) -> str | None:
    """None if an outgoing Ethernet frame is one the kill switch lets out, else a description of the leak."""
    if len(frame) < 14:
        return f"runt frame of {len(frame)} bytes"
    ethertype = struct.unpack("!H", frame[12:14])[0]
    packet = frame[14:]
    if ethertype == 0x0806:
        return None  # ARP
    if ethertype == 0x0800:
        ihl = (packet[0] & 0x0F) * 4
        proto, src, dst = packet[9], socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
        if proto == 2:
            return None  # IGMP
        if proto == 17:
            sport, dport = struct.unpack("!HH", packet[ihl : ihl + 4])
            if (dst == gateway and dport in GATEWAY_PORTS) or (sport, dport) == (68, 67):
                return None
            return f"IPv4 UDP {src}:{sport} -> {dst}:{dport}"
        if proto == 6:
            sport, dport = struct.unpack("!HH", packet[ihl : ihl + 4])
            return f"IPv4 TCP {src}:{sport} -> {dst}:{dport}"
        return f"IPv4 protocol {proto} {src} -> {dst}"
    if ethertype == 0x86DD:
        nxt, offset = packet[6], 40
        src, dst = socket.inet_ntop(socket.AF_INET6, packet[8:24]), socket.inet_ntop(socket.AF_INET6, packet[24:40])
        while nxt in IPV6_EXTENSION_HEADERS:
            nxt, offset = packet[offset], offset + (packet[offset + 1] + 1) * 8
        if nxt == 58 and packet[offset] in ICMPV6_ALLOWED:
            return None
        if nxt == 17:
            sport, dport = struct.unpack("!HH", packet[offset : offset + 4])
            if (sport, dport) == (546, 547):
                return None
            return f"IPv6 UDP [{src}]:{sport} -> [{dst}]:{dport}"
        return f"IPv6 next header {nxt} {src} -> {dst}"
    return f"ethertype {ethertype:#06x}"


@attrs.define
class Capture:
    """Every frame leaving an interface of the client namespace but lo and the TUN, by phase."""

    gateway: str
    phase: str = "start"
    allowed: dict[str, int] = attrs.Factory(dict)
    leaks: list[tuple[str, str, str]] = attrs.Factory(list)  # (phase, interface, description)
    kernel_drops: int = 0

    async def run(self, sock: trio.socket.SocketType, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            frame, address = await sock.recvfrom(65535)
            ifname, _proto, pkttype = address[0], address[1], address[2]
            if pkttype != PACKET_OUTGOING or ifname in ("lo", CLIENT_TUN):
                continue
            leak = classify(frame, gateway=self.gateway)
            if leak is None:
                self.allowed[self.phase] = self.allowed.get(self.phase, 0) + 1
            else:
                self.leaks.append((self.phase, ifname, leak))

    def leaks_in(self, *phases: str) -> list[tuple[str, str, str]]:
        return [leak for leak in self.leaks if leak[0] in phases]


def _capture_socket() -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_RCVBUF)
    sock.setblocking(False)
    return sock


def kernel_drops(sock: socket.socket) -> int:
    """Frames the kernel dropped because the capture's buffer was full (PACKET_STATISTICS, since the last read)."""
    _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return int(drops)


async def snapshot(lab: Lab) -> dict[str, list[str]]:
    """The client namespace's routing, firewall and resolver, one sorted list of lines each.

    Taken once no IPv6 address is tentative any more: the kernel adds an address's local
    route only when duplicate address detection has finished.
    """
    with trio.fail_after(5.0):
        while (await lab.run(lab.client_ns, "ip", "-6", "addr", "show", "tentative")).stdout.strip():
            await trio.sleep(SNAPSHOT_POLL_S)
    commands = {
        "ip -4 rule": ["ip", "-4", "rule"],
        "ip -6 rule": ["ip", "-6", "rule"],
        "ip -4 route show table all": ["ip", "-4", "route", "show", "table", "all"],
        "ip -6 route show table all": ["ip", "-6", "route", "show", "table", "all"],
        "nft list ruleset": ["nft", "list", "ruleset"],
        "resolv.conf": ["cat", "/etc/resolv.conf"],
    }
    out = {}
    for name, argv in commands.items():
        result = await lab.run(lab.client_ns, *argv)
        out[name] = sorted(line.rstrip() for line in result.stdout.decode().splitlines() if line.strip())
    return out


def diff(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, tuple[list[str], list[str]]]:
    """Per snapshot entry that differs: (lines only before, lines only after)."""
    return {
        k: (sorted(set(before[k]) - set(after[k])), sorted(set(after[k]) - set(before[k])))
        for k in before
        if before[k] != after.get(k)
    }


async def wait_snapshot_equal(lab: Lab, before: dict[str, list[str]]) -> dict[str, list[str]]:
    """The snapshot once it equals ``before`` (link-local routes come back asynchronously); else the last one."""
    with trio.move_on_after(5.0):
        while (now := await snapshot(lab)) != before:
            await trio.sleep(SNAPSHOT_POLL_S)
        return now
    return await snapshot(lab)


async def send_udp(lab: Lab, *targets: str) -> dict[str, str]:
    result = await lab.run(lab.client_ns, sys.executable, "-c", SEND_UDP, *targets)
    data: dict[str, str] = json.loads(result.stdout)
    return data


async def jvpn(lab: Lab, *args: str) -> tuple[int, str, str]:
    result = await lab.run(lab.client_ns, sys.executable, "-m", "jvpn_trio", *args, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def active_interface(status: dict[str, Any]) -> str | None:
    for p in status.get("paths", []):
        if p.get("path") == status.get("active_path"):
            return str(p["interface"])
    return None


async def wait_state(tunnel: Tunnel, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The client's status once ``predicate`` holds (the gateway may be dead meanwhile); bounded."""
    with trio.fail_after(STATE_BOUND_S):
        while True:
            assert tunnel.client.returncode is None, (tunnel.directory / "client.err").read_text()
            try:
                status = await tunnel.client_status()
            except ControlError:
                status = {}
            if status and predicate(status):
                return status
            await trio.sleep(STATUS_POLL_S)


def attached(status: dict[str, Any]) -> bool:
    return status.get("state") == "ATTACHED"


async def start_streams(lab: Lab, tmp_path: Path) -> list[Tool]:
    """A TCP stream and a 100 Hz UDP stream from the client to the gateway's tunnel address; the sources."""
    await start_tool(lab, lab.gateway_ns, "tcp-sink", directory=tmp_path, name="tcp-sink", listen=f"{GATEWAY_TUNNEL}:5001")
    await start_tool(
        lab, lab.gateway_ns, "udp-probe-sink", directory=tmp_path, name="probe-sink", listen=f"{GATEWAY_TUNNEL}:5002"
    )
    tcp = await start_tool(
        lab, lab.client_ns, "tcp-source", "--connect", f"{GATEWAY_TUNNEL}:5001", "--rate-mbit", str(TCP_RATE_MBIT),
        "--duration", str(STREAM_S), directory=tmp_path, name="tcp-source",
    )  # fmt: skip
    udp = await start_tool(
        lab, lab.client_ns, "udp-probe-source", "--connect", f"{GATEWAY_TUNNEL}:5002", "--hz", "100",
        "--duration", str(STREAM_S), directory=tmp_path, name="probe-source",
    )  # fmt: skip
    return [tcp, udp]


@requires_lab
async def test_nothing_leaks_through_faults_a_crash_and_down(lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    router_eth0 = lab.path_addresses("eth0")[1]
    blocked_targets = (f"{router_eth0}:9", f"{lab.gateway_address}:9", f"{GATEWAY_TUNNEL}:5002")
    with trio.fail_after(TEST_BOUND_S):
        before = await snapshot(lab)
        raw = socket_in_namespace(lab.client_ns, _capture_socket)
        capture = Capture(gateway=lab.gateway_address)
        with trio.socket.from_stdlib_socket(raw) as sock:
            async with trio.open_nursery() as nursery:
                await nursery.start(capture.run, sock)

                capture.phase = "steady"
                tunnel = await start_tunnel(lab, tmp_path, policy=POLICY)
                await wait_state(tunnel, attached)
                assert await killswitch.is_installed(netns=lab.client_ns)
                streams = await start_streams(lab, tmp_path)
                while capture.allowed.get("steady", 0) < STEADY_FRAMES:
                    await trio.sleep(0.05)

                capture.phase = "active link down"
                victim = active_interface(await tunnel.client_status())
                assert victim is not None
                await lab.link_down(victim)
                await wait_state(tunnel, lambda s: attached(s) and active_interface(s) not in (None, victim))
                await lab.restore_all()
                await wait_state(tunnel, attached)

                capture.phase = "every path down"
                for path in lab.paths:
                    await lab.link_down(path)
                await wait_state(tunnel, lambda s: not attached(s))
                await lab.restore_all()
                await wait_state(tunnel, attached)

                capture.phase = "gateway gone"
                sessions = (await tunnel.client_status())["sessions_started"]
                await tunnel.kill_gateway()
                await wait_state(tunnel, lambda s: not attached(s))
                # The LAN is blocked; the rest is routed into the TUN, where the agent drops it.
                assert await send_udp(lab, *blocked_targets) == dict(zip(blocked_targets, ("EPERM", "sent", "sent")))

                capture.phase = "between two sessions"
                await tunnel.start_gateway()
                await wait_state(tunnel, lambda s: attached(s) and s.get("sessions_started") == sessions + 1)

                capture.phase = "agent killed"
                await tunnel.client.kill()
                tun_gone = await lab.run(lab.client_ns, "ip", "link", "show", CLIENT_TUN, check=False)
                assert tun_gone.returncode != 0  # the kernel removed the TUN with its process ...
                assert await killswitch.is_installed(netns=lab.client_ns)  # ... but not the block
                assert set((await send_udp(lab, *blocked_targets)).values()) == {"EPERM"}
                await trio.sleep(OBSERVE_S)  # the streams keep trying meanwhile

                code, _out, err = await jvpn(lab, "up", "--config", str(tmp_path / "client.toml"), "--quiet")
                assert code == 2 and len(err.strip().splitlines()) == 1 and "`jvpn-trio down`" in err, err

                leaks = list(capture.leaks)
                capture.kernel_drops = kernel_drops(raw)
                for tool in streams:  # after `down` nothing would stop them: the laptop is off the VPN
                    await tool.process.terminate()
                capture.phase = "down"
                code, out, err = await jvpn(lab, "down", "--config", str(tmp_path / "client.toml"))
                assert code == 0, err
                after = await wait_snapshot_equal(lab, before)

                capture.phase = "control (no kill switch)"
                sent = await send_udp(lab, f"{router_eth0}:9")
                with trio.fail_after(5.0):
                    while not capture.leaks_in("control (no kill switch)"):
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    print("frames allowed out, by phase:", capture.allowed)
    print("down said:", out.strip().replace("\n", " | "))
    assert leaks == [], leaks
    assert capture.kernel_drops == 0
    assert all(capture.allowed.get(phase, 0) > 0 for phase in ("steady", "active link down", "between two sessions"))
    assert "removed nft table inet jvpn_trio" in out and "removed stale control socket" in out
    assert after == before, diff(before, after)
    assert sent == {f"{router_eth0}:9": "sent"}
    assert any(f"-> {router_eth0}:9" in leak for _phase, _dev, leak in capture.leaks_in("control (no kill switch)"))


@requires_lab
async def test_down_and_sigterm_close_the_session_and_restore_everything(lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    config = str(tmp_path / "client.toml")
    with trio.fail_after(TEST_BOUND_S):
        before = await snapshot(lab)
        tunnel = await start_tunnel(lab, tmp_path, policy=POLICY)
        first = await wait_state(tunnel, attached)

        code, out, err = await jvpn(lab, "down", "--config", config)
        assert code == 0, err
        assert await tunnel.client.wait() == 0
        after_down = await wait_snapshot_equal(lab, before)
        code, again, err = await jvpn(lab, "down", "--config", config)  # idempotent: nothing left
        assert code == 0 and "nothing to do" in again, (again, err)

        # Up again (no leftovers now), and stopped the other clean way: SIGTERM.
        client = await lab.start_process(
            lab.client_ns, [sys.executable, "-m", "jvpn_trio", "up", "--config", config, "--quiet"],
            stderr_path=tmp_path / "client2.err",
        )  # fmt: skip
        tunnel.client = client
        second = await wait_state(tunnel, attached)
        assert await killswitch.is_installed(netns=lab.client_ns)
        assert await client.terminate() == 0
        after_sigterm = await wait_snapshot_equal(lab, before)
        await tunnel.gateway.terminate()

    assert "asked the agent" in out and "closed its session and stopped" in out, out
    assert after_down == before, diff(before, after_down)
    assert after_sigterm == before, diff(before, after_sigterm)
    closes = [
        e for e in tunnel.events("gateway")
        if e.kind is EventKind.STATE_CHANGE and e.detail("to_state") == "TERMINATED"
        and e.reason is ReasonCode.PEER_CLOSE
    ]  # fmt: skip
    assert {e.session for e in closes} >= {first["session"], second["session"]}, closes
    stderr = (tmp_path / "client.err").read_text() + (tmp_path / "client2.err").read_text()
    assert "Traceback" not in stderr, stderr

