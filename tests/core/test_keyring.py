"""The key ring: previous/current/next keypairs, promotion on authentication, limits, expiry."""

from __future__ import annotations

import attrs
import pytest

from jvpn_trio.core import wire
from jvpn_trio.core.keyring import (
    DATA_LANE,
    DecryptFailed,
    KeyExhausted,
    Keypair,
    KeyRing,
)
from jvpn_trio.core.noise import HandshakeResult
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.core.wire import MessageType, TransportHeader
from tests.core.test_noise import (
    INIT_INDEX,
    POLICY,
    RESP_INDEX,
    SID,
    SeededRandom,
    flip,
    full_handshake,
)


def rings(policy: Policy = POLICY, *, now: float = 0.0) -> tuple[KeyRing, KeyRing, HandshakeResult, HandshakeResult]:
    _, _, ini, res = full_handshake()
    client, gateway = KeyRing(policy), KeyRing(policy)
    client.install_current(ini.keypair(created_at=now))
    gateway.install_next(res.keypair(created_at=now))
    return client, gateway, ini, res


def send(ring: KeyRing, payload: bytes = b"ping", msg_type: MessageType = MessageType.DATA) -> wire.TransportFrame:
    return wire.decode_transport_untrusted(wire.encode(ring.seal_frame(msg_type, payload)))


def test_responder_promotes_next_only_on_an_authenticated_packet() -> None:
    client, gateway, _, res = rings()
    assert gateway.current is None and gateway.next is not None
    with pytest.raises(KeyExhausted):
        gateway.next_send_counter(MessageType.DATA)  # cannot send before the initiator confirmed
    frame = send(client)
    forged = attrs.evolve(frame, ciphertext=flip(frame.ciphertext))
    with pytest.raises(DecryptFailed) as info:
        gateway.open_frame(forged, now=1.0)
    assert info.value.reason is ReasonCode.DECRYPT_FAILED
    assert gateway.current is None and gateway.next is not None  # a forgery promotes nothing
    plaintext, keypair = gateway.open_frame(frame, now=1.0)
    assert plaintext == b"ping" and keypair.local_index == res.local_index
    assert gateway.current is keypair and gateway.next is None
    reply = send(gateway, b"pong")
    assert reply.header.receiver_index == INIT_INDEX
    assert client.open_frame(reply, now=1.0)[0] == b"pong"


def test_header_is_authenticated() -> None:
    client, gateway, _, _ = rings()
    frame = send(client)
    for header in (
        attrs.evolve(frame.header, counter=frame.header.counter + 1),
        attrs.evolve(frame.header, msg_type=MessageType.CLOSE),
    ):
        with pytest.raises(DecryptFailed):
            gateway.open(header, frame.ciphertext, now=0.0)


def test_unknown_index_is_a_stray_packet() -> None:
    client, gateway, _, _ = rings()
    frame = send(client)
    with pytest.raises(DecryptFailed) as info:
        gateway.open(attrs.evolve(frame.header, receiver_index=12345), frame.ciphertext, now=0.0)
    assert info.value.reason is ReasonCode.STRAY_PACKET
    assert "12345" in str(info.value)


def test_counters_advance_and_sealing_checks_the_index() -> None:
    client, _, _, _ = rings()
    assert [client.next_send_counter(MessageType.DATA) for _ in range(3)] == [0, 1, 2]
    assert send(client).header.counter == 3
    with pytest.raises(ValueError):
        client._seal(b"x", TransportHeader(msg_type=MessageType.DATA, receiver_index=1, counter=9))
    empty = KeyRing(POLICY)
    with pytest.raises(KeyExhausted):
        empty._seal(b"x", TransportHeader(msg_type=MessageType.DATA, receiver_index=1, counter=0))
    with pytest.raises(KeyExhausted):
        empty.seal_frame(MessageType.DATA, b"x")
    with pytest.raises(ValueError):
        client.seal_frame(MessageType.PROBE, b"too short")
    assert client.next_send_counter(MessageType.DATA) == 4  # the refused frame spent no counter


def test_rekey_keeps_previous_keys_open_for_packets_in_flight() -> None:
    client, gateway, _, _ = rings()
    gateway.open_frame(send(client), now=0.0)
    in_flight_up = send(client)  # sealed with the old keys, delivered after the rekey
    in_flight_down = send(gateway, b"down")

    new_init, new_resp = 0x33333333, 0x44444444
    _, _, ini2, res2 = full_handshake(
        rekey_session=SID, random_bytes=SeededRandom(b"second"), sender_index=new_init, responder_index=new_resp
    )
    old_client_current = client.current
    client.install_current(ini2.keypair(created_at=10.0))
    gateway.install_next(res2.keypair(created_at=10.0))
    assert client.previous is old_client_current and client.current is not None
    assert gateway.previous is None and gateway.current is not None  # the old keys still serve

    assert client.open_frame(in_flight_down, now=11.0) == (b"down", old_client_current)
    assert gateway.open_frame(in_flight_up, now=11.0)[0] == b"ping"
    assert gateway.next is not None
    gateway.open_frame(send(client, b"new"), now=11.0)  # first packet under the new keys
    assert gateway.current is not None and gateway.current.local_index == new_resp
    assert gateway.previous is not None and gateway.previous.local_index == RESP_INDEX
    assert gateway.local_indices() == frozenset({new_resp, RESP_INDEX})
    assert send(gateway).header.receiver_index == new_init


def test_install_current_prefers_a_pending_next_as_previous() -> None:
    _, _, ini, res = full_handshake()
    ring = KeyRing(POLICY)
    ring.install_next(res.keypair(created_at=0.0))
    ring.install_current(ini.keypair(created_at=1.0))
    assert ring.previous is not None and ring.previous.local_index == RESP_INDEX
    assert ring.next is None and ring.current is not None and ring.current.local_index == INIT_INDEX
    assert [kp.local_index for kp in ring.keypairs()] == [INIT_INDEX, RESP_INDEX]


def test_needs_rekey_by_time_for_the_initiator_only() -> None:
    client, gateway, _, _ = rings(now=100.0)
    gateway.open_frame(send(client), now=100.0)
    assert not client.needs_rekey(100.0 + POLICY.rekey_after_s - 0.001)
    assert client.needs_rekey(100.0 + POLICY.rekey_after_s)
    assert not gateway.needs_rekey(100.0 + POLICY.rekey_after_s)
    assert not KeyRing(POLICY).needs_rekey(1e9)


def test_needs_rekey_by_message_count_either_side() -> None:
    policy = Policy(rekey_after_messages=2, reject_after_messages=4)
    client, gateway, _, _ = rings(policy)
    gateway.open_frame(send(client), now=0.0)
    assert not client.needs_rekey(0.0)
    send(client)
    assert client.needs_rekey(0.0)
    send(gateway)
    assert not gateway.needs_rekey(0.0)
    send(gateway)
    assert gateway.needs_rekey(0.0)


def test_expired_by_time_and_by_count() -> None:
    client, _, _, _ = rings(now=5.0)
    assert not client.expired(5.0 + POLICY.reject_after_s - 0.001)
    assert client.expired(5.0 + POLICY.reject_after_s)
    assert not KeyRing(POLICY).expired(1e9)
    policy = Policy(rekey_after_messages=1, reject_after_messages=2)
    client, _, _, _ = rings(policy)
    client.next_send_counter(MessageType.DATA)
    assert not client.expired(0.0)
    client.next_send_counter(MessageType.DATA)
    assert client.expired(0.0)


def test_key_exhausted_at_reject_after_messages() -> None:
    policy = Policy(rekey_after_messages=1, reject_after_messages=3)
    client, _, _, _ = rings(policy)
    assert [client.next_send_counter(MessageType.DATA) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyExhausted):
        client.next_send_counter(MessageType.DATA)
    with pytest.raises(KeyExhausted):
        client.seal_frame(MessageType.DATA, b"")
    assert client.current is not None and client.current.send_counters[DATA_LANE] == 3


def test_open_refuses_expired_keys_and_counters_past_the_limit() -> None:
    policy = Policy(rekey_after_messages=1, reject_after_messages=3)
    client, gateway, _, _ = rings(policy)
    frame = send(client)
    with pytest.raises(DecryptFailed, match="reject_after_s"):
        gateway.open_frame(frame, now=float(policy.reject_after_s))
    with pytest.raises(DecryptFailed, match="reject_after_messages"):
        gateway.open(attrs.evolve(frame.header, counter=3), frame.ciphertext, now=0.0)
    assert gateway.next is not None  # nothing changed


def test_drop_expired_frees_indices() -> None:
    client, gateway, _, _ = rings(now=0.0)
    assert gateway.drop_expired(POLICY.reject_after_s - 1.0) == frozenset()
    assert gateway.drop_expired(float(POLICY.reject_after_s)) == frozenset({RESP_INDEX})
    assert gateway.keypairs() == () and gateway.local_indices() == frozenset()


def test_keypair_repr_hides_keys() -> None:
    client, _, ini, _ = rings()
    assert client.current is not None
    assert ini.sending_key.hex() not in repr(client.current)
    assert isinstance(client.current, Keypair) and client.current.age(3.0) == 3.0




def test_each_lane_counts_on_its_own_and_limits_hold_per_lane() -> None:
    policy = Policy(rekey_after_messages=2, reject_after_messages=3)
    client, gateway, _, _ = rings(policy)
    probe = b"\x01" * wire.PROBE_LEN
    data = [send(client) for _ in range(2)]
    control = [send(client, probe, MessageType.PROBE) for _ in range(3)]
    assert [f.header.counter for f in data] == [0, 1]
    assert [f.header.counter for f in control] == [0, 1, 2]  # its own counter, from 0
    for frame in data + control:  # every one opens, on its own lane's nonce
        gateway.open_frame(frame, now=0.0)
    assert client.expired(0.0) and client.needs_rekey(0.0)  # the control lane reached the limit
    with pytest.raises(KeyExhausted):
        client.seal_frame(MessageType.PROBE, probe)
    assert send(client).header.counter == 2  # the data lane still has room


def test_a_frame_cannot_move_to_the_other_lane() -> None:
    """The same counter on both lanes seals under different nonces; a changed type opens on neither."""
    client, gateway, _, _ = rings()
    data = send(client, b"\x00" * wire.PROBE_LEN)
    probe = send(client, b"\x00" * wire.PROBE_LEN, MessageType.PROBE)
    assert data.header.counter == probe.header.counter == 0
    tag = -wire.TAG_LEN  # the tags differ anyway, their headers do: compare what the keystream encrypted
    assert data.ciphertext[:tag] != probe.ciphertext[:tag]  # one key, two nonces: no keystream reused
    moved = attrs.evolve(probe, header=attrs.evolve(probe.header, msg_type=MessageType.DATA))
    with pytest.raises(DecryptFailed):
        gateway.open_frame(moved, now=0.0)
    kp = gateway.keypair_for(probe.header.receiver_index)
    assert kp is not None and gateway.current is None  # nothing authenticated, nothing promoted
    with pytest.raises(DecryptFailed):  # its own type kept, opened under the data lane's nonce
        kp.open(probe.header.counter, probe.ciphertext, wire.encode_transport_header(probe.header), lane=DATA_LANE)
    assert gateway.open_frame(probe, now=0.0)[0] == b"\x00" * wire.PROBE_LEN
