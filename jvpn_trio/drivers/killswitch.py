"""The kill switch: one nftables table that lets nothing but the tunnel leave the laptop.

Theory of operation
-------------------
While ``jvpn-trio up`` runs with ``kill_switch = true`` (the default for a full
tunnel), the table ``inet jvpn_trio`` (:data:`TABLE`) holds two base chains
with policy drop (docs/threat-model.md is the user's account of it)::

    chain output   hook output  priority filter   policy drop
    chain forward  hook forward priority filter   policy drop

``output`` accepts, in this order, and drops the rest (counted in the named
counter ``blocked_output``):

1. ``oif lo``: the laptop talking to itself (local resolvers, daemons);
2. ``oifname <tun>``: everything the routing sends into the tunnel;
3. UDP to each gateway endpoint (the data port and the control port) that
   carries a path mark: ``meta mark & <bypass_mask> == <bypass_mark>``.
   Only the agent's path sockets set ``SO_MARK`` in that range
   (``drivers/routes.py``), so a process that merely picks the gateway's port
   cannot slip past: tighter than an address and port rule alone;
4. the local network's housekeeping, none of which can be routed beyond the
   link: DHCPv4 (UDP 68 -> 67), DHCPv6 (UDP 546 -> 547), ICMPv6 router
   solicitation and neighbour solicitation/advertisement with hop limit 255
   (RFC 4861 makes receivers drop anything else), MLD reports and done
   messages with hop limit 1, IGMP with TTL 1.  ARP is not IP: the ``inet``
   family never sees it, so it always flows (a laptop without ARP has no
   next hop for its tunnel either);
5. with ``allow_lan``: private and link-local destinations (10/8,
   172.16/12, 192.168/16, 169.254/16, fe80::/10, fc00::/7), multicast
   (224/4, ff00::/8) and the limited broadcast, *except* DNS (TCP/UDP 53,
   TCP 853) to them, which is dropped and counted in ``blocked_lan_dns``:
   name lookups belong in the tunnel even when printers and file shares do
   not.  Shared-address space (100.64/10, CGNAT, Tailscale) is not "LAN".

``forward`` (routed traffic of containers and VMs on the laptop) accepts what
leaves through the TUN and, with ``allow_lan``, what goes to the LAN ranges
above (a Docker bridge in 172.17/16, libvirt's 192.168.122/24, also
container-to-container traffic when ``br_netfilter`` makes bridged packets
visible here); the rest is dropped and counted in ``blocked_forward``.

There is no input chain: the promise is about what *leaves*.  An inbound
packet on a physical interface may reach a socket, but nothing can answer it
(no reply, no TCP RST, no ICMP error carries a path mark), so it learns
nothing and nothing leaks.

A ``drop`` in an output hook makes ``sendto()``/``connect()`` fail at once
with EPERM: applications see an error instead of a silent black hole.  Other
tables (firewalld, Docker's iptables-nft) cannot undo a drop of ours: in
nftables a packet must be accepted by every base chain on the hook.

Atomicity: :func:`install_script` is one ``nft -f -`` transaction that
creates the table if missing, deletes it and creates it in full (nft 1.0.6
has no ``destroy``), so there is never a moment with a half-built table, and
installing again replaces it exactly.  Removal is
``table inet jvpn_trio {}; delete table inet jvpn_trio``: idempotent.

Lifetime (``commands/up.py``): installed *first*, before routes and TUN, so
``up`` fails closed; removed *last* on a clean exit (SIGINT/SIGTERM, the
``down`` control command).  After a crash the table stays, as the lockdown
mode of commercial clients does, until ``jvpn-trio down`` removes it by name:
:meth:`KillSwitch.hold` marks the point after which an exception leaves it
in place.  The table carries the comment :data:`COMMENT` so an operator who
finds it in ``nft list ruleset`` knows who put it there.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Sequence

import attrs
import trio

from jvpn_trio.config import ClientConfig
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.drivers.routes import DEFAULT_BYPASS_MARK, DEFAULT_BYPASS_MASK

__all__ = [
    "COMMENT",
    "FAMILY",
    "KillSwitch",
    "KillSwitchError",
    "KillSwitchSpec",
    "NFT_TIMEOUT_S",
    "REMOVE_SCRIPT",
    "TABLE",
    "install",
    "install_script",
    "is_installed",
    "open_kill_switch",
    "read_counters",
    "remove",
    "render_table",
]

#: The one nftables table jvpn-trio owns, and its family (IPv4 and IPv6 in one).
TABLE = "jvpn_trio"
FAMILY = "inet"
COMMENT = "jvpn-trio kill switch: only the tunnel leaves (jvpn-trio down removes it)"
#: Bound on one ``nft`` invocation; they finish in milliseconds.
NFT_TIMEOUT_S = 10.0
#: Named counters of the table.
COUNTERS = ("blocked_output", "blocked_forward", "blocked_lan_dns")

#: The local network, with ``allow_lan`` (see the module docstring).
LAN4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255")
LAN6 = ("fe80::/10", "fc00::/7", "ff00::/8")
#: DNS and DNS over TLS: kept out of the LAN even with ``allow_lan``.
DNS_PORTS = (53, 853)
DHCP4 = (68, 67)
DHCP6 = (546, 547)
#: ICMPv6 the link needs (RFC 4861 ND with hop limit 255; RFC 2710/3810 MLD with hop limit 1).
ND_TYPES = ("nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert")
MLD_TYPES = ("mld-listener-report", "mld-listener-done", "mld2-listener-report")

REMOVE_SCRIPT = f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"

#: What a kernel interface name may hold that nft can quote safely.
_IFNAME = re.compile(r"^[A-Za-z0-9_.@:+-]{1,15}$")


class KillSwitchError(Exception):
    """nft is missing, or refused the table: one line for the user (the CLI prints it, exit 2)."""


Endpoint = tuple[str, int]


def _endpoints(values: Sequence[tuple[object, int]]) -> tuple[Endpoint, ...]:
    out = []
    for host, port in values:
        address = ipaddress.ip_address(str(host))  # ValueError for a name
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"gateway port {port} is out of range 1..65535")
        out.append((str(address), int(port)))
    return tuple(dict.fromkeys(out))


def _check_ifname(_inst: object, _attribute: object, value: str) -> None:
    if not _IFNAME.match(value):
        raise ValueError(f"{value!r} is not an interface name nft can use")


def _check_endpoints(_inst: object, _attribute: object, value: tuple[Endpoint, ...]) -> None:
    if not value:
        raise ValueError("the kill switch needs at least one gateway endpoint")


def _check_mark(_inst: KillSwitchSpec, _attribute: object, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{value:#x} does not fit in 32 bits")


@attrs.frozen(kw_only=True)
class KillSwitchSpec:
    """What the table lets out: the TUN, the gateway endpoints for marked UDP, the LAN or not."""

    tun_name: str = attrs.field(validator=_check_ifname)
    #: (address, port) of every gateway endpoint the path sockets talk to (data and control).
    gateways: tuple[Endpoint, ...] = attrs.field(converter=_endpoints, validator=_check_endpoints)
    bypass_mark: int = attrs.field(default=DEFAULT_BYPASS_MARK, validator=_check_mark)
    bypass_mask: int = attrs.field(default=DEFAULT_BYPASS_MASK, validator=_check_mark)
    allow_lan: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.bypass_mask or self.bypass_mark & ~self.bypass_mask:
            raise ValueError(f"bypass mark {self.bypass_mark:#x} is not within mask {self.bypass_mask:#x}")

    @classmethod
    def from_config(cls, config: ClientConfig) -> KillSwitchSpec:
        """The kill switch of a client config: its TUN, every gateway's data and control endpoints."""
        return cls(tun_name=config.tun_name, gateways=config.gateway_endpoints, allow_lan=config.allow_lan)


def _set(items: Sequence[object]) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"


def _gateway_rules(spec: KillSwitchSpec) -> list[str]:
    mark = f"meta mark & {spec.bypass_mask:#010x} == {spec.bypass_mark:#010x}"
    by_address: dict[str, list[int]] = {}
    for address, port in spec.gateways:
        by_address.setdefault(address, []).append(port)
    rules = []
    for address, ports in by_address.items():
        family = "ip6" if ipaddress.ip_address(address).version == 6 else "ip"
        dport = str(ports[0]) if len(ports) == 1 else _set(ports)
        rules.append(f"{mark} {family} daddr {address} udp dport {dport} accept")
    return rules


def _lan_rules(*, counter: str | None) -> list[str]:
    """Accept the LAN ranges; with ``counter``, first drop DNS to them (counted)."""
    rules = []
    for family, ranges in (("ip", LAN4), ("ip6", LAN6)):
        if counter is not None:
            rules.append(
                f"{family} daddr {_set(ranges)} meta l4proto {{ tcp, udp }} th dport {_set(DNS_PORTS)}"
                f' counter name "{counter}" drop'
            )
        rules.append(f"{family} daddr {_set(ranges)} accept")
    return rules


def render_table(spec: KillSwitchSpec) -> str:
    """The ``table inet jvpn_trio { ... }`` block for ``spec`` (pure; see the module docstring)."""
    tun = f'"{spec.tun_name}"'
    output = [
        "type filter hook output priority filter; policy drop;",
        'oif "lo" accept',
        f"oifname {tun} accept",
        *_gateway_rules(spec),
        f"meta nfproto ipv4 udp sport {DHCP4[0]} udp dport {DHCP4[1]} accept",
        f"meta nfproto ipv6 udp sport {DHCP6[0]} udp dport {DHCP6[1]} accept",
        f"icmpv6 type {_set(ND_TYPES)} ip6 hoplimit 255 accept",
        f"icmpv6 type {_set(MLD_TYPES)} ip6 hoplimit 1 accept",
        "ip protocol igmp ip ttl 1 accept",
        *(_lan_rules(counter="blocked_lan_dns") if spec.allow_lan else []),
        'counter name "blocked_output" drop',
    ]
    forward = [
        "type filter hook forward priority filter; policy drop;",
        f"oifname {tun} accept",
        *(_lan_rules(counter=None) if spec.allow_lan else []),
        'counter name "blocked_forward" drop',
    ]
    lines = [f"table {FAMILY} {TABLE} {{", f'  comment "{COMMENT}"']
    lines += [f"  counter {name} {{ }}" for name in COUNTERS]
    for name, body in (("output", output), ("forward", forward)):
        lines.append(f"  chain {name} {{")
        lines += [f"    {rule}" for rule in body]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def install_script(spec: KillSwitchSpec) -> str:
    """One transaction: (re)create the table from scratch.  Applied all or nothing by ``nft -f -``."""
    return REMOVE_SCRIPT + render_table(spec)


# -- running nft ---------------------------------------------------------------------


def _argv(netns: str | None, *args: str) -> list[str]:
    prefix = ["ip", "netns", "exec", netns] if netns is not None else []
    return [*prefix, "nft", *args]


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


async def _nft(*args: str, netns: str | None, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run nft (in ``netns``) to completion; KillSwitchError if it is missing or times out."""
    result: subprocess.CompletedProcess[bytes] | None = None
    with trio.move_on_after(NFT_TIMEOUT_S):
        try:
            result = await trio.run_process(
                _argv(netns, *args), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
            )
        except FileNotFoundError:
            raise KillSwitchError(
                "nft not found: the kill switch needs nftables (install it, or set kill_switch = false)"
            ) from None
    if result is None:
        raise KillSwitchError(f"nft gave no answer within {NFT_TIMEOUT_S:g} s")
    return result


def _refusal(what: str, result: subprocess.CompletedProcess[bytes]) -> KillSwitchError:
    text = _last_line(result.stderr)
    if "Operation not permitted" in text:
        return KillSwitchError(f"{what}: nft needs root or CAP_NET_ADMIN (try sudo)")
    return KillSwitchError(f"{what}: nft exit {result.returncode}: {text}")


async def install(spec: KillSwitchSpec, *, netns: str | None = None) -> None:
    """Install (or replace) the table atomically.  Raises :class:`KillSwitchError`; nothing changes then."""
    result = await _nft("-f", "-", netns=netns, stdin=install_script(spec).encode())
    if result.returncode != 0:
        raise _refusal("cannot install the kill switch", result)


async def is_installed(*, netns: str | None = None) -> bool:
    """Whether the table exists.  False when nft is not installed (then nothing of ours can be there)."""
    try:
        result = await _nft("list", "table", FAMILY, TABLE, netns=netns)
    except KillSwitchError:
        return False
    return result.returncode == 0


async def remove(*, netns: str | None = None) -> bool:
    """Remove the table if present; True if it was there.  Idempotent.  Raises :class:`KillSwitchError`."""
    if not await is_installed(netns=netns):
        return False
    result = await _nft("-f", "-", netns=netns, stdin=REMOVE_SCRIPT.encode())
    if result.returncode != 0:
        raise _refusal("cannot remove the kill switch", result)
    return True


_COUNTER_LINE = re.compile(r"counter (\w+) \{\s*packets (\d+) bytes \d+", re.S)


async def read_counters(*, netns: str | None = None) -> dict[str, int]:
    """Packets dropped so far per named counter (``blocked_output``...); empty if the table is absent."""
    try:
        result = await _nft("list", "counters", "table", FAMILY, TABLE, netns=netns)
    except KillSwitchError:
        return {}
    if result.returncode != 0:
        return {}
    return {name: int(packets) for name, packets in _COUNTER_LINE.findall(result.stdout.decode())}


# -- the resource --------------------------------------------------------------------


class KillSwitch:
    """An installed kill switch (from :func:`open_kill_switch`)."""

    def __init__(self, spec: KillSwitchSpec) -> None:
        self.spec = spec
        self.held = False

    def hold(self) -> None:
        """From now on an exception (a crash) leaves the table in place; only a clean exit removes it."""
        self.held = True


@asynccontextmanager
async def open_kill_switch(
    spec: KillSwitchSpec, *, netns: str | None = None, log: Callable[[str], None] = stderr_line
) -> AsyncIterator[KillSwitch]:
    """Install the table for the block, remove it on exit, unless the block crashed after :meth:`KillSwitch.hold`.

    A clean exit, cancellation or KeyboardInterrupt removes the table
    (shielded, bounded by :data:`NFT_TIMEOUT_S`); so does an exception before
    ``hold()`` (start-up failed: the user gets the error and a working
    network).  An exception after ``hold()`` leaves the block in place and
    says so on one line.  Raises :class:`KillSwitchError` if it cannot be
    installed (or, on a clean exit, removed).
    """
    with trio.CancelScope(shield=True):  # installed or not, never half-way: a cancel lands in the block
        await install(spec, netns=netns)
    switch = KillSwitch(spec)
    try:
        yield switch
    except Exception:
        if switch.held:
            log(f"the kill switch (nft table {FAMILY} {TABLE}) stays in place: `jvpn-trio down` removes it")
            raise
        await _remove_shielded(netns, log)
        raise
    except BaseException:
        await _remove_shielded(netns, log)
        raise
    with trio.CancelScope(shield=True):
        await remove(netns=netns)


async def _remove_shielded(netns: str | None, log: Callable[[str], None]) -> None:
    with trio.CancelScope(shield=True):
        try:
            await remove(netns=netns)
        except KillSwitchError as exc:
            log(f"{exc}; `jvpn-trio down` removes it")
