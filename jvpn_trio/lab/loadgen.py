"""``jvpn-trio loadgen``: many clients against one real gateway process, measured.

    jvpn-trio loadgen [--sessions 1000,10000,100000] [--window N] [--reattaches N] [--json [FILE]]

Theory of operation
-------------------
The gateway is the real ``jvpn-trio serve`` in the gateway namespace of a fresh one-path lab
(:func:`jvpn_trio.lab.netns.open_lab`), with its event sink on and one ``[[peer]]`` per
simulated client (no fixed addresses: the pool of a /10 tunnel network hands them out).  The
clients are one *worker* process in the client namespace (``python -m jvpn_trio.lab.loadgen
worker``): every simulated session has its own static key and its own UDP socket, bound to
its own source address and port (extra addresses on the client's eth0 give more than one
address's worth of ports), so the gateway sees as many endpoints as sessions.  The worker
speaks the real protocol through the core's own code: ``InitiatorHandshake`` for the
handshake, ``SecureChannel`` for sealed PROBE, REATTACH and DATA; nothing is reimplemented.
All sockets sit in one epoll set that a single Trio task waits on, so 100k sockets cost one
task, not 100k.

For each size in ``--sessions`` (ascending; each adds sessions to the ones already there):

1. *Handshakes*: the new sessions handshake, at most ``--window`` at a time; a session counts
   as established once its first PROBE is acknowledged (the gateway has then confirmed the
   keys).  Handshakes/s = established / wall time of the phase.
2. *Idle*: after ``--settle`` seconds, the gateway's VmRSS (``/proc/<pid>/status``) and its CPU
   over ``--idle-seconds``.  Memory per session = (RSS(N) - RSS(0)) / N, RSS(0) being read
   before the first handshake.  Idle sessions send nothing: the policy (:data:`LOAD_POLICY`)
   gives them an hour's transport-loss TTL and hour-long keys, so no keepalive traffic is
   needed to hold them (with the default 30 s TTL each would need a probe every few seconds).
3. *Reattaches*: ``--reattaches`` of the sessions just added move to a new source port with a
   sealed REATTACH (``--window`` at a time); reattaches/s = acknowledged / wall time.
4. *Live stream*: the first session sends ``--live-hz`` DATA packets (ICMP echo requests to
   the gateway's tunnel address, answered by the gateway namespace's kernel through the TUN)
   for ``--live-seconds`` while the rest idle; loss % = unanswered echoes / sent.

Every phase is bounded (``--phase-timeout``); a size whose handshakes do not finish in time is
reported as far as it got, and no larger size is tried.  Output: a Markdown table and, with
``--json``, one JSON document; progress on stderr.  Exit codes: 0 measured, 1 a size fell
short of its session count or a phase failed, 2 cannot run as asked.

This is a benchmark: it measures wall-clock time on purpose, and asserts nothing about it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import ipaddress
import json
import math
import os
import platform
import resource
import secrets
import select
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs
import trio

from jvpn_trio import __version__
from jvpn_trio.core import wire
from jvpn_trio.core.channel import ChannelDrop, SecureChannel
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.keyring import KeyExhausted
from jvpn_trio.core.noise import HandshakeError, InitiatorHandshake, StaticKeypair, generate_static
from jvpn_trio.core.policy import DEFAULT_POLICY, HOUR_MS, Policy
from jvpn_trio.core.states import ReasonCode

# -----------------------------------------------------------------------------
# Settings and named constants
# -----------------------------------------------------------------------------

DEFAULT_SIZES = (1_000, 10_000, 100_000)
MAX_SESSIONS = 1_000_000
DEFAULT_WINDOW = 256
MAX_WINDOW = 16_384
DEFAULT_REATTACHES = 500
DEFAULT_SETTLE_S = 3.0
DEFAULT_IDLE_S = 10.0
DEFAULT_LIVE_S = 10.0
DEFAULT_LIVE_HZ = 100.0
DEFAULT_PHASE_TIMEOUT_S = 900.0
MAX_SECONDS = 3_600.0

#: New labs are this plus 4 random hex digits, told apart from ``jvlab*`` and ``jvbn*``.
PREFIX_FAMILY = "jvld"
PORT = 51820
CONTROL_PORT = PORT + 1  # config.DEFAULT_CONTROL_PORT_OFFSET
GATEWAY_TUN = "jvld0"
#: A /10: room for a million sessions' addresses (the pool hands them out lazily).
TUNNEL_ADDRESS = "10.64.0.1/10"
NODE_ID = "gw-load"
#: Source ports each source address lends to sessions (inclusive range, outside the ephemeral range).
FIRST_SOURCE_PORT = 1_024
LAST_SOURCE_PORT = 32_767
#: Extra source addresses on the client's eth0 are its /24's hosts from this one up.
FIRST_SOURCE_HOST = 10
LAST_SOURCE_HOST = 250
#: File descriptors the worker needs beyond one per socket (epoll, Trio, stdio, files).
SPARE_FDS = 256

#: The gateway's (and the clients') policy: the laptop default but for hour-long idle life.
#: Idle sessions then need no keepalives during the run (the TTL) and no rekey (the keys).
LOAD_POLICY: Mapping[str, int] = {
    "transport_loss_ttl_ms": HOUR_MS,
    "rekey_after_s": 3 * 3_600,
    "reject_after_s": 4 * 3_600,
}

#: A handshake or REATTACH unanswered this long is sent again (the policy's handshake_retry_ms).
RETRY_S = DEFAULT_POLICY.handshake_retry_ms / 1000.0
#: Attempts per handshake / REATTACH before the session counts as failed.
ATTEMPTS = 5
#: Echoes answered this long after the stream ends still count.
LIVE_GRACE_S = 1.0
ICMP_PAYLOAD_BYTES = 56
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
IP_PROTO_ICMP = 1
IPV4_TTL = 64
#: Datagrams one epoll wake-up reads per socket before moving on.
RECV_BURST = 16
RECV_BYTES = 65_535
EPOLL_MAX_EVENTS = 1_024

#: Bounds on the orchestrator's waits.
STARTUP_TIMEOUT_S = 600.0
STATUS_TIMEOUT_S = 120.0
POLL_S = 0.05
#: The worker gets this long beyond the sum of its phases' bounds.
WORKER_SLACK_S = 120.0

KIB = 1024


class LoadError(Exception):
    """The load run cannot go on (a process died, a phase failed); one line."""


# -----------------------------------------------------------------------------
# Pure parts
# -----------------------------------------------------------------------------


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"1000,10k"`` -> ascending distinct sizes; ArgumentTypeError on anything else."""
    sizes = set()
    for word in (w.strip().lower() for w in text.split(",")):
        if not word:
            continue
        scale = 1_000 if word.endswith("k") else 1
        try:
            value = int(word[:-1] if scale > 1 else word) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"sessions must be a comma list of counts, got {text!r}") from None
        if not 1 <= value <= MAX_SESSIONS:
            raise argparse.ArgumentTypeError(f"a session count must be 1..{MAX_SESSIONS}, got {value}")
        sizes.add(value)
    if not sizes:
        raise argparse.ArgumentTypeError(f"sessions must name at least one count, got {text!r}")
    return tuple(sorted(sizes))


def endpoints_needed(sizes: Sequence[int], reattaches: int) -> int:
    """Sockets the run opens: one per session, plus one per REATTACH (a move to a new port)."""
    total, previous = 0, 0
    for size in sizes:
        added = size - previous
        total += added + min(reattaches, added - (1 if previous == 0 else 0))  # session 0 (the live one) stays
        previous = size
    return total


def ports_per_host(first_port: int = FIRST_SOURCE_PORT, last_port: int = LAST_SOURCE_PORT) -> int:
    return last_port - first_port + 1


def source_hosts(base: str, count: int) -> list[str]:
    """``count`` extra source addresses in ``base``'s /24 (hosts FIRST_SOURCE_HOST up); ValueError if too many."""
    if count > LAST_SOURCE_HOST - FIRST_SOURCE_HOST + 1:
        raise ValueError(f"{count} source addresses do not fit in one /24 (at most {LAST_SOURCE_HOST - FIRST_SOURCE_HOST + 1})")
    network = ipaddress.IPv4Interface(f"{base}/24").network
    return [str(network.network_address + FIRST_SOURCE_HOST + i) for i in range(count)]


def source_endpoint(index: int, hosts: Sequence[str], *, first_port: int = FIRST_SOURCE_PORT,
                    last_port: int = LAST_SOURCE_PORT) -> tuple[str, int]:  # fmt: skip
    """The ``index``-th source endpoint: the ports of the first host, then of the next; IndexError past the end."""
    per_host = ports_per_host(first_port, last_port)
    host, offset = divmod(index, per_host)
    if index < 0 or host >= len(hosts):
        raise IndexError(f"source endpoint {index} is beyond {len(hosts)} addresses x {per_host} ports")
    return hosts[host], first_port + offset


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo_request(source: str, destination: str, *, ident: int, seq: int,
                      payload_bytes: int = ICMP_PAYLOAD_BYTES) -> bytes:  # fmt: skip
    """An IPv4 ICMP echo request (checksums filled in): the live stream's packet."""
    payload = bytes(payload_bytes)
    icmp = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq & 0xFFFF, 0, IPV4_TTL, IP_PROTO_ICMP, 0,
        ipaddress.IPv4Address(source).packed, ipaddress.IPv4Address(destination).packed,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + icmp


def icmp_echo_reply_untrusted(packet: bytes) -> tuple[int, int] | None:
    """``(ident, seq)`` of an IPv4 ICMP echo reply; None for anything else."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != IP_PROTO_ICMP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8 or packet[ihl] != ICMP_ECHO_REPLY:
        return None
    ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
    return ident, seq


def parse_vm_rss_kib(status_text: str) -> int | None:
    """Resident set size in KiB (``VmRSS``) from ``/proc/<pid>/status``; None if absent."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def parse_cpu_ticks(stat_text: str) -> int:
    """utime + stime from ``/proc/<pid>/stat`` (fields counted after the last ``)``); ValueError if malformed."""
    _, paren, rest = stat_text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 13:
        raise ValueError("not a /proc/<pid>/stat line")
    return int(fields[11]) + int(fields[12])


def rate(count: int, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def loss_pct(sent: int, received: int) -> float | None:
    return 100.0 * (sent - received) / sent if sent > 0 else None


def kib_per_session(rss0_kib: int | None, rss_kib: int | None, sessions: int) -> float | None:
    """(RSS(N) - RSS(0)) / N in KiB; None when either figure is missing or there are no sessions."""
    if rss0_kib is None or rss_kib is None or sessions <= 0:
        return None
    return (rss_kib - rss0_kib) / sessions


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (``fraction`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def policy_lines(policy: Mapping[str, Any]) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in policy.items())


def gateway_config_text(*, public_keys: Sequence[str], listen: str, directory: Path) -> str:
    """``gateway.toml`` with one ``[[peer]]`` per key (no fixed address: the pool hands them out)."""
    head = f"""[gateway]
private_key_file = "gateway.key"
listen = [{json.dumps(listen)}]
tun_name = "{GATEWAY_TUN}"
tunnel_address = "{TUNNEL_ADDRESS}"
nat = false
events_file = "gateway-events.jsonl"
control_socket = "{directory / 'gateway.sock'}"
node_id = "{NODE_ID}"

[policy]
{policy_lines(LOAD_POLICY)}
"""
    peers = "".join(f'\n[[peer]]\nname = "load{i}"\npublic_key = "{key}"\n' for i, key in enumerate(public_keys))
    return head + peers


@attrs.frozen(kw_only=True)
class WorkerPlan:
    """What the worker is told (a JSON file): where the gateway is and what to measure."""

    gateway_public: str  # base64
    gateway_host: str
    gateway_tunnel: str  # the gateway's tunnel address: the live stream's echo target
    keys_file: str  # one base64 private key per line, one per session, in order
    hosts: tuple[str, ...]  # source addresses
    sizes: tuple[int, ...]
    window: int
    reattaches: int
    settle_s: float
    idle_s: float
    live_s: float
    live_hz: float
    phase_timeout_s: float
    gateway_pid: int
    data_port: int = PORT
    control_port: int = CONTROL_PORT

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkerPlan:
        values = dict(data)
        values["hosts"] = tuple(values["hosts"])
        values["sizes"] = tuple(values["sizes"])
        return cls(**values)


@attrs.define(kw_only=True)
class SizeResult:
    """One size's measurements (filled in by the worker as it goes)."""

    sessions: int
    established: int = 0
    handshakes_new: int = 0
    handshake_failed: int = 0
    handshake_s: float = 0.0
    handshakes_per_s: float | None = None
    timed_out: bool = False
    rss_kib: int | None = None
    kib_per_session: float | None = None
    idle_cores: float | None = None
    reattach_sent: int = 0
    reattach_acked: int = 0
    reattach_rejected: dict[str, int] = attrs.Factory(dict)
    reattach_s: float = 0.0
    reattaches_per_s: float | None = None
    live_sent: int = 0
    live_received: int = 0
    live_loss_pct: float | None = None
    live_rtt_p50_ms: float | None = None
    live_rtt_p99_ms: float | None = None
    live_cores: float | None = None
    closed_by_gateway: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_table(report: Mapping[str, Any]) -> str:
    """The Markdown table of a report document (:func:`run_load`'s JSON)."""
    lines = [
        f"jvpn-trio loadgen, {report['started_utc']} UTC, {report['host']['cpus']} CPUs, "
        f"gateway start with {report['peers']} peers: {_fmt(report.get('gateway_startup_s'), '.1f')} s, "
        f"RSS(0) {_fmt(_mib(report.get('rss0_kib')), '.1f')} MiB",
        "",
        "| sessions | established | handshakes/s | gateway RSS MiB | KiB/session | idle CPU (cores) "
        "| reattaches/s (acked/sent) | live 100 Hz loss % | live RTT p50 / p99 ms | CPU during live |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in report["sizes"]:
        short = " (timed out)" if size["timed_out"] else ""
        lines.append(
            f"| {size['sessions']:,} | {size['established']:,}{short} | {_fmt(size['handshakes_per_s'], ',.0f')} "
            f"| {_fmt(_mib(size['rss_kib']), ',.1f')} | {_fmt(size['kib_per_session'], '.1f')} "
            f"| {_fmt(size['idle_cores'], '.3f')} "
            f"| {_fmt(size['reattaches_per_s'], ',.0f')} ({size['reattach_acked']}/{size['reattach_sent']}) "
            f"| {_fmt(size['live_loss_pct'], '.2f')} ({size['live_received']}/{size['live_sent']}) "
            f"| {_fmt(size['live_rtt_p50_ms'], '.2f')} / {_fmt(size['live_rtt_p99_ms'], '.2f')} "
            f"| {_fmt(size['live_cores'], '.2f')} |"
        )
    lines.append("")
    lines.append(f"gateway status: {report.get('gateway_session_count')} sessions; policy: {report['policy']}")
    return "\n".join(lines) + "\n"


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / KIB


# -----------------------------------------------------------------------------
# The worker: many impersonated clients in one process
# -----------------------------------------------------------------------------


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@attrs.define(eq=False)
class Impersonated:
    """One simulated client: its key, socket, keys and what the gateway last told it."""

    number: int
    static: StaticKeypair
    sock: socket.socket
    channel: SecureChannel
    path: PathId = PathId(1)
    pending: InitiatorHandshake | None = None
    session_id: SessionId | None = None
    tunnel_ipv4: str | None = None
    created_at: float = 0.0
    version: int = 0
    nonce: int = 0
    probe_seq: int = 0
    acked_seq: int = -1
    reattach_answer: tuple[int, str | None] | None = None  # (nonce, None: ACK, else the reject reason)
    closed: bool = False
    wake: trio.Event = attrs.Factory(trio.Event)


class Worker:
    """The client side of the load: sockets in one epoll set, sessions, and the phases."""

    def __init__(self, plan: WorkerPlan, keys: Sequence[bytes]) -> None:
        self.plan = plan
        self.policy = Policy.from_mapping(LOAD_POLICY)
        self.gateway_public = base64.b64decode(plan.gateway_public)
        self.data = (plan.gateway_host, plan.data_port)
        self.control = (plan.gateway_host, plan.control_port)
        self.keys = keys
        self.sessions: list[Impersonated] = []
        self.by_fd: dict[int, Impersonated] = {}
        self.epoll = select.epoll()
        self.next_endpoint = 0
        self.live_sent_at: dict[int, float] = {}
        self.live_rtts: list[float] = []
        self.send_failed = 0
        self.undecodable = 0
        self._rejected: dict[str, int] = {}
        self.stale_retries = 0
        self.ticks_per_s = float(os.sysconf("SC_CLK_TCK"))

    # -- sockets ------------------------------------------------------------------------
    def _open_socket(self) -> socket.socket:
        host, port = source_endpoint(self.next_endpoint, self.plan.hosts)
        self.next_endpoint += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock

    def _register(self, session: Impersonated) -> None:
        self.by_fd[session.sock.fileno()] = session
        self.epoll.register(session.sock.fileno(), select.EPOLLIN)

    def _unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        self.by_fd.pop(fd, None)
        with contextlib.suppress(OSError):
            self.epoll.unregister(fd)
        sock.close()

    def _send(self, session: Impersonated, datagram: bytes, addr: tuple[str, int]) -> None:
        try:
            session.sock.sendto(datagram, addr)
        except OSError:
            self.send_failed += 1

    def _seal(self, session: Impersonated, msg_type: wire.MessageType, plaintext: bytes) -> bytes | None:
        try:
            return session.channel.seal(msg_type, plaintext)
        except KeyExhausted:
            return None

    # -- receiving ----------------------------------------------------------------------
    async def receive_forever(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.epoll)
            now = trio.current_time()
            for fd, _mask in self.epoll.poll(0, EPOLL_MAX_EVENTS):
                session = self.by_fd.get(fd)
                if session is None:
                    continue
                for _ in range(RECV_BURST):
                    try:
                        data = session.sock.recv(RECV_BYTES)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # an ICMP error queued on the socket: nothing to read
                    self._on_datagram(session, data, now)
            await trio.lowlevel.checkpoint()

    def _on_datagram(self, session: Impersonated, data: bytes, now: float) -> None:
        try:
            msg_type = wire.peek_type_untrusted(data)
        except wire.BadFrame:
            self.undecodable += 1
            return
        if msg_type is wire.MessageType.HANDSHAKE_RESP:
            self._on_response(session, data, now)
            return
        try:
            opened = session.channel.open_untrusted(data, now=now)
        except ChannelDrop:
            self.undecodable += 1
            return
        if opened.msg_type is wire.MessageType.DATA:
            reply = icmp_echo_reply_untrusted(opened.plaintext)
            if reply is not None:
                sent_at = self.live_sent_at.pop(reply[1], None)
                if sent_at is not None:
                    self.live_rtts.append(now - sent_at)
            return
        try:
            message = wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext)
        except wire.BadFrame:
            self.undecodable += 1
            return
        match message:
            case wire.ProbeAck(seq=seq, gateway_state_version=version):
                # An ACK built before the gateway's supervisor confirmed the keys still says the
                # version before the handshake's; never step back to it.
                session.acked_seq = seq
                session.version = max(session.version, version)
            case wire.ReattachAck(nonce=nonce, new_version=version):
                session.version = version
                session.reattach_answer = (nonce, None)
            case wire.ReattachReject(nonce=nonce, reason=reason, current_version=version):
                session.version = version
                session.reattach_answer = (nonce, reason.value)
            case wire.Close():
                session.closed = True
            case _:
                self.undecodable += 1
                return
        session.wake.set()

    def _on_response(self, session: Impersonated, data: bytes, now: float) -> None:
        pending = session.pending
        if pending is None:
            return
        try:
            resp = wire.decode_handshake_resp_untrusted(data)
            if resp.receiver_index != pending.sender_index:
                return
            result = pending.consume_response(resp)
        except (wire.BadFrame, HandshakeError):
            self.undecodable += 1
            return
        session.pending = None
        session.channel.install_current(result.keypair(created_at=now))
        session.session_id = result.session_id
        session.tunnel_ipv4 = str(result.tunnel_ipv4)
        session.version = result.state_version
        session.created_at = now
        session.wake.set()

    async def _wait(self, session: Impersonated, timeout_s: float) -> None:
        session.wake = trio.Event()
        with trio.move_on_after(timeout_s):
            await session.wake.wait()

    # -- phase 1: handshakes ----------------------------------------------------------------
    def _send_probe(self, session: Impersonated) -> None:
        session.probe_seq += 1
        probe = wire.Probe(path_id=session.path, seq=session.probe_seq, sent_us=int(trio.current_time() * 1e6))
        datagram = self._seal(session, wire.MessageType.PROBE, wire.encode_probe_plaintext(probe))
        if datagram is not None:
            self._send(session, datagram, self.control)

    async def _establish(self, session: Impersonated) -> bool:
        """Handshake, then one acknowledged PROBE (the gateway confirms the keys); retried ATTEMPTS times."""
        for _ in range(ATTEMPTS):
            if session.session_id is None:
                sender_index = int.from_bytes(os.urandom(4), "big")
                state, init = InitiatorHandshake.create(
                    session.static, self.gateway_public, sender_index=sender_index, random_bytes=os.urandom,
                    wall_time_ns=time.time_ns(), path_id=session.path,
                )  # fmt: skip
                session.pending = state
                self._send(session, wire.encode_handshake_init(init), self.control)
                await self._wait(session, RETRY_S)
                if session.session_id is None:
                    continue
            self._send_probe(session)
            await self._wait(session, RETRY_S)
            if session.acked_seq == session.probe_seq:
                return True
        return False

    async def _windowed(self, jobs: Sequence[Impersonated], job: Any, window: int) -> int:
        """Run ``job(session)`` for each, at most ``window`` at a time; how many returned True."""
        limit = trio.CapacityLimiter(window)
        done = 0

        async def one(session: Impersonated) -> None:
            nonlocal done
            try:
                if await job(session):
                    done += 1
            finally:
                limit.release_on_behalf_of(session)

        async with trio.open_nursery() as nursery:
            for session in jobs:
                await limit.acquire_on_behalf_of(session)
                nursery.start_soon(one, session)
        return done

    async def handshakes(self, result: SizeResult) -> None:
        start = len(self.sessions)
        new: list[Impersonated] = []
        for number in range(start, result.sessions):
            session = Impersonated(
                number=number, static=StaticKeypair(self.keys[number]), sock=self._open_socket(),
                channel=SecureChannel(self.policy),
            )  # fmt: skip
            self._register(session)
            self.sessions.append(session)
            new.append(session)
        t0 = trio.current_time()
        with trio.move_on_after(self.plan.phase_timeout_s) as scope:
            await self._windowed(new, self._establish, self.plan.window)
        result.timed_out = scope.cancelled_caught
        result.handshake_s = trio.current_time() - t0
        # A session whose task gave up may still have been answered later: count what the gateway acked.
        result.handshakes_new = sum(1 for s in new if s.acked_seq >= 1)
        result.handshake_failed = len(new) - result.handshakes_new
        result.established = sum(1 for s in self.sessions if s.acked_seq >= 1 and not s.closed)
        result.handshakes_per_s = rate(result.handshakes_new, result.handshake_s)

    # -- phase 2: idle ------------------------------------------------------------------------
    async def read_proc(self, name: str) -> str:
        return await trio.Path(f"/proc/{self.plan.gateway_pid}/{name}").read_text()

    async def rss_kib(self) -> int | None:
        return parse_vm_rss_kib(await self.read_proc("status"))

    async def cores_over(self, seconds: float) -> float:
        before, t0 = parse_cpu_ticks(await self.read_proc("stat")), time.monotonic()
        await trio.sleep(seconds)
        after, t1 = parse_cpu_ticks(await self.read_proc("stat")), time.monotonic()
        return (after - before) / self.ticks_per_s / (t1 - t0)

    async def idle(self, result: SizeResult, rss0_kib: int | None) -> None:
        await trio.sleep(self.plan.settle_s)
        result.idle_cores = await self.cores_over(self.plan.idle_s)
        result.rss_kib = await self.rss_kib()
        result.kib_per_session = kib_per_session(rss0_kib, result.rss_kib, result.established)

    # -- phase 3: reattaches ------------------------------------------------------------------
    async def _reattach(self, session: Impersonated) -> bool:
        """Move ``session`` to a new socket with a sealed REATTACH; True once acknowledged."""
        old, session.sock = session.sock, self._open_socket()
        self.by_fd.pop(old.fileno(), None)
        self._register(session)
        try:
            for _ in range(ATTEMPTS):
                assert session.session_id is not None  # only established sessions move (not input validation)
                session.nonce += 1
                now = trio.current_time()
                msg = wire.Reattach(
                    session_id=session.session_id, path_id=session.path, nonce=session.nonce,
                    client_ts_ms=max(0, round((now - session.created_at) * 1000.0)), expected_version=session.version,
                )  # fmt: skip
                datagram = self._seal(session, wire.MessageType.REATTACH, wire.encode_reattach_plaintext(msg))
                if datagram is None:
                    return False
                session.reattach_answer = None
                self._send(session, datagram, self.control)
                await self._wait(session, RETRY_S)
                answer = session.reattach_answer
                if answer is not None and answer[0] == session.nonce:
                    if answer[1] is None:
                        return True
                    if answer[1] == ReasonCode.STALE_VERSION.value:  # the reject named the current version: ask again with it
                        self.stale_retries += 1
                        continue
                    self._rejected[answer[1]] = self._rejected.get(answer[1], 0) + 1
                    return False
            return False
        finally:
            with contextlib.suppress(OSError):
                self.epoll.unregister(old.fileno())
            old.close()

    async def reattaches(self, result: SizeResult, candidates: Sequence[Impersonated]) -> None:
        movers = [s for s in candidates if s.number != 0 and s.acked_seq >= 1 and not s.closed][: self.plan.reattaches]
        self._rejected = {}
        t0 = trio.current_time()
        with trio.move_on_after(self.plan.phase_timeout_s):
            result.reattach_acked = await self._windowed(movers, self._reattach, self.plan.window)
        result.reattach_s = trio.current_time() - t0
        result.reattach_sent = len(movers)
        result.reattach_rejected = dict(self._rejected)
        result.reattaches_per_s = rate(result.reattach_acked, result.reattach_s)

    # -- phase 4: the live stream -----------------------------------------------------------
    async def live(self, result: SizeResult) -> None:
        session = self.sessions[0]
        if session.tunnel_ipv4 is None or session.acked_seq < 1:
            return
        self.live_sent_at.clear()
        self.live_rtts = []
        interval = 1.0 / self.plan.live_hz
        count = int(self.plan.live_s * self.plan.live_hz)
        ident = secrets.randbits(16)
        before, t0 = parse_cpu_ticks(await self.read_proc("stat")), time.monotonic()
        due = trio.current_time()
        for seq in range(count):
            await trio.sleep_until(due)
            due += interval
            packet = icmp_echo_request(session.tunnel_ipv4, self.plan.gateway_tunnel, ident=ident, seq=seq)
            datagram = self._seal(session, wire.MessageType.DATA, packet)
            if datagram is None:
                break
            self.live_sent_at[seq & 0xFFFF] = trio.current_time()
            self._send(session, datagram, self.data)
            result.live_sent += 1
        after, t1 = parse_cpu_ticks(await self.read_proc("stat")), time.monotonic()
        await trio.sleep(LIVE_GRACE_S)
        result.live_received = len(self.live_rtts)
        result.live_loss_pct = loss_pct(result.live_sent, result.live_received)
        rtts_ms = [r * 1000.0 for r in self.live_rtts]
        result.live_rtt_p50_ms = percentile(rtts_ms, 0.5)
        result.live_rtt_p99_ms = percentile(rtts_ms, 0.99)
        result.live_cores = (after - before) / self.ticks_per_s / (t1 - t0)

    # -- the whole run ---------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        results: list[SizeResult] = []
        rss0 = await self.rss_kib()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.receive_forever)
            for size in self.plan.sizes:
                result = SizeResult(sessions=size)
                results.append(result)
                start = len(self.sessions)
                _progress(f"{size:,} sessions: handshaking {size - start:,} new ones, {self.plan.window} at a time")
                await self.handshakes(result)
                _progress(f"  {result.established:,} established, {_fmt(result.handshakes_per_s, ',.0f')} handshakes/s"
                          f"{' (timed out)' if result.timed_out else ''}")  # fmt: skip
                await self.idle(result, rss0)
                _progress(f"  idle: RSS {_fmt(_mib(result.rss_kib), ',.1f')} MiB, "
                          f"{_fmt(result.kib_per_session, '.1f')} KiB/session, {_fmt(result.idle_cores, '.3f')} cores")  # fmt: skip
                await self.live(result)
                _progress(f"  live {self.plan.live_hz:g} Hz: loss {_fmt(result.live_loss_pct, '.2f')} % "
                          f"({result.live_received}/{result.live_sent})")  # fmt: skip
                await self.reattaches(result, self.sessions[start:])
                _progress(f"  reattaches: {result.reattach_acked}/{result.reattach_sent} acked, "
                          f"{_fmt(result.reattaches_per_s, ',.0f')}/s")  # fmt: skip
                result.closed_by_gateway = sum(1 for s in self.sessions if s.closed)
                if result.timed_out:
                    break
            nursery.cancel_scope.cancel()
        return {
            "rss0_kib": rss0,
            "sizes": [r.to_json() for r in results],
            "send_failed": self.send_failed,
            "undecodable": self.undecodable,
            "reattach_stale_version_retries": self.stale_retries,
        }


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE to ``needed`` (root may raise the hard limit too); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = max(needed, hard) if hard != resource.RLIM_INFINITY else needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, target))
    except (ValueError, OSError) as exc:
        raise LoadError(f"cannot raise the open-file limit to {needed} (soft {soft}, hard {hard}): {exc}") from None
    return needed


def worker_main(plan_path: Path, report_path: Path) -> int:
    """The worker process: run the plan, write the report (JSON) to ``report_path``."""
    plan = WorkerPlan.from_json(json.loads(plan_path.read_text()))
    keys = [base64.b64decode(line) for line in Path(plan.keys_file).read_text().split()]
    if len(keys) < plan.sizes[-1]:
        raise LoadError(f"{plan.keys_file} holds {len(keys)} keys, the plan needs {plan.sizes[-1]}")
    raise_fd_limit(endpoints_needed(plan.sizes, plan.reattaches) + SPARE_FDS)
    worker = Worker(plan, keys)
    report = trio.run(worker.run)
    report_path.write_text(json.dumps(report) + "\n")
    return 0


# -----------------------------------------------------------------------------
# The orchestrator: lab, gateway, worker, report
# -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LoadSettings:
    sizes: tuple[int, ...] = DEFAULT_SIZES
    window: int = DEFAULT_WINDOW
    reattaches: int = DEFAULT_REATTACHES
    settle_s: float = DEFAULT_SETTLE_S
    idle_s: float = DEFAULT_IDLE_S
    live_s: float = DEFAULT_LIVE_S
    live_hz: float = DEFAULT_LIVE_HZ
    phase_timeout_s: float = DEFAULT_PHASE_TIMEOUT_S
    workdir: Path | None = None


def _write_keys(directory: Path, count: int) -> list[str]:
    """``count`` client keys (``clients.keys``, 0600) and the gateway's; returns the clients' public keys."""
    from jvpn_trio.keyfile import generate_private_key_text, write_private_key

    write_private_key(directory / "gateway.key", generate_private_key_text(os.urandom))
    keys = [generate_static(os.urandom) for _ in range(count)]
    fd = os.open(directory / "clients.keys", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(base64.b64encode(k.private).decode() + "\n" for k in keys)
    return [base64.b64encode(k.public).decode() for k in keys]


def _worker_budget_s(settings: LoadSettings) -> float:
    """The longest the worker may take: each size's phases at their bounds."""
    per_size = 2 * settings.phase_timeout_s + settings.settle_s + settings.idle_s + settings.live_s + LIVE_GRACE_S
    return per_size * len(settings.sizes) + WORKER_SLACK_S


async def _wait_exists(path: Path, process: Any, what: str, err: Path, timeout_s: float) -> None:
    with trio.move_on_after(timeout_s):
        while not await trio.Path(path).exists():
            if process.returncode is not None:
                raise LoadError(f"{what} exited {process.returncode}: {_tail(err)}")
            await trio.sleep(POLL_S)
        return
    raise LoadError(f"{what}: not ready within {timeout_s:g} s: {_tail(err)}")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no output)"
    return " / ".join(text[-lines:]) or "(no output)"


async def run_load(settings: LoadSettings) -> dict[str, Any]:
    """Build the lab, start the gateway and the worker, collect the report (a JSON-ready mapping)."""
    from jvpn_trio.drivers.control import ControlError, query_control
    from jvpn_trio.lab.netns import DEFAULT_PATHS, LabSpec, open_lab

    started_utc = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    temporary = settings.workdir is None
    workdir = settings.workdir or Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="jvpn-loadgen-")))
    peers = settings.sizes[-1]
    spec = LabSpec(prefix=PREFIX_FAMILY + secrets.token_hex(2), paths=(DEFAULT_PATHS[0],), ipv6=False)  # type: ignore[arg-type]  # attrs' tuple converter
    try:
        await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
        _progress(f"generating {peers:,} client keys")
        public_keys = await trio.to_thread.run_sync(_write_keys, workdir, peers)
        async with open_lab(spec) as lab:
            listen = f"{lab.gateway_address}:{PORT}"
            text = gateway_config_text(public_keys=public_keys, listen=listen, directory=workdir)
            await trio.Path(workdir / "gateway.toml").write_text(text)
            client_ip, _ = lab.path_addresses(DEFAULT_PATHS[0])
            hosts = source_hosts(client_ip, math.ceil(endpoints_needed(settings.sizes, settings.reattaches) / ports_per_host()))
            for host in hosts:
                await lab.run(lab.client_ns, "ip", "addr", "add", f"{host}/24", "dev", DEFAULT_PATHS[0].name)
            err = workdir / "gateway.err"
            t0 = time.monotonic()
            gateway = await lab.start_process(
                lab.gateway_ns,
                [sys.executable, "-m", "jvpn_trio", "serve", "--config", str(workdir / "gateway.toml"), "--quiet"],
                stderr_path=err,
            )  # fmt: skip
            _progress(f"starting the gateway with {peers:,} peers")
            await _wait_exists(workdir / "gateway.sock", gateway, "the gateway", err, STARTUP_TIMEOUT_S)
            startup_s = time.monotonic() - t0
            plan = WorkerPlan(
                gateway_public=_gateway_public(workdir), gateway_host=lab.gateway_address,
                gateway_tunnel=str(ipaddress.IPv4Interface(TUNNEL_ADDRESS).ip), keys_file=str(workdir / "clients.keys"),
                hosts=tuple(hosts), sizes=settings.sizes, window=settings.window, reattaches=settings.reattaches,
                settle_s=settings.settle_s, idle_s=settings.idle_s, live_s=settings.live_s, live_hz=settings.live_hz,
                phase_timeout_s=settings.phase_timeout_s, gateway_pid=gateway.pid,
            )  # fmt: skip
            await trio.Path(workdir / "plan.json").write_text(json.dumps(plan.to_json()))
            worker_err = workdir / "worker.err"
            worker = await lab.start_process(
                lab.client_ns,
                [sys.executable, "-m", "jvpn_trio.lab.loadgen", "worker", str(workdir / "plan.json"),
                 str(workdir / "worker.json")],
                stderr_path=worker_err,
            )  # fmt: skip
            with trio.move_on_after(_worker_budget_s(settings)):
                while worker.returncode is None:
                    if gateway.returncode is not None:
                        raise LoadError(f"the gateway exited {gateway.returncode} under load: {_tail(err)}")
                    await trio.sleep(POLL_S * 10)
            if worker.returncode is None:
                raise LoadError(f"the worker did not finish within {_worker_budget_s(settings):g} s: {_tail(worker_err)}")
            if worker.returncode != 0:
                raise LoadError(f"the worker exited {worker.returncode}: {_tail(worker_err)}")
            measured = json.loads(await trio.Path(workdir / "worker.json").read_text())
            count: int | None = None
            try:
                status = await query_control(workdir / "gateway.sock", {"cmd": "status"}, timeout=STATUS_TIMEOUT_S)
                count = int(status["session_count"])
            except (ControlError, KeyError, ValueError, TypeError) as exc:
                _progress(f"gateway status unavailable: {exc}")
            gateway_rss_peak = await _peak_rss(gateway.pid)
            await gateway.terminate()
    finally:
        if temporary:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: shutil.rmtree(workdir, ignore_errors=True))
    return {
        "started_utc": started_utc,
        "version": __version__,
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "settings": {**attrs.asdict(settings), "workdir": str(settings.workdir) if settings.workdir else None},
        "policy": dict(LOAD_POLICY),
        "peers": peers,
        "gateway_startup_s": round(startup_s, 3),
        "gateway_session_count": count,
        "gateway_peak_rss_kib": gateway_rss_peak,
        **measured,
    }


def _gateway_public(directory: Path) -> str:
    from jvpn_trio.keyfile import public_from_private_text

    return public_from_private_text((directory / "gateway.key").read_text())


async def _peak_rss(pid: int) -> int | None:
    try:
        text = await trio.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:") and line.split()[1].isdigit():
            return int(line.split()[1])
    return None


def short_of_target(report: Mapping[str, Any]) -> bool:
    """True if a size ended with fewer sessions than asked for (or timed out)."""
    return any(s["timed_out"] or s["established"] < s["sessions"] for s in report["sizes"])


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def _bounded(kind: type, lo: float, hi: float) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {lo:g}..{hi:g}, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jvpn-trio loadgen``."""
    parser.add_argument("--sessions", type=parse_sizes, default=DEFAULT_SIZES, metavar="LIST",
                        help="comma list of session counts, measured in ascending order, each adding to the last "
                             "(default 1000,10000,100000; 10k is 10000)")  # fmt: skip
    parser.add_argument("--window", type=_bounded(int, 1, MAX_WINDOW), default=DEFAULT_WINDOW, metavar="N",
                        help=f"handshakes / REATTACHes in flight at once (default {DEFAULT_WINDOW})")  # fmt: skip
    parser.add_argument("--reattaches", type=_bounded(int, 0, MAX_SESSIONS), default=DEFAULT_REATTACHES, metavar="N",
                        help=f"sessions moved to a new port per size (default {DEFAULT_REATTACHES})")  # fmt: skip
    parser.add_argument("--settle", type=_bounded(float, 0, MAX_SECONDS), default=DEFAULT_SETTLE_S, metavar="S",
                        help=f"quiet time before the idle measurement (default {DEFAULT_SETTLE_S:g})")  # fmt: skip
    parser.add_argument("--idle-seconds", type=_bounded(float, 0.1, MAX_SECONDS), default=DEFAULT_IDLE_S, metavar="S",
                        help=f"how long idle CPU is measured (default {DEFAULT_IDLE_S:g})")  # fmt: skip
    parser.add_argument("--live-seconds", type=_bounded(float, 0.1, MAX_SECONDS), default=DEFAULT_LIVE_S, metavar="S",
                        help=f"length of the live stream (default {DEFAULT_LIVE_S:g})")  # fmt: skip
    parser.add_argument("--live-hz", type=_bounded(float, 1, 10_000), default=DEFAULT_LIVE_HZ, metavar="HZ",
                        help=f"packets per second of the live stream (default {DEFAULT_LIVE_HZ:g})")  # fmt: skip
    parser.add_argument("--phase-timeout", type=_bounded(float, 1, MAX_SECONDS), default=DEFAULT_PHASE_TIMEOUT_S,
                        metavar="S", help=f"bound on each size's handshakes and reattaches (default {DEFAULT_PHASE_TIMEOUT_S:g})")  # fmt: skip
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="also write the JSON document to FILE, or to stdout (the table then goes to stderr)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="keep keys, configs, logs and the gateway's event log here (default: a temporary directory)")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> LoadSettings:
    return LoadSettings(
        sizes=tuple(args.sessions), window=args.window, reattaches=args.reattaches, settle_s=args.settle,
        idle_s=args.idle_seconds, live_s=args.live_seconds, live_hz=args.live_hz, phase_timeout_s=args.phase_timeout,
        workdir=args.workdir,
    )  # fmt: skip


def _preflight() -> str | None:
    if os.geteuid() != 0:
        return "loadgen needs root (network namespaces, a TUN device)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install -y {package})"
    return None


def main(args: argparse.Namespace) -> int:
    """Run the load from parsed options; print the table (and the JSON); return the exit code."""
    from jvpn_trio.lab.bench import EXIT_INTERRUPTED, only_interrupts
    from jvpn_trio.lab.netns import LabError

    problem = _preflight()
    if problem is not None:
        print(f"jvpn-trio loadgen: {problem}", file=sys.stderr)
        return 2
    try:
        report = trio.run(run_load, settings_from_args(args))
    except (LoadError, LabError, OSError) as exc:
        print(f"jvpn-trio loadgen: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, LoadError) else 2
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        if not only_interrupts(exc):
            raise
        print("jvpn-trio loadgen: interrupted (lab removed)", file=sys.stderr)
        return EXIT_INTERRUPTED
    document = json.dumps(report, indent=2) + "\n"
    to_stdout = args.json == "-"
    print(render_table(report), file=sys.stderr if to_stdout else sys.stdout, end="")
    if to_stdout:
        sys.stdout.write(document)
    elif args.json is not None:
        Path(args.json).write_text(document)
    return 1 if short_of_target(report) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jvpn-trio loadgen", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="role")
    run = sub.add_parser("run", help="the benchmark (what `jvpn-trio loadgen` does)")
    add_arguments(run)
    worker = sub.add_parser("worker", help="internal: the client side, started by the benchmark in the lab")
    worker.add_argument("plan", type=Path)
    worker.add_argument("report", type=Path)
    return parser


def _module_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "worker":
        try:
            return worker_main(args.plan, args.report)
        except (LoadError, OSError) as exc:
            print(f"loadgen worker: {exc}", file=sys.stderr)
            return 1
    if args.role == "run":
        return main(args)
    build_parser().print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_module_main())
