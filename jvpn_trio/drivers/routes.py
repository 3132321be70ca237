"""Policy routing that keeps the tunnel's own UDP out of the tunnel (docs/platform-notes.md 5, recipe B).

Theory of operation
-------------------
Every path's UDP socket carries ``SO_MARK = path.fwmark`` and
``SO_BINDTODEVICE = path.ifname`` (udp driver).  The kernel then consults the
rules below, lowest priority first::

    20100: from all fwmark <path.fwmark> lookup <path.table>    one per path   (PATH_RULE_PRIORITY)
    20200: from all lookup main suppress_prefixlength 0                          (SUPPRESS_RULE_PRIORITY)
    20300: not from all fwmark <bypass_mark>/<bypass_mask> lookup <tunnel.table> (TUNNEL_RULE_PRIORITY)
    32766: from all lookup main                                                   (the kernel's)

* A path table holds the VPN gateway's /32 (or a default route) via that
  interface's next hop, plus ``unreachable default metric 4294967295``.
  Marked packets find the route at 20100.  When the link goes down the kernel
  deletes the route but not the unreachable one, so the path fails closed
  (``EHOSTUNREACH``) instead of leaking out of another interface through
  main's default route: a probe for Wi-Fi must never succeed over LTE.
* Full tunnel (``0.0.0.0/0`` listed), as wg-quick does it: the tunnel table
  holds ``default dev <tun>``.  Rule 20200 keeps main's specific routes (the
  LAN, the paths' subnets) but ignores main's default route; rule 20300 sends
  every *unmarked* packet into the TUN.  Path marks must match
  ``bypass_mark/bypass_mask``: if a path table is empty (its link flapped and
  the kernel deleted the route), a marked packet must still not fall into the
  TUN, or the tunnel would route itself through itself.
* Split tunnel: each listed prefix becomes ``<prefix> dev <tun>`` in main.

IPv6 follows the same scheme in its own family (``ip -6 rule`` and ``ip -6
route`` are separate tables of rules and routes in the kernel):

* ``::/0`` listed: ``default dev <tun>`` in the tunnel table for AF_INET6 and
  rules 20200/20300 for AF_INET6, exactly as for IPv4; other IPv6 prefixes go
  into main as ``<prefix> dev <tun>``.
* A full tunnel of one family only (``0.0.0.0/0`` without ``::/0``, or the
  reverse): the other family is *blocked, never leaked*.  The tunnel table
  gets ``unreachable default`` for that family, behind the same two rules, so
  an unmarked packet of that family finds main's specific routes (the LAN,
  link-local, the paths' subnets) or nothing: ``ip -6 route get 2001:db8::1``
  answers "unreachable" and a send fails with ENETUNREACH/EHOSTUNREACH
  instead of leaving by a physical interface's default route.
* A split tunnel (no default route listed) leaves the other family alone.

A path's table and rule are in the family of the gateway's address
(``gateway_address``; a path to an IPv6 gateway routes its ``/128``, with
an IPv6 fail-closed unreachable default), since its socket is of that family.

The priorities sit between the kernel's ``local`` (0) and ``main`` (32766)
rules and clear of wg-quick's 32764/32765, so both can coexist.  Every route
we add carries ``proto 74`` (:data:`RTPROT_JVPN`) and every rule
``protocol 74``, so ``ip route show proto 74`` lists them and deletions only
ever match entries we own.

Ownership and idempotence: path and tunnel *tables* are ours, so routes there
are installed with ``replace`` and rules that already exist (``EEXIST``, the
identical rule at our priority) are taken as ours, e.g. left over from a
crash.  A main-table route for a listed prefix is ours only if it carries our
protocol and points at the TUN; any other route there is a conflict and
raises :class:`RouteError`.  Removal deletes exactly the recorded entries and
treats "already gone" (``ESRCH``, ``ENOENT``) as success: a link going down
deletes the kernel routes through it (docs/platform-notes.md 1).

All pyroute2 calls run in ``trio.to_thread.run_sync``, each call creating and
closing its own ``IPRoute`` in that worker thread (docs/platform-notes.md 1, 6).

Lifecycle: :func:`open_routing` installs the paths' routes, then the
tunnel's (at once, or later through :meth:`Routing.open_tunnel_routes` once
the TUN exists), re-installs a path's route when its link comes back
(:meth:`Routing.reinstall_path`) and removes everything on exit.
"""

from __future__ import annotations

import errno
import inspect
import ipaddress
import socket
from collections import Counter
from collections.abc import Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Any, AsyncIterator, Callable, Iterable, Sequence, TypeVar

import attrs
import trio

from jvpn_trio.drivers.log import LineLimiter, stderr_line
from jvpn_trio.drivers.netlink import NetlinkError, open_iproute

__all__ = [
    "CLEANUP_TIMEOUT_S",
    "DEFAULT_BYPASS_MARK",
    "DEFAULT_BYPASS_MASK",
    "InstalledRoutes",
    "LineLimiter",
    "PATH_RULE_PRIORITY",
    "PathRoute",
    "ROUTE_LOG_INTERVAL_S",
    "RTPROT_JVPN",
    "RouteEntry",
    "RouteError",
    "Routing",
    "RoutingStatistics",
    "RuleEntry",
    "SUPPRESS_RULE_PRIORITY",
    "TUNNEL_RULE_PRIORITY",
    "TunAddress",
    "TunnelRoutes",
    "check_routing_plan",
    "install_path_route",
    "install_tunnel_routes",
    "open_routing",
    "remove_path_route",
    "remove_tunnel_routes",
    "set_tun_address",
]

PATH_RULE_PRIORITY = 20100
SUPPRESS_RULE_PRIORITY = 20200
TUNNEL_RULE_PRIORITY = 20300
#: Route/rule protocol id of everything we install (kernel values <= 4 are its own).
RTPROT_JVPN = 74
#: Path marks are DEFAULT_BYPASS_MARK | n: any mark with these bits bypasses the TUN.
DEFAULT_BYPASS_MARK = 0x100
DEFAULT_BYPASS_MASK = 0xF00
#: How long one removal (all routes on exit, or the tunnel's) may take, shielded from cancellation.
CLEANUP_TIMEOUT_S = 5.0

MAIN_TABLE = 254
_RESERVED_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local
_RT_SCOPE_LINK = 253
_RTN_UNICAST = 1
_RTN_UNREACHABLE = 7
#: Metric of the fail-closed route in each path table: below every real route.
_LAST_RESORT_METRIC = 0xFFFFFFFF
_FIB_RULE_INVERT = 0x2
_ALL_BITS = 0xFFFFFFFF
#: "Already gone" on delete: no such route (ESRCH), no such rule (ENOENT).
_GONE_ERRNOS = frozenset({errno.ESRCH, errno.ENOENT})


class RouteError(Exception):
    """The kernel refused a routing change, or the routing state conflicts with ours.

    ``errno`` is the kernel's error number, or None for a conflict we detected.
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


# -- values --------------------------------------------------------------------------


def _check_table(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= _ALL_BITS or value in _RESERVED_TABLES:
        raise ValueError(f"{attribute.name}: {value} is not a usable routing table id")


def _check_u32(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= _ALL_BITS:
        raise ValueError(f"{attribute.name}: {value:#x} does not fit in 32 bits")


def _check_nonzero_mark(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= _ALL_BITS:
        raise ValueError(f"{attribute.name}: {value:#x} is not a usable fwmark")


def _check_ip(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        ipaddress.ip_address(value)  # raises ValueError


def _to_prefixes(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError("prefixes must be a sequence of strings, not one string")
    return tuple(str(ipaddress.ip_network(v, strict=True)) for v in values)


#: The default route of each family, as :class:`TunnelRoutes` spells it.
DEFAULT_PREFIX: Mapping[int, str] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
FAMILIES: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)


def family_of(address: str) -> int:
    """AF_INET or AF_INET6 for an address or prefix in text; ValueError for anything else."""
    return int(socket.AF_INET6 if ipaddress.ip_network(address, strict=False).version == 6 else socket.AF_INET)


@attrs.frozen
class PathRoute:
    """One path's bypass: packets marked ``fwmark`` use ``table``, which routes via ``ifname``.

    ``gateway`` is the next hop on ``ifname``.  With ``on_link`` the caller
    read it from the kernel itself (the path manager, at each change) and
    None means on-link: nothing is looked up.  Without, None means "find it"
    (main's default route via ``ifname``, else on-link) and
    :func:`install_path_route` returns a copy with the next hop it found, to
    be reused on re-install: a link flap also deletes main's route it was
    learnt from.
    """

    ifname: str
    table: int = attrs.field(validator=_check_table)
    fwmark: int = attrs.field(validator=_check_nonzero_mark)
    gateway: str | None = attrs.field(default=None, validator=_check_ip)
    on_link: bool = attrs.field(default=False, kw_only=True)

    @classmethod
    def given(cls, ifname: str, *, table: int, fwmark: int, next_hop: str | None) -> PathRoute:
        """A path route with the next hop the caller read from the kernel (None: on-link), never looked up."""
        return cls(ifname, table, fwmark, next_hop, on_link=next_hop is None)


@attrs.frozen
class TunnelRoutes:
    """What goes into the TUN: ``prefixes`` of either family (``0.0.0.0/0`` or ``::/0``: a full
    tunnel of that family, policy routed via ``table``; the other family is then blocked)."""

    tun_name: str
    prefixes: tuple[str, ...] = attrs.field(converter=_to_prefixes)
    table: int = attrs.field(validator=_check_table)
    bypass_mark: int = attrs.field(default=DEFAULT_BYPASS_MARK, validator=_check_u32)
    bypass_mask: int = attrs.field(default=DEFAULT_BYPASS_MASK, validator=_check_nonzero_mark)

    @property
    def full_tunnel(self) -> bool:
        """Some family's default route goes into the TUN (every unmarked packet is policy routed)."""
        return any(DEFAULT_PREFIX[f] in self.prefixes for f in FAMILIES)

    def default_of(self, family: int) -> str | None:
        """What the tunnel table holds as ``family``'s default: ``"tun"``, ``"unreachable"`` or None.

        ``"unreachable"`` is the blocked family of a one-family full tunnel
        (never leaked, see the module docstring); None: that family is not
        policy routed at all (a split tunnel).
        """
        if DEFAULT_PREFIX[family] in self.prefixes:
            return "tun"
        return "unreachable" if self.full_tunnel else None

    def lookup_mark(self, fwmark_base: int) -> int | None:
        """A mark rule 20300 lets by and no path's rule takes: ``fwmark_base`` itself (path marks start
        at ``fwmark_base + 1``), if it has the bypass bits; None otherwise.

        A route lookup with it sees the machine's own routes as a path socket would before its table:
        never the tunnel's, whose unreachable default blocks the gateway's family when the tunnel
        carries only the other one (the path manager's reads, ``ifaces.read_machine_snapshot``).
        """
        return fwmark_base if fwmark_base & self.bypass_mask == self.bypass_mark else None

    def main_prefixes(self) -> tuple[str, ...]:
        """The listed prefixes that go into main as ``<prefix> dev <tun>`` (all but the default routes)."""
        return tuple(p for p in self.prefixes if p not in DEFAULT_PREFIX.values())


@attrs.frozen(kw_only=True)
class RouteEntry:
    """One route we installed (enough to delete exactly it); its family is ``dst``'s."""

    table: int
    dst: str  # "a.b.c.d/n" or "x:y::/n"
    oif: int  # 0 for an unreachable route
    gateway: str | None = None
    type: int = _RTN_UNICAST
    metric: int = 0

    @property
    def family(self) -> int:
        return family_of(self.dst)


@attrs.frozen(kw_only=True)
class RuleEntry:
    """One rule we installed (enough to delete exactly it)."""

    priority: int
    table: int
    fwmark: int | None = None
    fwmask: int | None = None
    invert: bool = False
    suppress_prefixlen: int | None = None
    family: int = socket.AF_INET


@attrs.frozen(kw_only=True)
class InstalledRoutes:
    """What :func:`install_tunnel_routes` added, for :func:`remove_tunnel_routes`."""

    routes: tuple[RouteEntry, ...] = ()
    rules: tuple[RuleEntry, ...] = ()


def check_routing_plan(tunnel: TunnelRoutes | None, paths: Sequence[PathRoute]) -> None:
    """Raise ``ValueError`` if the paths and the tunnel could route into each other.

    Path tables, marks and interfaces must be distinct, no path may use the
    tunnel's table or interface, and in full-tunnel mode every path mark must
    match ``bypass_mark/bypass_mask`` (see the module docstring).
    """
    for attr in ("table", "fwmark", "ifname"):
        values = [getattr(p, attr) for p in paths]
        if len(set(values)) != len(values):
            raise ValueError(f"paths share a {attr}: {values}")
    if tunnel is None:
        return
    for p in paths:
        if p.table == tunnel.table:
            raise ValueError(f"path {p.ifname} uses the tunnel's table {tunnel.table}")
        if p.ifname == tunnel.tun_name:
            raise ValueError(f"path {p.ifname} is the tunnel's own interface")
        if tunnel.full_tunnel and p.fwmark & tunnel.bypass_mask != tunnel.bypass_mark & tunnel.bypass_mask:
            raise ValueError(
                f"path {p.ifname}: fwmark {p.fwmark:#x} does not match the bypass "
                f"{tunnel.bypass_mark:#x}/{tunnel.bypass_mask:#x}, so its packets could enter the tunnel"
            )


# -- blocking helpers (worker threads only) ----------------------------------------

_T = TypeVar("_T")


#: trio 0.23 renamed to_thread.run_sync's ``cancellable`` to ``abandon_on_cancel`` and later
#: releases removed the old name; pyproject allows trio >= 0.22.
_ABANDON_KW = (
    "abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters else "cancellable"
)


async def _run(netns: str | None, fn: Callable[[Any], _T], *, abandon_on_cancel: bool = False) -> _T:
    """Run ``fn(ipr)`` in a worker thread with a fresh ``IPRoute``; NetlinkError becomes RouteError.

    With ``abandon_on_cancel`` a cancelled caller returns at once and the thread
    finishes (or not) on its own; otherwise cancellation waits for the thread.
    """

    def work() -> _T:
        try:
            with open_iproute(netns) as ipr:
                return fn(ipr)
        except NetlinkError as exc:
            raise RouteError(f"netlink: {exc}", exc.code) from exc

    options: dict[str, Any] = {_ABANDON_KW: abandon_on_cancel}
    return await trio.to_thread.run_sync(work, **options)


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise RouteError(f"no interface named {ifname!r}", errno.ENODEV)
    return int(found[0])


def _split(dst: str) -> tuple[str, int]:
    net = ipaddress.ip_network(dst)
    return str(net.network_address), net.prefixlen


def _route_args(entry: RouteEntry) -> dict[str, Any]:
    address, length = _split(entry.dst)
    args: dict[str, Any] = {
        "dst": address,
        "dst_len": length,
        "table": entry.table,
        "proto": RTPROT_JVPN,
        "family": entry.family,
        "type": entry.type,
        "priority": entry.metric,
    }
    if entry.type != _RTN_UNICAST:
        return args
    args["oif"] = entry.oif
    if entry.gateway is not None:
        args["gateway"] = entry.gateway
    else:
        args["scope"] = _RT_SCOPE_LINK
    return args


def _rule_args(entry: RuleEntry) -> dict[str, Any]:
    # Spelling matters: pyroute2 silently ignores unknown keywords, e.g. the
    # iproute2 spelling "suppress_prefixlength" adds a rule WITHOUT suppression.
    args: dict[str, Any] = {
        "priority": entry.priority,
        "table": entry.table,
        "protocol": RTPROT_JVPN,
        "family": entry.family,
    }
    if entry.fwmark is not None:
        args["fwmark"] = entry.fwmark
        args["fwmask"] = _ALL_BITS if entry.fwmask is None else entry.fwmask
    if entry.invert:
        args["flags"] = _FIB_RULE_INVERT
    if entry.suppress_prefixlen is not None:
        args["suppress_prefixlen"] = entry.suppress_prefixlen
    return args


def _describe(entry: RouteEntry | RuleEntry) -> str:
    if isinstance(entry, RouteEntry):
        if entry.type == _RTN_UNREACHABLE:
            return f"route unreachable {entry.dst} metric {entry.metric} table {entry.table}"
        via = f"via {entry.gateway} " if entry.gateway else ""
        return f"route {entry.dst} {via}oif {entry.oif} table {entry.table}"
    ip6 = "-6 " if entry.family == socket.AF_INET6 else ""
    return f"{ip6}rule priority {entry.priority} table {entry.table}"


def _add_rule(ipr: Any, entry: RuleEntry) -> None:
    """Add; the identical rule at our priority already existing counts as ours."""
    try:
        ipr.rule("add", **_rule_args(entry))
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise RouteError(f"adding {_describe(entry)}: {exc}", exc.code) from exc


def _replace_route(ipr: Any, entry: RouteEntry) -> None:
    try:
        ipr.route("replace", **_route_args(entry))
    except NetlinkError as exc:
        raise RouteError(f"adding {_describe(entry)}: {exc}", exc.code) from exc


def _add_main_route(ipr: Any, entry: RouteEntry) -> None:
    """Add a route in a table we share; an existing route is ours only if proto and oif match."""
    try:
        ipr.route("add", **_route_args(entry))
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise RouteError(f"adding {_describe(entry)}: {exc}", exc.code) from exc
        address, length = _split(entry.dst)
        existing = [
            r
            for r in ipr.get_routes(family=entry.family, table=entry.table)
            if r.get("dst", _ANY[entry.family]) == address and r["dst_len"] == length
        ]
        if not any(r["proto"] == RTPROT_JVPN and r.get("oif") == entry.oif for r in existing):
            raise RouteError(
                f"adding {_describe(entry)}: a route to {entry.dst} not installed by us is in the way"
            ) from exc


def _delete_all(ipr: Any, routes: Iterable[RouteEntry], rules: Iterable[RuleEntry]) -> list[RouteError]:
    """Delete each entry, rules first; already-gone counts as done.  Returns the other failures."""
    failures = []
    for rule in rules:
        try:
            ipr.rule("del", **_rule_args(rule))
        except NetlinkError as exc:
            if exc.code not in _GONE_ERRNOS:
                failures.append(RouteError(f"removing {_describe(rule)}: {exc}", exc.code))
    for route in routes:
        try:
            ipr.route("del", **_route_args(route))
        except NetlinkError as exc:
            if exc.code not in _GONE_ERRNOS:
                failures.append(RouteError(f"removing {_describe(route)}: {exc}", exc.code))
    return failures


def _raise_first(failures: list[RouteError]) -> None:
    if failures:
        first = failures[0]
        if len(failures) > 1:
            first.add_note(f"and {len(failures) - 1} more: " + "; ".join(str(f) for f in failures[1:]))
        raise first


# -- path routes ---------------------------------------------------------------------


_ANY: Mapping[int, str] = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def _gateway_family(gateway_address: str | None) -> int:
    """The family of path routes and rules: the gateway's (None: IPv4)."""
    return socket.AF_INET if gateway_address is None else family_of(gateway_address)


def _path_entries(
    pr: PathRoute, oif: int, gateway_address: str | None
) -> tuple[RouteEntry, RouteEntry, RuleEntry]:
    family = _gateway_family(gateway_address)
    if gateway_address is None:
        dst = DEFAULT_PREFIX[family]
    else:
        gw = ipaddress.ip_address(gateway_address)
        dst = f"{gw}/{gw.max_prefixlen}"
    route = RouteEntry(table=pr.table, dst=dst, oif=oif, gateway=pr.gateway)
    last_resort = RouteEntry(
        table=pr.table, dst=DEFAULT_PREFIX[family], oif=0, type=_RTN_UNREACHABLE, metric=_LAST_RESORT_METRIC
    )
    rule = RuleEntry(priority=PATH_RULE_PRIORITY, table=pr.table, fwmark=pr.fwmark, fwmask=_ALL_BITS, family=family)
    return route, last_resort, rule


def _find_next_hop(ipr: Any, oif: int, family: int = socket.AF_INET) -> str | None:
    """Main's lowest-metric default route of ``family`` via ``oif``: its gateway, or None (on-link).

    Multipath default routes (no single RTA_OIF) are not looked into.
    """
    best: tuple[int, str] | None = None
    for r in ipr.get_routes(family=family, table=MAIN_TABLE):
        gateway = r.get("gateway")
        if r["dst_len"] == 0 and r.get("oif") == oif and isinstance(gateway, str):
            metric = r.get("priority") or 0
            if best is None or metric < best[0]:
                best = (metric, gateway)
    return None if best is None else best[1]


def _install_path_sync(ipr: Any, pr: PathRoute, gateway_address: str | None) -> PathRoute:
    oif = _index(ipr, pr.ifname)
    if pr.gateway is None and not pr.on_link:
        pr = attrs.evolve(pr, gateway=_find_next_hop(ipr, oif, _gateway_family(gateway_address)))
    route, last_resort, rule = _path_entries(pr, oif, gateway_address)
    _replace_route(ipr, last_resort)
    _replace_route(ipr, route)
    _add_rule(ipr, rule)
    return pr


async def install_path_route(
    pr: PathRoute, *, gateway_address: str | None, netns: str | None = None
) -> PathRoute:
    """Route ``gateway_address``/32 (None: a default route) via ``pr.ifname`` in ``pr.table``,
    behind a fail-closed unreachable default, and send packets marked ``pr.fwmark`` to that table.

    Idempotent: call it again after a link comes back up, since the kernel
    deleted the route when the link went down.  Returns ``pr`` with the next
    hop it used (None = on-link); pass that back in on re-install.  Raises
    :class:`RouteError` (``ENODEV``: no such interface; ``ENETDOWN`` /
    ``ENETUNREACH``: the link is down or the next hop is not on it).
    """
    if gateway_address is not None:
        ipaddress.ip_address(gateway_address)  # ValueError for a non-address
    return await _run(netns, lambda ipr: _install_path_sync(ipr, pr, gateway_address))


def _remove_path_sync(ipr: Any, pr: PathRoute) -> None:
    # The path table is ours: delete every route of our protocol in it, whatever
    # address it was installed for.
    # Both families: the table holds the gateway's family only, but which one is not remembered here.
    routes = []
    for family in FAMILIES:
        for r in ipr.get_routes(family=family, table=pr.table):
            if r["proto"] == RTPROT_JVPN and r.get("table") == pr.table:
                routes.append(
                    RouteEntry(
                        table=pr.table,
                        dst=f"{r.get('dst', _ANY[family])}/{r['dst_len']}",
                        oif=r.get("oif") or 0,
                        gateway=r.get("gateway"),
                        type=r["type"],
                        metric=r.get("priority") or 0,
                    )
                )
    rules = [
        RuleEntry(priority=PATH_RULE_PRIORITY, table=pr.table, fwmark=pr.fwmark, fwmask=_ALL_BITS, family=family)
        for family in FAMILIES
    ]
    _raise_first(_delete_all(ipr, routes, rules))


async def remove_path_route(pr: PathRoute, *, netns: str | None = None) -> None:
    """Undo :func:`install_path_route`; a no-op for what is already gone.  Raises :class:`RouteError` otherwise."""
    await _run(netns, lambda ipr: _remove_path_sync(ipr, pr))


# -- tunnel routes -------------------------------------------------------------------


def _tunnel_entries(tr: TunnelRoutes, oif: int) -> tuple[list[RouteEntry], list[RouteEntry], list[RuleEntry]]:
    """What :func:`install_tunnel_routes` adds: tunnel-table defaults, main routes, rules (pure)."""
    defaults: list[RouteEntry] = []
    rules: list[RuleEntry] = []
    for family in FAMILIES:
        kind = tr.default_of(family)
        if kind is None:
            continue
        if kind == "tun":
            defaults.append(RouteEntry(table=tr.table, dst=DEFAULT_PREFIX[family], oif=oif))
        else:  # blocked, never leaked
            defaults.append(RouteEntry(table=tr.table, dst=DEFAULT_PREFIX[family], oif=0, type=_RTN_UNREACHABLE))
        # Order matters: the catch-all rule goes in last (and comes out first).
        rules += [
            RuleEntry(priority=SUPPRESS_RULE_PRIORITY, table=MAIN_TABLE, suppress_prefixlen=0, family=family),
            RuleEntry(
                priority=TUNNEL_RULE_PRIORITY,
                table=tr.table,
                fwmark=tr.bypass_mark,
                fwmask=tr.bypass_mask,
                invert=True,
                family=family,
            ),
        ]
    mains = [RouteEntry(table=MAIN_TABLE, dst=prefix, oif=oif) for prefix in tr.main_prefixes()]
    return defaults, mains, rules


def _install_tunnel_sync(ipr: Any, tr: TunnelRoutes) -> InstalledRoutes:
    oif = _index(ipr, tr.tun_name)
    defaults, mains, wanted_rules = _tunnel_entries(tr, oif)
    routes: list[RouteEntry] = []
    rules: list[RuleEntry] = []
    try:
        for entry in defaults:
            _replace_route(ipr, entry)
            routes.append(entry)
        for entry in mains:
            _add_main_route(ipr, entry)
            routes.append(entry)
        for rule in wanted_rules:
            _add_rule(ipr, rule)
            rules.append(rule)
    except RouteError as exc:
        for failure in _delete_all(ipr, reversed(routes), reversed(rules)):
            exc.add_note(f"rollback: {failure}")
        raise
    return InstalledRoutes(routes=tuple(routes), rules=tuple(rules))


async def install_tunnel_routes(tr: TunnelRoutes, *, netns: str | None = None) -> InstalledRoutes:
    """Route ``tr.prefixes`` into the TUN (full tunnel: policy routing, see the module docstring).

    All or nothing: on failure whatever this call added is removed again and
    :class:`RouteError` is raised.  Returns what to pass to :func:`remove_tunnel_routes`.
    """
    return await _run(netns, lambda ipr: _install_tunnel_sync(ipr, tr))


def _remove_tunnel_sync(ipr: Any, installed: InstalledRoutes) -> None:
    _raise_first(_delete_all(ipr, reversed(installed.routes), reversed(installed.rules)))


async def remove_tunnel_routes(installed: InstalledRoutes, *, netns: str | None = None) -> None:
    """Remove exactly ``installed`` (rules first).  Idempotent: entries already gone are fine.

    Raises :class:`RouteError` for any other refusal, after trying every entry.
    """
    await _run(netns, lambda ipr: _remove_tunnel_sync(ipr, installed))


# -- TUN address ---------------------------------------------------------------------


def _set_tun_address_sync(ipr: Any, ifname: str, address: str, prefixlen: int, mtu: int) -> None:
    index = _index(ipr, ifname)
    family = family_of(address)
    try:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, family=family)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
    ipr.link("set", index=index, mtu=mtu, state="up")


async def set_tun_address(
    ifname: str, address: str, prefixlen: int, mtu: int, *, netns: str | None = None
) -> None:
    """Give ``ifname`` ``address/prefixlen`` (IPv4 or IPv6), set its MTU and bring it up (idempotent).

    An IPv6 address needs IPv6 on the device (``tun.open_tun``'s default).
    Raises :class:`RouteError` (``ENODEV`` for a missing interface), ValueError for a bad address.
    """
    ipaddress.ip_interface(f"{address}/{prefixlen}")
    await _run(netns, lambda ipr: _set_tun_address_sync(ipr, ifname, address, prefixlen, mtu))


def _delete_tun_address_sync(ipr: Any, ifname: str, address: str, prefixlen: int) -> None:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        return
    try:
        ipr.addr("del", index=found[0], address=address, prefixlen=prefixlen, family=family_of(address))
    except NetlinkError as exc:
        if exc.code not in _GONE_ERRNOS | {errno.EADDRNOTAVAIL}:
            raise


TunInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class TunAddress:
    """Gives a TUN each session's addresses, replacing the ones it had (the agent's ``set_address``).

    A session has an IPv4 address and, when the gateway's tunnel carries IPv6,
    an IPv6 one.  A refusal by the kernel is logged, not raised: the session
    still runs (packets to the old address simply go unanswered), and the
    agent lives on.
    """

    def __init__(
        self, tun_name: str, *, mtu: int, netns: str | None = None, log: Callable[[str], None] | None = None
    ) -> None:
        self.tun_name = tun_name
        self._mtu = mtu
        self._netns = netns
        self._log = log if log is not None else stderr_line
        self.current: ipaddress.IPv4Interface | None = None
        self.current6: ipaddress.IPv6Interface | None = None
        self.failures = 0
        #: One change of the TUN at a time: setting an address also sets the MTU, and a new
        #: session's address must not put back an MTU that set_mtu has just replaced.
        self._lock = trio.Lock()

    async def __call__(
        self, address: ipaddress.IPv4Interface, address6: ipaddress.IPv6Interface | None = None
    ) -> None:
        """Add ``address`` and ``address6`` (and bring the TUN up), then remove the previous ones that differ."""
        async with self._lock:
            await self._set_addresses(address, address6)

    async def _set_addresses(self, address: ipaddress.IPv4Interface, address6: ipaddress.IPv6Interface | None) -> None:
        try:
            await self._replace(address, self.current)
            self.current = address
        except (RouteError, OSError) as exc:
            self._failed(address, exc)
        if address6 is None and self.current6 is None:
            return
        try:
            await self._replace(address6, self.current6)
            self.current6 = address6
        except (RouteError, OSError) as exc:
            self._failed(address6, exc)

    async def _replace(self, new: TunInterface | None, old: TunInterface | None) -> None:
        if new is not None:
            await set_tun_address(self.tun_name, str(new.ip), new.network.prefixlen, self._mtu, netns=self._netns)
        if old is not None and old != new:
            await _run(
                self._netns,
                lambda ipr: _delete_tun_address_sync(ipr, self.tun_name, str(old.ip), old.network.prefixlen),
            )

    def _failed(self, address: TunInterface | None, exc: BaseException) -> None:
        self.failures += 1
        what = f"the address {address}" if address is not None else "no IPv6 address"
        self._log(f"cannot give {self.tun_name} {what}: {exc}")

    @property
    def mtu(self) -> int:
        return self._mtu

    async def set_mtu(self, mtu: int) -> bool:
        """Set the TUN's MTU now and at every later session; False (logged, counted) if the kernel refused."""
        self._mtu = mtu
        try:
            async with self._lock:
                await _run(self._netns, lambda ipr: ipr.link("set", index=_index(ipr, self.tun_name), mtu=mtu))
        except (RouteError, NetlinkError, OSError) as exc:
            self.failures += 1
            self._log(f"cannot set the MTU of {self.tun_name} to {mtu}: {exc}")
            return False
        return True


# -- the resource --------------------------------------------------------------------

#: Failure lines of one kind (install, remove) for one path or the tunnel are printed at most
#: this often; every failure is still counted in :class:`RoutingStatistics`.
ROUTE_LOG_INTERVAL_S = 10.0
#: The subject of tunnel-route failures in log lines and rate limits.
_TUNNEL = "tunnel"


def _one_line(exc: BaseException) -> str:
    return "; ".join([str(exc), *getattr(exc, "__notes__", ())])


@attrs.frozen(kw_only=True)
class RoutingStatistics:
    """The failures a :class:`Routing` met, whether it raised them or reported them."""

    install_failed: Mapping[str, int] = attrs.field(factory=dict, hash=False)  # path routes refused, by interface
    remove_failed: int = 0  # removals that failed or ran out of time
    lines_suppressed: int = 0  # failure lines held back by ROUTE_LOG_INTERVAL_S


class Routing:
    """The installed routing of :func:`open_routing`: per-path bypass routes, then the tunnel's.

    Strict (the default), every kernel refusal raises :class:`RouteError`.
    With ``best_effort`` a path route the kernel refuses (its link is down,
    its next hop not there yet) and a failed removal are counted, logged on
    one line (at most once per :data:`ROUTE_LOG_INTERVAL_S` per path and
    kind) and not raised: the path is left to probing, which reports it dead
    until its link comes back.  Tunnel routes always raise: without them
    there is no tunnel.
    """

    def __init__(
        self,
        *,
        gateway_address: str | None,
        netns: str | None = None,
        best_effort: bool = False,
        log: Callable[[str], None] = stderr_line,
    ) -> None:
        self._netns = netns
        self._gateway_address = gateway_address
        self._best_effort = best_effort
        self._log = log
        self._limiter = LineLimiter(ROUTE_LOG_INTERVAL_S)
        self._paths: dict[str, PathRoute] = {}
        self._planned: TunnelRoutes | None = None
        self._tunnel: InstalledRoutes | None = None
        self._install_failed: Counter[str] = Counter()
        self._remove_failed = 0

    @property
    def paths(self) -> dict[str, PathRoute]:
        """The paths by interface name, with the next hops in use."""
        return dict(self._paths)

    @property
    def tunnel(self) -> InstalledRoutes | None:
        return self._tunnel

    def statistics(self) -> RoutingStatistics:
        return RoutingStatistics(
            install_failed=MappingProxyType(dict(self._install_failed)),
            remove_failed=self._remove_failed,
            lines_suppressed=self._limiter.suppressed,
        )

    async def reinstall_path(self, ifname: str) -> PathRoute | None:
        """Re-add a path's route after its link came back up (the kernel deleted it on down).

        Uses the next hop remembered from the first install and returns the
        path as installed.  Raises ``KeyError`` for a path that is not part of
        this routing; a refusal raises :class:`RouteError` as
        :func:`install_path_route` does, or with ``best_effort`` is reported
        and returns None.
        """
        return await self._install_path(self._paths[ifname])

    async def add_path(self, pr: PathRoute) -> PathRoute | None:
        """Install (or re-install, e.g. with a new next hop) a path that appeared while running.

        Recorded first, so that exit removes it even after a partial install.
        A refusal raises :class:`RouteError`, or with ``best_effort`` is
        counted, reported and returns None (the path is left to probing).
        Raises ValueError for a table or mark another path uses.  An interface that comes back
        under another table or mark (its path got a new id) loses its old entries first: kept
        while its link was down, they would otherwise outlive the agent.
        """
        others = [p for name, p in self._paths.items() if name != pr.ifname]
        check_routing_plan(self._planned, [*others, pr])
        before = self._paths.get(pr.ifname)
        if before is not None and (before.table, before.fwmark) != (pr.table, pr.fwmark):
            await self.remove_path(pr.ifname)
        self._paths[pr.ifname] = pr
        return await self._install_path(pr)

    async def remove_path(self, ifname: str) -> bool:
        """Remove a path's route, rule and table entries (its interface went away, or it is unusable).

        Shielded and bounded like every removal; a failure is counted and
        (``best_effort``) logged, or raised.  False if the path was not here.
        """
        pr = self._paths.pop(ifname, None)
        if pr is None:
            return False

        def remove(ipr: Any) -> None:
            _remove_path_sync(ipr, pr)

        await self._clean_up(remove, f"path {ifname}", None)
        return True

    @asynccontextmanager
    async def open_tunnel_routes(self) -> AsyncIterator[InstalledRoutes]:
        """Install the planned tunnel routes (``defer_tunnel``) for the block; remove them on exit.

        The TUN must exist by then.  Raises ``RuntimeError`` without a planned
        tunnel or while its routes are installed, :class:`RouteError` if the
        kernel refuses (nothing is left behind).  Removal is shielded, bounded
        by :data:`CLEANUP_TIMEOUT_S` and fails as :func:`open_routing`'s does.
        """
        planned = self._planned
        if planned is None or self._tunnel is not None:
            raise RuntimeError("no tunnel routes planned, or they are installed already")
        installed = self._tunnel = await install_tunnel_routes(planned, netns=self._netns)

        def remove(ipr: Any) -> None:
            _remove_tunnel_sync(ipr, installed)

        try:
            yield installed
        except BaseException as exc:
            self._tunnel = None
            await self._clean_up(remove, _TUNNEL, exc)
            raise
        self._tunnel = None
        await self._clean_up(remove, _TUNNEL, None)

    def _report(self, subject: str, kind: str, text: str) -> None:
        line = self._limiter.line((subject, kind), text, now=trio.current_time())
        if line is not None:
            self._log(line)

    async def _install_path(self, pr: PathRoute) -> PathRoute | None:
        try:
            installed = await install_path_route(pr, gateway_address=self._gateway_address, netns=self._netns)
        except RouteError as exc:
            self._install_failed[pr.ifname] += 1
            if not self._best_effort:
                raise
            reason = _one_line(exc)
            self._report(pr.ifname, "install", f"path {pr.ifname} not routable yet ({reason}); probing will tell")
            return None
        self._paths[pr.ifname] = installed
        return installed

    async def _install(self, tunnel: TunnelRoutes | None, paths: Sequence[PathRoute], *, defer_tunnel: bool) -> None:
        # Paths first: the bypass must exist before the catch-all rule can capture our UDP.
        for pr in paths:
            self._paths[pr.ifname] = pr  # recorded before the attempt, so removal covers a partial install
            await self._install_path(pr)
        self._planned = tunnel
        if tunnel is not None and not defer_tunnel:
            self._tunnel = await install_tunnel_routes(tunnel, netns=self._netns)

    async def _remove_all(self, error: BaseException | None) -> None:
        tunnel, paths = self._tunnel, list(self._paths.values())
        self._tunnel = None

        def remove(ipr: Any) -> None:
            failures: list[RouteError] = []
            if tunnel is not None:
                try:
                    _remove_tunnel_sync(ipr, tunnel)
                except RouteError as exc:
                    failures.append(exc)
            for pr in paths:
                try:
                    _remove_path_sync(ipr, pr)
                except RouteError as exc:
                    failures.append(exc)
            _raise_first(failures)

        await self._clean_up(remove, "path and tunnel", error)

    async def _clean_up(self, remove: Callable[[Any], None], what: str, error: BaseException | None) -> None:
        """Run ``remove`` shielded and bounded.  A failure is counted, then noted on ``error``
        (the block's exception) and either logged (``best_effort``) or, on a clean exit, raised."""
        failure = await self._bounded(remove)
        if failure is None:
            return
        self._remove_failed += 1
        if error is not None:
            error.add_note(f"route cleanup failed too: {failure}")
        if self._best_effort:
            self._report(what, "remove", f"could not remove the {what} routes: {_one_line(failure)}")
        elif error is None:
            raise failure

    async def _bounded(self, remove: Callable[[Any], None]) -> RouteError | None:
        """Shielded removal within :data:`CLEANUP_TIMEOUT_S`; returns the failure instead of raising it."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLEANUP_TIMEOUT_S) as scope:
                try:
                    await _run(self._netns, remove, abandon_on_cancel=True)
                except RouteError as exc:
                    return exc
                except OSError as exc:  # e.g. the namespace itself is gone
                    return RouteError(f"removing routes: {exc}", exc.errno)
            if scope.cancelled_caught:
                return RouteError(f"removing routes took longer than {CLEANUP_TIMEOUT_S} s", errno.ETIMEDOUT)
        return None


@asynccontextmanager
async def open_routing(
    *,
    tunnel: TunnelRoutes | None,
    paths: Sequence[PathRoute],
    gateway_address: str | None,
    netns: str | None = None,
    defer_tunnel: bool = False,
    best_effort: bool = False,
    log: Callable[[str], None] = stderr_line,
) -> AsyncIterator[Routing]:
    """Install the paths' bypass routes and then the tunnel routes; remove them all on exit.

    With ``defer_tunnel`` the tunnel routes wait for
    :meth:`Routing.open_tunnel_routes`, for a TUN that does not exist yet;
    ``best_effort`` and ``log`` are as in :class:`Routing`.  Removal always
    runs (errors and cancellation included), shielded and bounded by
    :data:`CLEANUP_TIMEOUT_S`.  If the block raised, a removal failure is
    attached to that exception as a note; otherwise it is raised as
    :class:`RouteError` (with ``best_effort``: logged).  Raises ``ValueError``
    for an inconsistent plan (:func:`check_routing_plan`) before touching anything.
    """
    check_routing_plan(tunnel, paths)
    if gateway_address is not None:
        ipaddress.ip_address(gateway_address)  # ValueError for a non-address
    routing = Routing(gateway_address=gateway_address, netns=netns, best_effort=best_effort, log=log)
    try:
        await routing._install(tunnel, paths, defer_tunnel=defer_tunnel)
        yield routing
    except BaseException as exc:
        await routing._remove_all(exc)
        raise
    await routing._remove_all(None)
