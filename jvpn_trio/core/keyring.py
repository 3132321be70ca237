"""Transport keys of one session and their rotation (wireguard-go's ``keypair.go``).

A :class:`KeyRing` holds up
to three keypairs: *previous* (still accepted, so packets in flight across a
rekey are not lost), *current* (the one we send with) and *next* (responder
side: installed by a completed handshake, promoted to current only when a
packet first authenticates with it, since only then do we know the initiator
has the keys too).  The initiator installs its new keypair straight as
current.  Rekeying never changes the SessionId (Property 5): a rekey
handshake carries the session id in the init payload and the responder must
answer with the same one.

Each keypair sends on two *lanes*, each with its own counter: DATA and
DATA_PARTIAL on the data lane, every other transport message (PROBE,
REATTACH, CLOSE...) on the control lane.  The lane is the nonce's first four
bytes, so a counter never repeats under one key, and the receiver keeps one
replay window per lane (``core/channel.py``).  Why: a PROBE sent on an idle
path overtakes the DATA queued on the busy one (the receiver's socket holds
thousands of datagrams under load); in one counter space it slid the window
past them all and every one was refused as too old (docs/wire-format.md,
"Lanes").

Errors are :class:`DecryptFailed` and :class:`KeyExhausted`; no
``cryptography`` exception escapes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from jvpn_trio.core import wire
from jvpn_trio.core.offload import PartialPacket
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.core.wire import MessageType, TransportFrame, TransportHeader

#: Transport key size (ChaCha20-Poly1305).
KEY_LEN = 32
#: ChaCha20-Poly1305 nonce: the lane (u32) then the counter (u64), little-endian.  The data
#: lane's nonce is WireGuard's: 4 zero bytes, then the counter.
_NONCE = struct.Struct("<IQ")
#: The lane of DATA and DATA_PARTIAL.
DATA_LANE = 0
#: The lane of every other transport message.
CONTROL_LANE = 1

_key_bytes = wire.exact_bytes(KEY_LEN)


class DecryptFailed(Exception):
    """A transport frame that does not open: unknown index, expired key, or bad tag.

    ``reason`` is STRAY_PACKET (no keypair has that index) or DECRYPT_FAILED.
    """

    def __init__(self, reason: ReasonCode, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class KeyExhausted(Exception):
    """No keypair may send: none installed yet, or the current one reached reject_after_messages."""


def aead_nonce(counter: int, *, lane: int) -> bytes:
    """The 12-byte ChaCha20-Poly1305 nonce for a 64-bit counter on ``lane``."""
    return _NONCE.pack(lane, counter)


def lane_of(type_byte: int) -> int:
    """The lane of a transport message, from its type (byte 1 of the datagram)."""
    return DATA_LANE if type_byte in wire.DATA_TYPE_BYTES else CONTROL_LANE


@attrs.define(kw_only=True)
class Keypair:
    """One direction pair of transport keys, their indices, age and send counters.

    Mutable only in ``send_counters``, the next counter of each lane (indexed
    by lane), which the key ring advances.  The receive-side replay windows are
    kept by the caller per ``local_index`` and lane (``core/channel.py``).
    """

    send_key: bytes = attrs.field(validator=_key_bytes, repr=False)
    recv_key: bytes = attrs.field(validator=_key_bytes, repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool
    created_at: float
    send_counters: list[int] = attrs.Factory(lambda: [0, 0])
    _send_aead: ChaCha20Poly1305 = attrs.field(init=False, repr=False, eq=False)
    _recv_aead: ChaCha20Poly1305 = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        # Built once: the data path seals and opens with these for every packet.
        self._send_aead = ChaCha20Poly1305(self.send_key)
        self._recv_aead = ChaCha20Poly1305(self.recv_key)

    def age(self, now: float) -> float:
        return now - self.created_at

    def seal(self, counter: int, plaintext: bytes, associated: bytes, *, lane: int) -> bytes:
        return self._send_aead.encrypt(_NONCE.pack(lane, counter), plaintext, associated)

    def open(self, counter: int, ciphertext: bytes, associated: bytes, *, lane: int) -> bytes:
        """Raises DecryptFailed(DECRYPT_FAILED) when the tag does not authenticate."""
        try:
            return self._recv_aead.decrypt(_NONCE.pack(lane, counter), ciphertext, associated)
        except InvalidTag:
            raise DecryptFailed(ReasonCode.DECRYPT_FAILED, "tag does not authenticate") from None


class KeyRing:
    """previous / current / next keypairs of one session, with the policy's limits.

    State changes: :meth:`install_current`, :meth:`install_next`,
    :meth:`open` (promotes *next* on its first authenticated packet),
    :meth:`next_send_counter` (advances one of the current send counters) and
    :meth:`drop_expired`.  Nothing else mutates it.
    """

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._previous: Keypair | None = None
        self._current: Keypair | None = None
        self._next: Keypair | None = None

    @property
    def previous(self) -> Keypair | None:
        return self._previous

    @property
    def current(self) -> Keypair | None:
        return self._current

    @property
    def next(self) -> Keypair | None:
        return self._next

    def keypairs(self) -> tuple[Keypair, ...]:
        """Live keypairs, newest first."""
        return tuple(kp for kp in (self._next, self._current, self._previous) if kp is not None)

    def local_indices(self) -> frozenset[int]:
        """Indices the peer may address us by: the gateway routes frames to sessions by these."""
        return frozenset(kp.local_index for kp in self.keypairs())

    def install_current(self, keypair: Keypair) -> None:
        """Initiator side: a handshake we started completed, so we can send with it at once.

        The old current becomes previous; an unconfirmed *next* (from a handshake
        the peer started concurrently) is newer than current, so it takes that
        place instead.
        """
        self._previous = self._next if self._next is not None else self._current
        self._next = None
        self._current = keypair

    def install_alone(self, keypair: Keypair) -> None:
        """Initiator side, at another gateway (a takeover): this keypair and no other.

        The keys before it were the old gateway's: nothing it still sends may open.
        """
        self._previous = None
        self._next = None
        self._current = keypair

    def install_next(self, keypair: Keypair) -> None:
        """Responder side: hold the keypair until the initiator proves it has it.

        It becomes current in :meth:`open`, on the first packet that
        authenticates with it.  Any older *next* is replaced; *previous* is
        dropped, so at most three keypairs stay live.
        """
        self._next = keypair
        self._previous = None

    def needs_rekey(self, now: float) -> bool:
        """True when the current keypair should be replaced by a new handshake.

        By message count on either side (either lane); by age (``rekey_after_s``) only for
        the side that initiated it, so both ends never start a rekey at once
        (wireguard-go's rule).  False with no current keypair.
        """
        kp = self._current
        if kp is None:
            return False
        if max(kp.send_counters) >= self._policy.rekey_after_messages:
            return True
        return kp.is_initiator and kp.age(now) >= self._policy.rekey_after_s

    def expired(self, now: float) -> bool:
        """True when the current keypair is spent: older than ``reject_after_s``, or a lane at ``reject_after_messages``.

        That lane can seal no more (:meth:`next_send_counter` raises); the
        session handshakes again, or ends with KEY_EXHAUSTED, either way.  False
        with no current keypair (nothing to expire).
        """
        kp = self._current
        if kp is None:
            return False
        return (
            max(kp.send_counters) >= self._policy.reject_after_messages
            or kp.age(now) >= self._policy.reject_after_s
        )

    def next_send_counter(self, msg_type: MessageType) -> int:
        """Reserve the next counter of the current keypair on ``msg_type``'s lane.  Raises KeyExhausted."""
        kp = self._current
        if kp is None:
            raise KeyExhausted("no current keypair: handshake first")
        lane = lane_of(msg_type)
        counter = kp.send_counters[lane]
        if counter >= self._policy.reject_after_messages:
            raise KeyExhausted("current keypair reached reject_after_messages")
        kp.send_counters[lane] = counter + 1
        return counter

    def _seal(self, plaintext: bytes, header: TransportHeader) -> bytes:
        """AEAD-seal ``plaintext`` with the current keypair; ``header`` is the associated data.

        ``header.counter`` must come from :meth:`next_send_counter` (on the
        lane of ``header.msg_type``) and
        ``header.receiver_index`` must be the current ``remote_index``
        (ValueError otherwise: a caller bug).  Raises KeyExhausted with no
        current keypair.
        """
        kp = self._current
        if kp is None:
            raise KeyExhausted("no current keypair: handshake first")
        if header.receiver_index != kp.remote_index:
            raise ValueError("header.receiver_index is not the current keypair's remote index")
        return kp.seal(header.counter, plaintext, wire.encode_transport_header(header), lane=lane_of(header.msg_type))

    def seal_frame(self, msg_type: MessageType, plaintext: bytes) -> TransportFrame:
        """Reserve a counter, build the header and seal: one outgoing transport frame.

        Raises KeyExhausted, or ValueError for a plaintext whose length does not
        fit ``msg_type`` (checked first, so no counter is spent on it).
        """
        kp = self._sending_keypair(msg_type, plaintext)
        counter = self.next_send_counter(msg_type)
        header = TransportHeader(msg_type=msg_type, receiver_index=kp.remote_index, counter=counter)
        return TransportFrame(header=header, ciphertext=self._seal(plaintext, header))

    def seal_datagram(self, msg_type: MessageType, plaintext: bytes) -> bytes:
        """:meth:`seal_frame` straight to wire bytes: the data path's send side, one header pack.

        Same checks and the same raises (KeyExhausted, ValueError for a bad length).
        """
        kp = self._sending_keypair(msg_type, plaintext)
        counter = self.next_send_counter(msg_type)
        header = wire.pack_transport_header(msg_type, kp.remote_index, counter)
        return header + kp.seal(counter, plaintext, header, lane=lane_of(msg_type))

    def seal_data_batch(self, packets: Sequence[bytes]) -> list[bytes]:
        """DATA datagrams for the leading ``packets``: :meth:`seal_datagram` for a whole TUN batch.

        The data path's send side, one loop with the keypair, counter and
        header prefix held in locals instead of four calls per packet; the
        datagrams are byte-identical to ``seal_datagram(DATA, p)`` for each
        (``DATA_PARTIAL`` for a :class:`PartialPacket`).
        The result is shorter than ``packets`` only when the keys ran out (no
        current keypair, or ``reject_after_messages`` reached): the caller
        treats that as KeyExhausted.  A packet longer than a DATA frame
        carries raises ValueError before its counter is spent; the counters
        of the packets sealed before it stay spent.
        """
        kp = self._current
        if kp is None:
            return []
        counter = kp.send_counters[DATA_LANE]
        room = self._policy.reject_after_messages - counter
        if room <= 0:
            return []
        if len(packets) > room:
            packets = packets[:room]
        prefix = wire.pack_transport_header(MessageType.DATA, kp.remote_index, 0)[: wire.TRANSPORT_COUNTER_OFFSET]
        partial = wire.pack_transport_header(MessageType.DATA_PARTIAL, kp.remote_index, 0)[
            : wire.TRANSPORT_COUNTER_OFFSET
        ]
        pack_counter, pack_nonce, encrypt = wire.TRANSPORT_COUNTER.pack, _NONCE.pack, kp._send_aead.encrypt
        limit = wire.MAX_DATA_PLAINTEXT
        sealed: list[bytes] = []
        append = sealed.append
        try:
            for packet in packets:
                if len(packet) > limit:
                    raise ValueError(f"a DATA plaintext is 0..{limit} bytes, got {len(packet)}")
                header = (partial if type(packet) is PartialPacket else prefix) + pack_counter(counter)
                append(header + encrypt(pack_nonce(DATA_LANE, counter), packet, header))
                counter += 1
        finally:
            kp.send_counters[DATA_LANE] = counter
        return sealed

    def _sending_keypair(self, msg_type: MessageType, plaintext: bytes) -> Keypair:
        """The current keypair, once ``plaintext`` fits ``msg_type``: the checks before a counter is spent."""
        kp = self._current
        if kp is None:
            raise KeyExhausted("no current keypair: handshake first")
        low, high = wire.PLAINTEXT_LEN_BOUNDS[msg_type]
        if not low <= len(plaintext) <= high:
            raise ValueError(f"a {msg_type.name} plaintext is {low}..{high} bytes, got {len(plaintext)}")
        return kp

    def open(self, header: TransportHeader, ciphertext: bytes, *, now: float) -> tuple[bytes, Keypair]:
        """Authenticate and decrypt a transport frame; return the plaintext and its keypair.

        The caller then checks the counter against that keypair's replay
        window for the frame's lane before acting on the plaintext.  If
        the keypair was *next*, it is promoted to current here (the old current
        becomes previous).  Raises DecryptFailed: STRAY_PACKET for an unknown
        index, DECRYPT_FAILED for an expired keypair, a counter past
        ``reject_after_messages`` or a bad tag.  Nothing changes on failure.
        """
        kp = self.keypair_for(header.receiver_index)
        if kp is None:
            raise DecryptFailed(ReasonCode.STRAY_PACKET, f"no keypair with index {header.receiver_index}")
        self.check_receivable(kp, header.counter, now)
        plaintext = kp.open(header.counter, ciphertext, wire.encode_transport_header(header), lane=lane_of(header.msg_type))
        self.confirm(kp)
        return plaintext, kp

    def check_receivable(self, kp: Keypair, counter: int, now: float) -> None:
        """Raise DecryptFailed if ``kp`` may no longer receive ``counter`` (age or message limit)."""
        if kp.age(now) >= self._policy.reject_after_s:
            raise DecryptFailed(ReasonCode.DECRYPT_FAILED, "keypair expired (reject_after_s)")
        if counter >= self._policy.reject_after_messages:
            raise DecryptFailed(ReasonCode.DECRYPT_FAILED, "counter past reject_after_messages")

    def confirm(self, kp: Keypair) -> bool:
        """A packet authenticated with ``kp``: if it was *next*, it becomes current.  True if promoted."""
        if kp is not self._next:
            return False
        self._previous, self._current, self._next = self._current, kp, None
        return True

    def open_frame(self, frame: TransportFrame, *, now: float) -> tuple[bytes, Keypair]:
        """:meth:`open` for a decoded frame."""
        return self.open(frame.header, frame.ciphertext, now=now)

    def keypair_for(self, local_index: int) -> Keypair | None:
        for kp in self.keypairs():
            if kp.local_index == local_index:
                return kp
        return None

    def drop_expired(self, now: float) -> frozenset[int]:
        """Forget keypairs older than ``reject_after_s``; return their freed local indices."""
        def live(kp: Keypair | None) -> Keypair | None:
            return kp if kp is not None and kp.age(now) < self._policy.reject_after_s else None

        before = self.local_indices()
        self._previous, self._current, self._next = live(self._previous), live(self._current), live(self._next)
        return before - self.local_indices()
