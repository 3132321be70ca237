"""Traffic tools for the lab: each runs as its own process inside a namespace.

    python -m jvpn_trio.lab.traffic tcp-sink   --listen 10.99.0.1:5001 --report sink.json [--ready FILE]
    python -m jvpn_trio.lab.traffic tcp-source --connect 10.99.0.1:5001 --bytes N --rate-mbit R --report src.json
    python -m jvpn_trio.lab.traffic udp-probe-sink   --listen 10.99.0.1:5002 --report sink.json [--ready FILE]
                                                 [--first-probe FILE]
    python -m jvpn_trio.lab.traffic udp-probe-source --connect 10.99.0.1:5002 --hz 100 --duration 5 --report src.json
    python -m jvpn_trio.lab.traffic udp-echo --listen 10.99.0.1:5003 [--ready FILE]
    python -m jvpn_trio.lab.traffic udp-ping --connect 10.99.0.1:5003 [--device eth0]

Theory of operation
-------------------
*TCP integrity.*  The source streams a deterministic byte pattern (block ``k`` of
:data:`PATTERN_BLOCK_BYTES` is SHAKE-256 of ``seed || k``, a counter-mode XOF stream) paced to
``--rate-mbit`` so a transfer lasts a known time, then half-closes and waits for the sink to
close.  Each side hashes exactly the bytes it moved (SHA-256) and reports ``{bytes, sha256,
reset, error}``: equal digests mean the session carried every byte in order.  A connection reset
is recorded as ``reset: true``, never retried or hidden.

*Outage.*  The probe source sends ``hz * duration`` sequence-numbered datagrams on a fixed
schedule; each carries a stream id, its sequence number, the stream's size, rate and start, and
its send time.  So from any one probe the sink knows the whole schedule: the window in which
probes should arrive and when to stop listening.  The outage is :func:`longest_gap`, the longest
interval inside the window with no arriving probe (``peers.md`` measures peers the same way).
Timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC is shared by all processes on the machine;
``trio.current_time()`` carries a random per-process offset).

Everything is bounded: probe counts and rates are capped, every tool has a timeout, and sinks
stop by themselves.  Exit codes: 0 success, 1 failure (one line on stderr, and the report
still written), 2 bad arguments.  ``udp-ping`` exits 1 when no reply came back.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import ipaddress
import json
import math
import os
import secrets
import socket
import struct
import sys
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

import attrs
import trio

PROG = "jvpn_trio.lab.traffic"

#: One block of the TCP pattern; the source generates one at a time.
PATTERN_BLOCK_BYTES = 64 * 1024
DEFAULT_SEED = "jvpn-trio"
#: Largest single recv.
RECV_BYTES = 64 * 1024
#: The source paces in quanta of this much time at the target rate (bounded below and above).
PACING_QUANTUM_S = 0.005
MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 64 * 1024
MAX_RATE_MBIT = 100_000.0
MAX_TRANSFER_BYTES = 1 << 40
#: How often a refused TCP connect is retried (the sink may still be starting).
CONNECT_RETRY_S = 0.05
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_TIMEOUT_S = 60.0

#: Probe wire format: magic, stream id, seq, count, hz, start, sent (network order).
PROBE_MAGIC = b"JVP1"
PROBE_HEADER = struct.Struct("!4sIIIddd")
DEFAULT_PROBE_BYTES = 64
MAX_PROBE_BYTES = 1400
MAX_PROBE_HZ = 10_000.0
MAX_PROBES = 1_000_000
#: The sink keeps listening this long after the stream's last scheduled probe.
DEFAULT_LINGER_S = 0.5
#: Errors a probe/ping send may meet while a path is down; counted, not fatal.
SEND_ERRNOS = frozenset(
    {errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.EPERM, errno.ENOBUFS,
     errno.ECONNREFUSED}
)  # fmt: skip

PING_MAGIC = b"JVPING1"
PING_HEADER = struct.Struct("!7sI")
DEFAULT_PING_COUNT = 3
DEFAULT_PING_INTERVAL_S = 0.2
#: How long udp-ping waits for outstanding replies after its last ping.
DEFAULT_PING_WAIT_S = 1.0
DEFAULT_ECHO_MAX_DATAGRAMS = 100_000

EXIT_OK = 0
EXIT_FAILED = 1


class TrafficError(Exception):
    """A tool cannot run as asked (bad endpoint, unknown device); the message is one line."""


class BadProbe(Exception):
    """A datagram that is not a well-formed probe."""


# -----------------------------------------------------------------------------
# Pure helpers
# -----------------------------------------------------------------------------


def parse_endpoint(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``"10.99.0.1:5000"`` or ``"[::1]:5000"`` -> ``(host, port)``; literal addresses only (no DNS).

    With ``default_port``, a bare address (``"10.0.0.1"``, ``"[fd00::1]"``) is accepted too.
    """
    host, sep, port_text = text.rpartition(":")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if default_port is not None:
        try:
            return str(ipaddress.ip_address(bare)), default_port
        except ValueError:
            pass
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected ADDRESS:PORT, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected a literal IP address in {text!r}") from None
    port = int(port_text)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range in {text!r}")
    return str(address), port


def format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def pattern_block(seed: bytes, index: int) -> bytes:
    """Block ``index`` of the deterministic TCP pattern: SHAKE-256(seed || index) of PATTERN_BLOCK_BYTES."""
    return hashlib.shake_256(seed + index.to_bytes(8, "big")).digest(PATTERN_BLOCK_BYTES)


def pattern_bytes(seed: bytes, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of the pattern stream for ``seed``."""
    out = bytearray()
    index, skip = divmod(offset, PATTERN_BLOCK_BYTES)
    while len(out) < length:
        block = pattern_block(seed, index)[skip:]
        out += block[: length - len(out)]
        index, skip = index + 1, 0
    return bytes(out)


@attrs.frozen
class Gap:
    """An interval ``[start, end]`` in which no probe arrived."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def longest_gap(arrivals: Sequence[float], start: float, end: float) -> Gap:
    """The longest interval within ``[start, end]`` that contains no arrival (the outage).

    Arrivals outside the window are ignored; the window's edges bound the first and last gap,
    so with no arrival at all the whole window is the gap.  Ties go to the earliest interval.
    Raises ValueError if ``end < start``.
    """
    if end < start:
        raise ValueError(f"window ends ({end}) before it starts ({start})")
    points = [start, *sorted(t for t in arrivals if start <= t <= end), end]
    best = Gap(start, start)
    for before, after in zip(points, points[1:]):
        if after - before > best.seconds:
            best = Gap(before, after)
    return best


@attrs.frozen
class ProbeSummary:
    """What a probe stream's arrivals say: delivery counts and the outage."""

    expected: int
    received: int
    lost: int
    duplicates: int
    reordered: int
    longest_gap: Gap


def summarize_probes(arrivals: Sequence[tuple[int, float]], *, count: int, start: float, end: float) -> ProbeSummary:
    """Summarize ``(seq, arrival_time)`` pairs of a stream of ``count`` probes scheduled in ``[start, end]``.

    A sequence number seen again is a duplicate; one lower than the highest seen so far is
    reordered; sequence numbers ``>= count`` are ignored.  Every arrival ends a gap.
    """
    seen: set[int] = set()
    duplicates = reordered = 0
    highest = -1
    times = []
    for seq, arrived in arrivals:
        if not 0 <= seq < count:
            continue
        times.append(arrived)
        if seq in seen:
            duplicates += 1
            continue
        seen.add(seq)
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
    return ProbeSummary(
        expected=count,
        received=len(seen),
        lost=count - len(seen),
        duplicates=duplicates,
        reordered=reordered,
        longest_gap=longest_gap(times, start, end),
    )


@attrs.frozen
class Probe:
    stream_id: int
    seq: int
    count: int
    hz: float
    start: float
    sent: float

    @property
    def end(self) -> float:
        """When the stream's last probe is scheduled."""
        return self.start + (self.count - 1) / self.hz


def encode_probe(probe: Probe, size: int = DEFAULT_PROBE_BYTES) -> bytes:
    header = PROBE_HEADER.pack(
        PROBE_MAGIC, probe.stream_id, probe.seq, probe.count, probe.hz, probe.start, probe.sent
    )
    return header + bytes(max(0, size - len(header)))


def decode_probe_untrusted(data: bytes) -> Probe:
    """Parse a datagram as a probe; raises only BadProbe."""
    if len(data) < PROBE_HEADER.size:
        raise BadProbe(f"short datagram ({len(data)} bytes)")
    magic, stream_id, seq, count, hz, start, sent = PROBE_HEADER.unpack_from(data)
    if magic != PROBE_MAGIC:
        raise BadProbe("bad magic")
    if not (0 < count <= MAX_PROBES and seq < count):
        raise BadProbe(f"bad count/seq {count}/{seq}")
    if not (math.isfinite(hz) and 0 < hz <= MAX_PROBE_HZ and math.isfinite(start) and math.isfinite(sent)):
        raise BadProbe("bad timing fields")
    return Probe(stream_id=stream_id, seq=seq, count=count, hz=hz, start=start, sent=sent)


# -----------------------------------------------------------------------------
# Reports
# -----------------------------------------------------------------------------


def os_error_text(exc: OSError) -> str:
    """An OSError as one line: its errno name and message (for reports and stderr)."""
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name}: {exc.strerror or exc}" if name else str(exc)


@attrs.frozen
class TcpReport:
    """Either end of a TCP transfer: the bytes it moved, their SHA-256, and how it ended."""

    role: str
    bytes: int
    sha256: str
    reset: bool
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None and not self.reset

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class ProbeSourceReport:
    stream_id: int
    count: int
    hz: float
    start: float
    sent: int
    send_errors: int
    errors: Mapping[str, int]
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "errors": dict(self.errors)}


@attrs.frozen
class ProbeSinkReport:
    """The sink's view.  ``summary`` is None when no probe arrived (then nothing is known of the stream)."""

    stream_id: int | None
    start: float | None
    end: float | None
    summary: ProbeSummary | None
    arrivals: tuple[tuple[int, float], ...]
    bad_datagrams: int
    foreign_datagrams: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stream_id": self.stream_id,
            "start": self.start,
            "end": self.end,
            "expected": None,
            "received": 0,
            "lost": None,
            "duplicates": 0,
            "reordered": 0,
            "longest_gap_s": None,
            "gap_start_s": None,
            "gap_end_s": None,
            "bad_datagrams": self.bad_datagrams,
            "foreign_datagrams": self.foreign_datagrams,
            "error": self.error,
        }
        if self.summary is not None and self.start is not None:
            gap = self.summary.longest_gap
            out.update(
                expected=self.summary.expected,
                received=self.summary.received,
                lost=self.summary.lost,
                duplicates=self.summary.duplicates,
                reordered=self.summary.reordered,
                longest_gap_s=round(gap.seconds, 6),
                gap_start_s=round(gap.start - self.start, 6),
                gap_end_s=round(gap.end - self.start, 6),
            )
        # Arrival times relative to the stream's start, in seconds.
        base = self.start or 0.0
        out["arrivals"] = [[seq, round(t - base, 6)] for seq, t in self.arrivals]
        return out


@attrs.frozen
class EchoReport:
    echoed: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class PingReport:
    sent: int
    replies: int
    send_errors: int
    errors: Mapping[str, int]
    rtt_s: tuple[float, ...]
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.replies > 0

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "errors": dict(self.errors), "rtt_s": [round(r, 6) for r in self.rtt_s]}


# -----------------------------------------------------------------------------
# Sockets
# -----------------------------------------------------------------------------


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _socket(host: str, kind: int, device: str | None) -> trio.socket.SocketType:
    """A socket for ``host``'s family, pinned to ``device`` (SO_BINDTODEVICE) if given."""
    sock = trio.socket.socket(_family(host), kind)
    if device is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        except OSError as exc:
            sock.close()
            raise TrafficError(f"cannot bind to device {device!r}: {os_error_text(exc)}") from None
    return sock


async def _bound_socket(listen: tuple[str, int], kind: int) -> trio.socket.SocketType:
    sock = _socket(listen[0], kind, None)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(listen)
    except BaseException:
        sock.close()
        raise
    return sock


def mono_offset() -> float:
    """``time.monotonic() - trio.current_time()``: converts between the shared and the Trio clock."""
    return time.monotonic() - float(trio.current_time())


# -----------------------------------------------------------------------------
# TCP
# -----------------------------------------------------------------------------


async def run_tcp_sink(
    listen: tuple[str, int], *, timeout_s: float = DEFAULT_TIMEOUT_S, task_status: Any = trio.TASK_STATUS_IGNORED
) -> TcpReport:
    """Accept one connection on ``listen``, read it to EOF and report what arrived.

    ``task_status.started((host, port))`` once listening.  A reset or ``timeout_s`` (counted from
    then) ends the transfer and is recorded in the report.  Raises OSError if it cannot listen.
    """
    digest = hashlib.sha256()
    total = 0
    reset = False
    error: str | None = None
    with await _bound_socket(listen, socket.SOCK_STREAM) as sock:
        sock.listen(1)
        task_status.started(sock.getsockname()[:2])
        begun = trio.current_time()
        with trio.move_on_after(timeout_s) as scope:
            conn, _peer = await sock.accept()
            begun = trio.current_time()  # report the transfer's time, not the wait for it
            with conn:
                while True:
                    try:
                        data = await conn.recv(RECV_BYTES)
                    except OSError as exc:
                        reset = isinstance(exc, ConnectionResetError)
                        error = f"after {total} bytes: {os_error_text(exc)}"
                        break
                    if not data:
                        break
                    digest.update(data)
                    total += len(data)
        if scope.cancelled_caught:
            error = f"timed out after {timeout_s} s ({total} bytes received)"
    return TcpReport("sink", total, digest.hexdigest(), reset, error, round(trio.current_time() - begun, 6))


async def connect_retrying(
    connect: tuple[str, int], new_socket: Callable[[], trio.socket.SocketType], connect_timeout_s: float
) -> trio.socket.SocketType:
    """Connect a fresh ``new_socket()``, retrying while refused (the sink may be starting) until
    ``connect_timeout_s``; TrafficError then."""
    deadline = trio.current_time() + connect_timeout_s
    while True:
        sock = new_socket()
        try:
            with trio.move_on_at(deadline):
                await sock.connect(connect)
                return sock
            raise TrafficError(f"could not connect to {format_endpoint(connect)} within {connect_timeout_s} s")
        except ConnectionRefusedError:
            sock.close()
            if trio.current_time() + CONNECT_RETRY_S >= deadline:
                where = format_endpoint(connect)
                raise TrafficError(f"{where} refused connections for {connect_timeout_s} s") from None
            await trio.sleep(CONNECT_RETRY_S)
        except BaseException:
            sock.close()
            raise


async def run_tcp_source(
    connect: tuple[str, int],
    *,
    nbytes: int,
    rate_mbit: float,
    seed: bytes = DEFAULT_SEED.encode(),
    device: str | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TcpReport:
    """Send ``nbytes`` of the pattern for ``seed`` at ``rate_mbit``, half-close, wait for the sink to close.

    The report hashes exactly the bytes the kernel accepted.  Resets and other socket errors are
    recorded, as is running past ``timeout_s``.  Raises TrafficError if it cannot connect.
    """
    if not 0 < rate_mbit <= MAX_RATE_MBIT:
        raise TrafficError(f"rate must be within (0, {MAX_RATE_MBIT}] Mbit/s, got {rate_mbit}")
    if not 0 <= nbytes <= MAX_TRANSFER_BYTES:
        raise TrafficError(f"byte count must be within 0..{MAX_TRANSFER_BYTES}, got {nbytes}")
    rate_bytes_s = rate_mbit * 1e6 / 8
    chunk = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, int(rate_bytes_s * PACING_QUANTUM_S)))
    digest = hashlib.sha256()
    sent = 0
    reset = False
    error: str | None = None
    begun = trio.current_time()
    with trio.move_on_after(timeout_s) as scope:
        sock = await connect_retrying(connect, lambda: _socket(connect[0], socket.SOCK_STREAM, device), connect_timeout_s)
        with sock:
            try:
                begun = trio.current_time()
                index = 0
                while sent < nbytes:
                    block = memoryview(pattern_block(seed, index))[: nbytes - sent]
                    index += 1
                    offset = 0
                    while offset < len(block):
                        await trio.sleep_until(begun + sent / rate_bytes_s)
                        n = await sock.send(block[offset : offset + chunk])
                        digest.update(block[offset : offset + n])
                        offset += n
                        sent += n
                sock.shutdown(socket.SHUT_WR)
                # The sink sends nothing; its EOF means it has read everything and closed.
                while await sock.recv(RECV_BYTES):
                    pass
            except OSError as exc:
                reset = isinstance(exc, (ConnectionResetError, BrokenPipeError))
                error = f"after {sent} bytes: {os_error_text(exc)}"
    if scope.cancelled_caught:
        error = f"timed out after {timeout_s} s ({sent} of {nbytes} bytes sent)"
    return TcpReport("source", sent, digest.hexdigest(), reset, error, round(trio.current_time() - begun, 6))


# -----------------------------------------------------------------------------
# UDP probes
# -----------------------------------------------------------------------------


def _count_error(errors: dict[str, int], exc: OSError) -> None:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    errors[name] = errors.get(name, 0) + 1


async def run_udp_probe_source(
    connect: tuple[str, int],
    *,
    hz: float,
    duration_s: float,
    size: int = DEFAULT_PROBE_BYTES,
    device: str | None = None,
    stream_id: int | None = None,
) -> ProbeSourceReport:
    """Send ``round(hz * duration_s)`` probes to ``connect`` on a fixed schedule (the first one now).

    Send errors a dead path produces (ENETDOWN, ENETUNREACH, EPERM from a firewall, ...) are
    counted and the schedule goes on; other errors propagate.  Returns after the last probe.
    """
    count = round(hz * duration_s)
    if not 0 < hz <= MAX_PROBE_HZ:
        raise TrafficError(f"rate must be within (0, {MAX_PROBE_HZ}] Hz, got {hz}")
    if not 0 < count <= MAX_PROBES:
        raise TrafficError(f"hz * duration must give 1..{MAX_PROBES} probes, got {count}")
    if not PROBE_HEADER.size <= size <= MAX_PROBE_BYTES:
        raise TrafficError(f"probe size must be within {PROBE_HEADER.size}..{MAX_PROBE_BYTES}, got {size}")
    if stream_id is None:
        stream_id = int.from_bytes(secrets.token_bytes(4), "big")
    errors: dict[str, int] = {}
    sent = 0
    with _socket(connect[0], socket.SOCK_DGRAM, device) as sock:
        t0 = trio.current_time()
        start = t0 + mono_offset()
        for seq in range(count):
            await trio.sleep_until(t0 + seq / hz)
            probe = Probe(stream_id=stream_id, seq=seq, count=count, hz=hz, start=start, sent=time.monotonic())
            try:
                await sock.sendto(encode_probe(probe, size), connect)
            except OSError as exc:
                if exc.errno not in SEND_ERRNOS:
                    raise
                _count_error(errors, exc)
            else:
                sent += 1
    return ProbeSourceReport(
        stream_id=stream_id, count=count, hz=hz, start=start, sent=sent,
        send_errors=count - sent, errors=errors, error=None,
    )  # fmt: skip


async def run_udp_probe_sink(
    listen: tuple[str, int],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    linger_s: float = DEFAULT_LINGER_S,
    on_first_probe: Callable[[Probe], Awaitable[None]] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> ProbeSinkReport:
    """Record the arrival of one probe stream on ``listen`` and summarize it.

    Locks onto the first stream seen (others are counted as foreign) and awaits
    ``on_first_probe`` with its first probe, so a caller can wait for traffic to flow before
    injecting a fault.  Stops ``linger_s`` after that stream's last scheduled probe, or
    ``timeout_s`` after listening began, whichever is first.  ``task_status.started((host,
    port))`` once bound.
    """
    arrivals: list[tuple[int, float]] = []
    bad = foreign = 0
    first: Probe | None = None
    with await _bound_socket(listen, socket.SOCK_DGRAM) as sock:
        task_status.started(sock.getsockname()[:2])
        stop_at = trio.current_time() + timeout_s
        while True:
            data: bytes | None = None
            with trio.move_on_at(stop_at):
                data, _addr = await sock.recvfrom(MAX_PROBE_BYTES + 1)
            if data is None:
                break
            arrived = time.monotonic()
            try:
                probe = decode_probe_untrusted(data)
            except BadProbe:
                bad += 1
                continue
            if first is None:
                first = probe
                stop_at = min(stop_at, probe.end + linger_s - mono_offset())
                if on_first_probe is not None:
                    await on_first_probe(probe)
            if probe.stream_id != first.stream_id or probe.count != first.count:
                foreign += 1
                continue
            if len(arrivals) < MAX_PROBES:
                arrivals.append((probe.seq, arrived))
    if first is None:
        return ProbeSinkReport(None, None, None, None, (), bad, foreign, None)
    summary = summarize_probes(arrivals, count=first.count, start=first.start, end=first.end)
    return ProbeSinkReport(first.stream_id, first.start, first.end, summary, tuple(arrivals), bad, foreign, None)


# -----------------------------------------------------------------------------
# UDP echo and ping: "does this path reach that address?"
# -----------------------------------------------------------------------------


async def run_udp_echo(
    listen: tuple[str, int],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_datagrams: int = DEFAULT_ECHO_MAX_DATAGRAMS,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> EchoReport:
    """Send every datagram back where it came from, for ``timeout_s`` or ``max_datagrams``.

    Bind to the exact address clients use: bound to 0.0.0.0 the replies would leave from the
    link address, not the one the client sent to (platform notes, section 1).
    """
    echoed = 0
    with await _bound_socket(listen, socket.SOCK_DGRAM) as sock:
        task_status.started(sock.getsockname()[:2])
        with trio.move_on_after(timeout_s):
            while echoed < max_datagrams:
                data, addr = await sock.recvfrom(RECV_BYTES)
                try:
                    await sock.sendto(data, addr)
                except OSError as exc:
                    if exc.errno not in SEND_ERRNOS:
                        raise
                    continue
                echoed += 1
    return EchoReport(echoed, None)


async def run_udp_ping(
    connect: tuple[str, int],
    *,
    count: int = DEFAULT_PING_COUNT,
    interval_s: float = DEFAULT_PING_INTERVAL_S,
    wait_s: float = DEFAULT_PING_WAIT_S,
    device: str | None = None,
) -> PingReport:
    """Send ``count`` pings ``interval_s`` apart to a udp-echo and collect the replies.

    Returns once every ping is answered, or ``wait_s`` after the last one.  Send errors of a dead
    path are counted; ``PingReport.ok`` says whether any reply came back.
    """
    if not 0 < count <= MAX_PROBES:
        raise TrafficError(f"ping count must be within 1..{MAX_PROBES}, got {count}")
    nonce = secrets.randbits(32)
    errors: dict[str, int] = {}
    outstanding: dict[int, float] = {}
    rtts: list[float] = []
    done_sending = False
    answered = trio.Event()
    with _socket(connect[0], socket.SOCK_DGRAM, device) as sock:
        t0 = trio.current_time()

        async def receive() -> None:
            while True:
                data, addr = await sock.recvfrom(RECV_BYTES)
                if len(data) != PING_HEADER.size or (addr[0], addr[1]) != connect:
                    continue
                magic, value = PING_HEADER.unpack(data)
                seq = value ^ nonce
                if magic == PING_MAGIC and seq in outstanding:
                    rtts.append(trio.current_time() - outstanding.pop(seq))
                    if done_sending and not outstanding:
                        answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for seq in range(count):
                await trio.sleep_until(t0 + seq * interval_s)
                # Recorded before sending: the reply can be received before sendto() returns.
                outstanding[seq] = trio.current_time()
                try:
                    await sock.sendto(PING_HEADER.pack(PING_MAGIC, seq ^ nonce), connect)
                except OSError as exc:
                    if exc.errno not in SEND_ERRNOS:
                        raise
                    del outstanding[seq]
                    _count_error(errors, exc)
            done_sending = True
            if outstanding:
                with trio.move_on_after(wait_s):
                    await answered.wait()
            nursery.cancel_scope.cancel()
    send_errors = sum(errors.values())
    return PingReport(count - send_errors, len(rtts), send_errors, errors, tuple(rtts), None)


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def traffic_argv(subcommand: str, *args: str) -> list[str]:
    """The argv that runs ``python -m jvpn_trio.lab.traffic <subcommand> <args>`` with this interpreter."""
    return [sys.executable, "-m", "jvpn_trio.lab.traffic", subcommand, *args]


async def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (readers never see half a file)."""

    def write() -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)

    await trio.to_thread.run_sync(write)


async def write_report(path: str | None, data: Mapping[str, Any]) -> None:
    if path is not None:
        await write_text(path, json.dumps(data, sort_keys=True) + "\n")


async def _serve(
    fn: Callable[..., Awaitable[Any]], ready_path: str | None, *args: Any, **kwargs: Any
) -> Any:
    """Run a ``run_*`` server, writing ``ready_path`` ("host:port") once it is listening."""
    result: list[Any] = []

    async def runner(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        result.append(await fn(*args, task_status=task_status, **kwargs))

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(runner)
        if ready_path is not None:
            await write_text(ready_path, format_endpoint(bound) + "\n")
    return result[0]


def _empty_tcp_report(role: str, error: str) -> TcpReport:
    return TcpReport(role, 0, hashlib.sha256().hexdigest(), False, error, 0.0)


async def _cmd_tcp_sink(args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        report = await _serve(run_tcp_sink, args.ready, args.listen, timeout_s=args.timeout)
    except OSError as exc:
        report = _empty_tcp_report("sink", f"cannot listen on {format_endpoint(args.listen)}: {os_error_text(exc)}")
    await write_report(args.report, report.to_json())
    return _outcome(report.ok, report.error or ("connection reset" if report.reset else None))


async def _cmd_tcp_source(args: argparse.Namespace) -> tuple[int, str | None]:
    nbytes = args.bytes if args.bytes is not None else round(args.rate_mbit * 1e6 / 8 * args.duration)
    try:
        report = await run_tcp_source(
            args.connect, nbytes=nbytes, rate_mbit=args.rate_mbit, seed=args.seed.encode(), device=args.device,
            connect_timeout_s=args.connect_timeout, timeout_s=args.timeout,
        )  # fmt: skip
    except (TrafficError, OSError) as exc:
        text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        report = _empty_tcp_report("source", text)
    await write_report(args.report, report.to_json())
    return _outcome(report.ok, report.error or ("connection reset" if report.reset else None))


async def _cmd_probe_sink(args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        first_probe_path = args.first_probe

        async def on_first_probe(probe: Probe) -> None:
            if first_probe_path is not None:
                await write_text(first_probe_path, f"{probe.stream_id}\n")

        report = await _serve(
            run_udp_probe_sink, args.ready, args.listen, timeout_s=args.timeout, linger_s=args.linger,
            on_first_probe=on_first_probe,
        )  # fmt: skip
    except OSError as exc:
        error = f"cannot listen on {format_endpoint(args.listen)}: {os_error_text(exc)}"
        report = ProbeSinkReport(None, None, None, None, (), 0, 0, error)
    await write_report(args.report, report.to_json())
    return _outcome(report.ok, report.error)


async def _cmd_probe_source(args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        report = await run_udp_probe_source(
            args.connect, hz=args.hz, duration_s=args.duration, size=args.size, device=args.device
        )
    except (TrafficError, OSError) as exc:
        text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        report = ProbeSourceReport(0, 0, args.hz, 0.0, 0, 0, {}, text)
    await write_report(args.report, report.to_json())
    return _outcome(report.ok, report.error)


async def _cmd_echo(args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        report = await _serve(run_udp_echo, args.ready, args.listen, timeout_s=args.timeout, max_datagrams=args.max)
    except OSError as exc:
        report = EchoReport(0, f"cannot listen on {format_endpoint(args.listen)}: {os_error_text(exc)}")
    await write_report(args.report, report.to_json())
    return _outcome(report.ok, report.error)


async def _cmd_ping(args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        report = await run_udp_ping(
            args.connect, count=args.count, interval_s=args.interval, wait_s=args.wait, device=args.device
        )
    except (TrafficError, OSError) as exc:
        text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        report = PingReport(0, 0, 0, {}, (), text)
    await write_report(args.report, report.to_json())
    print(json.dumps(report.to_json(), sort_keys=True))
    return _outcome(report.ok, report.error or f"no reply from {format_endpoint(args.connect)}")


def _outcome(ok: bool, error: str | None) -> tuple[int, str | None]:
    return (EXIT_OK, None) if ok else (EXIT_FAILED, error)


def endpoint_arg(default_port: int | None = None) -> Callable[[str], tuple[str, int]]:
    """An argparse type for ``ADDRESS:PORT`` (or a bare address, with ``default_port``)."""

    def parse(text: str) -> tuple[str, int]:
        try:
            return parse_endpoint(text, default_port=default_port)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def positive_arg(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


Handler = Callable[[argparse.Namespace], Awaitable[tuple[int, str | None]]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Lab traffic tools (run inside a namespace).")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, summary: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary)
        p.set_defaults(handler=handler)
        return p

    p = add("tcp-sink", _cmd_tcp_sink, "accept one TCP connection, read to EOF, report bytes and SHA-256")
    p.add_argument("--listen", type=endpoint_arg(), required=True, metavar="ADDR:PORT")
    p.add_argument("--report", required=True, metavar="FILE")
    p.add_argument("--ready", metavar="FILE", help="written with ADDR:PORT once listening")
    p.add_argument("--timeout", type=positive_arg(float), default=DEFAULT_TIMEOUT_S, metavar="S")

    p = add("tcp-source", _cmd_tcp_source, "stream a deterministic pattern at a bounded rate, report bytes and SHA-256")
    p.add_argument("--connect", type=endpoint_arg(), required=True, metavar="ADDR:PORT")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--bytes", type=positive_arg(int), metavar="N")
    amount.add_argument("--duration", type=positive_arg(float), metavar="S", help="send rate * S worth of bytes")
    p.add_argument("--rate-mbit", type=positive_arg(float), required=True, metavar="R")
    p.add_argument("--report", required=True, metavar="FILE")
    p.add_argument("--seed", default=DEFAULT_SEED)
    p.add_argument("--device", metavar="IF", help="SO_BINDTODEVICE")
    p.add_argument("--connect-timeout", type=positive_arg(float), default=DEFAULT_CONNECT_TIMEOUT_S, metavar="S")
    p.add_argument("--timeout", type=positive_arg(float), default=DEFAULT_TIMEOUT_S, metavar="S")

    p = add("udp-probe-sink", _cmd_probe_sink, "record one probe stream's arrivals; report loss and the longest gap")
    p.add_argument("--listen", type=endpoint_arg(), required=True, metavar="ADDR:PORT")
    p.add_argument("--report", required=True, metavar="FILE")
    p.add_argument("--ready", metavar="FILE", help="written with ADDR:PORT once bound")
    p.add_argument("--timeout", type=positive_arg(float), default=DEFAULT_TIMEOUT_S, metavar="S")
    p.add_argument("--linger", type=positive_arg(float), default=DEFAULT_LINGER_S, metavar="S")
    p.add_argument("--first-probe", metavar="FILE", help="written with the stream id when its first probe arrives")

    p = add("udp-probe-source", _cmd_probe_source, "send sequence-numbered probes at a fixed rate")
    p.add_argument("--connect", type=endpoint_arg(), required=True, metavar="ADDR:PORT")
    p.add_argument("--hz", type=positive_arg(float), default=100.0)
    p.add_argument("--duration", type=positive_arg(float), required=True, metavar="S")
    p.add_argument("--size", type=positive_arg(int), default=DEFAULT_PROBE_BYTES, metavar="BYTES")
    p.add_argument("--device", metavar="IF", help="SO_BINDTODEVICE")
    p.add_argument("--report", required=True, metavar="FILE")

    p = add("udp-echo", _cmd_echo, "echo datagrams back to their sender")
    p.add_argument("--listen", type=endpoint_arg(), required=True, metavar="ADDR:PORT")
    p.add_argument("--ready", metavar="FILE", help="written with ADDR:PORT once bound")
    p.add_argument("--report", metavar="FILE")
    p.add_argument("--timeout", type=positive_arg(float), default=DEFAULT_TIMEOUT_S, metavar="S")
    p.add_argument("--max", type=positive_arg(int), default=DEFAULT_ECHO_MAX_DATAGRAMS, metavar="N")

    p = add("udp-ping", _cmd_ping, "ping a udp-echo; exit 0 iff a reply came back; JSON on stdout")
    p.add_argument("--connect", type=endpoint_arg(), required=True, metavar="ADDR:PORT")
    p.add_argument("--count", type=positive_arg(int), default=DEFAULT_PING_COUNT)
    p.add_argument("--interval", type=positive_arg(float), default=DEFAULT_PING_INTERVAL_S, metavar="S")
    p.add_argument("--wait", type=positive_arg(float), default=DEFAULT_PING_WAIT_S, metavar="S",
                   help="how long to wait for replies after the last ping")
    p.add_argument("--device", metavar="IF", help="SO_BINDTODEVICE")
    p.add_argument("--report", metavar="FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one tool, print at most one error line, return its exit code."""
    return run_tool(build_parser(), argv, prog=PROG)


def run_tool(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, prog: str) -> int:
    """Run the subcommand ``parser`` picks (its ``handler``), print at most one error line, return its exit code.

    Shared by the lab's tools (this one and ``dns_server.py``): the same exit codes and error line.
    """
    args = parser.parse_args(argv)
    try:
        outcome: tuple[int, str | None] = trio.run(args.handler, args)
        code, error = outcome
    except OSError as exc:  # e.g. the report file cannot be written
        code, error = EXIT_FAILED, os_error_text(exc)
    if error is not None:
        print(f"{prog} {args.command}: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
