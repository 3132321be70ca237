"""Per-path UDP sockets for Trio: a stdlib non-blocking socket, batching, GSO/GRO, errno accounting.

Theory of operation
-------------------
A :class:`PathSocket` is one UDP socket for one transport path (client side:
pinned to an interface with ``SO_BINDTODEVICE`` and marked with ``SO_MARK``
for policy routing, platform-notes section 5), or the gateway's listening
socket (:func:`open_listener_socket`: bound to an exact address, no device).

**Why not trio.socket** (platform-notes section 4).  ``trio.socket`` makes
every call a full checkpoint and costs about 2x in datagrams/s.  We keep a
plain non-blocking stdlib socket and follow trio's own non-blocking helper
pattern: ``checkpoint_if_cancelled()``, *try* the syscall, wait with
``wait_readable``/``wait_writable`` only on EAGAIN, and end with
``cancel_shielded_checkpoint()``.  A cancellation can therefore only arrive
before datagrams are taken from the kernel, never after, so none are lost.

**Receiving.**  :meth:`PathSocket.recv_batch` waits for readability at most
once per call (and not at all when datagrams are already queued), then drains
with ``recvfrom`` until EAGAIN or ``max_datagrams``.  Datagrams the kernel
dropped because the receive buffer was full are invisible here: that is UDP
loss, not an error.

**GRO** (``gro=True``, ``UDP_GRO`` = 104).  The kernel may then deliver
several datagrams from one sender, all of the same size except possibly a
shorter last one, as one buffer with a ``UDP_GRO`` control message carrying
the segment size.  We read with ``recvmsg`` and cut the buffer every
``segment size`` bytes; each piece is one original datagram.  A buffer holds
at most :data:`GRO_MAX_SEGMENTS` segments; if it brings more than
``max_datagrams - len(batch)``, the rest are kept (bounded by that same
number) and returned first by the next call, so a batch never exceeds
``max_datagrams``.  A buffer without the control message is one datagram.
Without GRO, a GSO burst sent to us is split by the kernel before queueing.

**Sending** never raises for conditions that describe the path rather than a
bug (:data:`PATH_ERRNOS`: ENOBUFS, ENETUNREACH, EHOSTUNREACH, EPERM (an nft
drop on output, platform-notes section 2), ENETDOWN, EADDRNOTAVAIL,
ECONNREFUSED): :meth:`PathSocket.send_nowait` returns
``SendResult.failed(errno_name)`` and counts it per errno name.  EAGAIN
(the socket's send buffer is full of packets still queued below us) is
``SendResult.WOULD_BLOCK``; :meth:`PathSocket.send` waits for writability
instead, as long as the caller's cancel scope allows.  Everything else
(EMSGSIZE, EBADF, ...) is a bug and propagates.

**GSO** (``UDP_SEGMENT`` = 103).  :meth:`PathSocket.send_segments_nowait`
sends many equally sized datagrams (the last may be shorter) with one
``sendmsg`` carrying the segment size as a control message, in chunks of at
most :data:`GSO_MAX_SEGMENTS` segments and :data:`GSO_MAX_BYTES` bytes.  When
the sizes differ, or the kernel lacks UDP_SEGMENT, or refuses it for this
route (EINVAL, or EMSGSIZE on newer kernels: a segment larger than the
route MTU allows; EIO: the device cannot checksum), it falls back to one
``sendto`` per datagram, which the kernel fragments like any datagram
(docs/mtu.md).

**Answering from the address a request reached** (a listener bound to a
wildcard, ``0.0.0.0`` or ``::``).  A host with several addresses (a service
address on loopback, a second uplink) would otherwise answer from whichever
source the routing table picks for the reply, and a client that accepts
replies only from the address it sent to (ours does) never hears them.  Such a
socket turns on ``IP_PKTINFO`` / ``IPV6_RECVPKTINFO``, reads every datagram
with ``recvmsg`` (the same call and control buffer as GRO, whose control
message may come alongside) and finds the local address the datagram reached
(IPv4: ``ipi_spec_dst``, the header's destination for unicast; IPv6:
``ipi6_addr``).  :meth:`PathSocket.recv_batch_routed` returns each datagram
with the port to answer it by: a :class:`SourcedPort`, the same socket sending
with an ``in_pktinfo`` / ``in6_pktinfo`` control message that names that
address as the source (interface index 0: routing still picks the interface),
next to ``UDP_SEGMENT`` for GSO.  There is one SourcedPort per local address
(at most :data:`MAX_SOURCED_PORTS` are kept for reuse), so whoever remembers
the port remembers the address.  When the kernel refuses the source because
the address has left the host (:data:`_SOURCE_REFUSED_ERRNOS`), the datagram
is sent again without it, from wherever routing says, and counted in
``source_fallbacks``.  A socket bound to one address needs none of this and
keeps ``recvfrom``.  This is the idea of wireguard-go's "sticky sockets"
(``conn/sticky_linux.go``) and OpenVPN's ``--multihome``.

Addresses passed to send calls must be numeric (``("10.0.0.1", 51820)``): a
host name would make the stdlib resolve it with a blocking DNS lookup.

**IPv6.**  A socket has one family, the gateway's.  An AF_INET6 socket is
``IPV6_V6ONLY``, so a gateway can listen on ``0.0.0.0:P`` and ``[::]:P`` at
once (without it the IPv6 wildcard also takes IPv4 and the second bind fails
with EADDRINUSE), and a client path socket never speaks IPv4-mapped
addresses.  Sources are returned as ``(host, port)`` for both families (the
kernel's ``flowinfo`` and ``scope_id`` are dropped), so a datagram from
``("fd00::1", 51820)`` compares equal to the endpoint the configuration
names; link-local endpoints, which would need the scope, are not supported.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Any, ClassVar, Final

import attrs
import trio

__all__ = [
    "DEFAULT_RCVBUF_BYTES",
    "DEFAULT_SNDBUF_BYTES",
    "GRO_MAX_SEGMENTS",
    "GSO_MAX_BYTES",
    "GSO_MAX_SEGMENTS",
    "IPV6_PKTINFO",
    "IPV6_RECVPKTINFO",
    "IP_PKTINFO",
    "MAX_SOCKET_BUFFER_BYTES",
    "MAX_SOURCED_PORTS",
    "PATH_ERRNOS",
    "RECV_SIZE",
    "UDP_GRO",
    "UDP_SEGMENT",
    "BatchSendResult",
    "ListenerSocket",
    "PathSocket",
    "PathSocketError",
    "SendResult",
    "SendStatus",
    "SourcedPort",
    "UdpStatistics",
    "combined_statistics",
    "open_listener_socket",
    "open_path_socket",
    "pktinfo_cmsg",
    "pktinfo_source",
    "split_gro_buffer",
]

#: ``<linux/udp.h>``; Python 3.11 has no names for them (platform-notes section 4).
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104
_SOL_UDP: Final = socket.IPPROTO_UDP
#: ``<linux/in.h>`` IP_PKTINFO = 8 (Python 3.11 has no name for it; a newer one does) and
#: ``<linux/in6.h>`` IPV6_RECVPKTINFO = 49 (ask for the destination), IPV6_PKTINFO = 50 (the
#: control message's type, on receive and send): the one place these numbers are written.
IP_PKTINFO: Final[int] = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO: Final[int] = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO: Final[int] = getattr(socket, "IPV6_PKTINFO", 50)
#: ``struct in_pktinfo {int ipi_ifindex; struct in_addr ipi_spec_dst, ipi_addr;}`` and
#: ``struct in6_pktinfo {struct in6_addr ipi6_addr; unsigned ipi6_ifindex;}``.
_IN_PKTINFO = struct.Struct("=i4s4s")
_IN6_PKTINFO = struct.Struct("=16sI")

#: Default receive buffer asked for: about 1800 full-size datagrams (a 1200-byte
#: datagram costs ~2.3 KiB of truesize), i.e. ~15 ms of a 1 Gbit/s burst while the
#: event loop is busy elsewhere.  Set with SO_RCVBUFFORCE when we have CAP_NET_ADMIN,
#: otherwise SO_RCVBUF, which the kernel caps at net.core.rmem_max.
DEFAULT_RCVBUF_BYTES: Final = 4 * 1024 * 1024
#: Default send buffer: room for bursts queued below us (qdisc, neighbour
#: resolution) before sends see EAGAIN; 1 MiB is ~450 datagrams.
DEFAULT_SNDBUF_BYTES: Final = 1 * 1024 * 1024
#: Upper bound accepted for either buffer (the kernel doubles the value for bookkeeping).
MAX_SOCKET_BUFFER_BYTES: Final = 64 * 1024 * 1024

#: Bytes asked of each receive: the largest UDP payload (also the largest GRO buffer).
RECV_SIZE: Final = 65535
#: The kernel coalesces at most this many datagrams into one GRO buffer (UDP_GRO_CNT_MAX).
GRO_MAX_SEGMENTS: Final = 64
#: Local addresses a wildcard listener keeps a :class:`SourcedPort` for; beyond that the oldest is
#: dropped from the cache (whoever holds it can still send with it).  AnyIP routes (``local
#: 10.0.0.0/8 dev lo``) can give a host that many addresses; a normal one has a handful.
MAX_SOURCED_PORTS: Final = 256
#: Segments per GSO send; the kernel's UDP_MAX_SEGMENTS is 64 on older and 128 on newer kernels.
GSO_MAX_SEGMENTS: Final = 64
#: Payload bytes per GSO send: 65535 minus the IPv4 and UDP headers.
GSO_MAX_BYTES: Final = 65535 - 20 - 8

#: Send errnos that describe the path, not a bug: counted and returned as ``SendResult.failed``.
PATH_ERRNOS: Final = frozenset({
    errno.ENOBUFS, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPERM, errno.ENETDOWN,
    errno.EADDRNOTAVAIL, errno.ECONNREFUSED,
})
#: GSO send errnos after which the same datagrams are sent one by one.
_GSO_FALLBACK_ERRNOS: Final = frozenset({errno.EINVAL, errno.EMSGSIZE, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT})
#: ... and those after which GSO is never tried again on this socket.
_GSO_UNSUPPORTED_ERRNOS: Final = frozenset({errno.EOPNOTSUPP, errno.ENOPROTOOPT})
#: Send errnos after which a datagram that named its source is sent again without: the source is no
#: longer a local address (IPv4 routing says ENETUNREACH, IPv6 EINVAL; EADDRNOTAVAIL for good
#: measure).  If the retry fails too, its errno is the answer (a path error, or GSO refused).
_SOURCE_REFUSED_ERRNOS: Final = frozenset({errno.EADDRNOTAVAIL, errno.EINVAL, errno.ENETUNREACH})
_PERMISSION_ERRNOS: Final = frozenset({errno.EPERM, errno.EACCES})
# <asm-generic/socket.h>; not every typeshed knows them.
_SO_RCVBUFFORCE: Final[int] = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE: Final[int] = getattr(socket, "SO_SNDBUFFORCE", 32)
_GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
_PKTINFO_CMSG_SPACE: Final = {False: socket.CMSG_SPACE(_IN_PKTINFO.size), True: socket.CMSG_SPACE(_IN6_PKTINFO.size)}
_INT = struct.Struct("=i")
_U16 = struct.Struct("=H")

Address = tuple[Any, ...]  # (host, port), for both families (module docstring, "IPv6")
Cmsg = tuple[int, int, bytes]  # (level, type, data), as sendmsg takes and recvmsg returns them


class PathSocketError(Exception):
    """A path socket that cannot be set up (bad device, no permission, address in use); one line."""


def _frozen_counts(counts: Mapping[str, int]) -> Mapping[str, int]:
    """A read-only copy of a counter dict, for frozen statistics records."""
    return MappingProxyType(dict(counts))


class SendStatus(enum.Enum):
    OK = "ok"
    WOULD_BLOCK = "would_block"
    FAILED = "failed"


@attrs.frozen
class SendResult:
    """Outcome of one non-blocking send: ``SendResult.OK``, ``SendResult.WOULD_BLOCK`` or
    ``SendResult.failed("ENETDOWN")`` (``errno_name`` set only for FAILED)."""

    status: SendStatus
    errno_name: str | None = None

    OK: ClassVar[SendResult]
    WOULD_BLOCK: ClassVar[SendResult]

    @classmethod
    def failed(cls, errno_name: str) -> SendResult:
        return _FAILED.get(errno_name) or cls(SendStatus.FAILED, errno_name)

    @property
    def ok(self) -> bool:
        return self.status is SendStatus.OK

    def __repr__(self) -> str:
        if self.status is SendStatus.FAILED:
            return f"SendResult.failed({self.errno_name!r})"
        return f"SendResult.{self.status.name}"


SendResult.OK = SendResult(SendStatus.OK)
SendResult.WOULD_BLOCK = SendResult(SendStatus.WOULD_BLOCK)
_FAILED: Final = {errno.errorcode[e]: SendResult(SendStatus.FAILED, errno.errorcode[e]) for e in PATH_ERRNOS}


@attrs.frozen
class BatchSendResult:
    """Outcome of :meth:`PathSocket.send_segments_nowait`: the first ``sent`` segments were
    handed to the kernel; ``result`` is OK when that is all of them, else what stopped the batch."""

    sent: int
    result: SendResult


@attrs.frozen(kw_only=True)
class UdpStatistics:
    """Counters of one :class:`PathSocket` (trio-style ``statistics()`` record).

    ``datagrams_in`` counts datagrams after GRO splitting; ``gro_buffers`` counts
    receives that carried more than one datagram and ``gro_segments`` the
    datagrams in them.  ``sends_would_block`` counts EAGAIN on send;
    ``send_errors`` counts :data:`PATH_ERRNOS` by errno name.  ``recv_wakeups``
    counts waits for readability that ended; ``recv_batches`` non-empty batches,
    ``max_batch`` the largest.  ``gso_sends``/``gso_segments`` count GSO
    syscalls and the datagrams they carried; ``gso_fallbacks`` the GSO chunks
    resent one datagram at a time.  ``source_fallbacks`` counts sends that
    named a source address the kernel refused (it left the host) and went out
    without it.
    """

    datagrams_in: int
    bytes_in: int
    datagrams_out: int
    bytes_out: int
    sends_would_block: int
    send_errors: Mapping[str, int] = attrs.field(converter=_frozen_counts, hash=False)
    recv_wakeups: int
    recv_batches: int
    max_batch: int
    gro_buffers: int
    gro_segments: int
    gso_sends: int
    gso_segments: int
    gso_fallbacks: int
    source_fallbacks: int = 0


def combined_statistics(records: Iterable[UdpStatistics]) -> UdpStatistics:
    """Several sockets' statistics as one: every count summed, ``max_batch`` the largest.

    What a gateway with one listener per address reports as its data ports.
    """
    records = list(records)
    errors: dict[str, int] = {}
    for record in records:
        for name, count in record.send_errors.items():
            errors[name] = errors.get(name, 0) + count
    summed = {
        field.name: sum(getattr(record, field.name) for record in records)
        for field in attrs.fields(UdpStatistics)
        if field.name not in ("send_errors", "max_batch")
    }
    return UdpStatistics(**summed, send_errors=errors, max_batch=max((r.max_batch for r in records), default=0))


def split_gro_buffer(buffer: bytes, segment_size: int) -> list[bytes]:
    """Cut a GRO buffer into its datagrams: ``segment_size`` bytes each, the last possibly shorter."""
    if segment_size <= 0 or len(buffer) <= segment_size:
        return [buffer]
    return [buffer[i:i + segment_size] for i in range(0, len(buffer), segment_size)]


def pktinfo_cmsg(host: str) -> Cmsg:
    """The control message that makes a send leave from the local address ``host``.

    ``in_pktinfo`` with ``ipi_spec_dst`` = host, or ``in6_pktinfo`` with
    ``ipi6_addr`` = host; the interface index is 0, so routing still picks the
    interface (a non-zero index would override the source on IPv4).
    """
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return (socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, ip.packed, bytes(4)))
    return (socket.IPPROTO_IPV6, IPV6_PKTINFO, _IN6_PKTINFO.pack(ip.packed, 0))


def pktinfo_source(level: int, kind: int, data: bytes) -> bytes | None:
    """The local address (4 or 16 packed bytes) a received pktinfo says the datagram reached; else None.

    IPv4 takes ``ipi_spec_dst`` rather than ``ipi_addr``: they are equal for
    unicast, and for a broadcast it is the interface's address, which can be
    answered from while the broadcast address cannot.
    """
    if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
        return data[4:8]
    if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= _IN6_PKTINFO.size:
        return data[:16]
    return None


def _bounded_put(cache: dict[bytes, Any], key: bytes, value: Any) -> None:
    """``cache[key] = value``, first dropping the oldest entry if the cache holds :data:`MAX_SOURCED_PORTS`."""
    if len(cache) >= MAX_SOURCED_PORTS:
        del cache[next(iter(cache))]
    cache[key] = value


def _notify_closing(handle: int | socket.socket) -> None:
    """Wake tasks waiting on ``handle`` with ClosedResourceError; a no-op outside ``trio.run``."""
    try:
        trio.lowlevel.notify_closing(handle)
    except RuntimeError:  # "must be called from async context": nobody can be waiting
        pass


class PathSocket:
    """One UDP socket for one path (or the gateway's listener); see :func:`open_path_socket`.

    The constructor wraps an already configured non-blocking stdlib socket
    and does no I/O.  One task receives and (at most) one task waits to send.
    ``pktinfo`` says the socket has IP_PKTINFO / IPV6_RECVPKTINFO on.
    """

    def __init__(self, sock: socket.socket, *, device: str | None = None, fwmark: int | None = None,
                 gro: bool = False, gso: bool = False, pktinfo: bool = False) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        name = tuple(sock.getsockname())
        #: The bound address, e.g. ``("127.0.0.1", 40000)`` (kept after close, for statistics and logs).
        self.local_address: Address = name[:2]
        #: AF_INET6 names and sources come with flowinfo and scope_id: cut to (host, port).
        self._v6 = len(name) == 4
        self.device = device
        self.fwmark = fwmark
        #: Whether UDP_GRO is on (requested and accepted by the kernel).
        self.gro = gro
        #: Whether UDP_SEGMENT sends are tried (the kernel knows the option).
        self.gso = gso
        #: Whether each datagram comes with the local address it reached (a wildcard listener).
        self.pktinfo = pktinfo
        #: Control buffer for recvmsg; 0: neither GRO nor pktinfo, so plain recvfrom.
        self._ancbufsize = (_GRO_CMSG_SPACE if gro else 0) + (_PKTINFO_CMSG_SPACE[self._v6] if pktinfo else 0)
        self._sourced: dict[bytes, SourcedPort] = {}  # packed local address -> its port (bounded)
        #: A received control message's data, as is -> the port to answer by: the hot path's one
        #: dict lookup per datagram instead of parsing the pktinfo (bounded like ``_sourced``).
        self._replies: dict[bytes, PathSocket | SourcedPort] = {}
        self._carry: deque[tuple[bytes, Address, PathSocket | SourcedPort]] = deque()
        self._datagrams_in = 0
        self._bytes_in = 0
        self._datagrams_out = 0
        self._bytes_out = 0
        self._sends_would_block = 0
        self._send_errors: dict[str, int] = {}
        self._recv_wakeups = 0
        self._recv_batches = 0
        self._max_batch = 0
        self._gro_buffers = 0
        self._gro_segments = 0
        self._gso_sends = 0
        self._gso_segments = 0
        self._gso_fallbacks = 0
        self._source_fallbacks = 0

    def __repr__(self) -> str:
        where = "closed" if self._fd < 0 else f"{self.local_address}"
        return (f"<PathSocket {where} device={self.device!r} fwmark={self.fwmark!r} gro={self.gro}"
                f" pktinfo={self.pktinfo}>")

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def rcvbuf(self) -> int:
        """SO_RCVBUF as the kernel reports it (twice what was set: it includes bookkeeping)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    @property
    def sndbuf(self) -> int:
        """SO_SNDBUF as the kernel reports it (twice what was set)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def _live_fd(self) -> int:
        if self._fd < 0:
            raise trio.ClosedResourceError("path socket is closed")
        return self._fd

    # -- receiving ------------------------------------------------------------------------

    async def recv_batch(self, max_datagrams: int) -> list[tuple[bytes, Address]]:
        """Wait for at least one datagram, then return up to ``max_datagrams`` ``(payload, source)`` pairs.

        Raises ``trio.ClosedResourceError`` if the socket is (or gets) closed.
        Cancellation never loses datagrams (module docstring).
        """
        return await self._recv(max_datagrams, routed=False)

    async def recv_batch_routed(self, max_datagrams: int) -> list[tuple[bytes, Address, PathSocket | SourcedPort]]:
        """:meth:`recv_batch`, each datagram with the port to answer it by: ``(payload, source, port)``.

        The port is the :class:`SourcedPort` of the local address the datagram
        reached when the socket knows it (``pktinfo``), else this socket.
        """
        return await self._recv(max_datagrams, routed=True)

    async def _recv(self, max_datagrams: int, *, routed: bool) -> list[Any]:
        if max_datagrams < 1:
            raise ValueError(f"max_datagrams must be at least 1, got {max_datagrams}")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._live_fd()
        batch = self._drain(max_datagrams, routed)
        if batch:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while not batch:
            await trio.lowlevel.wait_readable(self._live_fd())
            self._recv_wakeups += 1
            batch = self._drain(max_datagrams, routed)  # empty on a spurious wakeup
        n = len(batch)
        self._datagrams_in += n
        self._bytes_in += sum(len(item[0]) for item in batch)
        self._recv_batches += 1
        if n > self._max_batch:
            self._max_batch = n
        return batch

    def _drain(self, max_datagrams: int, routed: bool) -> list[Any]:
        """Up to ``max_datagrams`` ready datagrams: ``(payload, source, reply port)`` if ``routed``, else pairs."""
        batch: list[Any] = []
        carry = self._carry
        while carry and len(batch) < max_datagrams:
            item = carry.popleft()
            batch.append(item if routed else item[:2])
        if carry:
            return batch
        sock = self._sock
        try:
            if not self._ancbufsize:  # neither GRO nor pktinfo: recvfrom is the cheapest call
                recvfrom = sock.recvfrom
                if routed:
                    while len(batch) < max_datagrams:
                        data, source = recvfrom(RECV_SIZE)
                        batch.append((data, source[:2], self))
                elif self._v6:
                    while len(batch) < max_datagrams:
                        data, source = recvfrom(RECV_SIZE)
                        batch.append((data, source[:2]))
                else:
                    while len(batch) < max_datagrams:
                        batch.append(recvfrom(RECV_SIZE))
            else:
                recvmsg, ancbufsize, replies, v6 = sock.recvmsg, self._ancbufsize, self._replies, self._v6
                while len(batch) < max_datagrams:
                    data, ancdata, _flags, source = recvmsg(RECV_SIZE, ancbufsize)
                    if v6:
                        source = source[:2]
                    segment_size = 0
                    reply: PathSocket | SourcedPort = self
                    for level, kind, cdata in ancdata:
                        if kind == UDP_GRO and level == _SOL_UDP:
                            if len(cdata) >= _INT.size:
                                segment_size = _INT.unpack_from(cdata)[0]
                        else:
                            reply = replies.get(cdata) or self._reply_port(level, kind, cdata)
                    if 0 < segment_size < len(data):
                        pieces = split_gro_buffer(data, segment_size)
                        self._gro_buffers += 1
                        self._gro_segments += len(pieces)
                        room = max_datagrams - len(batch)
                        if routed:
                            batch.extend((p, source, reply) for p in pieces[:room])
                        else:
                            batch.extend((p, source) for p in pieces[:room])
                        carry.extend((p, source, reply) for p in pieces[room:])
                    else:
                        batch.append((data, source, reply) if routed else (data, source))
        except BlockingIOError:
            pass
        return batch

    def _reply_port(self, level: int, kind: int, cdata: bytes) -> PathSocket | SourcedPort:
        """The port to answer a datagram that came with this control message by (cached, bounded).

        A pktinfo gives the :class:`SourcedPort` of the address it names (one
        per address); any other message, this socket.
        """
        local = pktinfo_source(level, kind, cdata)
        port: PathSocket | SourcedPort = self
        if local is not None:
            sourced = self._sourced.get(local)
            if sourced is None:
                sourced = SourcedPort(self, ipaddress.ip_address(local).compressed)
                _bounded_put(self._sourced, local, sourced)
            port = sourced
        _bounded_put(self._replies, cdata, port)
        return port

    # -- sending --------------------------------------------------------------------------

    def send_nowait(self, data: bytes | bytearray | memoryview, addr: Address) -> SendResult:
        """Send one datagram without blocking; never raises for EAGAIN or :data:`PATH_ERRNOS`.

        Raises ``trio.ClosedResourceError`` once closed, OSError for bugs (EMSGSIZE...).
        """
        return self._send_one(data, addr, None)

    def _send_one(self, data: bytes | bytearray | memoryview, addr: Address, source: Cmsg | None) -> SendResult:
        """One datagram, from the address ``source`` names (a :func:`pktinfo_cmsg`) or wherever routing says."""
        self._live_fd()
        try:
            sent = self._sock.sendto(data, addr) if source is None else self._sendmsg(data, [source], addr)
        except BlockingIOError:
            self._sends_would_block += 1
            return SendResult.WOULD_BLOCK
        except OSError as exc:
            return self._path_error(exc)
        self._datagrams_out += 1
        self._bytes_out += sent
        return SendResult.OK

    def _sendmsg(self, payload: bytes | bytearray | memoryview, ancdata: list[Cmsg], addr: Address) -> int:
        """sendmsg whose last control message names the source; if the kernel refuses that
        source (the address left the host), send once more without it and count that."""
        try:
            return self._sock.sendmsg([payload], ancdata, 0, addr)
        except OSError as exc:
            if exc.errno not in _SOURCE_REFUSED_ERRNOS:
                raise
        rest = ancdata[:-1]
        sent = self._sock.sendmsg([payload], rest, 0, addr) if rest else self._sock.sendto(payload, addr)
        self._source_fallbacks += 1
        return sent

    def _path_error(self, exc: OSError) -> SendResult:
        if exc.errno not in PATH_ERRNOS:
            raise exc
        name = errno.errorcode[exc.errno]
        self._send_errors[name] = self._send_errors.get(name, 0) + 1
        return SendResult.failed(name)

    async def send(self, data: bytes | bytearray | memoryview, addr: Address) -> SendResult:
        """Send one datagram, waiting for writability on EAGAIN; returns OK or ``failed(errno)``.

        How long to wait is the caller's cancel scope; a cancelled send has not sent.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            result = self.send_nowait(data, addr)
            if result is not SendResult.WOULD_BLOCK:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return result
            await trio.lowlevel.wait_writable(self._live_fd())

    def send_segments_nowait(self, segments: Sequence[bytes | bytearray | memoryview],
                             addr: Address) -> BatchSendResult:
        """Send several datagrams to ``addr``, with UDP_SEGMENT when all but the last are of equal size.

        Stops at the first send that is not OK and reports how many segments
        went out before it; never raises for EAGAIN or :data:`PATH_ERRNOS`.
        """
        return self._send_segments(segments, addr, None)

    def _send_segments(self, segments: Sequence[bytes | bytearray | memoryview], addr: Address,
                       source: Cmsg | None) -> BatchSendResult:
        self._live_fd()
        n = len(segments)
        if n == 0:
            return BatchSendResult(0, SendResult.OK)
        size = len(segments[0])
        if (n == 1 or not self.gso or size == 0 or len(segments[-1]) > size or len(segments[-1]) == 0
                or any(len(segments[i]) != size for i in range(1, n - 1))):
            return self._send_each(segments, 0, n, addr, source)
        per_chunk = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
        sent = 0
        while sent < n:
            end = min(n, sent + per_chunk)
            result = self._send_gso(segments, sent, end, size, addr, source)
            if result is None:  # the kernel would not segment this chunk: one by one
                self._gso_fallbacks += 1
                batch = self._send_each(segments, sent, end, addr, source)
                if not batch.result.ok:
                    return batch
            elif not result.ok:
                return BatchSendResult(sent, result)
            sent = end
        return BatchSendResult(n, SendResult.OK)

    def _send_gso(self, segments: Sequence[bytes | bytearray | memoryview], start: int, end: int, size: int,
                  addr: Address, source: Cmsg | None) -> SendResult | None:
        """One GSO sendmsg of ``segments[start:end]``; None when the kernel refused to segment it."""
        if end - start == 1:
            return self._send_one(segments[start], addr, source)
        payload = b"".join(segments[start:end])
        gso = (_SOL_UDP, UDP_SEGMENT, _U16.pack(size))
        try:
            if source is None:
                sent = self._sock.sendmsg([payload], [gso], 0, addr)
            else:
                sent = self._sendmsg(payload, [gso, source], addr)
        except BlockingIOError:
            self._sends_would_block += 1
            return SendResult.WOULD_BLOCK
        except OSError as exc:
            if exc.errno in _GSO_FALLBACK_ERRNOS:
                if exc.errno in _GSO_UNSUPPORTED_ERRNOS:
                    self.gso = False
                return None
            return self._path_error(exc)
        self._gso_sends += 1
        self._gso_segments += end - start
        self._datagrams_out += end - start
        self._bytes_out += sent
        return SendResult.OK

    def _send_each(self, segments: Sequence[bytes | bytearray | memoryview], start: int, end: int,
                   addr: Address, source: Cmsg | None) -> BatchSendResult:
        for i in range(start, end):
            result = self._send_one(segments[i], addr, source)
            if not result.ok:
                return BatchSendResult(i, result)
        return BatchSendResult(end, SendResult.OK)

    # -- lifetime -------------------------------------------------------------------------

    def statistics(self) -> UdpStatistics:
        return UdpStatistics(
            datagrams_in=self._datagrams_in, bytes_in=self._bytes_in,
            datagrams_out=self._datagrams_out, bytes_out=self._bytes_out,
            sends_would_block=self._sends_would_block, send_errors=self._send_errors,
            recv_wakeups=self._recv_wakeups, recv_batches=self._recv_batches, max_batch=self._max_batch,
            gro_buffers=self._gro_buffers, gro_segments=self._gro_segments,
            gso_sends=self._gso_sends, gso_segments=self._gso_segments, gso_fallbacks=self._gso_fallbacks,
            source_fallbacks=self._source_fallbacks,
        )

    def close(self) -> None:
        """Close the socket; idempotent.  Tasks waiting on it get ClosedResourceError."""
        if self._fd < 0:
            return
        self._fd = -1
        _notify_closing(self._sock)
        self._sock.close()
        self._carry.clear()
        self._sourced.clear()
        self._replies.clear()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class SourcedPort:
    """A wildcard listener answering from one of its local addresses (module docstring, "Answering").

    :meth:`PathSocket.recv_batch_routed` hands one out with each datagram
    that reached ``source``; whoever keeps it to answer that client keeps the
    address too.  Receiving, statistics and closing are the socket's.
    """

    __slots__ = ("_cmsg", "socket", "source")

    def __init__(self, sock: PathSocket, source: str) -> None:
        self.socket = sock
        #: The local address replies leave from, e.g. ``"127.0.0.2"``.
        self.source = source
        self._cmsg = pktinfo_cmsg(source)

    def __repr__(self) -> str:
        return f"<SourcedPort from {self.source} on {self.socket!r}>"

    def send_nowait(self, data: bytes | bytearray | memoryview, addr: Address) -> SendResult:
        """:meth:`PathSocket.send_nowait` from ``source``."""
        return self.socket._send_one(data, addr, self._cmsg)

    def send_segments_nowait(self, segments: Sequence[bytes | bytearray | memoryview],
                             addr: Address) -> BatchSendResult:
        """:meth:`PathSocket.send_segments_nowait` from ``source`` (GSO and pktinfo in one sendmsg)."""
        return self.socket._send_segments(segments, addr, self._cmsg)

    async def recv_batch(self, max_datagrams: int) -> list[tuple[bytes, Address]]:
        """The socket's :meth:`PathSocket.recv_batch` (datagrams to any of its addresses)."""
        return await self.socket.recv_batch(max_datagrams)


#: The gateway's socket is the same class, opened with :func:`open_listener_socket`.
ListenerSocket = PathSocket


# -- creation ------------------------------------------------------------------------------

def _set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    """Set a buffer size with the *FORCE option (CAP_NET_ADMIN, beyond rmem/wmem_max), else the plain one."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


def _check_buffer(what: str, size: int) -> None:
    if not 1 <= size <= MAX_SOCKET_BUFFER_BYTES:
        raise PathSocketError(f"{what} {size} is out of range 1..{MAX_SOCKET_BUFFER_BYTES}")


def _numeric_host(host: str, family: int) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise PathSocketError(f"bind address {host!r} is not a numeric IP address") from None
    if (ip.version == 4) != (family == socket.AF_INET):
        raise PathSocketError(f"bind address {host!r} does not match the socket family")


def _setup(*, bind: Address, device: str | None, fwmark: int | None, family: int, gro: bool,
           rcvbuf: int, sndbuf: int, pktinfo: bool = False) -> PathSocket:
    """A configured, bound socket; ``pktinfo``: report destination addresses if ``bind`` is a wildcard."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise PathSocketError(f"unsupported address family {family!r}")
    _numeric_host(bind[0], family)
    pktinfo = pktinfo and ipaddress.ip_address(bind[0]).is_unspecified
    _check_buffer("rcvbuf", rcvbuf)
    _check_buffer("sndbuf", sndbuf)
    if fwmark is not None and not 0 <= fwmark <= 0xFFFFFFFF:
        raise PathSocketError(f"fwmark {fwmark:#x} is not a 32-bit value")
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    step = "configure"
    try:
        if family == socket.AF_INET6:
            step = "set IPV6_V6ONLY"
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if device is not None:
            step = f"bind to device {device!r}"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if fwmark is not None:
            step = f"set fwmark {fwmark:#x}"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
        step = "set buffer sizes"
        _set_buffer(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        _set_buffer(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
        gro_on = False
        if gro:
            try:
                sock.setsockopt(_SOL_UDP, UDP_GRO, 1)
                gro_on = True
            except OSError as exc:
                if exc.errno not in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    raise
        try:
            sock.getsockopt(_SOL_UDP, UDP_SEGMENT)
            gso_on = True
        except OSError as exc:
            if exc.errno not in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                raise
            gso_on = False
        if pktinfo:
            step = "ask for destination addresses (IP_PKTINFO / IPV6_RECVPKTINFO)"
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        step = f"bind {bind[0]} port {bind[1]}"
        sock.bind(bind)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno in _PERMISSION_ERRNOS:
            reason = "permission denied (not root / no CAP_NET_RAW or CAP_NET_ADMIN)"
        elif exc.errno == errno.ENODEV:
            reason = "no such device"
        raise PathSocketError(f"cannot open UDP socket: {step}: {reason}") from None
    except BaseException:
        sock.close()
        raise
    return PathSocket(sock, device=device, fwmark=fwmark, gro=gro_on, gso=gso_on, pktinfo=pktinfo)


@asynccontextmanager
async def _opened(**setup: Any) -> AsyncIterator[PathSocket]:
    await trio.lowlevel.checkpoint()
    path = _setup(**setup)
    try:
        yield path
    finally:
        path.close()


@asynccontextmanager
async def open_path_socket(*, bind: Address = ("0.0.0.0", 0), device: str | None, fwmark: int | None,
                           family: int = socket.AF_INET, gro: bool = False,
                           rcvbuf: int = DEFAULT_RCVBUF_BYTES,
                           sndbuf: int = DEFAULT_SNDBUF_BYTES) -> AsyncIterator[PathSocket]:
    """Open a UDP socket for one path, pinned to ``device`` and marked with ``fwmark`` (None: not set).

    ``bind`` must be numeric.  ``gro=True`` turns UDP_GRO on when the kernel
    has it (``PathSocket.gro`` says whether it did).  The socket is created in
    the calling thread's network namespace and closed when the block exits.
    Raises :class:`PathSocketError` (one line): unknown device, no
    permission for SO_BINDTODEVICE/SO_MARK, address in use or not local.
    """
    async with _opened(bind=bind, device=device, fwmark=fwmark, family=family, gro=gro, rcvbuf=rcvbuf,
                       sndbuf=sndbuf) as path:
        yield path


@asynccontextmanager
async def open_listener_socket(bind: Address, *, family: int = socket.AF_INET, gro: bool = False,
                               rcvbuf: int = DEFAULT_RCVBUF_BYTES,
                               sndbuf: int = DEFAULT_SNDBUF_BYTES) -> AsyncIterator[ListenerSocket]:
    """Open the gateway's UDP socket bound to ``bind`` (no device, no mark).

    Bound to a wildcard (``0.0.0.0``, ``::``) it has ``pktinfo`` on, so that
    :meth:`PathSocket.recv_batch_routed` hands out ports answering from the
    address each client reached (module docstring, "Answering").
    """
    async with _opened(bind=bind, device=None, fwmark=None, family=family, gro=gro, rcvbuf=rcvbuf,
                       sndbuf=sndbuf, pktinfo=True) as sock:
        yield sock
