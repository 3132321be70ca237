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
clamp at work.  Issue 13 adds the gateway's forwarding and NAT rules to this same table:
new fields on :class:`GatewayTable`, new lines in :func:`render`.
"""

from __future__ import annotations

import json
import re
import subprocess
from contextlib import asynccontextmanager
from typing import AsyncIterator, Mapping, Sequence

import attrs
import trio

from jvpn_trio.core.mtu import MAX_TUNNEL_MTU, MIN_LINK_MTU, Family, tcp_mss

__all__ = [
    "CLAMP_COUNTERS",
    "FORWARD_CHAIN",
    "NFT_TIMEOUT_S",
    "TABLE",
    "TABLE_FAMILY",
    "ClampCounters",
    "ForwardingError",
    "GatewayTable",
    "install_gateway_table",
    "open_gateway_table",
    "read_counters",
    "remove_gateway_table",
    "render",
]

#: The gateway's one nftables table (``nft list table inet jvpn_trio_gw``).
TABLE_FAMILY = "inet"
TABLE = "jvpn_trio_gw"
#: Its chain on the forward hook.
FORWARD_CHAIN = "forward"
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
_NFPROTO = {Family.IPV4: "ipv4", Family.IPV6: "ipv6"}
_DIRECTION_MATCH = {"from_tunnel": "iifname", "to_tunnel": "oifname"}
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


@attrs.frozen(kw_only=True)
class GatewayTable:
    """What the gateway's table holds: the TUN it serves and that TUN's MTU (the clamp's source)."""

    tun_name: str = attrs.field(validator=_check_tun_name)
    mtu: int = attrs.field(validator=_check_mtu)

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
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


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


async def read_counters(*, netns: str | None = None) -> ClampCounters:
    """The clamp counters of the installed table.  ForwardingError if it is not installed."""
    out = await _nft(netns, ["-j", "list", "counters", "table", TABLE_FAMILY, TABLE])
    try:
        items = json.loads(out)["nftables"]
    except (ValueError, KeyError, TypeError):
        raise ForwardingError(f"nft -j list counters: unreadable output {out[:80]!r}") from None
    by_name = {
        item["counter"]["name"]: int(item["counter"]["packets"])
        for item in items
        if isinstance(item, dict) and "counter" in item
    }
    return ClampCounters(packets={key: by_name.get(name, 0) for key, name in CLAMP_COUNTERS.items()})


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
