"""MTU through the real tunnel: the gateway's MSS clamp, and a path with a smaller MTU (docs/mtu.md).

Two labs of real ``serve``/``up`` processes (``jvpn_trio.lab.processes.start_tunnel``):

* **clamp**: one 1500-byte path and a third namespace, ``<prefix>-srv``, behind the gateway
  (``10.88.0.2`` via ``srv0``), so that TCP from the client is *forwarded* by the gateway.
  The client's TUN gets the MTU derived from its path (``client_tun_mtu``: 1500 - 60 = 1440),
  the gateway keeps its default 1420.  The gateway's table (``drivers/forwarding.py``)
  must rewrite the client's SYN (MSS 1400) and the server's SYN-ACK (MSS 1460) to 1380, and
  the bytes must arrive intact.
* **small path**: ``eth0`` (the preferred, active path) at MTU 1280 on both veth ends,
  ``wifi0`` at 1500.  With the TUN at 1420 a full-size packet makes a 1480-byte outer
  datagram: the sending kernel fragments it (the path sockets leave ``IP_MTU_DISCOVER`` at
  its default, "want") and the other end reassembles it, both ways; nothing is lost and no
  error reaches the processes.  With the TUN at the derived MTU of the path set
  (1280 - 60 = 1220) TCP flows both ways with no outer fragment at all.  The kernels'
  own counters (``/proc/net/snmp`` per namespace) are the observation.

Until ``serve`` installs the gateway table itself and ``up`` sets its TUN MTU from its
paths, the test does both with the same calls (docs/mtu.md, "Wiring").

Determinism rules: every wait is bounded (``trio.fail_after``) and polls a real condition
(status, ready files); assertions are on counters and bytes, never on durations.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from jvpn_trio.config import DEFAULT_MTU
from jvpn_trio.core.mtu import OVERHEAD, Family, client_tun_mtu, tcp_mss
from jvpn_trio.drivers import forwarding
from jvpn_trio.lab.netns import Lab, LabPath, LabSpec, open_lab
from jvpn_trio.lab.processes import CLIENT_TUN, GATEWAY_TUN, GATEWAY_TUNNEL, Tunnel, start_tunnel
from tests.netns import READY_POLL_S, requires_lab, unique_prefix

SMALL_MTU = 1280
#: The far server's network behind the gateway.
FAR_GATEWAY, FAR_SERVER, FAR_PREFIXLEN = "10.88.0.1", "10.88.0.2", 24
TRANSFER_BYTES = 1 << 20  # a multiple of the 256-byte pattern
UDP_DATAGRAMS = 5

TCP_SERVER = r"""
import hashlib, json, socket, sys
host, port, ready, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(1); s.settimeout(60)
open(ready, "w").close()
c, _ = s.accept(); c.settimeout(60)
mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(65536)
    if not d:
        break
    h.update(d); n += len(d)
c.sendall(bytes(range(256)) * (n // 256)); c.close()
json.dump({"mss": mss, "bytes": n, "sha256": h.hexdigest()}, open(out, "w"))
"""

TCP_CLIENT = r"""
import hashlib, json, socket, sys
host, port, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data = bytes(range(256)) * (n // 256)
c = socket.create_connection((host, port), timeout=60)
mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
c.sendall(data); c.shutdown(socket.SHUT_WR)
h, back = hashlib.sha256(), 0
while True:
    d = c.recv(65536)
    if not d:
        break
    h.update(d); back += len(d)
json.dump({"mss": mss, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
           "back_bytes": back, "back_sha256": h.hexdigest()}, open(out, "w"))
"""

UDP_ECHO = r"""
import socket, sys
host, port, ready, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port)); s.settimeout(60)
open(ready, "w").close()
for _ in range(count):
    d, peer = s.recvfrom(65535)
    s.sendto(d, peer)
"""

UDP_CLIENT = r"""
import json, socket, sys
host, port, size, count, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
echoed = 0
for i in range(count):
    payload = bytes([i]) * size
    s.sendto(payload, (host, port))
    if s.recv(65535) == payload:
        echoed += 1
json.dump({"echoed": echoed}, open(out, "w"))
"""


async def _sh(*argv: str) -> bytes:
    result = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True)
    out: bytes = result.stdout
    return out


@contextlib.asynccontextmanager
async def far_network(lab: Lab) -> AsyncIterator[str]:
    """A namespace behind the gateway (``srv0`` in the gateway, ``eth0`` there); deleted on any exit."""
    ns = f"{lab.spec.prefix}-srv"
    await _sh("ip", "netns", "add", ns)
    try:
        await _sh("ip", "link", "add", "srv0", "netns", lab.gateway_ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        await lab.run(lab.gateway_ns, "ip", "addr", "add", f"{FAR_GATEWAY}/{FAR_PREFIXLEN}", "dev", "srv0")
        await lab.run(lab.gateway_ns, "ip", "link", "set", "srv0", "up")
        for cmd in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "addr", "add", f"{FAR_SERVER}/{FAR_PREFIXLEN}", "dev", "eth0"),
            ("ip", "link", "set", "eth0", "up"),
            ("ip", "route", "add", "default", "via", FAR_GATEWAY),
        ):
            await _sh("ip", "netns", "exec", ns, *cmd)
        while b"LOWER_UP" not in await _sh("ip", "-n", ns, "link", "show", "eth0"):
            await trio.sleep(READY_POLL_S)
        yield ns
    finally:
        with trio.CancelScope(shield=True):
            for pid in (await _sh("ip", "netns", "pids", ns)).split():
                with contextlib.suppress(ProcessLookupError):
                    await _sh("kill", "-9", pid.decode())
            await _sh("ip", "netns", "del", ns)


async def wait_ready(path: Path) -> None:
    while not path.exists():
        await trio.sleep(READY_POLL_S)


async def interface_mtu(lab: Lab, ns: str, ifname: str) -> int:
    """What ``up`` reads for a path: the interface's MTU."""
    return int((await lab.run(ns, "cat", f"/sys/class/net/{ifname}/mtu")).stdout)


async def set_mtu(lab: Lab, ns: str, ifname: str, mtu: int) -> None:
    await lab.run(ns, "ip", "link", "set", "dev", ifname, "mtu", str(mtu))


async def ip_counters(lab: Lab, ns: str) -> dict[str, int]:
    """The namespace's ``Ip:`` counters from /proc/net/snmp (FragCreates, ReasmOKs, ...)."""
    lines = [line.split() for line in (await lab.run(ns, "cat", "/proc/net/snmp")).stdout.decode().splitlines()]
    names, values = [line for line in lines if line[0] == "Ip:"]
    return dict(zip(names[1:], map(int, values[1:]), strict=True))


def delta(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after[key] - before[key]


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def tcp_exchange(lab: Lab, server_ns: str, host: str, tmp_path: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """TRANSFER_BYTES from the client to ``host:5001`` and back again; (server report, client report)."""
    py = sys.executable
    ready, server_out, client_out = (tmp_path / f"{name}.{ext}" for ext in ("ready", "server.json", "client.json"))
    async with trio.open_nursery() as nursery:
        argv = ["ip", "netns", "exec", server_ns, py, "-c", TCP_SERVER, host, "5001", str(ready), str(server_out)]
        nursery.start_soon(lambda: trio.run_process(argv, check=True))
        await wait_ready(ready)
        await lab.run(lab.client_ns, py, "-c", TCP_CLIENT, host, "5001", str(TRANSFER_BYTES), str(client_out))
    return read_json(server_out), read_json(client_out)


async def wait_tun_mtu(lab: Lab, expected: int) -> None:
    """Until the client's TUN has the MTU ``up`` derives (it sets it as each path comes up); the caller bounds it."""
    while await interface_mtu(lab, lab.client_ns, CLIENT_TUN) != expected:
        await trio.sleep(0.05)


def assert_intact(server: dict[str, Any], client: dict[str, Any]) -> None:
    assert server["bytes"] == client["bytes"] == TRANSFER_BYTES
    assert server["sha256"] == client["sha256"]
    assert client["back_bytes"] == TRANSFER_BYTES and client["back_sha256"] == client["sha256"]


@requires_lab
async def test_gateway_clamps_forwarded_syns_to_the_tunnel_mss(tmp_path: Path) -> None:
    spec = LabSpec(prefix=unique_prefix(), paths=(LabPath(name="eth0", kind="ethernet", metric=10, index=1),))
    with trio.fail_after(120):
        async with open_lab(spec) as lab, far_network(lab) as far:
            tunnel = await start_tunnel(lab, tmp_path, policy={})
            await tunnel.wait_attached()
            path_mtu = await interface_mtu(lab, lab.client_ns, "eth0")
            client_mtu = client_tun_mtu(None, [path_mtu], Family.IPV4)
            assert (path_mtu, client_mtu) == (1500, 1500 - OVERHEAD[Family.IPV4]) == (1500, 1440)
            # `up` derived its TUN's MTU from the path; `serve` installed its table with the clamp.
            await wait_tun_mtu(lab, client_mtu)
            server, client = await tcp_exchange(lab, far, FAR_SERVER, tmp_path, "clamp")
            counters = await forwarding.read_counters(netns=lab.gateway_ns)
            tunnel.check_alive()
            await tunnel.stop()

    assert_intact(server, client)
    clamp = tcp_mss(DEFAULT_MTU, Family.IPV4)  # 1380
    # The client announced 1400 (its TUN: 1440) and the server 1460 (its link: 1500); each SYN was
    # rewritten on its way through the gateway, so neither side may send a segment above 1380
    # (TCP_MAXSEG is that minus the timestamp option).  Without the clamp the server would say 1388.
    assert counters.packets[(Family.IPV4, "from_tunnel")] >= 1
    assert counters.packets[(Family.IPV4, "to_tunnel")] >= 1
    assert counters.total(Family.IPV6) == 0
    assert clamp - 40 < server["mss"] <= clamp
    assert clamp - 40 < client["mss"] <= clamp


def small_path_spec() -> LabSpec:
    """eth0 (preferred) and wifi0; the test sets eth0's MTU to SMALL_MTU before the tunnel starts."""
    return LabSpec(
        prefix=unique_prefix(),
        paths=(
            LabPath(name="eth0", kind="ethernet", metric=10, index=1),
            LabPath(name="wifi0", kind="wifi", metric=20, index=2),
        ),
    )


@contextlib.asynccontextmanager
async def small_path_tunnel(tmp_path: Path) -> AsyncIterator[tuple[Lab, Tunnel]]:
    """A tunnel attached on eth0, whose veth has MTU SMALL_MTU at both ends; wifi0 keeps 1500."""
    async with open_lab(small_path_spec()) as lab:
        await set_mtu(lab, lab.client_ns, "eth0", SMALL_MTU)
        await set_mtu(lab, lab.gateway_ns, lab.gateway_device("eth0"), SMALL_MTU)
        tunnel = await start_tunnel(lab, tmp_path, policy={})
        await tunnel.wait_status(lambda s: s.get("state") == "ATTACHED" and on_small_path(s))
        assert [await interface_mtu(lab, lab.client_ns, p.name) for p in lab.paths] == [SMALL_MTU, 1500]
        # `up` follows the smallest path: 1280 - 60.
        await wait_tun_mtu(lab, client_tun_mtu(None, [SMALL_MTU, 1500], Family.IPV4))
        yield lab, tunnel
        tunnel.check_alive()
        await tunnel.stop()


def on_small_path(status: dict[str, Any]) -> bool:
    return str(status.get("binding", "")).startswith("p1@")


def path_errors(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.get("counters", {}).items() if "error" in k and v}


@requires_lab
async def test_on_a_smaller_path_full_size_datagrams_are_fragmented_then_the_derived_mtu_needs_none(
    tmp_path: Path,
) -> None:
    py = sys.executable
    with trio.fail_after(120):
        async with small_path_tunnel(tmp_path) as (lab, tunnel):
            # 1. The TUN at 1420 on the 1280 path: each full-size packet is a 1480-byte datagram.
            await set_mtu(lab, lab.client_ns, CLIENT_TUN, DEFAULT_MTU)
            size = DEFAULT_MTU - 20 - 8  # one inner IPv4/UDP packet of exactly the TUN's MTU
            ready = tmp_path / "echo.ready"
            echo = await lab.start_process(
                lab.gateway_ns, [py, "-c", UDP_ECHO, GATEWAY_TUNNEL, "5003", str(ready), str(UDP_DATAGRAMS)],
                stderr_path=tmp_path / "echo.err",
            )
            await wait_ready(ready)
            cli0, gw0 = await ip_counters(lab, lab.client_ns), await ip_counters(lab, lab.gateway_ns)
            await lab.run(
                lab.client_ns, py, "-c", UDP_CLIENT, GATEWAY_TUNNEL, "5003", str(size), str(UDP_DATAGRAMS),
                str(tmp_path / "udp.json"),
            )
            await echo.wait()
            cli1, gw1 = await ip_counters(lab, lab.client_ns), await ip_counters(lab, lab.gateway_ns)
            status1 = await tunnel.client_status()

            # 2. The TUN at the MTU derived from the path set: TCP both ways, nothing fragmented.
            path_mtus = [await interface_mtu(lab, lab.client_ns, p.name) for p in lab.paths]
            derived = client_tun_mtu(None, path_mtus, Family.IPV4)
            await set_mtu(lab, lab.client_ns, CLIENT_TUN, derived)
            cli2, gw2 = await ip_counters(lab, lab.client_ns), await ip_counters(lab, lab.gateway_ns)
            server, client = await tcp_exchange(lab, lab.gateway_ns, GATEWAY_TUNNEL, tmp_path, "derived")
            cli3, gw3 = await ip_counters(lab, lab.client_ns), await ip_counters(lab, lab.gateway_ns)
            status2 = await tunnel.client_status()

    # 1. Every datagram came back; each was two outer fragments each way, made by the sender's
    # kernel and reassembled by the receiver's: no ICMP, no error, the path stayed up.
    assert read_json(tmp_path / "udp.json")["echoed"] == UDP_DATAGRAMS
    assert delta(cli0, cli1, "FragCreates") >= 2 * UDP_DATAGRAMS
    assert delta(gw0, gw1, "ReasmOKs") >= UDP_DATAGRAMS
    assert delta(gw0, gw1, "FragCreates") >= 2 * UDP_DATAGRAMS
    assert delta(cli0, cli1, "ReasmOKs") >= UDP_DATAGRAMS
    assert delta(cli0, cli1, "FragFails") == delta(gw0, gw1, "FragFails") == 0
    assert on_small_path(status1) and not path_errors(status1), status1

    # 2. The derived MTU is 1280 - 60; TCP's segments then fit the small path whole.
    assert derived == SMALL_MTU - OVERHEAD[Family.IPV4] == 1220
    assert_intact(server, client)
    assert server["mss"] <= tcp_mss(derived, Family.IPV4) == 1180
    for before, after in ((cli2, cli3), (gw2, gw3)):
        assert delta(before, after, "FragCreates") == 0
        assert delta(before, after, "ReasmReqds") == 0
    assert on_small_path(status2) and not path_errors(status2), status2


@requires_lab
async def test_on_a_smaller_path_bulk_tcp_at_the_default_mtu_keeps_the_path(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with small_path_tunnel(tmp_path) as (lab, tunnel):
            await set_mtu(lab, lab.client_ns, CLIENT_TUN, DEFAULT_MTU)
            cli0 = await ip_counters(lab, lab.client_ns)
            server, client = await tcp_exchange(lab, lab.gateway_ns, GATEWAY_TUNNEL, tmp_path, "bulk")
            cli1 = await ip_counters(lab, lab.client_ns)
            status = await tunnel.client_status()

    assert_intact(server, client)  # holds today too: the session moves to wifi0
    assert delta(cli0, cli1, "FragCreates") > 0  # the client's batches went out fragmented...
    assert on_small_path(status) and not path_errors(status), status  # ...on the path it started on
