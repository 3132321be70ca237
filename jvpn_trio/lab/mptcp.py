"""Kernel MPTCP as a peer of ``jvpn-trio bench``: a timestamped stream over two subflows, and its longest stall.

    python -m jvpn_trio.lab.mptcp stream-sink   --listen 10.99.0.1:5003 --report sink.json [--ready FILE]
                                                [--first-record FILE] [--timeout S]
    python -m jvpn_trio.lab.mptcp stream-source --connect 10.99.0.1:5003 --hz 1000 --duration 4 --report src.json
                                                [--stop-file FILE]

Theory of operation
-------------------
MPTCP (RFC 8684) is not a tunnel: it carries one TCP byte stream over several TCP subflows, one
per path, and moves the data of a dead subflow to a live one.  What a user of it loses when a
path dies is therefore not packets but time: the receiver's byte stream stalls until the data
stuck on the dead subflow has been sent again on another.  So the bench measures kernel MPTCP
with a stream shaped like its UDP probe stream (:mod:`jvpn_trio.lab.traffic`): the source writes
one :data:`RECORD_BYTES`-byte record (the probe format: stream id, sequence number, schedule,
send time) every ``1 / hz`` seconds on one MPTCP connection (``IPPROTO_MPTCP``, Nagle off), and
the sink stamps every complete record with the time it was read (``time.monotonic()``, shared by
all processes).  Records held back by a stall arrive together, with one time; the longest gap
between arrivals while a fault is on is the *longest receive stall*, comparable to a tunnel's
outage figure.

Setup (:func:`setup_commands`): the in-kernel path manager of each lab namespace is allowed
:data:`SUBFLOW_LIMIT` subflows, and the client gets one endpoint, its address on the second path
with the ``subflow`` flag and the path's device: the initial subflow leaves by the kernel's
route (eth0, the lowest metric), and as soon as the connection is up the path manager opens a
second subflow from the second path (wifi0), bound to its device.  ``subflow`` and not
``backup``: both subflows are active, so the scheduler may move data to wifi0 as soon as eth0's
subflow stops taking it and re-sends the stuck data there after one retransmission timeout;
a ``backup`` subflow is used only once the active one has been marked stale
(``net.mptcp.stale_loss_cnt`` timeouts), which would measure MPTCP's slow setting, not its best.

Whether the connection really was MPTCP with two subflows is never assumed.  The sink and the
source ask their socket (``getsockopt(SOL_MPTCP, MPTCP_INFO)``, which fails with EOPNOTSUPP on a
connection that fell back to plain TCP) and the bench reads each namespace's MPTCP counters
(``/proc/net/netstat``, :func:`parse_netstat`) before and after every trial
(:func:`subflow_evidence`): a trial in which MPTCP was not negotiated, fell back, or no second
subflow joined is reported as such, never as a figure.

Everything is bounded: the schedule is capped, every tool has a timeout, and the sink stops by
itself.  Exit codes: 0 success, 1 failure (one line on stderr, the report still written), 2 bad
arguments.
"""

from __future__ import annotations

import argparse
import errno
import secrets
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import trio

from jvpn_trio.lab.netns import Lab
from jvpn_trio.lab.traffic import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_LINGER_S,
    DEFAULT_PROBE_BYTES,
    DEFAULT_TIMEOUT_S,
    MAX_PROBE_HZ,
    MAX_PROBES,
    BadProbe,
    Probe,
    TrafficError,
    connect_retrying,
    decode_probe_untrusted,
    encode_probe,
    endpoint_arg,
    format_endpoint,
    mono_offset,
    os_error_text,
    positive_arg,
    run_tool,
    write_report,
    write_text,
)

PROG = "jvpn_trio.lab.mptcp"

# -- the kernel's MPTCP interface (include/uapi/linux/mptcp.h, in.h, socket.h) -------------------------

#: ``socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)`` opens an MPTCP socket (Python 3.10+ names it too).
IPPROTO_MPTCP = int(getattr(socket, "IPPROTO_MPTCP", 262))
#: The socket-option level of MPTCP's own options, and its connection-level info option.
SOL_MPTCP = 284
MPTCP_INFO = 1
#: Room for ``struct mptcp_info`` (80 bytes in Linux 6.0, growing since); the kernel fills what it has.
MPTCP_INFO_BUFFER = 256
#: ``struct mptcp_info`` fields read here: (name, struct format, byte offset).
MPTCP_INFO_FIELDS = (
    ("subflows", "B", 0),
    ("subflows_max", "B", 3),
    ("retransmits", "I", 44),
    ("bytes_retrans", "Q", 48),
    ("bytes_sent", "Q", 56),
    ("bytes_received", "Q", 64),
    ("bytes_acked", "Q", 72),
)
#: ``mptcpi_subflows_total`` (Linux 6.10+): every subflow, the initial one included.
MPTCP_INFO_SUBFLOWS_TOTAL_OFFSET = 80
#: The MPTCP section of ``/proc/net/netstat``.
NETSTAT_SECTION = "MPTcpExt"
#: The client's count of joins the server answered: it moves once the second subflow is up.
CLIENT_JOIN_COUNTER = "MPJoinSynAckRx"
#: Per-namespace sysctls: MPTCP on or off, and the packet scheduler (Linux 6.6+).
MPTCP_ENABLED_SYSCTL = "/proc/sys/net/mptcp/enabled"
MPTCP_SCHEDULER_SYSCTL = "/proc/sys/net/mptcp/scheduler"

# -- the setup and the stream ---------------------------------------------------------------------------

#: Subflows the in-kernel path manager may open (client) or accept (server), and ADD_ADDRs accepted.
SUBFLOW_LIMIT = 2
ADD_ADDR_ACCEPTED_LIMIT = 2
#: The client endpoint's flags: an active extra subflow (see the module docstring for why not backup).
ENDPOINT_FLAGS = ("subflow",)
#: One record of the stream: the probe format of jvpn_trio.lab.traffic, padded to this size.
RECORD_BYTES = DEFAULT_PROBE_BYTES
#: Largest single recv; records are cut out of the byte stream.
RECV_BYTES = 64 * 1024
#: How often the source looks for its stop file (the bench ends a stream once its fault is over).
STOP_POLL_S = 0.02

EXIT_OK = 0
EXIT_FAILED = 1


# -----------------------------------------------------------------------------
# Pure parts
# -----------------------------------------------------------------------------


@attrs.frozen
class MptcpInfo:
    """What ``MPTCP_INFO`` says of one connection; ``fallback`` True: it is plain TCP (all else zero)."""

    fallback: bool
    #: Subflows beyond the initial one (``mptcpi_subflows``).
    subflows: int = 0
    subflows_max: int = 0
    #: Every subflow including the initial one, when the kernel reports it (6.10+), else None.
    subflows_total: int | None = None
    retransmits: int = 0
    bytes_retrans: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_acked: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def parse_mptcp_info(data: bytes) -> MptcpInfo:
    """``struct mptcp_info`` as ``getsockopt(SOL_MPTCP, MPTCP_INFO)`` returned it.

    ValueError if it is too short for the fields read (:data:`MPTCP_INFO_FIELDS`).
    """
    need = max(offset + struct.calcsize(fmt) for _, fmt, offset in MPTCP_INFO_FIELDS)
    if len(data) < need:
        raise ValueError(f"MPTCP_INFO: {len(data)} bytes, need {need}")
    values = {name: struct.unpack_from(f"={fmt}", data, offset)[0] for name, fmt, offset in MPTCP_INFO_FIELDS}
    total = data[MPTCP_INFO_SUBFLOWS_TOTAL_OFFSET] if len(data) > MPTCP_INFO_SUBFLOWS_TOTAL_OFFSET else None
    return MptcpInfo(fallback=False, subflows_total=total, **values)


def parse_netstat(text: str, section: str = NETSTAT_SECTION) -> dict[str, int]:
    """One section of ``/proc/net/netstat`` (a header line of names, then a line of values) as a dict.

    An absent section gives ``{}`` (a kernel without MPTCP); ValueError on a malformed one.
    """
    lines = [line.split() for line in text.splitlines() if line.startswith(f"{section}:")]
    if not lines:
        return {}
    if len(lines) != 2 or len(lines[0]) != len(lines[1]):
        raise ValueError(f"/proc/net/netstat: malformed {section} section")
    names, values = lines[0][1:], lines[1][1:]
    try:
        return {name: int(value) for name, value in zip(names, values)}
    except ValueError:
        raise ValueError(f"/proc/net/netstat: {section} values are not integers") from None


@attrs.frozen
class SubflowEvidence:
    """What the namespaces' MPTCP counters say happened between two readings (one trial, one connection).

    Client side: MP_CAPABLE answered by the server (``MPCapableSYNACKRX``), joins answered
    (``MPJoinSynAckRx``), fallbacks; server side: joins completed (``MPJoinAckRx``) and fallbacks.
    """

    mp_capable: int
    client_joins: int
    server_joins: int
    fallbacks: int
    #: Subflows the counters call stale (SubflowStale) and MPTCP-level retransmissions (MPTCPRetrans).
    stale: int = 0
    mptcp_retrans: int = 0

    @property
    def problem(self) -> str | None:
        """Why this is not an MPTCP connection with two subflows, or None."""
        if self.fallbacks or not self.mp_capable:
            return (f"MPTCP fell back to plain TCP (MP_CAPABLE answered {self.mp_capable}, "
                    f"fallbacks {self.fallbacks})")  # fmt: skip
        if not (self.client_joins and self.server_joins):
            return (f"no second subflow joined (joins answered {self.client_joins}, "
                    f"completed {self.server_joins})")  # fmt: skip
        return None

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "two_subflows": self.problem is None}


#: Counters that mean "this connection is plain TCP after all", on either side.
FALLBACK_COUNTERS = ("MPCapableFallbackACK", "MPCapableFallbackSYNACK", "MPCapableDataFallback", "DssFallback",
                     "SimultConnectFallback", "DSSCorruptionFallback", "MD5SigFallback")  # fmt: skip


def _delta(before: Mapping[str, int], after: Mapping[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def subflow_evidence(
    client_before: Mapping[str, int], client_after: Mapping[str, int],
    server_before: Mapping[str, int], server_after: Mapping[str, int],
) -> SubflowEvidence:  # fmt: skip
    """The evidence between two readings of each namespace's counters (:func:`parse_netstat`)."""
    fallbacks = sum(_delta(client_before, client_after, n) + _delta(server_before, server_after, n)
                    for n in FALLBACK_COUNTERS)  # fmt: skip
    return SubflowEvidence(
        mp_capable=_delta(client_before, client_after, "MPCapableSYNACKRX"),
        client_joins=_delta(client_before, client_after, CLIENT_JOIN_COUNTER),
        server_joins=_delta(server_before, server_after, "MPJoinAckRx"),
        fallbacks=fallbacks,
        stale=_delta(client_before, client_after, "SubflowStale") + _delta(server_before, server_after, "SubflowStale"),
        mptcp_retrans=_delta(client_before, client_after, "MPTCPRetrans")
        + _delta(server_before, server_after, "MPTCPRetrans"),
    )


@attrs.frozen
class Setup:
    """The ``ip mptcp`` commands for a lab: per role (``client``, ``gateway``), argv lists in order."""

    client: tuple[tuple[str, ...], ...]
    gateway: tuple[tuple[str, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {"client": [" ".join(a) for a in self.client], "gateway": [" ".join(a) for a in self.gateway]}


def setup_commands(second_path: str, second_address: str) -> Setup:
    """Limits on both sides and one ``subflow`` endpoint: the client's ``second_address`` on ``second_path``."""
    limits = ("ip", "mptcp", "limits", "set", "subflow", str(SUBFLOW_LIMIT),
              "add_addr_accepted", str(ADD_ADDR_ACCEPTED_LIMIT))  # fmt: skip
    flush = ("ip", "mptcp", "endpoint", "flush")
    endpoint = ("ip", "mptcp", "endpoint", "add", second_address, "dev", second_path, *ENDPOINT_FLAGS)
    return Setup(client=(flush, limits, endpoint), gateway=(flush, limits))


def busiest_path(tx_bytes: Mapping[str, int]) -> str:
    """The path that sent the most bytes (ties: the first, in the order given); ValueError if none is given.

    The bench's fault goes on this path: with both subflows active the scheduler spreads the
    stream over them, and the one carrying most of it is "the path carrying traffic".
    """
    if not tx_bytes:
        raise ValueError("no path to choose from")
    best = next(iter(tx_bytes))
    for name, sent in tx_bytes.items():
        if sent > tx_bytes[best]:
            best = name
    return best


def split_records(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Cut whole :data:`RECORD_BYTES` records off the front of ``buffer``; return them and the rest."""
    whole = len(buffer) - len(buffer) % RECORD_BYTES
    return [buffer[i : i + RECORD_BYTES] for i in range(0, whole, RECORD_BYTES)], buffer[whole:]


# -----------------------------------------------------------------------------
# Reports
# -----------------------------------------------------------------------------


@attrs.frozen
class StreamSourceReport:
    stream_id: int
    count: int
    hz: float
    start: float
    #: Records the kernel accepted (written to the socket).
    written: int
    mptcp: MptcpInfo | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["mptcp"] = None if self.mptcp is None else self.mptcp.to_json()
        return out


@attrs.frozen
class StreamSinkReport:
    """The sink's view.  ``start``/``end`` are the stream's schedule (from its records), ``end`` cut short
    by an early end of the stream; ``arrivals`` are ``(seq, time)`` with times absolute (monotonic)."""

    stream_id: int | None
    start: float | None
    end: float | None
    arrivals: tuple[tuple[int, float], ...]
    bad_records: int
    eof: bool
    mptcp: MptcpInfo | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        base = self.start or 0.0
        return {
            "stream_id": self.stream_id,
            "start": self.start,
            "end": self.end,
            "received": len(self.arrivals),
            # A byte stream delivers in order: the records read are exactly 0, 1, 2, ... (nothing lost or doubled).
            "in_order": all(seq == i for i, (seq, _) in enumerate(self.arrivals)),
            "bad_records": self.bad_records,
            "eof": self.eof,
            "mptcp": None if self.mptcp is None else self.mptcp.to_json(),
            "error": self.error,
            # Arrival times relative to the stream's start, in seconds (as the UDP probe sink writes them).
            "arrivals": [[seq, round(t - base, 6)] for seq, t in self.arrivals],
        }


# -----------------------------------------------------------------------------
# Sockets and the two tools
# -----------------------------------------------------------------------------


def mptcp_socket(host: str) -> trio.socket.SocketType:
    """An MPTCP stream socket for ``host``'s family; OSError (EPROTONOSUPPORT, ...) where the kernel has none."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return trio.socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)


def unavailable_reason() -> str | None:
    """Why this kernel cannot open an MPTCP socket (checked outside any lab, touching no network), or None."""
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    except OSError as exc:
        return f"the kernel has no MPTCP (socket(IPPROTO_MPTCP): {os_error_text(exc)})"
    probe.close()
    return None


def connection_info(sock: trio.socket.SocketType) -> MptcpInfo:
    """``MPTCP_INFO`` of a connected MPTCP socket; ``fallback`` when it is plain TCP (EOPNOTSUPP).

    Other OSErrors propagate.
    """
    try:
        data = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, MPTCP_INFO_BUFFER)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return MptcpInfo(fallback=True)
        raise
    return parse_mptcp_info(data)


async def run_stream_sink(
    listen: tuple[str, int],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    linger_s: float = DEFAULT_LINGER_S,
    on_first_record: Callable[[Probe], Awaitable[None]] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> StreamSinkReport:
    """Accept one MPTCP connection on ``listen`` and stamp every record of its stream as it is read.

    Stops at the stream's end (EOF), ``linger_s`` after its last scheduled record, or ``timeout_s``
    after listening began, whichever is first; reads ``MPTCP_INFO`` before closing.  Awaits
    ``on_first_record`` with the first record.  ``task_status.started((host, port))`` once
    listening.  Raises OSError if it cannot listen (no MPTCP, address in use).
    """
    arrivals: list[tuple[int, float]] = []
    bad = 0
    eof = False
    first: Probe | None = None
    info: MptcpInfo | None = None
    error: str | None = None
    end_early: float | None = None
    sock = mptcp_socket(listen[0])
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(listen)
        sock.listen(1)
        task_status.started(sock.getsockname()[:2])
        stop_at = trio.current_time() + timeout_s
        conn: trio.socket.SocketType | None = None
        with trio.move_on_at(stop_at):
            conn, _peer = await sock.accept()
        if conn is None:
            return StreamSinkReport(None, None, None, (), 0, False, None, f"no connection within {timeout_s:g} s")
        with conn:
            pending = b""
            while True:
                data: bytes | None = None
                with trio.move_on_at(stop_at):
                    try:
                        data = await conn.recv(RECV_BYTES)
                    except OSError as exc:
                        error = f"after {len(arrivals)} records: {os_error_text(exc)}"
                        end_early = time.monotonic()
                        break
                if data is None:
                    break
                arrived = time.monotonic()
                if not data:
                    eof, end_early = True, arrived
                    break
                records, pending = split_records(pending + data)
                for raw in records:
                    try:
                        record = decode_probe_untrusted(raw)
                    except BadProbe:
                        bad += 1
                        continue
                    if first is None:
                        first = record
                        stop_at = min(stop_at, record.end + linger_s - mono_offset())
                        if on_first_record is not None:
                            await on_first_record(record)
                    if record.stream_id == first.stream_id and len(arrivals) < MAX_PROBES:
                        arrivals.append((record.seq, arrived))
                    else:
                        bad += 1
            try:
                info = connection_info(conn)
            except (OSError, ValueError) as exc:
                error = error or f"MPTCP_INFO: {exc}"
    if first is None:
        return StreamSinkReport(None, None, None, (), bad, eof, info, error or "no record arrived")
    end = first.end if end_early is None else min(first.end, end_early)
    return StreamSinkReport(first.stream_id, first.start, end, tuple(arrivals), bad, eof, info, error)


def _stream_socket(host: str) -> trio.socket.SocketType:
    """An MPTCP socket that sends each small record at once (Nagle off)."""
    sock = mptcp_socket(host)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _cancel_once_exists(path: str, scope: trio.CancelScope) -> None:
    while not await trio.Path(path).exists():
        await trio.sleep(STOP_POLL_S)
    scope.cancel()


async def run_stream_source(
    connect: tuple[str, int],
    *,
    hz: float,
    duration_s: float,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    linger_s: float = DEFAULT_LINGER_S,
    stream_id: int | None = None,
    stop_file: str | None = None,
) -> StreamSourceReport:
    """Write ``round(hz * duration_s)`` records to ``connect`` on a fixed schedule over one MPTCP connection.

    A write that blocks (the stream stalled) delays the later ones; they go out as soon as it
    moves.  A socket error ends the stream and is recorded.  Once ``stop_file`` exists the
    stream ends early (its caller then has what it needs).  Reads ``MPTCP_INFO`` after the
    last record, then half-closes and waits (``linger_s``) for the sink to close.  Raises
    TrafficError on bad arguments or if it cannot connect, OSError if MPTCP is missing.
    """
    count = round(hz * duration_s)
    if not 0 < hz <= MAX_PROBE_HZ:
        raise TrafficError(f"rate must be within (0, {MAX_PROBE_HZ}] Hz, got {hz}")
    if not 0 < count <= MAX_PROBES:
        raise TrafficError(f"hz * duration must give 1..{MAX_PROBES} records, got {count}")
    if stream_id is None:
        stream_id = int.from_bytes(secrets.token_bytes(4), "big")
    written = 0
    error: str | None = None
    info: MptcpInfo | None = None
    sock = await connect_retrying(connect, lambda: _stream_socket(connect[0]), connect_timeout_s)
    with sock:
        t0 = trio.current_time()
        start = t0 + mono_offset()
        try:
            async with trio.open_nursery() as nursery:
                if stop_file is not None:
                    nursery.start_soon(_cancel_once_exists, stop_file, nursery.cancel_scope)
                for seq in range(count):
                    await trio.sleep_until(t0 + seq / hz)
                    record = Probe(stream_id=stream_id, seq=seq, count=count, hz=hz, start=start, sent=time.monotonic())
                    data = memoryview(encode_probe(record, RECORD_BYTES))
                    while data:
                        data = data[await sock.send(data) :]
                    written += 1
                nursery.cancel_scope.cancel()
            info = connection_info(sock)
            sock.shutdown(socket.SHUT_WR)
            with trio.move_on_after(linger_s):
                while await sock.recv(RECV_BYTES):
                    pass
        except (OSError, ValueError) as exc:
            error = f"after {written} records: {os_error_text(exc) if isinstance(exc, OSError) else exc}"
    return StreamSourceReport(stream_id, count, hz, start, written, info, error)


# -----------------------------------------------------------------------------
# In a lab: setup and counters (the bench runs these; the caller bounds the time)
# -----------------------------------------------------------------------------


async def enabled_in(lab: Lab, ns: str) -> bool:
    """Whether ``net.mptcp.enabled`` is 1 in the namespace ``ns`` (False where the kernel has no MPTCP)."""
    result = await lab.run(ns, "cat", MPTCP_ENABLED_SYSCTL, check=False)
    return result.returncode == 0 and result.stdout.strip() == b"1"


async def configure_lab(lab: Lab, second_path: str) -> Setup:
    """Set the path manager's limits in both namespaces and the client's ``subflow`` endpoint on ``second_path``.

    LabError if ``ip mptcp`` fails (an iproute2 or kernel without it).
    """
    address, _next_hop = lab.path_addresses(second_path)
    setup = setup_commands(second_path, address)
    for ns, commands in ((lab.client_ns, setup.client), (lab.gateway_ns, setup.gateway)):
        for argv in commands:
            await lab.run(ns, *argv)
    return setup


async def counters(lab: Lab, ns: str) -> dict[str, int]:
    """The namespace's MPTCP counters (``/proc/net/netstat`` read from inside it); ``{}`` without MPTCP."""
    result = await lab.run(ns, "cat", "/proc/net/netstat")
    return parse_netstat(result.stdout.decode(errors="replace"))


async def scheduler_in(lab: Lab, ns: str) -> str | None:
    """The namespace's MPTCP packet scheduler (``net.mptcp.scheduler``), None where the kernel has no choice."""
    result = await lab.run(ns, "cat", MPTCP_SCHEDULER_SYSCTL, check=False)
    return result.stdout.decode(errors="replace").strip() or None if result.returncode == 0 else None


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def mptcp_argv(subcommand: str, *args: str) -> list[str]:
    """The argv that runs ``python -m jvpn_trio.lab.mptcp <subcommand> <args>`` with this interpreter."""
    return [sys.executable, "-m", PROG, subcommand, *args]


async def _cmd_sink(args: argparse.Namespace) -> tuple[int, str | None]:
    ready_path, first_path = args.ready, args.first_record

    async def on_first_record(record: Probe) -> None:
        if first_path is not None:
            await write_text(first_path, f"{record.stream_id}\n")

    async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> StreamSinkReport:
        return await run_stream_sink(args.listen, timeout_s=args.timeout, linger_s=args.linger,
                                     on_first_record=on_first_record, task_status=task_status)  # fmt: skip

    result: list[StreamSinkReport] = []

    async def runner(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        result.append(await serve(task_status=task_status))

    try:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(runner)
            if ready_path is not None:
                await write_text(ready_path, format_endpoint(bound) + "\n")
        report = result[0]
    except OSError as exc:
        report = StreamSinkReport(None, None, None, (), 0, False, None,
                                  f"cannot listen on {format_endpoint(args.listen)}: {os_error_text(exc)}")  # fmt: skip
    await write_report(args.report, report.to_json())
    return (EXIT_OK, None) if report.ok else (EXIT_FAILED, report.error)


async def _cmd_source(args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        report = await run_stream_source(args.connect, hz=args.hz, duration_s=args.duration,
                                         connect_timeout_s=args.connect_timeout, linger_s=args.linger,
                                         stop_file=args.stop_file)  # fmt: skip
    except (TrafficError, OSError) as exc:
        text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        report = StreamSourceReport(0, 0, args.hz, 0.0, 0, None, text)
    await write_report(args.report, report.to_json())
    return (EXIT_OK, None) if report.ok else (EXIT_FAILED, report.error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="An MPTCP record stream and its receiver (run inside a namespace).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stream-sink", help="accept one MPTCP connection and stamp each record's arrival")
    p.set_defaults(handler=_cmd_sink)
    p.add_argument("--listen", type=endpoint_arg(), required=True, metavar="ADDR:PORT")
    p.add_argument("--report", required=True, metavar="FILE")
    p.add_argument("--ready", metavar="FILE", help="written with ADDR:PORT once listening")
    p.add_argument("--first-record", metavar="FILE", help="written with the stream id when its first record arrives")
    p.add_argument("--timeout", type=positive_arg(float), default=DEFAULT_TIMEOUT_S, metavar="S")
    p.add_argument("--linger", type=positive_arg(float), default=DEFAULT_LINGER_S, metavar="S")

    p = sub.add_parser("stream-source", help="write timestamped records at a fixed rate over one MPTCP connection")
    p.set_defaults(handler=_cmd_source)
    p.add_argument("--connect", type=endpoint_arg(), required=True, metavar="ADDR:PORT")
    p.add_argument("--hz", type=positive_arg(float), default=1000.0)
    p.add_argument("--duration", type=positive_arg(float), required=True, metavar="S")
    p.add_argument("--report", required=True, metavar="FILE")
    p.add_argument("--connect-timeout", type=positive_arg(float), default=DEFAULT_CONNECT_TIMEOUT_S, metavar="S")
    p.add_argument("--linger", type=positive_arg(float), default=DEFAULT_LINGER_S, metavar="S")
    p.add_argument("--stop-file", metavar="FILE", help="end the stream early once FILE exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one tool, print at most one error line, return its exit code."""
    return run_tool(build_parser(), argv, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
