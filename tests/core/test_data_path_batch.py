"""The data path's batch helpers (issue 16): the same bytes, counters and limits as the one-packet calls."""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# -- opening a batch: SecureChannel.open_data_batch against open_untrusted, datagram by datagram -------------

K3, K4 = bytes([3]) * 32, bytes([4]) * 32
#: When the newer keypair (index 21) was made: at ``LATE`` the older one (20) is past reject_after_s, it is not.
NEWER_AT = float(POLICY.reject_after_s) - 1.0
LATE = float(POLICY.reject_after_s) + 0.5


def receivers() -> list[SecureChannel]:
    """Two identical receivers: keypair 20 current, 21 installed as *next* (a rekey the sender will use)."""
    twins = []
    for _ in range(2):
        b = SecureChannel(POLICY)
        b.install_current(keypair(K2, K1, 20, 10, initiator=False))
        b.install_next(Keypair(send_key=K4, recv_key=K3, local_index=21, remote_index=11,
                               is_initiator=False, created_at=NEWER_AT))
        twins.append(b)
    return twins


def one_at_a_time(b: SecureChannel, datagrams: list[bytes], now: float) -> tuple[list[tuple[type, bytes]], list[R]]:
    packets, drops = [], []
    for datagram in datagrams:
        try:
            opened = b.open_untrusted(datagram, now=now)
        except ChannelDrop as drop:
            drops.append(drop.reason)
        else:
            packet = wire.data_packet(opened.msg_type, opened.plaintext)
            packets.append((type(packet), bytes(packet)))
    return packets, drops


def state(b: SecureChannel) -> tuple[object, ...]:
    ring = b.keyring
    return (
        tuple(kp.local_index for kp in (ring.previous, ring.current, ring.next) if kp is not None),
        b.generation,
        tuple(sorted((lane, index, w.statistics()) for lane, windows in enumerate(b._windows) for index, w in windows.items())),
    )


MANGLES = {
    "as sent": lambda d: d,
    "tag flipped": lambda d: d[:-1] + bytes([d[-1] ^ 1]),
    "truncated": lambda d: d[:10],
    "unknown index": lambda d: d[:4] + (99).to_bytes(4, "big") + d[8:],
    "reserved set": lambda d: d[:2] + b"\x00\x01" + d[4:],
}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([wire.MessageType.DATA, wire.MessageType.DATA_PARTIAL]),
                       st.binary(min_size=0, max_size=80)), min_size=1, max_size=30),
    st.integers(min_value=0, max_value=30),
    st.lists(st.sampled_from(sorted(MANGLES)), max_size=10),
    st.sampled_from([1.0, LATE]),
    st.randoms(use_true_random=False),
)
def test_a_batch_opens_exactly_what_one_datagram_at_a_time_opens(
    sends: list[tuple[wire.MessageType, bytes]], rekey_after: int, mangles: list[str], now: float, rng: Random
) -> None:
    """Replays, forgeries, bad frames, strangers, a rekey promoted mid-batch and an expired key, in any order.

    The attacker is on-path with every datagram: whatever order and copies reach the
    gateway, the batch must open the same packets, drop the same with the same reasons,
    and leave the same windows and key ring as opening them one by one.
    """
    a = SecureChannel(POLICY)
    a.install_current(keypair(K1, K2, 10, 20, initiator=True))
    sent = []
    for i, (kind, payload) in enumerate(sends):
        if i == rekey_after:
            a.install_current(keypair(K3, K4, 11, 21, initiator=True))
        sent.append(a.seal(kind, payload))
    delivery = sent + [rng.choice(sent) for _ in range(len(sent) // 2)]
    delivery += [MANGLES[m](rng.choice(sent)) for m in mangles]
    rng.shuffle(delivery)
    one, batch = receivers()
    expected = one_at_a_time(one, delivery, now)
    packets: list[tuple[type, bytes]] = []
    drops: list[R] = []
    cuts = sorted(rng.sample(range(1, len(delivery)), k=min(3, len(delivery) - 1)))
    for start, end in zip([0, *cuts], [*cuts, len(delivery)]):
        opened = batch.open_data_batch(delivery[start:end], now=now)
        packets += [(type(p), bytes(p)) for p in opened.packets]
        drops += opened.drops
    assert (packets, drops) == expected
    assert state(batch) == state(one)


def test_a_control_frame_in_a_data_batch_is_dropped_and_moves_no_window() -> None:
    a, b = SecureChannel(POLICY), SecureChannel(POLICY)
    a.install_current(keypair(K1, K2, 10, 20, initiator=True))
    b.install_next(keypair(K2, K1, 20, 10, initiator=False))
    probe = a.seal(wire.MessageType.PROBE, bytes(wire.PROBE_LEN))
    data = a.seal(wire.MessageType.DATA, b"after the probe")
    opened = b.open_data_batch([probe, data], now=1.0)
    assert opened == ([b"after the probe"], [R.MALFORMED])
    assert b.open_untrusted(probe, now=1.0).msg_type is wire.MessageType.PROBE  # the control lane never saw it


@pytest.mark.parametrize("counter_from_limit", [-1, 0])
@pytest.mark.parametrize("age_from_limit", [-1e-6, 0.0])
def test_a_batch_enforces_the_receive_limits_exactly_at_their_boundary(
    counter_from_limit: int, age_from_limit: float
) -> None:
    """A holder of the key seals at counters around reject_after_messages; the keypair ages to reject_after_s.

    Accepted only strictly below both limits, in the batch as one by one.
    """
    policy = Policy(rekey_after_messages=2, reject_after_messages=4)
    sender = keypair(K1, K2, 10, 20, initiator=True)
    counter = policy.reject_after_messages + counter_from_limit
    header = wire.pack_transport_header(wire.MessageType.DATA, 20, counter)
    datagram = header + sender.seal(counter, b"edge", header, lane=DATA_LANE)
    now = float(policy.reject_after_s) + age_from_limit
    outcomes = []
    for batched in (False, True):
        b = SecureChannel(policy)
        b.install_current(keypair(K2, K1, 20, 10, initiator=False))
        if batched:
            opened = b.open_data_batch([datagram], now=now)
            outcomes.append((opened.packets, opened.drops))
        else:
            try:
                outcomes.append(([b.open_untrusted(datagram, now=now).plaintext], []))
            except ChannelDrop as drop:
                outcomes.append(([], [drop.reason]))
    accepted = counter_from_limit < 0 and age_from_limit < 0
    assert outcomes[0] == outcomes[1] == (([b"edge"], []) if accepted else ([], [R.DECRYPT_FAILED]))
