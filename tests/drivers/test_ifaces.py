"""Tests for drivers/ifaces.py: classification against fake sysfs trees, the pure candidate filter,
and discovery on this machine and (root) in a lab built with the shared ``jvpn_trio.lab.netns``.

Determinism rules: sysfs trees are built under ``tmp_path``; the lab (``jvnl<random>-cli``/``-gw``)
is deleted on any exit; every I/O test runs under ``trio.fail_after``; the one wait for carrier
is bounded polling inside it.
"""

from __future__ import annotations

import errno
import secrets
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from pyroute2 import NetlinkError
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from jvpn_trio.core.candidates import Address, GatewayRoute, LinkClass, PathRules
from jvpn_trio.drivers import ifaces
from jvpn_trio.drivers.ifaces import (
    DUMP_ATTEMPTS,
    RTM_F_FIB_MATCH,
    Candidate,
    IfaceKind,
    LinkInfo,
    _usable_address,
    classify,
    discover,
    link_class,
    read_machine_snapshot,
    select_candidates,
)
from jvpn_trio.drivers.netlink import IFF_LOOPBACK, IFF_LOWER_UP, IFF_RUNNING, IFF_UP, read_link_states
from jvpn_trio.drivers.routes import set_tun_address
from jvpn_trio.lab.netns import Lab, LabSpec, open_lab
from tests.netns import requires_lab

IO_TIMEOUT_S = 10.0
UP = IFF_UP | IFF_LOWER_UP | IFF_RUNNING


def fake_dev(root: Path, ifname: str, *, uevent: str = "", subdirs: tuple[str, ...] = ()) -> None:
    dev = root / ifname
    dev.mkdir(parents=True)
    (dev / "uevent").write_text(f"{uevent}INTERFACE={ifname}\nIFINDEX=7\n")
    for sub in subdirs:
        (dev / sub).mkdir()


# -- classify --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ifname", "uevent", "subdirs", "kind"),
    [
        # 1. cfg80211 directories, whatever the name
        ("wlp2s0", "", ("wireless",), "wifi"),
        ("enx0011", "", ("phy80211",), "wifi"),
        ("eth9", "", ("wireless", "phy80211"), "wifi"),
        # 2./3. DEVTYPE from uevent
        ("enp0s20u2", "DEVTYPE=wlan\n", (), "wifi"),
        ("enp0s20u1", "DEVTYPE=wwan\n", (), "lte"),
        ("usb0", "DEVTYPE=wwan\n", (), "lte"),
        # sysfs wins over a misleading name
        ("lte0", "", ("wireless",), "wifi"),
        ("wlan0", "DEVTYPE=wwan\n", (), "lte"),
        # 4. name prefixes (lab veths carry no sysfs hints)
        ("wifi0", "", (), "wifi"),
        ("wlan1", "", (), "wifi"),
        ("wlx00c0ca", "", (), "wifi"),
        ("lte0", "", (), "lte"),
        ("wwan0", "", (), "lte"),
        ("wwp0s20f0u6", "", (), "lte"),
        # 5. everything else
        ("eth0", "", (), "ethernet"),
        ("enp3s0", "DEVTYPE=gadget\n", (), "ethernet"),
        ("usb0", "", (), "ethernet"),  # cdc_ether without DEVTYPE=wwan is ambiguous: ethernet
        ("veth7", "", (), "ethernet"),
    ],
)
def test_classify_fake_sysfs(tmp_path: Path, ifname: str, uevent: str, subdirs: tuple[str, ...], kind: str) -> None:
    fake_dev(tmp_path, ifname, uevent=uevent, subdirs=subdirs)
    assert classify(ifname, sysfs_root=tmp_path) == kind


@pytest.mark.parametrize(("ifname", "kind"), [("wlan0", "wifi"), ("wwan0", "lte"), ("eth0", "ethernet")])
def test_classify_without_sysfs_entry_uses_the_name(tmp_path: Path, ifname: str, kind: str) -> None:
    assert classify(ifname, sysfs_root=tmp_path) == kind


def test_classify_unreadable_uevent_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "wlan0").mkdir()
    (tmp_path / "wlan0" / "uevent").mkdir()  # reading a directory raises IsADirectoryError
    assert classify("wlan0", sysfs_root=tmp_path) == "wifi"


@pytest.mark.parametrize("bad", ["", ".", "..", "../etc", "a/b", "eth0:1", "has space", "x" * 16])
def test_classify_rejects_invalid_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="interface name"):
        classify(bad, sysfs_root=tmp_path)


def test_classify_reads_the_real_sysfs() -> None:
    assert classify("lo") == "ethernet"


# -- select_candidates (pure) --------------------------------------------------------------


def kinds(name: str) -> IfaceKind:
    return "wifi" if name.startswith("wl") else "ethernet"


def test_select_candidates_filters_and_orders_by_index() -> None:
    links = [
        LinkInfo(ifname="wlan0", index=5, flags=UP, ipv4=("10.0.2.2",)),
        LinkInfo(ifname="lo", index=1, flags=UP | IFF_LOOPBACK, ipv4=("127.0.0.1",)),
        LinkInfo(ifname="eth0", index=2, flags=UP, link_kind=None, ipv4=("10.0.1.2",)),
        LinkInfo(ifname="jvpn0", index=9, flags=UP, link_kind="tun", ipv4=("10.200.0.2",)),
        LinkInfo(ifname="docker0", index=4, flags=UP, link_kind="bridge", ipv4=("172.17.0.1",)),
        LinkInfo(ifname="wg0", index=8, flags=UP, link_kind="wireguard", ipv4=("10.9.0.2",)),
        LinkInfo(ifname="vethab", index=6, flags=UP, link_kind="veth", master=4),  # bridge port
        LinkInfo(ifname="eth1", index=3, flags=IFF_UP, ipv4=("10.0.3.2",)),  # no carrier
        LinkInfo(ifname="eth2", index=7, flags=UP),  # no IPv4
        LinkInfo(ifname="lab0", index=10, flags=UP, link_kind="veth", ipv4=("10.0.4.2",)),
        LinkInfo(ifname="skipme", index=11, flags=UP, ipv4=("10.0.5.2",)),
    ]
    assert select_candidates(links, {"skipme"}, kinds) == [
        Candidate("eth0", "ethernet"),
        Candidate("wlan0", "wifi"),
        Candidate("lab0", "ethernet"),
    ]


def test_select_candidates_excludes_the_tun_by_name_whatever_its_kind() -> None:
    links = [LinkInfo(ifname="jvpn0", index=2, flags=UP, ipv4=("10.200.0.2",))]
    assert select_candidates(links, {"jvpn0"}, kinds) == []
    assert select_candidates(links, set(), kinds) == [Candidate("jvpn0", "ethernet")]


# -- discover ------------------------------------------------------------------------------


async def test_discover_runs_here_and_excludes_lo() -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        found = await discover(set())
    assert all(isinstance(c, Candidate) for c in found)
    assert "lo" not in {c.ifname for c in found}
    assert all(c.kind in ("wifi", "lte", "ethernet") for c in found)


def _open_tun(name: str) -> Any:
    import pytun  # only the root tests need it

    return pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)


@pytest.fixture
async def if_lab() -> AsyncIterator[Lab]:
    """A fresh shared-helper lab (eth0/wifi0/lte0 in ``jvnl<hex>-cli``) plus an up TUN
    ``jvnl<hex>t`` with an address in the client, torn down after the test."""
    prefix = f"jvnl{secrets.token_hex(3)}"
    async with open_lab(LabSpec(prefix=prefix)) as lab:
        name = f"{prefix}t"
        # pytun creates the TUN in our own namespace; move it.  Closing the fd deletes it.
        tun = await trio.to_thread.run_sync(_open_tun, name)
        try:
            await trio.run_process(["ip", "link", "set", name, "netns", lab.client_ns], capture_stderr=True)
            await set_tun_address(name, "10.200.0.2", 24, 1400, netns=lab.client_ns)
            yield lab
        finally:
            tun.close()


@requires_lab
async def test_discover_in_a_lab(if_lab: Lab, tmp_path: Path) -> None:
    ns = if_lab.client_ns
    # Besides the TUN (up, with an address, skipped by kind): a bridge with an address
    # and a port (skipped by kind; the port has a master, and its own address is ignored).
    script = "".join(
        f"{c}\n"
        for c in [
            "link add jvnlbr0 type bridge",
            "link add jvnlp0 type veth peer name jvnlq0",
            "link set jvnlq0 master jvnlbr0",
            "address add 10.202.2.1/24 dev jvnlbr0",
            "address add 10.202.3.1/24 dev jvnlq0",
            "link set jvnlp0 up",
            "link set jvnlq0 up",
            "link set jvnlbr0 up",
        ]
    )
    # An empty sysfs: /sys/class/net shows the root namespace, not the lab's (see the
    # module docstring), so classification here must come from the names alone.
    fake_sysfs = str(tmp_path)
    with trio.fail_after(IO_TIMEOUT_S):
        await if_lab.run(ns, "ip", "-batch", "-", stdin=script.encode())
        # The bridge gets carrier a moment after its port: wait (bounded) so it is really
        # up when discover skips it by kind.
        while not (states := await read_link_states(netns=ns))["jvnlbr0"].up:
            await trio.sleep(0.01)
        assert states["jvnlq0"].up
        tun = f"{if_lab.spec.prefix}t"
        assert states[tun].up
        assert await discover(set(), netns=ns, sysfs_root=fake_sysfs) == [
            Candidate("eth0", "ethernet"),
            Candidate("wifi0", "wifi"),
            Candidate("lte0", "lte"),
        ]
        assert await discover({"lte0"}, netns=ns, sysfs_root=fake_sysfs) == [
            Candidate("eth0", "ethernet"),
            Candidate("wifi0", "wifi"),
        ]
        await if_lab.link_down("wifi0")
        assert [c.ifname for c in await discover(set(), netns=ns, sysfs_root=fake_sysfs)] == ["eth0", "lte0"]


async def test_discover_unknown_namespace_raises_and_creates_nothing() -> None:
    missing = f"jvnl{secrets.token_hex(3)}x"
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(FileNotFoundError):
            await discover(set(), netns=missing)
        listed = await trio.run_process(["ip", "netns", "list"], capture_stdout=True)
    assert missing not in listed.stdout.decode()


# -- the path manager's snapshot ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "link_kind", "master", "expected"),
    [
        (IFF_LOOPBACK | UP, None, None, LinkClass.LOOPBACK),
        (UP, "bridge", None, LinkClass.BRIDGE),
        (UP, "tun", None, LinkClass.TUNNEL),
        (UP, "wireguard", None, LinkClass.TUNNEL),
        (UP, "dummy", None, LinkClass.VIRTUAL),
        (UP, "veth", 5, LinkClass.CONTAINER),  # docker's host end, enslaved to docker0
        (UP, "veth", None, LinkClass.VETH),
        (UP, None, None, LinkClass.ORDINARY),
        (UP, "vlan", None, LinkClass.ORDINARY),
        (UP, "bond", None, LinkClass.ORDINARY),
    ],
)
def test_link_class(flags: int, link_kind: str | None, master: int | None, expected: LinkClass) -> None:
    assert link_class(flags=flags, link_kind=link_kind, master=master) is expected


class Msg(dict):  # type: ignore[type-arg]
    """Stands in for a parsed pyroute2 message: only ``.get`` is used."""


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (Msg(family=socket.AF_INET, local="10.0.0.2", prefixlen=24, scope=0, flags=0),
         Address(family=4, address="10.0.0.2", prefixlen=24)),
        (Msg(family=socket.AF_INET6, address="2001:db8::2", prefixlen=64, scope=0, IFA_FLAGS=0),
         Address(family=6, address="2001:db8::2", prefixlen=64)),
        (Msg(family=socket.AF_INET6, address="2001:db8::2", prefixlen=64, scope=0, IFA_FLAGS=0x40), None),  # tentative
        (Msg(family=socket.AF_INET6, address="2001:db8::2", prefixlen=64, scope=0, IFA_FLAGS=0x08), None),  # dadfailed
        (Msg(family=socket.AF_INET6, address="fe80::2", prefixlen=64, scope=253, IFA_FLAGS=0), None),  # link scope
        (Msg(family=socket.AF_INET, local="127.0.0.1", prefixlen=8, scope=254, flags=0), None),  # host scope
        (Msg(family=socket.AF_PACKET, address="x"), None),
    ],
)
def test_only_addresses_usable_as_a_source_count(msg: Msg, expected: Address | None) -> None:
    assert _usable_address(msg) == expected


class FakeIPRoute:
    """``get_links``/``get_addr``/``route('get')`` from scripted answers; records the lookups."""

    def __init__(self, links: list[Msg], addrs: list[Msg], routes: dict[int, Any], interrupted: int = 0) -> None:
        self.links, self.addrs, self.routes, self.interrupted = links, addrs, routes, interrupted
        self.lookups: list[tuple[int, int]] = []

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get_links(self) -> list[Msg]:
        if self.interrupted:
            self.interrupted -= 1
            raise NetlinkDumpInterrupted()
        return self.links

    def get_addr(self) -> list[Msg]:
        return self.addrs

    def route(self, command: str, *, dst: str, oif: int, family: int, flags: int = 0) -> list[Msg]:
        assert command == "get" and dst == "198.51.100.7" and family == socket.AF_INET
        self.lookups.append((oif, flags))
        answer = self.routes[oif]
        if isinstance(answer, BaseException):
            raise answer
        return [answer]


def link(name: str, index: int, flags: int = UP, kind: str | None = None) -> Msg:
    return Msg({"ifname": name, "index": index, "flags": flags, ("linkinfo", "kind"): kind})


def addr(index: int, address: str) -> Msg:
    return Msg(family=socket.AF_INET, index=index, local=address, prefixlen=24, scope=0, flags=0)


def test_the_snapshot_reads_routes_for_candidates_only_and_isolates_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeIPRoute(
        links=[link("lo", 1, IFF_LOOPBACK | UP), link("eth0", 2), link("wlan0", 3), link("usb0", 4),
               link("eth1", 5, IFF_UP), link("docker0", 6, kind="bridge")],
        addrs=[addr(2, "192.168.1.20"), addr(3, "10.0.0.5"), addr(4, "172.20.0.2"), addr(5, "10.9.9.9"),
               addr(6, "172.17.0.1")],
        routes={
            2: Msg(gateway="192.168.1.1", prefsrc="192.168.1.20"),
            3: NetlinkError(errno.ENODEV, "No such device"),  # vanished between the dump and the lookup
            4: NetlinkError(errno.EHOSTUNREACH, "No route to host"),  # fibmatch: no route through usb0
        },
        interrupted=1,
    )
    monkeypatch.setattr(ifaces, "open_iproute", lambda netns: fake)
    snapshot = ifaces._read_machine_sync(PathRules(), "198.51.100.7", None, str(tmp_path))
    by_name = snapshot.by_name()
    assert by_name["eth0"].route == GatewayRoute(next_hop="192.168.1.1", source="192.168.1.20")
    assert by_name["wlan0"].error is not None and by_name["wlan0"].error.startswith("ENODEV")
    assert by_name["wlan0"].kind == "wifi"
    assert by_name["usb0"].route is None and by_name["usb0"].error is None
    # Lookups: with FIB_MATCH first, then plain; never for loopback, a down link or a bridge.
    assert fake.lookups == [(2, RTM_F_FIB_MATCH), (2, 0), (3, RTM_F_FIB_MATCH), (4, RTM_F_FIB_MATCH)]
    assert by_name["lo"].link_class is LinkClass.LOOPBACK and by_name["docker0"].route is None


def test_a_dump_interrupted_too_often_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeIPRoute(links=[], addrs=[], routes={}, interrupted=DUMP_ATTEMPTS)
    monkeypatch.setattr(ifaces, "open_iproute", lambda netns: fake)
    with pytest.raises(NetlinkDumpInterrupted):
        ifaces._read_machine_sync(PathRules(), "198.51.100.7", None, str(tmp_path))


async def test_read_machine_snapshot_here() -> None:
    """Read-only, in this namespace: lo is loopback and never looked up."""
    with trio.fail_after(IO_TIMEOUT_S):
        snapshot = await read_machine_snapshot(PathRules(), "198.51.100.7")
    lo = snapshot.by_name()["lo"]
    assert lo.link_class is LinkClass.LOOPBACK and lo.route is None and lo.index == 1
