"""The secure channel of one session: seal outgoing frames, open incoming ones.

Receive order (wireguard-go's, and the reason this lives in one place):
cheap structural checks on the untrusted bytes (``wire``), then the keypair
the receiver index names, then the replay window's *check* (cheap, before any
crypto), then the AEAD open (proof the sender holds the session keys), and
only then the window's *commit*.  A frame that fails any step raises
:class:`ChannelDrop` with a reason code and changes nothing: not the window,
not the key ring.  Nothing here reads a clock; ``now`` ages keypairs.

Two replay windows per receive keypair (keyed by its local index), one per
lane (``core/keyring.py``): a PROBE that overtakes queued DATA moves only the
control lane's window.  Each is sized by ``policy.replay_window_packets``;
windows of keypairs that left the ring are forgotten.  A frame cannot change
lanes: its type is in the associated data and its lane in the nonce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from jvpn_trio.core import wire
from jvpn_trio.core.antireplay import ReplayWindow
from jvpn_trio.core.keyring import (
    DATA_LANE,
    DecryptFailed,
    KeyExhausted,
    Keypair,
    KeyRing,
    lane_of,
)
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode

_HEADER_LEN = wire.TRANSPORT_HEADER_LEN


class ChannelDrop(Exception):
    """An incoming frame that must be dropped; ``reason`` says why (never answered)."""

    def __init__(self, reason: ReasonCode, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class Opened(NamedTuple):
    """What :meth:`SecureChannel.open_untrusted` authenticated.

    A named tuple rather than an attrs class: one is built per received
    packet, and a tuple costs a fraction of a frozen attrs instance.
    """

    msg_type: wire.MessageType
    plaintext: bytes
    local_index: int


class OpenedData(NamedTuple):
    """What :meth:`SecureChannel.open_data_batch` made of a run of DATA datagrams, in order."""

    #: The inner packets of the datagrams that authenticated (:func:`wire.data_packet`'s types).
    packets: list[bytes]
    #: Why each of the others was dropped.
    drops: list[ReasonCode]


class SecureChannel:
    """Key ring plus replay windows: the only path from bytes to authenticated plaintext."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.keyring = KeyRing(policy)
        #: Per lane (the index), the replay window of each receive keypair by local index.
        self._windows: tuple[dict[int, ReplayWindow], ...] = ({}, {})
        self._keypairs: dict[int, Keypair] = {}  # local index -> keypair, rebuilt when the ring changes
        #: Bumped whenever the ring's keypairs change, so a driver that indexes sessions by
        #: ``keyring.local_indices()`` re-reads them only then, not per packet.
        self.generation = 0

    # -- keys -----------------------------------------------------------------------
    def install_current(self, keypair: Keypair) -> None:
        self.keyring.install_current(keypair)
        self._sync_windows()

    def install_alone(self, keypair: Keypair) -> None:
        self.keyring.install_alone(keypair)
        self._sync_windows()

    def install_next(self, keypair: Keypair) -> None:
        self.keyring.install_next(keypair)
        self._sync_windows()

    def drop_expired(self, now: float) -> frozenset[int]:
        freed = self.keyring.drop_expired(now)
        self._sync_windows()
        return freed

    def _sync_windows(self) -> None:
        self.generation += 1
        self._keypairs = {kp.local_index: kp for kp in self.keyring.keypairs()}
        live = self.keyring.local_indices()
        for windows in self._windows:
            for index in list(windows):
                if index not in live:
                    del windows[index]
            for index in live:
                if index not in windows:
                    windows[index] = ReplayWindow(self.policy.replay_window_packets)

    @property
    def ready(self) -> bool:
        return self.keyring.current is not None

    # -- send ------------------------------------------------------------------------
    def seal(self, msg_type: wire.MessageType, plaintext: bytes) -> bytes:
        """One encoded transport datagram.  Raises KeyExhausted (no keys, or past the limit)."""
        return self.keyring.seal_datagram(msg_type, plaintext)

    def seal_data_batch(self, packets: Sequence[bytes]) -> list[bytes]:
        """DATA datagrams for the leading ``packets`` (:meth:`KeyRing.seal_data_batch`): shorter when keys ran out."""
        return self.keyring.seal_data_batch(packets)

    # -- receive ---------------------------------------------------------------------
    def open_untrusted(self, datagram: bytes, *, now: float) -> Opened:
        """Authenticate ``datagram``; raises :class:`ChannelDrop` and changes nothing on failure.

        The hot path of the data plane: no objects before the AEAD, the header
        bytes themselves are the associated data.
        """
        try:
            msg_type, index, counter = wire.parse_transport_untrusted(datagram)
        except wire.BadFrame as exc:
            raise ChannelDrop(ReasonCode.MALFORMED, exc.reason) from None
        lane = lane_of(msg_type)
        window = self._windows[lane].get(index)
        keypair = self._keypairs.get(index)
        if window is None or keypair is None:
            raise ChannelDrop(ReasonCode.STRAY_PACKET, f"no keypair with index {index}")
        if not window.check(counter):
            raise ChannelDrop(ReasonCode.REPLAYED_COUNTER, f"counter {counter}")
        policy = self.policy
        try:
            if now - keypair.created_at >= policy.reject_after_s or counter >= policy.reject_after_messages:
                self.keyring.check_receivable(keypair, counter, now)  # raises, saying which limit
            plaintext = keypair.open(counter, datagram[_HEADER_LEN:], datagram[:_HEADER_LEN], lane=lane)
        except DecryptFailed as exc:
            raise ChannelDrop(exc.reason, exc.detail) from None
        if not window.commit(counter):  # cannot fail after check() today; the window's own re-check stays binding
            raise ChannelDrop(ReasonCode.REPLAYED_COUNTER, f"counter {counter}")
        if keypair is self.keyring.next and self.keyring.confirm(keypair):  # an authenticated packet promoted *next*
            self._sync_windows()
        return Opened(msg_type, plaintext, index)

    def open_data_batch(self, datagrams: Sequence[bytes], *, now: float) -> OpenedData:
        """:meth:`open_untrusted` for a run of DATA datagrams, with the same steps per datagram.

        The data path's batch: a GRO buffer or a socket read holds dozens of one
        peer's DATA, and this opens them in one call, looking up the keypair and its
        window only when the receiver index changes.  A datagram that is not DATA is
        dropped as MALFORMED (callers pass what :func:`wire.is_data_untrusted` took).
        Outcomes, window and key ring are exactly those of :meth:`open_untrusted`
        called once per datagram (tests/core/test_data_path_batch.py checks both side by side).
        """
        packets: list[bytes] = []
        drops: list[ReasonCode] = []
        parse, data_types, partial = wire.parse_transport_untrusted, wire.DATA_TYPES, wire.MessageType.DATA_PARTIAL
        policy = self.policy
        reject_after_s, reject_after_messages = policy.reject_after_s, policy.reject_after_messages
        looked_up = -1  # the receiver index whose keypair and window are in hand
        keypair: Keypair | None = None
        window: ReplayWindow | None = None
        for datagram in datagrams:
            try:
                msg_type, index, counter = parse(datagram)
            except wire.BadFrame:
                drops.append(ReasonCode.MALFORMED)
                continue
            if msg_type not in data_types:
                drops.append(ReasonCode.MALFORMED)
                continue
            if index != looked_up:
                looked_up, keypair, window = index, self._keypairs.get(index), self._windows[DATA_LANE].get(index)
            if window is None or keypair is None:
                drops.append(ReasonCode.STRAY_PACKET)
                continue
            if not window.check(counter):
                drops.append(ReasonCode.REPLAYED_COUNTER)
                continue
            try:
                if now - keypair.created_at >= reject_after_s or counter >= reject_after_messages:
                    self.keyring.check_receivable(keypair, counter, now)  # raises, as in open_untrusted
                plaintext = keypair.open(counter, datagram[_HEADER_LEN:], datagram[:_HEADER_LEN], lane=DATA_LANE)
            except DecryptFailed as exc:
                drops.append(exc.reason)
                continue
            if not window.commit(counter):
                drops.append(ReasonCode.REPLAYED_COUNTER)
                continue
            if keypair is self.keyring.next and self.keyring.confirm(keypair):
                self._sync_windows()
                looked_up = -1  # a guard: the promoted index keeps its keypair and window today
            # wire.data_packet's own test, inline: only a DATA_PARTIAL needs the call
            packets.append(wire.data_packet(msg_type, plaintext) if msg_type is partial else plaintext)
        return OpenedData(packets, drops)


__all__ = ["ChannelDrop", "KeyExhausted", "Opened", "OpenedData", "SecureChannel"]
