"""A userspace impairment relay for one path: delay, jitter, loss, rate, blackhole, link down.

Theory of operation
-------------------
The demo (and any test that wants a lossy path without root) puts one relay
between each client path socket and the gateway.  A relay has one or more
*lanes*, each a front socket paired with one upstream address, and a single
back socket; the gateway has a data listener and a control listener (data
port + ``control_port_offset``), so the demo's relays have two lanes::

                         ┌ front[0] ──┐          ┌──► gateway data listener
    client path socket ──┤            ├─ back ───┤
                         └ front[1] ──┘          └──► gateway control listener

The client sends to a front as if it were the gateway (``ClientPath.gateway``
and ``ClientPath.control``); the relay forwards from its one back socket to
that lane's upstream, so the gateway sees one distinct endpoint per path (as
it would see one source address per interface).  A reply arriving at the back
socket from lane *i*'s upstream leaves by front *i*, to the last client
address seen on any front, so the client sees it come from the address it
sent to.  Datagrams from anywhere else are dropped at the back socket
(``dropped_stray``).

Both directions are impaired independently by the same :class:`Impairment`
(as the lab installs its faults on both ends of a veth pair), so ``delay_ms``
is one-way: a round trip grows by twice ``delay_ms``.  For each datagram, in
this order:

1. link down → dropped (``dropped_down``); blackhole → dropped
   (``dropped_blackhole``); the link state is checked again when a delayed
   datagram is due, so what was in flight when the link went down is lost;
2. loss: dropped with probability ``loss_pct`` / 100, drawn from a
   :class:`random.Random` seeded per relay *and* per direction, so the same
   seed and the same datagram sequence give the same losses, whatever order
   Trio runs the two receive tasks in;
3. rate: a token bucket per direction (``rate_mbit``; burst
   :data:`RATE_BURST_S` worth of bytes, at least two full datagrams) tells
   when the datagram may leave; if that is more than :data:`RATE_MAX_BACKLOG_S`
   away the datagram is dropped (``dropped_rate``), as a shaper with a full
   queue would;
4. delay and jitter: the datagram leaves ``delay_ms`` ± a uniform draw of up
   to ``jitter_ms`` later (never earlier than now).  **Jitter never
   reorders**: a datagram is never released before the one ahead of it in the
   same direction, so a sample that would overtake waits for its predecessor
   (RTT samples spread the way they do on a real link that keeps order, which
   is what the health tracker's jitter metric expects).

Delayed datagrams wait in one timer heap, ordered by release time, served by
one task (:meth:`Relay._serve_timers`).  The heap is bounded by
``queue_limit`` datagrams (``dropped_queue_full`` beyond it); a datagram due
at once with nothing queued ahead of it skips the heap.  Nothing here waits
on the network: sends are ``send_nowait`` and a failed send is counted.

Time is ``trio.current_time()``, so under Trio's mock clock the relay is
exactly deterministic; with in-memory ports (``memory.MemoryNetwork``) a test
can assert arrival times to the microsecond.
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import trio

from jvpn_trio.drivers import udp
from jvpn_trio.drivers.ports import Address, DatagramPort
from jvpn_trio.errors import lone_exception_unwrapped
from jvpn_trio.lab.scenario import Impairment

__all__ = [
    "DEFAULT_QUEUE_LIMIT",
    "RATE_BURST_S",
    "RATE_MAX_BACKLOG_S",
    "Direction",
    "DirectionStatistics",
    "Lane",
    "Relay",
    "RelayStatistics",
    "TokenBucket",
    "describe_impairment",
    "open_relay",
]

#: Datagrams waiting in the timer heap (both directions together); more are dropped and counted.
DEFAULT_QUEUE_LIMIT = 2048
#: A token bucket holds this many seconds of the rate (and at least :data:`MIN_BURST_BYTES`).
RATE_BURST_S = 0.005
#: Two full-size Ethernet frames: the smallest burst a shaper must allow to pass anything.
MIN_BURST_BYTES = 2 * 1500
#: A datagram that would wait longer than this for tokens is dropped (the shaper's queue is full).
RATE_MAX_BACKLOG_S = 0.2
#: Datagrams taken from a socket per wake-up.
BATCH = 64
_MS = 1000.0
_BITS_PER_BYTE = 8
_MBIT = 1_000_000


class Direction(enum.Enum):
    UP = "up"  # client -> gateway
    DOWN = "down"  # gateway -> client


@attrs.frozen(kw_only=True)
class DirectionStatistics:
    """One direction's counters.  ``received = forwarded + every dropped_* + queued``.

    ``dropped_no_client`` only happens downstream: a reply before the client sent anything.
    """

    received: int
    forwarded: int
    bytes_forwarded: int
    dropped_down: int
    dropped_blackhole: int
    dropped_loss: int
    dropped_rate: int
    dropped_queue_full: int
    dropped_send_failed: int
    dropped_no_client: int
    queued: int


@attrs.frozen(kw_only=True)
class RelayStatistics:
    """A relay's counters; ``dropped_stray`` counts datagrams at the back socket not from upstream."""

    name: str
    impairment: Impairment
    up: DirectionStatistics
    down: DirectionStatistics
    dropped_stray: int


@attrs.define
class _Counters:
    received: int = 0
    forwarded: int = 0
    bytes_forwarded: int = 0
    dropped_down: int = 0
    dropped_blackhole: int = 0
    dropped_loss: int = 0
    dropped_rate: int = 0
    dropped_queue_full: int = 0
    dropped_send_failed: int = 0
    dropped_no_client: int = 0
    queued: int = 0

    def frozen(self) -> DirectionStatistics:
        return DirectionStatistics(**attrs.asdict(self))


class TokenBucket:
    """A token bucket that lends: tokens may go negative down to the backlog bound.

    :meth:`reserve` answers *when* a datagram of ``size`` bytes may leave
    (``now`` if the bucket holds enough tokens, later if it must wait for
    them), or None if the wait would exceed ``max_backlog_s`` (drop it).
    Pure arithmetic on the ``now`` passed in.
    """

    def __init__(self, rate_mbit: float, *, now: float, max_backlog_s: float = RATE_MAX_BACKLOG_S) -> None:
        if not rate_mbit > 0:
            raise ValueError(f"rate_mbit must be positive, got {rate_mbit!r}")
        self.rate_bytes_per_s = rate_mbit * _MBIT / _BITS_PER_BYTE
        self.burst_bytes = max(MIN_BURST_BYTES, self.rate_bytes_per_s * RATE_BURST_S)
        self.max_backlog_s = max_backlog_s
        self._tokens = self.burst_bytes
        self._updated = now

    def reserve(self, size: int, *, now: float) -> float | None:
        if now > self._updated:
            self._tokens = min(self.burst_bytes, self._tokens + (now - self._updated) * self.rate_bytes_per_s)
            self._updated = now
        after = self._tokens - size
        wait_s = max(0.0, -after / self.rate_bytes_per_s)
        if wait_s > self.max_backlog_s:
            return None
        self._tokens = after
        return now + wait_s


def describe_impairment(imp: Impairment) -> str:
    """A few words for a screen: ``link down``, ``blackhole``, ``30±8 ms, loss 20%``, ``clean``."""
    if not imp.link_up:
        return "link down"
    parts = []
    if imp.blackhole:
        parts.append("blackhole")
    if imp.delay_ms or imp.jitter_ms:
        parts.append(f"{imp.delay_ms:g}±{imp.jitter_ms:g} ms" if imp.jitter_ms else f"{imp.delay_ms:g} ms")
    if imp.loss_pct:
        parts.append(f"loss {imp.loss_pct:g}%")
    if imp.rate_mbit is not None:
        parts.append(f"{imp.rate_mbit:g} Mbit/s")
    return ", ".join(parts) or "clean"


@attrs.frozen
class Lane:
    """One front socket and the upstream address its traffic goes to (and whose replies it carries)."""

    front: DatagramPort
    upstream: Address
    front_address: Address | None = None  # what the client sends to (informational)


class Relay:
    """One path's relay; run it with :meth:`serve` (or use :func:`open_relay`).

    ``lanes`` face the client, ``back`` faces the upstreams.  Change
    conditions at any time with :meth:`set_impairment`; they apply to every
    lane and take effect for the next datagram.
    """

    def __init__(
        self,
        *,
        lanes: list[Lane] | tuple[Lane, ...],
        back: DatagramPort,
        impairment: Impairment = Impairment(),
        seed: int = 0,
        name: str = "",
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> None:
        if not lanes:
            raise ValueError("a relay needs at least one lane")
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be at least 1, got {queue_limit}")
        self.name = name
        self.lanes = tuple(lanes)
        self._back = back
        self._by_upstream = {_host_port(lane.upstream): i for i, lane in enumerate(self.lanes)}
        self._impairment = impairment
        self._queue_limit = queue_limit
        self._rng = {d: random.Random(f"{seed}:{d.value}") for d in Direction}
        self._buckets: dict[Direction, TokenBucket | None] = {d: None for d in Direction}
        self._bucket_rate: float | None = None
        self._counters = {d: _Counters() for d in Direction}
        self._last_release = {d: -math.inf for d in Direction}
        # (release_at, sequence, direction, lane, datagram); the sequence keeps equal times in FIFO order.
        self._heap: list[tuple[float, int, Direction, int, bytes]] = []
        self._sequence = 0
        self._changed = trio.Event()
        self._client: Address | None = None
        self._dropped_stray = 0

    # -- control -------------------------------------------------------------------------
    @property
    def front_addresses(self) -> tuple[Address | None, ...]:
        return tuple(lane.front_address for lane in self.lanes)

    @property
    def impairment(self) -> Impairment:
        return self._impairment

    @property
    def client(self) -> Address | None:
        """The client address replies go to (the last source seen on any front)."""
        return self._client

    def set_impairment(self, impairment: Impairment) -> None:
        """New conditions from now on.  A changed rate starts with a full bucket."""
        self._impairment = impairment
        if impairment.rate_mbit != self._bucket_rate:
            self._bucket_rate = impairment.rate_mbit
            self._buckets = {d: None for d in Direction}

    def statistics(self) -> RelayStatistics:
        return RelayStatistics(
            name=self.name,
            impairment=self._impairment,
            up=self._counters[Direction.UP].frozen(),
            down=self._counters[Direction.DOWN].frozen(),
            dropped_stray=self._dropped_stray,
        )

    # -- lifetime ------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled."""
        async with trio.open_nursery() as nursery:
            for index in range(len(self.lanes)):
                nursery.start_soon(self._pump_up, index)
            nursery.start_soon(self._pump_down)
            nursery.start_soon(self._serve_timers)
            task_status.started(self)

    async def _pump_up(self, lane: int) -> None:
        front = self.lanes[lane].front
        while True:
            batch = await front.recv_batch(BATCH)
            now = trio.current_time()
            for data, source in batch:
                self._client = source
                self._admit(Direction.UP, lane, data, now)

    async def _pump_down(self) -> None:
        while True:
            batch = await self._back.recv_batch(BATCH)
            now = trio.current_time()
            for data, source in batch:
                lane = self._by_upstream.get(_host_port(source))
                if lane is None:
                    self._dropped_stray += 1
                    continue
                self._admit(Direction.DOWN, lane, data, now)

    # -- the impairment pipeline (module docstring, steps 1-4) -----------------------------
    def _admit(self, direction: Direction, lane: int, data: bytes, now: float) -> None:
        counters = self._counters[direction]
        counters.received += 1
        imp = self._impairment
        if self._blocked(direction, imp):
            return
        rng = self._rng[direction]
        if imp.loss_pct > 0 and rng.random() * 100.0 < imp.loss_pct:
            counters.dropped_loss += 1
            return
        leave_at = now
        if imp.rate_mbit is not None:
            bucket = self._buckets[direction]
            if bucket is None:
                bucket = self._buckets[direction] = TokenBucket(imp.rate_mbit, now=now)
            reserved = bucket.reserve(len(data), now=now)
            if reserved is None:
                counters.dropped_rate += 1
                return
            leave_at = reserved
        delay_s = imp.delay_ms / _MS
        if imp.jitter_ms > 0:
            delay_s += rng.uniform(-imp.jitter_ms, imp.jitter_ms) / _MS
        release_at = max(leave_at + max(delay_s, 0.0), self._last_release[direction])
        if release_at <= now and counters.queued == 0:
            self._last_release[direction] = now
            self._transmit(direction, lane, data)
            return
        if len(self._heap) >= self._queue_limit:
            counters.dropped_queue_full += 1
            return
        self._last_release[direction] = release_at
        self._sequence += 1
        counters.queued += 1
        heapq.heappush(self._heap, (release_at, self._sequence, direction, lane, data))
        if self._heap[0][1] == self._sequence:  # the new datagram is the next one due
            self._changed.set()

    def _blocked(self, direction: Direction, imp: Impairment) -> bool:
        counters = self._counters[direction]
        if not imp.link_up:
            counters.dropped_down += 1
            return True
        if imp.blackhole:
            counters.dropped_blackhole += 1
            return True
        return False

    def _transmit(self, direction: Direction, lane: int, data: bytes) -> None:
        counters = self._counters[direction]
        if direction is Direction.UP:
            result = self._back.send_nowait(data, self.lanes[lane].upstream)
        else:
            if self._client is None:
                counters.dropped_no_client += 1
                return
            result = self.lanes[lane].front.send_nowait(data, self._client)
        if result is False or getattr(result, "ok", True) is False:
            counters.dropped_send_failed += 1
            return
        counters.forwarded += 1
        counters.bytes_forwarded += len(data)

    async def _serve_timers(self) -> None:
        """The one task that releases delayed datagrams, in release-time order."""
        while True:
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _release_at, _seq, direction, lane, data = heapq.heappop(self._heap)
                self._counters[direction].queued -= 1
                if not self._blocked(direction, self._impairment):
                    self._transmit(direction, lane, data)
            self._changed = trio.Event()
            with trio.move_on_at(self._heap[0][0] if self._heap else math.inf):
                await self._changed.wait()


def _host_port(address: Sequence[object]) -> Address:
    """``(host, port)`` of an address (an IPv6 one has flowinfo and scope id after them)."""
    return (str(address[0]), int(address[1]))  # type: ignore[call-overload]


@asynccontextmanager
async def open_relay(
    upstreams: Sequence[Address],
    *,
    bind_host: str = "127.0.0.1",
    impairment: Impairment = Impairment(),
    seed: int = 0,
    name: str = "",
    queue_limit: int = DEFAULT_QUEUE_LIMIT,
) -> AsyncIterator[Relay]:
    """A relay on loopback UDP sockets (no root) with one lane per upstream, for the block.

    ``relay.front_addresses[i]`` is where the client sends what is meant for
    ``upstreams[i]``.  Raises :class:`~jvpn_trio.drivers.udp.PathSocketError`
    if a socket cannot be bound.
    """
    async with AsyncExitStack() as stack:
        lanes = []
        for upstream in upstreams:
            front = await stack.enter_async_context(udp.open_path_socket(bind=(bind_host, 0), device=None, fwmark=None))
            lanes.append(Lane(front, _host_port(upstream), front_address=_host_port(front.local_address)))
        back = await stack.enter_async_context(udp.open_path_socket(bind=(bind_host, 0), device=None, fwmark=None))
        relay = Relay(lanes=lanes, back=back, impairment=impairment, seed=seed, name=name, queue_limit=queue_limit)
        async with lone_exception_unwrapped(), trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            try:
                yield relay
            finally:
                nursery.cancel_scope.cancel()
