"""IPv6 in the tunnel, IPv6 blocked when only IPv4 is tunnelled, and an IPv6 gateway endpoint (root).

Real ``jvpn-trio serve`` and ``jvpn-trio up`` processes in a three-path lab whose paths carry
IPv6 as well (``LabSpec.ipv6``: ``fd77:4d:<i>::2/64`` on the client, a default IPv6 route per
path, the gateway at ``fd99::1`` on its loopback).  The gateway namespace drops whatever reaches
a tunnel address (``10.66.0.0/24``, ``fd6a:7670::/64``) other than through its TUN
(``processes.guard_tunnel``), so an answer from a tunnel address proves the tunnel carried it.

1. ``tunnel_address6`` and routes ``0.0.0.0/0`` + ``::/0``: ICMPv6 echo, a UDP echo and a TCP
   stream reach the gateway's tunnel IPv6 address; ``ip -6 route get 2001:db8::1`` says the TUN.
2. routes ``0.0.0.0/0`` only (kill switch off, so routing alone is tested): before ``up`` IPv6
   leaves by eth0 (the test could fail); while it runs ``ip -6 route get 2001:db8::1`` is
   unreachable, never a physical interface, and a UDP send there fails.
3. The gateway endpoint ``[fd99::1]:51820``: the session comes up over the paths' IPv6 and
   carries IPv4; no ``AddressValueError`` anywhere.
4. The gateway listens on ``0.0.0.0:P`` and ``[::]:P`` at once (IPV6_V6ONLY) and serves a client
   over IPv6.
5. The gateway forwards IPv6 to a network behind it, and the answers come back through the tunnel.

Determinism rules: every wait is bounded (fail_after) and polls a real condition (status,
ready files); assertions are causal (what arrived, what the kernel answers), never durations.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from jvpn_trio.lab.netns import Lab
from jvpn_trio.lab.traffic import traffic_argv
from jvpn_trio.lab.processes import (
    CLIENT_TUN,
    CLIENT_TUNNEL6,
    GATEWAY_TUNNEL,
    GATEWAY_TUNNEL6,
    PORT,
    Tunnel,
    TunnelOptions,
    start_tunnel,
)
from tests.netns import lab, requires_lab, run_tool, start_server  # noqa: F401  (lab is a fixture)

#: Somewhere on the IPv6 internet (the documentation prefix): no lab route is specific to it.
INTERNET6 = "2001:db8::1"
POLICY: dict[str, Any] = {}
PHYSICAL = ("eth0", "wifi0", "lte0")

PING6 = r"""
import socket, struct, sys, time
dst, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)  # the kernel fills the checksum
s.settimeout(1.0)
got = 0
for seq in range(count):
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x6a76, seq) + b"jvpn-ipv6", (dst, 0))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            break
        if data[0] == 129 and struct.unpack("!HH", data[4:8]) == (0x6a76, seq) and src[0] == dst:
            got += 1
            break
print(f'{{"sent": {count}, "received": {got}}}')
"""

UDP_SEND = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
try:
    s.sendto(b"leak?", (sys.argv[1], 9))
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc.errno)))
else:
    print("SENT")
"""


async def route6(lab: Lab, destination: str) -> tuple[int, str]:
    """``ip -6 route get DESTINATION`` in the client namespace: (exit code, stdout + stderr)."""
    done = await lab.run(lab.client_ns, "ip", "-6", "route", "get", destination, check=False)
    return done.returncode, (done.stdout + done.stderr).decode()


def device_of(answer: str) -> str | None:
    words = answer.split()
    return words[words.index("dev") + 1] if "dev" in words else None


async def start(lab: Lab, tmp_path: Path, options: TunnelOptions) -> Tunnel:
    tunnel = await start_tunnel(lab, tmp_path, policy=POLICY, options=options)
    await tunnel.wait_attached()
    return tunnel


def no_address_value_error(tunnel: Tunnel) -> None:
    for side in ("client", "gateway"):
        err = tunnel.directory / f"{side}.err"
        text = err.read_text(errors="replace") if err.exists() else ""
        assert "AddressValueError" not in text and "Traceback" not in text, text


async def udp_ping(lab: Lab, tmp_path: Path, target: str, name: str) -> dict[str, Any]:
    code, report = await run_tool(
        lab, lab.client_ns, "udp-ping", "--connect", target, "--count", "3", tmp_path=tmp_path, name=name
    )
    assert code == 0, report
    return report


@requires_lab
async def test_ipv6_through_the_tunnel(lab: Lab, tmp_path: Path) -> None:
    options = TunnelOptions(ipv6_tunnel=True, routes=("0.0.0.0/0", "::/0"))
    with trio.fail_after(90):
        tunnel = await start(lab, tmp_path, options)
        status = await tunnel.client_status()
        answer = await route6(lab, INTERNET6)
        ping = await lab.run(lab.client_ns, sys.executable, "-c", PING6, GATEWAY_TUNNEL6, "3")
        await start_server(lab, lab.gateway_ns, "udp-echo", f"[{GATEWAY_TUNNEL6}]:5003", tmp_path=tmp_path, name="echo6")
        udp = await udp_ping(lab, tmp_path, f"[{GATEWAY_TUNNEL6}]:5003", "ping6")
        sink = await start_server(
            lab, lab.gateway_ns, "tcp-sink", f"[{GATEWAY_TUNNEL6}]:5001", tmp_path=tmp_path, name="sink6"
        )
        code, sent = await run_tool(
            lab, lab.client_ns, "tcp-source", "--connect", f"[{GATEWAY_TUNNEL6}]:5001",
            "--bytes", "200000", "--rate-mbit", "20", tmp_path=tmp_path, name="source6",
        )  # fmt: skip
        received = await sink.finish()
        addresses = json.loads((await lab.run(lab.client_ns, "ip", "-j", "-6", "addr", "show", "dev", CLIENT_TUN)).stdout)
        await tunnel.stop()

    assert answer[0] == 0 and device_of(answer[1]) == CLIENT_TUN, answer
    assert [(a["local"], a["prefixlen"]) for link in addresses for a in link["addr_info"]] == [(CLIENT_TUNNEL6, 64)]
    assert json.loads(ping.stdout) == {"sent": 3, "received": 3}, ping.stderr
    assert udp["replies"] >= 1, udp
    assert code == 0 and not sent["reset"] and sent["error"] is None, sent
    assert received["bytes"] == sent["bytes"] == 200000 and received["sha256"] == sent["sha256"]
    assert status["state"] == "ATTACHED"
    no_address_value_error(tunnel)


@requires_lab
async def test_ipv6_is_blocked_when_only_ipv4_is_tunnelled(lab: Lab, tmp_path: Path) -> None:
    options = TunnelOptions(ipv6_tunnel=True, routes=("0.0.0.0/0",), kill_switch=False)
    with trio.fail_after(90):
        before = await route6(lab, INTERNET6)
        tunnel = await start(lab, tmp_path, options)
        during = await route6(lab, INTERNET6)
        send = await lab.run(lab.client_ns, sys.executable, "-c", UDP_SEND, INTERNET6)
        # The tunnel's own IPv6 subnet still goes into the tunnel (the TUN holds the address).
        inside = await route6(lab, GATEWAY_TUNNEL6)
        ping = await lab.run(lab.client_ns, sys.executable, "-c", PING6, GATEWAY_TUNNEL6, "1")
        await tunnel.stop()
        after = await route6(lab, INTERNET6)

    # Without the tunnel IPv6 leaves by a physical interface: the test can fail.
    assert before[0] == 0 and device_of(before[1]) in PHYSICAL, before
    # While it runs: unreachable (ip says "No route to host" or shows an unreachable route), no device.
    code, text = during
    assert device_of(text) not in PHYSICAL, during
    assert code != 0 or text.split()[0] in ("unreachable", "blackhole", "prohibit"), during
    assert send.stdout.decode().strip() in ("ENETUNREACH", "EHOSTUNREACH"), send
    assert device_of(inside[1]) == CLIENT_TUN, inside
    assert json.loads(ping.stdout) == {"sent": 1, "received": 1}
    # Stopped: every route and rule is gone, IPv6 leaves by eth0 again.
    assert device_of(after[1]) in PHYSICAL, after
    no_address_value_error(tunnel)


@requires_lab
async def test_ipv6_gateway_endpoint_carries_ipv4(lab: Lab, tmp_path: Path) -> None:
    options = TunnelOptions(gateway_ipv6=True, routes=("0.0.0.0/0",))
    with trio.fail_after(90):
        tunnel = await start(lab, tmp_path, options)
        status = await tunnel.wait_status(
            lambda s: s.get("state") == "ATTACHED"
            and sum(1 for p in s.get("paths") or [] if p.get("verdict") == "HEALTHY") == len(PHYSICAL)
        )
        await start_server(lab, lab.gateway_ns, "udp-echo", f"{GATEWAY_TUNNEL}:5003", tmp_path=tmp_path, name="echo4")
        udp = await udp_ping(lab, tmp_path, f"{GATEWAY_TUNNEL}:5003", "ping4")
        # The active path dies: the session moves to another path's IPv6 and still carries IPv4.
        await lab.link_down("eth0")
        moved = await tunnel.wait_status(
            lambda s: s.get("state") == "ATTACHED" and not str(s.get("binding")).startswith("p1@")
        )
        udp_after = await udp_ping(lab, tmp_path, f"{GATEWAY_TUNNEL}:5003", "ping4-after")
        gateway = await tunnel.gateway_status()
        await tunnel.stop()

    assert str(status["binding"]) == f"p1@[{lab.gateway_address6}]:{PORT}", status
    assert udp["replies"] >= 1 and udp_after["replies"] >= 1
    assert str(moved["binding"]).endswith(f"@[{lab.gateway_address6}]:{PORT}"), moved
    (session,) = gateway["sessions"]
    assert lab.path_addresses6("eth0")[0] not in str(session["binding"])  # bound to another path's IPv6
    no_address_value_error(tunnel)


@requires_lab
async def test_gateway_listens_on_both_wildcards(lab: Lab, tmp_path: Path) -> None:
    # A wildcard socket answers from the outgoing interface's address (docs/platform-notes.md 1), so
    # the client names the gateway's address on eth0's link, which is where the answers come from.
    link6 = lab.path_addresses6("eth0")[1]
    options = TunnelOptions(gateway_host=link6, listen=("0.0.0.0", "::"), routes=("0.0.0.0/0",))
    with trio.fail_after(90):
        tunnel = await start(lab, tmp_path, options)
        status = await tunnel.client_status()
        await start_server(lab, lab.gateway_ns, "udp-echo", f"{GATEWAY_TUNNEL}:5003", tmp_path=tmp_path, name="echo4")
        udp = await udp_ping(lab, tmp_path, f"{GATEWAY_TUNNEL}:5003", "ping4")
        sockets = await lab.run(lab.gateway_ns, "ss", "-uln", check=False)
        await tunnel.stop()

    assert str(status["binding"]) == f"p1@[{link6}]:{PORT}", status
    assert udp["replies"] >= 1
    listening = sockets.stdout.decode()
    assert f"0.0.0.0:{PORT}" in listening and f"[::]:{PORT}" in listening, listening
    no_address_value_error(tunnel)


#: A network beyond the gateway (its own namespace), reached only by forwarding.
FAR6_GATEWAY, FAR6_SERVER, FAR6_PREFIXLEN = "fd55::1", "fd55::2", 64


@contextlib.asynccontextmanager
async def far_network6(lab: Lab, tmp_path: Path) -> AsyncIterator[str]:
    """A namespace behind the gateway with ``FAR6_SERVER`` and a udp-echo on it; deleted on any exit."""
    ns = f"{lab.spec.prefix}-f6"
    await trio.run_process(["ip", "netns", "add", ns])
    echo: trio.Process | None = None
    try:
        await trio.run_process(
            ["ip", "link", "add", "far6", "netns", lab.gateway_ns, "type", "veth", "peer", "name", "eth0", "netns", ns]
        )
        await lab.run(lab.gateway_ns, "ip", "addr", "add", f"{FAR6_GATEWAY}/{FAR6_PREFIXLEN}", "dev", "far6", "nodad")
        await lab.run(lab.gateway_ns, "ip", "link", "set", "far6", "up")
        for cmd in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "addr", "add", f"{FAR6_SERVER}/{FAR6_PREFIXLEN}", "dev", "eth0", "nodad"),
            ("ip", "link", "set", "eth0", "up"),
            ("ip", "-6", "route", "add", "default", "via", FAR6_GATEWAY),
        ):
            await trio.run_process(["ip", "netns", "exec", ns, *cmd])
        ready = tmp_path / "far-echo.ready"
        argv = traffic_argv("udp-echo", "--listen", f"[{FAR6_SERVER}]:5004", "--ready", str(ready),
                            "--report", str(tmp_path / "far-echo.json"))  # fmt: skip
        echo = await trio.lowlevel.open_process(["ip", "netns", "exec", ns, *argv])
        while not ready.exists():
            assert echo.returncode is None, "the far udp-echo exited before it was ready"
            await trio.sleep(0.05)
        yield ns
    finally:
        with trio.CancelScope(shield=True):
            if echo is not None and echo.returncode is None:
                echo.kill()
                await echo.wait()
            await trio.run_process(["ip", "netns", "del", ns], check=False)


@requires_lab
async def test_the_gateway_forwards_ipv6_beyond_itself(lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    """The tunnel carries IPv6 to a network behind the gateway, and the answers come back through it.

    The kill switch is on (a full tunnel), so nothing but the tunnel's own UDP leaves the client
    namespace: an answer from the far namespace can only have come through the tunnel, forwarded
    by the gateway's kernel both ways (``net.ipv6.conf.all.forwarding=1`` there, as an operator
    sets it), back to the client's tunnel address through the gateway's TUN.
    """
    options = TunnelOptions(ipv6_tunnel=True, routes=("0.0.0.0/0", "::/0"))
    with trio.fail_after(90):
        async with far_network6(lab, tmp_path):
            tunnel = await start(lab, tmp_path, options)
            answer = await route6(lab, FAR6_SERVER)
            udp = await udp_ping(lab, tmp_path, f"[{FAR6_SERVER}]:5004", "far-ping6")
            await tunnel.stop()
    assert device_of(answer[1]) == CLIENT_TUN, answer
    assert udp["replies"] >= 1, udp
