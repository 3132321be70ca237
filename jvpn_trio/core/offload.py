"""TUN offloads, sans-IO: cut the kernel's super-frames into packets, and glue packets back into them.

Why
---
A TUN device opened with ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` (checksum
and TSO) lets the kernel's TCP stack hand over one 64 KiB *super-frame*
instead of forty-five 1,400-byte packets, and take one back on the far side.
Every packet the tunnel carries then costs one syscall less at each end, and
the TCP stacks at both ends work per super-frame (the reason wireguard-go
reported two to four times the throughput after it did the same in 2023).

What is here
------------
- :func:`split_frame`: one frame read from the device (a ``virtio_net_hdr``
  and a packet, maybe a TCP/UDP GSO super-frame) to the packets the tunnel
  carries, each at most ``gso_size`` bytes of payload.
- :func:`coalesce`: packets received from the tunnel to the frames to write,
  consecutive in-order TCP segments of one flow glued into one GSO frame.
- :class:`PartialPacket` and :func:`complete_checksum`: the checksum is never
  computed in Python on the hot path.  With checksum offload the kernel leaves
  a TCP or UDP packet's checksum field holding only the pseudo-header sum
  (``CHECKSUM_PARTIAL``).  Such a packet travels as a PartialPacket (the wire's
  ``DATA_PARTIAL``), and the receiving kernel completes the sum when it is
  written with ``VIRTIO_NET_HDR_F_NEEDS_CSUM``.  A receiver without offloads
  completes it with :func:`complete_checksum` instead.  Packets that were
  complete stay complete and are never glued: gluing them would let the
  kernel recompute, and so hide, a checksum an end host got wrong.

A packet whose transport header does not follow a fixed-size IP header (IPv4
options are fine; IPv6 extension headers are not) is completed here in
software and travels complete: the receiver finds the checksum field of a
PartialPacket from the IP header alone.

Malformed input raises :class:`OffloadError`; the drivers count and drop it.
Nothing here does I/O or keeps state between calls.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable
from typing import Final

import attrs

__all__ = [
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VIRTIO_NET_HDR_GSO_TCPV6",
    "VIRTIO_NET_HDR_GSO_UDP_L4",
    "VNET_HDR_EMPTY",
    "VNET_HDR_LEN",
    "Coalesced",
    "OffloadError",
    "PartialPacket",
    "VnetHeader",
    "checksum_field",
    "coalesce",
    "complete_checksum",
    "completed",
    "split_frame",
]

#: Size of the legacy ``struct virtio_net_hdr`` that prefixes every frame in VNET_HDR mode.
VNET_HDR_LEN: Final = 10
#: An all-zero header: "no checksum work, not GSO".  Prepend it to an ordinary IP packet.
VNET_HDR_EMPTY: Final = bytes(VNET_HDR_LEN)
# <linux/virtio_net.h>: flags and gso_type values.
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_GSO_NONE: Final = 0
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1
VIRTIO_NET_HDR_GSO_TCPV6: Final = 4
VIRTIO_NET_HDR_GSO_UDP_L4: Final = 5
# The legacy header is in native byte order unless TUNSETVNETLE/BE is used (we do not).
_VNET_HDR = struct.Struct("=BBHHHH")

_TCP: Final = 6
_UDP: Final = 17
_IPV6_HEADER: Final = 40
_TCP_CHECKSUM_AT: Final = 16
_UDP_CHECKSUM_AT: Final = 6
_TCP_FIN: Final = 0x01
_TCP_PSH: Final = 0x08
_TCP_ACK: Final = 0x10
_TCP_CWR: Final = 0x80
#: The largest IPv4 total length, and the largest IPv6 payload length without jumbograms.
_MAX_IP_LENGTH: Final = 65535
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class OffloadError(ValueError):
    """A frame or packet the offload code cannot take; ``reason`` names the counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class PartialPacket(bytes):
    """An IP packet whose TCP/UDP checksum field holds only the pseudo-header sum (``CHECKSUM_PARTIAL``)."""

    __slots__ = ()


@attrs.frozen(kw_only=True)
class VnetHeader:
    """The ``virtio_net_hdr`` that starts every frame in VNET_HDR mode.

    ``gso_type`` is one of the ``VIRTIO_NET_HDR_GSO_*`` values (0: an
    ordinary packet); a GSO frame must be cut into ``gso_size``-byte payloads
    behind ``hdr_len`` bytes of headers.  ``flags & VIRTIO_NET_HDR_F_NEEDS_CSUM``
    means the checksum at ``csum_start + csum_offset`` is not filled in yet.
    """

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def from_bytes(cls, frame: bytes | bytearray | memoryview) -> VnetHeader:
        """Parse the header at the start of ``frame``; ValueError if it is shorter than VNET_HDR_LEN."""
        if len(frame) < VNET_HDR_LEN:
            raise ValueError(f"frame of {len(frame)} bytes is shorter than a {VNET_HDR_LEN}-byte virtio_net_hdr")
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _VNET_HDR.unpack_from(frame)
        return cls(flags=flags, gso_type=gso_type, hdr_len=hdr_len, gso_size=gso_size,
                   csum_start=csum_start, csum_offset=csum_offset)

    def to_bytes(self) -> bytes:
        return _VNET_HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                              self.csum_start, self.csum_offset)

    @property
    def is_gso(self) -> bool:
        return self.gso_type != VIRTIO_NET_HDR_GSO_NONE


# -- checksums ------------------------------------------------------------------------------

def _ones_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The ones'-complement sum of ``data`` as 16-bit big-endian words, folded to 16 bits.

    2**16 is 1 modulo 65535, so the sum of the words is the number the bytes
    spell, modulo 65535: one C-speed conversion instead of a loop per word.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = int.from_bytes(data, "big") + start
    folded = total % 0xFFFF
    return 0xFFFF if folded == 0 and total else folded


def _pseudo_sum(packet: bytes | bytearray | memoryview, version: int, proto: int, length: int) -> int:
    """The folded pseudo-header sum of ``packet``'s addresses for a transport segment of ``length`` bytes."""
    addresses = packet[12:20] if version == 4 else packet[8:40]
    return _ones_sum(addresses, proto + length)


def _set_ipv4_header_checksum(packet: bytearray, header_len: int) -> None:
    packet[10:12] = b"\0\0"
    packet[10:12] = _U16.pack(~_ones_sum(bytes(packet[:header_len])) & 0xFFFF)


def checksum_field(packet: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """``(version, transport offset, checksum field offset)`` of a TCP/UDP packet; OffloadError otherwise.

    The transport header must follow the IP header directly (IPv6 without
    extension headers).
    """
    n = len(packet)
    if n < 20:
        raise OffloadError("offload_malformed", f"a packet of {n} bytes has no IP header")
    version = packet[0] >> 4
    if version == 4:
        start = (packet[0] & 0x0F) * 4
        proto = packet[9]
        if start < 20 or (packet[6] & 0x3F) or packet[7]:  # a fragment has no whole transport header
            raise OffloadError("offload_malformed", "an IPv4 fragment or a bad header length")
    elif version == 6:
        start, proto = _IPV6_HEADER, packet[6]
    else:
        raise OffloadError("offload_malformed", f"IP version {version}")
    if proto == _TCP:
        at = start + _TCP_CHECKSUM_AT
    elif proto == _UDP:
        at = start + _UDP_CHECKSUM_AT
    else:
        raise OffloadError("offload_not_tcp_udp", f"transport protocol {proto}")
    if at + 2 > n:
        raise OffloadError("offload_malformed", f"a packet of {n} bytes ends inside its transport header")
    return version, start, at


def complete_checksum(packet: bytes | bytearray | memoryview) -> bytes:
    """``packet`` (a PartialPacket's bytes) with its TCP/UDP checksum computed in full.

    The software path, for a receiver that cannot hand the work to its kernel.
    """
    _, start, at = checksum_field(packet)
    out = bytearray(packet)
    value = ~_ones_sum(memoryview(out)[start:]) & 0xFFFF  # the field already holds the pseudo-header sum
    if value == 0 and at == start + _UDP_CHECKSUM_AT:
        value = 0xFFFF  # UDP: 0 means "no checksum"
    out[at:at + 2] = _U16.pack(value)
    return bytes(out)


def completed(packets: Iterable[bytes]) -> Coalesced:
    """What a device without offloads must get: each packet alone, a PartialPacket's checksum completed.

    The counterpart of :func:`coalesce`, refusing what it refuses.
    """
    frames: list[bytes] = []
    refused: dict[str, int] = {}
    for packet in packets:
        if type(packet) is not PartialPacket:
            frames.append(packet)
            continue
        try:
            frames.append(complete_checksum(packet))
        except OffloadError as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
    return Coalesced(frames=frames, packets_in_frames=len(frames), refused=refused)


def _completed_in_place(packet: bytearray, csum_start: int, csum_offset: int) -> bytes:
    """What the kernel would do for NEEDS_CSUM at an arbitrary offset: sum from ``csum_start``, store at +offset."""
    at = csum_start + csum_offset
    if csum_start >= len(packet) or at + 2 > len(packet):
        raise OffloadError("offload_malformed", f"checksum at {csum_start}+{csum_offset} outside {len(packet)} bytes")
    value = ~_ones_sum(memoryview(packet)[csum_start:]) & 0xFFFF
    if value == 0 and csum_offset == _UDP_CHECKSUM_AT:
        value = 0xFFFF  # UDP: 0 means "no checksum" (and is not allowed at all over IPv6)
    packet[at:at + 2] = _U16.pack(value)
    return bytes(packet)


# -- the read side: frames to packets ----------------------------------------------------------

def split_frame(frame: bytes | bytearray | memoryview) -> list[bytes]:
    """The packets one VNET_HDR frame carries: one, or a GSO super-frame's segments.

    A packet whose checksum the kernel left partial comes back as a
    :class:`PartialPacket` when the receiver can find its checksum field
    (module docstring), else completed here.
    """
    if len(frame) <= VNET_HDR_LEN:
        raise OffloadError("offload_malformed", f"a frame of {len(frame)} bytes carries no packet")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _VNET_HDR.unpack_from(frame)
    packet = memoryview(frame)[VNET_HDR_LEN:]
    needs_csum = bool(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        if not needs_csum:
            return [frame[VNET_HDR_LEN:] if isinstance(frame, bytes) else bytes(packet)]
        if _is_plain_partial(packet, csum_start, csum_offset):
            return [PartialPacket(packet)]
        return [_completed_in_place(bytearray(packet), csum_start, csum_offset)]
    if gso_type in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4):
        if not needs_csum or gso_size == 0:
            raise OffloadError("offload_malformed", f"GSO type {gso_type} without a partial checksum or a size")
        return _segments(packet, gso_type, gso_size, csum_start)
    raise OffloadError("offload_unknown_gso", f"GSO type {gso_type}")


def _is_plain_partial(packet: memoryview, csum_start: int, csum_offset: int) -> bool:
    """Whether the kernel's checksum field is where :func:`checksum_field` would find it."""
    try:
        _, start, at = checksum_field(packet)
    except OffloadError:
        return False
    return start == csum_start and at == csum_start + csum_offset


def _fold(total: int) -> int:
    """A ones'-complement sum of a few 16-bit words, folded to 16 bits (integer work, no bytes)."""
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _segments(packet: memoryview, gso_type: int, gso_size: int, csum_start: int) -> list[bytes]:
    """Cut a GSO frame as the kernel would: per segment only lengths, IPv4 ID, TCP seq and flags change.

    Both checksums are updated from sums taken once per frame: the IPv4
    header's without its length and ID, the pseudo-header's without its length.
    """
    version = packet[0] >> 4 if packet else 0
    tcp = gso_type != VIRTIO_NET_HDR_GSO_UDP_L4
    if tcp and version != (6 if gso_type == VIRTIO_NET_HDR_GSO_TCPV6 else 4):
        raise OffloadError("offload_malformed", f"GSO type {gso_type} on an IPv{version} packet")
    if version not in (4, 6) or not _is_plain_partial(packet, csum_start, _TCP_CHECKSUM_AT if tcp else _UDP_CHECKSUM_AT):
        raise OffloadError("offload_malformed", "a GSO frame whose transport header is not where expected")
    l4_header = (packet[csum_start + 12] >> 4) * 4 if tcp else 8
    header_len = csum_start + l4_header
    if (tcp and l4_header < 20) or header_len > len(packet):
        raise OffloadError("offload_malformed", "a GSO frame whose transport header is cut short")
    if header_len + gso_size > _MAX_IP_LENGTH:
        raise OffloadError("offload_malformed", f"gso_size {gso_size} after {header_len} header bytes")
    header = bytearray(packet[:header_len])
    payload = packet[header_len:]
    if not payload:
        raise OffloadError("offload_malformed", "a GSO frame without payload")
    proto = _TCP if tcp else _UDP
    pseudo = _pseudo_sum(header, version, proto, 0)
    check_at = csum_start + (_TCP_CHECKSUM_AT if tcp else _UDP_CHECKSUM_AT)
    seq = _U32.unpack_from(header, csum_start + 4)[0] if tcp else 0
    flags = header[csum_start + 13] if tcp else 0
    if version == 4:
        ip_id = _U16.unpack_from(header, 4)[0]
        header[2:6] = b"\0\0\0\0"
        header[10:12] = b"\0\0"
        ip_sum = _ones_sum(bytes(header[:csum_start]))  # without length, ID and checksum
    pack_u16, pack_u32 = _U16.pack_into, _U32.pack_into
    out: list[bytes] = []
    total = len(payload)
    offset = 0
    while offset < total:
        chunk = payload[offset:offset + gso_size]
        last = offset + gso_size >= total
        segment_len = header_len + len(chunk)
        l4_len = segment_len - csum_start
        if version == 4:
            ident = (ip_id + len(out)) & 0xFFFF
            pack_u16(header, 2, segment_len)
            pack_u16(header, 4, ident)
            pack_u16(header, 10, ~_fold(ip_sum + segment_len + ident) & 0xFFFF)
        else:
            pack_u16(header, 4, segment_len - _IPV6_HEADER)
        if tcp:
            pack_u32(header, csum_start + 4, (seq + offset) & 0xFFFFFFFF)
            seg_flags = flags if last else flags & ~(_TCP_FIN | _TCP_PSH)
            header[csum_start + 13] = seg_flags & ~_TCP_CWR if offset else seg_flags
        else:
            pack_u16(header, csum_start + 4, l4_len)
        pack_u16(header, check_at, _fold(pseudo + l4_len))
        out.append(PartialPacket(header + chunk))
        offset += gso_size
    return out


# -- the write side: packets to frames ---------------------------------------------------------

@attrs.frozen
class Coalesced:
    """What :func:`coalesce` (or :func:`completed`) made of a batch: the frames to write, the packets refused by reason."""

    frames: list[bytes]
    packets_in_frames: int
    refused: dict[str, int]


@attrs.define
class _Group:
    """Consecutive TCP segments of one flow, to leave as one GSO frame."""

    first: bytes
    payloads: list[memoryview]
    header_len: int
    gso_size: int
    next_seq: int
    psh: bool

    @property
    def closed(self) -> bool:
        """A PSH, or a segment shorter than ``gso_size``, ends the frame (the kernel cuts only the last short)."""
        return self.psh or len(self.payloads[-1]) < self.gso_size


def coalesce(packets: Iterable[bytes], *, max_segments: int) -> Coalesced:
    """The frames to write for ``packets`` in order, gluing in-order TCP PartialPackets of one flow.

    A complete packet leaves alone behind an empty header; a PartialPacket
    leaves with NEEDS_CSUM, glued to the segments before it when it continues
    their flow exactly (the rules in :func:`_joins`), at most ``max_segments``
    to a frame.  A PartialPacket whose checksum field cannot be found is
    refused and counted, never written.
    """
    frames: list[bytes | _Group] = []
    open_groups: dict[bytes, _Group] = {}
    refused: dict[str, int] = {}
    carried = 0
    for packet in packets:
        if type(packet) is not PartialPacket:
            frames.append(VNET_HDR_EMPTY + packet)
            carried += 1
            continue
        n = len(packet)
        if n >= 40 and packet[0] == 0x45 and packet[9] == _TCP and not (packet[6] & 0x3F or packet[7]):
            start, key = 20, packet[12:24]  # the common case, inline: addresses and ports
        elif n >= 60 and packet[0] >> 4 == 6 and packet[6] == _TCP:
            start, key = _IPV6_HEADER, packet[8:44]
        else:
            try:
                _, start, at = checksum_field(packet)
            except OffloadError as exc:
                refused[exc.reason] = refused.get(exc.reason, 0) + 1
                continue
            carried += 1
            frames.append(_single_partial(packet, start, at))  # UDP, or TCP behind IPv4 options: alone
            continue
        carried += 1
        tcp_len = (packet[start + 12] >> 4) * 4
        header_len = start + tcp_len
        flags = packet[start + 13]
        payload_len = n - header_len
        if tcp_len < 20 or payload_len <= 0 or flags & ~(_TCP_ACK | _TCP_PSH) or not flags & _TCP_ACK:
            frames.append(_single_partial(packet, start, start + _TCP_CHECKSUM_AT))  # SYN, FIN, RST, URG, bare ACK
            continue
        seq = _U32.unpack_from(packet, start + 4)[0]
        psh = bool(flags & _TCP_PSH)
        group = open_groups.get(key)
        if group is not None and _joins(group, packet, header_len, seq, payload_len, max_segments):
            group.payloads.append(memoryview(packet)[header_len:])
            group.next_seq = (seq + payload_len) & 0xFFFFFFFF
            group.psh = psh
            continue
        group = open_groups[key] = _Group(
            first=packet, payloads=[memoryview(packet)[header_len:]], header_len=header_len, gso_size=payload_len,
            next_seq=(seq + payload_len) & 0xFFFFFFFF, psh=psh,
        )
        frames.append(group)
    return Coalesced(frames=[_frame_of(f) for f in frames], packets_in_frames=carried, refused=refused)


def _joins(group: _Group, packet: bytes, header_len: int, seq: int, payload_len: int, max_segments: int) -> bool:
    """Whether ``packet`` continues ``group``'s segments as the kernel's own segmentation would have cut them.

    Same flow (the caller's key) and the same headers except the lengths,
    IPv4 ID and checksums, the sequence number where the last segment ended;
    every segment but the last exactly ``gso_size`` long; a PSH ends the frame.
    """
    if (group.closed or header_len != group.header_len or seq != group.next_seq
            or payload_len > group.gso_size or len(group.payloads) >= max_segments
            or header_len + len(group.payloads) * group.gso_size + payload_len > _MAX_IP_LENGTH):
        return False
    a = group.first
    if packet[0] >> 4 == 4:  # TOS; DF and fragment fields, TTL, protocol (addresses and ports: the key)
        ip_len = 20
        if a[1] != packet[1] or a[6:10] != packet[6:10]:
            return False
    else:  # traffic class and flow label; next header and hop limit
        ip_len = _IPV6_HEADER
        if a[0:4] != packet[0:4] or a[6:8] != packet[6:8]:
            return False
    # Acknowledgement number and data offset; flags but PSH; window; options (URG is never glued,
    # so the urgent pointer means nothing and the first segment's is kept, as the kernel's GSO does).
    return (a[ip_len + 8:ip_len + 13] == packet[ip_len + 8:ip_len + 13]
            and (a[ip_len + 13] | _TCP_PSH) == (packet[ip_len + 13] | _TCP_PSH)
            and a[ip_len + 14:ip_len + 16] == packet[ip_len + 14:ip_len + 16]
            and (header_len == ip_len + 20 or a[ip_len + 20:header_len] == packet[ip_len + 20:header_len]))


@functools.cache
def _partial_header(csum_start: int, csum_offset: int) -> bytes:
    """The virtio header of one packet whose checksum the kernel completes (few distinct values: cached)."""
    return _VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, csum_start, csum_offset)


def _single_partial(packet: bytes, start: int, at: int) -> bytes:
    return _partial_header(start, at - start) + packet


def _frame_of(item: bytes | _Group) -> bytes:
    if isinstance(item, bytes):
        return item
    first = item.first
    version = first[0] >> 4
    start = (first[0] & 0x0F) * 4 if version == 4 else _IPV6_HEADER
    if len(item.payloads) == 1:
        return _single_partial(first, start, start + _TCP_CHECKSUM_AT)
    header = bytearray(first[:item.header_len])
    total = item.header_len + sum(map(len, item.payloads))
    if version == 4:
        header[2:4] = _U16.pack(total)
        _set_ipv4_header_checksum(header, start)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    else:
        header[4:6] = _U16.pack(total - _IPV6_HEADER)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6
    if item.psh:
        header[start + 13] |= _TCP_PSH
    check_at = start + _TCP_CHECKSUM_AT
    header[check_at:check_at + 2] = _U16.pack(_pseudo_sum(header, version, _TCP, total - start))
    vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=gso_type, hdr_len=item.header_len,
                      gso_size=item.gso_size, csum_start=start, csum_offset=_TCP_CHECKSUM_AT)
    return b"".join([vnet.to_bytes(), header, *item.payloads])

