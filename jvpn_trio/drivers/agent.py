"""The client agent: one session at a time, for as long as ``jvpn-trio up`` runs.

Theory of operation
-------------------
:class:`ClientAgent` owns what outlives a session: the path sockets, the
TUN (``packets``), the driver's counters, the status stream the UI and the
control socket read, and the :class:`~jvpn_trio.core.agent.Succession`
that decides everything between sessions.  :meth:`ClientAgent.serve` loops:

1. **connecting** (no session): wait until ``next_attempt_at()``, then run
   one :class:`~jvpn_trio.core.agent.HandshakeRound` on a fresh
   :class:`~jvpn_trio.drivers.client.ClientRuntime`.  Packets the TUN hands
   over meanwhile are dropped and counted (``tx_dropped_unbound``).  A round
   without an answer is ``handshake_failed``; an answer is a new session;
2. **serving**: the runtime serves the session, seeded with
   ``session_started()`` (its BIRTH names the session before it).  Beside
   it, the **rescuer** waits until ``rescue_at(record)`` (the session is
   live but has had no binding for the recovery window, e.g. because the
   gateway restarted and lost it) and tries a *fresh* handshake on the
   runtime's own sockets.  Only the real gateway can answer one (both static
   keys authenticate it), so no unauthenticated packet ends a session.  An
   answer means the gateway already replaced its side: the old session is
   closed explicitly (``CloseRequested`` -> LOCAL_CLOSE) and the next
   session starts from that answer, with no second handshake.  A round
   without an answer is ``handshake_failed``;
3. when the session ends, for whatever reason the core gave,
   ``session_ended()`` says when to try again, and the loop goes on.
   A session the gateway closed with SESSION_REPLACED (another client with
   the same key took over) *holds* the agent instead, as a disconnect does:
   reconnecting by itself would evict the other client, and it us, forever
   (``core/agent.py``, "Replaced").  :attr:`ClientAgent.held_reason` says
   why it holds; :meth:`ClientAgent.reconnect_nowait` ends the hold.  The
   peer's reason is the one the session's TERMINATED event carries
   (``peer_reason``), read on its way to the event sink.

**Gateways.**  With several (``gateways``, in order of preference) the
agent's :class:`~jvpn_trio.core.agent.GatewayChoice` names the one each
handshake round goes to, and each session's runtime is made against it:
its key, and the paths' data and control endpoints.  A round without an
answer moves the choice on; so does a session that ended unbound by its
transport-loss TTL; a failed *rescue* closes the live session so that the
next round can try the next gateway (``core/agent.py``, "Gateways").  Each
move is a log line; :attr:`ClientAgent.gateway` names the one in use.

**The path set** belongs to the agent, not to a session: paths come and go
while the agent runs (:meth:`ClientAgent.add_path`, :meth:`~ClientAgent.remove_path`,
:meth:`~ClientAgent.readdress_path`, called by the composition root as the
path manager reports interfaces).  A change is handed to the runtime of the
moment (which tells a live session) and every later runtime starts from the
set as it is then.  A cost change (``PathCostChanged``, from NetworkManager's
``Metered``, ``drivers/networkmanager.py``) goes to the live session through
:meth:`ClientAgent.submit_nowait` and is kept in the set, so the next
session's ``PathAdded`` carries it.  With no path at all the agent waits,
CONNECTING, until one appears.

**Suspend.**  A :class:`~jvpn_trio.drivers.clock.SuspendDetector` runs for
the agent's life.  On each resume every path is probed at once, and
:meth:`~jvpn_trio.core.agent.Succession.resumed` decides whether the gateway
has certainly forgotten the session; if so the rescue (or the next round)
is due at once instead of after the recovery window or the back-off.
Where logind runs, its ``PrepareForSleep`` signal (:class:`~jvpn_trio.drivers.logind.SleepSignals`)
makes the detector compare the clocks right at the resume instead of at its
next sample; the detector's measurement stays the one acted on.

Only :meth:`close_nowait` (the first SIGINT/SIGTERM, the UI's quit) ends
:meth:`serve`: the live session is closed explicitly, then it returns.
``task_status.started()`` is called at once: the agent is useful (its status
says CONNECTING) before any gateway answers.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import time
from collections.abc import Sequence
from typing import Any, Callable

import attrs
import trio
import trio_util

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.agent import (
    HOLD_PEER_REASONS,
    GatewayChoice,
    GatewayMove,
    HandshakeRound,
    SessionSeed,
    Succession,
)
from jvpn_trio.core.ids import PathId, RandomBytes
from jvpn_trio.core.noise import StaticKeypair
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import ClientSession
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.drivers.client import (
    BATCH,
    ClientPath,
    ClientRuntime,
    ClientStatistics,
    ClientTally,
    HandshakeFailed,
    Handshaken,
    RuntimeStatus,
    SetAddress,
)
from jvpn_trio.drivers.clock import Resumed, SuspendDetector
from jvpn_trio.drivers.logind import SleepSignals
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.drivers.ports import Address, PacketPort
from jvpn_trio.drivers.recording import Recorder

#: How many resume reports the agent keeps (for status and tests).
RESUMES_KEPT = 16


@attrs.frozen(kw_only=True)
class GatewayTarget:
    """One gateway the agent may handshake with: its data and control endpoints and its static key."""

    endpoint: Address
    control: Address
    public_key: bytes

    @property
    def name(self) -> str:
        host, port = self.endpoint
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ClientAgent:
    """Keeps one client session at a time; see the module docstring.

    Inputs from outside (netlink's ``LinkChanged``, the UI's keys) go through
    :meth:`submit_nowait` to whichever session is live; ``CloseRequested``
    there means :meth:`close_nowait`.

    ``gateways`` (in order of preference) replaces ``gateway_public``: each
    runtime is then made against the chosen one, the paths' ``gateway`` and
    ``control`` set to its endpoints.  Without it the one gateway is
    ``gateway_public`` at the endpoints the paths name.  ``cluster``: the
    gateways share an ownership store, so a live session whose gateway fell
    silent is resumed at the next one rather than ended.
    """

    def __init__(
        self,
        *,
        policy: Policy,
        static: StaticKeypair,
        gateway_public: bytes = b"",
        gateways: Sequence[GatewayTarget] = (),
        paths: Sequence[ClientPath] = (),
        emit: Callable[[EmitEvent], None],
        packets: PacketPort | None = None,
        set_address: SetAddress | None = None,
        random_bytes: RandomBytes = os.urandom,
        wall_time_ns: Callable[[], int] = time.time_ns,
        recorder: Recorder | None = None,
        log: Callable[[str], None] = stderr_line,
        suspend_detector: SuspendDetector | None = None,
        sleep_signals: SleepSignals | None = None,
        cluster: bool = False,
    ) -> None:
        self.policy = policy
        #: The gateways share an ownership store: a session moves between them (core/agent.py, "Takeover").
        self._cluster = cluster and len(gateways) > 1
        self._static = static
        if not gateways and not gateway_public:
            raise ValueError("a gateway is needed: gateway_public or gateways")
        self._gateway_public = gateway_public
        self._gateways = tuple(gateways)
        #: Which gateway the next handshake goes to (core/agent.py, "Gateways").
        self.gateway_choice = GatewayChoice([g.name for g in gateways] if gateways else ["configured"])
        self._paths: dict[PathId, ClientPath] = {}
        self._link_up: dict[PathId, bool] = {}
        for p in paths:
            if p.path in self._paths:
                raise ValueError(f"two paths with the id {p.path}")
            self._paths[p.path] = p
            self._link_up[p.path] = p.link_up
        self._detector = suspend_detector if suspend_detector is not None else SuspendDetector()
        self._sleep_signals = sleep_signals
        #: Bumped when a path appears or the machine resumed: a waiting connect looks again.
        self._nudge = trio_util.AsyncValue(0)
        self.resumes: list[Resumed] = []
        self._emit = emit
        self._packets = packets
        self._set_address_outside = set_address
        self._random_bytes = random_bytes
        self._wall_time_ns = wall_time_ns
        self._recorder = recorder
        self._log = log
        self._tally = ClientTally()
        #: One stream for the agent's whole life: each runtime publishes into it, and between
        #: sessions the agent publishes a status without a snapshot (CONNECTING).
        self.status = trio_util.AsyncValue[RuntimeStatus | None](None)
        self.succession: Succession | None = None
        self.runtime: ClientRuntime | None = None  # the runtime connecting or serving now
        self.tunnel_address: ipaddress.IPv4Interface | None = None
        self.tunnel_address6: ipaddress.IPv6Interface | None = None
        self._closing = False
        self._close_requested = trio.Event()
        #: Set by :meth:`disconnect_nowait` (or a replacement): no session is started until :meth:`reconnect_nowait`.
        self._held = trio_util.AsyncValue(False)
        self._held_reason: ReasonCode | None = None
        #: (session hex, peer reason) of the last session a peer's CLOSE ended, as its TERMINATED event said.
        self._peer_closed: tuple[str, ReasonCode] | None = None
        #: (session hex, reason) of the last session that ended, as its TERMINATED event said.
        self._ended: tuple[str, ReasonCode] | None = None
        #: The gateway the runtime of the moment was made against: paths it is given later aim there too.
        self._runtime_target: GatewayTarget | None = None
        #: A rescue handshake of the live session is out (set until it returns; a session ending cancels it).
        self._rescue_out = False

    # -- outside inputs -----------------------------------------------------------------------
    def statistics(self) -> ClientStatistics:
        """The driver's counters over the agent's whole life (a frozen copy)."""
        return self._tally.freeze()

    @property
    def session(self) -> ClientSession | None:
        """The live session's core, or None between sessions."""
        runtime = self.runtime
        return runtime.session if runtime is not None else None

    @property
    def gateway(self) -> str | None:
        """The gateway in use or next tried (None: the one the paths name, ``gateways`` not given)."""
        return self.gateway_choice.name if self._gateways else None

    def _target(self) -> GatewayTarget | None:
        return self._gateways[self.gateway_choice.current] if self._gateways else None

    def _gateway_moved(self, move: GatewayMove | None) -> None:
        if move is not None:
            self._log(move.describe())

    @property
    def sessions_started(self) -> int:
        return self.succession.sessions_started if self.succession is not None else 0

    def submit_nowait(self, event: Any) -> bool:
        """Pass an input to the live session (a link or cost change is also remembered for the next one)."""
        if isinstance(event, ev.CloseRequested):
            self.close_nowait()
            return True
        if isinstance(event, ev.LinkChanged) and event.path in self._link_up:
            self._link_up[event.path] = event.up
        if isinstance(event, ev.PathCostChanged):
            return self._cost_changed(event)
        runtime = self.runtime
        if runtime is None:
            return isinstance(event, ev.LinkChanged)
        return runtime.submit_nowait(event)

    def _cost_changed(self, event: ev.PathCostChanged) -> bool:
        """Keep a path's new cost in the set (every later runtime starts from it) and pass it on.

        The runtime keeps it in its own set too (``ClientRuntime.submit_nowait``),
        so a session it is still handshaking for names the cost from its first input.
        """
        path = self._paths.get(event.path)
        if path is None:
            return False
        self._paths[event.path] = attrs.evolve(path, metered=event.metered)
        runtime = self.runtime
        return True if runtime is None else runtime.submit_nowait(event)

    # -- the path set -------------------------------------------------------------------------
    @property
    def paths(self) -> dict[PathId, ClientPath]:
        """The current path set (a copy)."""
        return dict(self._paths)

    def add_path(self, path: ClientPath) -> bool:
        """Add a path to the set; the live session (and every later one) gets it.  False if its id is taken."""
        if path.path in self._paths:
            return False
        self._paths[path.path] = path
        self._link_up[path.path] = path.link_up
        runtime = self.runtime
        if runtime is not None:
            runtime.add_path(self._towards(path, self._runtime_target))
        self._nudge.value += 1
        self._publish_paths()
        return True

    def remove_path(self, path_id: PathId) -> ClientPath | None:
        """Take a path out of the set; returns it (its socket is the caller's to close), None if unknown.

        The live session gets ``PathRemoved`` (queued ahead of anything
        submitted after this call), so the PathId may be given out again.
        """
        path = self._paths.pop(path_id, None)
        self._link_up.pop(path_id, None)
        runtime = self.runtime
        if runtime is not None:
            runtime.remove_path(path_id)
        self._publish_paths()
        return path

    def readdress_path(self, path: ClientPath) -> ClientPath | None:
        """Replace a path's socket after its address changed; returns the old path (None if unknown)."""
        old = self._paths.get(path.path)
        if old is None:
            return None
        self._paths[path.path] = attrs.evolve(path, link_up=self._link_up[path.path])
        runtime = self.runtime
        if runtime is not None:
            runtime.readdress_path(self._towards(self._paths[path.path], self._runtime_target))
        return old

    def _publish_paths(self) -> None:
        if self.session is None:
            self._publish_connecting()

    # -- suspend ------------------------------------------------------------------------------
    def _resumed(self, resumed: Resumed) -> None:
        """The machine slept: probe every path now; a new session at once if the gateway forgot ours."""
        self.resumes.append(resumed)
        del self.resumes[:-RESUMES_KEPT]
        succession = self.succession
        outlived = succession is not None and succession.resumed(resumed.suspended_for_s, trio.current_time())
        self._log(
            f"resumed after a {resumed.suspended_for_s:.1f} s suspend"
            + ("; the gateway has dropped the session: handshaking now" if outlived else "; probing every path")
        )
        runtime = self.runtime
        if runtime is not None:
            runtime.probe_all_now()
            if runtime.session is not None and not runtime.session.terminated:
                runtime.submit_nowait(ev.ReevaluateRequested())  # republishes: the rescuer looks again
        self._nudge.value += 1

    def _going_to_sleep(self) -> None:
        self._log("the machine is going to sleep (logind)")

    def close_nowait(self) -> None:
        """Close the live session explicitly, then let :meth:`serve` return (idempotent)."""
        if self._closing:
            return
        self._closing = True
        self._close_requested.set()
        runtime = self.runtime
        if runtime is not None and runtime.session is not None:
            runtime.submit_nowait(ev.CloseRequested())

    @property
    def held(self) -> bool:
        """True after :meth:`disconnect_nowait` or a replacement, until :meth:`reconnect_nowait`."""
        return bool(self._held.value)

    @property
    def held_reason(self) -> ReasonCode | None:
        """Why the agent holds: OPERATOR_DISCONNECT, SESSION_REPLACED (None: it does not)."""
        return self._held_reason if self._held.value else None

    def disconnect_nowait(self, by: str = "operator") -> bool:
        """Close the live session (OPERATOR_DISCONNECT, then LOCAL_CLOSE) and start no other until :meth:`reconnect_nowait`.

        The process, the TUN and its routes stay (traffic is dropped and
        counted, as between sessions).  Returns whether a live session was
        told to close.
        """
        self._held_reason = ReasonCode.OPERATOR_DISCONNECT
        self._held.value = True
        return self._close_live_session(by, ReasonCode.OPERATOR_DISCONNECT)

    def reconnect_nowait(self, by: str = "operator") -> bool:
        """End a disconnect, or close the live session (OPERATOR_RECONNECT, LOCAL_CLOSE) so that the next one starts.

        Without a live session the next one logs the request at its BIRTH,
        and its handshake round may start within ``reconnect_initial_ms``
        (:meth:`Succession.reconnect_requested`).  Returns whether a live
        session was told to close.
        """
        self._held.value = False
        self._held_reason = None
        if self._close_live_session(by, ReasonCode.OPERATOR_RECONNECT):
            return True
        if self.succession is not None:
            self.succession.reconnect_requested(by, trio.current_time())
            self._nudge.value += 1
        return False

    def _close_live_session(self, by: str, action: ReasonCode) -> bool:
        runtime = self.runtime
        if runtime is None or runtime.session is None or runtime.session.terminated:
            return False
        return runtime.submit_nowait(ev.CloseRequested(by=by, action=action))

    async def _interrupted(self) -> None:
        """Until close_nowait() or disconnect_nowait(): a connect in progress stops."""
        await trio_util.wait_any(self._close_requested.wait, functools.partial(self._held.wait_value, True))

    # -- lifetime -----------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[ClientAgent] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a session until :meth:`close_nowait`; never returns on its own."""
        succession = self.succession = Succession(policy=self.policy, now=trio.current_time())
        self._publish_connecting()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._detector.serve, self._resumed)
            if self._sleep_signals is not None:
                nursery.start_soon(self._sleep_signals.serve, self._going_to_sleep, self._detector.check_now)
            task_status.started(self)
            adopt: Handshaken | None = None
            while not self._closing:
                if self._held.value:
                    async with trio_util.move_on_when(self._close_requested.wait):
                        await self._held.wait_value(False)
                    continue
                runtime = self._new_runtime()
                if adopt is None:
                    async with trio_util.move_on_when(self._interrupted):
                        adopt = await self._connect(runtime, succession)
                    if adopt is None:
                        continue
                seed = succession.session_started(adopt.result.session_id, trio.current_time())
                adopt = await self._serve_session(runtime, adopt, seed, succession)
                if succession.hold is not None and not self._held.value:
                    self._hold_replaced(succession.hold)
                if self._held.value:
                    adopt = None
                self._publish_connecting()
            self.runtime = None
            nursery.cancel_scope.cancel()

    def _hold_replaced(self, reason: ReasonCode) -> None:
        """The gateway gave the session to another holder of our key: hold until a person reconnects."""
        self._held_reason = reason
        self._held.value = True
        self._log(f"the session was {HOLD_PEER_REASONS[reason]} ({reason.value}); not reconnecting until asked (reconnect)")

    def _session_event(self, event: EmitEvent) -> None:
        """Pass a session's event on; remember why it ended and the peer reason a TERMINATED by the peer's CLOSE carries."""
        ended = event.kind is EventKind.STATE_CHANGE and event.detail("to_state") == SessionState.TERMINATED.value
        if ended and event.reason is not None:
            self._ended = (event.session, event.reason)
        if ended and event.reason is ReasonCode.PEER_CLOSE:
            try:
                self._peer_closed = (event.session, ReasonCode(event.detail("peer_reason")))
            except ValueError:  # no or an unknown peer reason: nothing the succession acts on
                self._peer_closed = None
        self._emit(event)

    def _new_runtime(self) -> ClientRuntime:
        for path, up in (self.runtime.link_up.items() if self.runtime is not None else ()):
            self._link_up[path] = up
        target = self._runtime_target = self._target()
        runtime = ClientRuntime(
            policy=self.policy,
            static=self._static,
            gateway_public=self._gateway_public if target is None else target.public_key,
            paths=[self._towards(p, target) for p in self._paths.values()],
            emit=self._session_event,
            packets=self._packets,
            set_address=self._set_address,
            random_bytes=self._random_bytes,
            wall_time_ns=self._wall_time_ns,
            recorder=self._recorder,
            tally=self._tally,
            status=self.status,
            log=self._log,
        )
        self.runtime = runtime
        return runtime

    def _towards(self, path: ClientPath, target: GatewayTarget | None) -> ClientPath:
        """``path`` as the next runtime gets it: its link state, and aimed at ``target`` if there is one."""
        path = attrs.evolve(path, link_up=self._link_up[path.path])
        return path if target is None else attrs.evolve(path, gateway=target.endpoint, control=target.control)

    async def _connect(self, runtime: ClientRuntime, succession: Succession) -> Handshaken | None:
        """Wait for the back-off, then one handshake round; None if nobody answered."""
        async with trio.open_nursery() as nursery:
            if self._packets is not None:
                nursery.start_soon(self._drop_unbound, self._packets)
            await self._wait_attempt_due(runtime, succession)
            plan = HandshakeRound(policy=self.policy, candidates=runtime.candidates(), now=trio.current_time())
            try:
                found = await runtime.handshake(plan)
            except HandshakeFailed as exc:
                succession.handshake_failed(trio.current_time(), last_attempt_at=exc.last_attempt_at)
                self._gateway_moved(self.gateway_choice.round_failed(trio.current_time()))
                found = None
            nursery.cancel_scope.cancel()
        self._publish_connecting()
        return found

    async def _wait_attempt_due(self, runtime: ClientRuntime, succession: Succession) -> None:
        """Until a round may start: its back-off is over and there is a path (a resume may cut the wait)."""
        while not (runtime.paths and trio.current_time() >= succession.next_attempt_at()):
            async with trio_util.move_on_when(self._nudge.wait_transition):
                if runtime.paths:
                    await trio.sleep_until(succession.next_attempt_at())
                else:
                    await trio.sleep_forever()

    async def _serve_session(
        self, runtime: ClientRuntime, adopt: Handshaken, seed: SessionSeed, succession: Succession
    ) -> Handshaken | None:
        """Serve one session to its end; returns a rescue's handshake to start the next one from."""
        rescued: list[Handshaken] = []
        self._rescue_out = False

        async def session(task_status: trio.TaskStatus[ClientRuntime] = trio.TASK_STATUS_IGNORED) -> None:
            await runtime.run(adopt=adopt, seed=seed, task_status=task_status)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            await nursery.start(session)
            if self._closing or self._held.value:
                runtime.submit_nowait(ev.CloseRequested())
            nursery.start_soon(self._rescue, runtime, succession, rescued)
        assert runtime.session is not None
        record = runtime.session.record
        closed, self._peer_closed = self._peer_closed, None
        peer_reason = closed[1] if closed is not None and closed[0] == record.session_id.hex else None
        # A rescue still out when the session ended may be what replaced it (its CLOSE overtook the
        # answer): not another client, so no hold; the next round handshakes afresh.
        ours = bool(rescued) or self._rescue_out
        ended, self._ended = self._ended, None
        if not rescued and ended is not None and ended[0] == record.session_id.hex:
            self._gateway_moved(self.gateway_choice.session_ended(ended[1], trio.current_time()))
        succession.session_ended(record, trio.current_time(), peer_reason=peer_reason, rescued=ours)
        return rescued[0] if rescued and not self._closing else None

    async def _rescue(self, runtime: ClientRuntime, succession: Succession, found: list[Handshaken]) -> None:
        """Replace a live session that has been unbound too long with a fresh handshake's session."""
        session = runtime.session
        assert session is not None

        def rescue_due() -> float | None:
            return succession.rescue_at(session.record)

        while True:
            await self.status.wait_value(lambda _status: rescue_due() is not None)
            due = rescue_due()
            if due is None:
                continue
            async with trio_util.move_on_when(self.status.wait_value, lambda _status: rescue_due() != due) as scope:
                await trio.sleep_until(due)
            if scope.cancelled_caught or rescue_due() is None:
                continue  # bound again, or the due time moved (a back-off, a resume): look again
            if not runtime.paths:  # nothing to handshake on: wait for a path or a change
                await self._nudge.wait_transition()
                continue
            target = self._target()
            if self._cluster and target is not None and target != self._runtime_target:
                await self._resume_at(runtime, succession, target)
                continue
            plan = HandshakeRound(policy=self.policy, candidates=runtime.candidates(), now=trio.current_time())
            self._rescue_out = True
            answer = await runtime.rescue(plan)
            self._rescue_out = False
            if answer is None:
                succession.handshake_failed(trio.current_time(), last_attempt_at=plan.last_attempt_at)
                move = self.gateway_choice.round_failed(trio.current_time())
                if move is not None:  # another gateway may answer
                    self._gateway_moved(move)
                    if self._cluster:  # the next round resumes this session there
                        continue
                    await runtime.submit(ev.CloseRequested())  # end it, so the next round starts one there
                    return
                continue
            found.append(answer)
            await runtime.submit(ev.CloseRequested())
            return

    async def _resume_at(self, runtime: ClientRuntime, succession: Succession, target: GatewayTarget) -> None:
        """One round resuming the live session at ``target``, another gateway of the cluster."""
        session = runtime.session
        assert session is not None
        self._runtime_target = target
        runtime.retarget(target.endpoint, target.control, target.public_key)
        plan = HandshakeRound(policy=self.policy, candidates=runtime.candidates(), now=trio.current_time())
        self._rescue_out = True
        resumed = await runtime.resume(plan)
        self._rescue_out = False
        now = trio.current_time()
        if resumed:
            succession.session_resumed(now)
            self._log(f"session {session.record.session_id.short} resumed at gateway {target.name}")
            return
        succession.handshake_failed(now, last_attempt_at=plan.last_attempt_at)
        self._gateway_moved(self.gateway_choice.round_failed(now))

    async def _set_address(self, address: ipaddress.IPv4Interface, address6: ipaddress.IPv6Interface | None) -> None:
        """Give the TUN the session's addresses, only when they differ from the ones it has."""
        if (address, address6) == (self.tunnel_address, self.tunnel_address6):
            return
        if self._set_address_outside is not None:
            await self._set_address_outside(address, address6)
        self.tunnel_address, self.tunnel_address6 = address, address6

    async def _drop_unbound(self, packets: PacketPort) -> None:
        """Between sessions: take what the TUN offers and count it dropped (no session to carry it)."""
        while True:
            batch = await packets.read_batch(BATCH)
            self._tally.tx_dropped_unbound += len(batch)
            self._publish_connecting()

    def _publish_connecting(self) -> None:
        self.status.value = RuntimeStatus.of(
            None,
            paths=self._paths.values(),
            tunnel_address=self.tunnel_address,
            tally=self._tally,
            sessions_started=self.sessions_started,
            tunnel_address6=self.tunnel_address6,
        )
