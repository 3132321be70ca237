"""The path manager against the real kernel: veths appear, vanish, renumber and roam in namespaces.

Topology (every name carries a fresh ``jvt<hex>`` prefix; all namespaces are deleted on any exit)::

    client ns                 router ns r1 (192.168.61.1)        gateway ns
      wl?  ---- veth ----  r1? ---+                                 198.51.100.7 (on lo)
                                  +-- r1g 10.201.1.1 ---- g1 10.201.1.2
                             router ns r2 (192.168.62.1)
                                  +-- r2g 10.201.2.1 ---- g2 10.201.2.2

The gateway address is reachable from the client only through a router: the client's
routes to it are DHCP-style default routes ``via`` the router of each link.  The routers
answer ARP only for their own addresses (``arp_ignore=1``, as a real LAN does).

Determinism rules (see tests/netns.py): every test body runs under ``trio.fail_after``;
the test waits for events, never sleeps to "let things settle", except the explicit
delays the scenarios call for (an interface created 1 s after start, an address back
1.5 s after the flush), which are part of the scenario.  Measured latencies are printed
(``pytest -s``) and only bounded by the scenario's 2 s budget, not asserted tightly.
"""

from __future__ import annotations

import sys
from typing import AsyncIterator, Callable

import attrs
import pytest
import trio

from jvpn_trio.config import DEFAULT_FWMARK_BASE
from jvpn_trio.core.candidates import DownReason, GatewayRoute, PathRule, PathRules
from jvpn_trio.drivers.ifaces import read_machine_snapshot
from jvpn_trio.drivers.paths import (
    PathAddressChanged,
    PathDown,
    PathEvent,
    PathForgotten,
    PathManager,
    PathUp,
    open_path_manager,
)
from jvpn_trio.drivers.routes import (
    DEFAULT_BYPASS_MARK,
    DEFAULT_BYPASS_MASK,
    SUPPRESS_RULE_PRIORITY,
    TUNNEL_RULE_PRIORITY,
    TunnelRoutes,
)
from tests.netns import READY_POLL_S, requires_root, unique_prefix

pytestmark = [pytest.mark.root, requires_root]

GATEWAY = "198.51.100.7"
#: Budget from "the interface is usable" to the event (the scenario's requirement).
EVENT_BUDGET_S = 2.0
TEST_TIMEOUT_S = 30.0
#: The scenario's delays: an interface plugged in after start, an address back after a flush.
PLUG_IN_DELAY_S = 1.0
READDRESS_DELAY_S = 1.5
RULES = PathRules(rules=(PathRule(match="wl*"),))
CLEANUP_TIMEOUT_S = 10.0


#: argv: DEVICE ADDRESS.  Exit 0 once an echo reply from ADDRESS arrives; a few tries, a few seconds.
ECHO_SCRIPT = """
import socket, struct, sys
dev, dst = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
s.settimeout(0.5)
body = struct.pack("!BBHHH", 8, 0, 0, 0x6a76, 1) + b"jvpn-trio!"  # even length: no checksum padding
total = sum(struct.unpack("!%dH" % (len(body) // 2), body))
total = (total >> 16) + (total & 0xFFFF)
total += total >> 16
packet = body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
for _ in range(6):
    s.sendto(packet, (dst, 0))
    try:
        while True:
            data, (src, _port) = s.recvfrom(2048)
            if src == dst and data[(data[0] & 0x0F) * 4] == 0:
                sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
"""


async def ip(*args: str) -> None:
    done = await trio.run_process(["ip", *args], capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"ip {' '.join(args)}: {done.stderr.decode().strip()}")


async def wait_running(ns: str, dev: str) -> None:
    """Until ``dev`` is operationally up: a veth end's carrier can follow its peer's late (linkwatch)."""
    while True:
        done = await trio.run_process(["ip", "-n", ns, "-br", "link", "show", "dev", dev], capture_stdout=True)
        if " UP " in done.stdout.decode():
            return
        await trio.sleep(READY_POLL_S)


async def sysctl(ns: str, *settings: str) -> None:
    await trio.run_process(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings], capture_stdout=True)


@attrs.frozen
class Net:
    client: str
    r1: str
    r2: str
    gw: str

    async def client_link(self, name: str, router: int) -> None:
        """A veth from the client to router ``router`` (1 or 2), the router's end addressed and up."""
        rns = self.r1 if router == 1 else self.r2
        peer = f"r{router}{name}"
        await ip("-n", rns, "link", "add", peer, "type", "veth", "peer", "name", name, "netns", self.client)
        await self.router_side(router, peer)

    async def router_side(self, router: int, peer: str) -> None:
        rns = self.r1 if router == 1 else self.r2
        await ip("-n", rns, "address", "add", f"192.168.6{router}.1/24", "dev", peer)
        await sysctl(rns, f"net.ipv4.conf.{peer}.arp_ignore=1")
        await ip("-n", rns, "link", "set", peer, "up")

    async def dhcp(self, name: str, router: int, host: int) -> None:
        """What a DHCP client does: address, link up, default route via the router.

        Returns once the link is running too: from then on the interface is usable.
        """
        await ip("-n", self.client, "address", "add", f"192.168.6{router}.{host}/24", "dev", name)
        await ip("-n", self.client, "link", "set", name, "up")
        await ip("-n", self.client, "route", "add", "default", "via", f"192.168.6{router}.1", "dev", name,
                 "metric", str(100 + host))
        await wait_running(self.client, name)

    async def ping_gateway(self, name: str) -> bool:
        """One ICMP echo to the gateway out of ``name`` answered (there is no ping binary everywhere)."""
        done = await trio.run_process(
            ["ip", "netns", "exec", self.client, sys.executable, "-c", ECHO_SCRIPT, name, GATEWAY],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        return done.returncode == 0


async def build(prefix: str) -> Net:
    net = Net(client=f"{prefix}-c", r1=f"{prefix}-r1", r2=f"{prefix}-r2", gw=f"{prefix}-g")
    for ns in (net.client, net.r1, net.r2, net.gw):
        await ip("netns", "add", ns)
        await ip("-n", ns, "link", "set", "lo", "up")
    await ip("-n", net.gw, "address", "add", f"{GATEWAY}/32", "dev", "lo")
    for n, rns in ((1, net.r1), (2, net.r2)):
        await sysctl(rns, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.arp_ignore=1")
        await ip("-n", rns, "link", "add", f"r{n}g", "type", "veth", "peer", "name", f"g{n}", "netns", net.gw)
        await ip("-n", rns, "address", "add", f"10.201.{n}.1/30", "dev", f"r{n}g")
        await sysctl(rns, f"net.ipv4.conf.r{n}g.arp_ignore=1")
        await ip("-n", rns, "link", "set", f"r{n}g", "up")
        await ip("-n", rns, "route", "add", f"{GATEWAY}/32", "via", f"10.201.{n}.2")
        await ip("-n", net.gw, "address", "add", f"10.201.{n}.2/30", "dev", f"g{n}")
        await ip("-n", net.gw, "link", "set", f"g{n}", "up")
        await ip("-n", net.gw, "route", "add", f"192.168.6{n}.0/24", "via", f"10.201.{n}.1")
    for ns, dev in ((net.r1, "r1g"), (net.r2, "r2g"), (net.gw, "g1"), (net.gw, "g2")):
        await wait_running(ns, dev)
    return net


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    prefix = unique_prefix()
    names = [f"{prefix}-{s}" for s in ("c", "r1", "r2", "g")]
    try:
        yield await build(prefix)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT_S):
            for ns in names:
                await trio.run_process(["ip", "netns", "del", ns], capture_stderr=True, check=False)


async def next_matching(events: trio.MemoryReceiveChannel[PathEvent], seen: list[PathEvent],
                        wanted: Callable[[PathEvent], bool]) -> PathEvent:
    """The next event ``wanted`` accepts; every event received is appended to ``seen``."""
    async for event in events:
        seen.append(event)
        if wanted(event):
            return event
    raise AssertionError(f"the path manager stopped; events: {seen}")


def report(what: str, seconds: float) -> None:
    print(f"\n[path manager netns] {what}: {seconds * 1000:.0f} ms")


@pytest.fixture
async def manager(net: Net) -> AsyncIterator[tuple[PathManager, trio.MemoryReceiveChannel[PathEvent]]]:
    lines: list[str] = []
    async with open_path_manager(RULES, GATEWAY, netns=net.client, log=lines.append) as opened:
        yield opened
    assert not any("Traceback" in line for line in lines)


async def test_a_veth_plugged_in_later_comes_up(
    net: Net, manager: tuple[PathManager, trio.MemoryReceiveChannel[PathEvent]]
) -> None:
    paths, events = manager
    seen: list[PathEvent] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        assert paths.paths == ()
        await trio.sleep(PLUG_IN_DELAY_S)
        await net.client_link("wla", router=1)
        await net.dhcp("wla", router=1, host=20)
        usable_at = trio.current_time()
        with trio.fail_after(EVENT_BUDGET_S):
            event = await next_matching(events, seen, lambda e: isinstance(e, PathUp) and e.ifname == "wla")
        report("veth usable -> PathUp", trio.current_time() - usable_at)
        assert isinstance(event, PathUp)
        assert (event.kind, event.source_address, event.next_hop) == ("wifi", "192.168.61.20", "192.168.61.1")
        assert event.label == "match=wl*"
        assert await net.ping_gateway("wla")  # the next hop reported is the one that carries traffic


async def test_deleting_the_link_is_a_path_down_and_nothing_more(
    net: Net, manager: tuple[PathManager, trio.MemoryReceiveChannel[PathEvent]]
) -> None:
    paths, events = manager
    seen: list[PathEvent] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        for name, host in (("wla", 20), ("wlb", 21)):
            await net.client_link(name, router=1)
            await net.dhcp(name, router=1, host=host)
        ups: dict[str, int] = {}
        while len(ups) < 2:
            e = await next_matching(events, seen, lambda e: isinstance(e, PathUp))
            assert isinstance(e, PathUp)
            ups[e.ifname] = e.path_id
        await ip("-n", net.client, "link", "del", "wla")
        gone_at = trio.current_time()
        with trio.fail_after(EVENT_BUDGET_S):
            down = await next_matching(events, seen, lambda e: isinstance(e, PathDown))
        report("ip link del -> PathDown", trio.current_time() - gone_at)
        # The kernel says "down" before "gone": the path is down at the first message, from the
        # event alone; if that was the "down", the settled read finds it gone and frees its id.
        assert isinstance(down, PathDown) and (down.path_id, down.ifname) == (ups["wla"], "wla")
        assert down.reason in (DownReason.LINK_DOWN, DownReason.INTERFACE_GONE)
        if down.reason is DownReason.LINK_DOWN:
            with trio.fail_after(EVENT_BUDGET_S):
                forgotten = await next_matching(events, seen, lambda e: not isinstance(e, PathUp))
            assert forgotten == PathForgotten(path_id=ups["wla"], ifname="wla")
        assert [p.ifname for p in paths.paths] == ["wlb"]
        stats = paths.statistics()
        assert stats.read_failures == 0 and stats.paths == 1


async def test_flushed_then_readdressed_in_the_same_subnet(
    net: Net, manager: tuple[PathManager, trio.MemoryReceiveChannel[PathEvent]]
) -> None:
    paths, events = manager
    seen: list[PathEvent] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        await net.client_link("wlb", router=1)
        await net.dhcp("wlb", router=1, host=20)
        first = await next_matching(events, seen, lambda e: isinstance(e, PathUp))
        assert isinstance(first, PathUp)
        await ip("-n", net.client, "address", "flush", "dev", "wlb")
        flushed_at = trio.current_time()
        with trio.fail_after(EVENT_BUDGET_S):
            down = await next_matching(events, seen, lambda e: isinstance(e, PathDown))
        report("address flush -> PathDown", trio.current_time() - flushed_at)
        assert isinstance(down, PathDown) and down.path_id == first.path_id
        assert down.reason in (DownReason.NO_ADDRESS, DownReason.NO_ROUTE)
        await trio.sleep(READDRESS_DELAY_S)
        await net.dhcp("wlb", router=1, host=30)
        usable_at = trio.current_time()
        with trio.fail_after(EVENT_BUDGET_S):
            back = await next_matching(events, seen, lambda e: isinstance(e, (PathUp, PathAddressChanged)))
        report("new address usable -> PathUp", trio.current_time() - usable_at)
        assert isinstance(back, PathUp)
        assert (back.path_id, back.source_address, back.next_hop) == (first.path_id, "192.168.61.30", "192.168.61.1")
        assert await net.ping_gateway("wlb")


async def test_roaming_to_another_subnet_and_router_reports_the_new_next_hop(
    net: Net, manager: tuple[PathManager, trio.MemoryReceiveChannel[PathEvent]]
) -> None:
    paths, events = manager
    seen: list[PathEvent] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        await net.client_link("wlc", router=1)
        await net.dhcp("wlc", router=1, host=20)
        first = await next_matching(events, seen, lambda e: isinstance(e, PathUp))
        assert isinstance(first, PathUp) and first.next_hop == "192.168.61.1"
        # The access point now bridges to router 2: move the far end of the link there.
        await ip("-n", net.r1, "link", "set", "r1wlc", "netns", net.r2)
        await net.router_side(2, "r1wlc")
        await ip("-n", net.client, "address", "flush", "dev", "wlc")
        await net.dhcp("wlc", router=2, host=40)
        usable_at = trio.current_time()

        def moved(e: PathEvent) -> bool:
            return isinstance(e, (PathUp, PathAddressChanged)) and e.ifname == "wlc" and e.next_hop == "192.168.62.1"

        with trio.fail_after(EVENT_BUDGET_S):
            event = await next_matching(events, seen, moved)
        report("roamed, usable -> event with the new next hop", trio.current_time() - usable_at)
        assert isinstance(event, (PathUp, PathAddressChanged))
        assert (event.path_id, event.source_address) == (first.path_id, "192.168.62.40")
        [path] = paths.paths
        assert (path.next_hop, path.source_address) == ("192.168.62.1", "192.168.62.40")
        # Only what happened in between may come between: a down (no address) and nothing stale after it.
        assert all(not (isinstance(e, (PathUp, PathAddressChanged)) and e.next_hop == "192.168.61.1")
                   for e in seen[1:])
        assert await net.ping_gateway("wlc")


async def test_an_addressed_link_without_a_route_to_the_gateway_is_no_path(net: Net) -> None:
    """``ip route get GW oif IF`` answers "on-link" for any running link; the reader must not believe it."""
    with trio.fail_after(TEST_TIMEOUT_S):
        await net.client_link("wlz", router=1)
        await ip("-n", net.client, "address", "add", "192.168.61.50/24", "dev", "wlz")
        await ip("-n", net.client, "link", "set", "wlz", "up")
        await wait_running(net.client, "wlz")
        snapshot = await read_machine_snapshot(RULES, GATEWAY, netns=net.client)
        wlz = snapshot.by_name()["wlz"]
        assert wlz.up and wlz.addresses and wlz.route is None and wlz.error is None
        await ip("-n", net.client, "route", "add", f"{GATEWAY}/32", "via", "192.168.61.1", "dev", "wlz")
        snapshot = await read_machine_snapshot(RULES, GATEWAY, netns=net.client)
        assert snapshot.by_name()["wlz"].route == GatewayRoute(next_hop="192.168.61.1", source="192.168.61.50")


async def test_a_tunnel_that_blocks_the_gateways_family_hides_no_path_from_a_marked_read(net: Net) -> None:
    """A one-family full tunnel of the other family puts ``unreachable default`` for the gateway's family
    into the tunnel table (routes.py).  An unmarked lookup falls into it through rule 20300 and finds no
    route on any link; the reader's lookups carry the bypass mark, as ``up`` gives them, and see past it."""
    with trio.fail_after(TEST_TIMEOUT_S):
        await net.client_link("wlm", router=1)
        await net.dhcp("wlm", router=1, host=30)
        ns = net.client
        await ip("-n", ns, "rule", "add", "priority", str(SUPPRESS_RULE_PRIORITY), "lookup", "main",
                 "suppress_prefixlength", "0")
        await ip("-n", ns, "rule", "add", "priority", str(TUNNEL_RULE_PRIORITY), "not", "fwmark",
                 f"{DEFAULT_BYPASS_MARK:#x}/{DEFAULT_BYPASS_MASK:#x}", "lookup", "51820")
        await ip("-n", ns, "route", "add", "unreachable", "default", "table", "51820")
        unmarked = await read_machine_snapshot(RULES, GATEWAY, netns=ns)
        assert unmarked.by_name()["wlm"].route is None  # what the reader saw before it marked its lookups
        mark = TunnelRoutes(tun_name="jv0", prefixes=("::/0",), table=51820).lookup_mark(DEFAULT_FWMARK_BASE)
        assert mark is not None
        marked = await read_machine_snapshot(RULES, GATEWAY, netns=ns, lookup_mark=mark)
        assert marked.by_name()["wlm"].route == GatewayRoute(next_hop="192.168.61.1", source="192.168.61.30")
