"""The client runtime: one supervisor task owns the session core; the rest move bytes.

Theory of operation
-------------------
A runtime serves exactly one session.  :meth:`ClientRuntime.run` either
handshakes first (on the paths a
:class:`~jvpn_trio.core.connect.HandshakePlanner` names, each until the
deadline it gives) or adopts a handshake already completed (``adopt``: the
agent's rescue, ``drivers/agent.py``), gives the long-lived packet port
(the TUN) its address through ``set_address``, and starts, in one nursery:

- the **supervisor** (:meth:`_supervise`): the only caller of the
  :class:`ClientSession`.  It reads ``(observed_at, input)`` pairs from one
  bounded inbox, calls ``handle(input, now=observed_at)`` (never earlier than
  the previous call), re-arms its timer from ``next_deadline()`` and carries
  out the actions.  Binding changes are a swap of one reference,
  ``self._active``: there is never a second one to forget;
- one **receiver** per path: authenticates what arrives (``SecureChannel``),
  writes DATA to the TUN (before any other work), and turns control
  messages into inputs;
- one **prober** per path: an authenticated PROBE every ``probe_interval_ms``
  (``trio_util.periodic``); ``ProbeSent`` is queued *before* the datagram
  leaves so an ACK can never overtake it;
- the **TUN pump**: packets from the OS are sealed and sent on the active
  path, or dropped and counted while there is none;
- the **rekeyer**: a new handshake on the active path before the keys age
  out; the SessionID does not change (Property 5).

The path set is mutable (:meth:`ClientRuntime.add_path`,
:meth:`~ClientRuntime.remove_path`, :meth:`~ClientRuntime.readdress_path`):
before the session starts a change only edits the set; while it runs, the
session gets ``PathAdded`` / ``PathRemoved`` / ``PathReaddressed`` through the
inbox (so in order with everything else) and the path's receiver and prober
start, stop or restart on the new socket, each pair in a cancel scope of its
own.  An action naming a path that has left the set is skipped: the
``PathRemoved`` already queued releases it in the core.

While the session runs, :meth:`ClientRuntime.rescue` may try a *fresh*
handshake (no ``rekey_session``) on the same sockets; the receivers hand
every HANDSHAKE_RESP to the pending handshake its receiver index names.

A path socket that raises OSError (the interface was deleted, the network
is down ...) is that path's news, never the program's: it is counted, fed
to the core as ``LinkChanged(up=False)``, logged at most once per
:data:`PATH_ERROR_LOG_INTERVAL_S`, and the socket is tried again every
``handshake_retry_ms``; the first datagram it delivers again reports the
link up.

Inputs are stamped when observed, not when processed, so RTTs are measured
where the bytes moved and a recorded trace replays exactly.

Status: a ``RuntimeStatus`` (the core's snapshot, a frozen copy of every
counter) costs too much to build after every input.  What a watcher waits on
is published at once: the session record, a pending REATTACH, the path set,
the tunnel address, the session's start and end, and the outcome of the
inputs in :data:`PUBLISHED_AT_ONCE`.  Anything else (counters, path health,
probe RTTs) marks the status stale, and a task of its own publishes it at
most once per :data:`~jvpn_trio.drivers.control.STATUS_INTERVAL_S`, as the
gateway does.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Callable, Protocol

import attrs
import trio
import trio_util

from jvpn_trio import config
from jvpn_trio.core import events as ev
from jvpn_trio.core import wire
from jvpn_trio.core.actions import (
    Action,
    BindTransport,
    EmitEvent,
    ReleaseTransport,
    SendClose,
    SendPathResponse,
    SendReattach,
    Terminate,
)
from jvpn_trio.core.agent import SessionSeed
from jvpn_trio.core.channel import ChannelDrop, SecureChannel
from jvpn_trio.core.connect import (
    HandshakeCandidate,
    HandshakeGiveUp,
    HandshakePlanner,
    HandshakeStep,
)
from jvpn_trio.core.cookie import open_cookie_reply
from jvpn_trio.core.ids import Binding, PathId, RandomBytes
from jvpn_trio.core.keyring import KeyExhausted
from jvpn_trio.core.noise import (
    HandshakeError,
    HandshakeResult,
    InitiatorHandshake,
    StaticKeypair,
    add_mac2,
)
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import ClientSession, ClientSnapshot
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.core.trace import SessionStart
from jvpn_trio.drivers.control import STATUS_INTERVAL_S
from jvpn_trio.drivers.log import LineLimiter, stderr_line
from jvpn_trio.drivers.ports import Address, DatagramPort, DeliveryBuffer, PacketPort, equal_size_runs, shed_oldest_data
from jvpn_trio.drivers.recording import Recorder

#: How many datagrams / packets one wake-up handles before yielding.
BATCH = 64
#: A client behind a flood (a 4 MiB receive buffer holds ~14 k small datagrams, a second of
#: work) would read its PROBE_ACKs and REATTACH_ACKs a second late, and the session flapped and
#: ended (docs/benchmarks.md, "A UDP flood towards the client").  So once reads have come back
#: full for RX_SWEEP_AFTER datagrams in a row, one read looks RX_READ_AHEAD ahead (a datagram
#: costs ~1.5 µs to read, ~40 to open), keeps every control frame and opens only the newest
#: RX_BACKLOG_DATA of the DATA; the older DATA is dropped unopened (``rx_backlog_shed``).
#: Reads stay BATCH-sized otherwise: always reading far ahead cost a CPU-bound TCP download
#: ~10 % (measured), the long reads' bytes no longer in cache when opened.  With these values a
#: CLOSE behind 14 k DATA is read within ``probe_timeout_ms`` (200 ms) at 40 µs an open
#: (tests/drivers/test_runtime_memory.py).
RX_BACKLOG_DATA = 1024
RX_READ_AHEAD = 4 * RX_BACKLOG_DATA
RX_SWEEP_AFTER = RX_BACKLOG_DATA // 4
#: Inbox depth: inputs waiting for the supervisor.  Producers wait when it is full (backpressure).
INBOX_CAPACITY = 4096
#: A failing path socket is logged at most this often (every failure is counted).
PATH_ERROR_LOG_INTERVAL_S = 10.0
#: Inputs whose outcome is published at once, whatever they changed: news of the path set
#: (rare), and requests whose asker looks at the status next (a person's key; the agent's
#: rescuer after a resume, drivers/agent.py ``_resumed``).  The frequent ones wait (:meth:`ClientRuntime._feed`).
PUBLISHED_AT_ONCE = (
    ev.PathAdded,
    ev.PathRemoved,
    ev.PathReaddressed,
    ev.PathCostChanged,
    ev.LinkChanged,
    ev.PinRequested,
    ev.ReevaluateRequested,
)
#: The seed of a runtime that is not part of an agent's chain.
FIRST_SEED = SessionSeed(number=1, previous_session=None, switch_times=())

#: Gives the TUN the session's tunnel addresses: IPv4, and IPv6 when the gateway's tunnel carries it.
SetAddress = Callable[[ipaddress.IPv4Interface, ipaddress.IPv6Interface | None], Awaitable[None]]


class HandshakeFailed(Exception):
    """The gateway did not complete a handshake on any path in time."""

    def __init__(self, message: str, *, last_attempt_at: float | None = None) -> None:
        super().__init__(message)
        self.last_attempt_at = last_attempt_at  # when the last init of the round left


class HandshakePlan(Protocol):
    """Where and until when to try a handshake (``HandshakePlanner``, ``core.agent.HandshakeRound``)."""

    def next_attempt(self, *, now: float) -> HandshakeStep: ...

    def link_changed(self, path: PathId, *, up: bool) -> None: ...


@attrs.frozen(kw_only=True)
class Handshaken:
    """A completed handshake, not yet a session: what :meth:`ClientRuntime.run` may adopt."""

    result: HandshakeResult
    path: PathId
    at: float  # when the response authenticated


def _default_control(path: ClientPath) -> Address:
    return config.control_endpoint(path.gateway, config.DEFAULT_CONTROL_PORT_OFFSET)


@attrs.frozen(kw_only=True)
class ClientPath:
    """One local interface towards the gateway.

    Data goes to ``gateway``; handshakes, probes, REATTACH and CLOSE go to
    ``control``, a socket of the gateway's own so that a data flood cannot
    drown the probes that tell whether the path is alive.  Both are sent from
    ``port``, so the gateway sees one endpoint per path either way.
    """

    path: PathId
    name: str
    kind: str
    priority: int
    port: DatagramPort
    gateway: Address  # the gateway's data endpoint, as reached over this path
    control: Address = attrs.field(default=attrs.Factory(_default_control, takes_self=True))
    link_up: bool = True  # the interface's state when the runtime starts (netlink), later LinkChanged
    metered: bool = False  # its bytes cost money: chosen last, probed least (docs/policy.md, "Probing")

    def is_gateway(self, addr: Address) -> bool:
        return addr == self.gateway or addr == self.control


_NO_COUNTS: Mapping[ReasonCode, int] = MappingProxyType({})


def _or_never(due: float | None) -> float:
    return math.inf if due is None else due


@attrs.frozen(kw_only=True)
class ClientStatistics:
    """The client driver's counters at one moment (the session core keeps its own in its snapshot).

    The mapping fields count by reason; a status report names each entry
    ``<field>_<reason>`` (``drop_replayed_counter``), the other fields by their names.
    """

    tx_packets: int = 0  # packets from the TUN, sealed and sent on the active path
    tx_bytes: int = 0
    tx_dropped_unbound: int = 0  # packets from the TUN while no path was bound
    rx_packets: int = 0  # DATA delivered to the TUN (keepalives included)
    rx_bytes: int = 0
    rx_tun_full: int = 0  # delivered packets the TUN could not take
    rx_backlog_shed: int = 0  # DATA dropped unopened: a read found more waiting than RX_BACKLOG_DATA
    handshake_sent: int = 0  # HANDSHAKE_INITs of fresh handshakes (not rekeys)
    handshake_stray: int = 0  # responses to no handshake of ours
    cookie_replies: int = 0  # COOKIE_REPLYs taken: the gateway was under load, the init went again with mac2
    handshake: Mapping[ReasonCode, int] = attrs.field(default=_NO_COUNTS, hash=False)  # responses refused
    rekeys: int = 0
    reattach_sent: int = 0
    keys_exhausted: int = 0  # seals refused because the keys are used up
    inbox_full: int = 0  # inputs from outside dropped because the supervisor's inbox was full
    stray_source: int = 0  # datagrams on a path socket from anyone but the gateway
    drop: Mapping[ReasonCode, int] = attrs.field(default=_NO_COUNTS, hash=False)  # datagrams not opened
    drop_malformed_plaintext: int = 0  # authenticated, but the message inside does not parse
    unexpected_type: int = 0  # authenticated messages only a gateway receives
    path_errors: Mapping[str, int] = attrs.field(default=MappingProxyType({}), hash=False)  # by errno name
    rescues: int = 0  # fresh handshakes answered while a session was live but unbound
    resumes: int = 0  # the live session resumed at another gateway of a cluster (same SessionID)


@attrs.define
class _Tally:
    """The mutable counters behind :class:`ClientStatistics` (same fields)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped_unbound: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_tun_full: int = 0
    rx_backlog_shed: int = 0
    handshake_sent: int = 0
    handshake_stray: int = 0
    cookie_replies: int = 0
    handshake: Counter[ReasonCode] = attrs.Factory(Counter)
    rekeys: int = 0
    reattach_sent: int = 0
    keys_exhausted: int = 0
    inbox_full: int = 0
    stray_source: int = 0
    drop: Counter[ReasonCode] = attrs.Factory(Counter)
    drop_malformed_plaintext: int = 0
    unexpected_type: int = 0
    path_errors: Counter[str] = attrs.Factory(Counter)
    rescues: int = 0
    resumes: int = 0

    def freeze(self) -> ClientStatistics:
        """A frozen copy: each Counter becomes a read-only mapping."""
        values: dict[str, Any] = {
            name: MappingProxyType(dict(value)) if isinstance(value, Counter) else value
            for name, value in attrs.asdict(self, recurse=False).items()
        }
        return ClientStatistics(**values)


#: The driver's counters, shared by the successive runtimes of one agent.
ClientTally = _Tally


@attrs.frozen(kw_only=True)
class RuntimeStatus:
    """What the UI and ``status`` show: the core's snapshot plus the driver's statistics.

    ``snapshot`` is None between two sessions of an agent (it is connecting).
    """

    snapshot: ClientSnapshot | None
    paths: tuple[tuple[PathId, str, str], ...]  # (path, interface, kind)
    tunnel_address: str | None
    statistics: ClientStatistics
    sessions_started: int = 0  # sessions of the agent so far (1 while the first one runs)
    tunnel_address6: str | None = None
    #: Inputs the session core had taken: a publication after an input never equals the one before,
    #: so it wakes whoever waits on a republication (``AsyncValue`` ignores an equal value).
    inputs: int = 0

    @classmethod
    def of(
        cls,
        snapshot: ClientSnapshot | None,
        *,
        paths: Iterable[ClientPath],
        tunnel_address: ipaddress.IPv4Interface | None,
        tally: ClientTally,
        sessions_started: int,
        tunnel_address6: ipaddress.IPv6Interface | None = None,
        inputs: int = 0,
    ) -> RuntimeStatus:
        """The status of a runtime (or of an agent between sessions) from its live parts."""
        return cls(
            snapshot=snapshot,
            paths=tuple((p.path, p.name, p.kind) for p in paths),
            tunnel_address=str(tunnel_address) if tunnel_address else None,
            statistics=tally.freeze(),
            sessions_started=sessions_started,
            tunnel_address6=str(tunnel_address6) if tunnel_address6 else None,
            inputs=inputs,
        )


@attrs.define(eq=False)
class _PendingHandshake:
    state: InitiatorHandshake
    sender_index: int
    path: ClientPath
    done: trio.Event = attrs.Factory(trio.Event)
    result: HandshakeResult | None = None
    answered_at: float | None = None
    #: The init as sent without mac2: a cookie reply sends it again once, with mac2.
    init: wire.HandshakeInit | None = None
    cookie_retried: bool = False


class ClientRuntime:
    """One client session over the given paths; see the module docstring.

    ``packets`` is the TUN (long-lived: it outlives the runtime);
    ``set_address`` is awaited with the address the handshake assigned before
    any packet flows.  ``tally`` and ``status`` may be shared with the runtimes
    before and after this one (an agent's counters and status stream).
    """

    def __init__(
        self,
        *,
        policy: Policy,
        static: StaticKeypair,
        gateway_public: bytes,
        paths: Sequence[ClientPath],
        emit: Callable[[EmitEvent], None],
        packets: PacketPort | None = None,
        set_address: SetAddress | None = None,
        random_bytes: RandomBytes = os.urandom,
        wall_time_ns: Callable[[], int] = time.time_ns,
        recorder: Recorder | None = None,
        tally: ClientTally | None = None,
        status: trio_util.AsyncValue[RuntimeStatus | None] | None = None,
        log: Callable[[str], None] = stderr_line,
    ) -> None:
        self.policy = policy
        self._static = static
        self._gateway_public = gateway_public
        self.paths: dict[PathId, ClientPath] = {}
        for p in paths:
            self.paths[p.path] = p
        self._sort_paths()
        #: Each path's link as last reported (netlink, or this runtime's own socket errors).
        self.link_up: dict[PathId, bool] = {p.path: p.link_up for p in self.paths.values()}
        self._emit = emit
        self._packets = packets
        self._delivered = DeliveryBuffer()
        self._set_address = set_address
        self._random_bytes = random_bytes
        self._wall_time_ns = wall_time_ns
        self._recorder = recorder
        self._log = log
        self.channel = SecureChannel(policy)
        self.session: ClientSession | None = None
        self.seed = FIRST_SEED
        self.tunnel_address: ipaddress.IPv4Interface | None = None
        self.tunnel_address6: ipaddress.IPv6Interface | None = None
        self._tally = tally if tally is not None else _Tally()
        self._plan: HandshakePlan | None = None
        self.status = status if status is not None else trio_util.AsyncValue[RuntimeStatus | None](None)
        self.termination_reason: ReasonCode | None = None
        self._active: ClientPath | None = None
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[float, Any]](INBOX_CAPACITY)
        self._last_now = -math.inf
        # What the last publication showed of what a watcher waits on (identities: each is replaced whole).
        self._published_record: object = None
        self._published_pending: object = None
        self._published_tunnel: tuple[object, object] = (None, None)
        self._published_at = -math.inf
        self._inputs = 0  # inputs the core has taken (RuntimeStatus.inputs)
        self._status_stale = False  # an input changed something the status does not show yet
        self._status_stale_event = trio.Event()  # set when the flag above turns True; the publisher renews it
        self._handshakes: dict[int, _PendingHandshake] = {}
        # The gateway's latest cookie (core/cookie.py): every init carries mac2 with it from then on.
        self._cookie: bytes | None = None
        self._delivery_reported: dict[PathId, float] = {}
        self._sent_reported: dict[PathId, float] = {}
        self._socket_down: set[PathId] = set()
        self._error_lines = LineLimiter(PATH_ERROR_LOG_INTERVAL_S)
        self._nursery: trio.Nursery | None = None  # the serving nursery, once the session runs
        self._path_scopes: dict[PathId, trio.CancelScope] = {}
        self._probe_now: dict[PathId, trio.Event] = {}
        #: When the core wants each path probed next (``ClientSession.probe_due``), as of its last call.
        self._probe_dues: dict[PathId, float | None] = {}
        #: Set (then replaced) when a due time moved earlier: the probers look again.
        self._probe_sooner = trio.Event()
        #: The last probe seq per path: a prober restarted on a new socket continues it (the core
        #: requires increasing seqs per path for as long as the path is in the session).
        self._probe_seq: dict[PathId, int] = {}

    def _sort_paths(self) -> None:
        self.paths = dict(sorted(self.paths.items(), key=lambda kv: (kv[1].priority, kv[0].value)))

    def statistics(self) -> ClientStatistics:
        """The driver's counters now (a frozen copy)."""
        return self._tally.freeze()

    # -- inputs from outside (netlink, UI keys, signals) --------------------------------
    def submit_nowait(self, event: Any) -> bool:
        """Queue an input stamped now; False (and counted) if the inbox is full.

        A link change also tells a running handshake plan which paths to try; a
        cost change is kept in the path set, so a session started later names it in
        ``PathAdded``.
        """
        if isinstance(event, ev.LinkChanged) and event.path in self.paths:
            self.link_up[event.path] = event.up
            if self._plan is not None:
                self._plan.link_changed(event.path, up=event.up)
        if isinstance(event, ev.PathCostChanged) and event.path in self.paths:
            self.paths[event.path] = attrs.evolve(self.paths[event.path], metered=event.metered)
        try:
            self._inbox_send.send_nowait((trio.current_time(), event))
        except trio.WouldBlock:
            self._tally.inbox_full += 1
            return False
        return True

    async def submit(self, event: Any, *, at: float | None = None) -> None:
        await self._inbox_send.send((trio.current_time() if at is None else at, event))

    @property
    def active_path(self) -> ClientPath | None:
        return self._active

    # -- the path set ---------------------------------------------------------------------------
    def add_path(self, path: ClientPath) -> bool:
        """Add ``path`` (a new PathId); a live session gets ``PathAdded`` and the path its tasks.

        False (nothing changes) if the PathId is in the set already.
        """
        if path.path in self.paths:
            return False
        self.paths[path.path] = path
        self._sort_paths()
        self.link_up[path.path] = path.link_up
        if self.session is not None and not self.session.terminated:
            self.submit_nowait(
                ev.PathAdded(
                    path=path.path, priority=path.priority, endpoint=path.gateway, link_up=path.link_up, metered=path.metered
                )
            )
        self._start_path_tasks(path)
        return True

    def remove_path(self, path_id: PathId) -> ClientPath | None:
        """Take a path out of the set: its tasks stop and a live session gets ``PathRemoved``.

        Returns the removed path (its socket is the caller's to close), None if unknown.
        """
        path = self.paths.pop(path_id, None)
        if path is None:
            return None
        self.link_up.pop(path_id, None)
        self._socket_down.discard(path_id)
        self._stop_path_tasks(path_id)
        self._probe_seq.pop(path_id, None)
        if self._active is not None and self._active.path == path_id:
            self._active = None  # nothing more is sent there; the core releases the binding next
        if self.session is not None and not self.session.terminated:
            self.submit_nowait(ev.PathRemoved(path=path_id))
        return path

    def readdress_path(self, path: ClientPath) -> ClientPath | None:
        """Replace a path's socket (its source address changed); a live session gets ``PathReaddressed``.

        The path's tasks restart on the new socket.  Returns the old path (its
        socket is the caller's to close), None if the PathId is unknown.
        """
        old = self.paths.get(path.path)
        if old is None:
            return None
        self.paths[path.path] = path
        self._sort_paths()
        self._socket_down.discard(path.path)
        if self._active is not None and self._active.path == path.path:
            self._active = path
        self._stop_path_tasks(path.path)
        self._start_path_tasks(path)
        if self.session is not None and not self.session.terminated:
            self.submit_nowait(ev.PathReaddressed(path=path.path))
        return old

    def probe_all_now(self) -> None:
        """Make every path's prober send at once (after a resume: measurements are stale)."""
        for event in self._probe_now.values():
            event.set()

    def _start_path_tasks(self, path: ClientPath) -> None:
        nursery = self._nursery
        if nursery is None or nursery.cancel_scope.cancel_called:
            return  # no session, or it is ending: the path stays in the set and the next session serves it
        scope = trio.CancelScope()
        self._path_scopes[path.path] = scope
        self._probe_now[path.path] = trio.Event()

        async def serve_path() -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    inner.start_soon(self._receive, path)
                    inner.start_soon(self._probe, path)

        nursery.start_soon(serve_path)

    def _stop_path_tasks(self, path_id: PathId) -> None:
        scope = self._path_scopes.pop(path_id, None)
        self._probe_now.pop(path_id, None)
        if scope is not None:
            scope.cancel()

    # -- lifetime ---------------------------------------------------------------------------
    async def run(
        self,
        *,
        adopt: Handshaken | None = None,
        seed: SessionSeed = FIRST_SEED,
        task_status: trio.TaskStatus[ClientRuntime] = trio.TASK_STATUS_IGNORED,
    ) -> ReasonCode:
        """Handshake (unless ``adopt`` is given), then serve until the session terminates.

        Returns the termination reason; raises :class:`HandshakeFailed` when
        the planner gives up.  ``seed`` comes from the agent's
        :class:`~jvpn_trio.core.agent.Succession` (BIRTH names the previous session).
        """
        if adopt is None:
            adopt = await self.handshake()
        result = adopt.result
        path = self.paths[adopt.path]
        self.seed = seed
        self.channel.install_current(result.keypair(created_at=adopt.at))
        address, address6 = result.tunnel_interface, result.tunnel_interface6
        if self._set_address is not None:
            await self._set_address(address, address6)
        self.tunnel_address, self.tunnel_address6 = address, address6
        now = trio.current_time()
        session = ClientSession(
            policy=self.policy,
            session_id=result.session_id,
            now=now,
            previous_session=seed.previous_session,
            switch_times=seed.switch_times,
            reconnect_by=seed.reconnect_by,
        )
        self.session = session
        created = session.creation_events()
        if self._recorder is not None:
            start = SessionStart(
                side="client",
                now=now,
                session=result.session_id.hex,
                policy=self.policy.to_mapping(),
                previous_session=seed.previous_session.hex if seed.previous_session is not None else None,
                switch_times=seed.switch_times,
                reconnect_by=seed.reconnect_by,
            )
            self._recorder.started(start, created)
        self._apply(created, now)
        for p in self.paths.values():
            await self._feed(
                ev.PathAdded(
                    path=p.path, priority=p.priority, endpoint=p.gateway, link_up=self.link_up[p.path], metered=p.metered
                ),
                now,
            )
        await self._feed(
            ev.HandshakeCompleted(
                session_id=result.session_id,
                binding=Binding(path=path.path, endpoint=path.gateway),
                gateway_version=result.state_version,
                owner_epoch=result.owner_epoch,
            ),
            now,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._supervise, nursery.cancel_scope)
            nursery.start_soon(self._publish_changes)
            self._nursery = nursery
            for p in self.paths.values():
                self._start_path_tasks(p)
            if self._packets is not None:
                nursery.start_soon(self._pump_packets, self._packets)
            nursery.start_soon(self._rekey_loop)
            task_status.started(self)
        if self._status_stale:  # the publisher ended with the nursery: what changed since goes out now
            self._publish(self._status_now())
        self._nursery = None
        self._path_scopes.clear()
        return self.termination_reason or ReasonCode.LOCAL_CLOSE

    # -- handshakes -----------------------------------------------------------------------------
    def candidates(self) -> list[HandshakeCandidate]:
        """This runtime's paths as handshake candidates, with their current link states."""
        return [
            HandshakeCandidate(path=p.path, priority=p.priority, link_up=self.link_up[p.path])
            for p in self.paths.values()
        ]

    async def handshake(self, plan: HandshakePlan | None = None) -> Handshaken:
        """Send inits where ``plan`` says (default: a planner until the transport-loss TTL).

        Only for a runtime that serves no session yet: it reads the path
        sockets itself.  Raises :class:`HandshakeFailed` when the plan gives up.
        """
        if self.session is not None:
            raise RuntimeError("this runtime already serves a session")
        if plan is None:
            plan = HandshakePlanner(policy=self.policy, candidates=self.candidates(), now=trio.current_time())
        self._plan = plan
        last_attempt_at: float | None = None
        try:
            while True:
                step = plan.next_attempt(now=trio.current_time())
                if isinstance(step, HandshakeGiveUp):
                    names = ", ".join(self.paths[p].name if p in self.paths else str(p) for p in step.paths)
                    raise HandshakeFailed(
                        f"no handshake answer from the gateway on {names} within {step.after_ms} ms",
                        last_attempt_at=last_attempt_at,
                    )
                path = self.paths.get(step.path)
                last_attempt_at = trio.current_time()
                pending = self._start_handshake(path) if path is not None else None
                if path is None or pending is None:  # gone, or could not send: wait out the attempt
                    await trio.sleep_until(step.deadline)
                    continue
                try:
                    with trio.move_on_at(step.deadline):
                        return await self._await_response(path, pending)
                finally:
                    self._handshakes.pop(pending.sender_index, None)
        finally:
            self._plan = None

    async def _await_response(self, path: ClientPath, pending: _PendingHandshake) -> Handshaken:
        """Read ``path``'s socket until ``pending`` is answered (the caller bounds the wait)."""
        while True:
            batch = await self._recv_or_fail(path)
            if batch is None:  # the path is down: nothing can answer on it
                await trio.sleep_forever()
            now = trio.current_time()
            for data, addr in batch:
                if not path.is_gateway(addr):
                    self._tally.stray_source += 1
                    continue
                self._on_handshake_response(data, now)
            if pending.result is not None:
                return Handshaken(result=pending.result, path=path.path, at=now)

    async def rescue(self, plan: HandshakePlan) -> Handshaken | None:
        """A fresh handshake (a new session, not a rekey) while this runtime's session runs.

        The receivers deliver the answer; returns it, or None when ``plan``
        gives up.  Changes nothing of the live session: the caller decides.
        """
        answered = await self._answered(plan, rekey=False)
        if answered is None:
            return None
        path, result, at = answered
        self._tally.rescues += 1
        return Handshaken(result=result, path=path.path, at=at)

    async def _answered(
        self, plan: HandshakePlan, *, rekey: bool
    ) -> tuple[ClientPath, HandshakeResult, float] | None:
        """Send inits where ``plan`` says until one is answered (the receivers deliver it); None if it gives up."""
        self._plan = plan
        try:
            while True:
                step = plan.next_attempt(now=trio.current_time())
                if isinstance(step, HandshakeGiveUp):
                    return None
                path = self.paths.get(step.path)
                pending = self._start_handshake(path, rekey=rekey) if path is not None else None
                if path is None or pending is None:
                    await trio.sleep_until(step.deadline)
                    continue
                try:
                    with trio.move_on_at(step.deadline):
                        await pending.done.wait()
                finally:
                    self._handshakes.pop(pending.sender_index, None)
                if pending.result is not None and pending.answered_at is not None:
                    return path, pending.result, pending.answered_at
        finally:
            self._plan = None

    def retarget(self, gateway: Address, control: Address, gateway_public: bytes) -> None:
        """Aim every path at another gateway (a cluster's: docs/cluster.md, "Takeover").

        Each path is taken out and put back with the new endpoints, so the session core
        forgets what it measured towards the old gateway and probes the new one afresh;
        its sockets stay.  Handshakes from now on go to ``gateway_public``.
        """
        self._gateway_public = gateway_public
        self._cookie = None  # a cookie is the old gateway's
        for path_id, path in list(self.paths.items()):
            link_up = self.link_up.get(path_id, path.link_up)
            self.remove_path(path_id)
            self.add_path(attrs.evolve(path, gateway=gateway, control=control, link_up=link_up))

    async def resume(self, plan: HandshakePlan) -> bool:
        """Resume the live session at the gateway the paths aim at: a handshake naming it.

        The gateway answers only if it could take the session over (its ticket, the old
        owner gone); the answer names the same session, and its keys replace ours.  The
        session is still unbound then: the core's ordinary recovery reattaches it, on the
        path the probes show best.  Returns False when ``plan`` gives up.
        """
        session = self.session
        if session is None or session.terminated:
            return False
        answered = await self._answered(plan, rekey=True)  # an answer naming another session is refused
        if answered is None:
            return False
        _path, result, at = answered
        self.channel.install_alone(result.keypair(created_at=at))
        self._tally.resumes += 1
        await self.submit(ev.TakenOver(owner_epoch=result.owner_epoch))
        self.probe_all_now()
        return True

    def _start_handshake(self, path: ClientPath, *, rekey: bool = False) -> _PendingHandshake | None:
        """Send a HANDSHAKE_INIT on ``path`` and register it; a rekey names the session (Property 5).

        Returns None when the path's socket refused the datagram (the path is down).
        """
        sender_index = int.from_bytes(self._random_bytes(4), "big")
        state, init = InitiatorHandshake.create(
            self._static,
            self._gateway_public,
            sender_index=sender_index,
            random_bytes=self._random_bytes,
            wall_time_ns=self._wall_time_ns(),
            path_id=path.path,
            rekey_session=self.session.record.session_id if rekey and self.session is not None else None,
            state_version=self.session.record.version if rekey and self.session is not None else 0,
        )
        sent = init if self._cookie is None else add_mac2(init, self._cookie)
        if not self._send(path, wire.encode_handshake_init(sent), path.control):
            return None
        if not rekey:
            self._tally.handshake_sent += 1
        pending = _PendingHandshake(state=state, sender_index=sender_index, path=path, init=init)
        self._handshakes[sender_index] = pending
        return pending

    def _on_handshake_response(self, data: bytes, now: float) -> None:
        """A HANDSHAKE_RESP from the gateway's address: complete the handshake it answers, if any.

        Only a response that authenticates with both static keys counts; anything else is counted.
        A COOKIE_REPLY (the gateway is under load) goes to :meth:`_on_cookie_reply`.
        """
        if data[1:2] == bytes((wire.MessageType.COOKIE_REPLY,)):
            self._on_cookie_reply(data)
            return
        try:
            resp = wire.decode_handshake_resp_untrusted(data)
        except wire.BadFrame:
            self._tally.handshake[ReasonCode.MALFORMED] += 1
            return
        pending = self._handshakes.get(resp.receiver_index)
        if pending is None or pending.result is not None:
            self._tally.handshake_stray += 1
            return
        try:
            result = pending.state.consume_response(resp)
        except HandshakeError as exc:
            self._tally.handshake[exc.reason] += 1
            return
        del self._handshakes[resp.receiver_index]
        pending.result = result
        pending.answered_at = now
        pending.done.set()

    def _on_cookie_reply(self, data: bytes) -> None:
        """Keep the cookie and send the init it answers again, with mac2: once per init.

        Only a reply sealed to the mac1 of an init still waiting opens, so a
        replayed or forged one changes nothing (counted as stray or refused).
        """
        try:
            reply = wire.decode_cookie_reply_untrusted(data)
        except wire.BadFrame:
            self._tally.handshake[ReasonCode.MALFORMED] += 1
            return
        pending = self._handshakes.get(reply.receiver_index)
        if pending is None or pending.init is None or pending.result is not None or pending.cookie_retried:
            self._tally.handshake_stray += 1
            return
        cookie = open_cookie_reply(reply, gateway_public=self._gateway_public, init_mac1=pending.init.mac1)
        if cookie is None:
            self._tally.handshake[ReasonCode.DECRYPT_FAILED] += 1
            return
        self._cookie = cookie
        pending.cookie_retried = True
        self._tally.cookie_replies += 1
        self._send(pending.path, wire.encode_handshake_init(add_mac2(pending.init, cookie)), pending.path.control)

    # -- the supervisor ------------------------------------------------------------------------
    async def _feed(self, event: Any, now: float) -> None:
        """Call the core once (only the supervisor and ``run``'s setup do) and act."""
        assert self.session is not None
        now = max(now, self._last_now)
        self._last_now = now
        actions = self.session.handle(event, now=now)
        self._inputs += 1
        if self._recorder is not None:
            self._recorder.step("client", self.session.record.session_id.hex, now, event, actions)
        self._apply(actions, now)
        session = self.session
        if (
            session.record is not self._published_record
            or session.pending is not self._published_pending
            or isinstance(event, PUBLISHED_AT_ONCE)
            or self.tunnel_address is not self._published_tunnel[0]
            or self.tunnel_address6 is not self._published_tunnel[1]
        ):
            self._publish(now)  # a watcher waits on these: at once
        elif not self._status_stale:  # counters, health, RTTs: by the publisher, within one interval
            self._status_stale = True
            self._status_stale_event.set()
        self._follow_probe_schedule()

    def _follow_probe_schedule(self) -> None:
        """Wake the probers when the core moved a path's next probe earlier (a role change, a link event)."""
        assert self.session is not None
        dues = {path: self.session.probe_due(path) for path in self.paths}
        sooner = any(due is not None and due < _or_never(self._probe_dues.get(path)) for path, due in dues.items())
        self._probe_dues = dues
        if sooner:
            self._probe_sooner.set()
            self._probe_sooner = trio.Event()

    async def _supervise(self, cancel_scope: trio.CancelScope) -> None:
        assert self.session is not None
        session = self.session
        while not session.terminated:
            deadline = session.next_deadline()
            item = None
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                item = await self._inbox.receive()
            if item is None:
                assert deadline is not None
                await self._feed(ev.TimerFired(), max(deadline, trio.current_time()))
            else:
                await self._feed(item[1], item[0])
        cancel_scope.cancel()

    def _apply(self, actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, EmitEvent):
                self._emit(action)
            elif isinstance(action, BindTransport):
                # None if the path left the set: its queued PathRemoved releases the binding next.
                self._active = self.paths.get(action.binding.path)
            elif isinstance(action, ReleaseTransport):
                if self._active is not None and self._active.path == action.binding.path:
                    self._active = None
            elif isinstance(action, SendReattach):
                self._send_reattach(action)
            elif isinstance(action, SendPathResponse):
                self._send_path_response(action)
            elif isinstance(action, SendClose):
                self._send_close(action.reason)
            elif isinstance(action, Terminate):
                self.termination_reason = action.reason

    # -- status ----------------------------------------------------------------------------------
    def _status_now(self) -> float:
        return max(self._last_now, trio.current_time())

    def _publish(self, now: float) -> None:
        """Publish the status as of ``now``: O(paths + counters), so not after every input (see :meth:`_feed`)."""
        session = self.session
        assert session is not None
        self._published_record, self._published_pending = session.record, session.pending
        self._published_tunnel = (self.tunnel_address, self.tunnel_address6)
        self._status_stale = False
        self._published_at = trio.current_time()
        self.status.value = RuntimeStatus.of(
            session.snapshot(now=now),
            paths=self.paths.values(),
            tunnel_address=self.tunnel_address,
            tally=self._tally,
            sessions_started=self.seed.number,
            tunnel_address6=self.tunnel_address6,
            inputs=self._inputs,
        )

    async def _publish_changes(self) -> None:
        """Publish a stale status at most once per STATUS_INTERVAL_S: a watcher sees every change within one."""
        while True:
            if not self._status_stale:
                self._status_stale_event = trio.Event()
                await self._status_stale_event.wait()
                continue
            await trio.sleep_until(self._published_at + STATUS_INTERVAL_S)
            if self._status_stale:  # else a change a watcher waits on has just published it
                self._publish(self._status_now())

    # -- path sockets ------------------------------------------------------------------------
    def _send(self, path: ClientPath, data: bytes, addr: Address) -> bool:
        """Send one datagram on ``path``; an OSError is the path's failure, not the runtime's."""
        try:
            path.port.send_nowait(data, addr)
        except (OSError, trio.ClosedResourceError) as exc:
            self._path_failed(path, exc)
            return False
        return True

    async def _recv_or_fail(self, path: ClientPath, max_datagrams: int = BATCH) -> list[tuple[bytes, Address]] | None:
        """The next batch from ``path``'s socket, or None (counted, reported) if it raised OSError."""
        try:
            batch = await path.port.recv_batch(max_datagrams)
        except (OSError, trio.ClosedResourceError) as exc:
            self._path_failed(path, exc)
            return None
        if path.path in self._socket_down:  # the socket works again: its link is back
            self._socket_down.discard(path.path)
            self.submit_nowait(ev.LinkChanged(path=path.path, up=True))
        return batch

    def _path_failed(self, path: ClientPath, error: OSError | trio.ClosedResourceError) -> None:
        """Count and report a path socket's failure (once per path until it works again).

        A closed socket (the path is being removed or rebound) counts as EBADF.
        """
        exc = error if isinstance(error, OSError) else OSError(errno.EBADF, "socket closed")
        name = errno.errorcode.get(exc.errno, "OTHER") if exc.errno is not None else "OTHER"
        self._tally.path_errors[name] += 1
        if path.path not in self.paths:
            return  # removed meanwhile: its news no longer matters
        if path.path not in self._socket_down:
            self._socket_down.add(path.path)
            self.submit_nowait(ev.LinkChanged(path=path.path, up=False))
        if self._error_lines.admit(path.path, trio.current_time()) is not None:
            self._log(f"path {path.name}: socket error {name} ({exc.strerror or exc}); treating the path as down")

    # -- sending control messages ------------------------------------------------------------
    def _seal(self, msg_type: wire.MessageType, plaintext: bytes) -> bytes | None:
        try:
            return self.channel.seal(msg_type, plaintext)
        except KeyExhausted:
            self._tally.keys_exhausted += 1
            self.submit_nowait(ev.KeysExhausted())
            return None

    def _send_reattach(self, action: SendReattach) -> None:
        assert self.session is not None
        path = self.paths.get(action.path)
        if path is None:  # removed meanwhile: the core learns it from the queued PathRemoved
            return
        msg = wire.Reattach(
            session_id=self.session.record.session_id,
            path_id=action.path,
            nonce=action.nonce,
            client_ts_ms=action.client_ts_ms,
            expected_version=action.expected_version,
        )
        datagram = self._seal(wire.MessageType.REATTACH, wire.encode_reattach_plaintext(msg))
        if datagram is not None and self._send(path, datagram, path.control):
            self._tally.reattach_sent += 1

    def _send_path_response(self, action: SendPathResponse) -> None:
        """The echo leaves by the path the REATTACH did (the core chose it), to the gateway's control port."""
        assert self.session is not None
        path = self.paths.get(action.path)
        if path is None:
            return
        echo = wire.PathResponse(
            session_id=self.session.record.session_id,
            nonce=action.nonce,
            challenge=action.challenge,
            path_id=action.path,
        )
        datagram = self._seal(wire.MessageType.PATH_RESPONSE, wire.encode_path_check_plaintext(echo))
        if datagram is not None:
            self._send(path, datagram, path.control)

    def _send_close(self, reason: ReasonCode) -> None:
        assert self.session is not None
        target = self._active
        if target is None:
            return
        plaintext = wire.encode_close_plaintext(wire.Close(session_id=self.session.record.session_id, reason=reason))
        datagram = self._seal(wire.MessageType.CLOSE, plaintext)
        if datagram is not None:
            self._send(target, datagram, target.control)

    # -- per-path tasks ------------------------------------------------------------------------
    async def _probe(self, path: ClientPath) -> None:
        """A PROBE when the core says one is due on this path (``ClientSession.probe_due``: the active
        path every ``probe_interval_ms``, standby paths slower), or at once when :meth:`probe_all_now` asks.

        Never two within ``Policy.probe_spacing_ms``: the core hears of a probe (``ProbeSent``) a
        moment after it leaves, and until then its due time is the old one.
        """
        floor_s = self.policy.probe_spacing_ms / 1000.0
        last_sent = -math.inf
        while True:
            session = self.session
            core_due = session.probe_due(path.path) if session is not None else None
            due = max(core_due if core_due is not None else trio.current_time(), last_sent + floor_s)
            wake, sooner = self._probe_now.get(path.path), self._probe_sooner
            if wake is not None and wake.is_set():
                self._probe_now[path.path] = trio.Event()  # asked for at once: this probe is it
            elif trio.current_time() < due:
                with trio.move_on_at(due):
                    await trio_util.wait_any(sooner.wait, *((wake.wait,) if wake is not None else ()))
                continue  # due, asked for, or the schedule moved: look again with the core's latest word
            now = trio.current_time()
            last_sent = now
            seq = self._probe_seq[path.path] = (self._probe_seq.get(path.path, 0) + 1) % (1 << 32)
            await self.submit(ev.ProbeSent(path=path.path, seq=seq), at=now)
            probe = wire.Probe(path_id=path.path, seq=seq, sent_us=int(now * 1e6) % (1 << 64))
            datagram = self._seal(wire.MessageType.PROBE, wire.encode_probe_plaintext(probe))
            if datagram is not None:
                self._send(path, datagram, path.control)

    async def _receive(self, path: ClientPath) -> None:
        retry_s = self.policy.handshake_retry_ms / 1000.0
        behind = 0  # datagrams taken by full reads in a row: the socket has not been empty since
        while True:
            sweep = behind >= RX_SWEEP_AFTER
            batch = await self._recv_or_fail(path, RX_READ_AHEAD if sweep else BATCH)
            if batch is None:
                await trio.sleep(retry_s)
                continue
            behind = 0 if sweep or len(batch) < BATCH else behind + len(batch)
            if len(batch) > RX_BACKLOG_DATA:  # behind a flood: keep every control frame, the newest DATA
                batch, shed, strays = shed_oldest_data(batch, RX_BACKLOG_DATA, path.is_gateway)
                self._tally.rx_backlog_shed += shed
                self._tally.stray_source += strays
            for start in range(0, len(batch), BATCH):
                if start:  # a long read is handled a wake-up's worth at a time; a cancel waits for the next read
                    await trio.lowlevel.cancel_shielded_checkpoint()
                await self._receive_batch(path, batch[start:start + BATCH])

    async def _receive_batch(self, path: ClientPath, batch: list[tuple[bytes, Address]]) -> None:
        """Each datagram from the gateway, in order; consecutive DATA is opened in one call, without a coroutine.

        A control frame ends the run before it, so it sees the keys and windows as the
        DATA before it left them; everything else (and every drop) goes the general way.
        """
        now = trio.current_time()
        tally, is_data, is_gateway = self._tally, wire.is_data_untrusted, path.is_gateway
        run: list[bytes] = []
        for data, addr in batch:
            if not is_gateway(addr):
                tally.stray_source += 1
            elif is_data(data):
                run.append(data)
            else:
                if run:
                    self._open_data_run(path, run, now)
                    run = []
                await self._on_datagram(path, data, now)
        if run:
            self._open_data_run(path, run, now)
        self._flush_delivered()

    def _open_data_run(self, path: ClientPath, run: list[bytes], now: float) -> None:
        """Open consecutive DATA from the gateway in one call; count the drops, deliver the rest."""
        opened = self.channel.open_data_batch(run, now=now)
        for reason in opened.drops:
            self._tally.drop[reason] += 1
        if opened.packets:
            self._deliver(path, opened.packets, now)

    async def _on_datagram(self, path: ClientPath, data: bytes, now: float) -> None:
        try:
            msg_type = wire.peek_type_untrusted(data)
        except wire.BadFrame:
            self._tally.drop[ReasonCode.MALFORMED] += 1
            return
        if msg_type in (wire.MessageType.HANDSHAKE_RESP, wire.MessageType.COOKIE_REPLY):
            self._on_handshake_response(data, now)
            return
        try:
            opened = self.channel.open_untrusted(data, now=now)
        except ChannelDrop as drop:
            self._tally.drop[drop.reason] += 1
            return
        try:  # never DATA: _receive_batch opens that in runs
            message = wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext)
        except wire.BadFrame:
            self._tally.drop_malformed_plaintext += 1
            return
        event: ev.ClientInput
        match message:
            case wire.ProbeAck(seq=seq, gateway_state_version=version, bound_path_id=bound):
                event = ev.ProbeAcked(path=path.path, seq=seq, gateway_version=version, gateway_bound_path=bound)
            case wire.ReattachAck(nonce=nonce, new_version=version, owner_epoch=epoch):
                event = ev.ReattachAcked(path=path.path, nonce=nonce, new_version=version, owner_epoch=epoch)
            case wire.ReattachReject(nonce=nonce, reason=reason, current_version=version):
                event = ev.ReattachRejected(path=path.path, nonce=nonce, reason=reason, current_version=version)
            case wire.PathChallenge(nonce=nonce, challenge=challenge, path_id=named):
                event = ev.PathChallenged(path=path.path, for_path=named, nonce=nonce, challenge=challenge)
            case wire.Close(reason=reason):
                event = ev.PeerClosed(reason=reason)
            case _:  # PROBE, REATTACH, PATH_RESPONSE: only the gateway receives those
                self._tally.unexpected_type += 1
                return
        await self.submit(event, at=now)

    def _deliver(self, path: ClientPath, packets: list[bytes], now: float) -> None:
        tally = self._tally
        tally.rx_packets += len(packets)
        tally.rx_bytes += sum(map(len, packets))
        if self._packets is not None:
            self._delivered.extend(packets)
        if self._due_to_report(self._delivery_reported, path.path, now):
            self.submit_nowait(ev.DeliveryObserved(path=path.path))

    def _flush_delivered(self) -> None:
        """Write what a received batch delivered, in one go (:class:`DeliveryBuffer`)."""
        if self._packets is not None:
            self._tally.rx_tun_full += self._delivered.flush(self._packets)

    def _due_to_report(self, reported: dict[PathId, float], path: PathId, now: float) -> bool:
        """Whether traffic on ``path`` is news for the core: at most once per ``Policy.traffic_report_ms``."""
        if now - reported.get(path, -math.inf) < self.policy.traffic_report_ms / 1000.0:
            return False
        reported[path] = now
        return True

    async def _pump_packets(self, port: PacketPort) -> None:
        while True:
            batch = await port.read_batch(BATCH)
            active = self._active
            tally = self._tally
            if active is None:
                tally.tx_dropped_unbound += len(batch)
                continue
            sealed = self.channel.seal_data_batch(batch)
            if len(sealed) < len(batch):  # the keys ran out: the rest is dropped, the core told
                tally.keys_exhausted += 1
                self.submit_nowait(ev.KeysExhausted())
            tally.tx_packets += len(sealed)
            tally.tx_bytes += sum(map(len, batch[: len(sealed)]))
            now = trio.current_time()
            if self._due_to_report(self._sent_reported, active.path, now):
                self.submit_nowait(ev.DataSent(path=active.path))
            for run in equal_size_runs(sealed):
                try:
                    active.port.send_segments_nowait(run, active.gateway)
                except (OSError, trio.ClosedResourceError) as exc:
                    self._path_failed(active, exc)
                    break

    # -- key rotation ------------------------------------------------------------------------
    async def _rekey_loop(self) -> None:
        assert self.session is not None
        retry_s = self.policy.handshake_retry_ms / 1000.0
        while True:
            current = self.channel.keyring.current
            due = current.created_at + self.policy.rekey_after_s if current else trio.current_time()
            await trio.sleep_until(due)
            now = trio.current_time()
            if self.channel.keyring.expired(now):
                self.submit_nowait(ev.KeysExhausted())
                return
            if not self.channel.keyring.needs_rekey(now):
                await trio.sleep(retry_s)
                continue
            target = self._active
            pending = self._start_handshake(target, rekey=True) if target is not None else None
            if pending is None:
                await trio.sleep(retry_s)
                continue
            try:
                with trio.move_on_after(retry_s):
                    await pending.done.wait()
            finally:
                self._handshakes.pop(pending.sender_index, None)
            if pending.result is not None:
                self.channel.install_current(pending.result.keypair(created_at=trio.current_time()))
                self._tally.rekeys += 1
