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

Link classes (:func:`link_class`)
---------------------------------
Which links may carry a path is decided in ``core/candidates.py`` from each link's
class: loopback, a port enslaved to a master device (bridge or bond ports: the
master carries the address), and these kinds never do:

* ``bridge``: docker0, virbr0, lxcbr0 hold host-only networks, not uplinks;
* ``tun``: every TUN/TAP, ours and other VPNs' (routing our UDP into another
  tunnel would make our path depend on it);
* ``wireguard`` and the IP tunnels (``ipip``, ``gre``, ``gretap``, ``sit``,
  ``vti``, ``ip6tnl``, ``vxlan``, ``geneve``): same reason;
* ``dummy``, ``ifb``, ``vrf``: never carry traffic out of the host.

``veth``, ``vlan``, ``bond``, ``team`` and ``macvlan`` may: they are real
uplinks on some hosts, and the lab builds its paths from veth pairs (a veth
counts only when a ``[[path]]`` rule names it).

The path manager's snapshot (:func:`read_machine_snapshot`)
-----------------------------------------------------------
For the path manager the same facts become a :class:`~jvpn_trio.core.candidates.MachineSnapshot`:
each link gets a :class:`~jvpn_trio.core.candidates.LinkClass` (:func:`link_class`), its kind
(:func:`classify`), its usable addresses of both families (global or site scope, not
tentative, DAD not failed) and, for each candidate that is up and addressed, the kernel's
route to the gateway through it, read at every snapshot.  ``ip route get GW oif IF`` alone
cannot say "no route": with an output interface the kernel assumes an unrouted destination
is on-link and answers anyway.  So the lookup is made twice: with ``RTM_F_FIB_MATCH``
(``ip route get fibmatch``), which fails with ``ENETUNREACH``/``EHOSTUNREACH`` when no route
through that interface exists, then plainly, for the next hop and source address the kernel
would use.  The lookup goes through the usual rules, so a ``main`` default route via the
interface answers it as well as a more specific route.  ``up`` marks the lookups with a mark
the tunnel's rule lets by (``routes.TunnelRoutes.lookup_mark``): a tunnel of the other family only
has an ``unreachable default`` for the gateway's family in its table, which an unmarked
lookup falls into on every link.

An OS error about one interface (``ENODEV`` when it vanished between the dump and the
lookup, ``EPERM``, ...) is recorded on that interface as ``error``: it is unusable for
this snapshot and the others are not affected.  Only a failed dump of all links or all
addresses raises.

The kind of a link comes from rtnetlink (``IFLA_INFO_KIND``), which is correct
inside any namespace.  sysfs is not: ``/sys/class/net`` shows the namespace of
whoever mounted ``/sys``.  ``ip netns exec`` remounts it, so the daemon's main
path is right; with ``read_machine_snapshot(..., netns=NAME)`` from outside, classification
falls back to names for interfaces sysfs does not show and may read the wrong
device when a same-named interface exists where ``/sys`` was mounted.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable, Iterable, Literal

import attrs
import trio

from jvpn_trio.config import MAX_IFNAME_LEN
from jvpn_trio.core.candidates import (
    Address,
    GatewayRoute,
    InterfaceState,
    LinkClass,
    MachineSnapshot,
    PathRules,
    gateway_family,
)
from jvpn_trio.core.candidates import select_candidates as select_path_candidates
from jvpn_trio.drivers.netlink import (
    IFF_LOOPBACK,
    NetlinkDumpInterrupted,
    NetlinkError,
    link_is_up,
    open_iproute,
)

__all__ = [
    "IfaceKind",
    "SYSFS_NET",
    "classify",
    "DUMP_ATTEMPTS",
    "NO_ROUTE_ERRNOS",
    "RTM_F_FIB_MATCH",
    "TUNNEL_LINK_KINDS",
    "VIRTUAL_LINK_KINDS",
    "describe_os_error",
    "link_class",
    "read_machine_snapshot",
]

IfaceKind = Literal["wifi", "lte", "ethernet"]

SYSFS_NET = "/sys/class/net"

#: Link kinds (IFLA_INFO_KIND) whose traffic goes through another tunnel, ours included.
TUNNEL_LINK_KINDS = frozenset(
    {"tun", "wireguard", "ipip", "gre", "gretap", "ip6gre", "ip6gretap", "sit", "vti", "vti6", "ip6tnl", "vxlan", "geneve"}
)
#: Link kinds that never carry traffic out of the host.
VIRTUAL_LINK_KINDS = frozenset({"dummy", "ifb", "vrf", "nlmon"})

_WIFI_PREFIXES = ("wifi", "wlan", "wl")
_LTE_PREFIXES = ("lte", "wwan", "ww")


def _check_ifname(ifname: str) -> None:
    # The kernel's dev_valid_name(): also keeps sysfs paths inside the root.
    if (
        not ifname
        or len(ifname) > MAX_IFNAME_LEN
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


# -- the path manager's snapshot ------------------------------------------------------

#: ``rtm_flags`` of RTM_GETROUTE: answer with the FIB entry that matched, or fail if none did.
RTM_F_FIB_MATCH = 0x2000
#: Route lookups failing with these mean "no route through this interface", not an error.
NO_ROUTE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN})
#: A dump interrupted by a concurrent change (NLM_F_DUMP_INTR) is retried this many times in all.
DUMP_ATTEMPTS = 3
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40
#: Addresses of link or host scope cannot be the source towards a remote gateway.
_RT_SCOPE_LINK = 253
_VERSION_OF_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}
_FAMILY_OF_VERSION = {4: socket.AF_INET, 6: socket.AF_INET6}


def link_class(*, flags: int, link_kind: str | None, master: int | None) -> LinkClass:
    """Pure: what sort of link this is for path selection (loopback, bridge, tunnel, virtual, port, veth, ordinary)."""
    if flags & IFF_LOOPBACK:
        return LinkClass.LOOPBACK
    if link_kind == "bridge":
        return LinkClass.BRIDGE
    if link_kind in TUNNEL_LINK_KINDS:
        return LinkClass.TUNNEL
    if link_kind in VIRTUAL_LINK_KINDS:
        return LinkClass.VIRTUAL
    if master is not None:
        return LinkClass.CONTAINER
    if link_kind == "veth":
        return LinkClass.VETH
    return LinkClass.ORDINARY


def describe_os_error(exc: BaseException) -> str:
    """``"ENODEV: [Errno 19] No such device"``: an OS or netlink error on one line, errno name first."""
    code = getattr(exc, "code", None) if isinstance(exc, NetlinkError) else getattr(exc, "errno", None)
    name = errno.errorcode.get(code, str(code)) if isinstance(code, int) else type(exc).__name__
    return f"{name}: {exc}"


def _usable_address(msg: Any) -> Address | None:
    version = _VERSION_OF_FAMILY.get(msg.get("family"))
    local = msg.get("local") or msg.get("address")
    if version is None or not isinstance(local, str):
        return None
    flags = msg.get("IFA_FLAGS")
    if not isinstance(flags, int):
        flags = msg.get("flags") or 0
    scope = msg.get("scope") or 0
    if flags & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED) or scope >= _RT_SCOPE_LINK:
        return None
    return Address(family=version, address=local, prefixlen=int(msg.get("prefixlen") or 0))


def _route_to(ipr: Any, gateway: str, family: int, index: int, mark: int | None) -> GatewayRoute | None:
    """The kernel's route to ``gateway`` through interface ``index`` (see the module docstring), or None."""
    marked = {} if mark is None else {"mark": mark}
    try:
        ipr.route("get", dst=gateway, oif=index, family=family, flags=RTM_F_FIB_MATCH, **marked)
        answer = ipr.route("get", dst=gateway, oif=index, family=family, **marked)
    except NetlinkError as exc:
        if exc.code in NO_ROUTE_ERRNOS:
            return None
        raise
    if not answer:
        return None
    next_hop, source = answer[0].get("gateway"), answer[0].get("prefsrc")
    return GatewayRoute(
        next_hop=next_hop if isinstance(next_hop, str) else None,
        source=source if isinstance(source, str) else None,
    )


def _dump(fetch: Callable[[], Iterable[Any]]) -> list[Any]:
    """``fetch()`` as a list, retried when a concurrent change interrupted the dump."""
    attempts_left = DUMP_ATTEMPTS
    while True:
        try:
            return list(fetch())
        except NetlinkDumpInterrupted:
            attempts_left -= 1
            if attempts_left == 0:
                raise


def _read_machine_sync(
    rules: PathRules, gateway: str, netns: str | None, sysfs_root: str, mark: int | None
) -> MachineSnapshot:
    version = gateway_family(gateway)
    with open_iproute(netns) as ipr:
        links, addresses = _dump(ipr.get_links), _dump(ipr.get_addr)
        by_index: dict[int, list[Address]] = {}
        for msg in addresses:
            address = _usable_address(msg)
            if address is not None and isinstance(msg.get("index"), int):
                by_index.setdefault(msg.get("index"), []).append(address)
        states = []
        for link in links:
            ifname, index, flags = link.get("ifname"), link.get("index"), link.get("flags")
            if not isinstance(ifname, str) or not isinstance(index, int) or not isinstance(flags, int):
                continue
            cls = link_class(flags=flags, link_kind=link.get(("linkinfo", "kind")), master=link.get("master"))
            states.append(
                InterfaceState(
                    name=ifname,
                    index=index,
                    kind="ethernet" if cls is LinkClass.LOOPBACK else classify(ifname, sysfs_root),
                    link_class=cls,
                    up=link_is_up(flags),
                    addresses=tuple(by_index.get(index, ())),
                )
            )
        snapshot = MachineSnapshot(tuple(states))
        wanted = {c.name for c in select_path_candidates(rules, snapshot)}
        looked_up = []
        for state in snapshot.interfaces:
            if state.name in wanted and state.up and state.addresses_of(version):
                try:
                    route = _route_to(ipr, gateway, _FAMILY_OF_VERSION[version], state.index, mark)
                    state = attrs.evolve(state, route=route)
                except (NetlinkError, OSError) as exc:
                    state = attrs.evolve(state, error=describe_os_error(exc))
            looked_up.append(state)
        return MachineSnapshot(tuple(looked_up))


async def read_machine_snapshot(
    rules: PathRules,
    gateway: str,
    *,
    netns: str | None = None,
    sysfs_root: str = SYSFS_NET,
    lookup_mark: int | None = None,
) -> MachineSnapshot:
    """The machine as the path manager's rules see it now: links, addresses, routes to ``gateway``.

    ``lookup_mark`` marks the route lookups, so that they see what a path socket would see
    before its own table (``routes.TunnelRoutes.lookup_mark``): an unmarked lookup goes into the
    tunnel's table, which blocks the gateway's family when the tunnel carries only the other
    one, and would then find no path at all.

    Runs the netlink dumps, the route lookups and the sysfs reads in a worker thread,
    with an ``IPRoute`` of its own.  Per-interface failures are recorded on the
    interface; a failed dump raises ``OSError`` or ``pyroute2.NetlinkError``
    (``FileNotFoundError`` for an unknown ``netns``).
    """
    return await trio.to_thread.run_sync(_read_machine_sync, rules, gateway, netns, sysfs_root, lookup_mark)
