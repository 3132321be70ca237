"""Tunnel MTU and TCP MSS: what the encapsulation costs, and the largest inner packet a path set carries.

Theory of operation
-------------------
Every IP packet that enters a TUN leaves as one UDP datagram carrying one DATA frame
(docs/wire-format.md): the packet is the frame's plaintext, unpadded, behind the
16-byte transport header and in front of the 16-byte Poly1305 tag
(``wire.TRANSPORT_OVERHEAD``).  The datagram then gets a UDP header and an outer IP
header, whose size depends on the family of the gateway's address::

    outer IPv4:  20 (IPv4 header) + 8 (UDP) + 16 (transport header) + 16 (tag) = 60
    outer IPv6:  40 (IPv6 header) + 8 (UDP) + 16 (transport header) + 16 (tag) = 80

So an inner packet of ``n`` bytes becomes an outer packet of ``n + overhead(outer)``
bytes, and it crosses a path of MTU ``m`` without fragmentation iff
``n <= m - overhead(outer)``.  :func:`tunnel_mtu` takes the minimum of that over the
paths the client has (all of them, not only the active one, so that a switch never
makes the tunnel's packets too large for the new path), then clamps it to what the
inner traffic needs (RFC 791: every IPv4 host accepts 576; RFC 8200: IPv6 needs 1280
on every link) and to what a DATA frame can carry.  Below the lower clamp the outer
packets are fragmented by the sending kernel: slower, but delivered (docs/mtu.md).

The same overhead with IPv6 outer on an Ethernet path gives ``1500 - 80 = 1420``,
``config.DEFAULT_MTU`` (WireGuard's default for the same reason): the gateway serves
clients of both families, so its default must fit the larger overhead.

:func:`tcp_mss` is the MSS a TCP SYN may announce so that a full segment fits the
tunnel: the tunnel MTU minus the inner IP header and the TCP header (RFC 879, RFC 8200
section 8.3).  The gateway clamps forwarded SYNs to it (``drivers/forwarding.py``).

Pure: no I/O.  The path MTUs come from the drivers (the interfaces' MTU).  Errors are
``ValueError`` for arguments that cannot describe a link (a driver bug).
"""

from __future__ import annotations

import enum
from typing import Iterable, Mapping

from jvpn_trio.core.wire import MAX_DATA_PLAINTEXT, TRANSPORT_OVERHEAD


class Family(enum.IntEnum):
    """An IP family, numbered as ``ipaddress``'s ``version`` (the core cannot use ``socket.AF_*``)."""

    IPV4 = 4
    IPV6 = 6


#: Fixed header sizes: IPv4 without options (RFC 791), the IPv6 base header (RFC 8200).
IP_HEADER_LEN: Mapping[Family, int] = {Family.IPV4: 20, Family.IPV6: 40}
#: RFC 768.
UDP_HEADER_LEN = 8
#: RFC 9293, without options: the MSS counts only the payload.
TCP_HEADER_LEN = 20

#: The smallest MTU a link may have and still carry the family at all (RFC 791 section 3.2:
#: 68; RFC 8200 section 5: 1280).  A path below it cannot carry the outer packets of that family.
MIN_LINK_MTU: Mapping[Family, int] = {Family.IPV4: 68, Family.IPV6: 1280}
#: Bounds of a tunnel MTU (``config.MIN_MTU`` / ``MIN_MTU6`` must equal the first two):
#: every IPv4 host accepts 576-byte datagrams (RFC 791); a tunnel carrying IPv6 needs 1280.
MIN_TUNNEL_MTU = 576
MIN_TUNNEL_MTU6 = MIN_LINK_MTU[Family.IPV6]
#: The largest inner packet one DATA frame carries (wire.MAX_DATA_PLAINTEXT = 65535 - 32).
MAX_TUNNEL_MTU = MAX_DATA_PLAINTEXT
#: Ethernet's MTU: what is assumed while the client has no path to measure (and what
#: ``config.DEFAULT_MTU`` is derived from, with the IPv6 outer overhead).
ETHERNET_MTU = 1500


def overhead(outer: Family) -> int:
    """Bytes one tunnelled packet gains on the wire: outer IP + UDP + transport header + AEAD tag."""
    return IP_HEADER_LEN[Family(outer)] + UDP_HEADER_LEN + TRANSPORT_OVERHEAD


#: ``overhead()`` per outer family: 60 for IPv4, 80 for IPv6.
OVERHEAD: Mapping[Family, int] = {family: overhead(family) for family in Family}


def _check_mtu(value: object, *, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def tunnel_mtu(path_mtus: Iterable[int], outer_family: Family, *, inner_ipv6: bool = False) -> int:
    """The largest inner packet every usable path carries unfragmented, within the tunnel's bounds.

    ``path_mtus`` are the MTUs of the client's paths (its interfaces); a path whose MTU is
    below ``MIN_LINK_MTU[outer_family]`` cannot carry the outer packets and is left out.
    With no usable path, ``ETHERNET_MTU`` is assumed.  The result is clamped to
    ``MIN_TUNNEL_MTU6`` (``inner_ipv6``: the tunnel carries IPv6) or ``MIN_TUNNEL_MTU``
    from below, and to ``MAX_TUNNEL_MTU`` from above.  ValueError for an MTU that is not a
    positive integer.
    """
    outer = Family(outer_family)
    mtus = [_check_mtu(m, what="a path MTU") for m in path_mtus]
    usable = [m for m in mtus if m >= MIN_LINK_MTU[outer]] or [ETHERNET_MTU]
    lower = MIN_TUNNEL_MTU6 if inner_ipv6 else MIN_TUNNEL_MTU
    return max(lower, min(MAX_TUNNEL_MTU, min(usable) - OVERHEAD[outer]))


def client_tun_mtu(
    configured: int | None, path_mtus: Iterable[int], outer_family: Family, *, inner_ipv6: bool = False
) -> int:
    """The client's TUN MTU: ``[client].mtu`` when configured, else :func:`tunnel_mtu` of its paths.

    ``configured`` was validated by the config loader and wins as it is (the user knows a
    path we cannot see, e.g. a PPPoE hop behind the router).
    """
    if configured is not None:
        return _check_mtu(configured, what="the configured MTU")
    return tunnel_mtu(path_mtus, outer_family, inner_ipv6=inner_ipv6)


def tcp_mss(mtu: int, inner_family: Family) -> int:
    """The TCP MSS that makes a full segment of ``inner_family`` exactly ``mtu`` bytes.

    ValueError if ``mtu`` cannot carry that family (below ``MIN_LINK_MTU``, or above
    ``MAX_TUNNEL_MTU``).
    """
    inner = Family(inner_family)
    _check_mtu(mtu, what="the tunnel MTU")
    if not MIN_LINK_MTU[inner] <= mtu <= MAX_TUNNEL_MTU:
        raise ValueError(f"a tunnel MTU of {mtu} cannot carry {inner.name} ({MIN_LINK_MTU[inner]}..{MAX_TUNNEL_MTU})")
    return mtu - IP_HEADER_LEN[inner] - TCP_HEADER_LEN
