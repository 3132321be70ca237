"""A full-tunnel client reaches a host past the gateway through NAT; a stopping gateway closes it (root).

Three namespaces: the lab's client and gateway (one path, ``eth0``), and ``<prefix>-by``,
"beyond", joined to the gateway only (``gw-by0`` 10.88.0.1/24 fd88::1/64 on the gateway,
``eth0`` 10.88.0.2/24 fd88::2/64 there).  The gateway's default routes (both families) go to
beyond, as a real gateway's go to its uplink, and beyond holds two "internet" hosts on its
loopback (:data:`FAR4`, :data:`FAR6`).  Beyond has no route to the tunnel's subnets: an answer
can only come back if the gateway masqueraded the client's packets to its own egress address.

Real ``jvpn-trio serve`` and ``up`` processes (``lab.processes.start_tunnel``), the gateway's
config without any forwarding key: so ``nat`` defaults on and the egress is found from the
default route.  Before ``serve`` starts, the gateway namespace forwards nothing (the lab's
``ip_forward=1`` is switched off), so the test sees what serve switches on and back.

1. TCP from the client to :data:`FAR4` and :data:`FAR6` through the tunnel: beyond's server
   sees the gateway's egress address as the peer (NAT), the client gets its answer, the NAT
   counters count, and the sysctls serve needs are on.
2. SIGTERM to the gateway: the client logs TERMINATED with PEER_CLOSE (the authenticated CLOSE
   serve sends every session first), the gateway exits 0, its table is gone and every sysctl
   it touched has its old value again.

Determinism rules: every wait is bounded (``trio.fail_after``) and polls a real condition
(status, ready files, event logs); assertions are causal (what arrived, from whom), never durations.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from jvpn_trio.core.actions import EventKind
from jvpn_trio.core.mtu import Family
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers import forwarding
from jvpn_trio.lab.netns import Lab, LabPath, LabSpec, open_lab
from jvpn_trio.lab.processes import GATEWAY_TUN, STATUS_POLL_S, Tunnel, TunnelOptions, start_tunnel
from tests.netns import READY_POLL_S, requires_lab, unique_prefix

#: The gateway's side of the link to beyond, and beyond's.
EGRESS = "gw-by0"
EGRESS4, BEYOND4, PREFIX4 = "10.88.0.1", "10.88.0.2", 24
EGRESS6, BEYOND6, PREFIX6 = "fd88::1", "fd88::2", 64
#: Hosts "on the internet", behind beyond: reached only by the gateway's default routes.
FAR4, FAR6 = "192.0.2.80", "2001:db8::80"
FAR_PORT = 5080
#: The sysctls the gateway namespace starts with (forwarding off) and serve must leave as it found them.
WATCHED = (
    f"net/ipv4/conf/{EGRESS}/forwarding",
    "net/ipv4/conf/all/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/ipv6/conf/default/forwarding",
    f"net/ipv6/conf/{EGRESS}/forwarding",
    f"net/ipv6/conf/{EGRESS}/accept_ra",
)

#: Beyond's server: answers each TCP connection with the address it came from, then closes it.
WHOAMI = r"""
import socket, sys, threading
ready, port = sys.argv[1], int(sys.argv[2])
def serve(family, host):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(8)
    return s
listeners = [serve(socket.AF_INET, sys.argv[3]), serve(socket.AF_INET6, sys.argv[4])]
open(ready, "w").close()
def loop(s):
    while True:
        c, peer = s.accept()
        c.sendall(peer[0].encode()); c.close()
threads = [threading.Thread(target=loop, args=(s,), daemon=True) for s in listeners]
for t in threads: t.start()
for t in threads: t.join()
"""

#: The client's side: connect, print what the server says (the address it saw us as).
ASK = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
data = b""
while True:
    d = c.recv(256)
    if not d:
        break
    data += d
print(data.decode())
"""


async def _in(ns: str, *argv: str) -> None:
    await trio.run_process(["ip", "netns", "exec", ns, *argv])


async def _sysctls(lab: Lab) -> dict[str, str]:
    script = "; ".join(f"echo {key}=$(cat /proc/sys/{key})" for key in WATCHED)
    out = (await lab.run(lab.gateway_ns, "sh", "-c", script)).stdout.decode()
    return dict(line.split("=", 1) for line in out.split())


@contextlib.asynccontextmanager
async def beyond(lab: Lab, tmp_path: Path) -> AsyncIterator[str]:
    """The namespace past the gateway, with the gateway's default routes into it and WHOAMI on FAR4/FAR6."""
    ns = f"{lab.spec.prefix}-by"
    await trio.run_process(["ip", "netns", "add", ns])
    server: trio.Process | None = None
    try:
        await trio.run_process(
            ["ip", "link", "add", EGRESS, "netns", lab.gateway_ns, "type", "veth", "peer", "name", "eth0", "netns", ns]
        )
        for cmd in (
            ("ip", "addr", "add", f"{EGRESS4}/{PREFIX4}", "dev", EGRESS),
            ("ip", "addr", "add", f"{EGRESS6}/{PREFIX6}", "dev", EGRESS, "nodad"),
            ("ip", "link", "set", EGRESS, "up"),
            ("ip", "route", "add", "default", "via", BEYOND4, "dev", EGRESS),
            ("ip", "-6", "route", "add", "default", "via", BEYOND6, "dev", EGRESS),
        ):
            await lab.run(lab.gateway_ns, *cmd)
        for cmd in (  # no route to the tunnel's subnets: only the masqueraded source can be answered
            ("ip", "link", "set", "lo", "up"),
            ("ip", "addr", "add", f"{FAR4}/32", "dev", "lo"),
            ("ip", "addr", "add", f"{FAR6}/128", "dev", "lo"),
            ("ip", "addr", "add", f"{BEYOND4}/{PREFIX4}", "dev", "eth0"),
            ("ip", "addr", "add", f"{BEYOND6}/{PREFIX6}", "dev", "eth0", "nodad"),
            ("ip", "link", "set", "eth0", "up"),
        ):
            await _in(ns, *cmd)
        ready = tmp_path / "whoami.ready"
        argv = [sys.executable, "-c", WHOAMI, str(ready), str(FAR_PORT), FAR4, FAR6]
        server = await trio.lowlevel.open_process(["ip", "netns", "exec", ns, *argv])
        while not ready.exists():
            assert server.returncode is None, "beyond's server exited before it was ready"
            await trio.sleep(READY_POLL_S)
        yield ns
    finally:
        with trio.CancelScope(shield=True):
            if server is not None and server.returncode is None:
                server.kill()
                await server.wait()
            await trio.run_process(["ip", "netns", "del", ns], check=False)


async def ask(lab: Lab, host: str) -> str:
    """The address beyond's server saw the client's connection come from."""
    done = await lab.run(lab.client_ns, sys.executable, "-c", ASK, host, str(FAR_PORT), check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


async def wait_peer_close(tunnel: Tunnel) -> None:
    """Until the client's log has its session TERMINATED by the gateway's CLOSE (the caller bounds it)."""
    while not any(
        e.kind is EventKind.STATE_CHANGE and e.detail("to_state") == "TERMINATED" and e.reason is ReasonCode.PEER_CLOSE
        for e in tunnel.events("client")
    ):
        await trio.sleep(STATUS_POLL_S)


@requires_lab
async def test_a_full_tunnel_client_reaches_past_the_gateway_through_nat(tmp_path: Path) -> None:
    spec = LabSpec(prefix=unique_prefix(), paths=(LabPath(name="eth0", kind="ethernet", metric=10, index=1),))
    options = TunnelOptions(ipv6_tunnel=True, routes=("0.0.0.0/0", "::/0"))
    with trio.fail_after(120):
        async with open_lab(spec) as lab, beyond(lab, tmp_path):
            # The gateway forwards nothing before serve (the lab switched it on for itself).
            await lab.run(
                lab.gateway_ns, "sh", "-c",
                "echo 0 > /proc/sys/net/ipv4/ip_forward && echo 0 > /proc/sys/net/ipv6/conf/all/forwarding",
            )  # fmt: skip
            before = await _sysctls(lab)
            tunnel = await start_tunnel(lab, tmp_path, policy={}, options=options)
            await tunnel.wait_attached()
            seen4, seen6 = await ask(lab, FAR4), await ask(lab, FAR6)
            during = await _sysctls(lab)
            tun_key = f"/proc/sys/net/ipv4/conf/{GATEWAY_TUN}/forwarding"
            tun_forwarding = (await lab.run(lab.gateway_ns, "cat", tun_key)).stdout
            nat = await forwarding.read_nat_counters(netns=lab.gateway_ns)
            table = (await lab.run(lab.gateway_ns, "nft", "list", "table", "inet", forwarding.TABLE)).stdout.decode()

            # The gateway is stopped as systemd stops it: SIGTERM.
            lab_gateway = tunnel.gateway
            with trio.fail_after(20):
                os.kill(lab_gateway.pid, signal.SIGTERM)
                await wait_peer_close(tunnel)
                gateway_exit = await lab_gateway.wait()
            after = await _sysctls(lab)
            closed = [
                e for e in tunnel.events("gateway")
                if e.kind is EventKind.STATE_CHANGE and e.detail("to_state") == "TERMINATED"
            ]  # fmt: skip
            leftover = await lab.run(lab.gateway_ns, "nft", "list", "table", "inet", forwarding.TABLE, check=False)
            await tunnel.client.terminate()

    # Through NAT: beyond saw the gateway's egress address, never the client's tunnel address.
    assert (seen4, seen6) == (EGRESS4, EGRESS6)
    assert nat[Family.IPV4] >= 1 and nat[Family.IPV6] >= 1, nat
    assert f'oifname "{EGRESS}" ip saddr 10.66.0.0/24' in table
    assert f'oifname "{EGRESS}" ip6 saddr fd6a:7670::/64' in table
    # What serve switched on: IPv4 on the TUN and the egress only, IPv6 for the host (its only switch).
    assert tun_forwarding.strip() == b"1"
    assert during[f"net/ipv4/conf/{EGRESS}/forwarding"] == "1" and during["net/ipv4/conf/all/forwarding"] == "0"
    assert during["net/ipv6/conf/all/forwarding"] == "1" and during[f"net/ipv6/conf/{EGRESS}/accept_ra"] == "2"
    # Stopped: the client heard the CLOSE, the table is gone, every sysctl is back.
    assert gateway_exit == 0, (tmp_path / "gateway.err").read_text()
    assert [e.reason for e in closed] == [ReasonCode.LOCAL_CLOSE], closed
    assert leftover.returncode != 0, leftover.stdout
    assert after == before, (before, after)
    stderr = (tmp_path / "gateway.err").read_text()
    assert "Traceback" not in stderr, stderr
