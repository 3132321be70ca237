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
from collections.abc import AsyncIterator, Mapping, Sequence
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
    "MAX_SOCKET_BUFFER_BYTES",
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
    "UdpStatistics",
    "open_listener_socket",
    "open_path_socket",
    "split_gro_buffer",
]

#: ``<linux/udp.h>``; Python 3.11 has no names for them (platform-notes section 4).
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104
_SOL_UDP: Final = socket.IPPROTO_UDP

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
_PERMISSION_ERRNOS: Final = frozenset({errno.EPERM, errno.EACCES})
# <asm-generic/socket.h>; not every typeshed knows them.
_SO_RCVBUFFORCE: Final[int] = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE: Final[int] = getattr(socket, "SO_SNDBUFFORCE", 32)
_GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
_INT = struct.Struct("=i")
_U16 = struct.Struct("=H")

Address = tuple[Any, ...]  # (host, port), for both families (module docstring, "IPv6")


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
    resent one datagram at a time.
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


def split_gro_buffer(buffer: bytes, segment_size: int) -> list[bytes]:
    """Cut a GRO buffer into its datagrams: ``segment_size`` bytes each, the last possibly shorter."""
    if segment_size <= 0 or len(buffer) <= segment_size:
        return [buffer]
    return [buffer[i:i + segment_size] for i in range(0, len(buffer), segment_size)]


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
    """

    def __init__(self, sock: socket.socket, *, device: str | None = None, fwmark: int | None = None,
                 gro: bool = False, gso: bool = False) -> None:
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
        self._carry: deque[tuple[bytes, Address]] = deque()
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

    def __repr__(self) -> str:
        where = "closed" if self._fd < 0 else f"{self.local_address}"
        return f"<PathSocket {where} device={self.device!r} fwmark={self.fwmark!r} gro={self.gro}>"

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
        if max_datagrams < 1:
            raise ValueError(f"max_datagrams must be at least 1, got {max_datagrams}")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._live_fd()
        batch = self._drain(max_datagrams)
        if batch:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while not batch:
            await trio.lowlevel.wait_readable(self._live_fd())
            self._recv_wakeups += 1
            batch = self._drain(max_datagrams)  # empty on a spurious wakeup
        n = len(batch)
        self._datagrams_in += n
        self._bytes_in += sum(len(d) for d, _ in batch)
        self._recv_batches += 1
        if n > self._max_batch:
            self._max_batch = n
        return batch

    def _drain(self, max_datagrams: int) -> list[tuple[bytes, Address]]:
        batch: list[tuple[bytes, Address]] = []
        carry = self._carry
        while carry and len(batch) < max_datagrams:
            batch.append(carry.popleft())
        if carry:
            return batch
        sock = self._sock
        try:
            if not self.gro:
                recvfrom = sock.recvfrom
                if self._v6:
                    while len(batch) < max_datagrams:
                        data, source = recvfrom(RECV_SIZE)
                        batch.append((data, source[:2]))
                else:
                    while len(batch) < max_datagrams:
                        batch.append(recvfrom(RECV_SIZE))
            else:
                while len(batch) < max_datagrams:
                    data, ancdata, _flags, source = sock.recvmsg(RECV_SIZE, _GRO_CMSG_SPACE)
                    source = source[:2]
                    segment_size = 0
                    for level, kind, cdata in ancdata:
                        if level == _SOL_UDP and kind == UDP_GRO and len(cdata) >= _INT.size:
                            segment_size = _INT.unpack_from(cdata)[0]
                    if 0 < segment_size < len(data):
                        pieces = split_gro_buffer(data, segment_size)
                        self._gro_buffers += 1
                        self._gro_segments += len(pieces)
                        room = max_datagrams - len(batch)
                        batch.extend((p, source) for p in pieces[:room])
                        carry.extend((p, source) for p in pieces[room:])
                    else:
                        batch.append((data, source))
        except BlockingIOError:
            pass
        return batch

    # -- sending --------------------------------------------------------------------------

    def send_nowait(self, data: bytes | bytearray | memoryview, addr: Address) -> SendResult:
        """Send one datagram without blocking; never raises for EAGAIN or :data:`PATH_ERRNOS`.

        Raises ``trio.ClosedResourceError`` once closed, OSError for bugs (EMSGSIZE...).
        """
        self._live_fd()
        try:
            sent = self._sock.sendto(data, addr)
        except BlockingIOError:
            self._sends_would_block += 1
            return SendResult.WOULD_BLOCK
        except OSError as exc:
            return self._path_error(exc)
        self._datagrams_out += 1
        self._bytes_out += sent
        return SendResult.OK

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
        self._live_fd()
        n = len(segments)
        if n == 0:
            return BatchSendResult(0, SendResult.OK)
        size = len(segments[0])
        if (n == 1 or not self.gso or size == 0 or len(segments[-1]) > size or len(segments[-1]) == 0
                or any(len(segments[i]) != size for i in range(1, n - 1))):
            return self._send_each(segments, 0, n, addr)
        per_chunk = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
        sent = 0
        while sent < n:
            end = min(n, sent + per_chunk)
            result = self._send_gso(segments, sent, end, size, addr)
            if result is None:  # the kernel would not segment this chunk: one by one
                self._gso_fallbacks += 1
                batch = self._send_each(segments, sent, end, addr)
                if not batch.result.ok:
                    return batch
            elif not result.ok:
                return BatchSendResult(sent, result)
            sent = end
        return BatchSendResult(n, SendResult.OK)

    def _send_gso(self, segments: Sequence[bytes | bytearray | memoryview], start: int, end: int, size: int,
                  addr: Address) -> SendResult | None:
        """One GSO sendmsg of ``segments[start:end]``; None when the kernel refused to segment it."""
        if end - start == 1:
            return self.send_nowait(segments[start], addr)
        payload = b"".join(segments[start:end])
        try:
            sent = self._sock.sendmsg([payload], [(_SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr)
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
                   addr: Address) -> BatchSendResult:
        for i in range(start, end):
            result = self.send_nowait(segments[i], addr)
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
        )

    def close(self) -> None:
        """Close the socket; idempotent.  Tasks waiting on it get ClosedResourceError."""
        if self._fd < 0:
            return
        self._fd = -1
        _notify_closing(self._sock)
        self._sock.close()
        self._carry.clear()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


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
           rcvbuf: int, sndbuf: int) -> PathSocket:
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise PathSocketError(f"unsupported address family {family!r}")
    _numeric_host(bind[0], family)
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
    return PathSocket(sock, device=device, fwmark=fwmark, gro=gro_on, gso=gso_on)


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
    await trio.lowlevel.checkpoint()
    path = _setup(bind=bind, device=device, fwmark=fwmark, family=family, gro=gro, rcvbuf=rcvbuf, sndbuf=sndbuf)
    try:
        yield path
    finally:
        path.close()


@asynccontextmanager
async def open_listener_socket(bind: Address, *, family: int = socket.AF_INET, gro: bool = False,
                               rcvbuf: int = DEFAULT_RCVBUF_BYTES,
                               sndbuf: int = DEFAULT_SNDBUF_BYTES) -> AsyncIterator[ListenerSocket]:
    """Open the gateway's UDP socket bound to ``bind`` (no device, no mark).

    Bind the exact public address rather than 0.0.0.0 when clients check
    where replies come from: a wildcard socket answers from the address of
    the outgoing interface (platform-notes section 1).
    """
    async with open_path_socket(bind=bind, device=None, fwmark=None, family=family, gro=gro,
                                rcvbuf=rcvbuf, sndbuf=sndbuf) as sock:
        yield sock
