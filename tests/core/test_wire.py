"""Wire format: fixed layouts, golden bytes, and every malformed input class.

Determinism: no clock, no randomness; every frame is built from literals.

Golden vectors live in ``tests/data/golden/wire_frames.json`` (hex).  After an
intentional layout change (which is a protocol version bump), regenerate with::

    python -m tests.core.test_wire --regen

and review the diff: a changed golden byte is a wire-format change.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from pathlib import Path
from typing import Any, Callable

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jvpn_trio.core import wire
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.states import TERMINATION_REASONS, ReasonCode
from jvpn_trio.core.wire import (
    BadFrame,
    Close,
    Data,
    HandshakeInit,
    HandshakeResp,
    InitPayload,
    MessageType,
    Probe,
    ProbeAck,
    Reattach,
    ReattachAck,
    ReattachReject,
    RespPayload,
    TransportFrame,
    TransportHeader,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "wire_frames.json"

SID = SessionId(bytes(range(0x10, 0x20)))
P1, P2 = PathId(1), PathId(2)


def _fill(start: int, length: int) -> bytes:
    return bytes((start + i) % 256 for i in range(length))


# ---------------------------------------------------------------------------
# Sample messages: one per layout (two where a field is optional)
# ---------------------------------------------------------------------------

INIT = HandshakeInit(
    sender_index=0x01020304,
    ephemeral=_fill(0x20, wire.KEY_LEN),
    encrypted_static=_fill(0x40, wire.ENCRYPTED_STATIC_LEN),
    encrypted_payload=_fill(0x70, wire.ENCRYPTED_INIT_PAYLOAD_LEN),
    mac1=_fill(0xA0, wire.MAC_LEN),
)
RESP = HandshakeResp(
    sender_index=0x0A0B0C0D,
    receiver_index=0x01020304,
    ephemeral=_fill(0x30, wire.KEY_LEN),
    encrypted_payload=_fill(0x50, wire.ENCRYPTED_RESP_PAYLOAD_LEN),
    mac1=_fill(0xB0, wire.MAC_LEN),
)

#: Inner plaintext messages by golden name.
PLAINTEXTS: dict[str, Any] = {
    "data": Data(b"\x45\x00\x00\x14" + _fill(0, 16)),
    "data_keepalive": Data(b""),
    "probe": Probe(path_id=P1, seq=7, sent_us=1_000_000),
    "probe_ack": ProbeAck(
        path_id=P1, seq=7, echo_sent_us=1_000_000, gateway_state_version=3, bound_path_id=P2
    ),
    "probe_ack_unbound": ProbeAck(
        path_id=P2, seq=8, echo_sent_us=2, gateway_state_version=4, bound_path_id=None
    ),
    "reattach": Reattach(
        session_id=SID, path_id=P2, nonce=42, client_ts_ms=1_700_000_000_000, expected_version=5, metadata=b"wifi0"
    ),
    "reattach_no_metadata": Reattach(
        session_id=SID, path_id=P1, nonce=43, client_ts_ms=1, expected_version=6
    ),
    "reattach_ack": ReattachAck(session_id=SID, nonce=42, new_version=6, path_id=P2, owner_epoch=0x0102030405060708),
    "reattach_reject": ReattachReject(
        session_id=SID, nonce=42, reason=ReasonCode.STALE_VERSION, current_version=9
    ),
    "close": Close(session_id=SID, reason=ReasonCode.LOCAL_CLOSE),
}

#: Encoders and decoders of each inner type.
PLAINTEXT_CODECS: dict[type, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    Data: (wire.encode_data_plaintext, wire.decode_data_plaintext_untrusted),
    Probe: (wire.encode_probe_plaintext, wire.decode_probe_plaintext_untrusted),
    ProbeAck: (wire.encode_probe_ack_plaintext, wire.decode_probe_ack_plaintext_untrusted),
    Reattach: (wire.encode_reattach_plaintext, wire.decode_reattach_plaintext_untrusted),
    ReattachAck: (wire.encode_reattach_ack_plaintext, wire.decode_reattach_ack_plaintext_untrusted),
    ReattachReject: (wire.encode_reattach_reject_plaintext, wire.decode_reattach_reject_plaintext_untrusted),
    Close: (wire.encode_close_plaintext, wire.decode_close_plaintext_untrusted),
}

HANDSHAKE_PAYLOADS: dict[str, Any] = {
    "init_payload": InitPayload(
        timestamp=_fill(0x40, wire.TIMESTAMP_LEN), rekey_session=None, path_id=P1, state_version=0
    ),
    "init_payload_rekey": InitPayload(
        timestamp=_fill(0x41, wire.TIMESTAMP_LEN), rekey_session=SID, path_id=P2, state_version=9
    ),
    "resp_payload": RespPayload(
        session_id=SID, state_version=1, tunnel_ipv4=ipaddress.IPv4Address("10.77.0.2"), prefix_len=24, owner_epoch=3
    ),
    "resp_payload_ipv6": RespPayload(
        session_id=SID,
        state_version=2,
        tunnel_ipv4=ipaddress.IPv4Address("10.77.0.2"),
        prefix_len=24,
        owner_epoch=0x1122334455667788,
        tunnel_ipv6=ipaddress.IPv6Address("fd6a:7670::2"),
        prefix_len6=64,
    ),
}
PAYLOAD_CODECS: dict[type, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    InitPayload: (wire.encode_init_payload, wire.decode_init_payload_untrusted),
    RespPayload: (wire.encode_resp_payload, wire.decode_resp_payload_untrusted),
}


def transport_frame(msg_type: MessageType, plaintext_len: int, *, counter: int = 0x0102030405060708) -> TransportFrame:
    """An outer frame with a stand-in ciphertext: the framing never looks inside it."""
    return TransportFrame(
        header=TransportHeader(msg_type=msg_type, receiver_index=0xCAFEBABE, counter=counter),
        ciphertext=_fill(0x90, plaintext_len + wire.TAG_LEN),
    )


def sample_messages() -> dict[str, Any]:
    """Every golden message by name: handshake frames, transport frames, plaintexts, payloads."""
    samples: dict[str, Any] = {"handshake_init": INIT, "handshake_resp": RESP}
    for name, msg in PLAINTEXTS.items():
        msg_type, plaintext = wire.encode_plaintext(msg)
        samples[f"transport_{name}"] = transport_frame(msg_type, len(plaintext))
    samples.update({f"plaintext_{name}": msg for name, msg in PLAINTEXTS.items()})
    samples.update(HANDSHAKE_PAYLOADS)
    return samples


def encode_any(msg: Any) -> bytes:
    if isinstance(msg, (HandshakeInit, HandshakeResp, TransportFrame)):
        return wire.encode(msg)
    if type(msg) in PAYLOAD_CODECS:
        return PAYLOAD_CODECS[type(msg)][0](msg)
    return PLAINTEXT_CODECS[type(msg)][0](msg)


def decoder_for(msg: Any) -> Callable[[bytes], Any]:
    if isinstance(msg, (HandshakeInit, HandshakeResp, TransportFrame)):
        return wire.decode_untrusted
    if type(msg) in PAYLOAD_CODECS:
        return PAYLOAD_CODECS[type(msg)][1]
    return PLAINTEXT_CODECS[type(msg)][1]


def build_golden() -> dict[str, Any]:
    return {
        "comment": "Regenerate with: python -m tests.core.test_wire --regen",
        "protocol_version": wire.PROTOCOL_VERSION,
        "reason_codes": [None if r is None else r.value for r in wire.REASON_WIRE_TABLE],
        "frames": {name: encode_any(msg).hex() for name, msg in sample_messages().items()},
    }


def load_golden() -> dict[str, Any]:
    golden: dict[str, Any] = json.loads(GOLDEN.read_text())
    return golden


SAMPLES = sample_messages()

# ---------------------------------------------------------------------------
# Golden bytes and round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoding_matches_golden_bytes(name: str) -> None:
    assert encode_any(SAMPLES[name]).hex() == load_golden()["frames"][name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_golden_bytes_decode_to_the_message(name: str) -> None:
    msg = SAMPLES[name]
    assert decoder_for(msg)(bytes.fromhex(load_golden()["frames"][name])) == msg


def test_golden_file_has_no_stale_entries() -> None:
    assert set(load_golden()["frames"]) == set(SAMPLES)


def test_layout_sizes_are_the_documented_ones() -> None:
    # docs/wire-format.md states these numbers; a change here is a protocol change.
    assert wire.PROTOCOL_VERSION == 6
    assert (wire.HANDSHAKE_INIT_LEN, wire.HANDSHAKE_INIT_MAC2_LEN, wire.HANDSHAKE_RESP_LEN) == (155, 171, 128)
    assert (wire.TRANSPORT_HEADER_LEN, wire.MIN_TRANSPORT_LEN) == (16, 32)
    assert (wire.INIT_PAYLOAD_LEN, wire.RESP_PAYLOAD_LEN) == (37, 54)
    assert (wire.PROBE_LEN, wire.PROBE_ACK_LEN) == (13, 22)
    assert (wire.REATTACH_MIN_LEN, wire.REATTACH_MAX_LEN) == (43, 107)
    assert (wire.REATTACH_ACK_LEN, wire.REATTACH_REJECT_LEN, wire.CLOSE_LEN) == (41, 34, 18)
    # On the wire, with the 16-byte header and the 16-byte tag: docs/wire-format.md's type table.
    ack = wire.encode(SAMPLES["transport_reattach_ack"])
    assert len(ack) == wire.TRANSPORT_OVERHEAD + wire.REATTACH_ACK_LEN == 73
    assert wire.MAX_DATA_PLAINTEXT == wire.MAX_DATAGRAM - 32


def test_handshake_init_layout_by_hand() -> None:
    raw = wire.encode_handshake_init(INIT)
    assert raw[:2] == bytes([wire.PROTOCOL_VERSION, MessageType.HANDSHAKE_INIT])
    assert raw[2:6] == bytes.fromhex("01020304")
    assert raw[6:38] == INIT.ephemeral
    assert raw[wire.HANDSHAKE_INIT_MAC1_OFFSET :] == INIT.mac1


def test_transport_header_layout_by_hand() -> None:
    frame = transport_frame(MessageType.PROBE, wire.PROBE_LEN)
    raw = wire.encode_transport(frame)
    assert raw[:16] == bytes.fromhex("0605" "0000" "cafebabe" "0102030405060708")
    assert wire.encode_transport_header(frame.header) == raw[:16]


@pytest.mark.parametrize("name", sorted(PLAINTEXTS))
def test_plaintext_dispatchers_round_trip(name: str) -> None:
    msg = PLAINTEXTS[name]
    msg_type, plaintext = wire.encode_plaintext(msg)
    assert wire.decode_plaintext_untrusted(msg_type, plaintext) == msg


def test_plaintext_dispatcher_refuses_handshake_types() -> None:
    with pytest.raises(BadFrame) as info:
        wire.decode_plaintext_untrusted(MessageType.HANDSHAKE_INIT, b"")
    assert info.value.reason == "type"


def test_frame_dispatcher_picks_the_decoder_by_type() -> None:
    assert wire.decode_untrusted(wire.encode(INIT)) == INIT
    assert wire.decode_untrusted(wire.encode(RESP)) == RESP
    frame = SAMPLES["transport_probe"]
    assert wire.decode_untrusted(wire.encode(frame)) == frame
    assert wire.decode_transport_untrusted(wire.encode(frame)) == frame


def test_keepalive_is_an_empty_data_frame() -> None:
    assert Data(b"").is_keepalive and not Data(b"x").is_keepalive
    raw = wire.encode(transport_frame(MessageType.DATA, 0))
    assert len(raw) == wire.MIN_TRANSPORT_LEN
    assert wire.decode_transport_untrusted(raw).ciphertext == _fill(0x90, wire.TAG_LEN)


def test_largest_data_frame_is_accepted() -> None:
    raw = wire.encode(transport_frame(MessageType.DATA, wire.MAX_DATA_PLAINTEXT))
    assert len(raw) == wire.MAX_DATAGRAM
    assert wire.decode_transport_untrusted(raw).header.msg_type is MessageType.DATA
    assert wire.decode_data_plaintext_untrusted(bytes(wire.MAX_DATA_PLAINTEXT)).packet == bytes(
        wire.MAX_DATA_PLAINTEXT
    )


# ---------------------------------------------------------------------------
# Malformed input: every class rejected with its named reason
# ---------------------------------------------------------------------------


def reason_of(decode: Callable[[bytes], Any], data: bytes) -> str:
    with pytest.raises(BadFrame) as info:
        decode(data)
    assert isinstance(info.value, ValueError)  # BadFrame is a ValueError, by contract
    return info.value.reason


FIXED_FRAMES = {
    "handshake_init": wire.encode(INIT),
    "handshake_resp": wire.encode(RESP),
    **{
        name: wire.encode(SAMPLES[name])
        for name in (
            "transport_probe",
            "transport_probe_ack",
            "transport_reattach_ack",
            "transport_reattach_reject",
            "transport_close",
        )
    },
}


@pytest.mark.parametrize("name", sorted(FIXED_FRAMES))
def test_truncation_at_every_length_is_short(name: str) -> None:
    raw = FIXED_FRAMES[name]
    for cut in range(len(raw)):
        assert reason_of(wire.decode_untrusted, raw[:cut]) == "short", cut


@pytest.mark.parametrize("name", sorted(FIXED_FRAMES))
def test_one_byte_more_is_long(name: str) -> None:
    assert reason_of(wire.decode_untrusted, FIXED_FRAMES[name] + b"\x00") == "long"


def test_transport_frames_below_their_minimum_are_short() -> None:
    for name in ("transport_data_keepalive", "transport_reattach_no_metadata"):
        raw = wire.encode(SAMPLES[name])
        for cut in range(len(raw)):
            assert reason_of(wire.decode_transport_untrusted, raw[:cut]) == "short", (name, cut)


def test_reattach_frame_above_its_maximum_is_long() -> None:
    raw = wire.encode(transport_frame(MessageType.REATTACH, wire.REATTACH_MAX_LEN))
    assert wire.decode_transport_untrusted(raw).header.msg_type is MessageType.REATTACH
    assert reason_of(wire.decode_untrusted, raw + b"\x00") == "long"


def test_datagram_above_max_is_long() -> None:
    raw = wire.encode(transport_frame(MessageType.DATA, wire.MAX_DATA_PLAINTEXT))
    assert reason_of(wire.decode_untrusted, raw + b"\x00") == "long"
    assert reason_of(wire.decode_data_plaintext_untrusted, bytes(wire.MAX_DATA_PLAINTEXT + 1)) == "long"


@pytest.mark.parametrize("name", sorted(FIXED_FRAMES))
# 1: the layout before IPv6 in the response; 2: before cookie replies and path validation;
# 3: before the fencing epoch and the client's state version; 4: before DATA_PARTIAL;
# 5: one counter space for every transport message; 7: the future.
@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5, 7, 255])
def test_wrong_version_is_refused(name: str, version: int) -> None:
    raw = bytes([version]) + FIXED_FRAMES[name][1:]
    assert reason_of(wire.decode_untrusted, raw) == "version"
    assert reason_of(wire.peek_type_untrusted, raw) == "version"


@pytest.mark.parametrize("msg_type", [0, 14, 255])  # 3 is COOKIE_REPLY now, 13 DATA_PARTIAL
def test_unknown_type_is_refused(msg_type: int) -> None:
    raw = bytes([wire.PROTOCOL_VERSION, msg_type]) + bytes(200)
    assert reason_of(wire.peek_type_untrusted, raw) == "type"
    assert reason_of(wire.decode_untrusted, raw) == "type"


def test_decoders_refuse_frames_of_another_family() -> None:
    assert reason_of(wire.decode_handshake_init_untrusted, wire.encode(RESP)) == "type"
    assert reason_of(wire.decode_handshake_resp_untrusted, wire.encode(INIT)) == "type"
    assert reason_of(wire.decode_transport_untrusted, wire.encode(INIT)) == "type"


def test_peek_reports_the_type_and_refuses_short_input() -> None:
    assert wire.peek_type_untrusted(wire.encode(INIT)) is MessageType.HANDSHAKE_INIT
    assert wire.peek_type_untrusted(FIXED_FRAMES["transport_close"]) is MessageType.CLOSE
    assert reason_of(wire.peek_type_untrusted, b"") == "short"
    assert reason_of(wire.peek_type_untrusted, b"\x01") == "short"


@pytest.mark.parametrize("reserved", [b"\x00\x01", b"\x80\x00", b"\xff\xff"])
def test_nonzero_reserved_bytes_are_refused(reserved: bytes) -> None:
    raw = FIXED_FRAMES["transport_probe"]
    assert reason_of(wire.decode_untrusted, raw[:2] + reserved + raw[4:]) == "reserved"


def _reattach_with_declared_len(declared: int, metadata: bytes) -> bytes:
    raw = wire.encode_reattach_plaintext(PLAINTEXTS["reattach_no_metadata"])
    return raw[:-2] + declared.to_bytes(2, "big") + metadata


@pytest.mark.parametrize(
    ("declared", "actual"),
    [(1, 0), (0, 1), (5, 4), (4, 5), (wire.MAX_METADATA + 1, wire.MAX_METADATA), (0xFFFF, 0)],
)
def test_metadata_length_must_match(declared: int, actual: int) -> None:
    raw = _reattach_with_declared_len(declared, bytes(actual))
    assert reason_of(wire.decode_reattach_plaintext_untrusted, raw) == "metadata_len"


def test_reattach_plaintext_bounds() -> None:
    raw = wire.encode_reattach_plaintext(PLAINTEXTS["reattach"])
    for cut in range(wire.REATTACH_MIN_LEN):
        assert reason_of(wire.decode_reattach_plaintext_untrusted, raw[:cut]) == "short"
    too_long = _reattach_with_declared_len(wire.MAX_METADATA + 1, bytes(wire.MAX_METADATA + 1))
    assert reason_of(wire.decode_reattach_plaintext_untrusted, too_long) == "long"
    full = _reattach_with_declared_len(wire.MAX_METADATA, bytes(range(wire.MAX_METADATA)))
    assert wire.decode_reattach_plaintext_untrusted(full).metadata == bytes(range(wire.MAX_METADATA))


PATH_ID_OFFSETS: dict[str, tuple[Callable[[bytes], Any], bytes, int]] = {
    "probe": (wire.decode_probe_plaintext_untrusted, wire.encode_probe_plaintext(PLAINTEXTS["probe"]), 0),
    "probe_ack": (
        wire.decode_probe_ack_plaintext_untrusted,
        wire.encode_probe_ack_plaintext(PLAINTEXTS["probe_ack"]),
        0,
    ),
    "reattach": (wire.decode_reattach_plaintext_untrusted, wire.encode_reattach_plaintext(PLAINTEXTS["reattach"]), 16),
    "reattach_ack": (
        wire.decode_reattach_ack_plaintext_untrusted,
        wire.encode_reattach_ack_plaintext(PLAINTEXTS["reattach_ack"]),
        32,
    ),
    "init_payload": (
        wire.decode_init_payload_untrusted,
        wire.encode_init_payload(HANDSHAKE_PAYLOADS["init_payload"]),
        28,
    ),
}


@pytest.mark.parametrize("name", sorted(PATH_ID_OFFSETS))
def test_path_id_zero_is_refused(name: str) -> None:
    decode, raw, offset = PATH_ID_OFFSETS[name]
    assert decode(raw).path_id.value == raw[offset]  # the offset really is the path id
    zeroed = raw[:offset] + b"\x00" + raw[offset + 1 :]
    assert reason_of(decode, zeroed) == "path_id"


def test_probe_ack_bound_path_zero_means_unbound() -> None:
    raw = wire.encode_probe_ack_plaintext(PLAINTEXTS["probe_ack_unbound"])
    assert raw[-1] == wire.NO_PATH
    assert wire.decode_probe_ack_plaintext_untrusted(raw).bound_path_id is None


@pytest.mark.parametrize("code", [0, len(wire.REASON_WIRE_TABLE), 0xFFFF])
def test_unknown_reason_codes_are_refused(code: int) -> None:
    reject = wire.encode_reattach_reject_plaintext(PLAINTEXTS["reattach_reject"])
    bad_reject = reject[:24] + code.to_bytes(2, "big") + reject[26:]
    assert reason_of(wire.decode_reattach_reject_plaintext_untrusted, bad_reject) == "reason"
    close = wire.encode_close_plaintext(PLAINTEXTS["close"])
    assert reason_of(wire.decode_close_plaintext_untrusted, close[:16] + code.to_bytes(2, "big")) == "reason"


def test_prefix_len_above_32_is_refused() -> None:
    raw = wire.encode_resp_payload(HANDSHAKE_PAYLOADS["resp_payload"])
    assert reason_of(wire.decode_resp_payload_untrusted, raw[:28] + bytes([33]) + raw[29:]) == "prefix_len"


def test_resp_payload_layout_by_hand() -> None:
    raw = wire.encode_resp_payload(HANDSHAKE_PAYLOADS["resp_payload_ipv6"])
    assert raw[:16] == SID.raw
    assert raw[16:24] == (2).to_bytes(8, "big")
    assert raw[24:29] == bytes([10, 77, 0, 2, 24])
    assert raw[29:45] == ipaddress.IPv6Address("fd6a:7670::2").packed and raw[45] == 64
    assert raw[46:54] == bytes.fromhex("1122334455667788")  # the owner epoch, last
    # Without IPv6: sixteen zero bytes and a zero prefix.
    assert wire.encode_resp_payload(HANDSHAKE_PAYLOADS["resp_payload"])[29:46] == bytes(17)


def test_resp_payload_ipv6_round_trips_with_the_ipv4_address() -> None:
    payload = HANDSHAKE_PAYLOADS["resp_payload_ipv6"]
    decoded = wire.decode_resp_payload_untrusted(wire.encode_resp_payload(payload))
    assert decoded == payload
    assert (decoded.tunnel_ipv4, decoded.tunnel_ipv6) == (ipaddress.IPv4Address("10.77.0.2"), ipaddress.IPv6Address("fd6a:7670::2"))


@pytest.mark.parametrize(
    ("address6", "prefix6"),
    [
        (ipaddress.IPv6Address("fd6a:7670::2").packed, 129),  # longer than an IPv6 address
        (ipaddress.IPv6Address("fd6a:7670::2").packed, 255),
        (bytes(16), 64),  # a prefix beside "no IPv6": not canonical
        (bytes(16), 1),
    ],
)
def test_malformed_ipv6_prefix_is_refused(address6: bytes, prefix6: int) -> None:
    raw = wire.encode_resp_payload(HANDSHAKE_PAYLOADS["resp_payload"])
    assert reason_of(wire.decode_resp_payload_untrusted, raw[:29] + address6 + bytes([prefix6]) + raw[46:]) == "prefix_len"


def test_the_old_29_byte_response_payload_is_refused() -> None:
    # A version-1 gateway's payload (no IPv6 fields) is too short for version 2.
    raw = wire.encode_resp_payload(HANDSHAKE_PAYLOADS["resp_payload"])
    assert reason_of(wire.decode_resp_payload_untrusted, raw[:29]) == "short"
    assert reason_of(wire.decode_resp_payload_untrusted, raw + bytes(1)) == "long"


def test_version_3_payloads_without_the_new_fields_are_short() -> None:
    # Version 3's 46-byte response payload (no owner epoch), 29-byte init payload (no state
    # version) and 33-byte REATTACH_ACK (no owner epoch).
    resp = wire.encode_resp_payload(HANDSHAKE_PAYLOADS["resp_payload"])
    assert reason_of(wire.decode_resp_payload_untrusted, resp[:46]) == "short"
    init = wire.encode_init_payload(HANDSHAKE_PAYLOADS["init_payload_rekey"])
    assert reason_of(wire.decode_init_payload_untrusted, init[:29]) == "short"
    ack = wire.encode_reattach_ack_plaintext(PLAINTEXTS["reattach_ack"])
    assert reason_of(wire.decode_reattach_ack_plaintext_untrusted, ack[:33]) == "short"


def test_all_zero_rekey_session_means_new_session() -> None:
    raw = wire.encode_init_payload(HANDSHAKE_PAYLOADS["init_payload"])
    assert raw[12:28] == bytes(16)
    assert raw[29:37] == bytes(8)  # no session, no version
    assert wire.decode_init_payload_untrusted(raw).rekey_session is None


def test_init_payload_carries_the_clients_state_version() -> None:
    raw = wire.encode_init_payload(HANDSHAKE_PAYLOADS["init_payload_rekey"])
    assert raw[12:28] == SID.raw and raw[28] == 2
    assert raw[29:37] == (9).to_bytes(8, "big")
    assert wire.decode_init_payload_untrusted(raw).state_version == 9
    top = raw[:29] + wire.U64_MAX.to_bytes(8, "big")
    assert wire.decode_init_payload_untrusted(top).state_version == wire.U64_MAX


@pytest.mark.parametrize("version", [1, 0x0100, wire.U64_MAX])
def test_a_state_version_without_a_session_is_refused(version: int) -> None:
    # "New session" has one encoding: all-zero id and version 0.
    raw = wire.encode_init_payload(HANDSHAKE_PAYLOADS["init_payload"])
    assert reason_of(wire.decode_init_payload_untrusted, raw[:29] + version.to_bytes(8, "big")) == "state_version"


def test_reattach_ack_carries_the_owner_epoch_after_the_path() -> None:
    raw = wire.encode_reattach_ack_plaintext(PLAINTEXTS["reattach_ack"])
    assert len(raw) == wire.REATTACH_ACK_LEN == 41
    assert raw[:16] == SID.raw and raw[16:24] == (42).to_bytes(8, "big") and raw[24:32] == (6).to_bytes(8, "big")
    assert raw[32] == 2 and raw[33:41] == bytes.fromhex("0102030405060708")
    assert wire.decode_reattach_ack_plaintext_untrusted(raw).owner_epoch == 0x0102030405060708


@pytest.mark.parametrize(
    ("decode", "length"),
    [
        (wire.decode_init_payload_untrusted, wire.INIT_PAYLOAD_LEN),
        (wire.decode_resp_payload_untrusted, wire.RESP_PAYLOAD_LEN),
        (wire.decode_probe_plaintext_untrusted, wire.PROBE_LEN),
        (wire.decode_probe_ack_plaintext_untrusted, wire.PROBE_ACK_LEN),
        (wire.decode_reattach_ack_plaintext_untrusted, wire.REATTACH_ACK_LEN),
        (wire.decode_reattach_reject_plaintext_untrusted, wire.REATTACH_REJECT_LEN),
        (wire.decode_close_plaintext_untrusted, wire.CLOSE_LEN),
    ],
)
def test_fixed_plaintexts_must_have_their_exact_length(decode: Callable[[bytes], Any], length: int) -> None:
    for cut in range(length):
        assert reason_of(decode, bytes(cut)) == "short"
    assert reason_of(decode, bytes(length + 1)) == "long"


# ---------------------------------------------------------------------------
# Local construction: invalid messages cannot be built (so cannot be encoded)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: attrs.evolve(INIT, sender_index=1 << 32),
        lambda: attrs.evolve(INIT, sender_index=-1),
        lambda: attrs.evolve(INIT, ephemeral=bytes(31)),
        lambda: attrs.evolve(RESP, mac1=bytes(17)),
        lambda: Probe(path_id=1, seq=0, sent_us=0),  # type: ignore[arg-type]
        lambda: Probe(path_id=P1, seq=1 << 32, sent_us=0),
        lambda: Probe(path_id=P1, seq=True, sent_us=0),
        lambda: ProbeAck(path_id=P1, seq=0, echo_sent_us=0, gateway_state_version=1 << 64, bound_path_id=None),
        lambda: Reattach(session_id=SID, path_id=P1, nonce=0, client_ts_ms=0, expected_version=0, metadata=bytes(65)),
        lambda: Reattach(session_id=b"x" * 16, path_id=P1, nonce=0, client_ts_ms=0, expected_version=0),  # type: ignore[arg-type]
        lambda: Data(bytes(wire.MAX_DATA_PLAINTEXT + 1)),
        lambda: Close(session_id=SID, reason="LOCAL_CLOSE"),  # type: ignore[arg-type]
        lambda: InitPayload(timestamp=bytes(12), rekey_session=SessionId(bytes(16)), path_id=P1, state_version=0),
        lambda: InitPayload(timestamp=bytes(12), rekey_session=None, path_id=P1, state_version=1),
        lambda: InitPayload(timestamp=bytes(12), rekey_session=SID, path_id=P1, state_version=1 << 64),
        lambda: ReattachAck(session_id=SID, nonce=0, new_version=0, path_id=P1, owner_epoch=-1),
        lambda: ReattachAck(session_id=SID, nonce=0, new_version=0, path_id=P1, owner_epoch=1 << 64),
        lambda: RespPayload(
            session_id=SID, state_version=0, tunnel_ipv4=ipaddress.IPv4Address("10.0.0.1"), prefix_len=24,
            owner_epoch=1 << 64,
        ),
        lambda: RespPayload(
            session_id=SID, state_version=0, tunnel_ipv4=ipaddress.IPv4Address("10.0.0.1"), prefix_len=33, owner_epoch=0
        ),
        lambda: RespPayload(session_id=SID, state_version=0, tunnel_ipv4="10.0.0.1", prefix_len=24, owner_epoch=0),  # type: ignore[arg-type]
        lambda: RespPayload(
            session_id=SID, state_version=0, tunnel_ipv4=ipaddress.IPv4Address("10.0.0.1"), prefix_len=24,
            tunnel_ipv6=ipaddress.IPv6Address("fd00::2"), prefix_len6=129, owner_epoch=0,
        ),
        lambda: RespPayload(
            session_id=SID, state_version=0, tunnel_ipv4=ipaddress.IPv4Address("10.0.0.1"), prefix_len=24,
            tunnel_ipv6=ipaddress.IPv6Address("::"), prefix_len6=64, owner_epoch=0,
        ),
        lambda: RespPayload(
            session_id=SID, state_version=0, tunnel_ipv4=ipaddress.IPv4Address("10.0.0.1"), prefix_len=24,
            prefix_len6=64, owner_epoch=0,
        ),
        lambda: RespPayload(
            session_id=SID, state_version=0, tunnel_ipv4=ipaddress.IPv4Address("10.0.0.1"), prefix_len=24,
            tunnel_ipv6="fd00::2", prefix_len6=64, owner_epoch=0,  # type: ignore[arg-type]
        ),
        lambda: TransportHeader(msg_type=MessageType.HANDSHAKE_INIT, receiver_index=0, counter=0),
        lambda: TransportHeader(msg_type=3, receiver_index=0, counter=0),
        lambda: TransportFrame(header=SAMPLES["transport_probe"].header, ciphertext=bytes(15)),
        lambda: TransportFrame(header=SAMPLES["transport_probe"].header, ciphertext=bytes(wire.PROBE_LEN + 17)),
    ],
)
def test_invalid_messages_cannot_be_constructed(build: Callable[[], object]) -> None:
    # ValueError for a bad value, TypeError (attrs' instance_of) for a wrong type.
    with pytest.raises((ValueError, TypeError)):
        build()


def test_transport_header_accepts_a_plain_int_type() -> None:
    header = TransportHeader(msg_type=5, receiver_index=1, counter=2)
    assert header.msg_type is MessageType.PROBE


# ---------------------------------------------------------------------------
# The reason-code table
# ---------------------------------------------------------------------------


def test_reason_code_table_is_append_only() -> None:
    pinned = load_golden()["reason_codes"]
    current = [None if r is None else r.value for r in wire.REASON_WIRE_TABLE]
    assert current[: len(pinned)] == pinned, "REASON_WIRE_TABLE entries were reordered or removed"


def test_every_reason_code_has_a_wire_code() -> None:
    missing = sorted(r.value for r in ReasonCode if r not in wire.REASON_TO_WIRE)
    assert not missing, f"append {missing} to REASON_WIRE_TABLE in jvpn_trio/core/wire.py"


def test_reason_codes_round_trip_and_zero_is_reserved() -> None:
    assert wire.REASON_WIRE_TABLE[0] is None
    assert len(set(wire.REASON_WIRE_TABLE)) == len(wire.REASON_WIRE_TABLE)
    for reason in TERMINATION_REASONS:
        assert wire.reason_from_wire_untrusted(wire.reason_to_wire(reason)) is reason
    assert wire.reason_to_wire(ReasonCode.REPLAYED_NONCE) == 1
    assert wire.reason_to_wire(ReasonCode.STALE_EPOCH) == 60  # version 4's: the next free code


def test_the_documented_reason_table_matches_the_code() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "wire-format.md").read_text()
    for code, reason in enumerate(wire.REASON_WIRE_TABLE):
        if reason is not None:
            assert f"| {code} | {reason.value} |" in doc, f"docs/wire-format.md lacks code {code}"


def test_reason_to_wire_names_the_table_for_an_unmapped_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "REASON_TO_WIRE", {})
    with pytest.raises(ValueError, match="REASON_WIRE_TABLE"):
        wire.reason_to_wire(ReasonCode.LOCAL_CLOSE)


# ---------------------------------------------------------------------------
# Peeking at the receiver index (the receive loop's session lookup)
# ---------------------------------------------------------------------------

TRANSPORT_SAMPLES = sorted(name for name in SAMPLES if name.startswith("transport_"))


@pytest.mark.parametrize("name", TRANSPORT_SAMPLES)
def test_receiver_index_is_the_headers(name: str) -> None:
    raw = wire.encode(SAMPLES[name])
    _, index, _ = wire.parse_transport_untrusted(raw)
    assert wire.peek_receiver_index_untrusted(raw) == index == 0xCAFEBABE


def test_receiver_index_layout_by_hand() -> None:
    raw = bytes([wire.PROTOCOL_VERSION, MessageType.PROBE, 0, 0]) + bytes.fromhex("00000102") + bytes(8)
    assert wire.RECEIVER_INDEX_OFFSET == 4
    assert wire.peek_receiver_index_untrusted(raw) == 0x0102
    assert wire.peek_receiver_index_untrusted(raw[:8]) == 0x0102  # the field is all it needs
    assert wire.peek_receiver_index_untrusted(b"\xff" * 8) == wire.U32_MAX


def test_receiver_index_of_a_datagram_too_short_for_it_is_short() -> None:
    raw = wire.encode(SAMPLES["transport_probe"])
    for cut in range(wire.RECEIVER_INDEX_OFFSET + 4):
        assert reason_of(wire.peek_receiver_index_untrusted, raw[:cut]) == "short", cut


@given(st.binary(max_size=64))
def test_receiver_index_of_garbage_is_a_u32_or_bad_frame(data: bytes) -> None:
    try:
        index = wire.peek_receiver_index_untrusted(data)
    except BadFrame as exc:
        assert exc.reason == "short" and len(data) < 8
    else:
        assert 0 <= index <= wire.U32_MAX and index == int.from_bytes(data[4:8], "big")


# ---------------------------------------------------------------------------
# The destination of a tunnelled IPv4 packet
# ---------------------------------------------------------------------------

IPV4_PACKET = bytes.fromhex("4500001c00004000401100000a4200020a420001") + bytes(8)


def test_ipv4_destination_is_the_last_field_of_the_fixed_header() -> None:
    assert wire.ipv4_destination_untrusted(IPV4_PACKET) == ipaddress.IPv4Address("10.66.0.1")
    assert wire.ipv4_destination_untrusted(IPV4_PACKET[: wire.IPV4_HEADER_MIN_LEN]) == ipaddress.IPv4Address("10.66.0.1")


def test_ipv4_destination_of_a_short_packet_is_short() -> None:
    for cut in range(wire.IPV4_HEADER_MIN_LEN):
        assert reason_of(wire.ipv4_destination_untrusted, IPV4_PACKET[:cut]) == "short", cut


@pytest.mark.parametrize("first_byte", [0x00, 0x35, 0x60, 0x65, 0xF5])
def test_ipv4_destination_of_another_ip_version_is_refused(first_byte: int) -> None:
    packet = bytes([first_byte]) + IPV4_PACKET[1:]
    assert reason_of(wire.ipv4_destination_untrusted, packet) == "ip_version"


@given(st.binary(max_size=48))
def test_ipv4_destination_of_garbage_is_an_address_or_bad_frame(data: bytes) -> None:
    try:
        destination = wire.ipv4_destination_untrusted(data)
    except BadFrame as exc:
        assert exc.reason in ("short", "ip_version")
    else:
        assert destination.packed == data[16:20] and data[0] >> 4 == 4


#: An IPv6 UDP packet fd6a:7670::2 -> fd6a:7670::1 (fixed header, then an 8-byte UDP header).
IPV6_PACKET = (
    bytes.fromhex("60000000" "0008" "11" "40")
    + ipaddress.IPv6Address("fd6a:7670::2").packed
    + ipaddress.IPv6Address("fd6a:7670::1").packed
    + bytes(8)
)


def test_ip_destination_reads_both_versions() -> None:
    assert wire.ip_destination_untrusted(IPV4_PACKET) == ipaddress.IPv4Address("10.66.0.1")
    assert wire.ip_destination_untrusted(IPV6_PACKET) == ipaddress.IPv6Address("fd6a:7670::1")
    assert wire.ip_destination_untrusted(IPV6_PACKET[: wire.IPV6_HEADER_LEN]) == ipaddress.IPv6Address("fd6a:7670::1")


def test_ip_destination_of_a_short_ipv6_packet_is_short() -> None:
    for cut in range(wire.IPV6_HEADER_LEN):
        assert reason_of(wire.ip_destination_untrusted, IPV6_PACKET[:cut]) == "short", cut


@given(st.binary(max_size=64))
def test_ip_destination_of_garbage_is_an_address_or_bad_frame(data: bytes) -> None:
    try:
        destination = wire.ip_destination_untrusted(data)
    except BadFrame as exc:
        assert exc.reason in ("short", "ip_version")
    else:
        if destination.version == 6:
            assert destination.packed == data[24:40] and data[0] >> 4 == 6
        else:
            assert destination.packed == data[16:20] and data[0] >> 4 == 4


# ---------------------------------------------------------------------------
# Regeneration
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Check or regenerate the wire-format golden vectors.")
    parser.add_argument("--regen", action="store_true", help=f"rewrite {GOLDEN.name}")
    args = parser.parse_args(argv)
    golden = build_golden()
    if args.regen:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        same = GOLDEN.exists() and load_golden() == golden
        print("golden vectors are up to date" if same else "golden vectors differ: run with --regen")
        raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()


def test_the_documented_probe_cost_matches_the_encoders() -> None:
    """docs/wire-format.md, "The cost of probing": sealed sizes, plus UDP and IP headers."""
    from tests.core.test_channel import pair

    client, gateway = pair()
    probe = client.seal(wire.MessageType.PROBE, wire.encode_probe_plaintext(wire.Probe(path_id=PathId(1), seq=7, sent_us=1)))
    gateway.open_untrusted(probe, now=1.0)  # the gateway's keys become current with the first packet
    ack = gateway.seal(
        wire.MessageType.PROBE_ACK,
        wire.encode_probe_ack_plaintext(
            wire.ProbeAck(path_id=PathId(1), seq=7, echo_sent_us=1, gateway_state_version=3, bound_path_id=PathId(1))
        ),
    )
    assert (len(probe), len(ack)) == (45, 54)
    udp, ipv4, ipv6 = 8, 20, 40
    assert (len(probe) + len(ack) + 2 * (udp + ipv4), len(probe) + len(ack) + 2 * (udp + ipv6)) == (155, 195)
    table = (Path(__file__).parents[2] / "docs" / "wire-format.md").read_text()
    assert "| one probe and its ack | 155 B | 195 B |" in table
