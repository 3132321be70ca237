"""SecureChannel: the receive order (parse, index, replay check, AEAD, commit) and its fast paths."""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jvpn_trio.core import wire
from jvpn_trio.core.channel import ChannelDrop, SecureChannel
from jvpn_trio.core.keyring import DATA_LANE, KeyExhausted, Keypair, KeyRing
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode as R

K1, K2, K3, K4 = (bytes([i]) * 32 for i in (1, 2, 3, 4))
POLICY = Policy()


def keypair(send: bytes, recv: bytes, local: int, remote: int, *, initiator: bool, at: float = 0.0) -> Keypair:
    return Keypair(send_key=send, recv_key=recv, local_index=local, remote_index=remote, is_initiator=initiator, created_at=at)


def pair() -> tuple[SecureChannel, SecureChannel]:
    a, b = SecureChannel(POLICY), SecureChannel(POLICY)
    a.install_current(keypair(K1, K2, 10, 20, initiator=True))
    b.install_next(keypair(K2, K1, 20, 10, initiator=False))
    return a, b


def test_round_trip_and_next_is_promoted_by_the_first_authenticated_packet() -> None:
    a, b = pair()
    assert b.keyring.current is None
    opened = b.open_untrusted(a.seal(wire.MessageType.DATA, b"hello"), now=1.0)
    assert (opened.msg_type, opened.plaintext, opened.local_index) == (wire.MessageType.DATA, b"hello", 20)
    assert b.keyring.current is not None and b.keyring.current.local_index == 20
    reply = b.seal(wire.MessageType.DATA, b"back")
    assert a.open_untrusted(reply, now=1.0).plaintext == b"back"


def test_replayed_datagram_is_dropped_and_changes_nothing() -> None:
    a, b = pair()
    datagram = a.seal(wire.MessageType.DATA, b"once")
    b.open_untrusted(datagram, now=1.0)
    before = b._windows[DATA_LANE][20].statistics()
    with pytest.raises(ChannelDrop) as info:
        b.open_untrusted(datagram, now=1.0)
    assert info.value.reason is R.REPLAYED_COUNTER
    assert b._windows[DATA_LANE][20].statistics().accepted == before.accepted


def test_forged_tag_does_not_consume_the_counter() -> None:
    a, b = pair()
    datagram = bytearray(a.seal(wire.MessageType.DATA, b"payload"))
    datagram[-1] ^= 1
    with pytest.raises(ChannelDrop) as info:
        b.open_untrusted(bytes(datagram), now=1.0)
    assert info.value.reason is R.DECRYPT_FAILED
    assert b.keyring.current is None  # a forgery promotes nothing
    datagram[-1] ^= 1
    assert b.open_untrusted(bytes(datagram), now=1.0).plaintext == b"payload"


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: d[:10], R.MALFORMED),
        (lambda d: bytes([wire.PROTOCOL_VERSION + 1]) + d[1:], R.MALFORMED),
        (lambda d: d[:2] + b"\x00\x01" + d[4:], R.MALFORMED),
        (lambda d: d[:4] + (99).to_bytes(4, "big") + d[8:], R.STRAY_PACKET),
    ],
    ids=["short", "version", "reserved", "unknown-index"],
)
def test_bad_frames_are_dropped_with_a_reason(mangle, reason) -> None:  # type: ignore[no-untyped-def]
    a, b = pair()
    with pytest.raises(ChannelDrop) as info:
        b.open_untrusted(mangle(a.seal(wire.MessageType.DATA, b"x")), now=1.0)
    assert info.value.reason is reason


def test_expired_keypair_cannot_receive() -> None:
    a, b = pair()
    with pytest.raises(ChannelDrop) as info:
        b.open_untrusted(a.seal(wire.MessageType.DATA, b"late"), now=float(POLICY.reject_after_s))
    assert info.value.reason is R.DECRYPT_FAILED


def test_fast_paths_match_the_object_codecs() -> None:
    # The same keys and counters through seal_frame + encode_transport and through seal_datagram.
    slow, fast = KeyRing(POLICY), KeyRing(POLICY)
    slow.install_current(keypair(K3, K4, 1, 2, initiator=True))
    fast.install_current(keypair(K3, K4, 1, 2, initiator=True))
    for kind, text in ((wire.MessageType.DATA, b"abc" * 100), (wire.MessageType.PROBE, bytes(wire.PROBE_LEN))):
        expected = wire.encode_transport(slow.seal_frame(kind, text))
        assert fast.seal_datagram(kind, text) == expected
        frame = wire.decode_transport_untrusted(expected)
        assert wire.parse_transport_untrusted(expected) == (
            frame.header.msg_type, frame.header.receiver_index, frame.header.counter
        )


def test_seal_without_keys_or_with_a_bad_length_raises() -> None:
    with pytest.raises(KeyExhausted):
        SecureChannel(POLICY).seal(wire.MessageType.DATA, b"x")
    a, _ = pair()
    with pytest.raises(ValueError):
        a.seal(wire.MessageType.PROBE, b"wrong length")


def test_windows_follow_the_key_ring() -> None:
    a, b = pair()
    b.open_untrusted(a.seal(wire.MessageType.DATA, b"x"), now=1.0)
    b.install_next(keypair(K3, K4, 21, 11, initiator=False))
    assert [set(w) for w in b._windows] == [{20, 21}, {20, 21}]
    freed = b.drop_expired(float(POLICY.reject_after_s) + 1.0)
    assert freed == {20, 21} and b._windows == ({}, {}) and not b.ready


def test_a_probe_that_overtakes_queued_data_leaves_the_data_acceptable() -> None:
    """The receiver's socket holds more DATA than the window when a PROBE on an idle path arrives.

    In one counter space the PROBE's counter slid the window past the queue and every datagram
    in it was refused as too old (measured: half of a UDP flood); on its own lane it moves nothing.
    """
    a, b = pair()
    queued = [a.seal(wire.MessageType.DATA, b"%d" % i) for i in range(POLICY.replay_window_packets + 1_000)]
    probe = a.seal(wire.MessageType.PROBE, bytes(wire.PROBE_LEN))
    assert b.open_untrusted(probe, now=1.0).msg_type is wire.MessageType.PROBE
    assert [b.open_untrusted(d, now=1.0).plaintext for d in queued] == [b"%d" % i for i in range(len(queued))]
    for replayed in (probe, queued[0], queued[-1]):  # each lane still refuses its own copies
        with pytest.raises(ChannelDrop) as info:
            b.open_untrusted(replayed, now=1.0)
        assert info.value.reason is R.REPLAYED_COUNTER


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([wire.MessageType.DATA, wire.MessageType.PROBE]), min_size=1, max_size=40),
       st.randoms(use_true_random=False))
def test_an_attacker_replaying_any_mix_of_lanes_gets_nothing_twice(kinds: list[wire.MessageType], rng: Random) -> None:
    """On-path, holding every datagram of both lanes: replayed in any order, each opens at most once."""
    a, b = pair()
    sent = [a.seal(kind, bytes(wire.PROBE_LEN)) for kind in kinds]
    delivery = sent + [rng.choice(sent) for _ in range(len(sent))]
    rng.shuffle(delivery)
    opened = []
    for datagram in delivery:
        try:
            b.open_untrusted(datagram, now=1.0)
        except ChannelDrop as drop:
            assert drop.reason is R.REPLAYED_COUNTER
        else:
            opened.append(datagram)
    assert sorted(opened) == sorted(sent)  # every one once, none twice
