"""In-memory doubles of the two ports: a TUN (``MemoryPacketPort``) and a network of UDP sockets.

Tests and the no-root demo run the real runtimes over these (wireguard-go's
``bindtest``/``tuntest`` idea); nothing in the product's own paths uses them.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import trio

from jvpn_trio.core.offload import completed
from jvpn_trio.drivers.ports import Address

T = TypeVar("T")


async def _receive_batch(receive: trio.MemoryReceiveChannel[T], most: int) -> list[T]:
    """Wait for one item, then take whatever else is queued, up to ``most`` in all."""
    batch = [await receive.receive()]
    while len(batch) < most:
        try:
            batch.append(receive.receive_nowait())
        except trio.WouldBlock:
            break
    return batch


class MemoryPacketPort:
    """A TUN double: ``inject`` plays the OS sending into the tunnel, ``delivered`` what came out."""

    def __init__(self, capacity: int = 1024) -> None:
        self._send, self._recv = trio.open_memory_channel[bytes](capacity)
        self._out_send, self.delivered = trio.open_memory_channel[bytes](capacity)
        self.dropped = 0

    def inject(self, packet: bytes) -> bool:
        return self._offer(self._send, packet)

    async def read_batch(self, max_packets: int) -> list[bytes]:
        return await _receive_batch(self._recv, max_packets)

    def write_nowait(self, packet: bytes) -> bool:
        return self._offer(self._out_send, packet)

    def write_batch(self, packets: Sequence[bytes]) -> int:
        """As a TUN without offloads takes them: a PartialPacket's checksum completed, a broken one dropped."""
        frames = completed(packets)
        return len(packets) - frames.packets_in_frames + sum(not self._offer(self._out_send, p) for p in frames.frames)

    def _offer(self, send: trio.MemorySendChannel[bytes], packet: bytes) -> bool:
        try:
            send.send_nowait(packet)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        return True


class MemoryNetwork:
    """Addresses -> ports, with a per-port switch to drop everything (a blackholed or dead path)."""

    def __init__(self) -> None:
        self._ports: dict[Address, MemoryDatagramPort] = {}
        self.blocked: set[Address] = set()

    def port(self, addr: Address, capacity: int = 1024) -> MemoryDatagramPort:
        port = MemoryDatagramPort(self, addr, capacity)
        self._ports[addr] = port
        return port

    def deliver(self, data: bytes, src: Address, dst: Address) -> None:
        if src in self.blocked or dst in self.blocked:
            return
        port = self._ports.get(dst)
        if port is not None:
            port._enqueue(data, src)


class MemoryDatagramPort:
    def __init__(self, network: MemoryNetwork, addr: Address, capacity: int) -> None:
        self.network, self.addr = network, addr
        self._send, self._recv = trio.open_memory_channel[tuple[bytes, Address]](capacity)
        self.sent = 0
        self.dropped = 0

    def _enqueue(self, data: bytes, src: Address) -> None:
        try:
            self._send.send_nowait((data, src))
        except trio.WouldBlock:
            self.dropped += 1

    def send_nowait(self, data: bytes, addr: Address) -> bool:
        self.sent += 1
        self.network.deliver(bytes(data), self.addr, addr)
        return True

    def send_segments_nowait(self, segments: Sequence[bytes], addr: Address) -> bool:
        for data in segments:
            self.send_nowait(data, addr)
        return True

    async def recv_batch(self, max_datagrams: int) -> list[tuple[bytes, Address]]:
        return await _receive_batch(self._recv, max_datagrams)
