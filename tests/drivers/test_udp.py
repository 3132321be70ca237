"""Tests for jvpn_trio.drivers.udp.

Determinism rules: unprivileged tests use loopback only, and wait on socket
readiness or ``wait_all_tasks_blocked``, never on time.  Error mapping that
the kernel only produces under special conditions (EPERM from an nft output
drop, ENOBUFS, a GSO refusal) is driven through a socket double whose
``sendto``/``sendmsg`` raise.  The root tests build everything in fresh
network namespaces named ``jvtu-<random>-*`` (link names ``jvtu<random>*``),
enter them with pyroute2's ``pushns`` only while creating sockets, and
remove them in the finalizer, so no packet leaves them.  Every I/O test runs
under ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import secrets
import socket
import struct
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from jvpn_trio.drivers import udp
from jvpn_trio.drivers.udp import (
    DEFAULT_RCVBUF_BYTES,
    IP_PKTINFO,
    IPV6_PKTINFO,
    IPV6_RECVPKTINFO,
    PATH_ERRNOS,
    UDP_SEGMENT,
    BatchSendResult,
    PathSocket,
    PathSocketError,
    SendResult,
    SendStatus,
    SourcedPort,
    UdpStatistics,
    combined_statistics,
    open_listener_socket,
    open_path_socket,
    pktinfo_cmsg,
    pktinfo_source,
    split_gro_buffer,
)

TIMEOUT = 5.0
#: ``<linux/if_addr.h>``: add an IPv6 address without duplicate address detection.
IFA_F_NODAD = 0x02
LOOPBACK = ("127.0.0.1", 0)

_skip_unless_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: network namespaces, veth, tc, SO_BINDTODEVICE/SO_MARK; CI runs these as root",
)


def needs_root(func: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a test ``root`` and skip it, with the reason, unless we are root."""
    return pytest.mark.root(_skip_unless_root(func))


def _rand() -> str:
    return secrets.token_hex(3)


async def _recv_exactly(sock: PathSocket, count: int, *, max_datagrams: int = 64) -> list[tuple[bytes, Any]]:
    got: list[tuple[bytes, Any]] = []
    while len(got) < count:
        got.extend(await sock.recv_batch(max_datagrams))
    assert len(got) == count
    return got


async def _recv_routed_exactly(sock: PathSocket, count: int, *, max_datagrams: int = 64) -> list[tuple[bytes, Any, Any]]:
    got: list[tuple[bytes, Any, Any]] = []
    while len(got) < count:
        got.extend(await sock.recv_batch_routed(max_datagrams))
    assert len(got) == count
    return got


# -- unprivileged: loopback ----------------------------------------------------------------

async def test_loopback_round_trip() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK) as server, open_path_socket(
                bind=LOOPBACK, device=None, fwmark=None) as client:
            assert client.send_nowait(b"ping", server.local_address) is SendResult.OK
            [(data, source)] = await server.recv_batch(16)
            assert (data, source) == (b"ping", client.local_address)
            assert await server.send(b"pong", source) is SendResult.OK
            assert await client.recv_batch(16) == [(b"pong", server.local_address)]
    stats = client.statistics()
    assert (stats.datagrams_out, stats.bytes_out, stats.datagrams_in, stats.bytes_in) == (1, 4, 1, 4)
    assert stats.send_errors == {} and stats.sends_would_block == 0


async def test_recv_batch_drains_queued_datagrams_up_to_max() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK) as server, open_listener_socket(LOOPBACK) as client:
            for i in range(10):
                assert client.send_nowait(b"%d" % i, server.local_address).ok
            sizes = [len(await server.recv_batch(4)) for _ in range(3)]
            assert sizes == [4, 4, 2]
    stats = server.statistics()
    assert (stats.datagrams_in, stats.recv_batches, stats.max_batch) == (10, 3, 4)
    assert stats.recv_wakeups == 0  # everything was queued: no wait was needed


async def test_recv_batch_waits_once_then_drains() -> None:
    batches: list[list[tuple[bytes, Any]]] = []
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK) as server, open_listener_socket(LOOPBACK) as client:
            async with trio.open_nursery() as nursery:
                async def receiver() -> None:
                    batches.append(await server.recv_batch(64))

                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                for i in range(8):  # no checkpoint in between: all eight queue before the receiver runs
                    client.send_nowait(b"d%d" % i, server.local_address)
    assert [d for d, _ in batches[0]] == [b"d%d" % i for i in range(8)]
    assert server.statistics().recv_wakeups == 1


async def test_ipv6_loopback_round_trip_with_gso() -> None:
    if not socket.has_ipv6:  # pragma: no cover
        pytest.skip("Python built without IPv6")
    segments = _segments(4, 1000, tail=10)
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(("::1", 0), family=socket.AF_INET6, gro=True) as server, \
                open_listener_socket(("::1", 0), family=socket.AF_INET6) as client:
            assert client.send_segments_nowait(segments, server.local_address).result.ok
            got = await _recv_exactly(server, 5)
    assert [d for d, _ in got] == segments
    assert got[0][1] == client.local_address  # (host, port): no flowinfo, no scope_id


async def test_ipv6_sources_are_host_and_port_without_gro() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(("::1", 0), family=socket.AF_INET6) as server, \
                open_listener_socket(("::1", 0), family=socket.AF_INET6) as client:
            assert client.local_address == ("::1", client.local_address[1])
            assert client.send_nowait(b"x", server.local_address).ok
            (got,) = await _recv_exactly(server, 1)
    assert got == (b"x", client.local_address)


async def test_ipv4_and_ipv6_wildcards_share_a_port() -> None:
    """IPV6_V6ONLY: ``[::]:P`` does not take IPv4, so ``0.0.0.0:P`` can listen beside it."""
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(("::", 0), family=socket.AF_INET6) as v6:
            port = v6.local_address[1]
            async with open_listener_socket(("0.0.0.0", port), family=socket.AF_INET) as v4, \
                    open_listener_socket(("127.0.0.1", 0)) as c4, \
                    open_listener_socket(("::1", 0), family=socket.AF_INET6) as c6:
                assert c4.send_nowait(b"four", ("127.0.0.1", port)).ok
                assert c6.send_nowait(b"six", ("::1", port)).ok
                (got4,) = await _recv_exactly(v4, 1)
                (got6,) = await _recv_exactly(v6, 1)
    assert got4 == (b"four", c4.local_address) and got6 == (b"six", c6.local_address)


# -- answering from the address a request reached (IP_PKTINFO / IPV6_PKTINFO) -----------------

def test_pktinfo_constants_are_the_linux_values() -> None:
    assert (IP_PKTINFO, IPV6_RECVPKTINFO, IPV6_PKTINFO) == (8, 49, 50)


def test_pktinfo_cmsg_layout() -> None:
    """in_pktinfo {ifindex 0, spec_dst = source, addr 0}; in6_pktinfo {addr = source, ifindex 0}."""
    assert pktinfo_cmsg("192.0.2.7") == (socket.IPPROTO_IP, 8, bytes(4) + bytes([192, 0, 2, 7]) + bytes(4))
    six = ipaddress.IPv6Address("2001:db8::7")
    assert pktinfo_cmsg("2001:db8::7") == (socket.IPPROTO_IPV6, 50, six.packed + bytes(4))


@pytest.mark.parametrize("host", ["192.0.2.7", "0.0.0.1", "2001:db8::7", "::1"])
def test_pktinfo_cmsg_and_source_round_trip(host: str) -> None:
    local = pktinfo_source(*pktinfo_cmsg(host))
    assert local is not None and ipaddress.ip_address(local) == ipaddress.ip_address(host)


def test_pktinfo_source_takes_spec_dst_and_ignores_anything_else() -> None:
    # A broadcast to 10.0.0.255 that reached interface 3, whose address is 10.0.0.1.
    received = struct.pack("=i4s4s", 3, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 255]))
    assert pktinfo_source(socket.IPPROTO_IP, IP_PKTINFO, received) == bytes([10, 0, 0, 1])
    assert pktinfo_source(socket.IPPROTO_IP, IP_PKTINFO, received[:11]) is None  # truncated
    assert pktinfo_source(socket.IPPROTO_IPV6, IPV6_PKTINFO, bytes(19)) is None
    assert pktinfo_source(socket.IPPROTO_UDP, IP_PKTINFO, received) is None  # another level
    assert pktinfo_source(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, bytes(20)) is None  # the option, not the cmsg


async def test_wildcard_listener_answers_from_the_address_it_was_reached_at() -> None:
    """Linux routes all of 127/8 to lo, so 127.0.0.2 is a second local address without root.

    A plain reply from the wildcard socket leaves from 127.0.0.1 (routing's
    choice for the client); the SourcedPort's leaves from 127.0.0.2.
    """
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(("0.0.0.0", 0)) as server, open_listener_socket(LOOPBACK) as client:
            assert server.pktinfo and not client.pktinfo
            port = server.local_address[1]
            for host in ("127.0.0.2", "127.0.0.1", "127.0.0.2"):
                assert client.send_nowait(b"hello", (host, port)).ok
            got = await _recv_routed_exactly(server, 3)
            assert {source for _, source, _ in got} == {client.local_address}
            replies = [reply for _, _, reply in got]
            assert all(isinstance(r, SourcedPort) and r.socket is server for r in replies)
            assert [r.source for r in replies] == ["127.0.0.2", "127.0.0.1", "127.0.0.2"]
            assert replies[0] is replies[2]  # one port per local address
            assert replies[0].send_nowait(b"sticky", client.local_address) is SendResult.OK
            assert await client.recv_batch(8) == [(b"sticky", ("127.0.0.2", port))]
            assert server.send_nowait(b"routed", client.local_address) is SendResult.OK
            assert await client.recv_batch(8) == [(b"routed", ("127.0.0.1", port))]
    stats = server.statistics()
    assert (stats.datagrams_in, stats.datagrams_out, stats.source_fallbacks) == (3, 2, 0)


async def test_bound_listener_answers_by_itself() -> None:
    """A socket bound to one address needs no pktinfo: routed receives name the socket itself."""
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(("127.0.0.2", 0)) as server, open_listener_socket(LOOPBACK) as client:
            assert not server.pktinfo
            client.send_nowait(b"x", server.local_address)
            assert await server.recv_batch_routed(8) == [(b"x", client.local_address, server)]


async def test_ipv6_wildcard_listener_names_the_address_it_was_reached_at() -> None:
    """Only ::1 is local without root; the root test below reaches a second IPv6 address."""
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(("::", 0), family=socket.AF_INET6) as server, \
                open_listener_socket(("::1", 0), family=socket.AF_INET6) as client:
            assert server.pktinfo
            port = server.local_address[1]
            assert client.send_nowait(b"six", ("::1", port)).ok
            [(data, source, reply)] = await server.recv_batch_routed(8)
            assert (data, source) == (b"six", client.local_address)
            assert isinstance(reply, SourcedPort) and reply.source == "::1"
            assert reply.send_nowait(b"back", source) is SendResult.OK
            assert await client.recv_batch(8) == [(b"back", ("::1", port))]


async def test_gro_gso_and_pktinfo_share_the_control_messages() -> None:
    """A GRO buffer's segments all name the address it reached, also those carried to the next batch,
    and a GSO reply from that address is one sendmsg carrying both UDP_SEGMENT and the pktinfo."""
    segments = _segments(6, 1000, tail=10)
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(("0.0.0.0", 0), gro=True) as server, \
                open_listener_socket(LOOPBACK, gro=True) as client:
            assert server.gro and server.pktinfo
            port = server.local_address[1]
            assert client.send_segments_nowait(segments, ("127.0.0.3", port)).result.ok
            got = await _recv_routed_exactly(server, 7, max_datagrams=4)
            assert [d for d, _, _ in got] == segments
            assert {(s, r.source) for _, s, r in got} == {(client.local_address, "127.0.0.3")}
            assert server.statistics().gro_buffers == 1
            assert got[0][2].send_segments_nowait(segments, client.local_address) == BatchSendResult(7, SendResult.OK)
            back = await _recv_exactly(client, 7)
    assert [d for d, _ in back] == segments and {s for _, s in back} == {("127.0.0.3", port)}
    stats = server.statistics()
    assert (stats.gso_sends, stats.gso_segments, stats.source_fallbacks) == (1, 7, 0)


async def test_sourced_ports_are_kept_per_address_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "MAX_SOURCED_PORTS", 2)
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.4", "127.0.0.2"]
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(("0.0.0.0", 0)) as server, open_listener_socket(LOOPBACK) as client:
            for host in hosts:
                client.send_nowait(b"x", (host, server.local_address[1]))
            replies = [r for _, _, r in await _recv_routed_exactly(server, len(hosts))]
    assert [r.source for r in replies] == hosts
    assert replies[1] is replies[2]  # still kept
    assert replies[0] is not replies[4]  # .2 was dropped for .4 (the bound is 2), then made again


def test_split_gro_buffer() -> None:
    assert split_gro_buffer(b"aabbc", 2) == [b"aa", b"bb", b"c"]
    assert split_gro_buffer(b"aabb", 2) == [b"aa", b"bb"]
    assert split_gro_buffer(b"aa", 2) == [b"aa"]
    assert split_gro_buffer(b"a", 0) == [b"a"]


def _segments(count: int, size: int, tail: int = 0) -> list[bytes]:
    segments = [bytes([i % 251]) * size for i in range(count)]
    if tail:
        segments.append(b"T" * tail)
    return segments


async def test_gso_send_and_gro_receive_split_into_original_datagrams() -> None:
    segments = _segments(10, 1200, tail=500)
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK, gro=True) as server, open_listener_socket(LOOPBACK) as client:
            assert server.gro and client.gso
            result = client.send_segments_nowait(segments, server.local_address)
            assert result == BatchSendResult(11, SendResult.OK)
            got = await _recv_exactly(server, 11)
    assert [d for d, _ in got] == segments
    assert {s for _, s in got} == {client.local_address}
    out, into = client.statistics(), server.statistics()
    assert (out.gso_sends, out.gso_segments, out.datagrams_out, out.bytes_out) == (1, 11, 11, 12_500)
    assert (into.gro_buffers, into.gro_segments, into.datagrams_in, into.bytes_in) == (1, 11, 11, 12_500)
    assert into.recv_batches == 1  # one syscall, one batch


async def test_gso_send_to_plain_receiver_arrives_as_datagrams() -> None:
    segments = _segments(5, 1000, tail=1)
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK) as server, open_listener_socket(LOOPBACK) as client:
            assert client.send_segments_nowait(segments, server.local_address).result.ok
            got = await _recv_exactly(server, 6)
    assert [d for d, _ in got] == segments
    assert client.statistics().gso_sends == 1 and server.statistics().gro_buffers == 0


async def test_gro_batch_never_exceeds_max_datagrams() -> None:
    segments = _segments(11, 1000)
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK, gro=True) as server, open_listener_socket(LOOPBACK) as client:
            client.send_segments_nowait(segments, server.local_address)
            batches = [await server.recv_batch(4) for _ in range(3)]
    assert [len(b) for b in batches] == [4, 4, 3]
    assert [d for b in batches for d, _ in b] == segments
    assert server.statistics().gro_buffers == 1


async def test_send_segments_of_unequal_size_fall_back_to_datagrams() -> None:
    segments = [b"a" * 100, b"b" * 200, b"c" * 100]  # the middle one differs: no GSO
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK, gro=True) as server, open_listener_socket(LOOPBACK) as client:
            assert client.send_segments_nowait(segments, server.local_address) == BatchSendResult(3, SendResult.OK)
            got = await _recv_exactly(server, 3)
            assert client.send_segments_nowait([], server.local_address) == BatchSendResult(0, SendResult.OK)
    assert [d for d, _ in got] == segments
    assert client.statistics().gso_sends == 0 and client.statistics().datagrams_out == 3


async def test_send_segments_splits_large_batches_into_gso_chunks() -> None:
    segments = _segments(150, 1200)  # 54 segments of 1200 B fit one 64 KiB GSO send
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK, gro=True) as server, open_listener_socket(LOOPBACK) as client:
            assert client.send_segments_nowait(segments, server.local_address) == BatchSendResult(150, SendResult.OK)
            got = await _recv_exactly(server, 150)
    assert [d for d, _ in got] == segments
    assert client.statistics().gso_sends == 3  # 54 + 54 + 42


async def test_tiny_rcvbuf_kernel_drops_are_not_errors() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK, rcvbuf=1) as server, open_listener_socket(LOOPBACK) as client:
            for _ in range(200):  # far more than a ~4 KiB receive buffer holds: the kernel drops the rest
                assert client.send_nowait(b"x" * 1000, server.local_address) is SendResult.OK
            first = await server.recv_batch(1000)
            assert 1 <= len(first) < 200
            with trio.move_on_after(0):  # nothing more is queued: a wait here would block
                await server.recv_batch(1000)
                pytest.fail("datagrams beyond the receive buffer should have been dropped")  # pragma: no cover
            assert client.send_nowait(b"again", server.local_address).ok  # the path still works
            assert await server.recv_batch(8) == [(b"again", client.local_address)]
    assert client.statistics().send_errors == {} and client.statistics().sends_would_block == 0


async def test_cancelled_recv_loses_nothing() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK) as server, open_listener_socket(LOOPBACK) as client:
            client.send_nowait(b"keep me", server.local_address)
            with trio.CancelScope() as scope:
                scope.cancel()
                await server.recv_batch(8)
            assert scope.cancelled_caught
            assert await server.recv_batch(8) == [(b"keep me", client.local_address)]


async def test_closing_wakes_the_receiver_and_refuses_sends() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK) as sock:
            async with trio.open_nursery() as nursery:
                async def receiver() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await sock.recv_batch(8)

                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                await sock.aclose()
            with pytest.raises(trio.ClosedResourceError):
                sock.send_nowait(b"x", ("127.0.0.1", 9))
            assert sock.closed and sock.fileno() == -1


async def test_bug_errnos_propagate() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK) as sock:
            with pytest.raises(OSError) as info:
                sock.send_nowait(b"x" * 70_000, ("127.0.0.1", 9))  # larger than any UDP datagram
    assert info.value.errno == errno.EMSGSIZE


@pytest.mark.parametrize(("bind", "message"), [
    (("localhost", 0), "is not a numeric IP address"),
    (("::1", 0), "does not match the socket family"),
])
async def test_bad_bind_address_is_pathsocketerror(bind: tuple[str, int], message: str) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(PathSocketError, match=message):
            async with open_listener_socket(bind):
                pass  # pragma: no cover


async def test_address_in_use_is_pathsocketerror() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK) as first:
            with pytest.raises(PathSocketError, match=r"cannot open UDP socket: bind 127\.0\.0\.1 port \d+: "
                                                      "Address already in use"):
                async with open_listener_socket(first.local_address):
                    pass  # pragma: no cover


async def test_buffer_sizes_are_bounded() -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(PathSocketError, match="rcvbuf 0 is out of range"):
            async with open_listener_socket(LOOPBACK, rcvbuf=0):
                pass  # pragma: no cover
        with pytest.raises(PathSocketError, match="sndbuf 1073741824 is out of range"):
            async with open_listener_socket(LOOPBACK, sndbuf=1 << 30):
                pass  # pragma: no cover


def test_send_result_values() -> None:
    assert SendResult.failed("EPERM") is SendResult.failed("EPERM")
    assert SendResult.failed("EPERM") == SendResult(SendStatus.FAILED, "EPERM")
    assert repr(SendResult.failed("ENETDOWN")) == "SendResult.failed('ENETDOWN')"
    assert repr(SendResult.WOULD_BLOCK) == "SendResult.WOULD_BLOCK"
    assert SendResult.OK.ok and not SendResult.WOULD_BLOCK.ok and SendResult.OK.errno_name is None


# -- unprivileged: error mapping through a socket double ----------------------------------

class RaisingSocket:
    """A socket double: a real fd for readiness, and sendto/sendmsg that raise chosen errnos.

    ``refuse_gso_errno`` / ``refuse_source_errno``: sendmsg raises it only when
    the call carries UDP_SEGMENT / a pktinfo.  ``calls`` records each send's
    kind and the control message types it carried.
    """

    def __init__(self, *, sendto_errno: int | None = None, sendmsg_errno: int | None = None,
                 refuse_gso_errno: int | None = None, refuse_source_errno: int | None = None) -> None:
        self._real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._real.setblocking(False)
        self.sendto_errno = sendto_errno
        self.sendmsg_errno = sendmsg_errno
        self.refuse_gso_errno = refuse_gso_errno
        self.refuse_source_errno = refuse_source_errno
        self.sendto_calls = 0
        self.calls: list[tuple[str, list[int]]] = []

    def fileno(self) -> int:
        return self._real.fileno()

    def close(self) -> None:
        self._real.close()

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.sendto_calls += 1
        self.calls.append(("sendto", []))
        if self.sendto_errno is not None:
            raise OSError(self.sendto_errno, os.strerror(self.sendto_errno))
        return len(data)

    def sendmsg(self, buffers: list[bytes], ancdata: Any, flags: int, addr: tuple[str, int]) -> int:
        kinds = [kind for _level, kind, _data in ancdata]
        self.calls.append(("sendmsg", kinds))
        for code, kind in ((self.sendmsg_errno, None), (self.refuse_gso_errno, UDP_SEGMENT),
                           (self.refuse_source_errno, IP_PKTINFO)):
            if code is not None and (kind is None or kind in kinds):
                raise OSError(code, os.strerror(code))
        return sum(map(len, buffers))


@pytest.fixture
def double() -> Iterator[Callable[..., tuple[PathSocket, RaisingSocket]]]:
    made: list[PathSocket] = []

    def make(**kwargs: int | None) -> tuple[PathSocket, RaisingSocket]:
        fake = RaisingSocket(**kwargs)
        path = PathSocket(fake, gso=True)  # type: ignore[arg-type]
        made.append(path)
        return path, fake

    yield make
    for path in made:
        path.close()


@pytest.mark.parametrize("code", sorted(PATH_ERRNOS), ids=lambda c: errno.errorcode[c])
async def test_path_errnos_are_results_not_exceptions(
        double: Callable[..., tuple[PathSocket, RaisingSocket]], code: int) -> None:
    path, _fake = double(sendto_errno=code, sendmsg_errno=code)
    name = errno.errorcode[code]
    with trio.fail_after(TIMEOUT):
        assert path.send_nowait(b"x", ("192.0.2.1", 9)) == SendResult.failed(name)
        assert await path.send(b"x", ("192.0.2.1", 9)) == SendResult.failed(name)
        assert path.send_segments_nowait([b"ab", b"cd"], ("192.0.2.1", 9)) == BatchSendResult(
            0, SendResult.failed(name))
    stats = path.statistics()
    assert dict(stats.send_errors) == {name: 3}
    assert stats.datagrams_out == 0


async def test_eagain_is_would_block(double: Callable[..., tuple[PathSocket, RaisingSocket]]) -> None:
    path, _fake = double(sendto_errno=errno.EAGAIN, sendmsg_errno=errno.EAGAIN)
    assert path.send_nowait(b"x", ("192.0.2.1", 9)) is SendResult.WOULD_BLOCK
    assert path.send_segments_nowait([b"ab", b"cd"], ("192.0.2.1", 9)) == BatchSendResult(0, SendResult.WOULD_BLOCK)
    assert path.statistics().sends_would_block == 2 and path.statistics().send_errors == {}


@pytest.mark.parametrize(("code", "still_gso"), [(errno.EINVAL, True), (errno.EMSGSIZE, True), (errno.EIO, True),
                                                 (errno.ENOPROTOOPT, False)])
async def test_refused_gso_falls_back_to_datagrams(
        double: Callable[..., tuple[PathSocket, RaisingSocket]], code: int, still_gso: bool) -> None:
    path, fake = double(sendmsg_errno=code)
    assert path.send_segments_nowait([b"ab", b"cd", b"e"], ("192.0.2.1", 9)) == BatchSendResult(3, SendResult.OK)
    assert fake.sendto_calls == 3
    stats = path.statistics()
    assert (stats.gso_fallbacks, stats.gso_sends, stats.datagrams_out) == (1, 0, 3)
    assert path.gso is still_gso


@pytest.mark.parametrize("code", [errno.ENETUNREACH, errno.EINVAL, errno.EADDRNOTAVAIL],
                         ids=lambda c: errno.errorcode[c])
async def test_a_refused_source_is_dropped_and_counted(
        double: Callable[..., tuple[PathSocket, RaisingSocket]], code: int) -> None:
    """The address left the host (IPv4 says ENETUNREACH, IPv6 EINVAL): send without it, never crash."""
    path, fake = double(refuse_source_errno=code)
    sourced = SourcedPort(path, "192.0.2.7")
    assert sourced.send_nowait(b"x", ("192.0.2.1", 9)) is SendResult.OK
    assert fake.calls == [("sendmsg", [IP_PKTINFO]), ("sendto", [])]
    assert sourced.send_segments_nowait([b"ab", b"cd"], ("192.0.2.1", 9)) == BatchSendResult(2, SendResult.OK)
    assert fake.calls[2:] == [("sendmsg", [UDP_SEGMENT, IP_PKTINFO]), ("sendmsg", [UDP_SEGMENT])]
    stats = path.statistics()
    assert (stats.source_fallbacks, stats.datagrams_out, stats.gso_sends, dict(stats.send_errors)) == (2, 3, 1, {})


async def test_a_refused_source_then_a_failed_retry_is_the_retry_s_path_error(
        double: Callable[..., tuple[PathSocket, RaisingSocket]]) -> None:
    """ENETUNREACH may also mean no route at all: then the retry fails the same way, and that is the result."""
    path, _fake = double(refuse_source_errno=errno.ENETUNREACH, sendto_errno=errno.ENETUNREACH)
    assert SourcedPort(path, "192.0.2.7").send_nowait(b"x", ("192.0.2.1", 9)) == SendResult.failed("ENETUNREACH")
    stats = path.statistics()
    assert (stats.source_fallbacks, dict(stats.send_errors)) == (0, {"ENETUNREACH": 1})


async def test_other_errnos_with_a_source_are_not_retried(
        double: Callable[..., tuple[PathSocket, RaisingSocket]]) -> None:
    path, fake = double(sendmsg_errno=errno.EPERM)
    assert SourcedPort(path, "192.0.2.7").send_nowait(b"x", ("192.0.2.1", 9)) == SendResult.failed("EPERM")
    assert fake.calls == [("sendmsg", [IP_PKTINFO])]


async def test_refused_gso_with_a_source_falls_back_to_datagrams_from_that_source(
        double: Callable[..., tuple[PathSocket, RaisingSocket]]) -> None:
    """EINVAL from a GSO send with a pktinfo: not the source's fault when the retry without it fails too."""
    path, fake = double(refuse_gso_errno=errno.EINVAL)
    sourced = SourcedPort(path, "192.0.2.7")
    assert sourced.send_segments_nowait([b"ab", b"cd"], ("192.0.2.1", 9)) == BatchSendResult(2, SendResult.OK)
    assert fake.calls == [("sendmsg", [UDP_SEGMENT, IP_PKTINFO]), ("sendmsg", [UDP_SEGMENT]),
                          ("sendmsg", [IP_PKTINFO]), ("sendmsg", [IP_PKTINFO])]
    stats = path.statistics()
    assert (stats.gso_fallbacks, stats.source_fallbacks, stats.datagrams_out) == (1, 0, 2)


# -- root: namespaces ----------------------------------------------------------------------

class Netns:
    """A network namespace we created; ``entered()`` switches this thread into it."""

    def __init__(self, name: str) -> None:
        self.name = name

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        from pyroute2 import netns

        netns.pushns(self.name)
        try:
            yield
        finally:
            netns.popns()

    @contextlib.contextmanager
    def iproute(self) -> Iterator[Any]:
        from pyroute2 import IPRoute

        with self.entered():
            ipr = IPRoute()  # its netlink socket belongs to this namespace from now on
        try:
            yield ipr
        finally:
            ipr.close()


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], Netns]]:
    from pyroute2 import netns

    tag = _rand()
    created: list[str] = []

    def make(role: str) -> Netns:
        name = f"jvtu-{tag}-{role}"
        netns.create(name)
        created.append(name)
        ns = Netns(name)
        with ns.iproute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return ns

    yield make
    for name in reversed(created):
        netns.remove(name)


def _veth(ipr: Any, name: str, peer: str, address: str, *, peer_ns: Netns | None = None) -> int:
    """Create veth ``name``<->``peer`` (peer moved to ``peer_ns`` if given), address ``name`` and bring it up."""
    ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer})
    index = ipr.link_lookup(ifname=name)[0]
    if peer_ns is not None:
        ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], net_ns_fd=peer_ns.name)
    else:
        ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], state="up")
    ipr.addr("add", index=index, address=address, prefixlen=24)
    ipr.link("set", index=index, state="up")
    return index


@needs_root
async def test_unknown_device_is_pathsocketerror(make_netns: Callable[[str], Netns]) -> None:
    ns = make_netns("dev")
    with trio.fail_after(TIMEOUT), ns.entered():
        with pytest.raises(PathSocketError, match=r"bind to device 'jvtunone': no such device"):
            async with open_path_socket(device="jvtunone", fwmark=None):
                pass  # pragma: no cover


@needs_root
async def test_buffers_are_raised_beyond_rmem_max_when_privileged() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_listener_socket(LOOPBACK) as sock:
            assert sock.rcvbuf == 2 * DEFAULT_RCVBUF_BYTES  # SO_RCVBUFFORCE; the kernel reports double
        async with open_listener_socket(LOOPBACK, rcvbuf=8 * DEFAULT_RCVBUF_BYTES) as sock:
            assert sock.rcvbuf == 16 * DEFAULT_RCVBUF_BYTES


@needs_root
async def test_send_on_a_down_device_fails_without_raising(make_netns: Callable[[str], Netns]) -> None:
    ns = make_netns("down")
    link = f"jvtu{_rand()}a"
    with ns.iproute() as ipr:
        index = _veth(ipr, link, f"{link[:-1]}b", "10.232.1.2")
    with trio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            with ns.entered():
                pinned = await stack.enter_async_context(open_path_socket(device=link, fwmark=None))
                unpinned = await stack.enter_async_context(open_path_socket(device=None, fwmark=None))
            assert pinned.send_nowait(b"up", ("10.232.1.1", 9)) is SendResult.OK
            with ns.iproute() as ipr:
                ipr.link("set", index=index, state="down")  # also deletes the routes through it
            result = pinned.send_nowait(b"down", ("10.232.1.1", 9))
            assert result.status is SendStatus.FAILED and result.errno_name in {"ENETDOWN", "ENETUNREACH"}
            assert (await pinned.send(b"down", ("10.232.1.1", 9))) == result
            batch = pinned.send_segments_nowait([b"ab", b"cd"], ("10.232.1.1", 9))
            assert batch == BatchSendResult(0, result)
            # No route at all in this namespace: the path is unusable, not a crash.
            assert unpinned.send_nowait(b"x", ("192.0.2.1", 9)) == SendResult.failed("ENETUNREACH")
    assert pinned.statistics().send_errors == {result.errno_name: 3}
    assert pinned.statistics().datagrams_out == 1


@needs_root
async def test_send_waits_for_writability_when_the_qdisc_backs_up(make_netns: Callable[[str], Netns]) -> None:
    ns = make_netns("tbf")
    with ns.iproute() as ipr:  # 8 Mbit/s on this namespace's loopback: sends queue up below the socket
        ipr.tc("add", "tbf", index=ipr.link_lookup(ifname="lo")[0], handle="1:", rate="8mbit",
               burst=20000, latency="5s")
    payload = b"q" * 1000
    with trio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            with ns.entered():
                server = await stack.enter_async_context(open_listener_socket(LOOPBACK))
                client = await stack.enter_async_context(open_listener_socket(LOOPBACK, sndbuf=1))
            accepted = 0
            while (result := client.send_nowait(payload, server.local_address)) is SendResult.OK:
                accepted += 1
                assert accepted < 10_000
            assert result is SendResult.WOULD_BLOCK
            assert await client.send(payload, server.local_address) is SendResult.OK  # waited for the qdisc
            got = await _recv_exactly(server, accepted + 1)
    assert all(d == payload for d, _ in got)
    stats = client.statistics()
    assert stats.sends_would_block >= 1 and stats.datagrams_out == accepted + 1 and stats.send_errors == {}


@needs_root
async def test_bindtodevice_and_fwmark_pick_the_path(make_netns: Callable[[str], Netns]) -> None:
    """Two veth paths from a client namespace to a gateway namespace (platform-notes section 5).

    Main table: default via path 1 (metric 100) and path 2 (metric 200); table
    102: default via path 2, selected by fwmark 0x102.  The gateway sees which
    path a datagram took from its source address, and answers on it.
    """
    cli, gw = make_netns("cli"), make_netns("gw")
    tag = _rand()
    c1, c2, g1, g2 = (f"jvtu{tag}{s}" for s in ("c1", "c2", "g1", "g2"))
    with cli.iproute() as ipr:
        i1 = _veth(ipr, c1, g1, "10.232.1.2", peer_ns=gw)
        i2 = _veth(ipr, c2, g2, "10.232.2.2", peer_ns=gw)
        ipr.route("add", dst="0.0.0.0/0", gateway="10.232.1.1", oif=i1, priority=100)
        ipr.route("add", dst="0.0.0.0/0", gateway="10.232.2.1", oif=i2, priority=200)
        ipr.route("add", dst="0.0.0.0/0", gateway="10.232.2.1", oif=i2, table=102)
        ipr.rule("add", fwmark=0x102, table=102, priority=50)
    with gw.iproute() as ipr:
        for name, address in ((g1, "10.232.1.1"), (g2, "10.232.2.1")):
            index = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=index, address=address, prefixlen=24)
            ipr.link("set", index=index, state="up")
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address="10.232.99.1", prefixlen=32)
    public = ("10.232.99.1", 51820)
    cases = [  # (device, fwmark) -> the client address the gateway must see
        ((None, None), "10.232.1.2"),
        ((c1, None), "10.232.1.2"),
        ((c2, None), "10.232.2.2"),
        ((None, 0x102), "10.232.2.2"),
        ((c2, 0x102), "10.232.2.2"),
    ]
    with trio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            with gw.entered():
                server = await stack.enter_async_context(open_listener_socket(public))
            for (device, fwmark), expected in cases:
                with cli.entered():
                    client = await stack.enter_async_context(open_path_socket(device=device, fwmark=fwmark))
                assert (client.device, client.fwmark) == (device, fwmark)
                assert await client.send(b"hello", public) is SendResult.OK
                [(data, source)] = await server.recv_batch(8)
                assert (data, source[0]) == (b"hello", expected), (device, fwmark)
                assert await server.send(b"welcome", source) is SendResult.OK
                assert await client.recv_batch(8) == [(b"welcome", public)]
    assert server.statistics().datagrams_in == len(cases)


@needs_root
@pytest.mark.parametrize(("family", "first", "second", "prefixlen"), [
    (socket.AF_INET, "10.232.99.1", "10.232.99.2", 32),
    (socket.AF_INET6, "fd00:232::1", "fd00:232::2", 128),
], ids=["ipv4", "ipv6"])
async def test_wildcard_answers_from_a_second_address_until_it_goes(
        make_netns: Callable[[str], Netns], family: int, first: str, second: str, prefixlen: int) -> None:
    """Two service addresses on lo: replies leave from the one reached; once it is deleted they
    leave from wherever routing says (counted), with no error."""
    ns = make_netns("home")
    with ns.iproute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for address in (first, second):  # IFA_F_NODAD: an IPv6 address still tentative cannot be bound
            ipr.addr("add", index=lo, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    with trio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            with ns.entered():
                server = await stack.enter_async_context(open_listener_socket((wildcard, 0), family=family))
                client = await stack.enter_async_context(open_listener_socket((first, 0), family=family))
            port = server.local_address[1]
            assert client.send_nowait(b"hello", (second, port)).ok
            [(_data, source, reply)] = await server.recv_batch_routed(8)
            assert isinstance(reply, SourcedPort) and reply.source == second
            assert reply.send_nowait(b"from second", source) is SendResult.OK
            assert await client.recv_batch(8) == [(b"from second", (second, port))]
            with ns.iproute() as ipr:
                ipr.addr("del", index=lo, address=second, prefixlen=prefixlen)
            assert reply.send_nowait(b"second gone", source) is SendResult.OK
            assert await client.recv_batch(8) == [(b"second gone", (first, port))]
    stats = server.statistics()
    assert (stats.source_fallbacks, stats.datagrams_out, dict(stats.send_errors)) == (1, 2, {})


@needs_root
async def test_without_cap_net_raw_the_error_says_so() -> None:
    """A child without CAP_NET_RAW/CAP_NET_ADMIN cannot set SO_MARK and gets a one-line error.

    (Since Linux 5.7 a first SO_BINDTODEVICE needs no capability; SO_MARK still does.)
    """
    script = textwrap.dedent("""
        import trio
        from jvpn_trio.drivers.udp import PathSocketError, open_path_socket
        async def main():
            try:
                async with open_path_socket(device="lo", fwmark=0x102):
                    print("opened")
            except PathSocketError as exc:
                print(exc)
        trio.run(main)
    """)
    dropper = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
               "[libc.prctl(24, cap, 0, 0, 0) for cap in (12, 13)]; "  # PR_CAPBSET_DROP NET_ADMIN, NET_RAW
               "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])")
    with trio.fail_after(30):
        result = await trio.run_process([sys.executable, "-c", dropper, script], capture_stdout=True,
                                        capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == (
        "cannot open UDP socket: set fwmark 0x102: permission denied (not root / no CAP_NET_RAW or CAP_NET_ADMIN)")


def test_combined_statistics_sum_counts_and_keep_the_largest_batch() -> None:
    def record(n: int, batch: int, errors: dict[str, int]) -> UdpStatistics:
        counts = {f.name: n for f in attrs.fields(UdpStatistics) if f.name not in ("send_errors", "max_batch")}
        return UdpStatistics(**counts, send_errors=errors, max_batch=batch)

    both = combined_statistics([record(1, 5, {"ENETUNREACH": 2}), record(10, 3, {"ENETUNREACH": 1, "EPERM": 4})])
    assert both == record(11, 5, {"ENETUNREACH": 3, "EPERM": 4})
    assert combined_statistics([]) == record(0, 0, {})
