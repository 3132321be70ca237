"""Link, address and route events from the kernel, as frozen values on a Trio channel.

Theory of operation
-------------------
The kernel multicasts every link, address and route change on rtnetlink.  We
listen on a raw ``AF_NETLINK`` socket wrapped by ``trio.socket`` and bound to
the groups chosen by :class:`Watch`: by default ``RTMGRP_LINK |
RTMGRP_IPV4_IFADDR`` (links and IPv4 addresses); :data:`WATCH_PATHS` adds
IPv6 addresses and the IPv4 and IPv6 routes, so that a DHCP renewal or a new
default route wakes the path manager too.  pyroute2's ``MarshalRtnl`` only
*parses* the bytes.  pyroute2's own socket objects are not used on the event
loop: ``IPRoute`` buffers messages internally (a readable-fd wait then misses
queued events, measured 1.5 s late in platform-notes section 6) and its async
API is asyncio-only.

One reader task turns each message into a :class:`LinkEvent`,
:class:`AddressEvent` or :class:`RouteEvent` (for the watched groups only) and ``await``\\ s ``send`` on a bounded channel.  A slow
consumer therefore applies back-pressure: the reader stops reading, the
kernel socket buffer fills up, and the kernel drops messages and reports
``ENOBUFS`` on the next ``recv``.  Dropped messages can never be recovered,
so the reader emits a :class:`Resync` marker instead and counts the overrun;
the consumer then re-reads every link with :func:`read_link_states`.  Nothing
is ever silently lost: either every change arrives in kernel order or a
``Resync`` says "state unknown, read it again".

Many ``RTM_NEWLINK`` messages carry no change we care about (statistics,
carrier negotiation steps), so link events are de-duplicated per interface
index on ``(ifname, up)``; the memory is cleared on ``Resync``.

"Up" means usable for traffic: administratively up (``IFF_UP``), carrier
present (``IFF_LOWER_UP``) and operationally up (``IFF_RUNNING``, which is
clear while a Wi-Fi link is associated but still ``DORMANT`` during
authentication).  See :func:`link_is_up`.

Namespaces: the daemon normally runs inside its namespace already (``ip netns
exec``), so ``netns=None`` is the main path.  ``netns=NAME`` creates the
socket inside that namespace with ``pyroute2.netns.create_socket`` (a short
helper process, run in a worker thread), which never changes the namespace
of any thread of ours.
"""

from __future__ import annotations

import enum
import errno
import importlib
import importlib.util
import socket
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Union

import attrs
import trio


def _pyroute2_without_its_package_init() -> None:
    """Make ``import pyroute2.<module>`` load that module, not the whole library.

    pyroute2's package ``__init__`` imports every netlink family it knows (NDB,
    IPDB, conntrack, nftables, nl80211, plan9, ...): 75 modules and 6.5 MiB of
    RSS more than the rtnetlink parts we use, in every gateway and client
    (measured with pyroute2 0.9.7; issue 16, "a gateway that imports only what
    it runs", tests/test_import_weight.py).  So unless pyroute2
    is already imported, the package is registered without running its
    ``__init__``; its submodules import as usual.  A name the ``__init__``
    would have exported (``from pyroute2 import NDB``) still works: the first
    such lookup runs the real ``__init__`` in the same module, once.
    """
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not a package we know how to load in parts: let the plain import do what it does
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    completing = False

    def complete_on_demand(name: str) -> Any:
        nonlocal completing
        is_submodule = importlib.util.find_spec(f"pyroute2.{name}") is not None
        if completing or name.startswith("__") or is_submodule:
            raise AttributeError(f"module 'pyroute2' has no attribute {name!r}")  # the import system's cue
        completing = True
        loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = complete_on_demand
    sys.modules["pyroute2"] = package
    # What our drivers take from the package itself (``from pyroute2 import NetlinkError``): the same objects.
    package.__dict__["IPRoute"] = importlib.import_module("pyroute2.iproute.linux").IPRoute
    package.__dict__["NetlinkError"] = importlib.import_module("pyroute2.netlink.exceptions").NetlinkError


_pyroute2_without_its_package_init()

from pyroute2 import netns as pyroute2_netns  # after the package is registered, above
from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from jvpn_trio.errors import lone_exception_unwrapped

__all__ = [
    "AddressEvent",
    "DEFAULT_CHANNEL_SIZE",
    "DEFAULT_RCVBUF_BYTES",
    "IFF_LOWER_UP",
    "IFF_LOOPBACK",
    "IFF_RUNNING",
    "IFF_UP",
    "LinkEvent",
    "LinkMonitor",
    "LinkMonitorStatistics",
    "MonitorEvent",
    "NetlinkDumpInterrupted",
    "NetlinkError",
    "Resync",
    "RouteEvent",
    "WATCH_DEFAULT",
    "WATCH_PATHS",
    "Watch",
    "link_is_up",
    "open_iproute",
    "open_link_monitor",
    "read_link_states",
]

# -- constants (linux/if.h) --------------------------------------------------

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000

#: Events buffered between the reader task and the consumer before the reader
#: blocks (and the kernel socket buffer starts to fill).
DEFAULT_CHANNEL_SIZE = 256
#: Kernel receive buffer for the netlink socket (SO_RCVBUF; the kernel doubles it).
DEFAULT_RCVBUF_BYTES = 1 << 20
#: One recv() returns at most one skb; rtnetlink skbs are far below this.
_RECV_BUFSIZE = 1 << 16
#: Python 3.11's socket module lacks SO_RCVBUFFORCE; 33 in asm-generic/socket.h (x86, arm).
_SO_RCVBUFFORCE: int = getattr(socket, "SO_RCVBUFFORCE", 33)
#: The kernel's netlink port id: only messages from it are believed.
_KERNEL_PORT_ID = 0

#: rtm_flags of a route the kernel cloned for itself (IPv6 exceptions: PMTU, redirects): not a table change.
_RTM_F_CLONED = 0x200


class Watch(enum.Flag):
    """Which rtnetlink multicast groups a monitor subscribes to (and which messages it decodes)."""

    LINKS = enum.auto()
    IPV4_ADDRESSES = enum.auto()
    IPV6_ADDRESSES = enum.auto()
    IPV4_ROUTES = enum.auto()
    IPV6_ROUTES = enum.auto()


#: Links and IPv4 addresses: what the client runtime follows today.
WATCH_DEFAULT = Watch.LINKS | Watch.IPV4_ADDRESSES
#: Everything that can make a path usable or not, or move its source address or next hop.
WATCH_PATHS = WATCH_DEFAULT | Watch.IPV6_ADDRESSES | Watch.IPV4_ROUTES | Watch.IPV6_ROUTES

_GROUP_OF = {
    Watch.LINKS: RTMGRP_LINK,
    Watch.IPV4_ADDRESSES: RTMGRP_IPV4_IFADDR,
    Watch.IPV6_ADDRESSES: RTMGRP_IPV6_IFADDR,
    Watch.IPV4_ROUTES: RTMGRP_IPV4_ROUTE,
    Watch.IPV6_ROUTES: RTMGRP_IPV6_ROUTE,
}


def _groups(watch: Watch) -> int:
    groups = 0
    for flag, group in _GROUP_OF.items():
        if flag in watch:
            groups |= group
    return groups


# -- values --------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LinkEvent:
    """The state of one interface after a change (or as read by :func:`read_link_states`).

    ``up`` is :func:`link_is_up` of the interface flags; a removed link is never up.
    """

    ifname: str
    index: int
    up: bool
    removed: bool = False


@attrs.frozen(kw_only=True)
class AddressEvent:
    """An address was added to (``added``) or removed from an interface.

    ``family`` is ``AF_INET`` or (with :attr:`Watch.IPV6_ADDRESSES`) ``AF_INET6``.  IPv6
    addresses carry no label, so their ``ifname`` is empty: use ``index``.
    """

    ifname: str
    index: int
    address: str
    prefixlen: int
    added: bool
    family: int = socket.AF_INET


@attrs.frozen(kw_only=True)
class RouteEvent:
    """A route was added (``added``) or removed, in any table (only with the route :class:`Watch` groups).

    ``dst`` is ``address/prefixlen``; ``oif`` and ``gateway`` are None when the message
    has none (multipath routes name their next hops elsewhere, unreachable routes have none).
    """

    family: int
    table: int
    dst: str
    oif: int | None
    gateway: str | None
    added: bool
    #: Who installed it (``rtm_protocol``: the kernel, a DHCP client, ``routes.RTPROT_JVPN`` for ours).
    protocol: int | None = None


@attrs.frozen(kw_only=True)
class Resync:
    """The kernel dropped events (socket overrun): re-read all links with :func:`read_link_states`.

    ``overruns`` is the monitor's overrun count including this one.
    """

    overruns: int


MonitorEvent = Union[LinkEvent, AddressEvent, RouteEvent, Resync]


@attrs.frozen(kw_only=True)
class LinkMonitorStatistics:
    """Counters of one monitor: what it emitted and what it had to give up on."""

    link_events: int
    address_events: int
    overruns: int
    ignored_messages: int
    route_events: int = 0


def link_is_up(flags: int) -> bool:
    """Whether interface ``flags`` (``ifi_flags``) mean the link can carry traffic now.

    Requires ``IFF_UP`` (administrative), ``IFF_LOWER_UP`` (carrier) and
    ``IFF_RUNNING`` (operational state UP or UNKNOWN; clear while DORMANT).
    """
    wanted = IFF_UP | IFF_LOWER_UP | IFF_RUNNING
    return flags & wanted == wanted


# -- decoding (pure: pyroute2 message -> event) ---------------------------------


_ADDRESS_WATCH = {socket.AF_INET: Watch.IPV4_ADDRESSES, socket.AF_INET6: Watch.IPV6_ADDRESSES}
_ROUTE_WATCH = {socket.AF_INET: Watch.IPV4_ROUTES, socket.AF_INET6: Watch.IPV6_ROUTES}
_ANY_ADDRESS = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def _decode_route(get: Callable[[str], Any], kind: str) -> RouteEvent | None:
    family = get("family")
    dst_len = get("dst_len")
    if family not in _ANY_ADDRESS or not isinstance(dst_len, int):
        return None
    flags = get("flags")
    if isinstance(flags, int) and flags & _RTM_F_CLONED:
        return None
    table = get("table")
    oif = get("oif")
    gateway = get("gateway")
    protocol = get("proto")
    return RouteEvent(
        family=family,
        table=table if isinstance(table, int) else 0,
        dst=f"{get('dst') or _ANY_ADDRESS[family]}/{dst_len}",
        oif=oif if isinstance(oif, int) else None,
        gateway=gateway if isinstance(gateway, str) else None,
        added=kind == "RTM_NEWROUTE",
        protocol=protocol if isinstance(protocol, int) else None,
    )


def _decode(msg: object, watch: Watch = WATCH_DEFAULT) -> LinkEvent | AddressEvent | RouteEvent | None:
    """One parsed rtnetlink message -> an event, or None for messages ``watch`` does not ask for."""
    get = getattr(msg, "get", None)
    if get is None:
        return None
    kind = get("event")
    if kind in ("RTM_NEWLINK", "RTM_DELLINK"):
        # Only AF_UNSPEC messages describe the link itself.  The bridge layer sends
        # its own (AF_BRIDGE) NEWLINK/DELLINK about ports: a DELLINK there means
        # "left the bridge", not "deleted".
        if get("family") != socket.AF_UNSPEC:
            return None
        ifname = get("ifname")
        index = get("index")
        flags = get("flags")
        if not isinstance(ifname, str) or not isinstance(index, int) or not isinstance(flags, int):
            return None
        removed = kind == "RTM_DELLINK"
        return LinkEvent(ifname=ifname, index=index, up=(not removed) and link_is_up(flags), removed=removed)
    if kind in ("RTM_NEWROUTE", "RTM_DELROUTE"):
        wanted = _ROUTE_WATCH.get(get("family"))
        if wanted is None or wanted not in watch:
            return None
        return _decode_route(get, kind)
    if kind in ("RTM_NEWADDR", "RTM_DELADDR"):
        family = get("family")
        wanted = _ADDRESS_WATCH.get(family)
        if wanted is None or wanted not in watch:
            return None
        # IFA_LOCAL is the local address; IFA_ADDRESS is the peer on point-to-point
        # links and equal to IFA_LOCAL elsewhere.
        address = get("local") or get("address")
        index = get("index")
        prefixlen = get("prefixlen")
        label = get("label")
        if not isinstance(address, str) or not isinstance(index, int) or not isinstance(prefixlen, int):
            return None
        # IPv4 labels are the interface name, or "name:alias"; ':' is invalid in
        # interface names, and the kernel renames labels with their interface.
        ifname = label.partition(":")[0] if isinstance(label, str) else ""
        return AddressEvent(
            ifname=ifname, index=index, address=address, prefixlen=prefixlen, added=kind == "RTM_NEWADDR",
            family=family,
        )
    return None


# -- the monitor -----------------------------------------------------------------


class LinkMonitor:
    """Receiving end of :func:`open_link_monitor`: ``async for event in monitor``.

    Events are :class:`LinkEvent`, :class:`AddressEvent`, :class:`RouteEvent` (when
    watched) or :class:`Resync`, in kernel order.  Only one task should consume.
    """

    def __init__(self, receive_channel: trio.MemoryReceiveChannel[MonitorEvent], watch: Watch = WATCH_DEFAULT) -> None:
        self._receive = receive_channel
        self._watch = watch
        self._link_events = 0
        self._address_events = 0
        self._route_events = 0
        self._overruns = 0
        self._ignored = 0

    async def receive(self) -> MonitorEvent:
        """The next event; raises ``trio.EndOfChannel`` once the monitor is closed."""
        return await self._receive.receive()

    def __aiter__(self) -> AsyncIterator[MonitorEvent]:
        return self._receive.__aiter__()

    def statistics(self) -> LinkMonitorStatistics:
        return LinkMonitorStatistics(
            link_events=self._link_events,
            address_events=self._address_events,
            overruns=self._overruns,
            ignored_messages=self._ignored,
            route_events=self._route_events,
        )

    async def _serve(self, sock: trio.socket.SocketType, send: trio.MemorySendChannel[MonitorEvent]) -> None:
        marshal = MarshalRtnl()
        last_state: dict[int, tuple[str, bool]] = {}
        async with send:
            while True:
                try:
                    data, address = await sock.recvfrom(_RECV_BUFSIZE)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # The kernel dropped messages for us: our view is stale.
                    self._overruns += 1
                    last_state.clear()
                    await send.send(Resync(overruns=self._overruns))
                    continue
                if address[0] != _KERNEL_PORT_ID:
                    self._ignored += 1
                    continue
                for msg in marshal.parse(data):
                    event = _decode(msg, self._watch)
                    if event is None:
                        self._ignored += 1
                        continue
                    if isinstance(event, LinkEvent):
                        if event.removed:
                            last_state.pop(event.index, None)
                        else:
                            state = (event.ifname, event.up)
                            if last_state.get(event.index) == state:
                                continue
                            last_state[event.index] = state
                        self._link_events += 1
                    elif isinstance(event, RouteEvent):
                        self._route_events += 1
                    else:
                        self._address_events += 1
                    await send.send(event)


def _create_netlink_socket(netns: str | None, rcvbuf_bytes: int) -> socket.socket:
    """Blocking: a NETLINK_ROUTE socket, optionally inside namespace ``netns``."""
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    else:
        # flags=0: an unknown name raises FileNotFoundError; pyroute2's default
        # (O_CREAT) would silently create the namespace.
        sock = pyroute2_netns.create_socket(
            netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE, flags=0
        )
    try:
        try:
            # SO_RCVBUFFORCE (CAP_NET_ADMIN) is not capped by net.core.rmem_max,
            # which is only 212992 bytes on a stock kernel.
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf_bytes)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    except OSError:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def open_link_monitor(
    *,
    netns: str | None = None,
    channel_size: int = DEFAULT_CHANNEL_SIZE,
    rcvbuf_bytes: int = DEFAULT_RCVBUF_BYTES,
    watch: Watch = WATCH_DEFAULT,
) -> AsyncIterator[LinkMonitor]:
    """Listen to the changes ``watch`` names (links and IPv4 addresses by default) until the block exits.

    The socket is bound (subscribed) before the monitor is yielded, so every
    change made after ``__aenter__`` returns is reported.  For the state
    *before* that, call :func:`read_link_states` after entering.

    Raises ``OSError`` if the socket cannot be created or bound (for example
    ``FileNotFoundError`` for an unknown ``netns``).
    """
    if channel_size < 1:
        raise ValueError(f"channel_size must be >= 1, got {channel_size}")
    if Watch.LINKS not in watch:
        # Removals arrive as link events, and Resync clears their memory: every watch includes them.
        raise ValueError(f"watch must include Watch.LINKS, got {watch!r}")
    raw = await trio.to_thread.run_sync(_create_netlink_socket, netns, rcvbuf_bytes)
    sock = trio.socket.from_stdlib_socket(raw)
    with sock:
        await sock.bind((0, _groups(watch)))
        send, receive = trio.open_memory_channel[MonitorEvent](channel_size)
        monitor = LinkMonitor(receive, watch)
        async with lone_exception_unwrapped(), trio.open_nursery() as nursery:
            nursery.start_soon(monitor._serve, sock, send)
            try:
                yield monitor
            finally:
                # The reader closes its send end as it stops, so a later
                # receive() raises EndOfChannel instead of hanging.
                nursery.cancel_scope.cancel()


# -- snapshot via IPRoute (in a worker thread) ----------------------------------


def open_iproute(netns: str | None) -> IPRoute:
    """Blocking: a request/response ``IPRoute`` for worker threads (the only way we build one).

    ``groups=0``: no multicast subscription (pyroute2 subscribes by default, so
    unread events would pile up in its buffer).  ``flags=0``: an unknown
    ``netns`` raises ``FileNotFoundError`` instead of being created.
    """
    return IPRoute(netns=netns, flags=0, groups=0)


def _read_link_states_sync(netns: str | None) -> dict[str, LinkEvent]:
    # Created and used in the same worker thread: pyroute2's sync API runs an
    # asyncio loop inside and must not run on the Trio thread (platform-notes 1, 6).
    with open_iproute(netns) as ipr:
        states: dict[str, LinkEvent] = {}
        for link in ipr.get_links():
            ifname = link.get("ifname")
            if not isinstance(ifname, str):
                continue
            states[ifname] = LinkEvent(ifname=ifname, index=link["index"], up=link_is_up(link["flags"]))
        return states


async def read_link_states(*, netns: str | None = None) -> dict[str, LinkEvent]:
    """Every link's current state, by name (for startup and after a :class:`Resync`).

    Runs pyroute2's blocking ``IPRoute`` in a worker thread.  Raises
    ``pyroute2.NetlinkError`` or ``OSError`` if the kernel refuses the dump.
    """
    return await trio.to_thread.run_sync(_read_link_states_sync, netns)
