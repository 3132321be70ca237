"""The gateway runtime: a table of sessions, one core each, and strict binding.

Theory of operation
-------------------
Receivers (one per listening socket) authenticate datagrams and do the
cheap, stateless replies themselves: a PROBE_ACK reads the session's
current version and binding but changes nothing.  Everything that may
change a session goes to the **supervisor** through one bounded inbox as
``(observed_at, session_id, input)``; it is the only caller of the
``GatewaySession`` cores, so they need no locks, and it re-arms one timer
on the earliest ``next_deadline()`` of all sessions.

Handshakes: a valid HANDSHAKE_INIT from an authorised peer either creates
a session (new SessionID of 128 random bits, a tunnel address from the
pool, ownership claimed in the store by compare-and-swap from "absent"),
or, when it names an existing session of the same peer, rekeys it (new
keypair held as *next* until the client's first packet proves it has it;
the SessionID does not change, Property 5).  A new session for a peer that
already has one ends the old one explicitly (PEER_CLOSE).

Data: DATA is written to the TUN only if it came from the active binding
(``GatewaySession.accepts_data_from``); anything else is counted as stray
and never counts as data.  Packets from the TUN go out on the binding of
the session that owns the destination address, or are counted as dropped
while that session is unbound.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections import Counter
from typing import Any, Callable, Sequence

import attrs
import trio
import trio_util

from jvpn_trio.core import events as ev
from jvpn_trio.core import wire
from jvpn_trio.core.actions import (
    Action,
    EmitEvent,
    SendClose,
    SendReattachAck,
    SendReattachReject,
    Terminate,
)
from jvpn_trio.core.channel import ChannelDrop, SecureChannel
from jvpn_trio.core.noise import HandshakeError, PeerRecord, ResponderHandshake, StaticKeypair
from jvpn_trio.core.keyring import KeyExhausted
from jvpn_trio.core.ids import Binding, PathId, RandomBytes, SessionId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import GatewaySession, GatewaySnapshot
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.core.trace import SessionStart
from jvpn_trio.drivers.ports import Address, DatagramPort, PacketPort, equal_size_runs
from jvpn_trio.drivers.recording import Recorder
from jvpn_trio.drivers.store_memory import OwnershipStore

BATCH = 64
INBOX_CAPACITY = 4096
#: Client endpoints remembered per session (one per path is the normal case).
MAX_ENDPOINTS_PER_SESSION = 16
#: Frame types whose authentication failures are security events, not just counters.
CONTROL_TYPES = frozenset(
    {wire.MessageType.REATTACH, wire.MessageType.CLOSE, wire.MessageType.PROBE}
)



class AddressPoolExhausted(Exception):
    pass


@attrs.define
class GatewayPeer:
    name: str
    public: bytes
    address: ipaddress.IPv4Address | None = None
    last_timestamp: bytes | None = None


@attrs.define(eq=False)
class ServedSession:
    core: GatewaySession
    channel: SecureChannel
    peer: GatewayPeer
    address: ipaddress.IPv4Address
    ports: dict[Address, DatagramPort] = attrs.Factory(dict)  # where DATA to this endpoint leaves
    control_ports: dict[Address, DatagramPort] = attrs.Factory(dict)  # where control replies leave
    paths: dict[Address, PathId] = attrs.Factory(dict)
    init_path: PathId | None = None
    last_alive_report: float = -math.inf

    @property
    def session_id(self) -> SessionId:
        return self.core.record.session_id

    def learn(self, addr: Address, port: DatagramPort, path: PathId | None, *, control: bool) -> None:
        """Remember how to answer ``addr``: by the port it used, per kind of traffic (bounded)."""
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
class GatewayStatus:
    sessions: tuple[tuple[GatewaySnapshot, str, str], ...]  # (snapshot, peer name, tunnel address)
    counters: tuple[tuple[str, int], ...]


class AddressPool:
    """Tunnel addresses: fixed ones for peers that name one, the rest handed out lowest first."""

    def __init__(self, tunnel: ipaddress.IPv4Interface, reserved: set[ipaddress.IPv4Address]) -> None:
        self._free = [a for a in tunnel.network.hosts() if a != tunnel.ip and a not in reserved]
        self._free.reverse()  # pop() from the end hands out the lowest address first

    def allocate(self) -> ipaddress.IPv4Address:
        if not self._free:
            raise AddressPoolExhausted("no free tunnel address")
        return self._free.pop()

    def release(self, address: ipaddress.IPv4Address) -> None:
        self._free.append(address)
        self._free.sort(reverse=True)


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
    ) -> None:
        self.policy = policy
        self._static = static
        self._peers = {p.public: p for p in peers}
        self.tunnel = tunnel
        self._pool = AddressPool(tunnel, {p.address for p in peers if p.address is not None})
        self._store = store
        self.node_id = node_id
        self._emit = emit
        self._random_bytes = random_bytes
        self._recorder = recorder
        self.sessions: dict[SessionId, ServedSession] = {}
        self._by_index: dict[int, ServedSession] = {}
        self._by_address: dict[ipaddress.IPv4Address, ServedSession] = {}
        self._by_peer: dict[bytes, ServedSession] = {}
        self.counters: Counter[str] = Counter()
        self.status = trio_util.AsyncValue[GatewayStatus | None](None)
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[float, SessionId, Any]](INBOX_CAPACITY)
        self._last_now = -math.inf
        self._packets: PacketPort | None = None

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

        ``ports`` carry DATA; ``control_ports`` (each the data port + 1, see
        ``client.control_endpoint``) carry handshakes, probes, REATTACH and
        CLOSE in their own kernel queues.  Any port accepts any message; a
        reply leaves by the port its request came in on.
        """
        self._packets = packets
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._supervise)
                for port in [*ports, *control_ports]:
                    nursery.start_soon(self._receive, port)
                if packets is not None:
                    nursery.start_soon(self._pump_packets, packets)
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
            self.counters["inbox_full"] += 1
            return False
        return True

    # -- the supervisor ---------------------------------------------------------------------------
    def _next_deadline(self) -> float:
        deadlines = [d for s in self.sessions.values() if (d := s.core.next_deadline()) is not None]
        return min(deadlines) if deadlines else math.inf

    async def _supervise(self) -> None:
        while True:
            deadline = self._next_deadline()
            item = None
            with trio.move_on_at(deadline):
                item = await self._inbox.receive()
            if item is None:
                now = max(deadline, trio.current_time())
                for served in list(self.sessions.values()):
                    due = served.core.next_deadline()
                    if due is not None and due <= now:
                        self._feed(served, ev.TimerFired(), now)
            else:
                at, session_id, event = item
                target = self.sessions.get(session_id)
                if target is None:
                    self.counters["input_for_unknown_session"] += 1
                    continue
                self._feed(target, event, at)
            await self._reap()
            self._publish()

    def _feed(self, served: ServedSession, event: Any, at: float) -> None:
        now = max(at, self._last_now)
        self._last_now = now
        actions = served.core.handle(event, now=now)
        if self._recorder is not None:
            self._recorder.step("gateway", served.session_id.hex, now, event, actions)
        self._apply(served, actions)

    def _apply(self, served: ServedSession, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, EmitEvent):
                self._emit(action)
            elif isinstance(action, SendReattachAck):
                msg = wire.ReattachAck(
                    session_id=served.session_id, nonce=action.nonce, new_version=action.new_version, path_id=action.path
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
            elif isinstance(action, SendClose):
                binding = served.core.record.binding
                if binding is not None:
                    close = wire.Close(session_id=served.session_id, reason=action.reason)
                    self._send(served, binding.endpoint, wire.MessageType.CLOSE, wire.encode_close_plaintext(close))
            elif isinstance(action, Terminate):
                self.counters[f"terminated_{action.reason.value.lower()}"] += 1
            # BindTransport / ReleaseTransport: the binding *is* the core's record, which the
            # data path reads through accepts_data_from(); there is no second copy to update.

    async def _reap(self) -> None:
        for served in [s for s in self.sessions.values() if s.core.terminated]:
            self._forget(served)
            await self._store.release(served.session_id, self.node_id, expected_revision=served.core.held_revision)

    def _forget(self, served: ServedSession) -> None:
        self.sessions.pop(served.session_id, None)
        for index in served.channel.keyring.local_indices():
            self._by_index.pop(index, None)
        if self._by_address.get(served.address) is served:
            del self._by_address[served.address]
            if served.peer.address is None:
                self._pool.release(served.address)
        if self._by_peer.get(served.peer.public) is served:
            del self._by_peer[served.peer.public]

    def _publish(self) -> None:
        now = self._last_now
        self.status.value = GatewayStatus(
            sessions=tuple(
                (s.core.snapshot(now=now), s.peer.name, str(s.address)) for s in self.sessions.values()
            ),
            counters=tuple(sorted(self.counters.items())),
        )

    def _send(self, served: ServedSession, addr: Address, msg_type: wire.MessageType, plaintext: bytes) -> None:
        port = served.port_for(addr, control=msg_type is not wire.MessageType.DATA)
        if port is None:
            self.counters["send_no_port"] += 1
            return
        try:
            datagram = served.channel.seal(msg_type, plaintext)
        except KeyExhausted:
            self.counters["keys_exhausted"] += 1
            self.submit_nowait(served.session_id, ev.KeysExhausted())
            return
        port.send_nowait(datagram, addr)

    # -- receiving ------------------------------------------------------------------------------
    async def _receive(self, port: DatagramPort) -> None:
        while True:
            batch = await port.recv_batch(BATCH)
            now = trio.current_time()
            for data, addr in batch:
                await self._on_datagram(port, data, addr, now)

    async def _on_datagram(self, port: DatagramPort, data: bytes, addr: Address, now: float) -> None:
        try:
            msg_type = wire.peek_type_untrusted(data)
        except wire.BadFrame:
            self.counters["drop_malformed"] += 1
            return
        if msg_type is wire.MessageType.HANDSHAKE_INIT:
            await self._on_handshake(port, data, addr, now)
            return
        if msg_type is wire.MessageType.HANDSHAKE_RESP:
            self.counters["drop_unexpected_handshake_resp"] += 1
            return
        index = int.from_bytes(data[4:8], "big") if len(data) >= 8 else -1
        served = self._by_index.get(index)
        if served is None:
            self.counters["drop_unknown_index"] += 1
            return
        try:
            opened = served.channel.open_untrusted(data, now=now)
        except ChannelDrop as drop:
            self.counters[f"drop_{drop.reason.value.lower()}"] += 1
            if msg_type in CONTROL_TYPES and msg_type is not wire.MessageType.PROBE:
                await self._inbox_send.send(
                    (now, served.session_id, ev.FrameDropped(reason=drop.reason, endpoint=addr, frame=msg_type.name))
                )
            return
        self._index_keys(served)
        try:
            await self._dispatch(served, port, opened.msg_type, opened.plaintext, addr, now)
        except wire.BadFrame:
            self.counters["drop_malformed_plaintext"] += 1

    async def _dispatch(
        self,
        served: ServedSession,
        port: DatagramPort,
        kind: wire.MessageType,
        plaintext: bytes,
        addr: Address,
        now: float,
    ) -> None:
        core = served.core
        if kind is wire.MessageType.DATA:
            served.learn(addr, port, None, control=False)
            await self._alive(served, addr, served.paths.get(addr, served.init_path), now)
            if not core.accepts_data_from(addr):
                self.counters["stray_data"] += 1
                return
            self.counters["rx_packets"] += 1
            self.counters["rx_bytes"] += len(plaintext)
            if plaintext and self._packets is not None and not self._packets.write_nowait(plaintext):
                self.counters["rx_tun_full"] += 1
        elif kind is wire.MessageType.PROBE:
            probe = wire.decode_probe_plaintext_untrusted(plaintext)
            served.learn(addr, port, probe.path_id, control=True)
            await self._alive(served, addr, probe.path_id, now)
            ack = wire.ProbeAck(
                path_id=probe.path_id,
                seq=probe.seq,
                echo_sent_us=probe.sent_us,
                gateway_state_version=core.record.version,
                bound_path_id=core.bound_path_seen_from(addr),
            )
            self._send(served, addr, wire.MessageType.PROBE_ACK, wire.encode_probe_ack_plaintext(ack))
        elif kind is wire.MessageType.REATTACH:
            req = wire.decode_reattach_plaintext_untrusted(plaintext)
            served.learn(addr, port, req.path_id, control=True)
            ownership = await self._store.read(served.session_id)
            await self._inbox_send.send(
                (
                    now,
                    served.session_id,
                    ev.ReattachReceived(
                        session_id=req.session_id,
                        path=req.path_id,
                        endpoint=addr,
                        nonce=req.nonce,
                        client_ts_ms=req.client_ts_ms,
                        expected_version=req.expected_version,
                        proof_valid=True,
                        ownership=ownership,
                        metadata=req.metadata,
                    ),
                )
            )
        elif kind is wire.MessageType.CLOSE:
            close = wire.decode_close_plaintext_untrusted(plaintext)
            await self._inbox_send.send((now, served.session_id, ev.PeerClosed(reason=close.reason)))
        else:
            self.counters["drop_unexpected_type"] += 1

    async def _alive(self, served: ServedSession, addr: Address, path: PathId | None, now: float) -> None:
        """Tell the core the session is alive: at once while unconfirmed, then coalesced per interval."""
        core = served.core
        interval = self.policy.probe_interval_ms / 1000.0
        due = core.accepts_data_from(addr) and now - served.last_alive_report >= interval
        if path is None or not (core.awaiting_confirmation or due):
            return
        served.last_alive_report = now
        await self._inbox_send.send((now, served.session_id, ev.PacketAuthenticated(endpoint=addr, path=path)))

    def _index_keys(self, served: ServedSession) -> None:
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

    async def _on_handshake(self, port: DatagramPort, data: bytes, addr: Address, now: float) -> None:
        try:
            init = wire.decode_handshake_init_untrusted(data)
            hs = ResponderHandshake.consume_init(init, self._static, lookup_peer=self._lookup_peer)
        except wire.BadFrame:
            self.counters["handshake_malformed"] += 1
            return
        except HandshakeError as exc:
            self.counters[f"handshake_{exc.reason.value.lower()}"] += 1
            return
        peer = self._peers[hs.peer_public]
        peer.last_timestamp = hs.timestamp
        if hs.rekey_session is not None:
            self._on_rekey(hs, peer, port, addr, now)
            return
        previous = self._by_peer.get(peer.public)
        if previous is not None and not previous.core.terminated:
            await self._inbox_send.send((now, previous.session_id, ev.PeerClosed(reason=ReasonCode.PEER_CLOSE)))
            self._by_address.pop(previous.address, None)
        try:
            address = peer.address or self._pool.allocate()
        except AddressPoolExhausted:
            self.counters["handshake_pool_exhausted"] += 1
            return
        session_id = SessionId.generate(self._random_bytes)
        claim = await self._store.claim(session_id, self.node_id, expected_revision=0)
        if not claim.succeeded or claim.record is None:
            self.counters["handshake_claim_failed"] += 1
            if peer.address is None:
                self._pool.release(address)
            return
        core = GatewaySession(
            policy=self.policy,
            session_id=session_id,
            now=now,
            node_id=self.node_id,
            held_revision=claim.record.revision,
            handshake_binding=Binding(path=hs.path_id, endpoint=addr),
        )
        resp, result = hs.respond(
            session_id=session_id,
            state_version=core.record.version + 1,  # the version it will have once the client confirms
            tunnel_ipv4=address,
            prefix_len=self.tunnel.network.prefixlen,
            sender_index=self._new_index(),
            random_bytes=self._random_bytes,
        )
        channel = SecureChannel(self.policy)
        channel.install_next(result.keypair(created_at=now))
        served = ServedSession(core=core, channel=channel, peer=peer, address=address, init_path=hs.path_id)
        served.learn(addr, port, hs.path_id, control=True)
        self.sessions[session_id] = served
        self._by_address[address] = served
        self._by_peer[peer.public] = served
        self._index_keys(served)
        created = core.creation_events()
        if self._recorder is not None:
            start = SessionStart(
                side="gateway",
                now=now,
                session=session_id.hex,
                policy=self.policy.to_mapping(),
                node_id=self.node_id,
                held_revision=claim.record.revision,
                handshake_binding=core.handshake_binding,
            )
            self._recorder.started(start, created)
        for action in created:
            if isinstance(action, EmitEvent):
                self._emit(action)
        port.send_nowait(wire.encode_handshake_resp(resp), addr)
        self.counters["sessions_created"] += 1

    def _on_rekey(self, hs: ResponderHandshake, peer: GatewayPeer, port: DatagramPort, addr: Address, now: float) -> None:
        served = self.sessions.get(hs.rekey_session) if hs.rekey_session else None
        if served is None or served.peer is not peer or served.core.terminated:
            self.counters["rekey_unknown_session"] += 1
            return
        resp, result = hs.respond(
            session_id=served.session_id,
            state_version=served.core.record.version,
            tunnel_ipv4=served.address,
            prefix_len=self.tunnel.network.prefixlen,
            sender_index=self._new_index(),
            random_bytes=self._random_bytes,
        )
        before = served.channel.keyring.local_indices()
        served.channel.install_next(result.keypair(created_at=now))
        for index in before - served.channel.keyring.local_indices():
            self._by_index.pop(index, None)
        self._index_keys(served)
        served.learn(addr, port, hs.path_id, control=True)
        port.send_nowait(wire.encode_handshake_resp(resp), addr)
        self.counters["rekeys"] += 1

    # -- the TUN side ---------------------------------------------------------------------------
    async def _pump_packets(self, packets: PacketPort) -> None:
        """TUN -> sessions: seal each packet for the session owning its destination, batch per binding."""
        while True:
            outgoing: dict[int, tuple[ServedSession, Address, list[bytes]]] = {}
            for packet in await packets.read_batch(BATCH):
                if len(packet) < 20 or packet[0] >> 4 != 4:
                    self.counters["tx_not_ipv4"] += 1
                    continue
                served = self._by_address.get(ipaddress.IPv4Address(packet[16:20]))
                binding = served.core.record.binding if served is not None else None
                if served is None or binding is None:
                    self.counters["tx_no_binding"] += 1
                    continue
                try:
                    datagram = served.channel.seal(wire.MessageType.DATA, packet)
                except KeyExhausted:
                    self.counters["keys_exhausted"] += 1
                    self.submit_nowait(served.session_id, ev.KeysExhausted())
                    continue
                entry = outgoing.setdefault(id(served), (served, binding.endpoint, []))
                entry[2].append(datagram)
                self.counters["tx_packets"] += 1
                self.counters["tx_bytes"] += len(packet)
            for served, endpoint, datagrams in outgoing.values():
                port = served.port_for(endpoint, control=False)
                if port is None:
                    self.counters["send_no_port"] += len(datagrams)
                    continue
                for run in equal_size_runs(datagrams):
                    port.send_segments_nowait(run, endpoint)
