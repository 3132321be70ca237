"""The client runtime: one supervisor task owns the session core; the rest move bytes.

Theory of operation
-------------------
:meth:`ClientRuntime.run` first handshakes with the gateway on the paths a
:class:`~jvpn_trio.core.connect.HandshakePlanner` names, each until the
deadline it gives, then opens the packet port (the TUN, through a factory
that knows the assigned address) and starts, in one nursery:

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

Inputs are stamped when observed, not when processed, so RTTs are measured
where the bytes moved and a recorded trace replays exactly.
"""

from __future__ import annotations

import ipaddress
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, AsyncContextManager, Callable

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
    SendReattach,
    Terminate,
)
from jvpn_trio.core.channel import ChannelDrop, SecureChannel
from jvpn_trio.core.connect import HandshakeCandidate, HandshakeGiveUp, HandshakePlanner
from jvpn_trio.core.noise import HandshakeError, HandshakeResult, InitiatorHandshake, StaticKeypair
from jvpn_trio.core.keyring import KeyExhausted
from jvpn_trio.core.ids import Binding, PathId, RandomBytes
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import ClientSession, ClientSnapshot
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.core.trace import SessionStart
from jvpn_trio.drivers.ports import Address, DatagramPort, PacketPort, equal_size_runs
from jvpn_trio.drivers.recording import Recorder

#: How many datagrams / packets one wake-up handles before yielding.
BATCH = 64
#: Inbox depth: inputs waiting for the supervisor.  Producers wait when it is full (backpressure).
INBOX_CAPACITY = 4096

PacketPortFactory = Callable[[ipaddress.IPv4Interface], AsyncContextManager[PacketPort | None]]


class HandshakeFailed(Exception):
    """The gateway did not complete a handshake on any path in time."""


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

    def is_gateway(self, addr: Address) -> bool:
        return addr == self.gateway or addr == self.control


_NO_COUNTS: Mapping[ReasonCode, int] = MappingProxyType({})


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
    handshake_sent: int = 0  # HANDSHAKE_INITs of the first handshake
    handshake_stray: int = 0  # responses to no handshake of ours
    handshake: Mapping[ReasonCode, int] = attrs.field(default=_NO_COUNTS, hash=False)  # responses refused
    rekeys: int = 0
    reattach_sent: int = 0
    keys_exhausted: int = 0  # seals refused because the keys are used up
    inbox_full: int = 0  # inputs from outside dropped because the supervisor's inbox was full
    stray_source: int = 0  # datagrams on a path socket from anyone but the gateway
    drop: Mapping[ReasonCode, int] = attrs.field(default=_NO_COUNTS, hash=False)  # datagrams not opened
    drop_malformed_plaintext: int = 0  # authenticated, but the message inside does not parse
    unexpected_type: int = 0  # authenticated messages only a gateway receives


@attrs.define
class _Tally:
    """The mutable counters behind :class:`ClientStatistics` (same fields)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped_unbound: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_tun_full: int = 0
    handshake_sent: int = 0
    handshake_stray: int = 0
    handshake: Counter[ReasonCode] = attrs.Factory(Counter)
    rekeys: int = 0
    reattach_sent: int = 0
    keys_exhausted: int = 0
    inbox_full: int = 0
    stray_source: int = 0
    drop: Counter[ReasonCode] = attrs.Factory(Counter)
    drop_malformed_plaintext: int = 0
    unexpected_type: int = 0

    def freeze(self) -> ClientStatistics:
        values = attrs.asdict(self, recurse=False)
        values["handshake"] = MappingProxyType(dict(self.handshake))
        values["drop"] = MappingProxyType(dict(self.drop))
        return ClientStatistics(**values)


@attrs.frozen(kw_only=True)
class RuntimeStatus:
    """What the UI and ``status`` show: the core's snapshot plus the driver's statistics."""

    snapshot: ClientSnapshot
    paths: tuple[tuple[PathId, str, str], ...]  # (path, interface, kind)
    tunnel_address: str | None
    statistics: ClientStatistics


class ClientRuntime:
    def __init__(
        self,
        *,
        policy: Policy,
        static: StaticKeypair,
        gateway_public: bytes,
        paths: list[ClientPath],
        emit: Callable[[EmitEvent], None],
        random_bytes: RandomBytes = os.urandom,
        wall_time_ns: Callable[[], int] = time.time_ns,
        recorder: Recorder | None = None,
    ) -> None:
        if not paths:
            raise ValueError("a client needs at least one path")
        self.policy = policy
        self._static = static
        self._gateway_public = gateway_public
        self.paths = {p.path: p for p in sorted(paths, key=lambda p: (p.priority, p.path.value))}
        self._emit = emit
        self._random_bytes = random_bytes
        self._wall_time_ns = wall_time_ns
        self._recorder = recorder
        self.channel = SecureChannel(policy)
        self.session: ClientSession | None = None
        self.tunnel_address: ipaddress.IPv4Interface | None = None
        self._tally = _Tally()
        self._planner: HandshakePlanner | None = None
        self.status = trio_util.AsyncValue[RuntimeStatus | None](None)
        self.termination_reason: ReasonCode | None = None
        self._active: ClientPath | None = None
        self._packets: PacketPort | None = None
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[float, Any]](INBOX_CAPACITY)
        self._last_now = -math.inf
        self._pending_rekey: tuple[InitiatorHandshake, int, trio.Event] | None = None
        self._rekey_result: HandshakeResult | None = None
        self._delivery_reported: dict[PathId, float] = {}

    def statistics(self) -> ClientStatistics:
        """The driver's counters now (a frozen copy)."""
        return self._tally.freeze()

    # -- inputs from outside (netlink, UI keys, signals) --------------------------------
    def submit_nowait(self, event: Any) -> bool:
        """Queue an input stamped now; False (and counted) if the inbox is full.

        A link change during the first handshake also tells the planner which paths to try.
        """
        if self._planner is not None and isinstance(event, ev.LinkChanged):
            self._planner.link_changed(event.path, up=event.up)
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

    # -- lifetime ---------------------------------------------------------------------------
    async def run(
        self,
        *,
        packets: PacketPortFactory | None = None,
        task_status: trio.TaskStatus[ClientRuntime] = trio.TASK_STATUS_IGNORED,
    ) -> ReasonCode:
        """Handshake, then serve until the session terminates; returns the termination reason."""
        result, path = await self._handshake()
        now = trio.current_time()
        self.channel.install_current(result.keypair(created_at=now))
        self.tunnel_address = ipaddress.IPv4Interface(f"{result.tunnel_ipv4}/{result.prefix_len}")
        session = ClientSession(policy=self.policy, session_id=result.session_id, now=now)
        self.session = session
        created = session.creation_events()
        if self._recorder is not None:
            start = SessionStart(side="client", now=now, session=result.session_id.hex, policy=self.policy.to_mapping())
            self._recorder.started(start, created)
        self._apply(created, now)
        for p in self.paths.values():
            await self._feed(
                ev.PathAdded(path=p.path, priority=p.priority, endpoint=p.gateway, link_up=p.link_up), now
            )
        await self._feed(
            ev.HandshakeCompleted(
                session_id=result.session_id,
                binding=Binding(path=path.path, endpoint=path.gateway),
                gateway_version=result.state_version,
            ),
            now,
        )
        factory = packets or _no_packets
        async with factory(self.tunnel_address) as port:
            self._packets = port
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._supervise, nursery.cancel_scope)
                for p in self.paths.values():
                    nursery.start_soon(self._receive, p)
                    nursery.start_soon(self._probe, p)
                if port is not None:
                    nursery.start_soon(self._pump_packets, port)
                nursery.start_soon(self._rekey_loop)
                task_status.started(self)
        self._packets = None
        return self.termination_reason or ReasonCode.LOCAL_CLOSE

    # -- handshake ------------------------------------------------------------------------------
    async def _handshake(self) -> tuple[HandshakeResult, ClientPath]:
        """Send inits where the planner says, each answered or abandoned by its deadline.

        Raises :class:`HandshakeFailed` when the planner gives up.
        """
        candidates = [
            HandshakeCandidate(path=p.path, priority=p.priority, link_up=p.link_up) for p in self.paths.values()
        ]
        planner = HandshakePlanner(policy=self.policy, candidates=candidates, now=trio.current_time())
        self._planner = planner
        try:
            while True:
                step = planner.next_attempt(now=trio.current_time())
                if isinstance(step, HandshakeGiveUp):
                    names = ", ".join(self.paths[p].name for p in step.paths)
                    raise HandshakeFailed(f"no handshake answer from the gateway on {names} within {step.after_ms} ms")
                path = self.paths[step.path]
                state, sender_index = self._send_handshake_init(path)
                self._tally.handshake_sent += 1
                with trio.move_on_at(step.deadline):
                    while True:
                        for data, addr in await path.port.recv_batch(BATCH):
                            result = self._try_response(state, sender_index, data, addr, path)
                            if result is not None:
                                return result, path
        finally:
            self._planner = None

    def _send_handshake_init(self, path: ClientPath, *, rekey: bool = False) -> tuple[InitiatorHandshake, int]:
        """Send a HANDSHAKE_INIT on ``path``; a rekey names the session, so its SessionID stays (Property 5)."""
        sender_index = int.from_bytes(self._random_bytes(4), "big")
        state, init = InitiatorHandshake.create(
            self._static,
            self._gateway_public,
            sender_index=sender_index,
            random_bytes=self._random_bytes,
            wall_time_ns=self._wall_time_ns(),
            path_id=path.path,
            rekey_session=self.session.record.session_id if rekey and self.session is not None else None,
        )
        path.port.send_nowait(wire.encode_handshake_init(init), path.control)
        return state, sender_index

    def _try_response(
        self, state: InitiatorHandshake, sender_index: int, data: bytes, addr: Address, path: ClientPath
    ) -> HandshakeResult | None:
        if not path.is_gateway(addr):
            self._tally.stray_source += 1
            return None
        try:
            resp = wire.decode_handshake_resp_untrusted(data)
        except wire.BadFrame:
            self._tally.handshake[ReasonCode.MALFORMED] += 1
            return None
        if resp.receiver_index != sender_index:
            self._tally.handshake_stray += 1
            return None
        try:
            return state.consume_response(resp)
        except HandshakeError as exc:
            self._tally.handshake[exc.reason] += 1
            return None

    # -- the supervisor ------------------------------------------------------------------------
    async def _feed(self, event: Any, now: float) -> None:
        """Call the core once (only the supervisor and ``run``'s setup do) and act."""
        assert self.session is not None
        now = max(now, self._last_now)
        self._last_now = now
        actions = self.session.handle(event, now=now)
        if self._recorder is not None:
            self._recorder.step("client", self.session.record.session_id.hex, now, event, actions)
        self._apply(actions, now)
        self._publish(now)

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
                self._active = self.paths[action.binding.path]
            elif isinstance(action, ReleaseTransport):
                if self._active is not None and self._active.path == action.binding.path:
                    self._active = None
            elif isinstance(action, SendReattach):
                self._send_reattach(action)
            elif isinstance(action, SendClose):
                self._send_close(action.reason)
            elif isinstance(action, Terminate):
                self.termination_reason = action.reason

    def _publish(self, now: float) -> None:
        assert self.session is not None
        self.status.value = RuntimeStatus(
            snapshot=self.session.snapshot(now=now),
            paths=tuple((p.path, p.name, p.kind) for p in self.paths.values()),
            tunnel_address=str(self.tunnel_address) if self.tunnel_address else None,
            statistics=self._tally.freeze(),
        )

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
        path = self.paths[action.path]
        msg = wire.Reattach(
            session_id=self.session.record.session_id,
            path_id=action.path,
            nonce=action.nonce,
            client_ts_ms=action.client_ts_ms,
            expected_version=action.expected_version,
        )
        datagram = self._seal(wire.MessageType.REATTACH, wire.encode_reattach_plaintext(msg))
        if datagram is not None:
            path.port.send_nowait(datagram, path.control)
            self._tally.reattach_sent += 1

    def _send_close(self, reason: ReasonCode) -> None:
        assert self.session is not None
        target = self._active
        if target is None:
            return
        plaintext = wire.encode_close_plaintext(wire.Close(session_id=self.session.record.session_id, reason=reason))
        datagram = self._seal(wire.MessageType.CLOSE, plaintext)
        if datagram is not None:
            target.port.send_nowait(datagram, target.control)

    # -- per-path tasks ------------------------------------------------------------------------
    async def _probe(self, path: ClientPath) -> None:
        seq = 0
        async for _ in trio_util.periodic(self.policy.probe_interval_ms / 1000.0):
            seq = (seq + 1) % (1 << 32)
            now = trio.current_time()
            await self.submit(ev.ProbeSent(path=path.path, seq=seq), at=now)
            probe = wire.Probe(path_id=path.path, seq=seq, sent_us=int(now * 1e6) % (1 << 64))
            datagram = self._seal(wire.MessageType.PROBE, wire.encode_probe_plaintext(probe))
            if datagram is not None:
                path.port.send_nowait(datagram, path.control)

    async def _receive(self, path: ClientPath) -> None:
        while True:
            batch = await path.port.recv_batch(BATCH)
            now = trio.current_time()
            for data, addr in batch:
                if not path.is_gateway(addr):
                    self._tally.stray_source += 1
                    continue
                await self._on_datagram(path, data, now)

    async def _on_datagram(self, path: ClientPath, data: bytes, now: float) -> None:
        try:
            msg_type = wire.peek_type_untrusted(data)
        except wire.BadFrame:
            self._tally.drop[ReasonCode.MALFORMED] += 1
            return
        if msg_type is wire.MessageType.HANDSHAKE_RESP:
            self._on_rekey_response(data)
            return
        try:
            opened = self.channel.open_untrusted(data, now=now)
        except ChannelDrop as drop:
            self._tally.drop[drop.reason] += 1
            return
        if opened.msg_type is wire.MessageType.DATA:  # the per-packet path: nothing to decode
            self._deliver(path, opened.plaintext, now)
            return
        try:
            message = wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext)
        except wire.BadFrame:
            self._tally.drop_malformed_plaintext += 1
            return
        event: ev.ClientInput
        match message:
            case wire.ProbeAck(seq=seq, gateway_state_version=version, bound_path_id=bound):
                event = ev.ProbeAcked(path=path.path, seq=seq, gateway_version=version, gateway_bound_path=bound)
            case wire.ReattachAck(nonce=nonce, new_version=version):
                event = ev.ReattachAcked(path=path.path, nonce=nonce, new_version=version)
            case wire.ReattachReject(nonce=nonce, reason=reason, current_version=version):
                event = ev.ReattachRejected(path=path.path, nonce=nonce, reason=reason, current_version=version)
            case wire.Close(reason=reason):
                event = ev.PeerClosed(reason=reason)
            case _:  # PROBE, REATTACH: only the gateway receives those
                self._tally.unexpected_type += 1
                return
        await self.submit(event, at=now)

    def _deliver(self, path: ClientPath, packet: bytes, now: float) -> None:
        tally = self._tally
        tally.rx_packets += 1
        tally.rx_bytes += len(packet)
        if packet and self._packets is not None and not self._packets.write_nowait(packet):
            tally.rx_tun_full += 1
        last = self._delivery_reported.get(path.path, -math.inf)
        if now - last >= self.policy.probe_interval_ms / 1000.0:
            self._delivery_reported[path.path] = now
            self.submit_nowait(ev.DeliveryObserved(path=path.path))

    async def _pump_packets(self, port: PacketPort) -> None:
        while True:
            batch = await port.read_batch(BATCH)
            active = self._active
            tally = self._tally
            if active is None:
                tally.tx_dropped_unbound += len(batch)
                continue
            sealed = []
            for packet in batch:
                datagram = self._seal(wire.MessageType.DATA, packet)
                if datagram is None:
                    break
                sealed.append(datagram)
                tally.tx_bytes += len(packet)
            tally.tx_packets += len(sealed)
            for run in equal_size_runs(sealed):
                active.port.send_segments_nowait(run, active.gateway)

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
            if target is None:
                await trio.sleep(retry_s)
                continue
            done = trio.Event()
            state, sender_index = self._send_handshake_init(target, rekey=True)
            self._pending_rekey = (state, sender_index, done)
            with trio.move_on_after(retry_s):
                await done.wait()
            result, self._rekey_result, self._pending_rekey = self._rekey_result, None, None
            if result is not None:
                self.channel.install_current(result.keypair(created_at=trio.current_time()))
                self._tally.rekeys += 1

    def _on_rekey_response(self, data: bytes) -> None:
        pending = self._pending_rekey
        if pending is None:
            self._tally.handshake_stray += 1
            return
        state, sender_index, done = pending
        try:
            resp = wire.decode_handshake_resp_untrusted(data)
            if resp.receiver_index != sender_index:
                self._tally.handshake_stray += 1
                return
            result = state.consume_response(resp)
        except wire.BadFrame:
            self._tally.handshake[ReasonCode.MALFORMED] += 1
            return
        except HandshakeError as exc:
            self._tally.handshake[exc.reason] += 1
            return
        self._rekey_result = result
        done.set()


class _NoPackets:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _no_packets(_address: ipaddress.IPv4Interface) -> AsyncContextManager[None]:
    return _NoPackets()
