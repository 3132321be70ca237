"""core/offload.py: super-frames cut into packets the kernel would have sent, and glued back.

Checksums are checked against a word-by-word reference written here, not
against the module's own arithmetic.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jvpn_trio.core.offload import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR_EMPTY,
    VNET_HDR_LEN,
    OffloadError,
    PartialPacket,
    VnetHeader,
    checksum_field,
    coalesce,
    complete_checksum,
    split_frame,
)

SRC4, DST4 = ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Address("10.0.0.2")
SRC6, DST6 = ipaddress.IPv6Address("fd00::1"), ipaddress.IPv6Address("fd00::2")
ACK, PSH, FIN, SYN, CWR = 0x10, 0x08, 0x01, 0x02, 0x80


def reference_sum(data: bytes) -> int:
    """RFC 1071, one word at a time."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def transport_checksum_ok(packet: bytes) -> bool:
    version = packet[0] >> 4
    start = (packet[0] & 0xF) * 4 if version == 4 else 40
    proto = packet[9] if version == 4 else packet[6]
    addrs = packet[12:20] if version == 4 else packet[8:40]
    l4 = packet[start:]
    pseudo = addrs + struct.pack("!xBH", proto, len(l4)) if version == 4 else addrs + struct.pack("!I3xB", len(l4), proto)
    return reference_sum(pseudo + l4) == 0xFFFF


def ipv4_header_ok(packet: bytes) -> bool:
    return reference_sum(packet[: (packet[0] & 0xF) * 4]) == 0xFFFF


def ip_header(version: int, proto: int, l4_len: int, *, ident: int = 7, ttl: int = 64, options: bytes = b"",
              src: ipaddress.IPv4Address = SRC4, dst: ipaddress.IPv4Address = DST4) -> bytearray:
    if version == 4:
        ihl = 5 + len(options) // 4
        h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + l4_len, ident, 0x4000, ttl, proto, 0,
                                  src.packed, dst.packed) + options)
        h[10:12] = struct.pack("!H", ~reference_sum(bytes(h)) & 0xFFFF)
        return h
    return bytearray(struct.pack("!IHBB16s16s", 0x60000000, l4_len, proto, ttl, SRC6.packed, DST6.packed))


def tcp_packet(version: int, seq: int, payload: bytes, *, flags: int = ACK, options: bytes = b"",
               ack: int = 1000, window: int = 512, partial: bool = False, sport: int = 40000,
               src: ipaddress.IPv4Address = SRC4, dst: ipaddress.IPv4Address = DST4) -> bytes:
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, 5201, seq, ack, (5 + len(options) // 4) << 4, flags, window, 0, 0)
                    + options) + payload
    packet = ip_header(version, 6, len(tcp), src=src, dst=dst) + tcp
    start = 20 if version == 4 else 40
    full = complete(bytes(packet), start, 16)
    if not partial:
        return full
    # Partial: the field holds the folded pseudo-header sum, as the kernel leaves it.
    addrs = packet[12:20] if version == 4 else packet[8:40]
    pseudo = reference_sum(bytes(addrs) + struct.pack("!HH", 6, len(tcp)))
    out = bytearray(full)
    out[start + 16:start + 18] = struct.pack("!H", pseudo)
    return PartialPacket(out)


def complete(packet: bytes, start: int, at: int) -> bytes:
    out = bytearray(packet)
    out[start + at:start + at + 2] = b"\0\0"
    version = out[0] >> 4
    addrs = out[12:20] if version == 4 else out[8:40]
    proto = out[9] if version == 4 else out[6]
    l4 = bytes(out[start:])
    value = ~reference_sum(bytes(addrs) + struct.pack("!HH", proto, len(l4)) + l4) & 0xFFFF
    out[start + at:start + at + 2] = struct.pack("!H", value)
    return bytes(out)


def super_frame(version: int, seq: int, payload: bytes, gso_size: int, *, flags: int = ACK | PSH,
                options: bytes = b"") -> bytes:
    """A TSO frame as the kernel hands it over: one header, the whole payload, a partial checksum."""
    packet = tcp_packet(version, seq, payload, flags=flags, options=options, partial=True)
    start = 20 if version == 4 else 40
    gso = VIRTIO_NET_HDR_GSO_TCPV4 if version == 4 else VIRTIO_NET_HDR_GSO_TCPV6
    header = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=gso, hdr_len=start + 20 + len(options),
                        gso_size=gso_size, csum_start=start, csum_offset=16)
    return header.to_bytes() + packet


def payload_of(packet: bytes) -> bytes:
    start = (packet[0] & 0xF) * 4 if packet[0] >> 4 == 4 else 40
    return packet[start + (packet[start + 12] >> 4) * 4:]


def seq_of(packet: bytes) -> int:
    start = (packet[0] & 0xF) * 4 if packet[0] >> 4 == 4 else 40
    return int(struct.unpack_from("!I", packet, start + 4)[0])


def flags_of(packet: bytes) -> int:
    start = (packet[0] & 0xF) * 4 if packet[0] >> 4 == 4 else 40
    return packet[start + 13]


TIMESTAMPS = bytes([1, 1, 8, 10]) + struct.pack("!II", 123, 456)


@settings(max_examples=60, deadline=None)
@given(version=st.sampled_from([4, 6]), size=st.integers(1, 6000), gso_size=st.integers(100, 1448),
       seq=st.integers(0, 2**32 - 1), options=st.sampled_from([b"", TIMESTAMPS]))
@example(version=6, size=254, gso_size=100, seq=4842, options=b"")  # its last segment's partial sum is complete
def test_a_tso_frame_becomes_the_segments_the_kernel_would_send(version: int, size: int, gso_size: int, seq: int,
                                                                   options: bytes) -> None:
    payload = bytes(i % 251 for i in range(size))
    segments = split_frame(super_frame(version, seq, payload, gso_size, flags=ACK | PSH | CWR, options=options))
    assert len(segments) == -(-size // gso_size)
    assert b"".join(payload_of(s) for s in segments) == payload
    for i, segment in enumerate(segments):
        assert type(segment) is PartialPacket
        assert seq_of(segment) == (seq + i * gso_size) % 2**32
        last = i == len(segments) - 1
        assert bool(flags_of(segment) & PSH) == last and bool(flags_of(segment) & CWR) == (i == 0)
        if version == 4:
            assert struct.unpack_from("!H", segment, 2)[0] == len(segment)
            assert struct.unpack_from("!H", segment, 4)[0] == 7 + i
            assert ipv4_header_ok(segment)
        else:
            assert struct.unpack_from("!H", segment, 4)[0] == len(segment) - 40
        assert transport_checksum_ok(complete_checksum(segment))
        # Partial until completed: it validates only where the pseudo-header sum happens to be the
        # whole checksum (about one segment in 65,536), and then completing it changes nothing.
        assert not transport_checksum_ok(segment) or bytes(complete_checksum(segment)) == bytes(segment)


@settings(max_examples=60, deadline=None)
@given(version=st.sampled_from([4, 6]), size=st.integers(1, 20000), gso_size=st.integers(200, 1448),
       options=st.sampled_from([b"", TIMESTAMPS]))
def test_glued_segments_cut_again_are_the_same_segments(version: int, size: int, gso_size: int,
                                                         options: bytes) -> None:
    payload = bytes(i % 253 for i in range(size))
    segments = split_frame(super_frame(version, 5, payload, gso_size, options=options))
    glued = coalesce(segments, max_segments=64)
    assert glued.packets_in_frames == len(segments) and glued.refused == {}
    again = [s for frame in glued.frames for s in split_again(frame)]
    assert [bytes(s) for s in again] == [bytes(s) for s in segments]


def split_again(frame: bytes) -> list[bytes]:
    header = VnetHeader.from_bytes(frame)
    if header.is_gso:
        return split_frame(frame)
    packet = frame[VNET_HDR_LEN:]
    return [PartialPacket(packet)] if header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM else [packet]


def test_segments_glue_into_one_frame_per_flow_and_keep_order() -> None:
    a = split_frame(super_frame(4, 100, bytes(4000), 1000))
    b = [tcp_packet(4, 9, b"x" * 10, partial=True, sport=40001)]  # another flow in between
    glued = coalesce([a[0], a[1], *b, a[2], a[3]], max_segments=64)
    headers = [VnetHeader.from_bytes(f) for f in glued.frames]
    assert [h.gso_type for h in headers] == [VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_NONE]
    assert headers[0].gso_size == 1000 and headers[0].hdr_len == 40
    assert split_frame(glued.frames[0]) == a


def test_complete_packets_are_never_glued_so_a_bad_checksum_stays_bad() -> None:
    good = [tcp_packet(4, 100 + 10 * i, b"y" * 10) for i in range(3)]
    bad = bytearray(good[1])
    bad[-1] ^= 0xFF
    glued = coalesce([good[0], bytes(bad), good[2]], max_segments=64)
    assert glued.frames == [VNET_HDR_EMPTY + good[0], VNET_HDR_EMPTY + bytes(bad), VNET_HDR_EMPTY + good[2]]


@pytest.mark.parametrize("flags", [ACK | SYN, ACK | FIN, 0x04, ACK | 0x20, SYN])
def test_control_segments_leave_alone(flags: int) -> None:
    first = tcp_packet(4, 100, b"a" * 10, partial=True)
    odd = tcp_packet(4, 110, b"b" * 10, flags=flags, partial=True)
    glued = coalesce([first, odd], max_segments=64)
    assert [VnetHeader.from_bytes(f).gso_type for f in glued.frames] == [VIRTIO_NET_HDR_GSO_NONE] * 2


@pytest.mark.parametrize("change", ["gap", "ttl", "window", "ack", "options", "longer", "after_short", "after_psh"])
def test_what_the_kernel_would_not_have_cut_is_not_glued(change: str) -> None:
    first = tcp_packet(4, 100, b"a" * 10, partial=True, options=TIMESTAMPS,
                       flags=ACK | PSH if change == "after_psh" else ACK)
    if change == "after_short":
        first = tcp_packet(4, 100, b"a" * 5, partial=True, options=TIMESTAMPS)
    seq = {"gap": 111, "after_short": 105}.get(change, 110)
    second = bytearray(tcp_packet(4, seq, b"b" * (11 if change == "longer" else 10), partial=True,
                                  options=TIMESTAMPS[:-1] + b"\x07" if change == "options" else TIMESTAMPS,
                                  window=1 if change == "window" else 512, ack=5 if change == "ack" else 1000))
    if change == "ttl":
        second[8] = 3
    glued = coalesce([first, PartialPacket(second)], max_segments=64)
    assert len(glued.frames) == 2


def test_frames_hold_at_most_max_segments_and_64_kib() -> None:
    segments = split_frame(super_frame(4, 0, bytes(1400 * 40), 1400))
    assert [VnetHeader.from_bytes(f).gso_size for f in coalesce(segments, max_segments=16).frames] == [1400] * 3
    # 50 full segments in a row: 46 fill one IPv4 packet to 64,440 bytes, a 47th would pass 65,535.
    big = split_frame(super_frame(4, 0, bytes(1400 * 40), 1400, flags=ACK))
    big += split_frame(super_frame(4, 1400 * 40, bytes(1400 * 10), 1400))
    frames = coalesce(big, max_segments=64).frames
    assert [len(f) - VNET_HDR_LEN for f in frames] == [40 + 46 * 1400, 40 + 4 * 1400]


def test_a_partial_udp_packet_leaves_with_its_checksum_offset() -> None:
    udp = struct.pack("!HHHH", 53, 5353, 8 + 4, 0) + b"abcd"
    packet = PartialPacket(ip_header(4, 17, len(udp)) + udp)
    (frame,) = coalesce([packet], max_segments=64).frames
    header = VnetHeader.from_bytes(frame)
    assert (header.flags, header.csum_start, header.csum_offset) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, 20, 6)


def test_a_udp_gso_frame_is_cut_with_a_udp_header_each() -> None:
    payload = bytes(range(250)) * 10
    udp = struct.pack("!HHHH", 53, 5353, 8 + len(payload), 0) + payload
    packet = ip_header(6, 17, len(udp)) + udp
    header = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_UDP_L4, hdr_len=48,
                        gso_size=1000, csum_start=40, csum_offset=6)
    segments = split_frame(header.to_bytes() + packet)
    assert [len(s) - 48 for s in segments] == [1000, 1000, 500]
    assert b"".join(s[48:] for s in segments) == payload
    for segment in segments:
        assert struct.unpack_from("!H", segment, 44)[0] == len(segment) - 40
        assert transport_checksum_ok(complete_checksum(segment))


def test_a_partial_packet_with_ipv6_extension_headers_is_completed_on_the_spot() -> None:
    pseudo = SRC6.packed + DST6.packed + struct.pack("!I3xB", 12, 17)
    udp = struct.pack("!HHHH", 53, 5353, 12, reference_sum(pseudo)) + b"abcd"  # the kernel's partial sum
    hop_by_hop = bytes([17, 0]) + bytes(6)
    packet = bytearray(struct.pack("!IHBB16s16s", 0x60000000, 8 + len(udp), 0, 64, SRC6.packed, DST6.packed))
    packet += hop_by_hop + udp
    header = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=48, csum_offset=6)
    (out,) = split_frame(header.to_bytes() + bytes(packet))
    assert type(out) is bytes
    assert reference_sum(pseudo + out[48:]) == 0xFFFF and out[:54] == packet[:54] and out[56:] == packet[56:]


@pytest.mark.parametrize("frame", [
    b"",
    VNET_HDR_EMPTY,
    VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=9, gso_size=100).to_bytes() + bytes(60),
    VnetHeader(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=100).to_bytes() + bytes(60),
    VnetHeader(flags=1, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=100, csum_start=20,
               csum_offset=16).to_bytes() + bytes(30),
    VnetHeader(flags=1, gso_type=VIRTIO_NET_HDR_GSO_TCPV6, gso_size=100, csum_start=20,
               csum_offset=16).to_bytes() + b"\x45" + bytes(59),
    VnetHeader(flags=1, csum_start=2000, csum_offset=16).to_bytes() + bytes(60),
])
def test_malformed_frames_raise_offload_error(frame: bytes) -> None:
    with pytest.raises(OffloadError):
        split_frame(frame)


@given(st.binary(max_size=200))
def test_no_bytes_make_split_or_coalesce_raise_anything_else(data: bytes) -> None:
    try:
        split_frame(data)
    except OffloadError:
        pass
    glued = coalesce([PartialPacket(data), data], max_segments=8)
    assert glued.packets_in_frames + sum(glued.refused.values()) == 2


def test_checksum_field_finds_tcp_and_udp_only() -> None:
    assert checksum_field(tcp_packet(4, 1, b"x")) == (4, 20, 36)
    assert checksum_field(tcp_packet(6, 1, b"x")) == (6, 40, 56)
    with pytest.raises(OffloadError):
        checksum_field(ip_header(4, 1, 8) + bytes(8))


def test_a_udp_checksum_that_sums_to_zero_is_sent_as_all_ones() -> None:
    """RFC 768 / RFC 8200: a computed UDP checksum of 0 goes on the wire as 0xFFFF, on both software paths."""
    pseudo = SRC6.packed + DST6.packed + struct.pack("!I3xB", 12, 17)
    body = bytearray(struct.pack("!HHHH", 53, 5353, 12, reference_sum(pseudo)) + b"\0\0\0\0")
    # The field holds the pseudo-header sum; choose the last two payload bytes so that the UDP
    # bytes then sum to 0xFFFF: the computed checksum is 0.
    body[10:12] = struct.pack("!H", 0xFFFF - reference_sum(bytes(body)))
    assert reference_sum(bytes(body)) == 0xFFFF
    hop_by_hop = bytes([17, 0]) + bytes(6)
    packet = struct.pack("!IHBB16s16s", 0x60000000, 8 + len(body), 0, 64, SRC6.packed, DST6.packed) + hop_by_hop
    header = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=48, csum_offset=6)
    (out,) = split_frame(header.to_bytes() + packet + bytes(body))
    assert out[54:56] == b"\xff\xff"
    plain = PartialPacket(struct.pack("!IHBB16s16s", 0x60000000, len(body), 17, 64, SRC6.packed, DST6.packed) + body)
    assert complete_checksum(plain)[46:48] == b"\xff\xff"
