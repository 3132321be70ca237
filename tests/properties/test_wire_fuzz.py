"""Fuzzing the untrusted parsers: garbage only ever raises the documented error.

Properties (STYLE.md, h11's fuzz harness and trio's ``BadPacket`` rule):

* every ``decode_*_untrusted`` either returns a message or raises BadFrame, on
  arbitrary bytes and on mutations of valid frames;
* encoding is canonical: ``encode(decode(x)) == x`` whenever ``x`` decodes;
* ``decode(encode(m)) == m`` for every generated message;
* the handshake and the key ring turn any hostile input into HandshakeError
  or DecryptFailed, never a ``cryptography`` exception.

Determinism: hypothesis draws the inputs (its database replays failures);
nothing reads a clock or the OS's randomness.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jvpn_trio.core import noise as hs
from jvpn_trio.core import wire
from jvpn_trio.core.noise import HandshakeError, PeerRecord, ResponderHandshake
from jvpn_trio.core.keyring import DecryptFailed, Keypair, KeyRing
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.wire import BadFrame, MessageType

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

u16 = st.integers(0, wire.U16_MAX)
u32 = st.integers(0, wire.U32_MAX)
u64 = st.integers(0, wire.U64_MAX)
session_ids = st.binary(min_size=16, max_size=16).map(SessionId)
#: A session an init may name for a rekey: any id but the all-zero "new session" one.
named_sessions = session_ids.filter(lambda s: s.raw != bytes(16))
path_ids = st.integers(1, 255).map(PathId)
reasons = st.sampled_from([r for r in wire.REASON_WIRE_TABLE if r is not None])


def exact(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


handshake_inits = st.builds(
    wire.HandshakeInit,
    sender_index=u32,
    ephemeral=exact(wire.KEY_LEN),
    encrypted_static=exact(wire.ENCRYPTED_STATIC_LEN),
    encrypted_payload=exact(wire.ENCRYPTED_INIT_PAYLOAD_LEN),
    mac1=exact(wire.MAC_LEN),
)
handshake_resps = st.builds(
    wire.HandshakeResp,
    sender_index=u32,
    receiver_index=u32,
    ephemeral=exact(wire.KEY_LEN),
    encrypted_payload=exact(wire.ENCRYPTED_RESP_PAYLOAD_LEN),
    mac1=exact(wire.MAC_LEN),
)


@st.composite
def transport_frames(draw: st.DrawFn) -> wire.TransportFrame:
    msg_type = draw(st.sampled_from(sorted(wire.TRANSPORT_TYPES)))
    low, high = wire.PLAINTEXT_LEN_BOUNDS[msg_type]
    length = draw(st.integers(low, min(high, low + 300)))
    return wire.TransportFrame(
        header=wire.TransportHeader(msg_type=msg_type, receiver_index=draw(u32), counter=draw(u64)),
        ciphertext=draw(exact(length + wire.TAG_LEN)),
    )


frames = st.one_of(handshake_inits, handshake_resps, transport_frames())

inner_messages = st.one_of(
    st.builds(wire.Data, st.binary(max_size=1500)),
    st.builds(wire.Probe, path_id=path_ids, seq=u32, sent_us=u64),
    st.builds(
        wire.ProbeAck,
        path_id=path_ids,
        seq=u32,
        echo_sent_us=u64,
        gateway_state_version=u64,
        bound_path_id=st.one_of(st.none(), path_ids),
    ),
    st.builds(
        wire.Reattach,
        session_id=session_ids,
        path_id=path_ids,
        nonce=u64,
        client_ts_ms=u64,
        expected_version=u64,
        metadata=st.binary(max_size=wire.MAX_METADATA),
    ),
    st.builds(
        wire.ReattachAck, session_id=session_ids, nonce=u64, new_version=u64, path_id=path_ids, owner_epoch=u64
    ),
    st.builds(wire.ReattachReject, session_id=session_ids, nonce=u64, reason=reasons, current_version=u64),
    st.builds(wire.Close, session_id=session_ids, reason=reasons),
    st.builds(wire.PathChallenge, session_id=session_ids, nonce=u64, challenge=u64, path_id=path_ids),
    st.builds(wire.PathResponse, session_id=session_ids, nonce=u64, challenge=u64, path_id=path_ids),
)

init_payloads = st.one_of(
    st.builds(
        wire.InitPayload, timestamp=exact(wire.TIMESTAMP_LEN), rekey_session=st.none(), path_id=path_ids, state_version=st.just(0)
    ),  # a new session: no version yet
    st.builds(
        wire.InitPayload,
        timestamp=exact(wire.TIMESTAMP_LEN),
        rekey_session=named_sessions,
        path_id=path_ids,
        state_version=u64,
    ),
)
resp_payloads = st.one_of(
    st.builds(
        wire.RespPayload,
        session_id=session_ids,
        state_version=u64,
        tunnel_ipv4=u32.map(ipaddress.IPv4Address),
        prefix_len=st.integers(0, wire.MAX_IPV4_PREFIX),
        owner_epoch=u64,
    ),
    st.builds(
        wire.RespPayload,
        session_id=session_ids,
        state_version=u64,
        tunnel_ipv4=u32.map(ipaddress.IPv4Address),
        prefix_len=st.integers(0, wire.MAX_IPV4_PREFIX),
        owner_epoch=u64,
        tunnel_ipv6=st.integers(1, (1 << 128) - 1).map(ipaddress.IPv6Address),
        prefix_len6=st.integers(0, wire.MAX_IPV6_PREFIX),
    ),
)

#: Every untrusted decoder with its inverse.
CODECS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "frame": (wire.decode_untrusted, wire.encode),
    "handshake_init": (wire.decode_handshake_init_untrusted, wire.encode_handshake_init),
    "handshake_resp": (wire.decode_handshake_resp_untrusted, wire.encode_handshake_resp),
    "transport": (wire.decode_transport_untrusted, wire.encode_transport),
    "init_payload": (wire.decode_init_payload_untrusted, wire.encode_init_payload),
    "resp_payload": (wire.decode_resp_payload_untrusted, wire.encode_resp_payload),
    "data": (wire.decode_data_plaintext_untrusted, wire.encode_data_plaintext),
    "probe": (wire.decode_probe_plaintext_untrusted, wire.encode_probe_plaintext),
    "probe_ack": (wire.decode_probe_ack_plaintext_untrusted, wire.encode_probe_ack_plaintext),
    "reattach": (wire.decode_reattach_plaintext_untrusted, wire.encode_reattach_plaintext),
    "reattach_ack": (wire.decode_reattach_ack_plaintext_untrusted, wire.encode_reattach_ack_plaintext),
    "reattach_reject": (wire.decode_reattach_reject_plaintext_untrusted, wire.encode_reattach_reject_plaintext),
    "close": (wire.decode_close_plaintext_untrusted, wire.encode_close_plaintext),
    "cookie_reply": (wire.decode_cookie_reply_untrusted, wire.encode_cookie_reply),
    "path_challenge": (wire.decode_path_challenge_plaintext_untrusted, wire.encode_path_check_plaintext),
    "path_response": (wire.decode_path_response_plaintext_untrusted, wire.encode_path_check_plaintext),
}

#: Arbitrary bytes, plus bytes behind a plausible header so the fuzzer gets past the first checks.
plausible_bytes = st.one_of(
    st.binary(max_size=256),
    st.builds(
        lambda version, msg_type, tail: bytes([version, msg_type]) + tail,
        st.sampled_from([wire.PROTOCOL_VERSION, wire.PROTOCOL_VERSION, 0, wire.PROTOCOL_VERSION - 1, wire.PROTOCOL_VERSION + 1]),
        st.integers(0, 12),
        st.binary(max_size=200),
    ),
    st.builds(
        lambda msg_type, tail: bytes([wire.PROTOCOL_VERSION, msg_type, 0, 0]) + tail,
        st.sampled_from(sorted(wire.TRANSPORT_TYPES)),
        st.binary(max_size=200),
    ),
)


def decode_or_bad_frame(decode: Callable[[bytes], Any], data: bytes) -> Any | None:
    """The decoded message, or None after BadFrame.  Any other exception fails the test."""
    try:
        return decode(data)
    except BadFrame as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return None


# ---------------------------------------------------------------------------
# Properties of the codecs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ
@given(data=plausible_bytes)
def test_arbitrary_bytes_raise_only_bad_frame_and_decode_canonically(name: str, data: bytes) -> None:
    decode, encode = CODECS[name]
    msg = decode_or_bad_frame(decode, data)
    if msg is not None:
        assert encode(msg) == data


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]))
    if kind == "truncate" or not original:
        return original[: draw(st.integers(0, len(original)))]
    if kind == "extend":
        return original + draw(st.binary(min_size=1, max_size=8))
    index = draw(st.integers(0, len(original) - 1))
    if kind == "flip":
        bit = 1 << draw(st.integers(0, 7))
        return original[:index] + bytes([original[index] ^ bit]) + original[index + 1 :]
    if kind == "set":
        return original[:index] + bytes([draw(st.integers(0, 255))]) + original[index + 1 :]
    if kind == "insert":
        return original[:index] + bytes([draw(st.integers(0, 255))]) + original[index:]
    return original[:index] + original[index + 1 :]


@FUZZ
@given(data=st.data(), frame=frames)
def test_mutated_frames_raise_only_bad_frame(data: st.DataObject, frame: wire.Frame) -> None:
    mutated = data.draw(mutations(wire.encode(frame)))
    msg = decode_or_bad_frame(wire.decode_untrusted, mutated)
    if msg is not None:
        assert wire.encode(msg) == mutated


@FUZZ
@given(data=st.data(), msg=inner_messages)
def test_mutated_plaintexts_raise_only_bad_frame(data: st.DataObject, msg: wire.InnerMessage) -> None:
    msg_type, plaintext = wire.encode_plaintext(msg)
    mutated = data.draw(mutations(plaintext))
    decoded = decode_or_bad_frame(lambda b: wire.decode_plaintext_untrusted(msg_type, b), mutated)
    if decoded is not None:
        assert wire.encode_plaintext(decoded) == (msg_type, mutated)


@FUZZ
@given(frame=frames)
def test_frames_round_trip(frame: wire.Frame) -> None:
    raw = wire.encode(frame)
    assert wire.decode_untrusted(raw) == frame
    assert wire.encode(wire.decode_untrusted(raw)) == raw


@FUZZ
@given(msg=inner_messages)
def test_plaintexts_round_trip(msg: wire.InnerMessage) -> None:
    msg_type, plaintext = wire.encode_plaintext(msg)
    assert wire.decode_plaintext_untrusted(msg_type, plaintext) == msg


@FUZZ
@given(payload=st.one_of(init_payloads, resp_payloads))
def test_handshake_payloads_round_trip(payload: wire.InitPayload | wire.RespPayload) -> None:
    if isinstance(payload, wire.InitPayload):
        assert wire.decode_init_payload_untrusted(wire.encode_init_payload(payload)) == payload
    else:
        assert wire.decode_resp_payload_untrusted(wire.encode_resp_payload(payload)) == payload


@FUZZ
@given(msg_type=st.integers(0, 255), plaintext=st.binary(max_size=128))
def test_plaintext_dispatcher_raises_only_bad_frame(msg_type: int, plaintext: bytes) -> None:
    try:
        kind = MessageType(msg_type)
    except ValueError:
        return
    decode_or_bad_frame(lambda b: wire.decode_plaintext_untrusted(kind, b), plaintext)


# ---------------------------------------------------------------------------
# Hostile input to the handshake and the key ring
# ---------------------------------------------------------------------------

RESPONDER = hs.StaticKeypair(hs.clamp_private(bytes(range(101, 133))))
INITIATOR = hs.StaticKeypair(hs.clamp_private(bytes(range(1, 33))))


def with_valid_mac1(init: wire.HandshakeInit, receiver_public: bytes) -> wire.HandshakeInit:
    body = wire.encode_handshake_init(init)[: wire.HANDSHAKE_INIT_MAC1_OFFSET]
    return attrs.evolve(init, mac1=hs._compute_mac1(body, receiver_public))


@FUZZ
@given(init=handshake_inits, remac=st.booleans())
def test_hostile_inits_raise_only_handshake_error(init: wire.HandshakeInit, remac: bool) -> None:
    if remac:  # get past mac1, as anyone who knows the gateway's public key can
        init = with_valid_mac1(init, RESPONDER.public)
    lookup = {INITIATOR.public: PeerRecord(public=INITIATOR.public)}.get
    with pytest.raises(HandshakeError):
        ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=lookup)


@FUZZ
@given(resp=handshake_resps)
def test_hostile_responses_raise_only_handshake_error(resp: wire.HandshakeResp) -> None:
    state, _ = hs.InitiatorHandshake.create(
        INITIATOR,
        RESPONDER.public,
        sender_index=resp.receiver_index,
        random_bytes=lambda n: bytes(range(7, 7 + n)),
        wall_time_ns=0,
        path_id=PathId(1),
    )
    body = wire.encode_handshake_resp(resp)[: wire.HANDSHAKE_RESP_MAC1_OFFSET]
    resp = attrs.evolve(resp, mac1=hs._compute_mac1(body, INITIATOR.public))
    with pytest.raises(HandshakeError):
        state.consume_response(resp)


def _ring() -> KeyRing:
    ring = KeyRing(Policy())
    ring.install_next(
        Keypair(
            send_key=bytes(32), recv_key=bytes(range(32)), local_index=7, remote_index=9, is_initiator=False, created_at=0.0
        )
    )
    return ring


@FUZZ
@given(frame=transport_frames(), index=st.sampled_from([7, 8]))
def test_hostile_transport_frames_raise_only_decrypt_failed(frame: wire.TransportFrame, index: int) -> None:
    ring = _ring()
    header = attrs.evolve(frame.header, receiver_index=index)
    with pytest.raises(DecryptFailed):
        ring.open(header, frame.ciphertext, now=1.0)
    assert ring.next is not None and ring.current is None  # nothing was promoted
