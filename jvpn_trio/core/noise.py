"""Noise IK handshake (as WireGuard uses it), on ``cryptography``; keys it yields go to ``keyring.py``.

Theory of operation
-------------------
**Handshake.**  The pattern is ``Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s``,
built the way the WireGuard whitepaper (section 5.4) builds it, with
jvpn-trio's own identifier string so the two can never be confused:

* ``HASH`` is BLAKE2s-256, ``HMAC`` is HMAC-BLAKE2s, ``KDF_n`` is the Noise
  HKDF (``t0 = HMAC(ck, ikm)``, ``t_i = HMAC(t0, t_{i-1} || i)``), ``DH`` is
  X25519 and ``AEAD`` is ChaCha20-Poly1305 with nonce ``0^32 || le64(n)``.
* Both sides start from ``ck = HASH(CONSTRUCTION)`` and
  ``h = HASH(HASH(ck || IDENTIFIER) || responder_static_public)``.
* HANDSHAKE_INIT mixes ``e``, ``es`` (encrypts the initiator's static key),
  ``ss`` (encrypts the payload: TAI64N timestamp, rekey session id, path id,
  the client's state version for that session).
* HANDSHAKE_RESP mixes ``e``, ``ee``, ``se`` and the pre-shared key
  (``psk2``; all zeros unless configured), then encrypts the session payload
  (session id, state version, tunnel address, owner epoch: the fencing token
  of docs/cluster.md, so it reaches the client authenticated).  Transport keys are
  ``KDF_2(ck, "")``: first for initiator->responder, second for the reverse.
* Each message ends in ``mac1 = BLAKE2s-128(key = HASH(LABEL_MAC1 ||
  receiver_static_public), message up to mac1)``.  It is checked before any
  DH, so a sender who does not know whom it is talking to costs us one hash.
* mac1 only proves the sender knows the gateway's public key, which every
  client config holds.  Under load the gateway also asks for **mac2**
  (WireGuard's idea, whitepaper 5.4.7): ``mac2 = BLAKE2s-128(key = cookie,
  init up to mac2)``, where the cookie is a MAC of the sender's address the
  gateway sent in a COOKIE_REPLY (``core/cookie.py``).  mac2 is an optional
  16-byte trailer of HANDSHAKE_INIT (:func:`add_mac2`, :func:`mac2_ok`), so it
  proves the sender receives datagrams at the address it sends from.

Freshness of HANDSHAKE_INIT is its timestamp: the responder refuses an init
whose TAI64N is not strictly greater than the last one it accepted from that
peer (``HANDSHAKE_REPLAY``).  This module never stores that timestamp: the
caller passes the last accepted one in through :class:`PeerRecord` and stores
``ResponderHandshake.timestamp`` once it acts on the init.

Everything is a pure function of its inputs: randomness (ephemeral keys) comes
from the injected ``random_bytes``, time from ``wall_time_ns`` (handshake
timestamps) and ``now`` (monotonic seconds, key ages).  Errors are
:class:`HandshakeError` (with a ReasonCode); no ``cryptography`` exception
escapes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from typing import Callable, TypeVar

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from jvpn_trio.core import wire
from jvpn_trio.core.ids import PathId, RandomBytes, SessionId
from jvpn_trio.core.keyring import Keypair
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.core.wire import (
    HandshakeInit,
    HandshakeResp,
    InitPayload,
    RespPayload,
)

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

#: The Noise protocol name: hashed into the initial chaining key.
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
#: The Noise prologue: binds every handshake to this protocol and version.
IDENTIFIER = b"jvpn-trio v1"
#: Domain separator for the mac1 key.
LABEL_MAC1 = b"mac1----"

#: X25519 private/public key and shared-secret size; also HASH output and AEAD key size.
KEY_LEN = 32
#: BLAKE2s-128 for mac1.
MAC_LEN = wire.MAC_LEN
#: Pre-shared key size; the default psk is all zeros (plain IK security).
PSK_LEN = 32
ZERO_PSK = bytes(PSK_LEN)

#: TAI64 labels seconds from 2**62; TAI is 10 s ahead of UTC's 1970 epoch at the labels' origin.
TAI64_BASE = (1 << 62) + 10
NS_PER_S = 1_000_000_000
_TAI64N = struct.Struct("!QI")

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class HandshakeError(Exception):
    """A handshake message we refuse.  Nothing was changed; the caller drops it and counts ``reason``.

    Reasons: BAD_MAC (mac1), DECRYPT_FAILED (AEAD), UNKNOWN_PEER, HANDSHAKE_REPLAY
    (timestamp not newer), MALFORMED (bad key or authenticated payload that does
    not parse), STRAY_PACKET (response to an index we did not send),
    SESSION_MISMATCH (a rekey answered with another session id).
    """

    def __init__(self, reason: ReasonCode, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------


def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _kdf(chaining_key: bytes, input_key_material: bytes, count: int) -> tuple[bytes, ...]:
    """Noise HKDF: ``count`` 32-byte outputs from the chaining key and new material."""
    prk = _hmac(chaining_key, input_key_material)
    outputs: list[bytes] = []
    previous = b""
    for i in range(1, count + 1):
        previous = _hmac(prk, previous + bytes((i,)))
        outputs.append(previous)
    return tuple(outputs)


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=MAC_LEN, key=key).digest()


_HANDSHAKE_NONCE = bytes(12)  # nonce 0: every handshake key encrypts exactly once


def _seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_HANDSHAKE_NONCE, plaintext, associated)


def _open(key: bytes, ciphertext: bytes, associated: bytes, what: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_HANDSHAKE_NONCE, ciphertext, associated)
    except InvalidTag:
        raise HandshakeError(ReasonCode.DECRYPT_FAILED, f"{what} does not authenticate") from None


def _dh(private: bytes, public: bytes) -> bytes:
    """X25519; a low-order peer point (all-zero shared secret) is MALFORMED, not a crash."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise HandshakeError(ReasonCode.MALFORMED, "public key gives an all-zero shared secret") from None


def _public_of(private: bytes) -> bytes:
    if not isinstance(private, bytes) or len(private) != KEY_LEN:
        raise ValueError(f"an X25519 private key is {KEY_LEN} bytes")
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def clamp_private(raw: bytes) -> bytes:
    """Clamp 32 random bytes into an X25519 scalar, as ``wg genkey`` prints them."""
    if len(raw) != KEY_LEN:
        raise ValueError(f"a private key is {KEY_LEN} bytes")
    key = bytearray(raw)
    key[0] &= 0b1111_1000
    key[31] = (key[31] & 0b0111_1111) | 0b0100_0000
    return bytes(key)


def mac1_key(static_public: bytes) -> bytes:
    """The key a sender uses for mac1 towards the owner of ``static_public``."""
    return _hash(LABEL_MAC1, static_public)


def tai64n(wall_time_ns: int) -> bytes:
    """The 12-byte TAI64N label for a wall-clock time in nanoseconds since the Unix epoch.

    Big-endian, so ``bytes`` comparison orders labels by time: the handshake
    replay check is a plain ``>``.
    """
    if wall_time_ns < 0:
        raise ValueError("wall_time_ns must not be negative")
    seconds, nanos = divmod(wall_time_ns, NS_PER_S)
    return _TAI64N.pack(TAI64_BASE + seconds, nanos)


_key_bytes = wire.exact_bytes(KEY_LEN)


def _hex(value: bytes | None) -> str:
    # Public values print as hex so logs and test failures stay readable.
    return "None" if value is None else value.hex()

# ---------------------------------------------------------------------------
# Static keys and peers
# ---------------------------------------------------------------------------


@attrs.frozen
class StaticKeypair:
    """A long-term X25519 identity.  The public half and its mac1 key are derived once."""

    private: bytes = attrs.field(validator=_key_bytes, repr=False)
    public: bytes = attrs.field(init=False, repr=_hex)
    #: HASH(LABEL_MAC1 || public): what peers key mac1 with when writing to us.
    mac1_key: bytes = attrs.field(init=False, repr=False)

    @public.default
    def _derive_public(self) -> bytes:
        return _public_of(self.private)

    @mac1_key.default
    def _derive_mac1_key(self) -> bytes:
        return mac1_key(self.public)


def generate_static(random_bytes: RandomBytes) -> StaticKeypair:
    """A new static keypair from 32 injected random bytes (clamped, like ``wg genkey``)."""
    return StaticKeypair(clamp_private(random_bytes(KEY_LEN)))


@attrs.frozen(kw_only=True)
class PeerRecord:
    """What the responder knows about an allowed initiator.

    ``last_timestamp`` is the newest TAI64N accepted from this peer (None if
    none yet); the caller keeps it and passes it in, this module never stores it.
    """

    public: bytes = attrs.field(validator=_key_bytes, repr=_hex)
    psk: bytes = attrs.field(default=ZERO_PSK, validator=wire.exact_bytes(PSK_LEN), repr=False)
    last_timestamp: bytes | None = attrs.field(default=None, repr=_hex)


PeerLookup = Callable[[bytes], PeerRecord | None]

# ---------------------------------------------------------------------------
# Results and keypairs
# ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class HandshakeResult:
    """A completed handshake: transport keys, indices, and what the payloads carried."""

    sending_key: bytes = attrs.field(repr=False)
    receiving_key: bytes = attrs.field(repr=False)
    #: Our index: the peer puts it in ``receiver_index`` of frames it sends us.
    local_index: int
    #: The peer's index: we put it in ``receiver_index`` of frames we send.
    remote_index: int
    is_initiator: bool
    peer_public: bytes = attrs.field(repr=_hex)
    session_id: SessionId
    #: True when the init named an existing session (a rekey, Property 5).
    rekey: bool
    path_id: PathId
    state_version: int
    #: The fencing epoch (the ownership store revision the gateway holds for the session).
    owner_epoch: int
    tunnel_ipv4: ipaddress.IPv4Address
    prefix_len: int
    #: The client's IPv6 tunnel address; None when the gateway's tunnel carries no IPv6.
    tunnel_ipv6: ipaddress.IPv6Address | None = None
    prefix_len6: int = 0

    @property
    def tunnel_interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.tunnel_ipv4}/{self.prefix_len}")

    @property
    def tunnel_interface6(self) -> ipaddress.IPv6Interface | None:
        if self.tunnel_ipv6 is None:
            return None
        return ipaddress.IPv6Interface(f"{self.tunnel_ipv6}/{self.prefix_len6}")

    def keypair(self, *, created_at: float) -> Keypair:
        """The transport keypair, aged from ``created_at`` (monotonic seconds)."""
        return Keypair(
            send_key=self.sending_key,
            recv_key=self.receiving_key,
            local_index=self.local_index,
            remote_index=self.remote_index,
            is_initiator=self.is_initiator,
            created_at=created_at,
        )


# ---------------------------------------------------------------------------
# Noise symmetric state helpers
# ---------------------------------------------------------------------------


def _initial_state(responder_public: bytes) -> tuple[bytes, bytes]:
    chaining_key = _hash(CONSTRUCTION)
    handshake_hash = _hash(_hash(chaining_key, IDENTIFIER), responder_public)
    return chaining_key, handshake_hash


def _compute_mac1(encoded_without_mac: bytes, receiver_public: bytes) -> bytes:
    return _mac(mac1_key(receiver_public), encoded_without_mac)


def _mac1_ok(encoded: bytes, offset: int, key: bytes) -> bool:
    return hmac.compare_digest(_mac(key, encoded[:offset]), encoded[offset : offset + MAC_LEN])


def init_mac1_ok(data: bytes, static: StaticKeypair) -> bool:
    """Whether raw ``data`` is a HANDSHAKE_INIT of either length whose mac1 is right for ``static``.

    One hash and no parsing: what the gateway's receive loop checks before an
    init may cost it anything more (a token, a cookie reply, a queue slot).
    """
    if len(data) not in (wire.HANDSHAKE_INIT_LEN, wire.HANDSHAKE_INIT_MAC2_LEN):
        return False
    return _mac1_ok(data, wire.HANDSHAKE_INIT_MAC1_OFFSET, static.mac1_key)


def add_mac2(init: HandshakeInit, cookie: bytes) -> HandshakeInit:
    """``init`` with mac2 keyed by ``cookie`` (covering every byte up to and including mac1)."""
    encoded = wire.encode_handshake_init(attrs.evolve(init, mac2=None))
    return attrs.evolve(init, mac2=_mac(cookie, encoded))


def mac2_ok(data: bytes, cookie: bytes) -> bool:
    """Whether raw HANDSHAKE_INIT ``data`` carries a mac2 keyed by ``cookie``."""
    if len(data) != wire.HANDSHAKE_INIT_MAC2_LEN:
        return False
    return hmac.compare_digest(_mac(cookie, data[: wire.HANDSHAKE_INIT_LEN]), data[wire.HANDSHAKE_INIT_LEN :])


_ZERO_MAC = bytes(MAC_LEN)

# ---------------------------------------------------------------------------
# Initiator
# ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class InitiatorHandshake:
    """The initiator between sending HANDSHAKE_INIT and receiving the response.

    Frozen: :meth:`consume_response` is pure.  Discard this object once a
    response has been consumed, so a replayed response finds nothing to match.
    """

    static: StaticKeypair
    responder_public: bytes = attrs.field(validator=_key_bytes, repr=_hex)
    sender_index: int
    path_id: PathId
    rekey_session: SessionId | None
    #: The state version the init told the responder we hold (0 for a new session).
    state_version: int
    timestamp: bytes = attrs.field(repr=_hex)
    psk: bytes = attrs.field(repr=False)
    _ephemeral_private: bytes = attrs.field(repr=False)
    _chaining_key: bytes = attrs.field(repr=False)
    _handshake_hash: bytes = attrs.field(repr=False)

    @classmethod
    def create(
        cls,
        static: StaticKeypair,
        responder_public: bytes,
        *,
        sender_index: int,
        random_bytes: RandomBytes,
        wall_time_ns: int,
        path_id: PathId,
        rekey_session: SessionId | None = None,
        state_version: int = 0,
        psk: bytes = ZERO_PSK,
    ) -> tuple[InitiatorHandshake, HandshakeInit]:
        """Build HANDSHAKE_INIT.  Draws 32 bytes (the ephemeral key) from ``random_bytes``.

        ``rekey_session`` names the session this handshake rekeys (None: a new
        session) and ``state_version`` the version we hold for it, so a gateway
        taking the session over starts there (docs/cluster.md); it must be 0
        without a ``rekey_session`` (ValueError).  ``wall_time_ns`` becomes the
        TAI64N freshness timestamp.
        """
        payload = wire.encode_init_payload(
            InitPayload(
                timestamp=tai64n(wall_time_ns),
                rekey_session=rekey_session,
                path_id=path_id,
                state_version=state_version,
            )
        )
        ck, h = _initial_state(responder_public)
        ephemeral_private = random_bytes(KEY_LEN)
        ephemeral_public = _public_of(ephemeral_private)
        (ck,) = _kdf(ck, ephemeral_public, 1)
        h = _hash(h, ephemeral_public)
        ck, key = _kdf(ck, _dh(ephemeral_private, responder_public), 2)
        encrypted_static = _seal(key, static.public, h)
        h = _hash(h, encrypted_static)
        ck, key = _kdf(ck, _dh(static.private, responder_public), 2)
        encrypted_payload = _seal(key, payload, h)
        h = _hash(h, encrypted_payload)

        unsigned = HandshakeInit(
            sender_index=sender_index,
            ephemeral=ephemeral_public,
            encrypted_static=encrypted_static,
            encrypted_payload=encrypted_payload,
            mac1=_ZERO_MAC,
        )
        encoded = wire.encode_handshake_init(unsigned)[: wire.HANDSHAKE_INIT_MAC1_OFFSET]
        msg = attrs.evolve(unsigned, mac1=_compute_mac1(encoded, responder_public))
        state = cls(
            static=static,
            responder_public=responder_public,
            sender_index=sender_index,
            path_id=path_id,
            rekey_session=rekey_session,
            state_version=state_version,
            timestamp=payload[: wire.TIMESTAMP_LEN],
            psk=psk,
            ephemeral_private=ephemeral_private,
            chaining_key=ck,
            handshake_hash=h,
        )
        return state, msg

    def consume_response(self, resp: HandshakeResp) -> HandshakeResult:
        """Check and decrypt HANDSHAKE_RESP; derive the transport keys.

        Raises HandshakeError: STRAY_PACKET (not addressed to our index),
        BAD_MAC (before any DH), DECRYPT_FAILED, MALFORMED, SESSION_MISMATCH
        (a rekey answered with another session id: Property 5).
        """
        if resp.receiver_index != self.sender_index:
            raise HandshakeError(ReasonCode.STRAY_PACKET, "response for another handshake index")
        encoded = wire.encode_handshake_resp(resp)
        if not _mac1_ok(encoded, wire.HANDSHAKE_RESP_MAC1_OFFSET, self.static.mac1_key):
            raise HandshakeError(ReasonCode.BAD_MAC, "mac1 of the response")

        ck, h = self._chaining_key, self._handshake_hash
        (ck,) = _kdf(ck, resp.ephemeral, 1)
        h = _hash(h, resp.ephemeral)
        (ck,) = _kdf(ck, _dh(self._ephemeral_private, resp.ephemeral), 1)
        (ck,) = _kdf(ck, _dh(self.static.private, resp.ephemeral), 1)
        ck, tau, key = _kdf(ck, self.psk, 3)
        h = _hash(h, tau)
        plaintext = _open(key, resp.encrypted_payload, h, "response payload")
        payload = _parse_authenticated(wire.decode_resp_payload_untrusted, plaintext)
        if self.rekey_session is not None and payload.session_id != self.rekey_session:
            raise HandshakeError(ReasonCode.SESSION_MISMATCH, "rekey answered with another session id")
        sending_key, receiving_key = _kdf(ck, b"", 2)
        return HandshakeResult(
            sending_key=sending_key,
            receiving_key=receiving_key,
            local_index=self.sender_index,
            remote_index=resp.sender_index,
            is_initiator=True,
            peer_public=self.responder_public,
            session_id=payload.session_id,
            rekey=self.rekey_session is not None,
            path_id=self.path_id,
            state_version=payload.state_version,
            owner_epoch=payload.owner_epoch,
            tunnel_ipv4=payload.tunnel_ipv4,
            prefix_len=payload.prefix_len,
            tunnel_ipv6=payload.tunnel_ipv6,
            prefix_len6=payload.prefix_len6,
        )


_Payload = TypeVar("_Payload", InitPayload, RespPayload)


def _parse_authenticated(decoder: Callable[[bytes], _Payload], plaintext: bytes) -> _Payload:
    # The peer authenticated, so a payload that does not parse is its protocol violation.
    try:
        return decoder(plaintext)
    except wire.BadFrame as exc:
        raise HandshakeError(ReasonCode.MALFORMED, f"payload: {exc.reason}") from None


# ---------------------------------------------------------------------------
# Responder
# ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ResponderHandshake:
    """A HANDSHAKE_INIT that passed every check, ready to be answered with :meth:`respond`.

    ``timestamp`` is what the caller stores as the peer's last accepted
    timestamp once it acts on this init.  ``state_version`` is the version the
    client says it holds for ``rekey_session`` (0 for a new session): what a
    gateway taking the session over starts from (docs/cluster.md).
    """

    static: StaticKeypair
    peer: PeerRecord
    init_sender_index: int
    timestamp: bytes = attrs.field(repr=_hex)
    path_id: PathId
    rekey_session: SessionId | None
    state_version: int
    _initiator_ephemeral: bytes = attrs.field(repr=False)
    _chaining_key: bytes = attrs.field(repr=False)
    _handshake_hash: bytes = attrs.field(repr=False)

    @property
    def peer_public(self) -> bytes:
        return self.peer.public

    @classmethod
    def consume_init(
        cls, init: HandshakeInit, static: StaticKeypair, *, lookup_peer: PeerLookup
    ) -> ResponderHandshake:
        """Authenticate HANDSHAKE_INIT, cheapest check first.  Pure: stores nothing.

        Order: mac1 (one hash, before any DH) -> DH and decrypt the initiator's
        static key -> ``lookup_peer`` -> DH and decrypt the payload -> timestamp
        strictly newer than ``PeerRecord.last_timestamp``.  Raises
        HandshakeError: BAD_MAC, DECRYPT_FAILED, UNKNOWN_PEER, MALFORMED,
        HANDSHAKE_REPLAY.
        """
        encoded = wire.encode_handshake_init(init)
        if not _mac1_ok(encoded, wire.HANDSHAKE_INIT_MAC1_OFFSET, static.mac1_key):
            raise HandshakeError(ReasonCode.BAD_MAC, "mac1 of the init")

        ck, h = _initial_state(static.public)
        (ck,) = _kdf(ck, init.ephemeral, 1)
        h = _hash(h, init.ephemeral)
        ck, key = _kdf(ck, _dh(static.private, init.ephemeral), 2)
        peer_public = _open(key, init.encrypted_static, h, "initiator static key")
        h = _hash(h, init.encrypted_static)
        peer = lookup_peer(peer_public)
        if peer is None:
            raise HandshakeError(ReasonCode.UNKNOWN_PEER, f"static key {peer_public.hex()[:16]}...")
        ck, key = _kdf(ck, _dh(static.private, peer_public), 2)
        plaintext = _open(key, init.encrypted_payload, h, "init payload")
        h = _hash(h, init.encrypted_payload)
        payload = _parse_authenticated(wire.decode_init_payload_untrusted, plaintext)
        if peer.last_timestamp is not None and not payload.timestamp > peer.last_timestamp:
            raise HandshakeError(ReasonCode.HANDSHAKE_REPLAY, "timestamp not newer than the last accepted")
        return cls(
            static=static,
            peer=peer,
            init_sender_index=init.sender_index,
            timestamp=payload.timestamp,
            path_id=payload.path_id,
            rekey_session=payload.rekey_session,
            state_version=payload.state_version,
            initiator_ephemeral=init.ephemeral,
            chaining_key=ck,
            handshake_hash=h,
        )

    def respond(
        self,
        *,
        session_id: SessionId,
        state_version: int,
        owner_epoch: int,
        tunnel_ipv4: ipaddress.IPv4Address,
        prefix_len: int,
        sender_index: int,
        random_bytes: RandomBytes,
        tunnel_ipv6: ipaddress.IPv6Address | None = None,
        prefix_len6: int = 0,
    ) -> tuple[HandshakeResp, HandshakeResult]:
        """Build HANDSHAKE_RESP and the responder's keys.  Draws 32 bytes from ``random_bytes``.

        ``owner_epoch`` is the ownership store revision this gateway holds for
        the session (the fencing token, docs/cluster.md).
        ``tunnel_ipv6``/``prefix_len6`` give the client its IPv6 tunnel address
        too (None: the tunnel carries no IPv6).

        For a rekey ``session_id`` must be the session the init named
        (Property 5: rotation never changes the SessionId); ValueError otherwise.
        """
        if self.rekey_session is not None and session_id != self.rekey_session:
            raise ValueError("a rekey must answer with the session id the init named")
        payload = wire.encode_resp_payload(
            RespPayload(
                session_id=session_id,
                state_version=state_version,
                tunnel_ipv4=tunnel_ipv4,
                prefix_len=prefix_len,
                owner_epoch=owner_epoch,
                tunnel_ipv6=tunnel_ipv6,
                prefix_len6=prefix_len6,
            )
        )
        ck, h = self._chaining_key, self._handshake_hash
        ephemeral_private = random_bytes(KEY_LEN)
        ephemeral_public = _public_of(ephemeral_private)
        (ck,) = _kdf(ck, ephemeral_public, 1)
        h = _hash(h, ephemeral_public)
        (ck,) = _kdf(ck, _dh(ephemeral_private, self._initiator_ephemeral), 1)
        (ck,) = _kdf(ck, _dh(ephemeral_private, self.peer.public), 1)
        ck, tau, key = _kdf(ck, self.peer.psk, 3)
        h = _hash(h, tau)
        encrypted_payload = _seal(key, payload, h)

        unsigned = HandshakeResp(
            sender_index=sender_index,
            receiver_index=self.init_sender_index,
            ephemeral=ephemeral_public,
            encrypted_payload=encrypted_payload,
            mac1=_ZERO_MAC,
        )
        encoded = wire.encode_handshake_resp(unsigned)[: wire.HANDSHAKE_RESP_MAC1_OFFSET]
        msg = attrs.evolve(unsigned, mac1=_compute_mac1(encoded, self.peer.public))
        receiving_key, sending_key = _kdf(ck, b"", 2)
        result = HandshakeResult(
            sending_key=sending_key,
            receiving_key=receiving_key,
            local_index=sender_index,
            remote_index=self.init_sender_index,
            is_initiator=False,
            peer_public=self.peer.public,
            session_id=session_id,
            rekey=self.rekey_session is not None,
            path_id=self.path_id,
            state_version=state_version,
            owner_epoch=owner_epoch,
            tunnel_ipv4=tunnel_ipv4,
            prefix_len=prefix_len,
            tunnel_ipv6=tunnel_ipv6,
            prefix_len6=prefix_len6,
        )
        return msg, result


