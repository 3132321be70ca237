"""``jvpn-trio loadgen``: many clients against one real gateway process, measured.

    jvpn-trio loadgen [--sessions 1000,10000,100000] [--window N] [--reattaches N]
                      [--store memory,etcd,etcd3] [--store-ops N]
                      [--sockets-per-worker N] [--json [FILE]]

Theory of operation
-------------------
The gateway is the real ``jvpn-trio serve`` in the gateway namespace of a fresh one-path lab
(:func:`jvpn_trio.lab.netns.open_lab`), with its event sink on and one ``[[peer]]`` per
simulated client (no fixed addresses: the pool of a /10 tunnel network hands them out).  The
clients are *worker* processes in the client namespace (``python -m jvpn_trio.lab.loadgen
worker PLAN INDEX``): every simulated session has its own static key and its own UDP socket,
bound to its own source address and port (extra addresses on the client's eth0 give more than
one address's worth of ports), so the gateway sees as many endpoints as sessions.  A worker
speaks the real protocol through the core's own code: ``InitiatorHandshake`` for the
handshake, ``SecureChannel`` for sealed PROBE, REATTACH and DATA; nothing is reimplemented.
A worker's sockets sit in one epoll set that a single Trio task waits on, so 16k sockets cost
one task, not 16k.

One socket per session meets the open-file limit, which root may not be able to raise (a
container's hard limit), so the sessions are spread over as many workers as it takes
(:func:`partition`): at most ``--sockets-per-worker`` sockets each, by default the hard limit
less :data:`SPARE_FDS`, at most :data:`MAX_ENDPOINTS_PER_WORKER`.  Every size's new sessions
are split evenly over all workers, and each worker binds a block of source endpoints of its
own.  The orchestrator conducts: it sends each phase to every worker at once over a Unix
socket (JSON lines; a path, so it reaches into the namespace), with its share of
``--window``, waits for all the answers (bounded) and adds them up; it measures the gateway's
memory and idle CPU itself, between phases, while every worker is quiet.  A worker or the
gateway that exits early fails the run at once, and every worker is ended on any error.

For each size in ``--sessions`` (ascending; each adds sessions to the ones already there):

1. *Handshakes*: the new sessions handshake, at most ``--window`` at a time over all workers
   (each worker with work gets an even share of it, at least one); a session counts
   as established once its first PROBE is acknowledged (the gateway has then confirmed the
   keys).  Handshakes/s = established / wall time of the phase, from the orchestrator's
   command to the last worker's answer.
2. *Idle*: after ``--settle`` seconds, the gateway's VmRSS (``/proc/<pid>/status``) and its CPU
   over ``--idle-seconds``.  Memory per session = (RSS(N) - RSS(0)) / N, RSS(0) being read
   before the first handshake.  Idle sessions send nothing: the policy (:data:`LOAD_POLICY`)
   gives them an hour's transport-loss TTL and hour-long keys, so no keepalive traffic is
   needed to hold them (with the default 30 s TTL each would need a probe every few seconds).
3. *Live stream*: the first session (always worker 0's) sends ``--live-hz`` DATA packets (ICMP
   echo requests to the gateway's tunnel address, answered by the gateway namespace's kernel
   through the TUN) for ``--live-seconds`` while the rest idle; loss % = unanswered echoes / sent.
4. *Reattaches*: ``--reattaches`` of the sessions just added (split over the workers) move to
   a new source port with a sealed REATTACH (``--window`` at a time over all workers);
   reattaches/s = acknowledged / wall time.

Latency.  Each worker times every handshake (first HANDSHAKE_INIT sent -> its first PROBE
acknowledged, retries included: what a client waits for) and every REATTACH (first sent -> ACK,
a STALE_VERSION retry included) from the send to the epoll wake-up that read the answer, and
hands the durations (whole microseconds) to the orchestrator, which reports p50 / p99 / max
per size over all workers (nearest rank, :func:`latency_summary`).  Failed attempts have none.

The ownership store (``--store``).  ``memory`` is the gateway's default.  ``etcd`` / ``etcd3``
start a one- / three-member etcd (:mod:`jvpn_trio.lab.etcd`) inside the gateway namespace, on
its loopback, and give ``serve`` a ``[cluster]`` table with ``store = "etcd"`` and those
endpoints (lease timings: the defaults).  Every new session is then one etcd transaction (the
claim, with the peer's ticket), so handshakes/s is the rate of ownership changes the cluster
sustains; every REATTACH is one linearizable read.  A comma list runs the whole benchmark once
per store, each in a lab of its own, and reports them side by side.  With etcd the run ends,
once the gateway has stopped, with the store alone (:func:`measure_store_ops`, ``--store-ops N``):
N ``claim`` (create-if-absent, with a ticket), ``read``, ``release``, ``read_ticket`` and
``take_over`` calls through :class:`~jvpn_trio.drivers.store_etcd.EtcdOwnershipStore`, first one
at a time, then :data:`STORE_OPS_CONCURRENCY` at a time; ops/s and p50 / p99 / max each.

Every phase is bounded (``--phase-timeout``); a size whose handshakes do not finish in time is
reported as far as it got, and no larger size is tried.  Output: a Markdown table and, with
``--json``, one JSON document (one store: the run's report; several: ``{"runs": [...]}``, one
report each); progress on stderr.  Exit codes: 0 measured, 1 a size fell
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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from jvpn_trio import __version__
from jvpn_trio.core import wire
from jvpn_trio.core.channel import ChannelDrop, SecureChannel
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.keyring import KeyExhausted
from jvpn_trio.core.noise import (
    HandshakeError,
    InitiatorHandshake,
    StaticKeypair,
    generate_static,
)
from jvpn_trio.core.policy import DEFAULT_POLICY, HOUR_MS, Policy
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.lab.bench import cores, parse_cpu_ticks, parse_status_kib

if TYPE_CHECKING:
    from jvpn_trio.drivers.store_etcd import EtcdOwnershipStore
    from jvpn_trio.lab.etcd import EtcdCluster

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
#: File descriptors a worker needs beyond one per socket (epoll, Trio, stdio, files).
SPARE_FDS = 256
#: Sockets one worker process holds at most (below the hard RLIMIT_NOFILE, which root may not
#: be able to raise); more sessions than this are spread over several workers.
MAX_ENDPOINTS_PER_WORKER = 16_384
#: Longest line (one JSON message) on the orchestrator's link to a worker.
MAX_LINK_LINE_BYTES = 1 << 20

#: The gateway's (and the clients') policy: the laptop default but for hour-long idle life.
#: Idle sessions then need no keepalives during the run (the TTL) and no rekey (the keys).
LOAD_POLICY: Mapping[str, int] = {
    "transport_loss_ttl_ms": HOUR_MS,
    "rekey_after_s": 3 * 3_600,
    "reject_after_s": 4 * 3_600,
}
#: The gateway's handshake limits (``[handshake]``, docs/gateway.md) lifted: this tool measures how
#: many handshakes a second the gateway can do, from a few source addresses, which the flood
#: defences would otherwise cap (20 a second per source, 200 of DH work, cookie replies past 100).
LOAD_HANDSHAKE_LIMITS: Mapping[str, float] = {
    "under_load_per_s": 1_000_000.0,
    "under_load_queue": 100_000,
    "queue_capacity": 100_000,
    "per_source_per_s": 1_000_000.0,
    "per_source_burst": 1_000_000,
    "handshakes_per_s": 1_000_000.0,
    "handshake_burst": 1_000_000,
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
#: The gateway's status lists every session (a few hundred bytes each): room for a million.
STATUS_REPLY_BYTES = 1024 * 1024 * 1024
POLL_S = 0.05
#: The worker gets this long beyond the sum of its phases' bounds.
WORKER_SLACK_S = 120.0

KIB = 1024
MS_PER_S = 1_000.0
US_PER_S = 1_000_000.0

#: ``--store`` choices: the gateway's memory store, or etcd with this many members.
ETCD_MEMBERS: Mapping[str, int] = {"etcd": 1, "etcd3": 3}
STORES = ("memory", *ETCD_MEMBERS)
DEFAULT_STORES = ("memory",)
#: Calls per operation in the store-level figure (``--store-ops``; 0 skips it).
DEFAULT_STORE_OPS = 2_000
MAX_STORE_OPS = 1_000_000
#: Calls in flight at once in the store-level figure's concurrent pass.
STORE_OPS_CONCURRENCY = 16
#: The store-level figure's keys, apart from the gateway's, and the owner it writes.
STORE_OPS_PREFIX = "/jvpn-trio/loadgen-ops/"
STORE_OPS_NODE = "loadgen-ops"
#: The address a store-level ticket names (the tickets are never used by a gateway).
STORE_OPS_TICKET_ADDRESS = ipaddress.IPv4Address("10.64.0.2")
#: The store-level figure's operations, in the order each pass runs them.
STORE_OPS = ("claim", "read", "release", "read_ticket", "take_over")
#: etcd's own raft timings (the lab's tests shorten them for fast failover): measure etcd as deployed.
ETCD_HEARTBEAT_MS = 100
ETCD_ELECTION_MS = 1_000


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


def parse_stores(text: str) -> tuple[str, ...]:
    """``"memory,etcd"`` -> the stores in the order given, each once; ArgumentTypeError on anything else."""
    stores: list[str] = []
    for word in (w.strip().lower() for w in text.split(",")):
        if not word:
            continue
        if word not in STORES:
            raise argparse.ArgumentTypeError(f"a store must be one of {', '.join(STORES)}, got {word!r}")
        if word not in stores:
            stores.append(word)
    if not stores:
        raise argparse.ArgumentTypeError(f"store must name at least one of {', '.join(STORES)}, got {text!r}")
    return tuple(stores)


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


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares that differ by at most one, the larger ones first."""
    if parts < 1 or total < 0:
        raise ValueError(f"cannot split {total} in {parts} parts")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@attrs.frozen(kw_only=True)
class Share:
    """One worker's part of the run: the sessions it adds per size, its movers, its source endpoints.

    Every size's new sessions are split evenly, so every worker takes part in every phase; the
    endpoints are a block of their own in the global order of :func:`source_endpoint`, so no two
    workers ever bind the same address and port.
    """

    index: int
    slices: tuple[tuple[int, int], ...]  # per size: the session numbers [start, stop) this worker adds
    reattaches: tuple[int, ...]  # per size: how many of that slice move to a new port
    first_endpoint: int
    endpoints: int

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Share:
        return cls(
            index=int(data["index"]), slices=tuple((int(a), int(b)) for a, b in data["slices"]),
            reattaches=tuple(int(n) for n in data["reattaches"]), first_endpoint=int(data["first_endpoint"]),
            endpoints=int(data["endpoints"]),
        )  # fmt: skip


def _shares(sizes: Sequence[int], reattaches: int, workers: int) -> list[Share]:
    slices: list[list[tuple[int, int]]] = [[] for _ in range(workers)]
    movers: list[list[int]] = [[] for _ in range(workers)]
    previous = 0
    for size in sizes:
        start = previous
        wanted = split_evenly(reattaches, workers)
        for w, count in enumerate(split_evenly(size - previous, workers)):
            slices[w].append((start, start + count))
            movable = count - (1 if start == 0 < count else 0)  # session 0 (the live one) stays
            movers[w].append(min(wanted[w], movable))
            start += count
        previous = size
    shares, first = [], 0
    for w in range(workers):
        endpoints = sum(b - a for a, b in slices[w]) + sum(movers[w])
        shares.append(Share(index=w, slices=tuple(slices[w]), reattaches=tuple(movers[w]), first_endpoint=first,
                            endpoints=endpoints))  # fmt: skip
        first += endpoints
    return shares


def partition(sizes: Sequence[int], reattaches: int, capacity: int) -> tuple[Share, ...]:
    """The fewest workers none of which needs more than ``capacity`` sockets; ValueError if capacity < 1."""
    if capacity < 1:
        raise ValueError(f"a worker must be allowed at least one socket, not {capacity}")
    workers = max(1, math.ceil(endpoints_needed(sizes, reattaches) / capacity))
    while True:  # rounding can put a few sockets too many on the first workers: then one more worker
        shares = _shares(sizes, reattaches, workers)
        if max(s.endpoints for s in shares) <= capacity:
            return tuple(shares)
        workers += 1


def window_shares(window: int, work: Sequence[int]) -> list[int]:
    """``window`` split evenly over the workers with ``work`` to do (at least 1 each); 0 for the others."""
    busy = [w for w, n in enumerate(work) if n > 0]
    shares = [0] * len(work)
    if busy:
        for w, share in zip(busy, split_evenly(window, len(busy))):
            shares[w] = max(1, share)
    return shares


def worker_capacity(hard_limit: int, *, spare: int = SPARE_FDS, most: int = MAX_ENDPOINTS_PER_WORKER) -> int:
    """Sockets one worker may open: the hard RLIMIT_NOFILE less ``spare``, at most ``most``; LoadError if none."""
    room = most if hard_limit == resource.RLIM_INFINITY else min(most, hard_limit - spare)
    if room < 1:
        raise LoadError(f"the hard open-file limit ({hard_limit}) leaves no room for a worker's sockets")
    return room


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
    return parse_status_kib(status_text, "VmRSS")


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


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """``p50_ms`` / ``p99_ms`` / ``max_ms`` of durations in seconds (nearest rank); None each for none."""
    ms = [value * MS_PER_S for value in seconds]
    return {"p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99), "max_ms": max(ms) if ms else None}


def to_us(seconds: Sequence[float]) -> list[int]:
    """Durations as whole microseconds: what a worker sends (compact JSON, 16k of them per answer)."""
    return [round(value * US_PER_S) for value in seconds]


def from_us(micros: Sequence[int]) -> list[float]:
    return [value / US_PER_S for value in micros]


def policy_lines(policy: Mapping[str, Any]) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in policy.items())


def cluster_text(etcd_endpoints: Sequence[str]) -> str:
    """The ``[cluster]`` table for etcd at ``etcd_endpoints`` (lease timings: the defaults); none for the memory store."""
    if not etcd_endpoints:
        return ""
    return f'\n[cluster]\nstore = "etcd"\netcd_endpoints = {json.dumps(list(etcd_endpoints))}\n'


def gateway_config_text(*, public_keys: Sequence[str], listen: str, directory: Path,
                        etcd_endpoints: Sequence[str] = ()) -> str:  # fmt: skip
    """``gateway.toml`` with one ``[[peer]]`` per key (no fixed address: the pool hands them out).

    ``etcd_endpoints``: ownership in etcd there (``[cluster]``); none: the memory store.
    """
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

[handshake]
{policy_lines(LOAD_HANDSHAKE_LIMITS)}
{cluster_text(etcd_endpoints)}"""
    peers = "".join(f'\n[[peer]]\nname = "load{i}"\npublic_key = "{key}"\n' for i, key in enumerate(public_keys))
    return head + peers


@attrs.frozen(kw_only=True)
class WorkerPlan:
    """What every worker is told (a JSON file): where the gateway is, each worker's share, the bounds."""

    gateway_public: str  # base64
    gateway_host: str
    gateway_tunnel: str  # the gateway's tunnel address: the live stream's echo target
    keys_file: str  # one base64 private key per line, one per session, in order
    hosts: tuple[str, ...]  # source addresses
    sizes: tuple[int, ...]
    shares: tuple[Share, ...]  # one per worker; a worker is started with its index
    control_socket: str  # the orchestrator's Unix socket (works across network namespaces)
    live_s: float
    live_hz: float
    phase_timeout_s: float
    budget_s: float  # the longest a worker may live
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
        values["shares"] = tuple(Share.from_json(s) for s in values["shares"])
        return cls(**values)


@attrs.define(kw_only=True)
class SizeResult:
    """One size's measurements (the workers' answers, added up by the orchestrator)."""

    sessions: int
    established: int = 0
    handshakes_new: int = 0
    handshake_failed: int = 0
    handshake_s: float = 0.0
    handshakes_per_s: float | None = None
    #: Per established session: first HANDSHAKE_INIT sent -> first PROBE acknowledged.
    handshake_p50_ms: float | None = None
    handshake_p99_ms: float | None = None
    handshake_max_ms: float | None = None
    timed_out: bool = False
    rss_kib: int | None = None
    kib_per_session: float | None = None
    idle_cores: float | None = None
    reattach_sent: int = 0
    reattach_acked: int = 0
    reattach_rejected: dict[str, int] = attrs.Factory(dict)
    reattach_s: float = 0.0
    reattaches_per_s: float | None = None
    #: Per acknowledged REATTACH: first sent -> ACK.
    reattach_p50_ms: float | None = None
    reattach_p99_ms: float | None = None
    reattach_max_ms: float | None = None
    live_sent: int = 0
    live_received: int = 0
    live_loss_pct: float | None = None
    live_rtt_p50_ms: float | None = None
    live_rtt_p99_ms: float | None = None
    live_cores: float | None = None
    closed_by_gateway: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def set_latency(self, phase: str, seconds: Sequence[float]) -> None:
        """Fill ``<phase>_p50_ms`` / ``_p99_ms`` / ``_max_ms`` (phase: handshake or reattach)."""
        for name, value in latency_summary(seconds).items():
            setattr(self, f"{phase}_{name}", value)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def store_label(store: str) -> str:
    """How a report names its store: ``memory``, ``etcd (1 member)``, ``etcd3 (3 members)``."""
    members = ETCD_MEMBERS.get(store)
    if members is None:
        return store
    return f"{store} ({members} member{'s' if members > 1 else ''})"


def _p50_p99_max(figures: Mapping[str, Any], phase: str) -> str:
    return " / ".join(_fmt(figures.get(f"{phase}_{name}"), ".1f") for name in ("p50_ms", "p99_ms", "max_ms"))


#: Each new session is one ownership write (with etcd: one transaction), so the handshake rate is both.
HANDSHAKES_HEADER = "handshakes/s = ownership changes/s"


def render_table(report: Mapping[str, Any]) -> str:
    """The Markdown table of a report document (:func:`run_load`'s JSON), and its store-level table if any."""
    store = report.get("store", "memory")
    lines = [
        (f"jvpn-trio loadgen, {report['started_utc']} UTC, {report['host']['cpus']} CPUs, "
         f"store {store_label(store)}, "
         f"gateway start with {report['peers']} peers: {_fmt(report.get('gateway_startup_s'), '.1f')} s, "
         f"RSS(0) {_fmt(_mib(report.get('rss0_kib')), '.1f')} MiB, {report.get('workers', 1)} client worker(s)"),
        "",
        (f"| sessions | established | {HANDSHAKES_HEADER} | handshake p50 / p99 / max ms | gateway RSS MiB "
         "| KiB/session | idle CPU (cores) | reattaches/s (acked/sent) | reattach p50 / p99 / max ms "
         "| live 100 Hz loss % | live RTT p50 / p99 ms | CPU during live |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in report["sizes"]:
        short = " (timed out)" if size["timed_out"] else ""
        lines.append(
            f"| {size['sessions']:,} | {size['established']:,}{short} | {_fmt(size['handshakes_per_s'], ',.0f')} "
            f"| {_p50_p99_max(size, 'handshake')} "
            f"| {_fmt(_mib(size['rss_kib']), ',.1f')} | {_fmt(size['kib_per_session'], '.1f')} "
            f"| {_fmt(size['idle_cores'], '.3f')} "
            f"| {_fmt(size['reattaches_per_s'], ',.0f')} ({size['reattach_acked']}/{size['reattach_sent']}) "
            f"| {_p50_p99_max(size, 'reattach')} "
            f"| {_fmt(size['live_loss_pct'], '.2f')} ({size['live_received']}/{size['live_sent']}) "
            f"| {_fmt(size['live_rtt_p50_ms'], '.2f')} / {_fmt(size['live_rtt_p99_ms'], '.2f')} "
            f"| {_fmt(size['live_cores'], '.2f')} |"
        )
    lines.append("")
    lines.append(f"gateway status: {report.get('gateway_session_count')} sessions; policy: {report['policy']}")
    store_ops = report.get("store_ops")
    if store_ops:
        lines += ["", render_store_ops(store_ops, label=store_label(store)).rstrip("\n")]
    return "\n".join(lines) + "\n"


def render_comparison(reports: Sequence[Mapping[str, Any]]) -> str:
    """The stores side by side: per store and size, the rates and latencies (the issue's figures)."""
    lines = [
        (f"| store | sessions | {HANDSHAKES_HEADER} | handshake p50 / p99 / max ms | reattaches/s (acked/sent) "
         "| reattach p50 / p99 / max ms |"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for report in reports:
        for size in report["sizes"]:
            short = " (timed out)" if size["timed_out"] else ""
            lines.append(
                f"| {store_label(report.get('store', 'memory'))} | {size['established']:,}{short} "
                f"| {_fmt(size['handshakes_per_s'], ',.0f')} | {_p50_p99_max(size, 'handshake')} "
                f"| {_fmt(size['reattaches_per_s'], ',.0f')} ({size['reattach_acked']}/{size['reattach_sent']}) "
                f"| {_p50_p99_max(size, 'reattach')} |"
            )
    return "\n".join(lines) + "\n"


def render_store_ops(store_ops: Mapping[str, Any], *, label: str = "etcd") -> str:
    """The store-level table: per operation, ops/s and p50 / p99 / max, one at a time and concurrently."""
    concurrency = store_ops["concurrency"]
    lines = [
        f"store alone ({label}, EtcdOwnershipStore, {store_ops['count']:,} calls per operation and pass):",
        "",
        (f"| operation | one at a time: ops/s | p50 / p99 / max ms | {concurrency} at a time: ops/s "
         "| p50 / p99 / max ms | failed |"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    passes = store_ops["passes"]
    for operation in STORE_OPS:
        one, many = passes["sequential"].get(operation, {}), passes["concurrent"].get(operation, {})
        failed = one.get("failed", 0) + many.get("failed", 0)
        lines.append(
            f"| {operation} | {_fmt(one.get('ops_per_s'), ',.0f')} | {_p50_p99_max(one, 'latency')} "
            f"| {_fmt(many.get('ops_per_s'), ',.0f')} | {_p50_p99_max(many, 'latency')} | {failed} |"
        )
    return "\n".join(lines) + "\n"


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / KIB


# -----------------------------------------------------------------------------
# The worker: many impersonated clients in one process
# -----------------------------------------------------------------------------


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Link:
    """JSON lines over a stream: the orchestrator's commands and a worker's answers."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, message: Mapping[str, Any]) -> None:
        try:
            await self.stream.send_all(json.dumps(message).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise LoadError(f"link to the other side broken: {exc}") from None

    async def receive(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINK_LINE_BYTES:
                raise LoadError(f"a message on the link is longer than {MAX_LINK_LINE_BYTES} bytes")
            try:
                chunk = await self.stream.receive_some(RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LoadError(f"link to the other side broken: {exc}") from None
            if not chunk:
                raise LoadError("the other side closed the link")
            self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        try:
            message = json.loads(line)
        except ValueError:
            raise LoadError("a message on the link is not JSON") from None
        if not isinstance(message, dict):
            raise LoadError("a message on the link is not a JSON object")
        return message


async def read_proc(pid: int, name: str) -> str:
    return await trio.Path(f"/proc/{pid}/{name}").read_text()


async def rss_kib(pid: int) -> int | None:
    return parse_vm_rss_kib(await read_proc(pid, "status"))


TICKS_PER_S = float(os.sysconf("SC_CLK_TCK"))


async def cores_over(pid: int, seconds: float) -> float:
    """CPU of ``pid`` over the next ``seconds``, in cores."""
    before, t0 = parse_cpu_ticks(await read_proc(pid, "stat")), time.monotonic()
    await trio.sleep(seconds)
    after, t1 = parse_cpu_ticks(await read_proc(pid, "stat")), time.monotonic()
    return cores(before, after, t1 - t0, ticks_per_s=TICKS_PER_S)


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
    answered_at: float = 0.0  # when the last PROBE ACK or REATTACH answer was read: the latencies' end
    closed: bool = False
    wake: trio.Event = attrs.Factory(trio.Event)


class Worker:
    """One worker's share of the clients: sockets in one epoll set, sessions, and the phases it is told to run."""

    def __init__(self, plan: WorkerPlan, share: Share, keys: Sequence[bytes]) -> None:
        self.plan = plan
        self.share = share
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
        self.latencies: list[float] = []  # this phase's, in seconds: one per established session / acked REATTACH

    # -- sockets ------------------------------------------------------------------------
    def _open_socket(self) -> socket.socket:
        if self.next_endpoint >= self.share.endpoints:
            raise LoadError(f"worker {self.share.index} has used all of its {self.share.endpoints} source endpoints")
        host, port = source_endpoint(self.share.first_endpoint + self.next_endpoint, self.plan.hosts)
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
        if opened.msg_type in wire.DATA_TYPES:
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
                session.answered_at = now
            case wire.ReattachAck(nonce=nonce, new_version=version):
                session.version = version
                session.reattach_answer = (nonce, None)
                session.answered_at = now
            case wire.ReattachReject(nonce=nonce, reason=reason, current_version=version):
                session.version = version
                session.reattach_answer = (nonce, reason.value)
            case wire.PathChallenge(nonce=nonce, challenge=challenge, path_id=path):
                self._answer_challenge(session, nonce, challenge, path)
                return  # not the answer yet: the ACK follows the echo
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
        """Handshake, then one acknowledged PROBE (the gateway confirms the keys); retried ATTEMPTS times.

        Success adds the time from the first HANDSHAKE_INIT to the ACK's arrival to :attr:`latencies`.
        """
        started = trio.current_time()
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
                self.latencies.append(session.answered_at - started)
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

    async def handshakes(self, index: int, window: int) -> dict[str, Any]:
        """Add this worker's slice of size ``index``; what the gateway acknowledged, and how long it took."""
        start, stop = self.share.slices[index]
        new: list[Impersonated] = []
        for number in range(start, stop):
            session = Impersonated(
                number=number, static=StaticKeypair(self.keys[number]), sock=self._open_socket(),
                channel=SecureChannel(self.policy),
            )  # fmt: skip
            self._register(session)
            self.sessions.append(session)
            new.append(session)
        self.latencies = []
        t0 = trio.current_time()
        with trio.move_on_after(self.plan.phase_timeout_s) as scope:
            if new:
                await self._windowed(new, self._establish, window)
        # A session whose task gave up may still have been answered later: count what the gateway acked.
        acked = sum(1 for s in new if s.acked_seq >= 1)
        return {
            "new": acked,
            "failed": len(new) - acked,
            "established": sum(1 for s in self.sessions if s.acked_seq >= 1 and not s.closed),
            "timed_out": scope.cancelled_caught,
            "seconds": trio.current_time() - t0,
            "latencies_us": to_us(self.latencies),
        }

    # -- phase 3: reattaches ------------------------------------------------------------------
    def _answer_challenge(self, session: Impersonated, nonce: int, challenge: int, path: PathId) -> None:
        """Echo the gateway's PATH_CHALLENGE for this session's REATTACH from its new socket, as a real
        client does (return routability, docs/spec.md); any other challenge is stray."""
        if session.session_id is None or nonce != session.nonce or path != session.path:
            self.undecodable += 1
            return
        echo = wire.PathResponse(session_id=session.session_id, nonce=nonce, challenge=challenge, path_id=path)
        datagram = self._seal(session, wire.MessageType.PATH_RESPONSE, wire.encode_path_check_plaintext(echo))
        if datagram is not None:
            self._send(session, datagram, self.control)

    async def _reattach(self, session: Impersonated) -> bool:
        """Move ``session`` to a new socket with a sealed REATTACH; True once acknowledged.

        Success adds the time from the first REATTACH to the ACK's arrival to :attr:`latencies`.
        """
        started = trio.current_time()
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
                        self.latencies.append(session.answered_at - started)
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

    async def reattaches(self, index: int, window: int) -> dict[str, Any]:
        """Move this worker's movers of size ``index`` to new ports; how many the gateway acknowledged."""
        start, stop = self.share.slices[index]
        movers = [s for s in self.sessions if start <= s.number < stop and s.number != 0 and s.acked_seq >= 1
                  and not s.closed][: self.share.reattaches[index]]  # fmt: skip
        self._rejected = {}
        self.latencies = []
        acked = 0
        t0 = trio.current_time()
        with trio.move_on_after(self.plan.phase_timeout_s):
            if movers:
                acked = await self._windowed(movers, self._reattach, window)
        return {
            "sent": len(movers),
            "acked": acked,
            "rejected": dict(self._rejected),
            "seconds": trio.current_time() - t0,
            "closed": sum(1 for s in self.sessions if s.closed),
            "latencies_us": to_us(self.latencies),
        }

    # -- phase 4: the live stream -----------------------------------------------------------
    async def live(self) -> dict[str, Any]:
        """Session 0's stream (only the worker holding it is asked); the SizeResult fields it fills."""
        result = SizeResult(sessions=0)
        session = self.sessions[0] if self.sessions else None
        if session is None or session.number != 0 or session.tunnel_ipv4 is None or session.acked_seq < 1:
            return {}
        self.live_sent_at.clear()
        self.live_rtts = []
        interval = 1.0 / self.plan.live_hz
        count = int(self.plan.live_s * self.plan.live_hz)
        ident = secrets.randbits(16)
        before, t0 = parse_cpu_ticks(await read_proc(self.plan.gateway_pid, "stat")), time.monotonic()
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
        after, t1 = parse_cpu_ticks(await read_proc(self.plan.gateway_pid, "stat")), time.monotonic()
        await trio.sleep(LIVE_GRACE_S)
        result.live_received = len(self.live_rtts)
        result.live_loss_pct = loss_pct(result.live_sent, result.live_received)
        rtts_ms = [r * 1000.0 for r in self.live_rtts]
        result.live_rtt_p50_ms = percentile(rtts_ms, 0.5)
        result.live_rtt_p99_ms = percentile(rtts_ms, 0.99)
        result.live_cores = cores(before, after, t1 - t0, ticks_per_s=TICKS_PER_S)
        fields = ("live_sent", "live_received", "live_loss_pct", "live_rtt_p50_ms", "live_rtt_p99_ms", "live_cores")
        return {name: getattr(result, name) for name in fields}

    # -- the whole run: what the orchestrator says -----------------------------------------------
    async def perform(self, command: Mapping[str, Any]) -> dict[str, Any]:
        match command.get("do"):
            case "handshakes":
                return await self.handshakes(int(command["size"]), int(command["window"]))
            case "live":
                return await self.live()
            case "reattaches":
                return await self.reattaches(int(command["size"]), int(command["window"]))
            case "finish":
                return {
                    "send_failed": self.send_failed,
                    "undecodable": self.undecodable,
                    "reattach_stale_version_retries": self.stale_retries,
                }
            case other:
                raise LoadError(f"unknown command from the orchestrator: {other!r}")

    async def serve(self) -> None:
        """Connect to the orchestrator, then run each phase it names until it says ``finish``."""
        try:
            with trio.fail_after(self.plan.budget_s):
                link = Link(await trio.open_unix_socket(self.plan.control_socket))
                await link.send({"worker": self.share.index})
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.receive_forever)
                    while True:
                        command = await link.receive()
                        await link.send(await self.perform(command))
                        if command.get("do") == "finish":
                            break
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            raise LoadError(f"worker {self.share.index} still running after {self.plan.budget_s:g} s") from None


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


def worker_main(plan_path: Path, index: int) -> int:
    """Worker ``index`` of the plan: take its share of the clients and serve the orchestrator."""
    plan = WorkerPlan.from_json(json.loads(plan_path.read_text()))
    if not 0 <= index < len(plan.shares):
        raise LoadError(f"the plan has {len(plan.shares)} workers, not a worker {index}")
    share = plan.shares[index]
    keys = [base64.b64decode(line) for line in Path(plan.keys_file).read_text().split()]
    if len(keys) < plan.sizes[-1]:
        raise LoadError(f"{plan.keys_file} holds {len(keys)} keys, the plan needs {plan.sizes[-1]}")
    raise_fd_limit(share.endpoints + SPARE_FDS)
    trio.run(Worker(plan, share, keys).serve)
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
    sockets_per_worker: int | None = None  # None: as many as the open-file limit allows
    workdir: Path | None = None
    store: str = attrs.field(default="memory", validator=attrs.validators.in_(STORES))
    store_ops: int = DEFAULT_STORE_OPS  # calls per operation in the store-level figure (etcd only); 0: none


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
    """The longest a worker may take: each size's phases at their bounds."""
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


def op_summary(durations: Sequence[float], *, seconds: float, failed: int) -> dict[str, Any]:
    """One operation's pass: calls that succeeded, failed, ops/s over the pass's wall time, latencies."""
    return {
        "ok": len(durations),
        "failed": failed,
        "seconds": seconds,
        "ops_per_s": rate(len(durations), seconds),
        **{f"latency_{name}": value for name, value in latency_summary(durations).items()},
    }


async def timed_calls(call: Callable[[int], Awaitable[bool]], items: Sequence[int],
                      width: int) -> tuple[list[float], list[int], float]:  # fmt: skip
    """``call(i)`` for each item, ``width`` at a time: durations and items of those that returned True, wall time.

    A call that raises StoreError counts as one that returned False.
    """
    from jvpn_trio.core.ownership import StoreError

    durations: list[float] = []
    succeeded: list[int] = []
    limit = trio.CapacityLimiter(width)

    async def one(i: int) -> None:
        async with limit:
            t0 = trio.current_time()
            try:
                ok = await call(i)
            except StoreError:
                ok = False
            if ok:
                durations.append(trio.current_time() - t0)
                succeeded.append(i)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in items:
            nursery.start_soon(one, i)
    return durations, sorted(succeeded), trio.current_time() - t0


async def _store_ops_pass(store: EtcdOwnershipStore, count: int, width: int) -> dict[str, Any]:
    """One pass of :func:`measure_store_ops` over ``count`` fresh sessions, ``width`` calls at a time."""
    from jvpn_trio.core.ids import SESSION_ID_BYTES
    from jvpn_trio.core.ownership import (
        ABSENT_REVISION,
        SessionTicket,
        peer_fingerprint,
    )

    tickets = [
        SessionTicket(
            peer=peer_fingerprint(os.urandom(32)), session_id=SessionId(os.urandom(SESSION_ID_BYTES)),
            owner=STORE_OPS_NODE, address=STORE_OPS_TICKET_ADDRESS,
        )
        for _ in range(count)
    ]
    revisions: dict[int, int] = {}  # ticket index -> the session key's revision, once claimed
    read_back: dict[int, SessionTicket] = {}

    async def claim(i: int) -> bool:
        result = await store.claim(
            tickets[i].session_id, STORE_OPS_NODE, expected_revision=ABSENT_REVISION, ticket=tickets[i]
        )
        if result.succeeded and result.record is not None:
            revisions[i] = result.record.revision
        return i in revisions

    async def read(i: int) -> bool:
        return await store.read(tickets[i].session_id) is not None

    async def release(i: int) -> bool:
        return (await store.release(tickets[i].session_id, STORE_OPS_NODE, expected_revision=revisions[i])).succeeded

    async def read_ticket(i: int) -> bool:
        ticket = await store.read_ticket(tickets[i].peer)
        if ticket is not None and ticket.session_id == tickets[i].session_id:
            read_back[i] = ticket
        return i in read_back

    async def take_over(i: int) -> bool:
        return (await store.take_over(read_back[i], STORE_OPS_NODE)).succeeded

    steps: dict[str, Callable[[int], Awaitable[bool]]] = {
        "claim": claim, "read": read, "release": release, "read_ticket": read_ticket, "take_over": take_over,
    }  # fmt: skip
    alive = list(range(count))
    figures: dict[str, Any] = {}
    for operation in STORE_OPS:
        durations, succeeded, seconds = await timed_calls(steps[operation], alive, width)
        figures[operation] = op_summary(durations, seconds=seconds, failed=len(alive) - len(succeeded))
        alive = succeeded
    return figures


async def measure_store_ops(endpoints: Sequence[str], *, count: int, concurrency: int = STORE_OPS_CONCURRENCY,
                            transport: Any = None) -> dict[str, Any]:  # fmt: skip
    """The etcd store alone: ``count`` calls of each of :data:`STORE_OPS`, one at a time, then ``concurrency`` at a time.

    Through :class:`~jvpn_trio.drivers.store_etcd.EtcdOwnershipStore` with the gateway's default
    lease timings, under a lease of its own and keys of its own (:data:`STORE_OPS_PREFIX`).  Each
    pass works on ``count`` fresh sessions, in the order a takeover needs: claim (create-if-absent,
    with the peer's ticket), read, release (the session key; the ticket stays), read_ticket, and
    take_over with the ticket read back.  A call that raises StoreError or loses its
    compare-and-swap counts as failed and has no latency; a session whose earlier step failed is
    left out of the later ones.  ``transport``: how to reach the members (a lab's unix sockets).
    Raises StoreError if the store cannot start (no lease).
    """
    from jvpn_trio.config import ClusterConfig
    from jvpn_trio.drivers.store_etcd import open_etcd_ownership_store

    cluster = ClusterConfig()
    passes: dict[str, dict[str, Any]] = {}
    async with open_etcd_ownership_store(
        endpoints, request_timeout_s=cluster.request_timeout_ms / MS_PER_S, lease_ttl_ms=cluster.lease_ttl_ms,
        lease_margin_s=cluster.lease_margin_ms / MS_PER_S, keepalive_interval_s=cluster.keepalive_interval_ms / MS_PER_S,
        prefix=STORE_OPS_PREFIX, transport=transport,
    ) as store:  # fmt: skip
        for mode, width in (("sequential", 1), ("concurrent", concurrency)):
            passes[mode] = figures = await _store_ops_pass(store, count, width)
            summary = ", ".join(f"{op} {_fmt(f['ops_per_s'], ',.0f')}/s" for op, f in figures.items())
            _progress(f"  store alone, {mode}: {summary}")
    return {"count": count, "concurrency": concurrency, "prefix": STORE_OPS_PREFIX, "passes": passes}


async def run_load(settings: LoadSettings) -> dict[str, Any]:
    """Build the lab, start the gateway and the workers, run the phases, collect the report (JSON-ready)."""
    from jvpn_trio.drivers.control import ControlError, query_control
    from jvpn_trio.lab.netns import DEFAULT_PATHS, LabSpec, open_lab

    started_utc = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    capacity = settings.sockets_per_worker or worker_capacity(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    shares = partition(settings.sizes, settings.reattaches, capacity)
    temporary = settings.workdir is None
    workdir = settings.workdir or Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="jvpn-loadgen-")))
    peers = settings.sizes[-1]
    spec = LabSpec(prefix=PREFIX_FAMILY + secrets.token_hex(2), paths=(DEFAULT_PATHS[0],), ipv6=False)
    try:
        await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
        _progress(f"generating {peers:,} client keys")
        public_keys = await trio.to_thread.run_sync(_write_keys, workdir, peers)
        async with open_lab(spec) as lab, _open_etcd_for(settings.store, lab.gateway_ns) as etcd:
            listen = f"{lab.gateway_address}:{PORT}"
            etcd_endpoints = etcd.namespace_endpoints if etcd is not None else []
            text = gateway_config_text(public_keys=public_keys, listen=listen, directory=workdir,
                                       etcd_endpoints=etcd_endpoints)  # fmt: skip
            await trio.Path(workdir / "gateway.toml").write_text(text)
            client_ip, _ = lab.path_addresses(DEFAULT_PATHS[0])
            hosts = source_hosts(client_ip, math.ceil(sum(s.endpoints for s in shares) / ports_per_host()))
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
                hosts=tuple(hosts), sizes=settings.sizes, shares=shares, control_socket=str(workdir / "loadgen.sock"),
                live_s=settings.live_s, live_hz=settings.live_hz, phase_timeout_s=settings.phase_timeout_s,
                budget_s=_worker_budget_s(settings), gateway_pid=gateway.pid,
            )  # fmt: skip
            await trio.Path(workdir / "plan.json").write_text(json.dumps(plan.to_json()))
            listener = await _control_listener(Path(plan.control_socket), len(shares))
            _progress(f"starting {len(shares)} client worker(s)")
            workers: list[Any] = []
            try:
                for share in shares:
                    workers.append(await lab.start_process(
                        lab.client_ns,
                        [sys.executable, "-m", "jvpn_trio.lab.loadgen", "worker", str(workdir / "plan.json"),
                         str(share.index)],
                        stderr_path=workdir / f"worker{share.index}.err",
                    ))  # fmt: skip
                watch = _Watch(gateway, err, workers, [workdir / f"worker{i}.err" for i in range(len(shares))])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch.run)
                    measured = await _conduct(listener, watch, plan, settings)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
                    for worker in workers:
                        await worker.terminate()
            count: int | None = None
            status_s: float | None = None
            try:
                t0 = time.monotonic()
                status = await query_control(
                    workdir / "gateway.sock", {"cmd": "status"}, timeout=STATUS_TIMEOUT_S,
                    max_reply_bytes=STATUS_REPLY_BYTES,
                )  # fmt: skip
                count = int(status["session_count"])
                status_s = round(time.monotonic() - t0, 3)
            except (ControlError, KeyError, ValueError, TypeError) as exc:
                _progress(f"gateway status unavailable: {exc}")
            gateway_rss_peak = await _peak_rss(gateway.pid)
            await gateway.terminate()
            store_ops: dict[str, Any] | None = None
            if etcd is not None and settings.store_ops > 0:
                _progress(f"the store alone: {settings.store_ops:,} calls per operation, one at a time, "
                          f"then {STORE_OPS_CONCURRENCY} at a time")  # fmt: skip
                store_ops = await measure_store_ops(etcd.endpoints, count=settings.store_ops, transport=etcd.transport())
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
        "store": settings.store,
        "etcd_members": ETCD_MEMBERS.get(settings.store, 0),
        "etcd_endpoints": etcd_endpoints,
        "store_ops": store_ops,
        "peers": peers,
        "workers": len(shares),
        "gateway_startup_s": round(startup_s, 3),
        "gateway_session_count": count,
        "gateway_status_s": status_s,  # how long the gateway took to list every session
        "gateway_peak_rss_kib": gateway_rss_peak,
        **measured,
    }


@contextlib.asynccontextmanager
async def _open_etcd_for(store: str, namespace: str) -> AsyncIterator[EtcdCluster | None]:
    """With an etcd store: its members in ``namespace`` (the gateway's), on its loopback; else None."""
    from jvpn_trio.lab.etcd import EtcdSpec, open_etcd_cluster

    members = ETCD_MEMBERS.get(store)
    if members is None:
        yield None
        return
    _progress(f"starting etcd: {members} member(s) in {namespace}")
    spec = EtcdSpec(members=members, namespace=namespace, heartbeat_ms=ETCD_HEARTBEAT_MS, election_ms=ETCD_ELECTION_MS)
    async with open_etcd_cluster(spec) as cluster:
        yield cluster


async def _control_listener(path: Path, backlog: int) -> trio.SocketListener:
    """The Unix socket the workers connect to (a path, so it reaches into the client namespace)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a socket left by an earlier run in the same --workdir
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise LoadError(f"cannot listen on {path} for the workers: {exc}") from None
    return trio.SocketListener(sock)


class _Watch:
    """Fails the run (LoadError) as soon as the gateway or a worker exits while it should not."""

    def __init__(self, gateway: Any, gateway_err: Path, workers: Sequence[Any], worker_errs: Sequence[Path]) -> None:
        self.gateway, self.gateway_err = gateway, gateway_err
        self.workers, self.worker_errs = workers, worker_errs
        self.workers_may_exit = False

    async def run(self) -> None:
        while True:
            if self.gateway.returncode is not None:
                raise LoadError(f"the gateway exited {self.gateway.returncode} under load: {_tail(self.gateway_err)}")
            for index, (worker, err) in enumerate(zip(self.workers, self.worker_errs)):
                code = worker.returncode
                if code is not None and (code != 0 or not self.workers_may_exit):
                    raise LoadError(f"worker {index} exited {code}: {_tail(err)}")
            await trio.sleep(POLL_S * 10)


async def _accept_workers(listener: trio.SocketListener, count: int, timeout_s: float) -> list[Link]:
    """Every worker's link, in worker order (each says its index first)."""
    links: list[Link | None] = [None] * count
    with trio.move_on_after(timeout_s):
        while any(link is None for link in links):
            link = Link(await listener.accept())
            hello = await link.receive()
            index = hello.get("worker")
            if not isinstance(index, int) or not 0 <= index < count or links[index] is not None:
                raise LoadError(f"unexpected hello from a worker: {hello!r}")
            links[index] = link
        return [link for link in links if link is not None]
    raise LoadError(f"only {sum(1 for link in links if link is not None)} of {count} workers connected within {timeout_s:g} s")


async def _ask(links: Sequence[Link], commands: Sequence[Mapping[str, Any] | None], timeout_s: float,
               what: str) -> list[dict[str, Any]]:  # fmt: skip
    """Send each worker its command (None: nothing) at once; their answers ({} for none), bounded."""
    answers: list[dict[str, Any]] = [{} for _ in links]

    async def one(w: int, command: Mapping[str, Any]) -> None:
        await links[w].send(command)
        answers[w] = await links[w].receive()

    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:
            for w, command in enumerate(commands):
                if command is not None:
                    nursery.start_soon(one, w, command)
        return answers
    raise LoadError(f"the workers did not finish {what} within {timeout_s:g} s")


async def _conduct(listener: trio.SocketListener, watch: _Watch, plan: WorkerPlan,
                   settings: LoadSettings) -> dict[str, Any]:  # fmt: skip
    """The phases, size after size, every worker at once; the figures added up across workers."""
    links = await _accept_workers(listener, len(plan.shares), STARTUP_TIMEOUT_S)
    bound = settings.phase_timeout_s + WORKER_SLACK_S
    pid = plan.gateway_pid
    rss0 = await rss_kib(pid)
    results: list[SizeResult] = []
    for index, size in enumerate(settings.sizes):
        result = SizeResult(sessions=size)
        results.append(result)
        new = [s.slices[index][1] - s.slices[index][0] for s in plan.shares]
        windows = window_shares(settings.window, new)
        _progress(f"{size:,} sessions: handshaking {sum(new):,} new ones, {settings.window} at a time "
                  f"over {sum(1 for n in new if n)} worker(s)")  # fmt: skip
        t0 = time.monotonic()
        answers = await _ask(links, [{"do": "handshakes", "size": index, "window": w} for w in windows], bound,
                             "their handshakes")  # fmt: skip
        result.handshake_s = time.monotonic() - t0
        result.handshakes_new = sum(a["new"] for a in answers)
        result.handshake_failed = sum(a["failed"] for a in answers)
        result.established = sum(a["established"] for a in answers)
        result.timed_out = any(a["timed_out"] for a in answers)
        result.handshakes_per_s = rate(result.handshakes_new, result.handshake_s)
        result.set_latency("handshake", from_us([us for a in answers for us in a["latencies_us"]]))
        _progress(f"  {result.established:,} established, {_fmt(result.handshakes_per_s, ',.0f')} handshakes/s, "
                  f"p50 / p99 / max {_p50_p99_max(result.to_json(), 'handshake')} ms"
                  f"{' (timed out)' if result.timed_out else ''}")  # fmt: skip
        await trio.sleep(settings.settle_s)
        result.idle_cores = await cores_over(pid, settings.idle_s)
        result.rss_kib = await rss_kib(pid)
        result.kib_per_session = kib_per_session(rss0, result.rss_kib, result.established)
        _progress(f"  idle: RSS {_fmt(_mib(result.rss_kib), ',.1f')} MiB, "
                  f"{_fmt(result.kib_per_session, '.1f')} KiB/session, {_fmt(result.idle_cores, '.3f')} cores")  # fmt: skip
        live_bound = settings.live_s + LIVE_GRACE_S + WORKER_SLACK_S
        live = await _ask(links, [{"do": "live"}] + [None] * (len(links) - 1), live_bound, "the live stream")
        for name, value in live[0].items():
            setattr(result, name, value)
        _progress(f"  live {settings.live_hz:g} Hz: loss {_fmt(result.live_loss_pct, '.2f')} % "
                  f"({result.live_received}/{result.live_sent})")  # fmt: skip
        movers = [s.reattaches[index] for s in plan.shares]
        windows = window_shares(settings.window, movers)
        t0 = time.monotonic()
        answers = await _ask(links, [{"do": "reattaches", "size": index, "window": w} for w in windows], bound,
                             "their reattaches")  # fmt: skip
        result.reattach_s = time.monotonic() - t0
        result.reattach_sent = sum(a["sent"] for a in answers)
        result.reattach_acked = sum(a["acked"] for a in answers)
        for answer in answers:
            for reason, n in answer["rejected"].items():
                result.reattach_rejected[reason] = result.reattach_rejected.get(reason, 0) + n
        result.reattaches_per_s = rate(result.reattach_acked, result.reattach_s)
        result.closed_by_gateway = sum(a["closed"] for a in answers)
        result.set_latency("reattach", from_us([us for a in answers for us in a["latencies_us"]]))
        _progress(f"  reattaches: {result.reattach_acked}/{result.reattach_sent} acked, "
                  f"{_fmt(result.reattaches_per_s, ',.0f')}/s, "
                  f"p50 / p99 / max {_p50_p99_max(result.to_json(), 'reattach')} ms")  # fmt: skip
        if result.timed_out:
            break
    watch.workers_may_exit = True
    totals = await _ask(links, [{"do": "finish"}] * len(links), STATUS_TIMEOUT_S, "their totals")
    counters = ("send_failed", "undecodable", "reattach_stale_version_retries")
    return {
        "rss0_kib": rss0,
        "sizes": [r.to_json() for r in results],
        **{name: sum(t[name] for t in totals) for name in counters},
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
    parser.add_argument("--sockets-per-worker", type=_bounded(int, 1, MAX_ENDPOINTS_PER_WORKER), metavar="N",
                        help="sockets one client worker process holds at most; more sessions start more workers "
                             f"(default: the hard open-file limit less {SPARE_FDS}, at most {MAX_ENDPOINTS_PER_WORKER})")  # fmt: skip
    parser.add_argument("--store", type=parse_stores, default=DEFAULT_STORES, metavar="LIST",
                        help="the gateway's ownership store: memory, etcd (one member) or etcd3 (three), started in "
                             "the gateway namespace; a comma list runs each in turn and compares them (default memory)")  # fmt: skip
    parser.add_argument("--store-ops", type=_bounded(int, 0, MAX_STORE_OPS), default=DEFAULT_STORE_OPS, metavar="N",
                        help="with etcd: then N calls of each store operation, one at a time and "
                             f"{STORE_OPS_CONCURRENCY} at a time, against etcd alone (default {DEFAULT_STORE_OPS}; 0 skips)")  # fmt: skip
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="also write the JSON document to FILE, or to stdout (the table then goes to stderr)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="keep keys, configs, logs and the gateway's event log here (default: a temporary directory)")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> tuple[LoadSettings, ...]:
    """One run's settings per ``--store``, in the order given."""
    return tuple(
        LoadSettings(
            sizes=tuple(args.sessions), window=args.window, reattaches=args.reattaches, settle_s=args.settle,
            idle_s=args.idle_seconds, live_s=args.live_seconds, live_hz=args.live_hz,
            phase_timeout_s=args.phase_timeout, sockets_per_worker=args.sockets_per_worker,
            workdir=_store_workdir(args.workdir, store, len(args.store)), store=store, store_ops=args.store_ops,
        )
        for store in args.store
    )


def _store_workdir(workdir: Path | None, store: str, stores: int) -> Path | None:
    """``--workdir`` itself for one store; a subdirectory per store for several (each run writes its own keys)."""
    return workdir / store if workdir is not None and stores > 1 else workdir


async def run_loads(runs: Sequence[LoadSettings]) -> list[dict[str, Any]]:
    """:func:`run_load` for each store in turn, each in a lab of its own."""
    reports = []
    for settings in runs:
        _progress(f"== store {store_label(settings.store)} ==")
        reports.append(await run_load(settings))
    return reports


def render_reports(reports: Sequence[Mapping[str, Any]]) -> str:
    """Each run's table, then (several stores) the side-by-side comparison."""
    text = "\n".join(render_table(report) for report in reports)
    if len(reports) > 1:
        text += "\n" + render_comparison(reports)
    return text


def report_document(reports: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The JSON document: one store's report as it is; several as ``{"runs": [...]}``."""
    return reports[0] if len(reports) == 1 else {"runs": list(reports)}


def _preflight() -> str | None:
    if os.geteuid() != 0:
        return "loadgen needs root (network namespaces, a TUN device)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install -y {package})"
    return None


def first_load_error(exc: BaseException) -> LoadError | None:
    """The first LoadError of a (nested) group holding nothing else (several workers failing at once)."""
    if isinstance(exc, LoadError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        inner = [first_load_error(e) for e in exc.exceptions]
        if inner and all(e is not None for e in inner):
            return inner[0]
    return None


def main(args: argparse.Namespace) -> int:
    """Run the load from parsed options; print the table (and the JSON); return the exit code."""
    from jvpn_trio.core.ownership import StoreError
    from jvpn_trio.lab.bench import EXIT_INTERRUPTED, only_interrupts
    from jvpn_trio.lab.etcd import EtcdError
    from jvpn_trio.lab.netns import LabError

    problem = _preflight()
    if problem is not None:
        print(f"jvpn-trio loadgen: {problem}", file=sys.stderr)
        return 2
    try:
        reports = trio.run(run_loads, settings_from_args(args))
    except (EtcdError, StoreError) as exc:
        print(f"jvpn-trio loadgen: etcd: {exc}", file=sys.stderr)
        return 1
    except (LoadError, LabError, OSError) as exc:
        print(f"jvpn-trio loadgen: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, LoadError) else 2
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        load_error = first_load_error(exc)
        if load_error is not None:
            print(f"jvpn-trio loadgen: {load_error}", file=sys.stderr)
            return 1
        if not only_interrupts(exc):
            raise
        print("jvpn-trio loadgen: interrupted (lab removed)", file=sys.stderr)
        return EXIT_INTERRUPTED
    document = json.dumps(report_document(reports), indent=2) + "\n"
    to_stdout = args.json == "-"
    print(render_reports(reports), file=sys.stderr if to_stdout else sys.stdout, end="")
    if to_stdout:
        sys.stdout.write(document)
    elif args.json is not None:
        Path(args.json).write_text(document)
    return 1 if any(short_of_target(report) for report in reports) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jvpn-trio loadgen", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="role")
    run = sub.add_parser("run", help="the benchmark (what `jvpn-trio loadgen` does)")
    add_arguments(run)
    worker = sub.add_parser("worker", help="internal: a share of the client side, started by the benchmark in the lab")
    worker.add_argument("plan", type=Path)
    worker.add_argument("index", type=int)
    return parser


def _module_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "worker":
        try:
            return worker_main(args.plan, args.index)
        except (LoadError, OSError) as exc:
            print(f"loadgen worker {args.index}: {exc}", file=sys.stderr)
            return 1
        except BaseExceptionGroup as exc:
            load_error = first_load_error(exc)
            if load_error is None:
                raise
            print(f"loadgen worker {args.index}: {load_error}", file=sys.stderr)
            return 1
    if args.role == "run":
        return main(args)
    build_parser().print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_module_main())
