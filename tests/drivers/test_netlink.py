"""Tests for drivers/netlink.py: decoding (no root) and real kernel events in a lab (root).

Determinism rules: the root tests build a fresh lab with the shared ``jvpn_trio.lab.netns``
(namespaces ``jvnl<random>-cli``/``-gw``, deleted on any exit), change its links with ``ip -n``
or the lab's own ``link_down``/``link_up``, and wait for the resulting events under
``trio.fail_after``; nothing sleeps.  No packet is sent.
"""

from __future__ import annotations

import secrets
import socket
from typing import AsyncIterator, TypeVar

import pytest
import trio

from jvpn_trio.drivers.netlink import (
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    AddressEvent,
    LinkEvent,
    LinkMonitor,
    MonitorEvent,
    Resync,
    RouteEvent,
    WATCH_DEFAULT,
    WATCH_PATHS,
    Watch,
    _decode,
    link_is_up,
    open_link_monitor,
    read_link_states,
)
from jvpn_trio.drivers.routes import RTPROT_JVPN
from jvpn_trio.lab.netns import Lab, LabSpec, open_lab
from tests.netns import requires_lab

EVENT_TIMEOUT_S = 5.0


@pytest.fixture
async def nl_lab() -> AsyncIterator[Lab]:
    """A fresh shared-helper lab (eth0/wifi0/lte0 in ``jvnl<hex>-cli``), torn down after the test."""
    async with open_lab(LabSpec(prefix=f"jvnl{secrets.token_hex(3)}")) as lab:
        yield lab


_E = TypeVar("_E", LinkEvent, AddressEvent)


async def next_event_for(monitor: LinkMonitor, ifname: str, kind: type[_E]) -> _E:
    """The next event of type ``kind`` about ``ifname`` (other interfaces' events are skipped)."""
    async for event in monitor:
        if isinstance(event, kind) and event.ifname == ifname:
            return event
    raise AssertionError("monitor closed")


# -- pure: flags and decoding ----------------------------------------------------------


class FakeMsg(dict):
    """Stands in for a parsed pyroute2 message: only ``.get`` is used."""


@pytest.mark.parametrize(
    ("flags", "up"),
    [
        (0x0, False),
        (IFF_UP, False),  # admin up, no carrier
        (IFF_UP | IFF_LOWER_UP, False),  # carrier but dormant (Wi-Fi authenticating)
        (IFF_UP | IFF_RUNNING, False),
        (IFF_LOWER_UP | IFF_RUNNING, False),  # admin down
        (IFF_UP | IFF_LOWER_UP | IFF_RUNNING, True),
        (0x11043, True),  # a real eth0
        (0x1003, False),  # a veth whose peer is down
    ],
)
def test_link_is_up(flags: int, up: bool) -> None:
    assert link_is_up(flags) is up


def test_decode_link_messages() -> None:
    new = FakeMsg(event="RTM_NEWLINK", family=socket.AF_UNSPEC, ifname="wlan0", index=3, flags=0x11043)
    assert _decode(new) == LinkEvent(ifname="wlan0", index=3, up=True, removed=False)
    gone = FakeMsg(event="RTM_DELLINK", family=socket.AF_UNSPEC, ifname="wlan0", index=3, flags=0x11043)
    assert _decode(gone) == LinkEvent(ifname="wlan0", index=3, up=False, removed=True)


def test_decode_address_messages() -> None:
    added = FakeMsg(
        event="RTM_NEWADDR", family=socket.AF_INET, local="10.1.2.3", address="10.1.2.3",
        index=4, prefixlen=24, label="eth0:1",
    )
    assert _decode(added) == AddressEvent(ifname="eth0", index=4, address="10.1.2.3", prefixlen=24, added=True)
    # Point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL is ours.
    p2p = FakeMsg(
        event="RTM_DELADDR", family=socket.AF_INET, local="10.0.0.1", address="10.0.0.2",
        index=5, prefixlen=32, label="ppp0",
    )
    assert _decode(p2p) == AddressEvent(ifname="ppp0", index=5, address="10.0.0.1", prefixlen=32, added=False)


@pytest.mark.parametrize(
    "msg",
    [
        FakeMsg(event="RTM_NEWROUTE"),
        FakeMsg(event="RTM_NEWADDR", family=socket.AF_INET6, address="fe80::1", index=1, prefixlen=64),
        FakeMsg(event="RTM_NEWLINK", family=socket.AF_UNSPEC, index=1, flags=0),  # no name
        # The bridge layer's own DELLINK: "left the bridge", not "deleted".
        FakeMsg(event="RTM_DELLINK", family=socket.AF_BRIDGE, ifname="veth1", index=4, flags=0x1002),
        FakeMsg(event="RTM_NEWADDR", family=socket.AF_INET, index=1),  # no address
        object(),
    ],
)
def test_decode_ignores_what_it_does_not_use(msg: object) -> None:
    assert _decode(msg) is None


async def test_channel_size_is_validated() -> None:
    with pytest.raises(ValueError, match="channel_size"):
        async with open_link_monitor(channel_size=0):
            pass  # pragma: no cover


# -- real kernel events -------------------------------------------------------------------


@requires_lab
async def test_link_down_up_delete_arrive_in_order(nl_lab: Lab) -> None:
    ns, a = nl_lab.client_ns, "wifi0"
    with trio.fail_after(EVENT_TIMEOUT_S):
        async with open_link_monitor(netns=ns) as monitor:
            states = await read_link_states(netns=ns)
            assert all(states[p.name].up for p in nl_lab.paths)
            assert not states[a].removed
            index = states[a].index

            await nl_lab.link_down(a)
            assert await next_event_for(monitor, a, LinkEvent) == LinkEvent(
                ifname=a, index=index, up=False, removed=False
            )
            assert not (await read_link_states(netns=ns))[a].up

            await nl_lab.link_up(a)
            # Intermediate "admin up, no carrier yet" messages repeat up=False and are folded away.
            assert await next_event_for(monitor, a, LinkEvent) == LinkEvent(
                ifname=a, index=index, up=True, removed=False
            )
            assert (await read_link_states(netns=ns))[a].up

            await nl_lab.run(ns, "ip", "address", "add", "10.201.0.1/24", "dev", a)
            assert await next_event_for(monitor, a, AddressEvent) == AddressEvent(
                ifname=a, index=index, address="10.201.0.1", prefixlen=24, added=True
            )
            await nl_lab.run(ns, "ip", "address", "del", "10.201.0.1/24", "dev", a)
            assert await next_event_for(monitor, a, AddressEvent) == AddressEvent(
                ifname=a, index=index, address="10.201.0.1", prefixlen=24, added=False
            )

            await nl_lab.run(ns, "ip", "link", "del", a)
            tail = []
            while True:
                event = await next_event_for(monitor, a, LinkEvent)
                tail.append(event)
                if event.removed:
                    break
            # At most one "went down" before the removal, never an "up".
            assert tail[-1] == LinkEvent(ifname=a, index=index, up=False, removed=True)
            assert all(not e.up for e in tail)
            assert len(tail) <= 2
            states = await read_link_states(netns=ns)
            assert a not in states
            assert states["eth0"].up and states["lte0"].up
            stats = monitor.statistics()
            assert stats.overruns == 0
            assert stats.link_events >= 3 and stats.address_events >= 2


@requires_lab
async def test_overrun_emits_resync_and_counts_it(nl_lab: Lab) -> None:
    ns, a = nl_lab.client_ns, "wifi0"
    with trio.fail_after(EVENT_TIMEOUT_S * 2):
        # A 1-slot channel and the kernel's smallest socket buffer (2304 bytes): the reader
        # blocks on the channel while nobody consumes, so the socket overruns.
        async with open_link_monitor(netns=ns, channel_size=1, rcvbuf_bytes=1) as monitor:
            # One process, many changes: each flap is several RTM_NEWLINK messages.
            script = "".join(f"link set {a} down\nlink set {a} up\n" for _ in range(100))
            await nl_lab.run(ns, "ip", "-batch", "-", stdin=script.encode())
            seen: list[MonitorEvent] = []
            async for event in monitor:
                seen.append(event)
                if isinstance(event, Resync):
                    break
            assert isinstance(seen[-1], Resync)
            assert seen[-1].overruns == 1
            assert monitor.statistics().overruns >= 1
            # After a resync a full re-read gives the truth.
            assert (await read_link_states(netns=ns))[a].removed is False
            # The monitor keeps reading afterwards.  (With this tiny buffer even the
            # few messages of one deletion may overrun again: either outcome counts.)
            await nl_lab.run(ns, "ip", "link", "del", a)
            async for event in monitor:
                if isinstance(event, Resync) or (isinstance(event, LinkEvent) and event.ifname == a and event.removed):
                    break
            assert a not in await read_link_states(netns=ns)


@requires_lab
async def test_leaving_a_bridge_is_not_a_removal(nl_lab: Lab) -> None:
    ns = nl_lab.client_ns
    script = "".join(
        f"{c}\n"
        for c in [
            "link add jvnlbr0 type bridge",
            "link add jvnlp0 type veth peer name jvnlq0",
            "link set jvnlq0 master jvnlbr0",
            "link set jvnlq0 nomaster",
            "link add jvnlm0 type veth peer name jvnlm1",  # marker: everything before it has arrived
        ]
    )
    with trio.fail_after(EVENT_TIMEOUT_S):
        async with open_link_monitor(netns=ns) as monitor:
            await nl_lab.run(ns, "ip", "-batch", "-", stdin=script.encode())
            seen = []
            async for event in monitor:
                if isinstance(event, LinkEvent):
                    if event.ifname == "jvnlm0":
                        break
                    seen.append(event)
            assert {e.ifname for e in seen} >= {"jvnlbr0", "jvnlp0", "jvnlq0"}
            assert not any(e.removed for e in seen)


async def test_monitor_ends_with_end_of_channel_after_exit() -> None:
    # Our own namespace: subscribing to rtnetlink groups needs no privilege.
    with trio.fail_after(EVENT_TIMEOUT_S):
        async with open_link_monitor() as monitor:
            pass
        with pytest.raises(trio.EndOfChannel):
            await monitor.receive()


async def test_errors_in_the_block_come_out_unwrapped() -> None:
    # Same on trio 0.22 and on strict-exception-group trio: the caller's own exception.
    with trio.fail_after(EVENT_TIMEOUT_S):
        with pytest.raises(KeyError, match="mine"):
            async with open_link_monitor():
                raise KeyError("mine")


async def test_read_link_states_here_has_lo() -> None:
    with trio.fail_after(EVENT_TIMEOUT_S):
        states = await read_link_states()
    assert states["lo"].index == 1 and not states["lo"].removed


async def test_unknown_namespace_raises_and_creates_nothing() -> None:
    missing = f"jvnl{secrets.token_hex(3)}x"
    with trio.fail_after(EVENT_TIMEOUT_S):
        with pytest.raises(FileNotFoundError):
            async with open_link_monitor(netns=missing):
                pass  # pragma: no cover
        with pytest.raises(FileNotFoundError):
            await read_link_states(netns=missing)
    assert missing not in {line.split()[0] for line in (await _netns_list()).splitlines() if line.strip()}


async def _netns_list() -> str:
    done = await trio.run_process(["ip", "netns", "list"], capture_stdout=True)
    return done.stdout.decode()


# -- the path manager's wider watch: IPv6 addresses and routes ----------------------------------


def test_ipv6_addresses_and_routes_are_decoded_only_when_watched() -> None:
    v6 = FakeMsg(event="RTM_NEWADDR", family=socket.AF_INET6, address="2001:db8::5", index=4, prefixlen=64)
    assert _decode(v6) is None
    assert _decode(v6, WATCH_PATHS) == AddressEvent(
        ifname="", index=4, address="2001:db8::5", prefixlen=64, added=True, family=socket.AF_INET6
    )
    default = FakeMsg(event="RTM_NEWROUTE", family=socket.AF_INET, dst_len=0, table=254, oif=4,
                      gateway="192.168.1.1", flags=0)
    assert _decode(default) is None
    assert _decode(default, WATCH_PATHS) == RouteEvent(
        family=socket.AF_INET, table=254, dst="0.0.0.0/0", oif=4, gateway="192.168.1.1", added=True
    )
    gone = FakeMsg(event="RTM_DELROUTE", family=socket.AF_INET6, dst="2001:db8::", dst_len=32, table=254)
    assert _decode(gone, WATCH_PATHS) == RouteEvent(
        family=socket.AF_INET6, table=254, dst="2001:db8::/32", oif=None, gateway=None, added=False
    )
    ours = FakeMsg(event="RTM_DELROUTE", family=socket.AF_INET, dst="198.51.100.7", dst_len=32, table=51821,
                   proto=RTPROT_JVPN)
    assert _decode(ours, WATCH_PATHS) == RouteEvent(
        family=socket.AF_INET, table=51821, dst="198.51.100.7/32", oif=None, gateway=None, added=False,
        protocol=RTPROT_JVPN,
    )
    # IPv4 routes only: IPv6 routes stay unwatched; kernel-cloned exceptions are never table changes.
    assert _decode(gone, WATCH_DEFAULT | Watch.IPV4_ROUTES) is None
    cloned = FakeMsg(event="RTM_NEWROUTE", family=socket.AF_INET6, dst="2001:db8::9", dst_len=128, flags=0x200)
    assert _decode(cloned, WATCH_PATHS) is None


async def test_a_watch_without_links_is_rejected() -> None:
    with pytest.raises(ValueError, match="Watch.LINKS"):
        async with open_link_monitor(watch=Watch.IPV4_ROUTES):
            pass  # pragma: no cover


@requires_lab
async def test_route_changes_arrive_with_the_path_watch(nl_lab: Lab) -> None:
    ns, a = nl_lab.client_ns, "wifi0"
    with trio.fail_after(EVENT_TIMEOUT_S):
        async with open_link_monitor(netns=ns, watch=WATCH_PATHS) as monitor:
            index = (await read_link_states(netns=ns))[a].index
            await nl_lab.run(
                ns, "ip", "route", "add", "203.0.113.0/24", "dev", a, "table", "4242", "proto", str(RTPROT_JVPN)
            )
            async for event in monitor:
                if isinstance(event, RouteEvent) and event.dst == "203.0.113.0/24":
                    assert (event.table, event.oif, event.added, event.protocol) == (4242, index, True, RTPROT_JVPN)
                    break
            assert monitor.statistics().route_events >= 1
