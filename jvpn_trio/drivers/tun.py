"""The TUN device driver: a pytun device behind a non-blocking fd, read in batches from Trio.

Theory of operation
-------------------
:func:`open_tun` creates a layer-3 TUN device (``IFF_TUN | IFF_NO_PI``, plus
``IFF_VNET_HDR`` on request) with python-pytun, configures it and hands back
a :class:`TunDevice`.  Closing the fd (on leaving the context) destroys the
device: it is never made persistent.

Setup is a handful of ioctls and one procfs write, all of which complete
immediately, so it runs inline on the calling thread rather than in
``trio.to_thread``.  That is deliberate: a TUN device (and the AF_INET socket
pytun uses to configure it) is created in the network namespace of the
*calling thread*, so a test or lab that enters a namespace with pyroute2's
``pushns()`` gets its device there.  A worker thread would not share it.

IPv6: the tunnel carries both families, so by default (``ipv6=True``) IPv6
stays on but its autoconfiguration is off (``addr_gen_mode=1``, "none",
before the device is brought up): the device gets no link-local address, so
the kernel sends no router solicitations into the tunnel, and routes and
addresses of IPv6 can still be put on it (``disable_ipv6=1`` would refuse
both with EACCES).  ``ipv6=False`` switches IPv6 off on the device
(``disable_ipv6=1``) as before.  Readers must still expect a stray packet
(platform-notes section 3 saw one early packet already queued; an MLD report
may follow an IPv6 address).

**Reading** (platform-notes section 3).  The fd is non-blocking.
:meth:`TunDevice.read_batch` tries to read first, and only when nothing is
queued does it wait for readability, once, before draining up to
``max_packets`` packets with ``os.read`` until ``BlockingIOError``.  This is
trio's own non-blocking-socket pattern (``checkpoint_if_cancelled``, try,
``wait_readable`` on EAGAIN, ``cancel_shielded_checkpoint``): a cancellation
can only arrive *before* packets are taken off the device, never after, so
no packet is lost to a cancel.  Every call is still a checkpoint.

**Writing** never blocks the event loop.  :meth:`TunDevice.write_batch`
writes what one received batch delivered, one ``os.write`` per frame;
:meth:`TunDevice.write_nowait` is the same for one packet.  On EAGAIN (the
device queue is full) a frame is dropped and counted.  A frame the kernel
refuses (EINVAL: not an IP packet, or a bad virtio header; EIO: the device
is down) is also dropped and counted by errno name, because what we write
comes from the peer, and a peer must not be able to crash the data path
with a malformed packet.  Any other error is a bug and propagates.
:meth:`TunDevice.write` waits for writability instead of dropping on EAGAIN.

**VNET_HDR mode** (platform-notes section 3, docs/offload.md).  With
``vnet_hdr=True`` the device is created with ``IFF_VNET_HDR`` and
``TUNSETOFFLOAD`` is asked for checksum, TSO and USO offloads, falling back
to smaller sets on EINVAL (see :data:`OFFLOAD_ATTEMPTS`; the accepted set is
in ``TunDevice.offload_flags``).  Every frame read or written then starts
with a ``virtio_net_hdr`` and can be a GSO super-frame of up to 64 KiB.  The
device hides that from its callers: reads return the packets the frames
carry (``core/offload.py`` ``split_frame``), and a batch to write is glued
into frames (``coalesce``).  Callers see packets either way, some of them
:class:`~jvpn_trio.core.offload.PartialPacket`.

One task reads and (at most) one task waits to write: trio raises
``BusyResourceError`` if two tasks wait for the same direction of one fd.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Final, Protocol

import attrs
import pytun  # type: ignore[import-untyped,import-not-found,unused-ignore]
import trio

from jvpn_trio.core.offload import (
    VIRTIO_NET_HDR_GSO_NONE,
    VNET_HDR_LEN,
    Coalesced,
    OffloadError,
    coalesce,
    completed,
    split_frame,
)

__all__ = [
    "COALESCE_MAX_SEGMENTS",
    "OFFLOAD_ATTEMPTS",
    "READ_SIZE",
    "STATUS_COUNTER_PREFIX",
    "TUNSETOFFLOAD",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_USO4",
    "TUN_F_USO6",
    "TUN_PATH",
    "WRITE_DROP_ERRNOS",
    "TunDevice",
    "TunError",
    "TunStatistics",
    "open_tun",
]

#: The clone device every TUN is created from.
TUN_PATH: Final = "/dev/net/tun"

# ioctl numbers and flags from <linux/if_tun.h> (measured in platform-notes section 3).
TUNSETOFFLOAD: Final = 0x400454D0
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_F_USO4: Final = 0x20
TUN_F_USO6: Final = 0x40

#: Offload sets tried in order until ``TUNSETOFFLOAD`` accepts one.  USO needs
#: Linux 6.2, and the kernel rejects unknown bits with EINVAL.  TSO requires CSUM.
#: The last entry (no offloads) always succeeds.
OFFLOAD_ATTEMPTS: Final[tuple[int, ...]] = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    TUN_F_CSUM,
    0,
)

#: Bytes asked of each ``os.read``: the largest IPv4/IPv6 (GSO) packet plus the
#: virtio header, so a packet is never truncated even if someone raises the MTU
#: behind our back.  ``os.read`` shrinks the result to the packet's size, and
#: measuring showed no cost over reading ``mtu`` bytes.
READ_SIZE: Final = 65536 + VNET_HDR_LEN
#: Prefix of the device's counters (:meth:`TunDevice.statistics`) in ``status`` reports.
STATUS_COUNTER_PREFIX: Final = "tun."
#: At most this many TCP segments glued into one written frame: Linux's own GRO stops at 64
#: (``MAX_GRO_SKBS``), and 64 KiB, the IP length limit, is reached first at any usual MSS.
COALESCE_MAX_SEGMENTS: Final = 64

_MIN_MTU: Final = 68  # RFC 791 minimum, the kernel's IPv4 floor
_MAX_MTU: Final = 65535
_IFNAMSIZ: Final = 16
#: Errnos with which the kernel refuses one written packet: the packet is
#: dropped and counted, the device stays usable.
WRITE_DROP_ERRNOS: Final = frozenset({errno.EINVAL, errno.EIO})
_PERMISSION_ERRNOS: Final = frozenset({errno.EPERM, errno.EACCES})


class TunError(Exception):
    """A TUN device that cannot be created, configured or used; ``str()`` is one line."""


def _frozen_counts(counts: Mapping[str, int]) -> Mapping[str, int]:
    """A read-only copy of a counter dict, for frozen statistics records."""
    return MappingProxyType(dict(counts))


@attrs.frozen(kw_only=True)
class TunStatistics:
    """Counters of one :class:`TunDevice` (trio-style ``statistics()`` record).

    ``write_drops`` counts EAGAIN refusals of :meth:`TunDevice.write_nowait`;
    ``write_errors`` counts packets the kernel refused, by errno name
    (:data:`WRITE_DROP_ERRNOS`).  ``read_wakeups`` counts waits for
    readability that ended; ``read_batches`` counts non-empty batches and
    ``max_batch`` is the largest.  ``gso_frames_read`` counts VNET_HDR frames
    whose header has a GSO type (always 0 without VNET_HDR), and
    ``gso_frames_written`` the glued frames written.  ``packets_read`` and
    ``packets_written`` count frames, ``segments_read`` the packets cut from
    them.  ``offload_refused`` counts, by reason, frames read and packets to
    write that the offload code could not take (core/offload.py).
    """

    packets_read: int
    bytes_read: int
    packets_written: int
    bytes_written: int
    write_drops: int
    write_errors: Mapping[str, int] = attrs.field(converter=_frozen_counts, hash=False)
    read_wakeups: int
    read_batches: int
    max_batch: int
    gso_frames_read: int
    segments_read: int = 0
    gso_frames_written: int = 0
    offload_refused: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_counts, hash=False)


def _notify_closing(handle: int | socket.socket) -> None:
    """Wake tasks waiting on ``handle`` with ClosedResourceError; a no-op outside ``trio.run``."""
    try:
        trio.lowlevel.notify_closing(handle)
    except RuntimeError:  # "must be called from async context": nobody can be waiting
        pass


class _FdOwner(Protocol):
    """What a TunDevice needs from the object that owns its fd (a pytun device, or a socket in tests)."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class TunDevice:
    """An open TUN device; created by :func:`open_tun`.

    The constructor only wraps an already configured, non-blocking fd owner
    (tests pass one end of a ``socketpair``); it does no I/O.
    """

    def __init__(self, owner: _FdOwner, *, name: str, mtu: int, vnet_hdr: bool = False,
                 offload_flags: int = 0, ipv6_disabled: bool = False) -> None:
        self._owner = owner
        self._fd = owner.fileno()
        self.name = name
        self.mtu = mtu
        #: True when every frame read or written carries a virtio_net_hdr.
        self.vnet_hdr = vnet_hdr
        #: The ``TUN_F_*`` set that ``TUNSETOFFLOAD`` accepted (0 without VNET_HDR).
        self.offload_flags = offload_flags
        #: False when ``/proc/sys/net/ipv6/conf/<name>/disable_ipv6`` was absent or not writable.
        self.ipv6_disabled = ipv6_disabled
        self._packets_read = 0
        self._bytes_read = 0
        self._packets_written = 0
        self._bytes_written = 0
        self._write_drops = 0
        self._write_errors: dict[str, int] = {}
        self._read_wakeups = 0
        self._read_batches = 0
        self._max_batch = 0
        self._gso_frames_read = 0
        self._segments_read = 0
        self._gso_frames_written = 0
        self._offload_refused: dict[str, int] = {}

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<TunDevice {self.name!r} mtu={self.mtu} vnet_hdr={self.vnet_hdr} {state}>"

    def fileno(self) -> int:
        """The device fd (-1 once closed)."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _live_fd(self) -> int:
        if self._fd < 0:
            raise trio.ClosedResourceError(f"TUN device {self.name!r} is closed")
        return self._fd

    # -- reading ---------------------------------------------------------------------------

    async def read_batch(self, max_packets: int) -> list[bytes]:
        """Wait until at least one packet is queued, then return the packets of up to ``max_packets`` reads.

        In VNET_HDR mode each read is a frame, cut into the packets it carries
        (:func:`~jvpn_trio.core.offload.split_frame`): a TSO frame gives up to
        64 KiB of them, and a frame the offload code refuses is counted and
        dropped.  Raises ``trio.ClosedResourceError`` if the device is (or gets)
        closed, and :class:`TunError` if the kernel detached the device
        (deleted with ``ip link del``).  Cancellation never loses packets
        (module docstring).
        """
        if max_packets < 1:
            raise ValueError(f"max_packets must be at least 1, got {max_packets}")
        await trio.lowlevel.checkpoint_if_cancelled()
        packets = self._drain(self._live_fd(), max_packets)
        if packets:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while not packets:
            await trio.lowlevel.wait_readable(self._live_fd())
            self._read_wakeups += 1
            packets = self._drain(self._live_fd(), max_packets)  # empty on a spurious wakeup
        n = len(packets)
        self._read_batches += 1
        self._max_batch = max(self._max_batch, n)
        return packets

    def _split(self, frames: list[bytes]) -> list[bytes]:
        packets: list[bytes] = []
        for frame in frames:
            try:
                cut = split_frame(frame)
            except OffloadError as exc:
                self._refused(exc.reason)
                continue
            if len(cut) > 1:
                self._gso_frames_read += 1
            packets += cut
        self._segments_read += len(packets)
        return packets

    def _refused(self, reason: str, count: int = 1) -> None:
        self._offload_refused[reason] = self._offload_refused.get(reason, 0) + count

    def _frames(self, packets: Sequence[bytes], *, max_segments: int) -> Coalesced:
        """What to write for ``packets``: glued in VNET_HDR mode, else each alone, completed; refusals counted."""
        frames = coalesce(packets, max_segments=max_segments) if self.vnet_hdr else completed(packets)
        for reason, count in frames.refused.items():
            self._refused(reason, count)
        return frames

    def _drain(self, fd: int, max_packets: int) -> list[bytes]:
        packets: list[bytes] = []
        read = os.read
        try:
            while len(packets) < max_packets:
                packets.append(read(fd, READ_SIZE))
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno == errno.EBADFD:
                raise TunError(f"TUN device {self.name!r} was detached or deleted") from None
            raise
        if packets:
            self._packets_read += len(packets)
            self._bytes_read += sum(map(len, packets))
            if self.vnet_hdr:
                return self._split(packets)
        return packets

    # -- writing ---------------------------------------------------------------------------

    def write_nowait(self, packet: bytes) -> bool:
        """Hand one packet to the kernel (behind its virtio header in VNET_HDR mode); never blocks.

        Returns False, counting a drop, when the device queue is full
        (EAGAIN) or the kernel refuses the packet (EINVAL, EIO: counted by
        errno name).  Raises ``trio.ClosedResourceError`` once closed and
        :class:`TunError` if the kernel detached the device.
        """
        return self.write_batch([packet]) == 0

    def write_batch(self, packets: Sequence[bytes]) -> int:
        """Write ``packets`` in order, never blocking; the number of frames or packets dropped.

        In VNET_HDR mode consecutive TCP segments of a flow leave glued into
        one GSO frame (:func:`~jvpn_trio.core.offload.coalesce`) and a
        PartialPacket's checksum is left to the kernel; without it, such a
        checksum is completed here.  A packet the offload code refuses is
        counted (``offload_refused``) and dropped.
        """
        fd = self._live_fd()
        frames = self._frames(packets, max_segments=COALESCE_MAX_SEGMENTS)
        dropped = len(packets) - frames.packets_in_frames
        write = os.write
        for frame in frames.frames:
            try:
                written = write(fd, frame)
            except BlockingIOError:
                self._write_drops += 1
                dropped += 1
                continue
            except OSError as exc:
                self._count_write_error(exc)
                dropped += 1
                continue
            self._packets_written += 1
            self._bytes_written += written
            if self.vnet_hdr and frame[1] != VIRTIO_NET_HDR_GSO_NONE:
                self._gso_frames_written += 1
        return dropped

    async def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Like :meth:`write_nowait`, but wait for writability instead of dropping on EAGAIN.

        Returns False only when the kernel (or, for a PartialPacket, the offload code) refused the packet.  Bounded by the
        caller's cancel scope; a cancelled write has not written the packet.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        framed = self._frames([bytes(packet)], max_segments=1).frames
        if not framed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return False
        packet = framed[0]
        while True:
            fd = self._live_fd()
            try:
                written = os.write(fd, packet)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            except OSError as exc:
                self._count_write_error(exc)
                await trio.lowlevel.cancel_shielded_checkpoint()
                return False
            self._packets_written += 1
            self._bytes_written += written
            await trio.lowlevel.cancel_shielded_checkpoint()
            return True

    def _count_write_error(self, exc: OSError) -> None:
        """Count a refused packet by errno name, or raise: TunError if the device is gone, else ``exc``."""
        if exc.errno == errno.EBADFD:
            raise TunError(f"TUN device {self.name!r} was detached or deleted") from None
        if exc.errno not in WRITE_DROP_ERRNOS:
            raise exc
        name = errno.errorcode[exc.errno]
        self._write_errors[name] = self._write_errors.get(name, 0) + 1

    # -- lifetime --------------------------------------------------------------------------

    def statistics(self) -> TunStatistics:
        return TunStatistics(
            packets_read=self._packets_read, bytes_read=self._bytes_read,
            packets_written=self._packets_written, bytes_written=self._bytes_written,
            write_drops=self._write_drops, write_errors=self._write_errors,
            read_wakeups=self._read_wakeups, read_batches=self._read_batches,
            max_batch=self._max_batch, gso_frames_read=self._gso_frames_read,
            segments_read=self._segments_read, gso_frames_written=self._gso_frames_written,
            offload_refused=self._offload_refused,
        )

    def close(self) -> None:
        """Close the fd (the device disappears); idempotent.  Waiting tasks get ClosedResourceError."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        _notify_closing(fd)
        self._owner.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


# -- creation ------------------------------------------------------------------------------

def _check_name(name: str) -> None:
    """Linux's dev_valid_name(), minus the ``%d`` templates we do not want."""
    encoded = name.encode("utf-8", "replace")
    if (not name or len(encoded) >= _IFNAMSIZ or name in (".", "..")
            or any(c in name for c in "/:%") or any(c.isspace() for c in name)):
        raise TunError(f"invalid interface name {name!r}: need 1-{_IFNAMSIZ - 1} bytes "
                       "without '/', ':', '%' or whitespace")


def _errno_of(exc: BaseException) -> int | None:
    """pytun.Error carries ``(errno, message)`` or just ``(message,)``; OSError has ``.errno``."""
    if isinstance(exc, OSError):
        return exc.errno
    if exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def _message_of(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc.args[-1]) if exc.args else type(exc).__name__


def _create_error(name: str, exc: BaseException, *, existed: bool) -> TunError:
    code = _errno_of(exc)
    if code in _PERMISSION_ERRNOS:
        return TunError(f"cannot create TUN device {name!r}: permission denied (not root / no CAP_NET_ADMIN)")
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return TunError(f"cannot create TUN device {name!r}: no {TUN_PATH} (kernel without TUN support?)")
    if code == errno.EBUSY:
        return TunError(f"cannot create TUN device {name!r}: name in use by another open TUN device")
    if code == errno.EINVAL and existed:
        return TunError(f"cannot create TUN device {name!r}: name in use by a non-TUN interface")
    return TunError(f"cannot create TUN device {name!r}: {_message_of(exc)}")


def _interface_exists(name: str) -> bool:
    """Whether ``name`` is taken in the calling thread's network namespace (no sysfs: it may be another ns's)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _disable_ipv6(name: str) -> bool:
    """Write disable_ipv6=1 for ``name``; False when the knob is absent (no IPv6) or read-only."""
    return _write_ipv6_knob(name, "disable_ipv6", "1")


def _no_ipv6_autoconf(name: str) -> bool:
    """Write addr_gen_mode=1 (no link-local address) for ``name``; False when the knob is absent or read-only."""
    return _write_ipv6_knob(name, "addr_gen_mode", "1")


def _write_ipv6_knob(name: str, knob: str, value: str) -> bool:
    """Write ``/proc/sys/net/ipv6/conf/<name>/<knob>``; False when it is absent (no IPv6) or read-only."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/{knob}", "w", encoding="ascii") as f:
            f.write(value)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno in _PERMISSION_ERRNOS or exc.errno == errno.EROFS:
            return False
        raise
    return True


def _set_offloads(fd: int) -> int:
    for flags in OFFLOAD_ATTEMPTS:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            continue
        return flags
    return 0  # unreachable in practice: 0 is always accepted


def _create(name: str, *, address: str | None, prefixlen: int, mtu: int, vnet_hdr: bool, ipv6: bool = True) -> TunDevice:
    _check_name(name)
    if not _MIN_MTU <= mtu <= _MAX_MTU:
        raise TunError(f"TUN device {name!r}: mtu {mtu} is out of range {_MIN_MTU}..{_MAX_MTU}")
    netmask: str | None = None
    if address is not None:
        try:
            iface = ipaddress.IPv4Interface(f"{address}/{prefixlen}")
        except ValueError as exc:
            raise TunError(f"TUN device {name!r}: bad IPv4 address/prefix {address}/{prefixlen}: {exc}") from None
        netmask = str(iface.netmask)
    if not os.path.exists(TUN_PATH):
        raise TunError(f"cannot create TUN device {name!r}: no {TUN_PATH} (kernel without TUN support?)")

    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet_hdr else 0)
    existed = _interface_exists(name)
    try:
        dev = pytun.TunTapDevice(name=name, flags=flags)
    except (pytun.Error, OSError) as exc:
        raise _create_error(name, exc, existed=existed) from None

    step = "set up"
    try:
        fd = dev.fileno()
        offload_flags = 0
        if vnet_hdr:
            step = "enable offloads (TUNSETOFFLOAD)"
            offload_flags = _set_offloads(fd)
        if ipv6:
            step = "turn IPv6 autoconfiguration off"
            ipv6_disabled = False
            _no_ipv6_autoconf(name)
        else:
            step = "disable IPv6"
            ipv6_disabled = _disable_ipv6(name)
        if address is not None:
            step = f"set address {address}/{prefixlen}"
            dev.addr = address
            dev.netmask = netmask
        step = f"set mtu {mtu}"
        dev.mtu = mtu
        step = "bring it up"
        dev.up()
        os.set_blocking(fd, False)
    except (pytun.Error, OSError) as exc:
        dev.close()
        code = _errno_of(exc)
        if code in _PERMISSION_ERRNOS:
            raise TunError(f"cannot configure TUN device {name!r}: permission denied "
                           "(not root / no CAP_NET_ADMIN)") from None
        raise TunError(f"cannot configure TUN device {name!r}: {step}: {_message_of(exc)}") from None
    except BaseException:
        dev.close()
        raise
    return TunDevice(dev, name=name, mtu=mtu, vnet_hdr=vnet_hdr, offload_flags=offload_flags,
                     ipv6_disabled=ipv6_disabled)


@asynccontextmanager
async def open_tun(name: str, *, address: str | None, prefixlen: int, mtu: int,
                   vnet_hdr: bool = False, ipv6: bool = True) -> AsyncIterator[TunDevice]:
    """Create TUN device ``name``, configured and up, for the duration of the block.

    ``address``/``prefixlen`` give the device its IPv4 address and on-link
    route (``None``: no address); an IPv6 address is added afterwards
    (``routes.set_tun_address``).  ``ipv6=False`` switches IPv6 off on the
    device (see the module docstring).  The device lives in the calling thread's
    network namespace and disappears when the block exits.  Raises
    :class:`TunError` (one line) if it cannot be created or configured:
    no /dev/net/tun, not root / no CAP_NET_ADMIN, name invalid or in use.
    """
    await trio.lowlevel.checkpoint()
    device = _create(name, address=address, prefixlen=prefixlen, mtu=mtu, vnet_hdr=vnet_hdr, ipv6=ipv6)
    try:
        yield device
    finally:
        device.close()
