"""Tests for drivers/ifaces.py: classification against fake sysfs trees, the pure candidate filter,
and discovery on this machine and (root) in a lab built with the shared ``jvpn_trio.lab.netns``.

Determinism rules: sysfs trees are built under ``tmp_path``; the lab (``jvnl<random>-cli``/``-gw``)
is deleted on any exit; every I/O test runs under ``trio.fail_after``; the one wait for carrier
is bounded polling inside it.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from pyroute2 import NetlinkError
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from jvpn_trio.core.candidates import Address, GatewayRoute, LinkClass, PathRules
from jvpn_trio.drivers import ifaces
from jvpn_trio.drivers.ifaces import (
    DUMP_ATTEMPTS,
    RTM_F_FIB_MATCH,
    _usable_address,
    classify,
    link_class,
    read_machine_snapshot,
)
from jvpn_trio.drivers.netlink import IFF_LOOPBACK, IFF_LOWER_UP, IFF_RUNNING, IFF_UP

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
        self.marks: set[int | None] = set()

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

    def route(self, command: str, *, dst: str, oif: int, family: int, flags: int = 0,
              mark: int | None = None) -> list[Msg]:
        assert command == "get" and dst == "198.51.100.7" and family == socket.AF_INET
        self.lookups.append((oif, flags))
        self.marks.add(mark)
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
    snapshot = ifaces._read_machine_sync(PathRules(), "198.51.100.7", None, str(tmp_path), 0x5100)
    by_name = snapshot.by_name()
    assert fake.marks == {0x5100}  # every lookup marked, so the tunnel's table never answers it
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
        ifaces._read_machine_sync(PathRules(), "198.51.100.7", None, str(tmp_path), None)


async def test_read_machine_snapshot_here() -> None:
    """Read-only, in this namespace: lo is loopback and never looked up."""
    with trio.fail_after(IO_TIMEOUT_S):
        snapshot = await read_machine_snapshot(PathRules(), "198.51.100.7")
    lo = snapshot.by_name()["lo"]
    assert lo.link_class is LinkClass.LOOPBACK and lo.route is None and lo.index == 1
