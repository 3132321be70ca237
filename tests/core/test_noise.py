"""Noise IK handshake and key rotation.

Determinism: static keys are literals, randomness is a seeded SHA-256 stream
(:class:`SeededRandom`), wall-clock time is a literal ``wall_time_ns`` and key
ages use explicit ``now`` values.  Nothing reads a clock.

The full handshake is pinned byte for byte in
``tests/data/golden/handshake.json``.  After an intentional change to the
derivation (a protocol version bump), regenerate with::

    python -m tests.core.test_noise --regen
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from jvpn_trio.core import noise as hs
from jvpn_trio.core import wire
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.keyring import CONTROL_LANE, DATA_LANE, KeyRing, aead_nonce
from jvpn_trio.core.noise import (
    HandshakeError,
    HandshakeResult,
    InitiatorHandshake,
    PeerRecord,
    ResponderHandshake,
    StaticKeypair,
)
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.core.wire import HandshakeInit, HandshakeResp, MessageType

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "handshake.json"

INITIATOR = StaticKeypair(hs.clamp_private(bytes(range(1, 33))))
RESPONDER = StaticKeypair(hs.clamp_private(bytes(range(101, 133))))
STRANGER = StaticKeypair(hs.clamp_private(bytes(range(201, 233))))
WALL_TIME_NS = 1_700_000_000_123_456_789
SID = SessionId(bytes.fromhex("5e55101d" * 4))
TUNNEL = ipaddress.IPv4Address("10.77.0.2")
TUNNEL6 = ipaddress.IPv6Address("fd6a:7670::2")
INIT_INDEX, RESP_INDEX = 0x11111111, 0x22222222
#: The fencing epoch the responder answers with (its ownership store revision).
OWNER_EPOCH = 0x0E0E
POLICY = Policy()


class SeededRandom:
    """A reproducible ``random_bytes``: SHA-256(seed || block number), concatenated."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._buffer = b""
        self._block = 0
        self.drawn = 0

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += hashlib.sha256(self._seed + self._block.to_bytes(8, "big")).digest()
            self._block += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        self.drawn += n
        return out


def known(*statics: StaticKeypair, last_timestamp: bytes | None = None) -> hs.PeerLookup:
    """A lookup that knows ``statics`` (with one shared last timestamp)."""
    peers = {s.public: PeerRecord(public=s.public, last_timestamp=last_timestamp) for s in statics}
    return peers.get


def start(
    *,
    random_bytes: SeededRandom | None = None,
    wall_time_ns: int = WALL_TIME_NS,
    rekey_session: SessionId | None = None,
    state_version: int = 0,
    responder_public: bytes = RESPONDER.public,
    psk: bytes = hs.ZERO_PSK,
    sender_index: int = INIT_INDEX,
) -> tuple[InitiatorHandshake, HandshakeInit]:
    return InitiatorHandshake.create(
        INITIATOR,
        responder_public,
        sender_index=sender_index,
        random_bytes=random_bytes or SeededRandom(b"initiator"),
        wall_time_ns=wall_time_ns,
        path_id=PathId(2),
        rekey_session=rekey_session,
        state_version=state_version,
        psk=psk,
    )


def answer(
    responder: ResponderHandshake,
    *,
    session_id: SessionId = SID,
    random_bytes: SeededRandom | None = None,
    sender_index: int = RESP_INDEX,
    owner_epoch: int = OWNER_EPOCH,
) -> tuple[HandshakeResp, HandshakeResult]:
    return responder.respond(
        session_id=session_id,
        state_version=1,
        owner_epoch=owner_epoch,
        tunnel_ipv4=TUNNEL,
        prefix_len=24,
        tunnel_ipv6=TUNNEL6,
        prefix_len6=64,
        sender_index=sender_index,
        random_bytes=random_bytes or SeededRandom(b"responder"),
    )


def full_handshake(
    *, responder_index: int = RESP_INDEX, **start_kwargs: Any
) -> tuple[HandshakeInit, HandshakeResp, HandshakeResult, HandshakeResult]:
    state, init = start(**start_kwargs)
    responder = ResponderHandshake.consume_init(
        wire.decode_handshake_init_untrusted(wire.encode(init)), RESPONDER, lookup_peer=known(INITIATOR)
    )
    resp, responder_result = answer(
        responder, session_id=start_kwargs.get("rekey_session") or SID, sender_index=responder_index
    )
    initiator_result = state.consume_response(wire.decode_handshake_resp_untrusted(wire.encode(resp)))
    return init, resp, initiator_result, responder_result


def remac_init(init: HandshakeInit, receiver_public: bytes) -> HandshakeInit:
    """A tampered init with a valid mac1, so the check under test is the one after mac1."""
    body = wire.encode_handshake_init(init)[: wire.HANDSHAKE_INIT_MAC1_OFFSET]
    return attrs.evolve(init, mac1=hs._compute_mac1(body, receiver_public))


def remac_resp(resp: HandshakeResp, receiver_public: bytes) -> HandshakeResp:
    body = wire.encode_handshake_resp(resp)[: wire.HANDSHAKE_RESP_MAC1_OFFSET]
    return attrs.evolve(resp, mac1=hs._compute_mac1(body, receiver_public))


def flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def error_reason(call: Any, *args: Any, **kwargs: Any) -> ReasonCode:
    with pytest.raises(HandshakeError) as info:
        call(*args, **kwargs)
    return info.value.reason


# ---------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------


def test_tai64n_layout_and_order() -> None:
    assert hs.tai64n(0) == (hs.TAI64_BASE).to_bytes(8, "big") + bytes(4)
    assert hs.tai64n(1_500_000_001) == (hs.TAI64_BASE + 1).to_bytes(8, "big") + (500_000_001).to_bytes(4, "big")
    times = [0, 1, 999_999_999, 1_000_000_000, WALL_TIME_NS, WALL_TIME_NS + 1]
    labels = [hs.tai64n(t) for t in times]
    assert labels == sorted(labels) and len(set(labels)) == len(labels)
    with pytest.raises(ValueError):
        hs.tai64n(-1)


def test_aead_nonce_is_the_little_endian_lane_then_the_little_endian_counter() -> None:
    assert aead_nonce(0x0102, lane=DATA_LANE) == bytes(4) + bytes.fromhex("0201000000000000")  # WireGuard's
    assert aead_nonce(0x0102, lane=CONTROL_LANE) == bytes.fromhex("01000000") + bytes.fromhex("0201000000000000")


def test_static_keypair_derives_public_and_hides_private() -> None:
    assert len(INITIATOR.public) == hs.KEY_LEN and INITIATOR.public != RESPONDER.public
    assert INITIATOR.mac1_key == hs.mac1_key(INITIATOR.public)
    assert INITIATOR.private.hex() not in repr(INITIATOR)
    assert INITIATOR.public.hex() in repr(INITIATOR)
    with pytest.raises(ValueError):
        StaticKeypair(bytes(31))


def test_generate_static_clamps_like_wg_genkey() -> None:
    key = hs.generate_static(lambda n: b"\xff" * n)
    assert key.private[0] & 0b111 == 0 and key.private[31] & 0x80 == 0 and key.private[31] & 0x40
    with pytest.raises(ValueError):
        hs.clamp_private(bytes(16))


def test_kdf_outputs_chain() -> None:
    one = hs._kdf(b"k" * 32, b"input", 1)
    three = hs._kdf(b"k" * 32, b"input", 3)
    assert three[0] == one[0] and len(set(three)) == 3


# ---------------------------------------------------------------------------
# Full handshake
# ---------------------------------------------------------------------------


def test_both_sides_derive_matching_keys_and_indices() -> None:
    _, _, ini, res = full_handshake()
    assert ini.sending_key == res.receiving_key and ini.receiving_key == res.sending_key
    assert ini.sending_key != ini.receiving_key
    assert (ini.local_index, ini.remote_index) == (INIT_INDEX, RESP_INDEX)
    assert (res.local_index, res.remote_index) == (RESP_INDEX, INIT_INDEX)
    assert ini.is_initiator and not res.is_initiator
    assert ini.peer_public == RESPONDER.public and res.peer_public == INITIATOR.public
    for result in (ini, res):
        assert (result.session_id, result.state_version, result.tunnel_ipv4, result.prefix_len) == (SID, 1, TUNNEL, 24)
        assert (result.tunnel_ipv6, result.prefix_len6) == (TUNNEL6, 64)
        assert result.tunnel_interface6 == ipaddress.IPv6Interface("fd6a:7670::2/64")
        assert result.path_id == PathId(2) and not result.rekey
        assert result.owner_epoch == OWNER_EPOCH  # the fencing epoch reaches the client authenticated
    assert ini.sending_key.hex() not in repr(ini)


def test_responder_sees_what_the_init_carried() -> None:
    _, init = start()
    responder = ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR))
    assert responder.peer_public == INITIATOR.public
    assert responder.timestamp == hs.tai64n(WALL_TIME_NS)
    assert responder.path_id == PathId(2) and responder.rekey_session is None
    assert responder.state_version == 0
    assert responder.init_sender_index == INIT_INDEX


def test_a_rekey_init_carries_the_clients_state_version() -> None:
    # A gateway taking the session over starts at the version the client holds (docs/cluster.md).
    state, init = start(rekey_session=SID, state_version=17)
    assert state.state_version == 17
    responder = ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR))
    assert (responder.rekey_session, responder.state_version) == (SID, 17)


def test_a_state_version_without_a_session_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="state_version"):
        start(state_version=1)


def test_the_owner_epoch_is_whatever_the_responder_holds() -> None:
    state, init = start()
    responder = ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR))
    resp, res = answer(responder, owner_epoch=wire.U64_MAX)
    assert res.owner_epoch == state.consume_response(resp).owner_epoch == wire.U64_MAX


def test_handshake_is_deterministic_and_draws_32_bytes_per_side() -> None:
    first, second = full_handshake(), full_handshake()
    assert [wire.encode(first[0]), wire.encode(first[1])] == [wire.encode(second[0]), wire.encode(second[1])]
    rng = SeededRandom(b"count")
    start(random_bytes=rng)
    assert rng.drawn == hs.KEY_LEN
    responder = ResponderHandshake.consume_init(start()[1], RESPONDER, lookup_peer=known(INITIATOR))
    rng = SeededRandom(b"count")
    answer(responder, random_bytes=rng)
    assert rng.drawn == hs.KEY_LEN


def test_different_randomness_gives_different_keys() -> None:
    _, _, a, _ = full_handshake()
    _, _, b, _ = full_handshake(random_bytes=SeededRandom(b"other"))
    assert a.sending_key != b.sending_key


def test_psk_mismatch_fails_the_response() -> None:
    state, init = start(psk=b"\x01" * hs.PSK_LEN)
    responder = ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR))
    resp, _ = answer(responder)  # the responder's record has the all-zero psk
    assert error_reason(state.consume_response, resp) is ReasonCode.DECRYPT_FAILED


def test_matching_psk_completes() -> None:
    psk = b"\x07" * hs.PSK_LEN
    state, init = start(psk=psk)
    lookup = {INITIATOR.public: PeerRecord(public=INITIATOR.public, psk=psk)}.get
    resp, res = answer(ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=lookup))
    assert state.consume_response(resp).sending_key == res.receiving_key


# ---------------------------------------------------------------------------
# Refusals, each with its reason
# ---------------------------------------------------------------------------


def test_wrong_responder_key_is_bad_mac_before_any_dh(monkeypatch: pytest.MonkeyPatch) -> None:
    _, init = start(responder_public=STRANGER.public)

    def no_dh(*_: object) -> bytes:
        raise AssertionError("DH attempted before mac1 was checked")

    monkeypatch.setattr(hs, "_dh", no_dh)
    assert error_reason(ResponderHandshake.consume_init, init, RESPONDER, lookup_peer=known(INITIATOR)) is ReasonCode.BAD_MAC


def test_tampered_mac1_is_bad_mac() -> None:
    _, init = start()
    bad = attrs.evolve(init, mac1=flip(init.mac1))
    assert error_reason(ResponderHandshake.consume_init, bad, RESPONDER, lookup_peer=known(INITIATOR)) is ReasonCode.BAD_MAC


@pytest.mark.parametrize("field", ["ephemeral", "encrypted_static", "encrypted_payload"])
def test_tampered_init_is_decrypt_failed(field: str) -> None:
    _, init = start()
    changes: dict[str, Any] = {field: flip(getattr(init, field), 5)}
    bad = remac_init(attrs.evolve(init, **changes), RESPONDER.public)
    assert error_reason(ResponderHandshake.consume_init, bad, RESPONDER, lookup_peer=known(INITIATOR)) is ReasonCode.DECRYPT_FAILED


def test_unknown_peer() -> None:
    _, init = start()
    assert error_reason(ResponderHandshake.consume_init, init, RESPONDER, lookup_peer=known(STRANGER)) is ReasonCode.UNKNOWN_PEER


def test_low_order_ephemeral_is_malformed_not_a_crash() -> None:
    _, init = start()
    bad = remac_init(attrs.evolve(init, ephemeral=bytes(32)), RESPONDER.public)
    assert error_reason(ResponderHandshake.consume_init, bad, RESPONDER, lookup_peer=known(INITIATOR)) is ReasonCode.MALFORMED


def test_replayed_init_is_refused() -> None:
    _, init = start()
    first = ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR))
    # The caller stored first.timestamp; the same init again is a replay.
    lookup = known(INITIATOR, last_timestamp=first.timestamp)
    assert error_reason(ResponderHandshake.consume_init, init, RESPONDER, lookup_peer=lookup) is ReasonCode.HANDSHAKE_REPLAY
    _, older = start(wall_time_ns=WALL_TIME_NS - 1)
    assert error_reason(ResponderHandshake.consume_init, older, RESPONDER, lookup_peer=lookup) is ReasonCode.HANDSHAKE_REPLAY
    _, newer = start(wall_time_ns=WALL_TIME_NS + 1)
    assert ResponderHandshake.consume_init(newer, RESPONDER, lookup_peer=lookup).timestamp > first.timestamp


def test_unparseable_authenticated_init_payload_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = wire.encode_init_payload
    monkeypatch.setattr(wire, "encode_init_payload", lambda p: real(p)[:28] + b"\x00" + real(p)[29:])  # path id 0
    _, init = start()
    assert error_reason(ResponderHandshake.consume_init, init, RESPONDER, lookup_peer=known(INITIATOR)) is ReasonCode.MALFORMED


def test_an_authenticated_init_with_a_version_but_no_session_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = wire.encode_init_payload
    monkeypatch.setattr(wire, "encode_init_payload", lambda p: real(p)[:-1] + b"\x01")  # state version 1, no session
    _, init = start()
    assert error_reason(ResponderHandshake.consume_init, init, RESPONDER, lookup_peer=known(INITIATOR)) is ReasonCode.MALFORMED


def test_unparseable_authenticated_resp_payload_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    state, init = start()
    responder = ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR))
    real = wire.encode_resp_payload
    monkeypatch.setattr(wire, "encode_resp_payload", lambda p: real(p)[:28] + bytes([33]) + real(p)[29:])  # prefix 33
    resp, _ = answer(responder)
    assert error_reason(state.consume_response, resp) is ReasonCode.MALFORMED


def test_response_checks() -> None:
    state, init = start()
    resp, _ = answer(ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR)))
    stray = remac_resp(attrs.evolve(resp, receiver_index=INIT_INDEX + 1), INITIATOR.public)
    assert error_reason(state.consume_response, stray) is ReasonCode.STRAY_PACKET
    assert error_reason(state.consume_response, attrs.evolve(resp, mac1=flip(resp.mac1))) is ReasonCode.BAD_MAC
    for field in ("ephemeral", "encrypted_payload", "sender_index"):
        value = getattr(resp, field)
        changes: dict[str, Any] = {field: value ^ 1 if isinstance(value, int) else flip(value, 3)}
        bad = remac_resp(attrs.evolve(resp, **changes), INITIATOR.public)
        if field == "sender_index":
            # The index is not mixed into the keys (as in WireGuard): it only routes.
            assert state.consume_response(bad).remote_index == RESP_INDEX ^ 1
        else:
            assert error_reason(state.consume_response, bad) is ReasonCode.DECRYPT_FAILED
    assert state.consume_response(resp).remote_index == RESP_INDEX


# ---------------------------------------------------------------------------
# Rekey keeps the session id (Property 5)
# ---------------------------------------------------------------------------


def test_rekey_handshake_keeps_the_session_id() -> None:
    _, _, first, _ = full_handshake()
    _, _, ini, res = full_handshake(rekey_session=first.session_id, random_bytes=SeededRandom(b"rekey"))
    assert ini.session_id == res.session_id == first.session_id
    assert ini.rekey and res.rekey
    assert ini.sending_key != first.sending_key


def test_responder_cannot_answer_a_rekey_with_another_session() -> None:
    _, init = start(rekey_session=SID)
    responder = ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR))
    assert responder.rekey_session == SID
    with pytest.raises(ValueError):
        answer(responder, session_id=SessionId(bytes(range(16))))


def test_initiator_refuses_a_rekey_answered_with_another_session() -> None:
    state, init = start(rekey_session=SID)
    responder = ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR))
    rogue = attrs.evolve(responder, rekey_session=None)  # a responder that ignores the rule
    resp, _ = answer(rogue, session_id=SessionId(bytes(range(16))))
    assert error_reason(state.consume_response, resp) is ReasonCode.SESSION_MISMATCH


# ---------------------------------------------------------------------------
# Golden handshake
# ---------------------------------------------------------------------------


def build_golden() -> dict[str, Any]:
    init, resp, ini, res = full_handshake()
    client, gateway = KeyRing(POLICY), KeyRing(POLICY)
    client.install_current(ini.keypair(created_at=0.0))
    gateway.install_next(res.keypair(created_at=0.0))
    first = client.seal_frame(MessageType.DATA, b"first packet")
    gateway.open_frame(first, now=0.0)
    reply = gateway.seal_frame(MessageType.PROBE_ACK, bytes(wire.PROBE_ACK_LEN))
    return {
        "comment": "Regenerate with: python -m tests.core.test_noise --regen",
        "inputs": {
            "initiator_private": INITIATOR.private.hex(),
            "responder_private": RESPONDER.private.hex(),
            "initiator_random_seed": b"initiator".hex(),
            "responder_random_seed": b"responder".hex(),
            "wall_time_ns": WALL_TIME_NS,
            "session_id": SID.hex,
        },
        "initiator_public": INITIATOR.public.hex(),
        "responder_public": RESPONDER.public.hex(),
        "handshake_init": wire.encode(init).hex(),
        "handshake_resp": wire.encode(resp).hex(),
        "initiator_sending_key": ini.sending_key.hex(),
        "initiator_receiving_key": ini.receiving_key.hex(),
        "first_data_frame": wire.encode(first).hex(),
        "first_reply_frame": wire.encode(reply).hex(),
    }


def test_full_handshake_matches_golden_bytes() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert build_golden() == golden


def test_golden_init_is_accepted_by_a_fresh_responder() -> None:
    golden = json.loads(GOLDEN.read_text())
    init = wire.decode_handshake_init_untrusted(bytes.fromhex(golden["handshake_init"]))
    responder = ResponderHandshake.consume_init(init, RESPONDER, lookup_peer=known(INITIATOR))
    assert responder.timestamp == hs.tai64n(golden["inputs"]["wall_time_ns"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Check or regenerate the handshake golden vector.")
    parser.add_argument("--regen", action="store_true", help=f"rewrite {GOLDEN.name}")
    args = parser.parse_args(argv)
    golden = build_golden()
    if args.regen:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        same = GOLDEN.exists() and json.loads(GOLDEN.read_text()) == golden
        print("golden vector is up to date" if same else "golden vector differs: run with --regen")
        raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
