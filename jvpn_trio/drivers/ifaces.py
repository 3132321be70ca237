"""Which local interfaces can carry the tunnel, and what kind of link each one is.

Classification rule order (:func:`classify`, first match wins)
-----------------------------------------------------------------
1. ``<sysfs>/<if>/wireless`` or ``<sysfs>/<if>/phy80211`` exists -> ``"wifi"``
   (both are created by cfg80211 for every 802.11 netdev).
2. ``<sysfs>/<if>/uevent`` has ``DEVTYPE=wlan`` -> ``"wifi"`` (also cfg80211).
3. ``<sysfs>/<if>/uevent`` has ``DEVTYPE=wwan`` -> ``"lte"`` (usbnet's WWAN
   drivers: qmi_wwan, cdc_mbim, ... set it).  Driver names are deliberately
   not used: cdc_ether serves modems and plain USB Ethernet alike.
4. Name prefixes, for lab links (veth pairs renamed in a namespace) and
   systems without sysfs: ``wifi``, ``wlan``, ``wl`` -> ``"wifi"``;
   ``lte``, ``wwan``, ``ww`` -> ``"lte"``.
5. Anything else -> ``"ethernet"``.

Candidate selection (:func:`select_candidates`)
------------------------------------------------
An interface is a candidate path when it is up (:func:`~jvpn_trio.drivers.netlink.link_is_up`),
has at least one IPv4 address, is not loopback, is not named in ``exclude``
(the tunnel's own TUN goes there), is not enslaved to a master device (bridge
or bond ports: the master carries the address) and is not of a virtual kind
listed in :data:`SKIPPED_LINK_KINDS`:

* ``bridge``: docker0, virbr0, lxcbr0 hold host-only networks, not uplinks;
* ``tun``: every TUN/TAP, ours and other VPNs' (routing our UDP into another
  tunnel would make our path depend on it);
* ``wireguard`` and the IP tunnels (``ipip``, ``gre``, ``gretap``, ``sit``,
  ``vti``, ``ip6tnl``, ``vxlan``, ``geneve``): same reason;
* ``dummy``, ``ifb``, ``vrf``: never carry traffic out of the host.

``veth``, ``vlan``, ``bond``, ``team`` and ``macvlan`` stay: they are real
uplinks on some hosts, and the lab builds its paths from veth pairs.

The kind of a link comes from rtnetlink (``IFLA_INFO_KIND``), which is correct
inside any namespace.  sysfs is not: ``/sys/class/net`` shows the namespace of
whoever mounted ``/sys``.  ``ip netns exec`` remounts it, so the daemon's main
path is right; with ``discover(netns=NAME)`` from outside, classification
falls back to names for interfaces sysfs does not show and may read the wrong
device when a same-named interface exists where ``/sys`` was mounted.
"""

from __future__ import annotations

import os
import socket
from typing import AbstractSet, Callable, Iterable, Literal

import attrs
import trio

from jvpn_trio.drivers.netlink import IFF_LOOPBACK, link_is_up, open_iproute

__all__ = [
    "Candidate",
    "IfaceKind",
    "LinkInfo",
    "SKIPPED_LINK_KINDS",
    "SYSFS_NET",
    "classify",
    "discover",
    "select_candidates",
]

IfaceKind = Literal["wifi", "lte", "ethernet"]

SYSFS_NET = "/sys/class/net"

SKIPPED_LINK_KINDS = frozenset(
    {
        "bridge",
        "tun",
        "wireguard",
        "ipip",
        "gre",
        "gretap",
        "sit",
        "vti",
        "ip6tnl",
        "vxlan",
        "geneve",
        "dummy",
        "ifb",
        "vrf",
    }
)

_WIFI_PREFIXES = ("wifi", "wlan", "wl")
_LTE_PREFIXES = ("lte", "wwan", "ww")
#: IFNAMSIZ - 1: the kernel's longest interface name.
_MAX_IFNAME_LEN = 15


@attrs.frozen
class Candidate:
    """An interface that can carry a path, and its link kind."""

    ifname: str
    kind: IfaceKind


@attrs.frozen(kw_only=True)
class LinkInfo:
    """What :func:`select_candidates` needs to know about one link (from rtnetlink)."""

    ifname: str
    index: int
    flags: int
    link_kind: str | None = None
    master: int | None = None
    ipv4: tuple[str, ...] = ()


def _check_ifname(ifname: str) -> None:
    # The kernel's dev_valid_name(): also keeps sysfs paths inside the root.
    if (
        not ifname
        or len(ifname) > _MAX_IFNAME_LEN
        or ifname in (".", "..")
        or any(c == "/" or c == ":" or c.isspace() for c in ifname)
    ):
        raise ValueError(f"not a valid interface name: {ifname!r}")


def _devtype(dev_dir: str) -> str | None:
    try:
        with open(os.path.join(dev_dir, "uevent"), encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key == "DEVTYPE":
                    return value
    except OSError:
        # Missing (not in this sysfs), or ENODEV while the device is going away.
        return None
    return None


def classify(ifname: str, sysfs_root: str | os.PathLike[str] = SYSFS_NET) -> IfaceKind:
    """The link kind of ``ifname`` by the rule order in the module docstring.

    Reads a few sysfs files (blocking, but tiny): call it from a worker thread
    on the Trio side, as :func:`discover` does.  Raises ``ValueError`` for a
    string that cannot be an interface name.
    """
    _check_ifname(ifname)
    dev_dir = os.path.join(os.fspath(sysfs_root), ifname)
    if os.path.exists(os.path.join(dev_dir, "wireless")) or os.path.exists(os.path.join(dev_dir, "phy80211")):
        return "wifi"
    devtype = _devtype(dev_dir)
    if devtype == "wlan":
        return "wifi"
    if devtype == "wwan":
        return "lte"
    if ifname.startswith(_WIFI_PREFIXES):
        return "wifi"
    if ifname.startswith(_LTE_PREFIXES):
        return "lte"
    return "ethernet"


def select_candidates(
    links: Iterable[LinkInfo],
    exclude: AbstractSet[str],
    kind_of: Callable[[str], IfaceKind],
) -> list[Candidate]:
    """Pure: the candidate paths among ``links``, in interface-index order (rules in the module docstring)."""
    chosen = []
    for link in sorted(links, key=lambda li: li.index):
        if (
            link.ifname in exclude
            or link.flags & IFF_LOOPBACK
            or not link_is_up(link.flags)
            or not link.ipv4
            or link.master is not None
            or link.link_kind in SKIPPED_LINK_KINDS
        ):
            continue
        chosen.append(Candidate(link.ifname, kind_of(link.ifname)))
    return chosen


def _read_links(netns: str | None) -> list[LinkInfo]:
    with open_iproute(netns) as ipr:
        ipv4: dict[int, list[str]] = {}
        for addr in ipr.get_addr(family=socket.AF_INET):
            local = addr.get("local") or addr.get("address")
            if isinstance(local, str):
                ipv4.setdefault(addr["index"], []).append(local)
        links = []
        for link in ipr.get_links():
            ifname = link.get("ifname")
            if not isinstance(ifname, str):
                continue
            links.append(
                LinkInfo(
                    ifname=ifname,
                    index=link["index"],
                    flags=link["flags"],
                    link_kind=link.get(("linkinfo", "kind")),
                    master=link.get("master"),
                    ipv4=tuple(ipv4.get(link["index"], ())),
                )
            )
        return links


def _discover_sync(exclude: AbstractSet[str], netns: str | None, sysfs_root: str) -> list[Candidate]:
    return select_candidates(_read_links(netns), exclude, lambda name: classify(name, sysfs_root))


async def discover(
    exclude: AbstractSet[str] = frozenset(),
    *,
    netns: str | None = None,
    sysfs_root: str = SYSFS_NET,
) -> list[Candidate]:
    """The interfaces usable as paths right now (see the module docstring).

    Runs the netlink dump and the sysfs reads in a worker thread.  Raises
    ``OSError`` / ``pyroute2.NetlinkError`` if the dump fails
    (``FileNotFoundError`` for an unknown ``netns``).
    """
    return await trio.to_thread.run_sync(_discover_sync, frozenset(exclude), netns, sysfs_root)
