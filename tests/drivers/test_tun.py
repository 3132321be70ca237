"""Tests for jvpn_trio.drivers.tun.

Determinism rules: the unprivileged tests drive a TunDevice over one end of a
SOCK_SEQPACKET socketpair (a TUN double that keeps packet boundaries) and
wait on readiness, never on time.  The root tests create every device in a
fresh network namespace named ``jvtu-<random>`` (entered with pyroute2's
``pushns`` for the test and removed in the finalizer), so their traffic never
leaves it; they talk to the kernel through the TUN only (ICMP echo to the
device's own address).  Every I/O test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import struct
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from jvpn_trio.core.offload import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR_EMPTY,
    VNET_HDR_LEN,
    PartialPacket,
    VnetHeader,
    complete_checksum,
)
from jvpn_trio.drivers.tun import TunDevice, TunError, _create_error, open_tun
from tests.core.test_offload import transport_checksum_ok

TIMEOUT = 5.0

_ROOT = os.geteuid() == 0
_HAVE_TUN = os.path.exists("/dev/net/tun")
_skip_unless_tun = pytest.mark.skipif(
    not (_ROOT and _HAVE_TUN),
    reason="needs root (CAP_NET_ADMIN), network namespaces and /dev/net/tun; CI runs these as root"
    if _HAVE_TUN else "needs /dev/net/tun (kernel TUN support)",
)


def needs_tun(func: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a test ``root`` and skip it, with the reason, unless we are root with /dev/net/tun."""
    return pytest.mark.root(_skip_unless_tun(func))


# -- helpers -------------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + payload


def echo_request(src: str, dst: str, ident: int, seq: int, payload: bytes = b"jvtu-ping") -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    return _ipv4(src, dst, 1, icmp, ident=seq)


def parse_echo_reply(packet: bytes) -> tuple[str, str, int, int, bytes] | None:
    """(src, dst, ident, seq, payload) of an IPv4 ICMP echo reply, None for anything else."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:]
    if icmp[0] != 0 or _checksum(icmp) != 0:
        return None
    ident, seq = struct.unpack("!HH", icmp[4:8])
    return socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]), ident, seq, icmp[8:]


def _rand() -> str:
    return secrets.token_hex(3)


@pytest.fixture
def in_netns() -> Iterator[str]:
    """Run the test inside a fresh network namespace (this thread only); remove it afterwards."""
    from pyroute2 import IPRoute, netns

    name = f"jvtu-{_rand()}"
    netns.create(name)
    try:
        netns.pushns(name)
        try:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            yield name
        finally:
            netns.popns()
    finally:
        netns.remove(name)


def _exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


async def _collect_replies(tun: TunDevice, count: int, *, max_packets: int = 64) -> tuple[list[tuple], list[int]]:
    replies: list[tuple] = []
    batches: list[int] = []
    while len(replies) < count:
        batch = await tun.read_batch(max_packets)
        batches.append(len(batch))
        for packet in batch:
            reply = parse_echo_reply(packet[VNET_HDR_LEN:] if tun.vnet_hdr else packet)
            if reply is not None:  # skip anything else the kernel says (IPv6 noise)
                replies.append(reply)
    return replies, batches


# -- unprivileged: header parsing, error messages, the driver over a TUN double -----------

def test_vnet_header_parse_round_trip() -> None:
    raw = struct.pack("=BBHHHH", 1, 5, 28, 1200, 20, 6) + b"payload"
    header = VnetHeader.from_bytes(raw)
    assert header == VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_UDP_L4,
                                hdr_len=28, gso_size=1200, csum_start=20, csum_offset=6)
    assert header.is_gso
    assert header.to_bytes() == raw[:VNET_HDR_LEN]
    assert VnetHeader.from_bytes(VNET_HDR_EMPTY + b"x").is_gso is False


def test_vnet_header_too_short_is_value_error() -> None:
    with pytest.raises(ValueError, match="shorter than a 10-byte"):
        VnetHeader.from_bytes(b"\x01\x05")


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b", "tun%d", "eth:0", "..", "tab\there"])
async def test_invalid_name_is_tunerror(name: str) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(TunError, match="invalid interface name") as info:
            async with open_tun(name, address="10.231.0.1", prefixlen=24, mtu=1400):
                pass  # pragma: no cover
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("args", "existed", "expected"), [
    ((errno.EPERM, "Operation not permitted"), False, "permission denied (not root / no CAP_NET_ADMIN)"),
    ((errno.EACCES, "Permission denied"), False, "permission denied (not root / no CAP_NET_ADMIN)"),
    ((errno.EBUSY, "Device or resource busy"), True, "name in use by another open TUN device"),
    ((errno.EINVAL, "Invalid argument"), True, "name in use by a non-TUN interface"),
    ((errno.ENOENT, "No such file or directory"), False, "no /dev/net/tun"),
    (("Interface name too long",), False, "Interface name too long"),
])
def test_create_error_messages(args: tuple[object, ...], existed: bool, expected: str) -> None:
    error = _create_error("jvtu0", OSError(*args) if isinstance(args[0], int) else Exception(*args),
                          existed=existed)
    assert expected in str(error)
    assert str(error).startswith("cannot create TUN device 'jvtu0': ")


@pytest.fixture
def fake_tun() -> Iterator[tuple[TunDevice, socket.socket]]:
    """A TunDevice over a SOCK_SEQPACKET socketpair: ``peer`` plays the kernel."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    peer.setblocking(False)
    device = TunDevice(ours, name="jvtu-fake", mtu=1400)
    yield device, peer
    device.close()
    peer.close()


async def test_read_batch_drains_queued_packets_without_waiting(fake_tun: tuple[TunDevice, socket.socket]) -> None:
    tun, peer = fake_tun
    with trio.fail_after(TIMEOUT):
        for i in range(10):
            peer.send(bytes([i]) * (i + 1))
        assert await tun.read_batch(4) == [bytes([i]) * (i + 1) for i in range(4)]
        assert await tun.read_batch(4) == [bytes([i]) * (i + 1) for i in range(4, 8)]
        assert await tun.read_batch(4) == [bytes([i]) * (i + 1) for i in range(8, 10)]
    stats = tun.statistics()
    assert (stats.packets_read, stats.bytes_read) == (10, sum(range(1, 11)))
    assert (stats.read_batches, stats.max_batch, stats.read_wakeups) == (3, 4, 0)


async def test_read_batch_waits_once_then_drains(fake_tun: tuple[TunDevice, socket.socket]) -> None:
    tun, peer = fake_tun
    batches: list[list[bytes]] = []

    async def reader() -> None:
        batches.append(await tun.read_batch(64))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(5):  # no checkpoint in between: all five are queued before the reader runs
                peer.send(b"p%d" % i)
    assert batches == [[b"p0", b"p1", b"p2", b"p3", b"p4"]]
    assert tun.statistics().read_wakeups == 1


async def test_write_nowait_counts_drops_and_write_waits(fake_tun: tuple[TunDevice, socket.socket]) -> None:
    tun, peer = fake_tun
    packet = b"x" * 1000
    with trio.fail_after(TIMEOUT):
        written = 0
        while tun.write_nowait(packet):  # the double's buffer fills up: EAGAIN -> False, never blocks
            written += 1
            assert written < 100_000
        assert tun.statistics().write_drops == 1

        async def drain_later() -> None:
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(written):
                peer.recv(2000)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_later)
            assert await tun.write(b"last") is True  # waits until the peer has read
        got = []
        while True:
            try:
                got.append(peer.recv(2000))
            except BlockingIOError:
                break
        assert got == [b"last"]
    stats = tun.statistics()
    assert (stats.packets_written, stats.bytes_written) == (written + 1, written * 1000 + 4)
    assert stats.write_drops == 1


async def test_cancelled_read_loses_nothing(fake_tun: tuple[TunDevice, socket.socket]) -> None:
    tun, peer = fake_tun
    with trio.fail_after(TIMEOUT):
        with trio.CancelScope() as scope:
            scope.cancel()
            peer.send(b"keep me")
            await tun.read_batch(8)  # cancelled before anything is taken off the device
        assert scope.cancelled_caught
        assert await tun.read_batch(8) == [b"keep me"]


async def test_closed_device_raises_closed_resource(fake_tun: tuple[TunDevice, socket.socket]) -> None:
    tun, _peer = fake_tun
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await tun.read_batch(8)

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await tun.aclose()
        with pytest.raises(trio.ClosedResourceError):
            tun.write_nowait(b"x")
        assert tun.fileno() == -1 and tun.closed


# -- root: real TUN devices inside a throwaway namespace ----------------------------------

@needs_tun
async def test_echo_request_gets_kernel_reply(in_netns: str) -> None:
    name = f"jvtu{_rand()}"
    with trio.fail_after(TIMEOUT):
        async with open_tun(name, address="10.231.0.1", prefixlen=24, mtu=1400) as tun:
            assert (tun.name, tun.mtu, tun.vnet_hdr) == (name, 1400, False)
            assert not tun.ipv6_disabled  # IPv6 stays on (the tunnel carries it), without autoconfiguration
            assert not os.get_blocking(tun.fileno())
            assert tun.write_nowait(echo_request("10.231.0.2", "10.231.0.1", ident=0x4A56, seq=1))
            replies, _ = await _collect_replies(tun, 1)
    assert replies == [("10.231.0.1", "10.231.0.2", 0x4A56, 1, b"jvtu-ping")]
    stats = tun.statistics()
    assert stats.packets_written == 1 and stats.packets_read >= 1 and stats.write_drops == 0


@needs_tun
async def test_read_batch_returns_many_replies_per_wakeup(in_netns: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_tun(f"jvtu{_rand()}", address="10.231.0.1", prefixlen=24, mtu=1400) as tun:
            for seq in range(16):  # the kernel answers each write before os.write returns
                assert tun.write_nowait(echo_request("10.231.0.2", "10.231.0.1", ident=7, seq=seq))
            replies, batches = await _collect_replies(tun, 16, max_packets=5)
    assert sorted(r[3] for r in replies) == list(range(16))
    assert max(batches) == 5 and all(b <= 5 for b in batches)
    assert len(batches) <= 5  # 16 replies (plus maybe one early IPv6 packet) in batches of 5
    assert tun.statistics().max_batch == 5


@needs_tun
async def test_device_disappears_after_exit(in_netns: str) -> None:
    name = f"jvtu{_rand()}"
    with trio.fail_after(TIMEOUT):
        async with open_tun(name, address=None, prefixlen=24, mtu=1280) as tun:
            assert _exists(name)
            fd = tun.fileno()
        assert not _exists(name)
        with pytest.raises(OSError):
            os.fstat(fd)  # the fd is closed too


@needs_tun
async def test_name_in_use_is_tunerror(in_netns: str) -> None:
    name = f"jvtu{_rand()}"
    with trio.fail_after(TIMEOUT):
        async with open_tun(name, address="10.231.0.1", prefixlen=24, mtu=1400):
            with pytest.raises(TunError, match="name in use by another open TUN device"):
                async with open_tun(name, address="10.231.1.1", prefixlen=24, mtu=1400):
                    pass  # pragma: no cover
        with pytest.raises(TunError, match="name in use by a non-TUN interface"):
            async with open_tun("lo", address=None, prefixlen=24, mtu=1400):
                pass  # pragma: no cover


@needs_tun
async def test_bad_configuration_removes_the_device(in_netns: str) -> None:
    name = f"jvtu{_rand()}"
    with trio.fail_after(TIMEOUT):
        with pytest.raises(TunError, match="mtu 20 is out of range"):
            async with open_tun(name, address=None, prefixlen=24, mtu=20):
                pass  # pragma: no cover
        with pytest.raises(TunError, match="bad IPv4 address/prefix"):
            async with open_tun(name, address="10.231.0.1", prefixlen=33, mtu=1400):
                pass  # pragma: no cover
    assert not _exists(name)


@needs_tun
async def test_vnet_hdr_frames_are_cut_into_packets(in_netns: str) -> None:
    """With offloads the device hands over frames; read_batch returns the packets they carry."""
    with trio.fail_after(TIMEOUT):
        async with open_tun(f"jvtu{_rand()}", address="10.231.0.1", prefixlen=24, mtu=1400,
                            vnet_hdr=True) as tun:
            assert tun.vnet_hdr and tun.offload_flags != 0
            assert tun.write_nowait(echo_request("10.231.0.2", "10.231.0.1", ident=9, seq=3))
            packet = b""
            while parse_echo_reply(packet) is None:
                (packet, *_rest) = await tun.read_batch(1)
            assert type(packet) is bytes  # ICMP: nothing for the receiver to complete

            # One UDP_SEGMENT send routed into the TUN arrives as one GSO frame when USO is on.
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.sendmsg([b"s" * 12_000], [(socket.IPPROTO_UDP, 103, struct.pack("=H", 1200))], 0,
                           ("10.231.0.2", 9))
            finally:
                udp.close()
            segments: list[bytes] = []
            while sum(len(p) - 28 for p in segments) < 12_000:
                segments.extend(p for p in await tun.read_batch(64) if len(p) > 28
                                and p[0] >> 4 == 4 and p[9] == 17)
    assert [len(p) - 28 for p in segments] == [1200] * 10
    assert all(type(p) is PartialPacket for p in segments)  # checksum offload: left to the receiver
    assert all(transport_checksum_ok(complete_checksum(p)) for p in segments)
    if tun.offload_flags & 0x20:  # TUN_F_USO4 accepted: the kernel did not segment
        assert tun.statistics().gso_frames_read == 1 and tun.statistics().segments_read >= 10
    else:  # pragma: no cover - kernels before 6.2
        assert tun.statistics().gso_frames_read == 0


@needs_tun
async def test_without_cap_net_admin_the_error_says_so(in_netns: str) -> None:
    """A child that dropped CAP_NET_ADMIN from its bounding set and exec'd gets the one-line message."""
    name = f"jvtu{_rand()}"
    script = textwrap.dedent(f"""
        import trio
        from jvpn_trio.drivers.tun import TunError, open_tun
        async def main():
            try:
                async with open_tun({name!r}, address=None, prefixlen=24, mtu=1400):
                    print("created")
            except TunError as exc:
                print(exc)
        trio.run(main)
    """)
    # prctl(PR_CAPBSET_DROP=24, CAP_NET_ADMIN=12), then exec: root keeps only its bounding set.
    dropper = ("import ctypes, os, sys; ctypes.CDLL(None, use_errno=True).prctl(24, 12, 0, 0, 0); "
               "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])")
    with trio.fail_after(30):
        result = await trio.run_process([sys.executable, "-c", dropper, script], capture_stdout=True,
                                        capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == (
        f"cannot create TUN device {name!r}: permission denied (not root / no CAP_NET_ADMIN)")


@needs_tun
async def test_refused_packets_are_counted_not_raised(in_netns: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_tun(f"jvtu{_rand()}", address="10.231.0.1", prefixlen=24, mtu=1400) as tun:
            assert tun.write_nowait(b"\x00" * 20) is False  # not an IP packet: EINVAL
            assert await tun.write(b"") is False
            assert tun.write_nowait(echo_request("10.231.0.2", "10.231.0.1", ident=1, seq=1))
    stats = tun.statistics()
    assert dict(stats.write_errors) == {"EINVAL": 2}
    assert (stats.packets_written, stats.write_drops) == (1, 0)


@needs_tun
async def test_deleted_device_is_tunerror(in_netns: str) -> None:
    from pyroute2 import IPRoute

    name = f"jvtu{_rand()}"
    with trio.fail_after(TIMEOUT):
        async with open_tun(name, address="10.231.0.1", prefixlen=24, mtu=1400) as tun:
            with IPRoute() as ipr:
                ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
            with pytest.raises(TunError, match="was detached or deleted"):
                await tun.read_batch(4)
            with pytest.raises(TunError, match="was detached or deleted"):
                tun.write_nowait(echo_request("10.231.0.2", "10.231.0.1", ident=1, seq=1))


# -- IPv6 on the TUN (root) ------------------------------------------------------------------------


def _inet6_addresses(name: str) -> list[str]:
    """The IPv6 addresses of ``name`` in this thread's namespace (/proc/thread-self: not the process's)."""
    with open("/proc/thread-self/net/if_inet6", encoding="ascii") as table:
        rows = [line.split() for line in table]
    return [row[0] for row in rows if row[-1] == name]


def _icmp6_echo(src: str, dst: str, *, ident: int, seq: int) -> bytes:
    """An ICMPv6 echo request with its checksum (over the IPv6 pseudo-header)."""
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    body = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"jvtu-ping6"
    pseudo = s + d + struct.pack("!I3xB", len(body), 58) + body
    if len(pseudo) % 2:
        pseudo += b"\0"
    total = sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    body = body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
    return struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + s + d + body


@needs_tun
async def test_ipv6_stays_on_without_autoconfiguration_and_answers(in_netns: str) -> None:
    from jvpn_trio.drivers.routes import set_tun_address

    name = f"jvtu{_rand()}"
    with trio.fail_after(TIMEOUT):
        async with open_tun(name, address="10.231.0.1", prefixlen=24, mtu=1400) as tun:
            assert not tun.ipv6_disabled
            assert _inet6_addresses(name) == []  # no link-local address: no router solicitation into the tunnel
            await set_tun_address(name, "fd6a:7670::1", 64, 1400, netns=in_netns)
            assert tun.write_nowait(_icmp6_echo("fd6a:7670::2", "fd6a:7670::1", ident=0x6A76, seq=1))
            reply = b""
            while not (reply[:1] == b"\x60" and reply[6] == 58 and reply[40] == 129):  # an ICMPv6 echo reply
                (reply, *_) = await tun.read_batch(1)
    assert socket.inet_ntop(socket.AF_INET6, reply[8:24]) == "fd6a:7670::1"
    assert socket.inet_ntop(socket.AF_INET6, reply[24:40]) == "fd6a:7670::2"


@needs_tun
async def test_ipv6_can_be_switched_off(in_netns: str) -> None:
    async with open_tun(f"jvtu{_rand()}", address=None, prefixlen=0, mtu=1400, ipv6=False) as tun:
        assert tun.ipv6_disabled
