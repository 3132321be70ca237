"""The gateway runtime: a table of sessions, one core each, and strict binding.

Theory of operation
-------------------
Receivers (one per listening socket) authenticate datagrams and do the
cheap, stateless replies themselves: a PROBE_ACK reads the session's
current version and binding but changes nothing.  Everything that may
change a session goes to the **supervisor** through one bounded inbox as
``(observed_at, session_id, input)``; it is the only caller of the
``GatewaySession`` cores, so they need no locks, and it re-arms one timer
on the earliest ``next_deadline()`` of all sessions, kept in a heap.

Scale: the supervisor's work per input is O(1) in the number of sessions
(docs/benchmarks.md, "Many sessions on one gateway").  Deadlines live in a
heap with lazy invalidation: a session's entry is pushed again whenever a
step moves its deadline, and stale entries are skipped when they surface.
Status is kept per session and refreshed only for the sessions an input
touched; the aggregate ``GatewayStatus`` is published by a task of its own,
at once when a session starts or ends (coalesced per
:data:`STATUS_MEMBERSHIP_GAP_S`), otherwise at most once per
:data:`STATUS_INTERVAL_S`.  A session untouched since its last publication
keeps its snapshot of then: :meth:`GatewayRuntime.peer_statuses` takes them
all afresh, for a status request.

Handshakes: a HANDSHAKE_INIT naming an existing session of the same peer
rekeys it (the new keypair is held as *next* until the client's first
packet proves it has it; the SessionID does not change, Property 5).  Any
other authenticated init asks ``core.admission`` for a new session, and
this driver carries the answer out: end the session it replaces, claim
ownership in the store, start the session core.

Handshakes cannot starve sessions (issue 15): the receive loop spends on a
HANDSHAKE_INIT only a mac1 hash and what ``core.cookie.HandshakeGate``
decides (a per-source token bucket, under load a cookie reply instead of any
DH work), and hands an init it lets through to the **handshake worker**
through a queue of its own, bounded (``HandshakeLimits.queue_capacity``) and
never waited on: a full queue drops the init and counts it.  The worker does
the DH work within the gate's budget (``handshakes_per_s``).  So authenticated
traffic of live sessions never waits behind an unauthenticated handshake, and
a frame failing authentication costs one AEAD attempt; its report to the
session core (a forged REATTACH or CLOSE) is shed, and counted, once the
inbox is :data:`DROP_REPORT_INBOX_SHARE` full, so junk cannot crowd out real
inputs either.

Same key twice (docs/gateway.md): a peer holds one session.  When a new
handshake with the same static key completes, the session it replaces is
unrouted at once and ends through the supervisor with SESSION_REPLACED: the
core sends an authenticated CLOSE(SESSION_REPLACED) on the old binding,
sealed with the old session's keys (the only ones its client can open),
before the session is reaped and its keys dropped.  Only a HANDSHAKE_INIT
that authenticates with the peer's static key and carries a fresh timestamp
gets this far, so nobody without the key can displace a session.

Data: DATA is written to the TUN only if it came from the active binding
(``GatewaySession.accepts_data_from``); anything else is counted as stray
and never counts as data.  Packets from the TUN go out on the binding of
the session that holds the destination address (IPv4, or IPv6 when the
tunnel carries it: each session holds one address of each family, from
``core.admission``), or are counted as dropped while that session is unbound.
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
import itertools
import math
import os
import struct
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, Callable, Protocol, Sequence

import attrs
import trio
import trio_util

from jvpn_trio.core import events as ev
from jvpn_trio.core import wire
from jvpn_trio.core.actions import (
    Action,
    EmitEvent,
    EventKind,
    Role,
    SendClose,
    SendPathChallenge,
    SendReattachAck,
    SendReattachReject,
    Terminate,
)
from jvpn_trio.core.admission import Admissions, Admit, Claimed, Refusal, Refuse
from jvpn_trio.core.ownership import (
    ABSENT_REVISION,
    Lease,
    Takeover,
    OwnershipRecord,
    SessionTicket,
    StoreError,
    StoreUnavailable,
    TakeoverVerdict,
    judge_takeover,
    peer_fingerprint,
    store_failure_reason,
)
from jvpn_trio.core.channel import ChannelDrop, SecureChannel
from jvpn_trio.core.cookie import HandshakeGate, HandshakeLimits, Verdict
from jvpn_trio.core.noise import HandshakeError, PeerRecord, ResponderHandshake, StaticKeypair, init_mac1_ok
from jvpn_trio.core.keyring import KeyExhausted
from jvpn_trio.core.ids import Binding, PathId, RandomBytes, SessionId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import GatewaySession, GatewaySnapshot
from jvpn_trio.core.states import TERMINATION_REASONS, ReasonCode
from jvpn_trio.core.trace import SessionStart
from jvpn_trio.drivers.announce import ANNOUNCE_LOG_INTERVAL_S, AnnounceError
from jvpn_trio.drivers.control import STATUS_INTERVAL_S
from jvpn_trio.drivers.log import LineLimiter, stderr_line
from jvpn_trio.drivers.ports import Address, DatagramPort, DeliveryBuffer, PacketPort, equal_size_runs
from jvpn_trio.drivers.recording import Recorder
from jvpn_trio.drivers.store_memory import OwnershipStore

BATCH = 64
INBOX_CAPACITY = 4096
#: Client endpoints remembered per session (one per path is the normal case).
MAX_ENDPOINTS_PER_SESSION = 16
#: Removed peers whose last handshake timestamp is kept, so that re-adding one cannot let a
#: captured old HANDSHAKE_INIT of theirs in again; the oldest is forgotten beyond this.
MAX_RETIRED_TIMESTAMPS = 65536
#: Transport types whose failed authentication the session core hears about: a forged or
#: replayed REATTACH or CLOSE is an attack on the binding, so it becomes a SECURITY_EVENT.
REPORTED_DROP_TYPES = frozenset({wire.MessageType.REATTACH, wire.MessageType.CLOSE})
#: Such reports are shed (counted in ``reports_shed``) once the supervisor's inbox is this full:
#: the rest of it stays for inputs that authenticated, whatever rate of junk arrives.
DROP_REPORT_INBOX_SHARE = 0.5
#: A session started or ended is published at once, but at most once per this long (the lab's
#: status poll period): a burst of handshakes then costs one O(sessions) publication per gap.
STATUS_MEMBERSHIP_GAP_S = 0.05
#: The deadline heap is rebuilt from the live deadlines once its stale entries outnumber them
#: by this much: memory stays O(sessions) and the rebuild is amortised O(1) per push.
DEADLINE_HEAP_SLACK = 1024


def _reason_counters(prefix: str, reasons: Iterable[ReasonCode]) -> Mapping[ReasonCode, str]:
    return {reason: f"{prefix}{reason.value.lower()}" for reason in reasons}


#: The DATA type's byte, and the transport header's receiver index: what the DATA fast path reads first.
_RECEIVER_INDEX = struct.Struct("!I")

R = ReasonCode
#: The counter per reason ``SecureChannel.open_untrusted`` drops a frame for.
CHANNEL_DROP_COUNTERS = _reason_counters("drop_", (R.MALFORMED, R.STRAY_PACKET, R.REPLAYED_COUNTER, R.DECRYPT_FAILED))
#: The counter per reason ``ResponderHandshake.consume_init`` refuses an init for.
HANDSHAKE_ERROR_COUNTERS = _reason_counters(
    "handshake_", (R.BAD_MAC, R.DECRYPT_FAILED, R.UNKNOWN_PEER, R.MALFORMED, R.HANDSHAKE_REPLAY)
)
#: The counter per way a session ends (Property 10).
TERMINATION_COUNTERS = _reason_counters("terminated_", TERMINATION_REASONS)
#: The counter per reason admission refuses a new session for.
REFUSAL_COUNTERS: Mapping[Refusal, str] = {r: f"handshake_{r.value.lower()}" for r in Refusal}
#: A takeover the ticket does not allow, counted by why (``takeover_<verdict>``).
TAKEOVER_COUNTERS: Mapping[TakeoverVerdict, str] = {v: f"takeover_{v.value.lower()}" for v in TakeoverVerdict}


@attrs.define(kw_only=True)
class _Counts:
    """The runtime's counters, bumped in place: on the data path that is one slot increment.

    Field names are the keys of ``counters`` in ``jvpn-trio status --json``:
    keep them stable.  The ``*_other`` fields count a reason the tables above
    do not list, rather than crash the gateway over a counter.
    """

    # handshakes and sessions
    sessions_created: int = 0
    rekeys: int = 0
    rekey_unknown_session: int = 0
    handshake_malformed: int = 0
    handshake_bad_mac: int = 0
    handshake_decrypt_failed: int = 0
    handshake_unknown_peer: int = 0
    handshake_handshake_replay: int = 0
    handshake_other: int = 0
    handshake_pool_exhausted: int = 0
    handshake_claim_failed: int = 0
    handshake_admission_in_flight: int = 0
    handshake_peer_removed: int = 0
    handshake_not_portable: int = 0
    # takeovers (docs/cluster.md, "Takeover"): sessions another gateway made, resumed here
    takeovers: int = 0
    takeover_no_ticket: int = 0
    takeover_other_session: int = 0
    takeover_address_differs: int = 0
    takeover_store_unavailable: int = 0
    store_ticket_forget_failed: int = 0
    announce_failed: int = 0  # proxy ARP announcements or withdrawals the kernel refused
    # handshake admission (core/cookie.py): inits the gate or the full queue turned away, cookies sent
    handshake_source_limited: int = 0
    handshake_cookie_limited: int = 0
    handshake_queue_full: int = 0
    handshake_cookie_reply: int = 0
    # the cluster store (docs/cluster.md): denials for no certain answer, packets held while the lease is unproven
    handshake_store_unavailable: int = 0
    handshake_ownership_ambiguous: int = 0
    reattach_store_unavailable: int = 0
    reattach_store_busy: int = 0  # denied STORE_UNAVAILABLE at once: every store call slot was waiting
    store_release_failed: int = 0
    drop_lease_unproven: int = 0
    tx_lease_unproven: int = 0
    terminated_session_ttl_expired: int = 0
    terminated_transport_loss_ttl_expired: int = 0
    terminated_key_exhausted: int = 0
    terminated_ownership_lost: int = 0
    terminated_local_close: int = 0
    terminated_peer_close: int = 0
    terminated_peer_removed: int = 0
    terminated_session_replaced: int = 0
    terminated_other: int = 0
    # REATTACHes answered with an ACK (a move, or a retry for the path already bound)
    reattach_accepted: int = 0
    # receiving
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_tun_full: int = 0
    stray_data: int = 0
    drop_malformed: int = 0
    drop_unexpected_handshake_resp: int = 0
    drop_unknown_index: int = 0
    drop_stray_packet: int = 0
    drop_replayed_counter: int = 0
    drop_decrypt_failed: int = 0
    drop_other: int = 0
    drop_malformed_plaintext: int = 0
    drop_unexpected_type: int = 0
    # sending
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_not_ipv4: int = 0  # neither IPv4 nor IPv6 (the name predates IPv6 in the tunnel: kept for status --json)
    tx_no_binding: int = 0
    send_no_port: int = 0
    keys_exhausted: int = 0
    # the supervisor
    inbox_full: int = 0
    input_for_unknown_session: int = 0
    reports_shed: int = 0


@attrs.frozen(kw_only=True)
class GatewayStatistics(_Counts):
    """What :meth:`GatewayRuntime.statistics` returns: a frozen copy of every counter."""


@attrs.define
class GatewayPeer:
    name: str
    public: bytes
    address: ipaddress.IPv4Address | None = None
    last_timestamp: bytes | None = None
    #: The peer's configured IPv6 tunnel address (``PeerConfig.address6``); None: the twin of its IPv4 one.
    address6: ipaddress.IPv6Address | None = None


@attrs.frozen(kw_only=True)
class PeerChanges:
    """What a reload did, by peer name (``jvpn-trio reload``'s reply)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    #: Configured addresses changed: the live session ended (PEER_REMOVED) and the peer connects again.
    readdressed: tuple[str, ...] = ()
    renamed: tuple[str, ...] = ()
    unchanged: int = 0
    #: Sessions ended with PEER_REMOVED (removed and readdressed peers, and pool holders of a newly configured address).
    sessions_closed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": list(self.added), "removed": list(self.removed), "readdressed": list(self.readdressed),
            "renamed": list(self.renamed), "unchanged": self.unchanged, "sessions_closed": self.sessions_closed,
        }  # fmt: skip


@attrs.define(eq=False)
class ServedSession:
    core: GatewaySession
    channel: SecureChannel
    peer: GatewayPeer
    address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address | None = None
    # Where DATA / control replies to this endpoint leave: the port its datagrams came in on, which on a
    # wildcard listener also fixes the local address replies leave from (the one the client reached).
    ports: dict[Address, DatagramPort] = attrs.Factory(dict)
    control_ports: dict[Address, DatagramPort] = attrs.Factory(dict)
    paths: dict[Address, PathId] = attrs.Factory(dict)
    init_path: PathId | None = None
    last_alive_report: float = -math.inf
    #: ``channel.generation`` when its keys were last indexed: the data path re-indexes only on a change.
    indexed_generation: int = -1
    # What this session carried (inner packets, as the runtime-wide rx_*/tx_* counters count them).
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0

    @property
    def session_id(self) -> SessionId:
        return self.core.record.session_id

    def learn_data_port(self, addr: Address, port: DatagramPort) -> None:
        """The DATA path's :meth:`learn`: only a new endpoint or port costs the call."""
        if self.ports.get(addr) is not port:
            self.learn(addr, port, None, control=False)

    def learn(self, addr: Address, port: DatagramPort, path: PathId | None, *, control: bool) -> None:
        """Remember how to answer ``addr``: by the port (and local address) it used, per kind of traffic (bounded)."""
        table = self.control_ports if control else self.ports
        if addr not in table and len(table) >= MAX_ENDPOINTS_PER_SESSION:
            table.pop(next(iter(table)))
        table[addr] = port
        if path is not None:
            if addr not in self.paths and len(self.paths) >= MAX_ENDPOINTS_PER_SESSION:
                self.paths.pop(next(iter(self.paths)))
            self.paths[addr] = path

    def port_for(self, addr: Address, *, control: bool) -> DatagramPort | None:
        first, second = (self.control_ports, self.ports) if control else (self.ports, self.control_ports)
        return first.get(addr) or second.get(addr)


@attrs.frozen(kw_only=True)
class PeerStatus:
    """One served session as ``jvpn-trio status`` shows it: whose it is, where, what it carried.

    The session's state, version and binding (whose endpoint is the peer's
    current endpoint) are in ``snapshot``.  ``last_handshake`` is on the
    gateway's clock (the snapshot's ``now`` is too): when the gateway answered
    the handshake whose keys are now *current*, i.e. which the client has
    confirmed with an authenticated packet; None until it has.  Bytes are
    inner packets: DATA written to the TUN (rx) and sealed for the peer (tx).
    """

    snapshot: GatewaySnapshot
    name: str
    public_key: bytes
    address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address | None
    last_handshake: float | None
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int

    @classmethod
    def of(cls, served: ServedSession, *, now: float) -> PeerStatus:
        current = served.channel.keyring.current
        return cls(
            snapshot=served.core.snapshot(now=now),
            name=served.peer.name,
            public_key=served.peer.public,
            address=served.address,
            address6=served.address6,
            last_handshake=current.created_at if current is not None else None,
            rx_packets=served.rx_packets,
            rx_bytes=served.rx_bytes,
            tx_packets=served.tx_packets,
            tx_bytes=served.tx_bytes,
        )


@attrs.frozen(kw_only=True, eq=False)
class GatewayStatus:
    """What the runtime publishes (``GatewayRuntime.status``): see the module's "Scale".

    Compared by identity: ``AsyncValue`` compares the old value with the new
    one on every assignment, and a new object is only made when something
    changed, so a field-by-field comparison of every session would be waste.
    ``sessions`` keeps its original shape for existing readers; ``peers`` has
    the same sessions, in the same order, with everything ``status`` shows per
    peer.  ``tunnel`` / ``tunnel6`` are the gateway's own tunnel addresses.
    """

    sessions: tuple[tuple[GatewaySnapshot, str, str], ...]  # (snapshot, peer name, tunnel address)
    statistics: GatewayStatistics
    peers: tuple[PeerStatus, ...] = ()
    tunnel: str | None = None
    tunnel6: str | None = None


class AddressAnnouncer(Protocol):
    """Makes the LAN send a tunnel address's traffic here (``drivers/announce.py``: proxy ARP)."""

    async def announce(self, address: ipaddress.IPv4Address) -> bool: ...

    async def withdraw(self, address: ipaddress.IPv4Address) -> None: ...


class GatewayRuntime:
    def __init__(
        self,
        *,
        policy: Policy,
        static: StaticKeypair,
        peers: list[GatewayPeer],
        tunnel: ipaddress.IPv4Interface,
        store: OwnershipStore,
        node_id: str,
        emit: Callable[[EmitEvent], None],
        random_bytes: RandomBytes = os.urandom,
        recorder: Recorder | None = None,
        tunnel6: ipaddress.IPv6Interface | None = None,
        lease: Lease | None = None,
        handshake_limits: HandshakeLimits | None = None,
        announcer: AddressAnnouncer | None = None,
        log: Callable[[str], None] = stderr_line,
        store_calls_in_flight: int | None = None,
    ) -> None:
        """``tunnel6``: the gateway's IPv6 tunnel address; each client then gets an IPv6 address too.

        ``lease``: a shared store's lease (docs/cluster.md); while it is unproven the gateway
        forwards nothing and admits nothing, and once it is lost every session ends
        OWNERSHIP_LOST.  None (the memory store): always valid.

        ``store_calls_in_flight``: with a shared store (``lease`` given), each claim, takeover
        and pre-REATTACH read runs in a task of its own, at most this many at once, so that
        waiting for etcd holds up neither the next handshake nor the probes on the control
        port; a REATTACH finding them all busy is denied STORE_UNAVAILABLE (fail closed).
        None: calls are awaited where they arise (the memory store answers at once).

        ``announcer``: in a cluster, return traffic must follow the session's owner
        (docs/cluster.md, "Routing follows the owner"): each session's IPv4 address is
        announced while it is routed here and withdrawn when it stops being, in that order.
        """
        self.policy = policy
        self._static = static
        self._peers = {p.public: p for p in peers}
        self._retired_timestamps: dict[bytes, bytes] = {}
        self.tunnel = tunnel
        self.tunnel6 = tunnel6
        self._admissions = Admissions(
            tunnel=tunnel,
            fixed={p.public: p.address for p in self._peers.values() if p.address is not None},
            node_id=node_id,
            tunnel6=tunnel6,
            fixed6={p.public: p.address6 for p in self._peers.values() if p.address6 is not None},
        )
        self._store = store
        self._lease = lease
        self.node_id = node_id
        self._emit = emit
        self._random_bytes = random_bytes
        self._recorder = recorder
        self.sessions: dict[SessionId, ServedSession] = {}
        self._by_index: dict[int, ServedSession] = {}
        self._by_address: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, ServedSession] = {}
        self._counts = _Counts()
        self.status = trio_util.AsyncValue[GatewayStatus | None](None)
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[float, SessionId, Any]](INBOX_CAPACITY)
        # ``handshake_limits`` ([handshake] in gateway.toml; None: the defaults) bound handshake work.
        limits = handshake_limits if handshake_limits is not None else HandshakeLimits()
        self._gate = HandshakeGate(limits, gateway_public=static.public, random_bytes=random_bytes, now=-math.inf)
        self._inits_send, self._inits = trio.open_memory_channel[tuple[DatagramPort, bytes, Address]](
            limits.queue_capacity
        )
        self._inits_queued = 0  # what the channel holds: its statistics() costs an object per init
        self._last_now = -math.inf
        self._packets: PacketPort | None = None
        self._delivered = DeliveryBuffer()
        # The supervisor's timers: (deadline, tie-break, session) entries, valid while _scheduled agrees.
        self._deadlines: list[tuple[float, int, SessionId]] = []
        self._scheduled: dict[SessionId, float] = {}
        self._tiebreak = itertools.count()
        # Sessions the last step terminated, reaped right after it.
        self._ending: list[ServedSession] = []
        # What is published: per session, in the order of ``sessions``; refreshed for the dirty ones.
        self._peer_status: dict[SessionId, PeerStatus] = {}
        self._session_rows: dict[SessionId, tuple[GatewaySnapshot, str, str]] = {}
        self._dirty: set[SessionId] = set()
        self._changed = False  # something to publish
        self._membership = False  # a session started or ended: publish without waiting the interval
        # Set when the flag above of the same name turns True; only the publisher makes new ones.
        self._changed_event = trio.Event()
        self._membership_event = trio.Event()
        self._published_at = -math.inf
        self._announcer = announcer
        self._log = log
        self._store_calls = (
            trio.Semaphore(store_calls_in_flight) if lease is not None and store_calls_in_flight else None
        )
        self._nursery: trio.Nursery | None = None
        self._announce_lines = LineLimiter(ANNOUNCE_LOG_INTERVAL_S)
        # (address, announce?) in the order routes changed; one task carries them out.
        self._announcements: collections.deque[tuple[ipaddress.IPv4Address, bool]] = collections.deque()
        self._announcement_due = trio.Event()

    def statistics(self) -> GatewayStatistics:
        """Every counter of this runtime, frozen at the time of the call."""
        return GatewayStatistics(**attrs.asdict(self._counts, recurse=False))

    def _count(self, name: str) -> None:
        setattr(self._counts, name, getattr(self._counts, name) + 1)

    def _count_reason(self, table: Mapping[ReasonCode, str], reason: ReasonCode, other: str) -> None:
        self._count(table.get(reason, other))

    # -- lifetime -------------------------------------------------------------------------------
    async def serve(
        self,
        ports: Sequence[DatagramPort],
        *,
        control_ports: Sequence[DatagramPort] = (),
        packets: PacketPort | None = None,
        task_status: trio.TaskStatus[GatewayRuntime] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; every session still alive is closed explicitly on the way out.

        ``ports`` carry DATA; ``control_ports`` carry handshakes, probes,
        REATTACH and CLOSE in kernel queues of their own, so a data flood
        cannot drown the probes.  Any port accepts any message; a reply
        leaves by the port its request came in on.
        """
        self._packets = packets
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._publish()
                nursery.start_soon(self._supervise)
                nursery.start_soon(self._publish_changes)
                nursery.start_soon(self._handshake_worker)
                for port in [*ports, *control_ports]:
                    nursery.start_soon(self._receive, port)
                if packets is not None:
                    nursery.start_soon(self._pump_packets, packets)
                if self._lease is not None:
                    nursery.start_soon(self._end_all_when_lease_lost, self._lease)
                if self._announcer is not None:
                    nursery.start_soon(self._announce, self._announcer)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                now = trio.current_time()
                for served in list(self.sessions.values()):
                    if not served.core.terminated:
                        self._feed(served, ev.CloseRequested(), now)

    def submit_nowait(self, session_id: SessionId, event: Any) -> bool:
        try:
            self._inbox_send.send_nowait((trio.current_time(), session_id, event))
        except trio.WouldBlock:
            self._counts.inbox_full += 1
            return False
        return True

    def close_all_nowait(self) -> int:
        """Ask every live session to close (an authenticated CLOSE, then TERMINATED LOCAL_CLOSE); how many were asked.

        Goes through the supervisor's inbox like any input, so the cores keep one caller; a
        session the full inbox cannot take now is closed by :meth:`serve`'s way out instead.
        The status is published first, so a wait for it to list no session cannot be
        satisfied by one published before the newest sessions started.
        """
        self._publish()
        return sum(
            self.submit_nowait(served.session_id, ev.CloseRequested())
            for served in list(self.sessions.values())
            if not served.core.terminated
        )

    async def reload_peers(self, peers: Sequence[GatewayPeer]) -> PeerChanges:
        """Authorise exactly ``peers`` from now on; raises ValueError (changing nothing) for a set that cannot work.

        Added peers may handshake at once.  A removed peer's session, and
        that of a peer whose configured address changed, ends through the
        supervisor with PEER_REMOVED (an authenticated CLOSE that says so),
        unrouted first so that not one more packet reaches it; a session
        holding a pool address now configured for another peer ends the same
        way.  Every other session is untouched: same keys, address, binding.
        """
        new = {p.public: p for p in peers}
        if len(new) != len(peers):
            raise ValueError("a public key is listed twice")
        ending = self._admissions.reconfigure(
            peers=new.keys(),
            fixed={p.public: p.address for p in peers if p.address is not None},
            fixed6={p.public: p.address6 for p in peers if p.address6 is not None},
        )
        old = self._peers
        added = [p.name for key, p in new.items() if key not in old]
        removed = [p.name for key, p in old.items() if key not in new]
        readdressed, renamed, merged = [], [], {}
        for key, peer in new.items():
            kept = old.get(key)
            if kept is None:
                peer.last_timestamp = self._retired_timestamps.pop(key, None)
                merged[key] = peer
                continue
            if (kept.address, kept.address6) != (peer.address, peer.address6):
                readdressed.append(peer.name)
            elif kept.name != peer.name:
                renamed.append(peer.name)
            kept.name, kept.address, kept.address6 = peer.name, peer.address, peer.address6  # keeps last_timestamp
            merged[key] = kept
        for key, peer in old.items():
            if key not in new and peer.last_timestamp is not None:
                self._retired_timestamps[key] = peer.last_timestamp
                while len(self._retired_timestamps) > MAX_RETIRED_TIMESTAMPS:
                    self._retired_timestamps.pop(next(iter(self._retired_timestamps)))
        self._peers = merged
        self._dirty.update(self.sessions)  # a renamed peer's sessions show the new name
        self._note_change()
        closed = 0
        now = trio.current_time()
        for session_id in ending:
            served = self.sessions.get(session_id)
            if served is None or served.core.terminated:
                continue
            self._unroute(served)
            await self._inbox_send.send((now, session_id, ev.CloseRequested(reason=ReasonCode.PEER_REMOVED)))
            closed += 1
        unchanged = len(new) - len(added) - len(readdressed) - len(renamed)
        return PeerChanges(
            added=tuple(added), removed=tuple(removed), readdressed=tuple(readdressed), renamed=tuple(renamed),
            unchanged=unchanged, sessions_closed=closed,
        )  # fmt: skip

    # -- the supervisor ---------------------------------------------------------------------------
    def _schedule(self, served: ServedSession) -> None:
        """Keep the heap's entry for ``served`` at its core's ``next_deadline()`` (after each step)."""
        session_id = served.session_id
        deadline = served.core.next_deadline()
        if deadline is None:
            self._scheduled.pop(session_id, None)
            return
        if self._scheduled.get(session_id) == deadline:
            return
        self._scheduled[session_id] = deadline
        heapq.heappush(self._deadlines, (deadline, next(self._tiebreak), session_id))
        if len(self._deadlines) > 2 * len(self._scheduled) + DEADLINE_HEAP_SLACK:
            self._deadlines = [(d, next(self._tiebreak), s) for s, d in self._scheduled.items()]
            heapq.heapify(self._deadlines)

    def _next_deadline(self) -> float:
        """The earliest live deadline; stale heap entries on top are dropped on the way."""
        heap = self._deadlines
        while heap:
            deadline, _, session_id = heap[0]
            if self._scheduled.get(session_id) == deadline:
                return deadline
            heapq.heappop(heap)
        return math.inf

    def _due(self, now: float) -> list[ServedSession]:
        """Take every session whose deadline is at or before ``now`` off the heap (each once)."""
        due = []
        while self._next_deadline() <= now:
            _, _, session_id = heapq.heappop(self._deadlines)
            del self._scheduled[session_id]
            served = self.sessions.get(session_id)
            if served is not None:
                due.append(served)
        return due

    async def _supervise(self) -> None:
        while True:
            deadline = self._next_deadline()
            item = None
            with trio.move_on_at(deadline):
                item = await self._inbox.receive()
            if item is None:
                now = max(deadline, trio.current_time())
                for served in self._due(now):
                    self._feed(served, ev.TimerFired(), now)
            else:
                at, session_id, event = item
                target = self.sessions.get(session_id)
                if target is None:
                    self._counts.input_for_unknown_session += 1
                    continue
                self._feed(target, event, at)
            await self._reap()

    def _feed(self, served: ServedSession, event: Any, at: float) -> None:
        now = max(at, self._last_now)
        self._last_now = now
        actions = served.core.handle(event, now=now)
        if self._recorder is not None:
            self._recorder.step("gateway", served.session_id.hex, now, event, actions)
        self._apply(served, actions)
        self._schedule(served)
        self._touch(served)
        if served.core.terminated:
            self._ending.append(served)

    def _apply(self, served: ServedSession, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, EmitEvent):
                self._emit(action)
            elif isinstance(action, SendReattachAck):
                self._counts.reattach_accepted += 1
                msg = wire.ReattachAck(
                    session_id=served.session_id,
                    nonce=action.nonce,
                    new_version=action.new_version,
                    path_id=action.path,
                    owner_epoch=action.owner_epoch,
                )
                self._send(served, action.endpoint, wire.MessageType.REATTACH_ACK, wire.encode_reattach_ack_plaintext(msg))
            elif isinstance(action, SendReattachReject):
                rej = wire.ReattachReject(
                    session_id=served.session_id,
                    nonce=action.nonce,
                    reason=action.reason,
                    current_version=action.current_version,
                )
                self._send(
                    served, action.endpoint, wire.MessageType.REATTACH_REJECT, wire.encode_reattach_reject_plaintext(rej)
                )
            elif isinstance(action, SendPathChallenge):
                check = wire.PathChallenge(
                    session_id=served.session_id, nonce=action.nonce, challenge=action.challenge, path_id=action.path
                )
                plaintext = wire.encode_path_check_plaintext(check)
                self._send(served, action.endpoint, wire.MessageType.PATH_CHALLENGE, plaintext)
            elif isinstance(action, SendClose):
                binding = action.binding
                if binding is not None:
                    close = wire.Close(session_id=served.session_id, reason=action.reason)
                    self._send(served, binding.endpoint, wire.MessageType.CLOSE, wire.encode_close_plaintext(close))
            elif isinstance(action, Terminate):
                self._count_reason(TERMINATION_COUNTERS, action.reason, "terminated_other")
            # BindTransport / ReleaseTransport: the binding *is* the core's record, which the
            # data path reads through accepts_data_from(); there is no second copy to update.

    async def _reap(self) -> None:
        """Forget the sessions the last step ended and give their ownership back."""
        while self._ending:
            served = self._ending.pop()
            if self.sessions.get(served.session_id) is not served:
                continue  # already reaped
            self._forget(served)
            revision = served.core.held_revision
            try:
                released = await self._store.release(served.session_id, self.node_id, expected_revision=revision)
            except StoreError:  # the record stays until our lease ends; nobody serves it meanwhile
                self._counts.store_release_failed += 1
                continue
            if not released.succeeded:
                continue
            # The session ended here for good: its ticket must not let another gateway resume it.
            try:
                await self._store.forget_ticket(peer_fingerprint(served.peer.public), expected_revision=revision)
            except StoreError:
                self._counts.store_ticket_forget_failed += 1

    def _lease_valid(self, now: float) -> bool:
        """Whether this node may serve what it owns at ``now`` (always, without a shared store)."""
        return self._lease is None or self._lease.lease_valid(now)

    async def _end_all_when_lease_lost(self, lease: Lease) -> None:
        """The store says our lease is gone, so are our records: every session ends OWNERSHIP_LOST."""
        await lease.wait_lost()
        now = trio.current_time()
        for session_id in list(self.sessions):
            await self._inbox_send.send((now, session_id, ev.OwnershipLost()))

    def _forget(self, served: ServedSession) -> None:
        session_id = served.session_id
        self.sessions.pop(session_id, None)
        self._scheduled.pop(session_id, None)
        self._peer_status.pop(session_id, None)
        self._session_rows.pop(session_id, None)
        self._dirty.discard(session_id)
        self._note_change(membership=True)
        for index in served.channel.keyring.local_indices():
            self._by_index.pop(index, None)
        self._unroute(served)
        self._admissions.release(served.session_id)

    def _route(self, served: ServedSession) -> None:
        """Packets to the session's addresses go to it (and, in a cluster, the LAN is told so)."""
        self._by_address[served.address] = served
        if served.address6 is not None:
            self._by_address[served.address6] = served
        self._queue_announcement(served.address, announce=True)

    def _unroute(self, served: ServedSession) -> None:
        """Packets to the session's addresses stop going to it (they are counted as unbound)."""
        for address in (served.address, served.address6):
            if address is not None and self._by_address.get(address) is served:
                del self._by_address[address]
                if isinstance(address, ipaddress.IPv4Address):
                    self._queue_announcement(address, announce=False)

    def _queue_announcement(self, address: ipaddress.IPv4Address, *, announce: bool) -> None:
        if self._announcer is not None:
            self._announcements.append((address, announce))
            self._announcement_due.set()

    async def _announce(self, announcer: AddressAnnouncer) -> None:
        """Carry the route changes out on the LAN, in order; a failure is counted, never fatal."""
        while True:
            await self._announcement_due.wait()
            self._announcement_due = trio.Event()
            while self._announcements:
                address, announce = self._announcements.popleft()
                if announce and self._by_address.get(address) is None:
                    continue  # unrouted again before its turn: its withdrawal follows
                try:
                    if announce:
                        if not await announcer.announce(address):
                            self._counts.announce_failed += 1
                    else:
                        await announcer.withdraw(address)
                except (AnnounceError, OSError) as exc:  # the kernel refused: the session is served all the same
                    self._counts.announce_failed += 1
                    self._emit_announce_failure(address, announce, str(exc))

    def _emit_announce_failure(self, address: ipaddress.IPv4Address, announce: bool, why: str) -> None:
        """One line, at most every ANNOUNCE_LOG_INTERVAL_S per kind: the LAN may route the address elsewhere."""
        action = "announce" if announce else "withdraw"
        line = self._announce_lines.line(action, f"could not {action} {address} on the LAN: {why}", now=trio.current_time())
        if line is not None:
            self._log(line)

    # -- status -----------------------------------------------------------------------------------
    def _touch(self, served: ServedSession) -> None:
        """``served`` changed (an input, bytes carried): its status is taken again at the next publication."""
        self._dirty.add(served.session_id)
        if not self._changed:  # else already noted: the data path's common case, without a call
            self._note_change()

    def _note_change(self, *, membership: bool = False) -> None:
        if membership and not self._membership:
            self._membership = True
            self._membership_event.set()
        if not self._changed:
            self._changed = True
            self._changed_event.set()

    def _refresh(self, served: ServedSession, now: float) -> None:
        peer = PeerStatus.of(served, now=now)
        self._peer_status[served.session_id] = peer
        self._session_rows[served.session_id] = (peer.snapshot, peer.name, str(peer.address))

    def _now(self) -> float:
        return max(self._last_now, trio.current_time())

    def peer_statuses(self) -> tuple[PeerStatus, ...]:
        """Every session's status taken now, in the order of ``sessions``: O(sessions), for a status request."""
        now = self._now()
        return tuple(PeerStatus.of(served, now=now) for served in self.sessions.values())

    def _publish(self) -> None:
        """Publish the aggregate status: the dirty sessions' statuses are taken again, the others kept."""
        now = self._now()
        for session_id in self._dirty:
            served = self.sessions.get(session_id)
            if served is not None:
                self._refresh(served, now)
        self._dirty.clear()
        self._changed = self._membership = False
        self._published_at = trio.current_time()
        self.status.value = GatewayStatus(
            sessions=tuple(self._session_rows.values()),
            statistics=self.statistics(),
            peers=tuple(self._peer_status.values()),
            tunnel=str(self.tunnel),
            tunnel6=str(self.tunnel6) if self.tunnel6 is not None else None,
        )

    async def _publish_changes(self) -> None:
        """Publish when something changed: sessions started or ended soon, other changes per interval."""
        while True:
            if not self._changed:
                self._changed_event = trio.Event()
                await self._changed_event.wait()
                continue
            if not self._membership:
                self._membership_event = trio.Event()
                with trio.move_on_at(self._published_at + STATUS_INTERVAL_S):
                    await self._membership_event.wait()
            await trio.sleep_until(self._published_at + STATUS_MEMBERSHIP_GAP_S)
            if self._changed:  # else close_all_nowait() has just published it
                self._publish()

    def _send(self, served: ServedSession, addr: Address, msg_type: wire.MessageType, plaintext: bytes) -> None:
        port = served.port_for(addr, control=msg_type not in wire.DATA_TYPES)
        if port is None:
            self._counts.send_no_port += 1
            return
        try:
            datagram = served.channel.seal(msg_type, plaintext)
        except KeyExhausted:
            self._counts.keys_exhausted += 1
            self.submit_nowait(served.session_id, ev.KeysExhausted())
            return
        port.send_nowait(datagram, addr)

    # -- receiving ------------------------------------------------------------------------------
    async def _receive(self, port: DatagramPort) -> None:
        """Feed ``port``'s datagrams in, each with the port to answer it by.

        A wildcard listener (``udp.PathSocket.recv_batch_routed``) names, per
        datagram, a port that sends from the local address it reached; that is
        what the handshake response uses and what the session learns for the
        endpoint, so a multi-homed gateway answers from the address the client
        sent to (udp.py, "Answering").  Other ports answer by themselves.
        """
        routed: Callable[[int], Awaitable[list[tuple[bytes, Address, DatagramPort]]]] | None
        routed = getattr(port, "recv_batch_routed", None)
        if routed is None:
            while True:
                batch = await port.recv_batch(BATCH)
                await self._feed_datagrams([(data, addr, port) for data, addr in batch], trio.current_time())
                self._flush_delivered()
        while True:
            routed_batch = await routed(BATCH)
            await self._feed_datagrams(routed_batch, trio.current_time())
            self._flush_delivered()

    async def _feed_datagrams(self, batch: Sequence[tuple[bytes, Address, DatagramPort]], now: float) -> None:
        """One read's datagrams, in order: each run of DATA from one endpoint to one receiver index at once.

        A GRO buffer, or a burst from one client, is such a run.  It costs one session
        lookup, one alive check and one :meth:`SecureChannel.open_data_batch` call
        instead of one of each per datagram (docs/benchmarks.md, "Opening DATA in runs").
        Anything else, and a run :meth:`_on_data_run_nowait` declines, goes one by one.
        """
        is_data, start_of, end_of = wire.is_data_untrusted, wire.RECEIVER_INDEX_OFFSET, wire.RECEIVER_INDEX_END
        count, start = len(batch), 0
        while start < count:
            data, addr, reply = batch[start]
            stop = start + 1
            if is_data(data):
                index = data[start_of:end_of]
                while stop < count:
                    other, other_addr, other_reply = batch[stop]
                    if other_reply is not reply or other_addr != addr or other[start_of:end_of] != index or not is_data(other):
                        break
                    stop += 1
                if self._on_data_run_nowait(reply, [item[0] for item in batch[start:stop]], addr, now):
                    start = stop
                    continue
            for data, addr, reply in batch[start:stop]:
                if not self._on_data_nowait(reply, data, addr, now):
                    await self._on_datagram(reply, data, addr, now)
            start = stop

    def _flush_delivered(self) -> None:
        """Write what a received batch delivered, in one go (:class:`DeliveryBuffer`)."""
        if self._packets is not None:
            self._counts.rx_tun_full += self._delivered.flush(self._packets)

    def _on_data_nowait(self, port: DatagramPort, data: bytes, addr: Address, now: float) -> bool:
        """The DATA fast path, without a coroutine: what :meth:`_on_datagram` does for DATA, when no await is due.

        True when the datagram was taken (delivered, or dropped and counted).  False, before
        anything changed, for every datagram that is not DATA to a known session or whose
        session is due an alive report (which awaits the inbox): :meth:`_on_datagram` takes those.
        """
        return wire.is_data_untrusted(data) and self._on_data_run_nowait(port, [data], addr, now)

    def _on_data_run_nowait(self, port: DatagramPort, run: list[bytes], addr: Address, now: float) -> bool:
        """:meth:`_on_data_nowait` for DATA datagrams from ``addr`` that all name the receiver index of the first.

        Declines (False, nothing changed) as the first datagram alone would be declined;
        nothing the run does can change that answer for the datagrams after it.
        """
        first = run[0]
        if len(first) < wire.TRANSPORT_HEADER_LEN:
            return False
        served = self._by_index.get(_RECEIVER_INDEX.unpack_from(first, wire.RECEIVER_INDEX_OFFSET)[0])
        if served is None or self._alive_would_be_due(served, addr, served.paths.get(addr, served.init_path), now):
            return False
        opened = served.channel.open_data_batch(run, now=now)
        for reason in opened.drops:  # DATA is not a reported drop type: counted only
            self._count_reason(CHANNEL_DROP_COUNTERS, reason, "drop_other")
        if opened.packets:
            self._opened(served)
            served.learn_data_port(addr, port)
            self._on_data(served, opened.packets, addr, now)
        return True

    def _opened(self, served: ServedSession) -> None:
        """A datagram of ``served`` authenticated: index its keys if the ring changed, mark its status stale."""
        if served.channel.generation != served.indexed_generation:
            self._index_keys(served)
        self._touch(served)  # bytes carried, or a key confirmed: its status changed

    async def _on_datagram(self, port: DatagramPort, data: bytes, addr: Address, now: float) -> None:
        try:
            msg_type = wire.peek_type_untrusted(data)
        except wire.BadFrame:
            self._counts.drop_malformed += 1
            return
        if msg_type is wire.MessageType.HANDSHAKE_INIT:
            self._on_init(port, data, addr, now)
            return
        if msg_type is wire.MessageType.HANDSHAKE_RESP:
            self._counts.drop_unexpected_handshake_resp += 1
            return
        try:
            served = self._by_index.get(wire.peek_receiver_index_untrusted(data))
        except wire.BadFrame:
            served = None
        if served is None:
            self._counts.drop_unknown_index += 1
            return
        try:
            opened = served.channel.open_untrusted(data, now=now)
        except ChannelDrop as drop:
            self._count_reason(CHANNEL_DROP_COUNTERS, drop.reason, "drop_other")
            if msg_type in REPORTED_DROP_TYPES:
                self._report_drop(served, drop.reason, addr, msg_type, now)
            return
        self._opened(served)
        if opened.msg_type in wire.DATA_TYPES:  # no message object; an await only for an alive report
            served.learn_data_port(addr, port)
            path = served.paths.get(addr, served.init_path)
            if self._alive_due(served, addr, path, now):
                await self._report_alive(served, addr, path, now)
            self._on_data(served, [wire.data_packet(opened.msg_type, opened.plaintext)], addr, now)
            return
        try:
            message = wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext)
        except wire.BadFrame:
            self._counts.drop_malformed_plaintext += 1
            return
        await self._on_message(served, port, message, addr, now)

    def _on_data(self, served: ServedSession, packets: list[bytes], addr: Address, now: float) -> None:
        """Authenticated DATA packets from ``addr`` (already learnt and reported alive): to the TUN if bound."""
        count = len(packets)
        if not served.core.accepts_data_from(addr):
            self._counts.stray_data += count
            return
        if not self._lease_valid(now):  # held, not served, until the lease is proven again
            self._counts.drop_lease_unproven += count
            return
        size = sum(map(len, packets))
        self._counts.rx_packets += count
        self._counts.rx_bytes += size
        served.rx_packets += count
        served.rx_bytes += size
        if self._packets is not None:
            self._delivered.extend(packets)

    async def _on_message(
        self, served: ServedSession, port: DatagramPort, message: wire.InnerMessage, addr: Address, now: float
    ) -> None:
        """An authenticated control message: the session core's input, or a stateless reply."""
        match message:
            case wire.Probe() as probe:
                served.learn(addr, port, probe.path_id, control=True)
                await self._alive(served, addr, probe.path_id, now)
                ack = wire.ProbeAck(
                    path_id=probe.path_id,
                    seq=probe.seq,
                    echo_sent_us=probe.sent_us,
                    gateway_state_version=served.core.record.version,
                    bound_path_id=served.core.bound_path_seen_from(addr),
                )
                self._send(served, addr, wire.MessageType.PROBE_ACK, wire.encode_probe_ack_plaintext(ack))
            case wire.Reattach() as req:
                served.learn(addr, port, req.path_id, control=True)
                limiter, nursery = self._store_calls, self._nursery
                if limiter is None or nursery is None:
                    await self._reattach_read(served.session_id, req, addr, now)
                    return
                try:
                    limiter.acquire_nowait()
                except trio.WouldBlock:  # every slot waits for the store: deny now rather than stall the port
                    self._counts.reattach_store_busy += 1
                    await self._inbox_send.send(
                        (now, served.session_id, self._reattach_event(req, addr, None, ReasonCode.STORE_UNAVAILABLE))
                    )
                    return
                nursery.start_soon(
                    self._store_task, limiter, lambda: self._reattach_read(served.session_id, req, addr, now)
                )
            case wire.PathResponse() as echo:
                served.learn(addr, port, echo.path_id, control=True)
                response = ev.PathResponseReceived(
                    endpoint=addr, path=echo.path_id, nonce=echo.nonce, challenge=echo.challenge
                )
                await self._inbox_send.send((now, served.session_id, response))
            case wire.Close() as close:
                await self._inbox_send.send((now, served.session_id, ev.PeerClosed(reason=close.reason)))
            case _:  # messages only a gateway sends
                self._counts.drop_unexpected_type += 1

    async def _reattach_read(self, session_id: SessionId, req: wire.Reattach, addr: Address, now: float) -> None:
        """Read the session's record, then hand the REATTACH and what was read to the core."""
        ownership, store_failure = await self._read_ownership(session_id, now)
        await self._inbox_send.send((now, session_id, self._reattach_event(req, addr, ownership, store_failure)))

    @staticmethod
    def _reattach_event(
        req: wire.Reattach, addr: Address, ownership: OwnershipRecord | None, store_failure: ReasonCode | None
    ) -> ev.ReattachReceived:
        return ev.ReattachReceived(
            session_id=req.session_id,
            path=req.path_id,
            endpoint=addr,
            nonce=req.nonce,
            client_ts_ms=req.client_ts_ms,
            expected_version=req.expected_version,
            proof_valid=True,
            ownership=ownership,
            metadata=req.metadata,
            store_failure=store_failure,
        )

    async def _read_ownership(
        self, session_id: SessionId, now: float
    ) -> tuple[OwnershipRecord | None, ReasonCode | None]:
        """The session's record for a reattach, or why there is no certain one (the core denies then)."""
        if not self._lease_valid(now):
            return None, ReasonCode.STORE_UNAVAILABLE
        try:
            return await self._store.read(session_id), None
        except StoreError as exc:
            self._counts.reattach_store_unavailable += 1
            return None, store_failure_reason(exc)

    async def _alive(self, served: ServedSession, addr: Address, path: PathId | None, now: float) -> None:
        """Tell the core the session is alive: at once while unconfirmed, then coalesced per interval."""
        if self._alive_due(served, addr, path, now):
            await self._report_alive(served, addr, path, now)

    def _alive_due(self, served: ServedSession, addr: Address, path: PathId | None, now: float) -> bool:
        """Whether the core is to hear now that ``served`` is alive; if so, the report is noted as made.

        Synchronous, so the DATA path pays a coroutine only for the few packets that are news.
        """
        if not self._alive_would_be_due(served, addr, path, now):
            return False
        served.last_alive_report = now
        return True

    def _alive_would_be_due(self, served: ServedSession, addr: Address, path: PathId | None, now: float) -> bool:
        """:meth:`_alive_due` without noting anything: at once while unconfirmed, else once per probe interval."""
        if path is None:
            return False
        core = served.core
        return core.awaiting_confirmation or (
            now - served.last_alive_report >= self.policy.probe_interval_ms / 1000.0 and core.accepts_data_from(addr)
        )

    async def _report_alive(self, served: ServedSession, addr: Address, path: PathId | None, now: float) -> None:
        assert path is not None  # _alive_due said so
        await self._inbox_send.send((now, served.session_id, ev.PacketAuthenticated(endpoint=addr, path=path)))

    def _report_drop(
        self, served: ServedSession, reason: ReasonCode, addr: Address, msg_type: wire.MessageType, now: float
    ) -> None:
        """Tell the core about a forged REATTACH or CLOSE, unless junk already fills the inbox: never waits."""
        if self._inbox_send.statistics().current_buffer_used >= INBOX_CAPACITY * DROP_REPORT_INBOX_SHARE:
            self._counts.reports_shed += 1
            return
        try:
            self._inbox_send.send_nowait((now, served.session_id, ev.FrameDropped(reason=reason, endpoint=addr, frame=msg_type.name)))
        except trio.WouldBlock:
            self._counts.reports_shed += 1

    def _index_keys(self, served: ServedSession) -> None:
        served.indexed_generation = served.channel.generation
        for index in served.channel.keyring.local_indices():
            self._by_index.setdefault(index, served)

    # -- handshakes -------------------------------------------------------------------------------
    def _lookup_peer(self, public: bytes) -> PeerRecord | None:
        peer = self._peers.get(public)
        if peer is None:
            return None
        return PeerRecord(public=peer.public, last_timestamp=peer.last_timestamp)

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._random_bytes(4), "big")
            if index not in self._by_index:
                return index

    def _on_init(self, port: DatagramPort, data: bytes, addr: Address, now: float) -> None:
        """A HANDSHAKE_INIT in the receive loop: mac1, the gate's verdict, and at most a queue slot."""
        if self._gate.shed(len(data), now=now):
            self._counts.handshake_cookie_limited += 1
            return
        if not init_mac1_ok(data, self._static):
            self._counts.handshake_bad_mac += 1
            return
        verdict = self._gate.admit(data, addr[0], addr[1], queued=self._inits_queued, now=now)
        if verdict is Verdict.ACCEPT:
            try:
                self._inits_send.send_nowait((port, data, addr))
                self._inits_queued += 1
            except trio.WouldBlock:
                self._counts.handshake_queue_full += 1
        elif verdict is Verdict.COOKIE:
            nonce = self._random_bytes(wire.COOKIE_NONCE_LEN)
            port.send_nowait(self._gate.cookie_reply(data, addr[0], addr[1], nonce=nonce, now=now), addr)
            self._counts.handshake_cookie_reply += 1
        elif verdict is Verdict.SOURCE_LIMITED:
            self._counts.handshake_source_limited += 1
        else:
            self._counts.handshake_cookie_limited += 1

    async def _handshake_worker(self) -> None:
        """The DH work of queued inits, one at a time, within the gate's budget per second."""
        async for port, data, addr in self._inits:
            self._inits_queued -= 1
            delay = self._gate.work_delay(now=trio.current_time())
            if delay > 0:
                await trio.sleep(delay)
            await self._on_handshake(port, data, addr, trio.current_time())

    async def _on_handshake(self, port: DatagramPort, data: bytes, addr: Address, now: float) -> None:
        try:
            init = wire.decode_handshake_init_untrusted(data)
            hs = ResponderHandshake.consume_init(init, self._static, lookup_peer=self._lookup_peer)
        except wire.BadFrame:
            self._counts.handshake_malformed += 1
            return
        except HandshakeError as exc:
            self._count_reason(HANDSHAKE_ERROR_COUNTERS, exc.reason, "handshake_other")
            return
        peer = self._peers[hs.peer_public]
        peer.last_timestamp = hs.timestamp
        if hs.rekey_session is not None:
            if hs.rekey_session in self.sessions:
                self._on_rekey(hs, peer, port, addr, now)
            else:
                rekey_session = hs.rekey_session
                await self._with_store(lambda: self._take_over(hs, rekey_session, peer, port, addr, now))
            return
        admission = self._admissions.admit(peer.public, session_id=SessionId.generate(self._random_bytes))
        await self._with_store(lambda: self._settle(admission, hs, peer, port, addr, now))

    async def _with_store(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` (it calls the store) here, or in a task of its own once a call slot is free."""
        limiter, nursery = self._store_calls, self._nursery
        if limiter is None or nursery is None:
            await work()
            return
        await limiter.acquire()  # backpressure: the init queue fills, and the handshake gate sheds
        nursery.start_soon(self._store_task, limiter, work)

    @staticmethod
    async def _store_task(limiter: trio.Semaphore, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        finally:
            limiter.release()

    async def _take_over(
        self,
        hs: ResponderHandshake,
        session_id: SessionId,
        peer: GatewayPeer,
        port: DatagramPort,
        addr: Address,
        now: float,
    ) -> None:
        """A handshake resuming a session this gateway does not serve: take it over if its ticket allows.

        Only the peer the store's ticket names may resume the session, only its latest one, and
        only where it keeps its tunnel address (``ownership.judge_takeover``); the claim itself
        succeeds only once the old owner is gone (docs/cluster.md, "Takeover").  Anything else is
        counted and gets no answer, as an unknown rekey always did.
        """
        fingerprint = peer_fingerprint(peer.public)
        try:
            if not self._lease_valid(trio.current_time()):
                raise StoreUnavailable("the lease is not proven alive")
            ticket = await self._store.read_ticket(fingerprint)
        except StoreError as exc:  # fail closed: no takeover without a certain ticket
            self._counts.takeover_store_unavailable += 1
            self._emit_store_denial(session_id, store_failure_reason(exc), f"takeover: {exc.reason}")
            return
        verdict = judge_takeover(
            ticket, peer=fingerprint, session_id=session_id, address=self._admissions.configured_address(peer.public)
        )
        if ticket is None or verdict is not TakeoverVerdict.ALLOWED:
            self._count(TAKEOVER_COUNTERS[verdict])
            self._counts.rekey_unknown_session += 1
            return
        admission = self._admissions.adopt(peer.public, session_id=session_id, ticket_revision=ticket.revision)
        await self._settle(admission, hs, peer, port, addr, now, taken_from=ticket.owner)

    async def _settle(
        self,
        admission: Admit | Refuse,
        hs: ResponderHandshake,
        peer: GatewayPeer,
        port: DatagramPort,
        addr: Address,
        now: float,
        *,
        taken_from: str | None = None,
    ) -> None:
        """Carry an admission out: claim it in the store, start the session, retire the one it replaces."""
        if isinstance(admission, Refuse):
            self._count(REFUSAL_COUNTERS[admission.reason])
            return
        claimed = await self._claim(admission, peer)
        previous = self.sessions.get(admission.replaces) if admission.replaces is not None else None
        if isinstance(claimed, Refuse):
            self._count(REFUSAL_COUNTERS[claimed.reason])
            if previous is None or claimed.restored == previous.session_id:
                return  # a handshake the store did not confirm ends nobody
        if previous is not None:
            self._unroute(previous)  # not one more packet from the TUN for it
        if not isinstance(claimed, Refuse):
            self._start_session(hs, peer, port, addr, claimed, now, taken_from=taken_from)
        if previous is not None:  # replaced, or (a reload removed its peer meanwhile) gone with its successor
            removed = isinstance(claimed, Refuse) and claimed.reason is Refusal.PEER_REMOVED
            await self._retire(previous, now, ReasonCode.PEER_REMOVED if removed else ReasonCode.SESSION_REPLACED)

    async def _retire(self, previous: ServedSession, now: float, reason: ReasonCode) -> None:
        """End a session its peer replaced (already unrouted): close it through the supervisor.

        The core ends it with ``reason`` (SESSION_REPLACED) and sends CLOSE(reason)
        on its binding, sealed with its own keys, which stay until it is reaped.
        This comes after the new session's HANDSHAKE_RESP has left, so a client
        that replaced its own session (the agent's rescue) normally hears its
        answer first; its agent copes with the other order too (drivers/agent.py).
        """
        session_id = previous.session_id
        if not previous.core.terminated:
            await self._inbox_send.send((now, session_id, ev.CloseRequested(reason=reason)))

    async def _claim(self, admission: Admit, peer: GatewayPeer) -> Claimed | Refuse:
        """Write the admission's ownership claim (with the peer's ticket) and let the core judge the store's answer."""
        claim = admission.claim
        ticket = SessionTicket(
            peer=peer_fingerprint(peer.public),
            session_id=claim.session_id,
            owner=claim.owner,
            address=admission.address,
            address6=admission.address6,
            revision=claim.ticket_revision or ABSENT_REVISION,
        )
        try:
            if not self._lease_valid(trio.current_time()):
                raise StoreUnavailable("the lease is not proven alive")
            if claim.ticket_revision is None:
                result = await self._store.claim(
                    claim.session_id, claim.owner, expected_revision=claim.expected_revision, ticket=ticket
                )
            else:
                result = await self._store.take_over(ticket, claim.owner)
        except StoreError as exc:  # fail closed: no session without a certain claim
            failure = store_failure_reason(exc)
            self._emit_store_denial(claim.session_id, failure, exc.reason)
            return self._admissions.abandon_claim(claim.session_id, failure)
        return self._admissions.settle_claim(claim.session_id, succeeded=result.succeeded, record=result.record)

    def _emit_store_denial(self, session_id: SessionId, reason: ReasonCode, why: str) -> None:
        """A handshake refused for the store: a SECURITY_EVENT for the session that was not created."""
        self._emit(
            EmitEvent(
                kind=EventKind.SECURITY_EVENT,
                t=trio.current_time(),
                role=Role.GATEWAY,
                session=session_id.hex,
                version=0,
                reason=reason,
                policy=self.policy.fingerprint,
                details={"why": f"handshake refused: {why}"},
            )
        )

    def _start_session(
        self,
        hs: ResponderHandshake,
        peer: GatewayPeer,
        port: DatagramPort,
        addr: Address,
        claimed: Claimed,
        now: float,
        *,
        taken_from: str | None = None,
    ) -> None:
        """Create the session's core and answer the handshake.

        ``taken_from``: a takeover from that gateway.  The session then starts unbound at the
        version the client holds (its init says which), and the client reattaches to it, as
        after any loss of its path; a new session starts in BIRTH, bound where the handshake
        came from once the client confirms.
        """
        session_id = claimed.session_id
        if taken_from is None:
            takeover = None
            binding: Binding | None = Binding(path=hs.path_id, endpoint=addr)
        else:
            takeover = Takeover(version=hs.state_version, previous_owner=taken_from, endpoint=addr)
            binding = None
        core = GatewaySession(
            policy=self.policy,
            session_id=session_id,
            now=now,
            node_id=self.node_id,
            held_revision=claimed.held_revision,
            handshake_binding=binding,
            taken_over=takeover,
        )
        resp, result = hs.respond(
            session_id=session_id,
            # a new session: the version it will have once the client confirms; a takeover: the client's own
            state_version=core.record.version + (1 if takeover is None else 0),
            owner_epoch=claimed.held_revision,  # the fencing epoch (docs/cluster.md)
            tunnel_ipv4=claimed.address,
            prefix_len=self.tunnel.network.prefixlen,
            sender_index=self._new_index(),
            random_bytes=self._random_bytes,
            **self._ipv6_fields(claimed.address6),
        )
        channel = SecureChannel(self.policy)
        channel.install_next(result.keypair(created_at=now))
        served = ServedSession(
            core=core, channel=channel, peer=peer, address=claimed.address, address6=claimed.address6, init_path=hs.path_id
        )
        served.learn(addr, port, hs.path_id, control=True)
        self.sessions[session_id] = served
        self._route(served)
        self._index_keys(served)
        self._schedule(served)
        self._refresh(served, now)  # in ``sessions`` order from the start
        self._note_change(membership=True)
        created = core.creation_events()
        if self._recorder is not None:
            start = SessionStart(
                side="gateway",
                now=now,
                session=session_id.hex,
                policy=self.policy.to_mapping(),
                node_id=self.node_id,
                held_revision=claimed.held_revision,
                handshake_binding=core.handshake_binding,
                taken_over=takeover,
            )
            self._recorder.started(start, created)
        for action in created:
            if isinstance(action, EmitEvent):
                self._emit(action)
        port.send_nowait(wire.encode_handshake_resp(resp), addr)
        if takeover is None:
            self._counts.sessions_created += 1
        else:
            self._counts.takeovers += 1

    def _ipv6_fields(self, address6: ipaddress.IPv6Address | None) -> dict[str, Any]:
        """The response's IPv6 fields for a session holding ``address6`` (none without one)."""
        if address6 is None or self.tunnel6 is None:
            return {}
        return {"tunnel_ipv6": address6, "prefix_len6": self.tunnel6.network.prefixlen}

    def _on_rekey(self, hs: ResponderHandshake, peer: GatewayPeer, port: DatagramPort, addr: Address, now: float) -> None:
        served = self.sessions.get(hs.rekey_session) if hs.rekey_session else None
        if served is None or served.peer is not peer or served.core.terminated:
            self._counts.rekey_unknown_session += 1
            return
        resp, result = hs.respond(
            session_id=served.session_id,
            state_version=served.core.record.version,
            owner_epoch=served.core.held_revision,
            tunnel_ipv4=served.address,
            prefix_len=self.tunnel.network.prefixlen,
            sender_index=self._new_index(),
            random_bytes=self._random_bytes,
            **self._ipv6_fields(served.address6),
        )
        before = served.channel.keyring.local_indices()
        served.channel.install_next(result.keypair(created_at=now))
        for index in before - served.channel.keyring.local_indices():
            self._by_index.pop(index, None)
        self._index_keys(served)
        served.learn(addr, port, hs.path_id, control=True)
        port.send_nowait(wire.encode_handshake_resp(resp), addr)
        self._counts.rekeys += 1

    # -- the TUN side ---------------------------------------------------------------------------
    async def _pump_packets(self, packets: PacketPort) -> None:
        """TUN -> sessions: seal each packet for the session holding its destination, batch per binding."""
        while True:
            outgoing: dict[int, tuple[ServedSession, Address, list[bytes]]] = {}
            batch = await packets.read_batch(BATCH)
            if not self._lease_valid(trio.current_time()):  # held, not served, until the lease is proven again
                self._counts.tx_lease_unproven += len(batch)
                continue
            for packet in batch:
                try:
                    destination = wire.ip_destination_untrusted(packet)
                except wire.BadFrame:
                    self._counts.tx_not_ipv4 += 1
                    continue
                served = self._by_address.get(destination)
                binding = served.core.record.binding if served is not None else None
                if served is None or binding is None:
                    self._counts.tx_no_binding += 1
                    continue
                entry = outgoing.get(id(served))
                if entry is None:
                    entry = outgoing[id(served)] = (served, binding.endpoint, [])
                entry[2].append(packet)
            for served, endpoint, plain in outgoing.values():
                datagrams = served.channel.seal_data_batch(plain)  # one sealing loop per session and batch
                if len(datagrams) < len(plain):  # the keys ran out: the rest is dropped, the core told once
                    self._counts.keys_exhausted += len(plain) - len(datagrams)
                    self.submit_nowait(served.session_id, ev.KeysExhausted())
                    if not datagrams:
                        continue
                    plain = plain[: len(datagrams)]
                carried = sum(map(len, plain))
                self._counts.tx_packets += len(datagrams)
                self._counts.tx_bytes += carried
                served.tx_packets += len(datagrams)
                served.tx_bytes += carried
                self._touch(served)
                port = served.port_for(endpoint, control=False)
                if port is None:
                    self._counts.send_no_port += len(datagrams)
                    continue
                for run in equal_size_runs(datagrams):
                    port.send_segments_nowait(run, endpoint)
