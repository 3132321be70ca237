"""The gateway's nftables table, ``inet jvpn_trio_gw``: what the gateway does to traffic it forwards.

Theory of operation
-------------------
The gateway owns exactly one nftables table, :data:`TABLE` (family ``inet``, so one table
covers IPv4 and IPv6).  Its content is rendered from a frozen :class:`GatewayTable` by the
pure :func:`render`, and installed with one ``nft -f -`` transaction that declares the
table, deletes it and declares it again with its full content: a table left behind by a
crashed gateway is replaced atomically, and no packet is ever forwarded under half a rule
set.  :func:`open_gateway_table` installs it for the life of ``serve`` and deletes it on
every way out (an error, a cancellation, SIGTERM), in a shielded scope bounded by
:data:`NFT_TIMEOUT_S`.  Nothing outside the table is touched, so the host's own firewall
and other programs' tables stay as they are.

Its first content is the **TCP MSS clamp** (docs/mtu.md).  A chain hooked on ``forward``
at priority ``mangle`` (before any filtering rule added later, issue 13) rewrites the MSS
option of every SYN and SYN-ACK (``tcp flags & (syn | rst) == syn``) that enters the
gateway from its TUN or leaves through it, per family, to :func:`core.mtu.tcp_mss` of the
gateway's tunnel MTU: ``mtu - 40`` for IPv4, ``mtu - 60`` for IPv6 (1380 and 1360 at the
default 1420).  It only ever lowers the MSS (``maxseg size > N``): a host that announces
less keeps its value.  So a server on a 1500-byte network never sends the client a segment
the tunnel would have to fragment or drop, and a client whose TUN MTU is larger than the
gateway's (derived from a 1500-byte IPv4 path: 1440) is clamped on the way out.

Why explicit numbers rather than ``tcp option maxseg size set rt mtu``: ``rt mtu`` takes the
MTU of the route the packet leaves by.  Towards the client that is the TUN (right), but
from the client towards the Internet it is the uplink's 1500, which would let a remote
server answer with segments larger than the tunnel carries.  Both directions must be
clamped to the *tunnel's* MTU, which only the gateway's configuration knows.  Matching on
``iifname``/``oifname`` (names, not indexes) lets the table be installed before the TUN
exists and survive its re-creation.

Each rule counts into a named counter (:data:`CLAMP_COUNTERS`), which
:func:`read_counters` reports, so a status report (and the namespace test) can see the
clamp at work.

**Forwarding past the gateway** (docs/gateway.md).  Per family the tunnel carries, the
gateway forwards between its TUN and one *egress* interface (:class:`Egress`): the one
``[gateway].nat_egress`` names, else the interface of that family's default route; a family
with neither is not forwarded (a note says so).  :func:`plan_forwarding` reads what it needs
from the host (the egress, the forwarding sysctls as they are) and hands the pure
:func:`forwarding_plan` the decisions: which sysctls to switch on (IPv4 per interface,
``net.ipv4.conf.<tun|egress>.forwarding``; IPv6 has no per-interface switch for forwarding, so
``net.ipv6.conf.all.forwarding``, keeping the egress accepting router advertisements), and
the table's second and third chains:

* ``confine`` (hook forward, priority filter, policy accept), so that switching forwarding on
  opens nothing but the tunnel: from the TUN only out of the egress, into the TUN only from
  the egress and only for connections a client opened (``ct state established,related``),
  and, where forwarding was off before, nothing else forwarded by what serve switched on
  (:class:`Opened`).  It only ever drops: an ``accept`` here cannot override another
  table's drop, so the host's own firewall keeps the last word.
* ``postrouting`` (hook postrouting, priority srcnat), with ``nat = true``: the tunnel's
  subnet masqueraded out of the egress, counted in :data:`NAT_COUNTERS`.

:func:`open_forwarding` installs the table first (so the confinement is in place before any
switch is on), then writes the sysctls; on every way out it writes each back to the value it
had, then deletes the table.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import json
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from jvpn_trio.core.mtu import MAX_TUNNEL_MTU, MIN_LINK_MTU, Family, tcp_mss
from jvpn_trio.drivers.netlink import NetlinkError, open_iproute

__all__ = [
    "CLAMP_COUNTERS",
    "CONFINE_CHAIN",
    "FORWARD_CHAIN",
    "NAT_CHAIN",
    "NAT_COUNTERS",
    "NFT_TIMEOUT_S",
    "PROC_SYS",
    "TABLE",
    "TABLE_FAMILY",
    "ClampCounters",
    "Egress",
    "ForwardingError",
    "ForwardingPlan",
    "GatewayTable",
    "Opened",
    "SysctlChange",
    "find_egress",
    "forwarding_plan",
    "install_gateway_table",
    "open_forwarding",
    "open_gateway_table",
    "open_sysctls",
    "plan_forwarding",
    "read_counters",
    "read_nat_counters",
    "remove_gateway_table",
    "render",
]

#: The gateway's one nftables table (``nft list table inet jvpn_trio_gw``).
TABLE_FAMILY = "inet"
TABLE = "jvpn_trio_gw"
#: Its chain on the forward hook (the MSS clamp, priority mangle).
FORWARD_CHAIN = "forward"
#: Its second chain on the forward hook (priority filter): drops what the tunnel's forwarding must not open.
CONFINE_CHAIN = "confine"
#: Its chain on the postrouting hook (priority srcnat): the masquerading, with ``nat = true``.
NAT_CHAIN = "postrouting"
#: One ``nft`` invocation; they finish in milliseconds.
NFT_TIMEOUT_S = 10.0
#: Named counters of the clamp rules: (family, direction) -> counter name.  ``from_tunnel``:
#: SYNs the clients send out; ``to_tunnel``: SYNs and SYN-ACKs towards the clients.
CLAMP_COUNTERS: Mapping[tuple[Family, str], str] = {
    (Family.IPV4, "from_tunnel"): "mss4_from_tunnel",
    (Family.IPV4, "to_tunnel"): "mss4_to_tunnel",
    (Family.IPV6, "from_tunnel"): "mss6_from_tunnel",
    (Family.IPV6, "to_tunnel"): "mss6_to_tunnel",
}
#: Named counters of the masquerading rules, per family: connections the gateway masqueraded.
NAT_COUNTERS: Mapping[Family, str] = {Family.IPV4: "nat4", Family.IPV6: "nat6"}
_NFPROTO = {Family.IPV4: "ipv4", Family.IPV6: "ipv6"}
_SADDR = {Family.IPV4: "ip saddr", Family.IPV6: "ip6 saddr"}
#: Where the running kernel's sysctls are (per network namespace: the process's own).
PROC_SYS = Path("/proc/sys")
#: A sysctl switch's "on".
ON = "1"
#: ``accept_ra`` values: 1 accepts router advertisements only while the interface does not
#: forward, 2 accepts them even then (what a forwarding host with SLAAC uplink needs).
ACCEPT_RA_UNLESS_FORWARDING, ACCEPT_RA_ALWAYS = "1", "2"
_DIRECTION_MATCH = {"from_tunnel": "iifname", "to_tunnel": "oifname"}
_AF = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
#: The kernel's main routing table and the unicast route type (rtnetlink.h).
_MAIN_TABLE, _RTN_UNICAST = 254, 1
#: An interface name as the kernel accepts it (IFNAMSIZ - 1), with nothing nft would parse.
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class ForwardingError(Exception):
    """nft refused the table or cannot be run; the message is one line."""


def _check_tun_name(_instance: object, _attribute: object, value: str) -> None:
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise ValueError(f"tun_name must be an interface name (1..15 of A-Za-z0-9_.-), got {value!r}")


def _check_mtu(_instance: object, _attribute: object, value: int) -> None:
    low = MIN_LINK_MTU[Family.IPV4]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_TUNNEL_MTU:
        raise ValueError(f"mtu must be an integer {low}..{MAX_TUNNEL_MTU}, got {value!r}")


class Opened(enum.Enum):
    """What serve switched on for a family that was off before: what its ``confine`` rules shut again.

    ``NOTHING``: the host already forwarded by the egress, serve opened nothing new.
    ``EGRESS`` (IPv4, per interface): the egress's own switch; packets entering by the egress
    may then go only into the TUN.  ``HOST`` (IPv6, one switch for all interfaces): every
    forwarded packet must enter or leave by the TUN.
    """

    NOTHING = "nothing"
    EGRESS = "egress"
    HOST = "host"


def _check_ifname(_instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise ValueError(f"{attribute.name} must be an interface name (1..15 of A-Za-z0-9_.-), got {value!r}")


@attrs.frozen(kw_only=True)
class Egress:
    """One family forwarded past the gateway: the tunnel's ``subnet`` leaves (and answers come back) by ``ifname``."""

    family: Family
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    ifname: str = attrs.field(validator=_check_ifname)
    #: Masquerade the tunnel's subnet out of ``ifname`` (``[gateway].nat``).
    masquerade: bool
    opened: Opened = Opened.NOTHING

    def __attrs_post_init__(self) -> None:
        if self.subnet.version != self.family:
            raise ValueError(f"subnet {self.subnet} is not an IPv{int(self.family)} network")


def _check_egress(instance: GatewayTable, _attribute: object, value: tuple[Egress, ...]) -> None:
    families = [e.family for e in value]
    if len(set(families)) != len(families):
        raise ValueError(f"one egress per family, got {[e.ifname for e in value]}")
    if any(e.ifname == instance.tun_name for e in value):
        raise ValueError(f"the egress cannot be the tunnel's own interface {instance.tun_name!r}")


@attrs.frozen(kw_only=True)
class GatewayTable:
    """What the gateway's table holds: the TUN it serves, that TUN's MTU (the clamp's source), its egress per family."""

    tun_name: str = attrs.field(validator=_check_tun_name)
    mtu: int = attrs.field(validator=_check_mtu)
    egress: tuple[Egress, ...] = attrs.field(default=(), validator=_check_egress)

    def clamps(self) -> dict[Family, int]:
        """MSS per inner family; IPv6 only if the MTU can carry it (1280 and up)."""
        return {f: tcp_mss(self.mtu, f) for f in Family if self.mtu >= MIN_LINK_MTU[f]}


def render(table: GatewayTable) -> str:
    """The ``nft -f`` script that replaces the gateway's table with ``table``'s content, atomically."""
    lines = [
        f"table {TABLE_FAMILY} {TABLE} {{}}",  # so that the delete below cannot fail
        f"delete table {TABLE_FAMILY} {TABLE}",
        f"table {TABLE_FAMILY} {TABLE} {{",
    ]
    clamps = table.clamps()
    lines += [f"  counter {CLAMP_COUNTERS[(f, d)]} {{}}" for f in clamps for d in _DIRECTION_MATCH]
    lines += [f"  counter {NAT_COUNTERS[e.family]} {{}}" for e in table.egress if e.masquerade]
    lines += [
        f"  chain {FORWARD_CHAIN} {{",
        "    type filter hook forward priority mangle; policy accept;",
    ]
    for family, mss in clamps.items():
        for direction, match in _DIRECTION_MATCH.items():
            lines.append(
                f'    meta nfproto {_NFPROTO[family]} {match} "{table.tun_name}"'
                f" tcp flags & (syn | rst) == syn tcp option maxseg size > {mss}"
                f' counter name "{CLAMP_COUNTERS[(family, direction)]}" tcp option maxseg size set {mss}'
            )
    lines.append("  }")
    if table.egress:
        lines += _confine_lines(table)
    if any(e.masquerade for e in table.egress):
        lines += _nat_lines(table)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _confine_lines(table: GatewayTable) -> list[str]:
    """The ``confine`` chain: the forwarding serve switched on carries the tunnel's traffic and nothing else."""
    tun = f'"{table.tun_name}"'
    lines = [
        f"  chain {CONFINE_CHAIN} {{",
        "    type filter hook forward priority filter; policy accept;",
    ]
    for e in table.egress:
        proto, out = f"meta nfproto {_NFPROTO[e.family]}", f'"{e.ifname}"'
        lines += [
            f"    {proto} iifname {tun} oifname != {out} counter drop",  # clients reach out by the egress only
            f"    {proto} oifname {tun} iifname != {out} counter drop",  # and are reached from it only
            # ... and only by answers to what they opened: the tunnel is no way in from outside.
            f"    {proto} iifname {out} oifname {tun} ct state != {{ established, related }} counter drop",
        ]
        if e.opened is Opened.EGRESS:
            lines.append(f"    {proto} iifname {out} oifname != {tun} counter drop")
        elif e.opened is Opened.HOST:
            lines.append(f"    {proto} iifname != {tun} oifname != {tun} counter drop")
    lines.append("  }")
    return lines


def _nat_lines(table: GatewayTable) -> list[str]:
    """The ``postrouting`` chain: the tunnel's subnet masqueraded out of the egress, per family."""
    lines = [
        f"  chain {NAT_CHAIN} {{",
        "    type nat hook postrouting priority srcnat; policy accept;",
    ]
    lines += [
        f'    oifname "{e.ifname}" {_SADDR[e.family]} {e.subnet} counter name "{NAT_COUNTERS[e.family]}" masquerade'
        for e in table.egress
        if e.masquerade
    ]
    lines.append("  }")
    return lines


def render_removal() -> str:
    """The ``nft -f`` script that deletes the table whether or not it exists."""
    return f"table {TABLE_FAMILY} {TABLE} {{}}\ndelete table {TABLE_FAMILY} {TABLE}\n"


def _argv(netns: str | None, *nft_args: str) -> list[str]:
    prefix = ["ip", "netns", "exec", netns] if netns is not None else []
    return [*prefix, "nft", *nft_args]


def _one_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return " / ".join(lines[:3]) if lines else "(no output)"


async def _nft(netns: str | None, args: Sequence[str], *, stdin: bytes = b"") -> bytes:
    """Run nft (inside ``netns`` if given); its stdout, or ForwardingError with its stderr."""
    argv = _argv(netns, *args)
    result: subprocess.CompletedProcess[bytes] | None = None
    with trio.move_on_after(NFT_TIMEOUT_S):
        try:
            result = await trio.run_process(argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
        except FileNotFoundError:
            raise ForwardingError(f"{argv[0]} not found: the gateway needs nftables (apt-get install nftables)") from None
    if result is None:
        raise ForwardingError(f"nft {' '.join(args)}: no answer within {NFT_TIMEOUT_S} s")
    if result.returncode != 0:
        raise ForwardingError(f"nft {' '.join(args)}: exit {result.returncode}: {_one_line(result.stderr)}")
    out: bytes = result.stdout
    return out


async def install_gateway_table(table: GatewayTable, *, netns: str | None = None) -> None:
    """Replace the gateway's table with ``table``'s content in one transaction.  ForwardingError if refused."""
    await _nft(netns, ["-f", "-"], stdin=render(table).encode())


async def remove_gateway_table(*, netns: str | None = None) -> None:
    """Delete the gateway's table (idempotent: a missing table is fine).  ForwardingError if refused."""
    await _nft(netns, ["-f", "-"], stdin=render_removal().encode())


@attrs.frozen(kw_only=True)
class ClampCounters:
    """Packets whose MSS the clamp rewrote, per (family, direction) as in :data:`CLAMP_COUNTERS`."""

    packets: Mapping[tuple[Family, str], int]

    def total(self, family: Family | None = None) -> int:
        return sum(n for (f, _), n in self.packets.items() if family is None or f is family)


async def _named_counters(netns: str | None) -> dict[str, int]:
    """Packets per named counter of the installed table.  ForwardingError if it is not installed."""
    out = await _nft(netns, ["-j", "list", "counters", "table", TABLE_FAMILY, TABLE])
    try:
        items = json.loads(out)["nftables"]
        return {
            item["counter"]["name"]: int(item["counter"]["packets"])
            for item in items
            if isinstance(item, dict) and "counter" in item
        }
    except (ValueError, KeyError, TypeError):
        raise ForwardingError(f"nft -j list counters: unreadable output {out[:80]!r}") from None


async def read_counters(*, netns: str | None = None) -> ClampCounters:
    """The clamp counters of the installed table.  ForwardingError if it is not installed."""
    by_name = await _named_counters(netns)
    return ClampCounters(packets={key: by_name.get(name, 0) for key, name in CLAMP_COUNTERS.items()})


async def read_nat_counters(*, netns: str | None = None) -> dict[Family, int]:
    """Connections masqueraded per family (families without masquerading are left out)."""
    by_name = await _named_counters(netns)
    return {f: by_name[name] for f, name in NAT_COUNTERS.items() if name in by_name}


@asynccontextmanager
async def open_gateway_table(table: GatewayTable, *, netns: str | None = None) -> AsyncIterator[GatewayTable]:
    """Install the gateway's table for the duration of the block, and delete it on every way out.

    ForwardingError if nft refuses the table (nothing is left installed then).  The
    deletion runs shielded, bounded by ``NFT_TIMEOUT_S``; its failure on a clean exit is
    raised, on an exceptional one it is left to the exception already in flight.
    """
    await install_gateway_table(table, netns=netns)
    clean = False
    try:
        yield table
        clean = True
    finally:
        with trio.CancelScope(shield=True):
            try:
                await remove_gateway_table(netns=netns)
            except ForwardingError:
                if clean:
                    raise


# -- forwarding: the egress, the sysctls, the plan ------------------------------------------------


@attrs.frozen(kw_only=True)
class SysctlChange:
    """One sysctl serve changes (``after``), or one the kernel changes as a side effect (``after`` None).

    ``key`` is the path under ``/proc/sys`` (``net/ipv4/conf/eth0/forwarding``); every change
    is undone on stop by writing ``before`` back.
    """

    key: str
    before: str
    after: str | None


@attrs.frozen(kw_only=True)
class ForwardingPlan:
    """Everything serve installs for forwarding: the table, the sysctls (in order), and notes for the operator."""

    table: GatewayTable
    sysctls: tuple[SysctlChange, ...] = ()
    notes: tuple[str, ...] = ()


def _forwarding_key(family: Family, ifname: str) -> str:
    return f"net/{_NFPROTO[family]}/conf/{ifname}/forwarding"


def _accept_ra_key(ifname: str) -> str:
    return f"net/ipv6/conf/{ifname}/accept_ra"


def sysctl_keys(tun_name: str, egress: Mapping[Family, str]) -> list[str]:
    """The sysctls :func:`forwarding_plan` needs the values of (IPv6: every interface's, see there)."""
    keys = []
    if Family.IPV4 in egress:
        keys += [
            _forwarding_key(Family.IPV4, tun_name),
            _forwarding_key(Family.IPV4, egress[Family.IPV4]),
        ]
    if Family.IPV6 in egress:
        keys += [
            _forwarding_key(Family.IPV6, "all"),
            _accept_ra_key(egress[Family.IPV6]),
        ]
    return keys


def forwarding_plan(
    *,
    tun_name: str,
    mtu: int,
    subnets: Mapping[Family, ipaddress.IPv4Network | ipaddress.IPv6Network],
    egress: Mapping[Family, str],
    masquerade: bool,
    sysctls: Mapping[str, str],
) -> ForwardingPlan:
    """What to install, from the host's state as read: pure, so every decision is tested without root.

    ``egress`` has an interface per family to forward (only families in ``subnets`` count);
    ``sysctls`` the current values of :func:`sysctl_keys` and, for IPv6, of every
    ``net/ipv6/conf/*/forwarding``: switching ``all`` on switches every interface (and
    ``default``) on with it, so all of them are written back on stop.
    """
    routes: list[Egress] = []
    changes: list[SysctlChange] = []
    families = [f for f in Family if f in subnets and f in egress]
    if Family.IPV4 in families:
        out = egress[Family.IPV4]
        tun_key, out_key = (
            _forwarding_key(Family.IPV4, tun_name),
            _forwarding_key(Family.IPV4, out),
        )
        opened = Opened.NOTHING if sysctls[out_key] == ON else Opened.EGRESS
        changes += [SysctlChange(key=k, before=sysctls[k], after=ON) for k in (tun_key, out_key) if sysctls[k] != ON]
        routes.append(
            Egress(
                family=Family.IPV4,
                subnet=subnets[Family.IPV4],
                ifname=out,
                masquerade=masquerade,
                opened=opened,
            )
        )
    if Family.IPV6 in families:
        out = egress[Family.IPV6]
        all_key, ra_key = _forwarding_key(Family.IPV6, "all"), _accept_ra_key(out)
        opened = Opened.NOTHING if sysctls[all_key] == ON else Opened.HOST
        if opened is Opened.HOST:
            changes.append(SysctlChange(key=all_key, before=sysctls[all_key], after=ON))
            if sysctls[ra_key] == ACCEPT_RA_UNLESS_FORWARDING:  # else the egress would lose its SLAAC default route
                changes.append(SysctlChange(key=ra_key, before=sysctls[ra_key], after=ACCEPT_RA_ALWAYS))
            prefix, suffix = "net/ipv6/conf/", "/forwarding"
            changes += [
                SysctlChange(key=k, before=v, after=None)
                for k, v in sorted(sysctls.items())
                if k.startswith(prefix) and k.endswith(suffix) and k != all_key
            ]
        routes.append(
            Egress(
                family=Family.IPV6,
                subnet=subnets[Family.IPV6],
                ifname=out,
                masquerade=masquerade,
                opened=opened,
            )
        )
    table = GatewayTable(tun_name=tun_name, mtu=mtu, egress=tuple(routes))
    return ForwardingPlan(table=table, sysctls=tuple(changes))


def _default_route_oif(ipr: Any, family: Family) -> int | None:
    """The interface index of the main table's lowest-metric unicast default route of ``family``, if any."""
    best: tuple[int, int] | None = None
    for r in ipr.get_routes(family=_AF[family], table=_MAIN_TABLE):
        oif = r.get("oif")
        if r["dst_len"] != 0 or r["type"] != _RTN_UNICAST or not isinstance(oif, int):
            continue  # not a default route, unreachable/blackhole, or multipath (no one interface)
        metric = r.get("priority") or 0
        if best is None or metric < best[0]:
            best = (metric, oif)
    return None if best is None else best[1]


def _find_egress_sync(
    netns: str | None, named: str | None, families: Sequence[Family]
) -> tuple[dict[Family, str], list[str]]:
    with open_iproute(netns) as ipr:
        if named is not None:
            if not ipr.link_lookup(ifname=named):
                raise ForwardingError(f"egress interface {named!r} does not exist ([gateway].nat_egress)")
            return {f: named for f in families}, []
        found, notes = {}, []
        for family in families:
            oif = _default_route_oif(ipr, family)
            links = ipr.get_links(oif) if oif is not None else []
            ifname = links[0].get("ifname") if links else None
            if isinstance(ifname, str):
                found[family] = ifname
            else:
                notes.append(
                    f"no IPv{int(family)} default route with one interface: IPv{int(family)} from the tunnel"
                    " is not forwarded past the gateway (set [gateway].nat_egress)"
                )
        return found, notes


async def find_egress(
    named: str | None, families: Iterable[Family], *, netns: str | None = None
) -> tuple[dict[Family, str], list[str]]:
    """The egress per family: ``named`` for all, else each family's default route's interface.

    Returns the interfaces found and one note per family without one.  ForwardingError if
    ``named`` does not exist or netlink refuses.
    """
    try:
        return await trio.to_thread.run_sync(_find_egress_sync, netns, named, list(families))
    except (NetlinkError, OSError) as exc:
        raise ForwardingError(f"cannot read the routes to find the egress: {exc}") from None


def _read_sysctls_sync(root: Path, keys: Sequence[str], *, ipv6: bool) -> dict[str, str]:
    values = {key: (root / key).read_text().strip() for key in keys}
    if ipv6:  # every interface's, as switching "all" switches them (see forwarding_plan)
        for path in sorted((root / "net/ipv6/conf").glob("*/forwarding")):
            values[str(path.relative_to(root))] = path.read_text().strip()
    return values


async def plan_forwarding(
    *,
    tun_name: str,
    mtu: int,
    subnets: Mapping[Family, ipaddress.IPv4Network | ipaddress.IPv6Network],
    nat: bool,
    nat_egress: str | None,
    proc_sys: Path = PROC_SYS,
    netns: str | None = None,
) -> ForwardingPlan:
    """Read the host (egress per family, forwarding sysctls) and decide with :func:`forwarding_plan`.

    ``netns`` is for the route lookup only; ``proc_sys`` must be that namespace's (the
    process's own by default).  ForwardingError, one line, if the egress is unknown or a
    sysctl cannot be read.
    """
    egress, notes = await find_egress(nat_egress, list(subnets), netns=netns)
    keys = sysctl_keys(tun_name, egress)
    try:
        sysctls = await trio.to_thread.run_sync(lambda: _read_sysctls_sync(proc_sys, keys, ipv6=Family.IPV6 in egress))
    except OSError as exc:
        raise ForwardingError(f"cannot read the forwarding sysctls: {exc.strerror or exc} ({exc.filename})") from None
    plan = forwarding_plan(
        tun_name=tun_name,
        mtu=mtu,
        subnets=subnets,
        egress=egress,
        masquerade=nat,
        sysctls=sysctls,
    )
    return attrs.evolve(plan, notes=tuple(notes))


def _write_sysctl(root: Path, key: str, value: str) -> None:
    (root / key).write_text(f"{value}\n")


def _restore_sysctls_sync(root: Path, changes: Sequence[SysctlChange]) -> list[str]:
    """Write each ``before`` back, in order (``all`` before the interfaces it would reset); what failed."""
    failed = []
    for change in changes:
        path = root / change.key
        try:
            if path.read_text().strip() != change.before:
                _write_sysctl(root, change.key, change.before)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # an interface gone meanwhile (the TUN) has nothing to restore
                failed.append(f"{change.key}: {exc.strerror or exc}")
    return failed


@asynccontextmanager
async def open_sysctls(changes: Sequence[SysctlChange], *, proc_sys: Path = PROC_SYS) -> AsyncIterator[None]:
    """Write the changes for the duration of the block; every changed sysctl gets its old value back on exit.

    ForwardingError if a write is refused (what was written is restored first).  The
    restore runs shielded; its failure is raised on a clean exit only, as the table's is.
    """

    def apply() -> None:
        for change in changes:
            if change.after is not None:
                _write_sysctl(proc_sys, change.key, change.after)

    def restore() -> None:
        failed = _restore_sysctls_sync(proc_sys, changes)
        if failed:
            raise ForwardingError(f"cannot restore {'; '.join(failed)}")

    clean = False
    try:
        try:
            await trio.to_thread.run_sync(apply)
        except OSError as exc:
            raise ForwardingError(f"cannot write {exc.filename}: {exc.strerror or exc}") from None
        yield
        clean = True
    finally:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(restore)
            except ForwardingError:
                if clean:
                    raise


@asynccontextmanager
async def open_forwarding(
    plan: ForwardingPlan, *, proc_sys: Path = PROC_SYS, netns: str | None = None
) -> AsyncIterator[ForwardingPlan]:
    """The plan installed for the block: the table first (its confinement before any switch), then the sysctls.

    On the way out the sysctls get their values back, then the table goes.
    """
    async with (
        open_gateway_table(plan.table, netns=netns),
        open_sysctls(plan.sysctls, proc_sys=proc_sys),
    ):
        yield plan
