"""The proxy ARP announcer's frame and errors (drivers/announce.py); the kernel side is in
tests/integration/test_announce_netns.py.

Determinism rules: the frame tests are pure; the error tests touch nothing but a read-only
netlink lookup of this machine's links, or a socket opener replaced by a stub.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest
import trio

from jvpn_trio.drivers import announce
from jvpn_trio.drivers.announce import (
    ARP_FRAME_LEN,
    ARPOP_REPLY,
    ARPOP_REQUEST,
    AnnounceError,
    Announcer,
    AnnouncerStatistics,
    gratuitous_arp_frame,
    leftover_entries,
    open_announcer,
)

MAC = bytes.fromhex("020000c0ffee")
ADDRESS = ipaddress.IPv4Address("10.66.0.2")


def test_a_gratuitous_arp_request_byte_for_byte() -> None:
    expected = [
        "ffffffffffff",  # Ethernet destination: broadcast
        "020000c0ffee",  # Ethernet source: us
        "0806",  # EtherType: ARP
        "0001",  # hardware type: Ethernet
        "0800",  # protocol type: IPv4
        "06",  # hardware address length
        "04",  # protocol address length
        "0001",  # operation: request
        "020000c0ffee",  # sender hardware address: us
        "0a420002",  # sender protocol address: 10.66.0.2
        "000000000000",  # target hardware address: none
        "0a420002",  # target protocol address: the same, 10.66.0.2
    ]
    assert gratuitous_arp_frame(MAC, ADDRESS, op=ARPOP_REQUEST) == bytes.fromhex("".join(expected))


def test_the_frame_field_by_field_against_the_arp_layout() -> None:
    for op, target_mac in ((ARPOP_REQUEST, b"\x00" * 6), (ARPOP_REPLY, MAC)):
        frame = gratuitous_arp_frame(MAC, ADDRESS, op=op)
        assert len(frame) == ARP_FRAME_LEN == 14 + 28
        assert frame[0:6] == b"\xff" * 6  # Ethernet destination: broadcast
        assert frame[6:12] == MAC  # Ethernet source
        assert struct.unpack("!H", frame[12:14]) == (0x0806,)  # EtherType ARP
        assert struct.unpack("!HHBBH", frame[14:22]) == (1, 0x0800, 6, 4, op)  # htype, ptype, hlen, plen, oper
        assert frame[22:28] == MAC  # sender hardware address
        assert frame[28:32] == ADDRESS.packed  # sender protocol address
        assert frame[32:38] == target_mac  # target hardware address: none in a request, ours in a reply
        assert frame[38:42] == ADDRESS.packed  # target protocol address = sender's: gratuitous


def test_the_reply_differs_from_the_request_only_in_op_and_target_mac() -> None:
    request = gratuitous_arp_frame(MAC, ADDRESS, op=ARPOP_REQUEST)
    reply = gratuitous_arp_frame(MAC, ADDRESS, op=ARPOP_REPLY)
    op, target_mac = slice(20, 22), slice(32, 38)
    assert (request[op], reply[op]) == (b"\x00\x01", b"\x00\x02")
    assert (request[target_mac], reply[target_mac]) == (bytes(6), MAC)  # RFC 2002 4.6: a reply names the MAC again
    for same in (slice(0, 20), slice(22, 32), slice(38, ARP_FRAME_LEN)):
        assert request[same] == reply[same]


@pytest.mark.parametrize(
    ("mac", "op", "expected"),
    [
        (MAC[:5], ARPOP_REQUEST, "6 bytes, got 5"),
        (MAC + b"\x00", ARPOP_REPLY, "6 bytes, got 7"),
        (MAC, 3, "ARP op 3 is neither"),
    ],
)
def test_a_bad_frame_request_is_a_value_error(mac: bytes, op: int, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        gratuitous_arp_frame(mac, ADDRESS, op=op)


async def test_a_missing_interface_is_one_line() -> None:
    with trio.fail_after(10):
        with pytest.raises(AnnounceError) as info:
            async with open_announcer("jvt-missing0"):
                pytest.fail("an announcer on a missing interface must not open")
    assert str(info.value) == "no interface named 'jvt-missing0' to announce addresses on"
    assert info.value.errno == errno.ENODEV


async def test_an_interface_without_ethernet_is_refused() -> None:
    with trio.fail_after(10):
        with pytest.raises(AnnounceError, match="lo is not an Ethernet interface"):
            async with open_announcer("lo"):
                pytest.fail("loopback answers no ARP")


async def test_no_privilege_for_raw_frames_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(_netns: str | None) -> socket.socket:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(announce, "_check_interface_sync", lambda _netns, _interface: None)
    monkeypatch.setattr(announce, "_open_packet_socket", denied)
    with trio.fail_after(10):
        with pytest.raises(AnnounceError) as info:
            async with open_announcer("eth9"):
                pytest.fail("an announcer that cannot send must not open")
    assert str(info.value) == "cannot send gratuitous ARP on eth9: permission denied (needs root or CAP_NET_RAW)"
    assert info.value.errno == errno.EPERM


def test_no_privilege_for_the_proxy_entry_is_one_line() -> None:
    class Refused(Exception):
        code = errno.EPERM

    error = announce._netlink_error(Refused("Operation not permitted"), "announcing 10.66.0.2 on eth9")
    assert str(error) == "announcing 10.66.0.2 on eth9: permission denied (needs root or CAP_NET_ADMIN)"
    assert error.errno == errno.EPERM


async def test_only_ipv4_is_announced_and_nothing_after_close() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stand_in:
        announcer = Announcer("eth9", sender=stand_in, netns=None, gratuitous_rounds=1, log=print)
        with pytest.raises(TypeError, match="only IPv4"):
            await announcer.announce(ipaddress.IPv6Address("fd66::2"))  # type: ignore[arg-type]
        await announcer.aclose()  # nothing announced: nothing to withdraw
        await announcer.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await announcer.announce(ADDRESS)
        assert announcer.statistics() == AnnouncerStatistics()


async def test_negative_rounds_are_refused_before_anything_opens() -> None:
    with pytest.raises(ValueError, match="gratuitous_rounds: -1"):
        async with open_announcer("eth9", gratuitous_rounds=-1):
            pytest.fail("must not open")


async def test_an_unknown_namespace_is_one_line() -> None:
    with trio.fail_after(10):
        with pytest.raises(AnnounceError, match="no network namespace named 'jvt-no-such-ns'"):
            async with open_announcer("eth0", netns="jvt-no-such-ns"):
                pytest.fail("must not open")


def test_only_our_leftover_proxy_entries_are_taken_back() -> None:
    listing = '[{"dst":"10.9.9.8","proxy":null},{"dst":"10.9.9.9","proxy":null,"protocol":"74"}]'
    assert leftover_entries(listing) == [ipaddress.IPv4Address("10.9.9.9")]
    assert leftover_entries("") == [] and leftover_entries("[]") == []
    with pytest.raises(ValueError):
        leftover_entries("{}")
    with pytest.raises(ValueError):
        leftover_entries("not json")
