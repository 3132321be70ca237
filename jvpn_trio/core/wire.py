"""Every byte layout jvpn-trio puts on the wire, with strict parsers.

All layouts live in this one file (docs/wire-format.md describes them), so a
driver never slices bytes itself.  Transport frames are parsed without keys
and their length checked per type before any cryptography, the cheap checks
first as in wireguard-go; the header is the AEAD associated data, so a
flipped type, index or counter fails authentication.  Inner plaintexts are
decoded only after ``SecureChannel.open_untrusted`` has authenticated them.

Parsers of untrusted bytes end in ``_untrusted`` and raise only
:class:`BadFrame` (trio's ``BadPacket`` convention), never ``struct.error``
or ``IndexError`` (``tests/properties/test_wire_fuzz.py``).  Encoders take
message objects validated at construction, so they cannot build a frame the
decoders refuse, and encoding is canonical: ``encode(decode(x)) == x``.
Integers are big-endian, except the AEAD nonce counter (little-endian, as in
WireGuard; see ``keyring.aead_nonce``).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Any, Callable, Mapping, Union

import attrs

from jvpn_trio.core.ids import SESSION_ID_BYTES, PathId, SessionId
from jvpn_trio.core.offload import PartialPacket
from jvpn_trio.core.states import ReasonCode

# ---------------------------------------------------------------------------
# Protocol constants
# ---------------------------------------------------------------------------

#: Byte 0 of every datagram.  A peer speaking another version is refused, never guessed at.
#: Version 2: HANDSHAKE_RESP's payload carries the client's IPv6 tunnel address too (46 bytes, was 29).
#: Version 4: the fencing epoch (docs/cluster.md) in HANDSHAKE_RESP and REATTACH_ACK, and the
#: client's state version in HANDSHAKE_INIT (docs/wire-format.md, "Version history").
#: Version 5: DATA_PARTIAL, an inner packet whose TCP/UDP checksum the receiver completes (core/offload.py).
#: Version 6: control messages seal on a lane of their own (nonce and replay window; core/keyring.py).
PROTOCOL_VERSION = 6

#: The largest datagram we ever build or accept (the IPv4 total-length field's limit).
MAX_DATAGRAM = 65_535

U8_MAX = (1 << 8) - 1
U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

#: X25519 public keys (ephemeral and static) on the wire.
KEY_LEN = 32
#: Poly1305 tag appended by every AEAD seal.
TAG_LEN = 16
#: Keyed BLAKE2s-128 MAC over a handshake message (the cheap DoS filter).
MAC_LEN = 16
#: TAI64N: 8 bytes of seconds, 4 bytes of nanoseconds.
TIMESTAMP_LEN = 12
#: IPv4 tunnel address in the handshake response.
IPV4_LEN = 4
#: Largest IPv4 prefix length.
MAX_IPV4_PREFIX = 32
#: IPv6 tunnel address in the handshake response (all zeros with prefix 0: the tunnel carries no IPv6).
IPV6_LEN = 16
#: Largest IPv6 prefix length.
MAX_IPV6_PREFIX = 128
#: Bound on the opaque REATTACH metadata (spec 7: "optional metadata"), so the frame stays small.
MAX_METADATA = 64
#: ``bound_path_id`` in PROBE_ACK when the session is not bound on any path.
NO_PATH = 0


class MessageType(enum.IntEnum):
    """Byte 1 of every datagram.  Values are wire format: never renumber."""

    HANDSHAKE_INIT = 1
    HANDSHAKE_RESP = 2
    #: The gateway's answer, under load, to a HANDSHAKE_INIT without a valid mac2 (core/cookie.py).
    COOKIE_REPLY = 3
    DATA = 4
    PROBE = 5
    PROBE_ACK = 6
    REATTACH = 7
    REATTACH_ACK = 8
    REATTACH_REJECT = 9
    CLOSE = 10
    PATH_CHALLENGE = 11
    PATH_RESPONSE = 12
    #: DATA whose inner TCP/UDP checksum field holds only the pseudo-header sum: the receiver
    #: completes it (its kernel, through the TUN's checksum offload, or core/offload.py).
    DATA_PARTIAL = 13


HANDSHAKE_TYPES = frozenset({MessageType.HANDSHAKE_INIT, MessageType.HANDSHAKE_RESP})
#: The types that carry an inner packet.
DATA_TYPES = frozenset({MessageType.DATA, MessageType.DATA_PARTIAL})
#: :data:`DATA_TYPES` as byte 1 values, for the receive loops' test before any parsing.
DATA_TYPE_BYTES = frozenset(t.value for t in DATA_TYPES)
TRANSPORT_TYPES = frozenset(MessageType) - HANDSHAKE_TYPES - {MessageType.COOKIE_REPLY}
#: Byte 1 -> its type, for :func:`peek_type_untrusted` (a byte that is no type is absent).
_TYPE_BY_VALUE: Mapping[int, MessageType] = {t.value: t for t in MessageType}

# ---------------------------------------------------------------------------
# Layouts.  "!" means big-endian with no padding, so sizes are exact.
# ---------------------------------------------------------------------------

_HEADER = struct.Struct("!BB")
HEADER_LEN = _HEADER.size  # 2

#: Plaintext of HANDSHAKE_INIT's encrypted payload: TAI64N, rekey session id (zeros = new), path id,
#: the state version the client holds for that session (0 for a new one).
_INIT_PAYLOAD = struct.Struct(f"!{TIMESTAMP_LEN}s{SESSION_ID_BYTES}sBQ")
INIT_PAYLOAD_LEN = _INIT_PAYLOAD.size  # 37
#: Plaintext of HANDSHAKE_RESP's encrypted payload: session id, state version, tunnel IPv4 and
#: prefix, tunnel IPv6 and prefix (all zeros: none), the owner epoch (fencing token).
_RESP_PAYLOAD = struct.Struct(f"!{SESSION_ID_BYTES}sQ{IPV4_LEN}sB{IPV6_LEN}sBQ")
RESP_PAYLOAD_LEN = _RESP_PAYLOAD.size  # 54

ENCRYPTED_STATIC_LEN = KEY_LEN + TAG_LEN  # 48
ENCRYPTED_INIT_PAYLOAD_LEN = INIT_PAYLOAD_LEN + TAG_LEN  # 53
ENCRYPTED_RESP_PAYLOAD_LEN = RESP_PAYLOAD_LEN + TAG_LEN  # 70

_HANDSHAKE_INIT = struct.Struct(
    f"!BBI{KEY_LEN}s{ENCRYPTED_STATIC_LEN}s{ENCRYPTED_INIT_PAYLOAD_LEN}s{MAC_LEN}s"
)
HANDSHAKE_INIT_LEN = _HANDSHAKE_INIT.size  # 155
#: mac1 covers every byte before it.
HANDSHAKE_INIT_MAC1_OFFSET = HANDSHAKE_INIT_LEN - MAC_LEN
#: An init that carries mac2 (a cookie's MAC over every byte before it) is this long; without, 155.
HANDSHAKE_INIT_MAC2_LEN = HANDSHAKE_INIT_LEN + MAC_LEN  # 171
#: A cookie (core/cookie.py) is a MAC of the source address: what mac2 is keyed with.
COOKIE_LEN = MAC_LEN
#: The cookie is sealed with ChaCha20-Poly1305 under a random 96-bit nonce, new per reply.
COOKIE_NONCE_LEN = 12
#: [version][type][receiver_index u32][nonce][cookie sealed, with tag]
_COOKIE_REPLY = struct.Struct(f"!BBI{COOKIE_NONCE_LEN}s{COOKIE_LEN + TAG_LEN}s")
COOKIE_REPLY_LEN = _COOKIE_REPLY.size  # 50

_HANDSHAKE_RESP = struct.Struct(f"!BBII{KEY_LEN}s{ENCRYPTED_RESP_PAYLOAD_LEN}s{MAC_LEN}s")
HANDSHAKE_RESP_LEN = _HANDSHAKE_RESP.size  # 128
HANDSHAKE_RESP_MAC1_OFFSET = HANDSHAKE_RESP_LEN - MAC_LEN

#: [version][type][reserved u16 = 0][receiver_index u32][counter u64]: keeps the counter 8-aligned.
_TRANSPORT_HEADER = struct.Struct("!BBHIQ")
TRANSPORT_HEADER_LEN = _TRANSPORT_HEADER.size  # 16
#: The counter is the header's last field: the data path packs the other fields once per batch
#: (:meth:`KeyRing.seal_data_batch`) and only the counter per packet.
TRANSPORT_COUNTER_OFFSET = struct.calcsize("!BBHI")  # 8
TRANSPORT_COUNTER = struct.Struct("!Q")
#: Header plus tag: what a transport frame adds to its plaintext.
TRANSPORT_OVERHEAD = TRANSPORT_HEADER_LEN + TAG_LEN  # 32
#: An empty DATA frame (a keepalive) is the shortest transport frame.
MIN_TRANSPORT_LEN = TRANSPORT_OVERHEAD  # 32
#: The largest IP packet a DATA frame carries.
MAX_DATA_PLAINTEXT = MAX_DATAGRAM - TRANSPORT_OVERHEAD

_PROBE = struct.Struct("!BIQ")
PROBE_LEN = _PROBE.size  # 13
_PROBE_ACK = struct.Struct("!BIQQB")
PROBE_ACK_LEN = _PROBE_ACK.size  # 22
_REATTACH_FIXED = struct.Struct(f"!{SESSION_ID_BYTES}sBQQQH")
REATTACH_MIN_LEN = _REATTACH_FIXED.size  # 43
REATTACH_MAX_LEN = REATTACH_MIN_LEN + MAX_METADATA  # 107
#: Session id, nonce, new version, path id, owner epoch (the gateway's fencing token).
_REATTACH_ACK = struct.Struct(f"!{SESSION_ID_BYTES}sQQBQ")
REATTACH_ACK_LEN = _REATTACH_ACK.size  # 41
_REATTACH_REJECT = struct.Struct(f"!{SESSION_ID_BYTES}sQHQ")
REATTACH_REJECT_LEN = _REATTACH_REJECT.size  # 34
_CLOSE = struct.Struct(f"!{SESSION_ID_BYTES}sH")
CLOSE_LEN = _CLOSE.size  # 18
#: PATH_CHALLENGE and PATH_RESPONSE share one layout: session id, the REATTACH's nonce, the
#: challenge value, the path id.  Shorter than any REATTACH, so a challenge never amplifies.
_PATH_CHECK = struct.Struct(f"!{SESSION_ID_BYTES}sQQB")
PATH_CHECK_LEN = _PATH_CHECK.size  # 33

#: Inclusive (min, max) plaintext length per transport type: lets the outer
#: framing refuse a wrongly sized frame before spending an AEAD open on it.
PLAINTEXT_LEN_BOUNDS: Mapping[MessageType, tuple[int, int]] = {
    MessageType.DATA: (0, MAX_DATA_PLAINTEXT),
    MessageType.DATA_PARTIAL: (0, MAX_DATA_PLAINTEXT),
    MessageType.PROBE: (PROBE_LEN, PROBE_LEN),
    MessageType.PROBE_ACK: (PROBE_ACK_LEN, PROBE_ACK_LEN),
    MessageType.REATTACH: (REATTACH_MIN_LEN, REATTACH_MAX_LEN),
    MessageType.REATTACH_ACK: (REATTACH_ACK_LEN, REATTACH_ACK_LEN),
    MessageType.REATTACH_REJECT: (REATTACH_REJECT_LEN, REATTACH_REJECT_LEN),
    MessageType.CLOSE: (CLOSE_LEN, CLOSE_LEN),
    MessageType.PATH_CHALLENGE: (PATH_CHECK_LEN, PATH_CHECK_LEN),
    MessageType.PATH_RESPONSE: (PATH_CHECK_LEN, PATH_CHECK_LEN),
}

#: Byte 1 -> its type, for the transport types only (:func:`parse_transport_untrusted`).
_TRANSPORT_TYPE_BY_VALUE: Mapping[int, MessageType] = {t.value: t for t in TRANSPORT_TYPES}
#: :data:`PLAINTEXT_LEN_BOUNDS` as a plain dict, read once per received datagram.
_TRANSPORT_BOUNDS: dict[MessageType, tuple[int, int]] = dict(PLAINTEXT_LEN_BOUNDS)

# ---------------------------------------------------------------------------
# Reason codes on the wire
# ---------------------------------------------------------------------------

R = ReasonCode

#: REATTACH_REJECT and CLOSE carry a ReasonCode as a u16: its position in this
#: tuple.  Append only, never reorder or remove: the numbers are wire format
#: (``tests/data/golden/wire_frames.json`` pins them; docs/wire-format.md lists them).
#: Position 0 is reserved so an all-zero field is never a valid reason.
REASON_WIRE_TABLE: tuple[ReasonCode | None, ...] = (
    None,  # 0: reserved
    # -- reattach rejections (spec 7, 9, 10) --------------------------------
    R.REPLAYED_NONCE,  # 1
    R.STALE_TIMESTAMP,  # 2
    R.STALE_VERSION,  # 3
    R.RATE_LIMITED,  # 4
    R.NOT_OWNER,  # 5
    R.OWNERSHIP_AMBIGUOUS,  # 6
    R.SESSION_TERMINATED,  # 7
    R.UNKNOWN_SESSION,  # 8
    R.SESSION_MISMATCH,  # 9
    R.ALREADY_BOUND,  # 10
    # -- terminations (Property 10) -----------------------------------------
    R.SESSION_TTL_EXPIRED,  # 11
    R.TRANSPORT_LOSS_TTL_EXPIRED,  # 12
    R.KEY_EXHAUSTED,  # 13
    R.OWNERSHIP_LOST,  # 14
    R.LOCAL_CLOSE,  # 15
    R.PEER_CLOSE,  # 16
    # -- dropped input --------------------------------------------------------
    R.MALFORMED,  # 17
    R.BAD_MAC,  # 18
    R.DECRYPT_FAILED,  # 19
    R.REPLAYED_COUNTER,  # 20
    R.STRAY_PACKET,  # 21
    R.HANDSHAKE_REPLAY,  # 22
    R.UNKNOWN_PEER,  # 23
    R.INVALID_TRANSITION,  # 24
    # -- transitions, switch causes, verdicts, keep-decisions ----------------
    R.HANDSHAKE_COMPLETE,  # 25
    R.LINK_DOWN,  # 26
    R.MISSED_PROBES,  # 27
    R.DELIVERY_TIMEOUT,  # 28
    R.LOSS_ABOVE_THRESHOLD,  # 29
    R.LATENCY_ABOVE_THRESHOLD,  # 30
    R.JITTER_ABOVE_THRESHOLD,  # 31
    R.PATH_HEALTHY_AGAIN,  # 32
    R.REATTACH_CONFIRMED,  # 33
    R.RECOVERY_WINDOW_EXCEEDED,  # 34
    R.SWITCH_RATE_EXCEEDED,  # 35
    R.RATE_WINDOW_CLEARED,  # 36
    R.PREFERRED_PATH_RESTORED,  # 37
    R.OPERATOR_PIN,  # 38
    R.NO_SAMPLES,  # 39
    R.WITHIN_THRESHOLDS,  # 40
    R.ACTIVE_PATH_HEALTHY,  # 41
    R.NO_BETTER_PATH,  # 42
    R.NO_CANDIDATE,  # 43
    R.DWELL_NOT_MET,  # 44
    R.REATTACH_IN_FLIGHT,  # 45
    R.PINNED,  # 46
    R.SESSION_CREATED,  # 47
    R.REATTACH_TIMEOUT,  # 48
    R.ENDPOINT_CHANGED,  # 49
    R.PEER_REMOVED,  # 50
    R.OPERATOR_UNPIN,  # 51
    R.OPERATOR_REEVALUATE,  # 52
    R.OPERATOR_DISCONNECT,  # 53
    R.OPERATOR_RECONNECT,  # 54
    R.UNMETERED_AVAILABLE,  # 55
    R.METERED_AVOIDED,  # 56
    R.SESSION_REPLACED,  # 57
    R.PATH_NOT_VALIDATED,  # 58
    R.STORE_UNAVAILABLE,  # 59
    R.STALE_EPOCH,  # 60
    R.SESSION_TAKEN_OVER,  # 61
    R.DATA_UNANSWERED,  # 62
)

#: The inverse of :data:`REASON_WIRE_TABLE`.
REASON_TO_WIRE: Mapping[ReasonCode, int] = {
    reason: code for code, reason in enumerate(REASON_WIRE_TABLE) if reason is not None
}


def reason_to_wire(reason: ReasonCode) -> int:
    """The u16 for ``reason``; ValueError if it has none (add it to REASON_WIRE_TABLE)."""
    try:
        return REASON_TO_WIRE[reason]
    except KeyError:
        raise ValueError(f"{reason} has no wire code: append it to REASON_WIRE_TABLE") from None


def reason_from_wire_untrusted(code: int) -> ReasonCode:
    """The ReasonCode for a received u16; BadFrame("reason") for 0 or an unknown code."""
    reason = REASON_WIRE_TABLE[code] if 0 <= code < len(REASON_WIRE_TABLE) else None
    if reason is None:
        raise BadFrame("reason")
    return reason


# ---------------------------------------------------------------------------
# The one error
# ---------------------------------------------------------------------------


class BadFrame(ValueError):
    """Bytes that are not a valid frame.  The only exception a decoder raises.

    ``reason`` names the failed check (``"short"``, ``"long"``, ``"version"``,
    ``"type"``, ``"reserved"``, ``"metadata_len"``, ``"path_id"``,
    ``"reason"``, ``"prefix_len"``, ``"session_id"``, ``"ip_version"``,
    ``"state_version"``);
    drivers count drops by it (aioquic's ``packet_dropped`` trigger).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------
# Field validators (local construction errors are ValueError: programming bugs)
# ---------------------------------------------------------------------------


def _uint(bits: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    limit = (1 << bits) - 1

    def check(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            raise ValueError(f"{attribute.name}: expected an integer in 0..{limit}, got {value!r}")

    return check


def exact_bytes(length: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    """An attrs validator for a ``bytes`` field of exactly ``length`` bytes (shared with noise.py and keyring.py)."""

    def check(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, bytes) or len(value) != length:
            raise ValueError(f"{attribute.name}: expected {length} bytes")

    return check


def _max_bytes(limit: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, bytes) or len(value) > limit:
            raise ValueError(f"{attribute.name}: expected at most {limit} bytes")

    return check


def _has_wire_code(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, ReasonCode) or value not in REASON_TO_WIRE:
        raise ValueError(f"{attribute.name}: {value!r} is not a ReasonCode with a wire code")


def _prefix_len_up_to(limit: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            raise ValueError(f"{attribute.name}: expected 0..{limit}, got {value!r}")

    return check


_prefix_len = _prefix_len_up_to(MAX_IPV4_PREFIX)
_prefix_len6 = _prefix_len_up_to(MAX_IPV6_PREFIX)
_NO_IPV6 = bytes(IPV6_LEN)


def _tunnel_ipv6(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    # The all-zero address is how the wire says "no IPv6": it cannot also be one.
    if value is not None and (not isinstance(value, ipaddress.IPv6Address) or value.packed == _NO_IPV6):
        raise ValueError(f"{attribute.name}: expected None or an IPv6Address other than ::, got {value!r}")


_ZERO_SESSION = bytes(SESSION_ID_BYTES)


def _not_zero_session(_inst: object, attribute: attrs.Attribute[Any], value: SessionId | None) -> None:
    # All-zero is how the wire says "no session": it cannot also name one.
    if value is not None and value.raw == _ZERO_SESSION:
        raise ValueError(f"{attribute.name}: the all-zero session id means 'new session'; pass None")


_u16, _u32, _u64 = _uint(16), _uint(32), _uint(64)
_is_session = attrs.validators.instance_of(SessionId)
_is_path = attrs.validators.instance_of(PathId)
_is_optional_path = attrs.validators.optional(_is_path)

# ---------------------------------------------------------------------------
# Header helpers
# ---------------------------------------------------------------------------


def is_data_untrusted(data: bytes) -> bool:
    """Whether a datagram claims to be DATA or DATA_PARTIAL of this version: bytes 0 and 1 only.

    The receive loops' test before any parsing; the claim is unauthenticated until opened.
    """
    return len(data) > 1 and data[1] in DATA_TYPE_BYTES and data[0] == PROTOCOL_VERSION


def peek_type_untrusted(data: bytes) -> MessageType:
    """The message type of a datagram, after checking its length and version.

    The first thing a receive loop calls: it picks the decoder and lets the
    driver count drops by type.  Raises BadFrame ("short", "version", "type").
    """
    if len(data) < HEADER_LEN:
        raise BadFrame("short")
    if data[0] != PROTOCOL_VERSION:
        raise BadFrame("version")
    msg_type = _TYPE_BY_VALUE.get(data[1])  # a dict hit, not an Enum call: once per datagram
    if msg_type is None:
        raise BadFrame("type")
    return msg_type


def _expect_type(data: bytes, expected: frozenset[MessageType]) -> MessageType:
    msg_type = peek_type_untrusted(data)
    if msg_type not in expected:
        raise BadFrame("type")
    return msg_type


def _exact_len(data: bytes, length: int) -> None:
    if len(data) < length:
        raise BadFrame("short")
    if len(data) > length:
        raise BadFrame("long")


def _path_id_untrusted(value: int) -> PathId:
    if value == NO_PATH:
        raise BadFrame("path_id")
    return PathId(value)  # one byte, so 1..255 always fits


# ---------------------------------------------------------------------------
# Handshake messages
# ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class HandshakeInit:
    """Message 1 of Noise IK: the initiator's ephemeral, encrypted static and payload."""

    sender_index: int = attrs.field(validator=_u32)
    ephemeral: bytes = attrs.field(validator=exact_bytes(KEY_LEN))
    encrypted_static: bytes = attrs.field(validator=exact_bytes(ENCRYPTED_STATIC_LEN))
    encrypted_payload: bytes = attrs.field(validator=exact_bytes(ENCRYPTED_INIT_PAYLOAD_LEN))
    mac1: bytes = attrs.field(validator=exact_bytes(MAC_LEN))
    #: Present only when the initiator holds a cookie (the gateway asked for one under load).
    mac2: bytes | None = attrs.field(default=None, validator=attrs.validators.optional(exact_bytes(MAC_LEN)))


def encode_handshake_init(msg: HandshakeInit) -> bytes:
    encoded = _HANDSHAKE_INIT.pack(
        PROTOCOL_VERSION,
        MessageType.HANDSHAKE_INIT,
        msg.sender_index,
        msg.ephemeral,
        msg.encrypted_static,
        msg.encrypted_payload,
        msg.mac1,
    )
    return encoded if msg.mac2 is None else encoded + msg.mac2


_HANDSHAKE_INIT_ONLY = frozenset({MessageType.HANDSHAKE_INIT})
_HANDSHAKE_RESP_ONLY = frozenset({MessageType.HANDSHAKE_RESP})


def decode_handshake_init_untrusted(data: bytes) -> HandshakeInit:
    """Parse a HANDSHAKE_INIT (:data:`HANDSHAKE_INIT_LEN` bytes, or :data:`HANDSHAKE_INIT_MAC2_LEN` with mac2).

    Raises BadFrame.
    """
    _expect_type(data, _HANDSHAKE_INIT_ONLY)
    mac2: bytes | None = None
    if len(data) == HANDSHAKE_INIT_MAC2_LEN:
        data, mac2 = data[:HANDSHAKE_INIT_LEN], data[HANDSHAKE_INIT_LEN:]
    _exact_len(data, HANDSHAKE_INIT_LEN)
    _, _, sender, ephemeral, enc_static, enc_payload, mac1 = _HANDSHAKE_INIT.unpack(data)
    return HandshakeInit(
        sender_index=sender,
        ephemeral=ephemeral,
        encrypted_static=enc_static,
        encrypted_payload=enc_payload,
        mac1=mac1,
        mac2=mac2,
    )


@attrs.frozen(kw_only=True)
class CookieReply:
    """The gateway's answer under load: a cookie for the sender's address, sealed to the init it answers.

    ``receiver_index`` is the init's sender index; the seal's associated data
    is the init's mac1, so only the initiator of that very init opens it.
    """

    receiver_index: int = attrs.field(validator=_u32)
    nonce: bytes = attrs.field(validator=exact_bytes(COOKIE_NONCE_LEN))
    sealed_cookie: bytes = attrs.field(validator=exact_bytes(COOKIE_LEN + TAG_LEN))


def encode_cookie_reply(msg: CookieReply) -> bytes:
    return pack_cookie_reply(msg.receiver_index, msg.nonce, msg.sealed_cookie)


def pack_cookie_reply(receiver_index: int, nonce: bytes, sealed_cookie: bytes) -> bytes:
    """:func:`encode_cookie_reply` without the message object (the gateway's path under a flood)."""
    return _COOKIE_REPLY.pack(PROTOCOL_VERSION, MessageType.COOKIE_REPLY, receiver_index, nonce, sealed_cookie)


_COOKIE_REPLY_ONLY = frozenset({MessageType.COOKIE_REPLY})


def decode_cookie_reply_untrusted(data: bytes) -> CookieReply:
    """Parse a COOKIE_REPLY (exactly :data:`COOKIE_REPLY_LEN` bytes); raises BadFrame."""
    _expect_type(data, _COOKIE_REPLY_ONLY)
    _exact_len(data, COOKIE_REPLY_LEN)
    _, _, receiver, nonce, sealed = _COOKIE_REPLY.unpack(data)
    return CookieReply(receiver_index=receiver, nonce=nonce, sealed_cookie=sealed)


@attrs.frozen(kw_only=True)
class HandshakeResp:
    """Message 2 of Noise IK: the responder's ephemeral and encrypted session payload."""

    sender_index: int = attrs.field(validator=_u32)
    receiver_index: int = attrs.field(validator=_u32)
    ephemeral: bytes = attrs.field(validator=exact_bytes(KEY_LEN))
    encrypted_payload: bytes = attrs.field(validator=exact_bytes(ENCRYPTED_RESP_PAYLOAD_LEN))
    mac1: bytes = attrs.field(validator=exact_bytes(MAC_LEN))


def encode_handshake_resp(msg: HandshakeResp) -> bytes:
    return _HANDSHAKE_RESP.pack(
        PROTOCOL_VERSION,
        MessageType.HANDSHAKE_RESP,
        msg.sender_index,
        msg.receiver_index,
        msg.ephemeral,
        msg.encrypted_payload,
        msg.mac1,
    )


def decode_handshake_resp_untrusted(data: bytes) -> HandshakeResp:
    """Parse a HANDSHAKE_RESP (exactly :data:`HANDSHAKE_RESP_LEN` bytes); raises BadFrame."""
    _expect_type(data, _HANDSHAKE_RESP_ONLY)
    _exact_len(data, HANDSHAKE_RESP_LEN)
    _, _, sender, receiver, ephemeral, enc_payload, mac1 = _HANDSHAKE_RESP.unpack(data)
    return HandshakeResp(
        sender_index=sender,
        receiver_index=receiver,
        ephemeral=ephemeral,
        encrypted_payload=enc_payload,
        mac1=mac1,
    )


@attrs.frozen(kw_only=True)
class InitPayload:
    """What HANDSHAKE_INIT encrypts: freshness, the session to rekey (None = new), the path, and
    the state version the client holds for that session.

    ``state_version`` lets a gateway that takes the session over (docs/cluster.md) start at the
    version the client holds.  It is 0 exactly when ``rekey_session`` is None (a new session
    has no version yet), so "no session" keeps one encoding; ValueError otherwise.
    """

    timestamp: bytes = attrs.field(validator=exact_bytes(TIMESTAMP_LEN))
    rekey_session: SessionId | None = attrs.field(
        validator=[attrs.validators.optional(_is_session), _not_zero_session]
    )
    path_id: PathId = attrs.field(validator=_is_path)
    state_version: int = attrs.field(validator=_u64)

    def __attrs_post_init__(self) -> None:
        if self.rekey_session is None and self.state_version != 0:
            raise ValueError("state_version: must be 0 without a rekey_session")


def encode_init_payload(payload: InitPayload) -> bytes:
    rekey = payload.rekey_session.raw if payload.rekey_session is not None else _ZERO_SESSION
    return _INIT_PAYLOAD.pack(payload.timestamp, rekey, payload.path_id.value, payload.state_version)


def decode_init_payload_untrusted(data: bytes) -> InitPayload:
    """Parse the decrypted init payload; raises BadFrame ("short", "long", "path_id", "state_version").

    A non-zero ``state_version`` beside the all-zero ("new session") id is refused, so every
    payload that decodes encodes back to the same bytes.
    """
    _exact_len(data, INIT_PAYLOAD_LEN)
    timestamp, rekey, path, state_version = _INIT_PAYLOAD.unpack(data)
    if rekey == _ZERO_SESSION and state_version != 0:
        raise BadFrame("state_version")
    return InitPayload(
        timestamp=timestamp,
        rekey_session=None if rekey == _ZERO_SESSION else SessionId(rekey),
        path_id=_path_id_untrusted(path),
        state_version=state_version,
    )


@attrs.frozen(kw_only=True)
class RespPayload:
    """What HANDSHAKE_RESP encrypts: the session the gateway assigned, its tunnel addresses, and
    the fencing epoch.

    ``tunnel_ipv6`` is None when the gateway's tunnel carries no IPv6; then
    ``prefix_len6`` is 0 (on the wire: 16 zero bytes and a zero prefix).
    ``owner_epoch`` is the ownership store revision the gateway holds for the session
    (docs/cluster.md): the client refuses a later REATTACH_ACK with a lower one.
    """

    session_id: SessionId = attrs.field(validator=_is_session)
    state_version: int = attrs.field(validator=_u64)
    tunnel_ipv4: ipaddress.IPv4Address = attrs.field(
        validator=attrs.validators.instance_of(ipaddress.IPv4Address)
    )
    prefix_len: int = attrs.field(validator=_prefix_len)
    owner_epoch: int = attrs.field(validator=_u64)
    tunnel_ipv6: ipaddress.IPv6Address | None = attrs.field(default=None, validator=_tunnel_ipv6)
    prefix_len6: int = attrs.field(default=0, validator=_prefix_len6)

    def __attrs_post_init__(self) -> None:
        if self.tunnel_ipv6 is None and self.prefix_len6 != 0:
            raise ValueError("prefix_len6: must be 0 without a tunnel_ipv6")


def encode_resp_payload(payload: RespPayload) -> bytes:
    ipv6 = payload.tunnel_ipv6.packed if payload.tunnel_ipv6 is not None else _NO_IPV6
    return _RESP_PAYLOAD.pack(
        payload.session_id.raw,
        payload.state_version,
        payload.tunnel_ipv4.packed,
        payload.prefix_len,
        ipv6,
        payload.prefix_len6,
        payload.owner_epoch,
    )


def decode_resp_payload_untrusted(data: bytes) -> RespPayload:
    """Parse the decrypted response payload; raises BadFrame ("short", "long", "prefix_len").

    ``prefix_len`` is refused above 32, ``prefix_len6`` above 128 or non-zero
    beside the all-zero ("no IPv6") address, so every payload that decodes
    encodes back to the same bytes.
    """
    _exact_len(data, RESP_PAYLOAD_LEN)
    session, version, address, prefix, address6, prefix6, owner_epoch = _RESP_PAYLOAD.unpack(data)
    if prefix > MAX_IPV4_PREFIX or prefix6 > MAX_IPV6_PREFIX or (address6 == _NO_IPV6 and prefix6 != 0):
        raise BadFrame("prefix_len")
    return RespPayload(
        session_id=SessionId(session),
        state_version=version,
        tunnel_ipv4=ipaddress.IPv4Address(address),
        prefix_len=prefix,
        tunnel_ipv6=None if address6 == _NO_IPV6 else ipaddress.IPv6Address(address6),
        prefix_len6=prefix6,
        owner_epoch=owner_epoch,
    )


# ---------------------------------------------------------------------------
# Transport framing (parsed without keys)
# ---------------------------------------------------------------------------


def _transport_type(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in TRANSPORT_TYPES:
        raise ValueError(f"{attribute.name}: {value!r} is not a transport message type")


@attrs.frozen(kw_only=True)
class TransportHeader:
    """The 16 bytes before a transport ciphertext; also its AEAD associated data."""

    msg_type: MessageType = attrs.field(converter=MessageType, validator=_transport_type)
    receiver_index: int = attrs.field(validator=_u32)
    counter: int = attrs.field(validator=_u64)


def pack_transport_header(msg_type: MessageType, receiver_index: int, counter: int) -> bytes:
    """The 16 header bytes for values the caller already holds valid (the data path's send side)."""
    return _TRANSPORT_HEADER.pack(PROTOCOL_VERSION, msg_type, 0, receiver_index, counter)


def encode_transport_header(header: TransportHeader) -> bytes:
    return _TRANSPORT_HEADER.pack(
        PROTOCOL_VERSION, header.msg_type, 0, header.receiver_index, header.counter
    )


def _ciphertext_len(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bytes) or len(value) < TAG_LEN:
        raise ValueError(f"{attribute.name}: expected bytes including a {TAG_LEN}-byte tag")


@attrs.frozen(kw_only=True)
class TransportFrame:
    """A transport message as received: header plus ciphertext (tag included), not yet opened."""

    header: TransportHeader
    ciphertext: bytes = attrs.field(validator=_ciphertext_len, repr=lambda c: f"<{len(c)} bytes>")

    def __attrs_post_init__(self) -> None:
        low, high = PLAINTEXT_LEN_BOUNDS[self.header.msg_type]
        if not low + TAG_LEN <= len(self.ciphertext) <= high + TAG_LEN:
            raise ValueError(f"ciphertext length {len(self.ciphertext)} does not fit {self.header.msg_type.name}")


def encode_transport(frame: TransportFrame) -> bytes:
    return encode_transport_header(frame.header) + frame.ciphertext


def parse_transport_untrusted(data: bytes) -> tuple[MessageType, int, int]:
    """``(type, receiver_index, counter)`` of a transport datagram, checked, without objects.

    The data path's hot loop calls this once per packet; it performs every
    check :func:`decode_transport_untrusted` does.  The associated data is
    ``data[:TRANSPORT_HEADER_LEN]`` and the ciphertext the rest.  Raises
    BadFrame ("short", "long", "version", "type", "reserved").
    """
    size = len(data)
    if size < HEADER_LEN:
        raise BadFrame("short")
    if data[0] != PROTOCOL_VERSION:
        raise BadFrame("version")
    msg_type = _TRANSPORT_TYPE_BY_VALUE.get(data[1])  # the checks of _expect_type, in its order
    if msg_type is None:
        raise BadFrame("type")
    if size < TRANSPORT_HEADER_LEN:
        raise BadFrame("short")
    if size > MAX_DATAGRAM:
        raise BadFrame("long")
    _, _, reserved, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
    if reserved:
        raise BadFrame("reserved")
    low, high = _TRANSPORT_BOUNDS[msg_type]
    sealed_len = size - TRANSPORT_HEADER_LEN
    if sealed_len < low + TAG_LEN:
        raise BadFrame("short")
    if sealed_len > high + TAG_LEN:
        raise BadFrame("long")
    return msg_type, receiver, counter


#: The receiver index follows version, type and the reserved u16 of the transport header.
RECEIVER_INDEX_OFFSET = struct.calcsize("!BBH")  # 4
_RECEIVER_INDEX = struct.Struct("!I")
#: Where the receiver index ends: ``data[RECEIVER_INDEX_OFFSET:RECEIVER_INDEX_END]`` are its bytes.
RECEIVER_INDEX_END = RECEIVER_INDEX_OFFSET + _RECEIVER_INDEX.size


def peek_receiver_index_untrusted(data: bytes) -> int:
    """The receiver index of a transport datagram, so the receive loop can find its session.

    Reads that one field and checks nothing else: the session's channel runs
    every check of :func:`parse_transport_untrusted` next.  It is on the data
    path, hence one ``unpack_from`` and no length arithmetic.  Raises
    BadFrame("short") if the datagram ends before the field.
    """
    try:
        index: int = _RECEIVER_INDEX.unpack_from(data, RECEIVER_INDEX_OFFSET)[0]
    except struct.error:
        raise BadFrame("short") from None
    return index


def decode_transport_untrusted(data: bytes) -> TransportFrame:
    """Split a transport datagram into header and ciphertext, without keys.

    Checks version, type, reserved bytes and the per-type length bounds, so a
    wrongly sized frame never reaches the AEAD.  Raises BadFrame ("short",
    "long", "version", "type", "reserved").
    """
    msg_type, receiver, counter = parse_transport_untrusted(data)
    return TransportFrame(
        header=TransportHeader(msg_type=msg_type, receiver_index=receiver, counter=counter),
        ciphertext=bytes(data[TRANSPORT_HEADER_LEN:]),
    )


# ---------------------------------------------------------------------------
# Transport plaintexts (decoded only after the frame authenticated)
# ---------------------------------------------------------------------------


@attrs.frozen
class Data:
    """An IP packet through the tunnel; empty means keepalive."""

    packet: bytes = attrs.field(validator=_max_bytes(MAX_DATA_PLAINTEXT), repr=lambda p: f"<{len(p)} bytes>")

    @property
    def is_keepalive(self) -> bool:
        return not self.packet


def encode_data_plaintext(msg: Data) -> bytes:
    return msg.packet


def decode_data_plaintext_untrusted(data: bytes) -> Data:
    """Wrap a decrypted DATA payload; raises BadFrame("long") past MAX_DATA_PLAINTEXT."""
    if len(data) > MAX_DATA_PLAINTEXT:
        raise BadFrame("long")
    return Data(bytes(data))


def data_packet(msg_type: MessageType, plaintext: bytes) -> bytes:
    """The inner packet of an opened DATA or DATA_PARTIAL frame, typed so the TUN knows what to complete."""
    return PartialPacket(plaintext) if msg_type is MessageType.DATA_PARTIAL else plaintext


def decode_data_partial_plaintext_untrusted(data: bytes) -> Data:
    """Wrap a decrypted DATA_PARTIAL payload: a Data whose packet is a :class:`PartialPacket`."""
    if len(data) > MAX_DATA_PLAINTEXT:
        raise BadFrame("long")
    return Data(PartialPacket(data))


@attrs.frozen(kw_only=True)
class Probe:
    """An authenticated path probe; the gateway echoes ``sent_us`` for RTT."""

    path_id: PathId = attrs.field(validator=_is_path)
    seq: int = attrs.field(validator=_u32)
    sent_us: int = attrs.field(validator=_u64)


def encode_probe_plaintext(msg: Probe) -> bytes:
    return _PROBE.pack(msg.path_id.value, msg.seq, msg.sent_us)


def decode_probe_plaintext_untrusted(data: bytes) -> Probe:
    _exact_len(data, PROBE_LEN)
    path, seq, sent_us = _PROBE.unpack(data)
    return Probe(path_id=_path_id_untrusted(path), seq=seq, sent_us=sent_us)


@attrs.frozen(kw_only=True)
class ProbeAck:
    """The gateway's answer to a probe, with its view of the session (version, bound path)."""

    path_id: PathId = attrs.field(validator=_is_path)
    seq: int = attrs.field(validator=_u32)
    echo_sent_us: int = attrs.field(validator=_u64)
    gateway_state_version: int = attrs.field(validator=_u64)
    #: None = not bound on any path (wire 0).
    bound_path_id: PathId | None = attrs.field(validator=_is_optional_path)


def encode_probe_ack_plaintext(msg: ProbeAck) -> bytes:
    bound = msg.bound_path_id.value if msg.bound_path_id is not None else NO_PATH
    return _PROBE_ACK.pack(
        msg.path_id.value, msg.seq, msg.echo_sent_us, msg.gateway_state_version, bound
    )


def decode_probe_ack_plaintext_untrusted(data: bytes) -> ProbeAck:
    _exact_len(data, PROBE_ACK_LEN)
    path, seq, echo, version, bound = _PROBE_ACK.unpack(data)
    return ProbeAck(
        path_id=_path_id_untrusted(path),
        seq=seq,
        echo_sent_us=echo,
        gateway_state_version=version,
        bound_path_id=None if bound == NO_PATH else PathId(bound),
    )


@attrs.frozen(kw_only=True)
class Reattach:
    """Spec 7: move the session to ``path_id``.  Proof of possession is the AEAD itself."""

    session_id: SessionId = attrs.field(validator=_is_session)
    path_id: PathId = attrs.field(validator=_is_path)
    nonce: int = attrs.field(validator=_u64)
    client_ts_ms: int = attrs.field(validator=_u64)
    expected_version: int = attrs.field(validator=_u64)
    metadata: bytes = attrs.field(default=b"", validator=_max_bytes(MAX_METADATA))


def encode_reattach_plaintext(msg: Reattach) -> bytes:
    return (
        _REATTACH_FIXED.pack(
            msg.session_id.raw,
            msg.path_id.value,
            msg.nonce,
            msg.client_ts_ms,
            msg.expected_version,
            len(msg.metadata),
        )
        + msg.metadata
    )


def decode_reattach_plaintext_untrusted(data: bytes) -> Reattach:
    """Raises BadFrame ("short", "long", "metadata_len", "path_id")."""
    if len(data) < REATTACH_MIN_LEN:
        raise BadFrame("short")
    if len(data) > REATTACH_MAX_LEN:
        raise BadFrame("long")
    session, path, nonce, ts_ms, version, meta_len = _REATTACH_FIXED.unpack_from(data)
    if meta_len > MAX_METADATA or meta_len != len(data) - REATTACH_MIN_LEN:
        raise BadFrame("metadata_len")
    return Reattach(
        session_id=SessionId(session),
        path_id=_path_id_untrusted(path),
        nonce=nonce,
        client_ts_ms=ts_ms,
        expected_version=version,
        metadata=bytes(data[REATTACH_MIN_LEN:]),
    )


@attrs.frozen(kw_only=True)
class ReattachAck:
    """The gateway bound the session to ``path_id`` at ``new_version``, holding it at ``owner_epoch``.

    ``owner_epoch`` is the gateway's fencing token (docs/cluster.md): the client refuses an ack
    whose epoch is below the highest it has seen (STALE_EPOCH), so a stale owner that still
    holds the keys cannot move it.
    """

    session_id: SessionId = attrs.field(validator=_is_session)
    nonce: int = attrs.field(validator=_u64)
    new_version: int = attrs.field(validator=_u64)
    path_id: PathId = attrs.field(validator=_is_path)
    owner_epoch: int = attrs.field(validator=_u64)


def encode_reattach_ack_plaintext(msg: ReattachAck) -> bytes:
    return _REATTACH_ACK.pack(msg.session_id.raw, msg.nonce, msg.new_version, msg.path_id.value, msg.owner_epoch)


def decode_reattach_ack_plaintext_untrusted(data: bytes) -> ReattachAck:
    _exact_len(data, REATTACH_ACK_LEN)
    session, nonce, version, path, owner_epoch = _REATTACH_ACK.unpack(data)
    return ReattachAck(
        session_id=SessionId(session),
        nonce=nonce,
        new_version=version,
        path_id=_path_id_untrusted(path),
        owner_epoch=owner_epoch,
    )


@attrs.frozen(kw_only=True)
class ReattachReject:
    """Spec 7: an explicit, reason-coded refusal; the gateway changed nothing."""

    session_id: SessionId = attrs.field(validator=_is_session)
    nonce: int = attrs.field(validator=_u64)
    reason: ReasonCode = attrs.field(validator=_has_wire_code)
    current_version: int = attrs.field(validator=_u64)


def encode_reattach_reject_plaintext(msg: ReattachReject) -> bytes:
    return _REATTACH_REJECT.pack(
        msg.session_id.raw, msg.nonce, REASON_TO_WIRE[msg.reason], msg.current_version
    )


def decode_reattach_reject_plaintext_untrusted(data: bytes) -> ReattachReject:
    _exact_len(data, REATTACH_REJECT_LEN)
    session, nonce, code, version = _REATTACH_REJECT.unpack(data)
    return ReattachReject(
        session_id=SessionId(session),
        nonce=nonce,
        reason=reason_from_wire_untrusted(code),
        current_version=version,
    )


@attrs.frozen(kw_only=True)
class Close:
    """The session ends (Property 10): always with an explicit reason."""

    session_id: SessionId = attrs.field(validator=_is_session)
    reason: ReasonCode = attrs.field(validator=_has_wire_code)


def encode_close_plaintext(msg: Close) -> bytes:
    return _CLOSE.pack(msg.session_id.raw, REASON_TO_WIRE[msg.reason])


def decode_close_plaintext_untrusted(data: bytes) -> Close:
    _exact_len(data, CLOSE_LEN)
    session, code = _CLOSE.unpack(data)
    return Close(session_id=SessionId(session), reason=reason_from_wire_untrusted(code))


@attrs.frozen(kw_only=True)
class _PathCheck:
    """The body PATH_CHALLENGE and PATH_RESPONSE share: the message type says which it is."""

    session_id: SessionId = attrs.field(validator=_is_session)
    nonce: int = attrs.field(validator=_u64)
    challenge: int = attrs.field(validator=_u64)
    path_id: PathId = attrs.field(validator=_is_path)


@attrs.frozen(kw_only=True)
class PathChallenge(_PathCheck):
    """Gateway: prove you receive at the address your REATTACH ``nonce`` came from (return routability).

    Sealed, so only the key holder can read ``challenge``; the transport counter's replay
    window makes each copy single-use, so the value needs to be unique, not secret.
    """


@attrs.frozen(kw_only=True)
class PathResponse(_PathCheck):
    """Client: the echo of a PATH_CHALLENGE, sent on the path its REATTACH left by."""


def encode_path_check_plaintext(msg: _PathCheck) -> bytes:
    return _PATH_CHECK.pack(msg.session_id.raw, msg.nonce, msg.challenge, msg.path_id.value)


def decode_path_challenge_plaintext_untrusted(data: bytes) -> PathChallenge:
    return PathChallenge(**_path_check_fields_untrusted(data))


def decode_path_response_plaintext_untrusted(data: bytes) -> PathResponse:
    return PathResponse(**_path_check_fields_untrusted(data))


def _path_check_fields_untrusted(data: bytes) -> dict[str, Any]:
    _exact_len(data, PATH_CHECK_LEN)
    session, nonce, challenge, path = _PATH_CHECK.unpack(data)
    return {"session_id": SessionId(session), "nonce": nonce, "challenge": challenge, "path_id": _path_id_untrusted(path)}


# ---------------------------------------------------------------------------
# Tunnelled IP packets (read from the TUN, routed to a session by destination)
# ---------------------------------------------------------------------------

#: The version nibble of an IPv4 header.
IPV4_VERSION = 4
#: An IPv4 header without options; the destination address is its last four bytes.
IPV4_HEADER_MIN_LEN = 20
_IPV4_DESTINATION = struct.Struct("!I")
_IPV4_DESTINATION_OFFSET = IPV4_HEADER_MIN_LEN - _IPV4_DESTINATION.size  # 16


def ipv4_destination_untrusted(packet: bytes) -> ipaddress.IPv4Address:
    """The destination address of an IPv4 packet, which names the session that carries it.

    Only the version and the fixed header's length are checked: the packet
    itself travels sealed and unmodified.  Raises BadFrame ("short",
    "ip_version").
    """
    if len(packet) < IPV4_HEADER_MIN_LEN:
        raise BadFrame("short")
    if packet[0] >> 4 != IPV4_VERSION:
        raise BadFrame("ip_version")
    return ipaddress.IPv4Address(_IPV4_DESTINATION.unpack_from(packet, _IPV4_DESTINATION_OFFSET)[0])


#: The version nibble of an IPv6 header.
IPV6_VERSION = 6
#: The fixed IPv6 header; the destination address is its last sixteen bytes.
IPV6_HEADER_LEN = 40
_IPV6_DESTINATION_OFFSET = IPV6_HEADER_LEN - IPV6_LEN  # 24


def ip_destination_untrusted(packet: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The destination address of an IPv4 or IPv6 packet, which names the session that carries it.

    As :func:`ipv4_destination_untrusted`, for both versions: only the version
    nibble and the fixed header's length are checked.  Raises BadFrame
    ("short", "ip_version").
    """
    if not packet:
        raise BadFrame("short")
    version = packet[0] >> 4
    if version == IPV6_VERSION:
        if len(packet) < IPV6_HEADER_LEN:
            raise BadFrame("short")
        return ipaddress.IPv6Address(bytes(packet[_IPV6_DESTINATION_OFFSET:IPV6_HEADER_LEN]))
    return ipv4_destination_untrusted(packet)


# ---------------------------------------------------------------------------
# Dispatchers
# ---------------------------------------------------------------------------

Frame = Union[HandshakeInit, HandshakeResp, CookieReply, TransportFrame]
InnerMessage = Union[
    Data, Probe, ProbeAck, Reattach, ReattachAck, ReattachReject, Close, PathChallenge, PathResponse
]

_FRAME_DECODERS: Mapping[MessageType, Callable[[bytes], Frame]] = {
    MessageType.HANDSHAKE_INIT: decode_handshake_init_untrusted,
    MessageType.HANDSHAKE_RESP: decode_handshake_resp_untrusted,
    MessageType.COOKIE_REPLY: decode_cookie_reply_untrusted,
    **{t: decode_transport_untrusted for t in TRANSPORT_TYPES},
}


def decode_untrusted(data: bytes) -> Frame:
    """Decode any datagram by its type byte; raises BadFrame."""
    return _FRAME_DECODERS[peek_type_untrusted(data)](data)


def encode(frame: Frame) -> bytes:
    """Encode any frame; the inverse of :func:`decode_untrusted`."""
    if isinstance(frame, HandshakeInit):
        return encode_handshake_init(frame)
    if isinstance(frame, HandshakeResp):
        return encode_handshake_resp(frame)
    if isinstance(frame, CookieReply):
        return encode_cookie_reply(frame)
    return encode_transport(frame)


_PLAINTEXT_CODECS: Mapping[type, tuple[MessageType, Callable[[Any], bytes]]] = {
    Data: (MessageType.DATA, encode_data_plaintext),
    Probe: (MessageType.PROBE, encode_probe_plaintext),
    ProbeAck: (MessageType.PROBE_ACK, encode_probe_ack_plaintext),
    Reattach: (MessageType.REATTACH, encode_reattach_plaintext),
    ReattachAck: (MessageType.REATTACH_ACK, encode_reattach_ack_plaintext),
    ReattachReject: (MessageType.REATTACH_REJECT, encode_reattach_reject_plaintext),
    Close: (MessageType.CLOSE, encode_close_plaintext),
    PathChallenge: (MessageType.PATH_CHALLENGE, encode_path_check_plaintext),
    PathResponse: (MessageType.PATH_RESPONSE, encode_path_check_plaintext),
}

_PLAINTEXT_DECODERS: Mapping[MessageType, Callable[[bytes], InnerMessage]] = {
    MessageType.DATA: decode_data_plaintext_untrusted,
    MessageType.DATA_PARTIAL: decode_data_partial_plaintext_untrusted,
    MessageType.PROBE: decode_probe_plaintext_untrusted,
    MessageType.PROBE_ACK: decode_probe_ack_plaintext_untrusted,
    MessageType.REATTACH: decode_reattach_plaintext_untrusted,
    MessageType.REATTACH_ACK: decode_reattach_ack_plaintext_untrusted,
    MessageType.REATTACH_REJECT: decode_reattach_reject_plaintext_untrusted,
    MessageType.CLOSE: decode_close_plaintext_untrusted,
    MessageType.PATH_CHALLENGE: decode_path_challenge_plaintext_untrusted,
    MessageType.PATH_RESPONSE: decode_path_response_plaintext_untrusted,
}


def encode_plaintext(msg: InnerMessage) -> tuple[MessageType, bytes]:
    """The transport type and plaintext bytes for an inner message, ready for ``KeyRing.seal_frame``."""
    msg_type, encoder = _PLAINTEXT_CODECS[type(msg)]
    if isinstance(msg, Data) and type(msg.packet) is PartialPacket:
        msg_type = MessageType.DATA_PARTIAL
    return msg_type, encoder(msg)


def decode_plaintext_untrusted(msg_type: MessageType, plaintext: bytes) -> InnerMessage:
    """Decode an opened frame's plaintext by the (authenticated) header type; raises BadFrame."""
    decoder = _PLAINTEXT_DECODERS.get(msg_type)
    if decoder is None:
        raise BadFrame("type")
    return decoder(plaintext)
