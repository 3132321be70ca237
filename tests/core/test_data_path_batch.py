"""The data path's batch helpers (issue 16): the same bytes, counters and limits as the one-packet calls."""

from __future__ import annotations

import pytest

from jvpn_trio.core import wire
from jvpn_trio.core.antireplay import ReplayWindow
from jvpn_trio.core.channel import ChannelDrop, SecureChannel
from jvpn_trio.core.keyring import DATA_LANE, Keypair, KeyRing, aead_nonce
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode as R

K1, K2 = bytes([1]) * 32, bytes([2]) * 32


def keypair(send: bytes, recv: bytes, local: int, remote: int, *, initiator: bool) -> Keypair:
    return Keypair(send_key=send, recv_key=recv, local_index=local, remote_index=remote,
                   is_initiator=initiator, created_at=0.0)


POLICY = Policy()


def ring(policy: Policy = POLICY) -> KeyRing:
    r = KeyRing(policy)
    r.install_current(keypair(K1, K2, 10, 20, initiator=True))
    return r


PACKETS = [b"", b"x", bytes(range(64)), bytes(1400)]


def test_nonce_is_four_zero_bytes_then_the_little_endian_counter() -> None:
    assert aead_nonce(0x0102030405060708, lane=DATA_LANE) == bytes(4) + bytes([8, 7, 6, 5, 4, 3, 2, 1])


def test_batch_seal_is_byte_identical_to_one_packet_seals_and_spends_the_same_counters() -> None:
    one, batch = ring(), ring()
    expected = [one.seal_datagram(wire.MessageType.DATA, p) for p in PACKETS]
    assert batch.seal_data_batch(PACKETS) == expected
    assert batch.current is not None and one.current is not None
    assert batch.current.send_counters == one.current.send_counters == [len(PACKETS), 0]
    # and the next batch continues where the first stopped
    assert batch.seal_data_batch([b"y"]) == [one.seal_datagram(wire.MessageType.DATA, b"y")]


def test_batch_seal_stops_at_reject_after_messages_and_without_keys() -> None:
    policy = Policy(rekey_after_messages=1, reject_after_messages=3)
    r = ring(policy)
    assert len(r.seal_data_batch(PACKETS)) == 3  # only counters 0, 1, 2 may be used
    assert r.current is not None and r.current.send_counters[DATA_LANE] == 3
    assert r.seal_data_batch(PACKETS) == []
    assert KeyRing(policy).seal_data_batch(PACKETS) == []  # no current keypair


def test_batch_seal_refuses_an_oversized_packet_before_spending_its_counter() -> None:
    r = ring()
    with pytest.raises(ValueError, match="DATA plaintext"):
        r.seal_data_batch([b"ok", bytes(wire.MAX_DATA_PLAINTEXT + 1)])
    assert r.current is not None and r.current.send_counters[DATA_LANE] == 1  # "ok" was sealed, the oversized one not


def test_batch_sealed_datagrams_open_in_order_and_replays_still_drop() -> None:
    a, b = SecureChannel(Policy()), SecureChannel(Policy())
    a.install_current(keypair(K1, K2, 10, 20, initiator=True))
    b.install_next(keypair(K2, K1, 20, 10, initiator=False))
    generation = b.generation
    datagrams = a.seal_data_batch(PACKETS)
    assert [b.open_untrusted(d, now=1.0).plaintext for d in datagrams] == PACKETS
    assert b.generation == generation + 1  # the first packet promoted *next*: the ring changed once
    with pytest.raises(ChannelDrop) as drop:
        b.open_untrusted(datagrams[1], now=1.0)
    assert drop.value.reason is R.REPLAYED_COUNTER


def test_open_still_refuses_expired_keys_and_counters_past_the_limit() -> None:
    policy = Policy(rekey_after_messages=1, reject_after_messages=3)
    a, b = SecureChannel(policy), SecureChannel(policy)
    a.install_current(keypair(K1, K2, 10, 20, initiator=True))
    b.install_current(keypair(K2, K1, 20, 10, initiator=False))
    datagram = a.seal_data_batch([b"late"])[0]
    with pytest.raises(ChannelDrop) as drop:
        b.open_untrusted(datagram, now=policy.reject_after_s)
    assert drop.value.reason is R.DECRYPT_FAILED and "reject_after_s" in drop.value.detail
    forged_counter = wire.pack_transport_header(wire.MessageType.DATA, 20, 3) + bytes(wire.TAG_LEN)
    with pytest.raises(ChannelDrop) as drop:
        b.open_untrusted(forged_counter, now=0.0)
    assert drop.value.reason is R.DECRYPT_FAILED and "reject_after_messages" in drop.value.detail


@pytest.mark.parametrize("counters", [[0, 1, 2, 3], [5, 3, 5, 4, 200, 70, 3000, 2, 2999, 7000, 7000]])
def test_in_order_fast_path_decides_as_the_general_rule(counters: list[int]) -> None:
    """check/commit take a shortcut for a counter above the highest: the verdicts are those of a set model."""
    window = ReplayWindow(2048)
    seen: set[int] = set()
    highest: int | None = None
    for c in counters:
        fresh = c not in seen and (highest is None or c > highest - window.window)
        assert window.check(c) is fresh
        assert window.commit(c) is fresh
        if fresh:
            seen.add(c)
            highest = c if highest is None else max(highest, c)
    assert window.statistics().highest_accepted == highest
