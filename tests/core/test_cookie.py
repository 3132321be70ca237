"""Handshake admission under load (core/cookie.py): cookies, mac2, rotation, buckets, the gate.

Pure: every call takes ``now``; randomness is seeded.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import pytest

from jvpn_trio.core import wire
from jvpn_trio.core.ratelimit import TokenBucket
from jvpn_trio.core.cookie import (
    CookieMint,
    HandshakeGate,
    HandshakeLimits,
    SourceBuckets,
    Verdict,
    open_cookie_reply,
    source_key,
)
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.noise import (
    InitiatorHandshake,
    add_mac2,
    generate_static,
    init_mac1_ok,
    mac2_ok,
)

A = ("198.51.100.7", 40007)
B = ("198.51.100.8", 40008)


class Rng:
    def __init__(self, seed: int = 5) -> None:
        self.rng = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))


RNG = Rng()
GATEWAY = generate_static(RNG)
CLIENT = generate_static(RNG)


def make_init(sender_index: int = 7) -> wire.HandshakeInit:
    _, init = InitiatorHandshake.create(
        CLIENT, GATEWAY.public, sender_index=sender_index, random_bytes=RNG, wall_time_ns=1, path_id=PathId(1)
    )
    return init


def mint(rotation_s: float = 120.0) -> CookieMint:
    return CookieMint(gateway_public=GATEWAY.public, rotation_s=rotation_s, random_bytes=Rng(9), now=0.0)


# -- wire ------------------------------------------------------------------------------------


def test_an_init_with_mac2_round_trips_and_other_lengths_are_refused() -> None:
    init = add_mac2(make_init(), bytes(wire.COOKIE_LEN))
    raw = wire.encode_handshake_init(init)
    assert len(raw) == wire.HANDSHAKE_INIT_MAC2_LEN == wire.HANDSHAKE_INIT_LEN + wire.MAC_LEN
    assert wire.decode_handshake_init_untrusted(raw) == init
    assert init_mac1_ok(raw, GATEWAY) and init_mac1_ok(raw[: wire.HANDSHAKE_INIT_LEN], GATEWAY)
    for bad in (raw[:-1], raw + b"\0", raw[: wire.HANDSHAKE_INIT_LEN + 1]):
        with pytest.raises(wire.BadFrame):
            wire.decode_handshake_init_untrusted(bad)


def test_a_cookie_reply_round_trips_and_has_an_exact_length() -> None:
    reply = mint().reply(wire.encode_handshake_init(make_init()), source_key(*A), nonce=bytes(12), now=1.0)
    raw = wire.encode_cookie_reply(reply)
    assert len(raw) == wire.COOKIE_REPLY_LEN < wire.HANDSHAKE_INIT_LEN  # no amplification
    assert wire.decode_untrusted(raw) == reply
    for bad in (raw[:-1], raw + b"\0"):
        with pytest.raises(wire.BadFrame):
            wire.decode_cookie_reply_untrusted(bad)


# -- cookies and mac2 ------------------------------------------------------------------------


def test_a_cookie_is_bound_to_the_source_address_and_port() -> None:
    m = mint()
    assert m.cookie(source_key(*A), now=1.0) == m.cookie(source_key(*A), now=2.0)
    assert m.cookie(source_key(*A), now=1.0) != m.cookie(source_key(*B), now=1.0)
    assert m.cookie(source_key(A[0], A[1] + 1), now=1.0) != m.cookie(source_key(*A), now=1.0)


def test_mac2_with_the_cookie_of_the_sender_is_valid_and_any_other_is_not() -> None:
    m = mint()
    init = make_init()
    good = wire.encode_handshake_init(add_mac2(init, m.cookie(source_key(*A), now=1.0)))
    assert m.mac2_valid(good, source_key(*A), now=1.0)
    assert not m.mac2_valid(good, source_key(*B), now=1.0)  # a cookie from another address
    assert not m.mac2_valid(wire.encode_handshake_init(init), source_key(*A), now=1.0)  # no mac2
    forged = wire.encode_handshake_init(attrs.evolve(init, mac2=bytes(range(16))))
    assert not m.mac2_valid(forged, source_key(*A), now=1.0)
    tampered = bytearray(good)
    tampered[10] ^= 1  # mac2 covers the whole init
    assert not m.mac2_valid(bytes(tampered), source_key(*A), now=1.0)
    assert not mac2_ok(good[: wire.HANDSHAKE_INIT_LEN], m.cookie(source_key(*A), now=1.0))


def test_a_cookie_stays_good_one_rotation_after_and_not_two() -> None:
    m = mint(rotation_s=10.0)
    cookie = m.cookie(source_key(*A), now=1.0)
    raw = wire.encode_handshake_init(add_mac2(make_init(), cookie))
    assert m.mac2_valid(raw, source_key(*A), now=9.0)
    assert m.mac2_valid(raw, source_key(*A), now=12.0)  # rotated once: the previous secret still counts
    assert m.cookie(source_key(*A), now=12.0) != cookie
    assert not m.mac2_valid(raw, source_key(*A), now=23.0)  # rotated twice


def test_a_secret_left_unused_for_two_periods_is_not_kept_as_previous() -> None:
    m = mint(rotation_s=10.0)
    cookie = m.cookie(source_key(*A), now=1.0)
    raw = wire.encode_handshake_init(add_mac2(make_init(), cookie))
    assert not m.mac2_valid(raw, source_key(*A), now=25.0)


def test_only_the_initiator_of_the_answered_init_opens_a_cookie_reply() -> None:
    m = mint()
    init = make_init()
    reply = m.reply(wire.encode_handshake_init(init), source_key(*A), nonce=bytes(12), now=1.0)
    assert reply.receiver_index == init.sender_index
    cookie = open_cookie_reply(reply, gateway_public=GATEWAY.public, init_mac1=init.mac1)
    assert cookie == m.cookie(source_key(*A), now=1.0)
    # A replay against a later init (another mac1), another gateway's key, or a bit flipped: nothing.
    assert open_cookie_reply(reply, gateway_public=GATEWAY.public, init_mac1=make_init().mac1) is None
    assert open_cookie_reply(reply, gateway_public=CLIENT.public, init_mac1=init.mac1) is None
    flipped = attrs.evolve(reply, sealed_cookie=bytes([reply.sealed_cookie[0] ^ 1]) + reply.sealed_cookie[1:])
    assert open_cookie_reply(flipped, gateway_public=GATEWAY.public, init_mac1=init.mac1) is None


# -- buckets ---------------------------------------------------------------------------------


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket.full(2.0, 3, now=0.0)
    assert [bucket.take(now=0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(now=0.5) and not bucket.take(now=0.5)
    assert [bucket.take(now=100.0) for _ in range(4)] == [True, True, True, False]  # never above the burst


def test_reserving_a_token_says_how_long_to_wait_for_it() -> None:
    bucket = TokenBucket.full(4.0, 1, now=0.0)
    assert bucket.reserve(now=0.0) == 0.0
    assert bucket.reserve(now=0.0) == pytest.approx(0.25)
    assert bucket.reserve(now=0.25) == pytest.approx(0.25)  # the last one was taken in advance


def test_the_source_table_is_bounded_and_forgets_the_least_recently_seen() -> None:
    buckets = SourceBuckets(rate=1.0, burst=1, size=2)
    assert buckets.take("a", now=0.0) and buckets.take("b", now=0.0)
    assert not buckets.take("a", now=0.0)  # "a" is now the most recent
    assert buckets.take("c", now=0.0)  # forgets "b", not "a"
    assert len(buckets) == 2
    assert not buckets.take("a", now=0.0)
    assert buckets.take("b", now=0.0)  # forgotten: a full bucket again


# -- the gate --------------------------------------------------------------------------------

LIMITS = HandshakeLimits(
    under_load_per_s=10, under_load_queue=4, load_hold_s=1.0, per_source_per_s=1, per_source_burst=3,
    cookie_replies_per_s=5, queue_capacity=8, handshakes_per_s=2, handshake_burst=1,
)  # fmt: skip


def gate(limits: HandshakeLimits = LIMITS) -> HandshakeGate:
    return HandshakeGate(limits, gateway_public=GATEWAY.public, random_bytes=Rng(3), now=0.0)


def test_not_under_load_an_init_is_accepted_without_mac2() -> None:
    g = gate()
    raw = wire.encode_handshake_init(make_init())
    assert g.admit(raw, *A, queued=0, now=0.0) is Verdict.ACCEPT
    assert not g.under_load(now=0.0)


def test_more_inits_per_second_than_the_threshold_put_the_gate_under_load_for_the_hold_time() -> None:
    g = gate()
    raw = wire.encode_handshake_init(make_init())
    for i in range(10):  # ten sources: one second's worth of inits, no source limited
        assert g.admit(raw, f"203.0.113.{i}", 1, queued=0, now=0.0) is Verdict.ACCEPT
    assert g.admit(raw, *A, queued=0, now=0.0) is Verdict.COOKIE
    assert g.under_load(now=0.9)
    assert not g.under_load(now=1.01)
    assert g.admit(raw, *B, queued=0, now=2.0) is Verdict.ACCEPT


def test_a_deep_queue_is_load_too() -> None:
    g = gate()
    raw = wire.encode_handshake_init(make_init())
    assert g.admit(raw, *A, queued=LIMITS.under_load_queue, now=0.0) is Verdict.COOKIE


def test_under_load_a_valid_mac2_is_accepted_and_one_from_another_address_is_not() -> None:
    g = gate()
    init = make_init()
    assert g.admit(wire.encode_handshake_init(init), *A, queued=4, now=0.0) is Verdict.COOKIE
    reply = wire.decode_cookie_reply_untrusted(g.cookie_reply(wire.encode_handshake_init(init), *A, nonce=bytes(12), now=0.0))
    cookie = open_cookie_reply(reply, gateway_public=GATEWAY.public, init_mac1=init.mac1)
    assert cookie is not None
    with_mac2 = wire.encode_handshake_init(add_mac2(init, cookie))
    assert g.admit(with_mac2, *A, queued=4, now=0.0) is Verdict.ACCEPT
    assert g.admit(with_mac2, *B, queued=4, now=0.0) is Verdict.COOKIE  # A's cookie, sent from B
    forged = wire.encode_handshake_init(attrs.evolve(init, mac2=bytes(16)))
    assert g.admit(forged, *B, queued=4, now=0.0) is Verdict.COOKIE


def test_a_source_past_its_bucket_is_limited_whatever_its_port() -> None:
    g = gate()
    raw = wire.encode_handshake_init(make_init())
    verdicts = [g.admit(raw, A[0], A[1] + i, queued=0, now=0.0) for i in range(4)]
    assert verdicts == [Verdict.ACCEPT] * 3 + [Verdict.SOURCE_LIMITED]
    assert g.admit(raw, *A, queued=0, now=1.0) is Verdict.ACCEPT  # one per second again


def test_cookie_replies_have_a_budget() -> None:
    g = gate()
    raw = wire.encode_handshake_init(make_init())
    verdicts = [g.admit(raw, f"203.0.113.{i}", 1, queued=4, now=0.0) for i in range(7)]
    assert verdicts == [Verdict.COOKIE] * 5 + [Verdict.COOKIE_LIMITED] * 2


def test_the_work_budget_spaces_handshakes_at_its_rate() -> None:
    g = gate()
    assert g.work_delay(now=0.0) == 0.0  # the burst of one
    assert g.work_delay(now=0.0) == pytest.approx(0.5)  # two per second
    assert g.work_delay(now=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "field, value",
    [("cookie_rotation_s", 0.0), ("under_load_per_s", 0), ("per_source_burst", 0), ("queue_capacity", 0),
     ("handshakes_per_s", -1.0), ("source_table_size", 0), ("load_hold_s", -0.1)],
)  # fmt: skip
def test_limits_out_of_range_are_refused_with_the_field_named(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        HandshakeLimits(**{field: value})  # type: ignore[arg-type]


def test_a_queue_threshold_the_queue_cannot_reach_is_refused() -> None:
    with pytest.raises(ValueError, match="under_load_queue"):
        HandshakeLimits(under_load_queue=9, queue_capacity=8)


# -- [handshake] in gateway.toml ---------------------------------------------------------------


def _gateway_toml(tmp_path: Any, handshake: str) -> Any:
    from jvpn_trio.keyfile import generate_private_key_text, public_from_private_text

    peer = public_from_private_text(generate_private_key_text(Rng(1)))
    path = tmp_path / "gateway.toml"
    path.write_text(f'[gateway]\nprivate_key_file = "k"\n[[peer]]\nname = "a"\npublic_key = "{peer}"\n{handshake}')
    return path


def test_the_handshake_table_sets_limits_and_defaults_the_rest(tmp_path: Any) -> None:
    from jvpn_trio.config import load_gateway_config

    assert load_gateway_config(_gateway_toml(tmp_path, "")).handshake == HandshakeLimits()
    config = load_gateway_config(_gateway_toml(tmp_path, "[handshake]\nhandshakes_per_s = 50\ncookie_rotation_s = 30\n"))
    assert config.handshake == HandshakeLimits(handshakes_per_s=50, cookie_rotation_s=30)


@pytest.mark.parametrize(
    "body, message",
    [("cookie_rotation_s = 0", "[handshake].cookie_rotation_s: 0 is out of range"),
     ("per_source_burst = 1.5", "[handshake].per_source_burst: expected int"),
     ("bogus = 1", "[handshake]: unknown key(s): bogus"),
     ("under_load_queue = 500", "[handshake].under_load_queue: 500 is more than queue_capacity")],
)  # fmt: skip
def test_a_bad_handshake_table_is_one_line_naming_the_field(tmp_path: Any, body: str, message: str) -> None:
    from jvpn_trio.config import ConfigError, load_gateway_config

    with pytest.raises(ConfigError) as info:
        load_gateway_config(_gateway_toml(tmp_path, f"[handshake]\n{body}\n"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_under_load_an_init_without_mac2_is_shed_once_the_cookie_budget_is_spent() -> None:
    g = gate()
    raw = wire.encode_handshake_init(make_init())
    assert not g.shed(len(raw), now=0.0)  # not under load
    for i in range(5):
        assert g.admit(raw, f"203.0.113.{i}", 1, queued=4, now=0.0) is Verdict.COOKIE
    assert g.shed(len(raw), now=0.0)
    assert not g.shed(wire.HANDSHAKE_INIT_MAC2_LEN, now=0.0)  # one with mac2 is still looked at
    assert not g.shed(len(raw), now=0.2)  # the budget refilled (5 per second)
