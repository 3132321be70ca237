"""The two I/O shapes the runtimes need.

A *datagram port* is one UDP socket (a path's socket on the client, a
listener on the gateway); a *packet port* is a TUN device.  The runtimes
are written against these protocols so the same code runs over real
sockets and TUN devices (``udp.py``, ``tun.py``), over loopback for the
no-root demo, and over in-memory doubles (``memory.py``) in tests (wireguard-go's
``conn.Bind`` / ``tun.Device`` idea).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, Sequence

from jvpn_trio.core.wire import is_data_untrusted

Address = tuple[str, int]


class DatagramPort(Protocol):
    def send_nowait(self, data: bytes, addr: Address) -> object:
        """Send without blocking; a full or failing socket drops (and counts) instead of raising."""
        ...

    def send_segments_nowait(self, segments: Sequence[bytes], addr: Address) -> object:
        """Send several datagrams at once (one UDP_SEGMENT syscall when all but the last are equal)."""
        ...

    async def recv_batch(self, max_datagrams: int) -> list[tuple[bytes, Address]]:
        """Wait for at least one datagram, then return what is ready (at most ``max_datagrams``)."""
        ...


class PacketPort(Protocol):
    async def read_batch(self, max_packets: int) -> list[bytes]:
        """Wait for at least one packet, then return what is ready (PartialPackets among them, core/offload.py)."""
        ...

    def write_batch(self, packets: Sequence[bytes]) -> int:
        """Write ``packets`` in order without blocking (glued where the device takes it); how many were dropped."""
        ...


class DeliveryBuffer:
    """DATA opened from the batch being received, written to the TUN at the batch's end in one call.

    One write per batch is what lets a TUN with offloads glue a flow's segments (core/offload.py).
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[bytes] = []

    def extend(self, packets: list[bytes]) -> None:
        """Queue what a run opened; an empty packet is a keepalive, counted by the caller, never written."""
        self._pending.extend([packet for packet in packets if packet])

    def flush(self, port: PacketPort) -> int:
        """Write what was added since the last flush to ``port``; how many it dropped."""
        pending = self._pending
        if not pending:
            return 0
        self._pending = []
        return port.write_batch(pending)


def equal_size_runs(datagrams: list[bytes]) -> list[list[bytes]]:
    """Split into runs that one UDP_SEGMENT send can carry: equal sizes, the last may be shorter."""
    runs: list[list[bytes]] = []
    for data in datagrams:
        run = runs[-1] if runs else None
        if run is not None and len(data) <= len(run[0]) and len(run[-1]) == len(run[0]):
            run.append(data)
        else:
            runs.append([data])
    return runs



def shed_oldest_data(
    batch: list[tuple[bytes, Address]], keep: int, is_peer: Callable[[Address], bool]
) -> tuple[list[tuple[bytes, Address]], int, int]:
    """A long read cut down: ``(kept, shed, strays)``.

    Datagrams from anyone but the peer go first (``strays`` of them), then the oldest DATA
    beyond the newest ``keep``: ``kept`` holds every other datagram in order.  A receiver that
    has fallen behind a flood still reads the control frames queued in it, and opens no more
    DATA than it can in time.  Only the peer's own datagrams count, so junk from elsewhere
    cannot push its DATA out; a forged "DATA" from the peer's address is shed like a real one,
    never a control frame.
    """
    from_peer = [item for item in batch if is_peer(item[1])]
    strays = len(batch) - len(from_peer)
    excess = sum(1 for data, _ in from_peer if is_data_untrusted(data)) - keep
    if excess <= 0:
        return from_peer, 0, strays
    shed = excess
    kept = []
    for item in from_peer:
        if excess and is_data_untrusted(item[0]):
            excess -= 1
        else:
            kept.append(item)
    return kept, shed, strays
