"""Proxy ARP by the owning gateway moves a LAN host's return traffic on takeover (root).

Three namespaces, ``<prefix>-gwa``, ``<prefix>-gwb`` and ``<prefix>-svc``, on one LAN: a
bridge ``br0`` in svc (10.77.0.3/24) with one veth port to each gateway (``lan0``,
10.77.0.1/24 and 10.77.0.2/24)::

    gwa  tun0 (10.66.0.0/24)  lan0 ---- pa \\
                                          br0 (svc, 10.77.0.3; 10.66.0.0/24 on-link)
    gwb  tun0 (10.66.0.0/24)  lan0 ---- pb /

Each gateway routes the tunnel's subnet into a TUN (so the route to an announced address
leaves by another interface than the LAN) and forwards.  svc reaches the tunnel's subnet
on-link, as a host on a routed gateway LAN does, so it ARPs for the client's address itself.

svc's neighbour timers are set far beyond the test's bound (:data:`FROZEN_NEIGH`): its entry
for the client's address can change only because a frame told it to, never because an ARP
timeout let it ask again; and with ``locktime`` frozen too, only a frame Linux takes as
*gratuitous* may replace the MAC.  So "moved promptly, by the gratuitous ARP" is causal here.

1. gwa announces 10.66.0.2 *without* gratuitous ARP; svc sends a datagram there, and its entry
   resolves to gwa's MAC: the kernel's proxy answer (nothing else could create it).
2. gwa withdraws, gwb announces without gratuitous ARP (the proxy entry alone): after a round
   trip to gwb (a barrier behind anything gwb sent), svc's entry still names gwa.
3. gwb announces with gratuitous ARP: svc's entry moves to gwb's MAC (STALE: a broadcast
   frame asserts no reachability) within the bound, long before any timer could act.

Run again with ``arp_ignore = 1`` on all three hosts (a strict LAN): the answers still come,
since ``arp_ignore`` governs replies for a host's own addresses, not proxy replies.

Each gratuitous frame is also sent alone (the request, then the reply, on fresh LANs): either
one by itself moves the entry, so one lost frame does not leave a neighbour behind.

Determinism rules (tests/netns.py): every wait is bounded by ``trio.fail_after`` and polls a
real condition (the neighbour table); nothing asserts a duration.  Namespaces are deleted on
every way out, which deletes every device in them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from jvpn_trio.drivers import announce
from jvpn_trio.drivers.announce import (
    ARPOP_REPLY,
    ARPOP_REQUEST,
    AnnounceError,
    gratuitous_arp_frame,
    open_announcer,
)
from tests.netns import READY_POLL_S, requires_root, unique_prefix

pytestmark = [pytest.mark.root, requires_root]

CLIENT = ipaddress.IPv4Address("10.66.0.2")
TUNNEL_SUBNET = "10.66.0.0/24"
LAN_PREFIXLEN = 24
GWA_LAN, GWB_LAN, SVC_LAN = "10.77.0.1", "10.77.0.2", "10.77.0.3"
LAN_IF, TUN_IF, BRIDGE = "lan0", "tun0", "br0"
#: A port nobody listens on: the datagram only has to make svc resolve the address.
DISCARD_PORT = 9
#: svc's neighbour timers, far beyond TEST_TIMEOUT_S: no ARP timeout or probe can act in a test,
#: and (``locktime``) no ordinary ARP frame may replace a known MAC: only a gratuitous one can.
FROZEN_S = 3600
#: ``locktime`` counts USER_HZ ticks (1/100 s).
USER_HZ = 100
FROZEN_NEIGH = {
    "base_reachable_time_ms": FROZEN_S * 1000,
    "delay_first_probe_time": FROZEN_S,
    "gc_stale_time": FROZEN_S,
    "locktime": FROZEN_S * USER_HZ,
}
TEST_TIMEOUT_S = 30.0
CLEANUP_TIMEOUT_S = 10.0

#: Run in svc: send one datagram to ADDR (svc ARPs for it if it has no entry).
SEND_ONE = "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9))"
#: Run in svc: a TCP round trip to ADDR's closed port (SYN out, RST back): a barrier behind
#: every frame ADDR's host sent before.
ROUND_TRIP = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=5)
except ConnectionRefusedError:
    sys.exit(0)
sys.exit("expected a refusal from " + sys.argv[1])
"""


async def sh(*argv: str) -> str:
    result = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True)
    return str(result.stdout.decode())


async def in_ns(ns: str, *argv: str) -> str:
    return await sh("ip", "netns", "exec", ns, *argv)


async def sysctl(ns: str, key: str, value: object) -> None:
    await in_ns(ns, "sysctl", "-q", "-w", f"{key}={value}")


@attrs.frozen
class Lan:
    gwa: str
    gwb: str
    svc: str

    async def mac(self, ns: str, ifname: str = LAN_IF) -> str:
        (link,) = json.loads(await sh("ip", "-j", "-n", ns, "link", "show", ifname))
        return str(link["address"])

    async def client_entry(self) -> dict[str, Any] | None:
        """svc's neighbour entry for the client's address, or None."""
        entries = json.loads(await sh("ip", "-j", "-n", self.svc, "neigh", "show", str(CLIENT), "dev", BRIDGE))
        return entries[0] if entries else None

    async def proxies(self, ns: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = json.loads(await sh("ip", "-j", "-n", ns, "neigh", "show", "proxy"))
        return entries

    async def send_to_client(self) -> None:
        await in_ns(self.svc, sys.executable, "-c", SEND_ONE, str(CLIENT))

    async def round_trip(self, address: str) -> None:
        await in_ns(self.svc, sys.executable, "-c", ROUND_TRIP, address)

    async def wait_entry(self, mac: str) -> dict[str, Any]:
        """Poll svc's entry until it names ``mac`` (the caller's fail_after bounds it)."""
        while True:
            entry = await self.client_entry()
            if entry is not None and entry.get("lladdr") == mac:
                return entry
            await trio.sleep(READY_POLL_S)


async def _gateway(ns: str, lan_address: str, port: str, svc: str, *, strict: bool) -> None:
    await sh("ip", "link", "add", LAN_IF, "netns", ns, "type", "veth", "peer", "name", port, "netns", svc)
    await sh("ip", "-n", ns, "tuntap", "add", TUN_IF, "mode", "tun")
    for cmd in (
        ("link", "set", "lo", "up"),
        ("addr", "add", f"{lan_address}/{LAN_PREFIXLEN}", "dev", LAN_IF),
        ("link", "set", LAN_IF, "up"),
        ("link", "set", TUN_IF, "up"),
        ("route", "add", TUNNEL_SUBNET, "dev", TUN_IF),
    ):
        await sh("ip", "-n", ns, *cmd)
    await sysctl(ns, "net.ipv4.ip_forward", 1)  # what serve's forwarding does for the egress
    if strict:
        await sysctl(ns, "net.ipv4.conf.all.arp_ignore", 1)
    await sh("ip", "-n", svc, "link", "set", port, "master", BRIDGE, "up")


@contextlib.asynccontextmanager
async def open_lan(*, strict: bool) -> AsyncIterator[Lan]:
    prefix = unique_prefix()
    lan = Lan(gwa=f"{prefix}-gwa", gwb=f"{prefix}-gwb", svc=f"{prefix}-svc")
    made: list[str] = []
    try:
        for ns in (lan.svc, lan.gwa, lan.gwb):
            await sh("ip", "netns", "add", ns)
            made.append(ns)
        await sh("ip", "-n", lan.svc, "link", "add", BRIDGE, "type", "bridge")
        for cmd in (
            ("link", "set", "lo", "up"),
            ("addr", "add", f"{SVC_LAN}/{LAN_PREFIXLEN}", "dev", BRIDGE),
            ("link", "set", BRIDGE, "up"),
            ("route", "add", TUNNEL_SUBNET, "dev", BRIDGE),  # the client's subnet on-link: svc ARPs for it
        ):
            await sh("ip", "-n", lan.svc, *cmd)
        for key, value in FROZEN_NEIGH.items():
            await sysctl(lan.svc, f"net.ipv4.neigh.{BRIDGE}.{key}", value)
        if strict:
            await sysctl(lan.svc, "net.ipv4.conf.all.arp_ignore", 1)
        await _gateway(lan.gwa, GWA_LAN, "pa", lan.svc, strict=strict)
        await _gateway(lan.gwb, GWB_LAN, "pb", lan.svc, strict=strict)
        yield lan
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT_S):
            for ns in reversed(made):
                await trio.run_process(["ip", "netns", "del", ns], check=False)


@pytest.mark.parametrize("strict", [False, True], ids=["default", "arp_ignore=1"])
async def test_the_gratuitous_arp_moves_a_lan_hosts_entry_to_the_new_owner(strict: bool) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_lan(strict=strict) as lan:
            mac_a, mac_b = await lan.mac(lan.gwa), await lan.mac(lan.gwb)
            if strict:  # the strict LAN really is strict
                assert "= 1" in await in_ns(lan.svc, "sysctl", "net.ipv4.conf.all.arp_ignore")

            # 1. Only the proxy entry, no gratuitous ARP: svc's entry can come from the proxy answer alone.
            async with open_announcer(LAN_IF, netns=lan.gwa, gratuitous_rounds=0) as quiet_a:
                await quiet_a.announce(CLIENT)
                assert [(p["dst"], p.get("protocol")) for p in await lan.proxies(lan.gwa)] == [(str(CLIENT), "74")]
                assert await lan.client_entry() is None
                await lan.send_to_client()
                first = await lan.wait_entry(mac_a)
                assert first["state"] == ["REACHABLE"]  # a unicast reply to svc's own request
                await quiet_a.withdraw(CLIENT)
                assert await lan.proxies(lan.gwa) == []

            # 2. gwb takes over with the proxy entry only: nothing tells svc, so its entry stays on gwa.
            async with open_announcer(LAN_IF, netns=lan.gwb, gratuitous_rounds=0) as quiet_b:
                assert await quiet_b.announce(CLIENT)
                await lan.send_to_client()  # traffic keeps using the old entry (no probe for FROZEN_S)
                await lan.round_trip(GWB_LAN)  # behind anything gwb sent
                entry = await lan.client_entry()
                assert entry is not None and entry["lladdr"] == mac_a
                assert quiet_b.statistics().frames_sent == 0

            # 3. gwb takes over as the gateway does it: svc's entry moves at once.
            async with open_announcer(LAN_IF, netns=lan.gwb) as announcer_b:
                assert await announcer_b.announce(CLIENT)
                moved = await lan.wait_entry(mac_b)
                assert moved["state"] == ["STALE"]  # from a broadcast frame, not an answer to a probe
                stats = announcer_b.statistics()
                assert (stats.announced, stats.frames_sent, stats.frames_dropped) == (1, 2, 0)
                assert announcer_b.announced == {CLIENT}
            assert await lan.proxies(lan.gwb) == []  # a clean stop hands the address back


@pytest.mark.parametrize("op", [ARPOP_REQUEST, ARPOP_REPLY], ids=["request", "reply"])
async def test_each_gratuitous_frame_alone_moves_the_entry(op: int) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_lan(strict=False) as lan:
            mac_a, mac_b = await lan.mac(lan.gwa), await lan.mac(lan.gwb)
            async with open_announcer(LAN_IF, netns=lan.gwa, gratuitous_rounds=0) as quiet_a:
                await quiet_a.announce(CLIENT)
                await lan.send_to_client()
                await lan.wait_entry(mac_a)
            frame = gratuitous_arp_frame(bytes.fromhex(mac_b.replace(":", "")), CLIENT, op=op)

            def send_one() -> None:
                with announce._open_sender_sync(lan.gwb, LAN_IF) as sender:
                    sender.sendto(frame, (LAN_IF, announce.ETH_P_ARP))

            await trio.to_thread.run_sync(send_one)
            assert (await lan.wait_entry(mac_b))["state"] == ["STALE"]


async def test_a_vanished_or_down_interface_is_counted_not_raised() -> None:
    lines: list[str] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_lan(strict=False) as lan:
            with pytest.raises(AnnounceError, match="no interface named 'nope0'"):
                async with open_announcer("nope0", netns=lan.gwa):
                    pytest.fail("an announcer on a missing interface must not open")
            with pytest.raises(AnnounceError, match="not an Ethernet interface"):
                async with open_announcer(TUN_IF, netns=lan.gwa):
                    pytest.fail("a TUN has no ARP to answer")

            async with open_announcer(LAN_IF, netns=lan.gwa, log=lines.append) as announcer:
                await sh("ip", "-n", lan.gwa, "link", "set", LAN_IF, "down")
                assert not await announcer.announce(CLIENT)  # the entry is there, the frames are refused
                assert announcer.statistics().frames_dropped == 2
                assert [p["dst"] for p in await lan.proxies(lan.gwa)] == [str(CLIENT)]

                await sh("ip", "-n", lan.gwa, "link", "del", LAN_IF)
                assert not await announcer.announce(ipaddress.IPv4Address("10.66.0.3"))
                await announcer.withdraw(CLIENT)  # gone with its interface: no error
                stats = announcer.statistics()
                assert (stats.announced, stats.interface_missing, stats.withdrawn) == (1, 1, 1)
                assert announcer.announced == {ipaddress.IPv4Address("10.66.0.3")}
            assert announcer.statistics().withdraw_failed == 0  # nothing left to withdraw, and no error
    assert len(lines) == 2 and "not sent" in lines[0] and f"interface {LAN_IF} is gone" in lines[1]


async def test_a_killed_gateways_leftover_entries_are_taken_back_at_open() -> None:
    """SIGKILL leaves the proxy entries behind; the next announcer on the interface owns nothing yet."""
    lines: list[str] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_lan(strict=False) as lan:
            async with open_announcer(LAN_IF, netns=lan.gwa) as first:
                await first.announce(CLIENT)
                await first.announce(ipaddress.IPv4Address("10.66.0.3"))
                # Killed: what aclose would withdraw stays (the test forgets it, as SIGKILL would).
                first._announced.clear()
            await sh("ip", "-n", lan.gwa, "neigh", "add", "proxy", "10.66.0.9", "dev", LAN_IF)  # not ours
            assert sorted(p["dst"] for p in await lan.proxies(lan.gwa)) == ["10.66.0.2", "10.66.0.3", "10.66.0.9"]
            async with open_announcer(LAN_IF, netns=lan.gwa, log=lines.append):
                assert [p["dst"] for p in await lan.proxies(lan.gwa)] == ["10.66.0.9"]  # another program's stays
    assert lines == [f"removed 2 proxy ARP entries a previous gateway left on {LAN_IF}"]
