"""Fuzzing the etcd reply decoders: garbage only ever raises BadReply (issue 15, "Inputs that never crash").

Properties, the CI twin of fuzz/fuzz_etcd.py:

* every ``decode_*_untrusted`` of drivers/store_etcd.py returns or raises BadReply, on JSON values
  shaped like etcd's replies: objects keyed by its field names, holding the key asked about in
  base64, stored values that parse and that do not, int64 text, numbers, booleans, lists, nulls;
  and on the same values as reply bodies, through ``parse_json_untrusted`` as the driver reads them;
* what a decoder returns keeps its promises: a record for the key and session asked about, with
  a positive revision, an owner and an attempt; a positive TTL or None; a lease with an id;
* ``StoredValue`` survives its own round trip.

tests/drivers/test_store_etcd.py fuzzes the reply decoders on shapeless JSON; this file reaches
the checks behind the shape (the key, the stored value, the revisions).  Text here is ASCII;
non-ASCII base64 text and deeply nested JSON, which once escaped as other exceptions, are
tests of their own at the end.

Determinism: hypothesis draws the inputs (its database replays failures); no etcd, no clock.
"""

from __future__ import annotations

import base64
import json
import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from jvpn_trio.core.ids import SessionId
from jvpn_trio.drivers.store_etcd import (
    DEFAULT_PREFIX,
    BadReply,
    EtcdRecord,
    StoredValue,
    decode_grant_reply_untrusted,
    decode_keepalive_reply_untrusted,
    decode_kv_untrusted,
    decode_range_reply_untrusted,
    decode_timetolive_reply_untrusted,
    decode_txn_reply_untrusted,
    parse_json_untrusted,
    session_key,
)

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
SESSION = SessionId(bytes(range(16)))
KEY = session_key(DEFAULT_PREFIX, SESSION)
LEASE = 7_587_868_000_000_000_001


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


REPLY_FIELDS = [
    "kvs", "key", "value", "mod_revision", "create_revision", "lease", "header", "revision", "succeeded",
    "responses", "response_range", "response_put", "result", "ID", "TTL", "error", "count",
]  # fmt: skip
ascii_text = st.text(string.printable, max_size=10)
stored_values = st.builds(StoredValue, owner=ascii_text, attempt=ascii_text)
strings = st.one_of(
    st.sampled_from([b64(KEY), b64(KEY + b"x"), "", "0", "1", "-1", str(LEASE), "9223372036854775808", " 5 ", "1_0"]),
    stored_values.map(lambda v: b64(v.to_bytes())),
    st.binary(max_size=24).map(b64),
    ascii_text,
)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | strings
replies = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(REPLY_FIELDS), inner, max_size=5),
    max_leaves=16,
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times in four, else any scalar: deep enough to pass the shape checks, spoiled enough to test them."""
    return st.integers(0, 3).flatmap(lambda roll: scalars if roll == 0 else valid)


good_values = st.builds(StoredValue, owner=st.text(string.printable, min_size=1, max_size=6), attempt=st.just("00ff"))


@st.composite
def kvs(draw: st.DrawFn) -> dict[str, Any]:
    """A ``kvs`` entry close to a real one: the right key, a stored value, int64 text, each maybe spoiled."""
    kv: dict[str, Any] = {
        "key": draw(mostly(st.just(b64(KEY)))),
        "value": draw(mostly(good_values.map(lambda v: b64(v.to_bytes())))),
        "mod_revision": draw(mostly(st.integers(-1, 1 << 64).map(str))),
        "lease": draw(mostly(st.just(str(LEASE)))),
    }
    for key in draw(st.lists(st.sampled_from(sorted(kv)), max_size=1)):
        kv.pop(key, None)
    return kv


@st.composite
def plausible_replies(draw: st.DrawFn) -> Any:
    """Each reply kind as etcd writes it, with parts replaced by anything."""
    kind = draw(st.integers(0, 6))
    revision = {"revision": draw(mostly(st.integers(0, 1 << 64).map(str)))}
    ttl = {"ID": draw(mostly(st.just(str(LEASE)))), "TTL": draw(mostly(st.integers(-2, 100).map(str)))}
    if kind == 0:
        return {"header": revision, "kvs": draw(st.lists(kvs() | replies, max_size=2))}
    if kind == 1:
        return draw(kvs())
    if kind == 2:
        return {"header": revision, "succeeded": draw(mostly(st.booleans())), "responses": [{"response_put": {}}]}
    if kind == 3:
        return {"header": revision, "responses": [{"response_range": {"kvs": [draw(kvs() | replies)]}}]}
    if kind == 4:
        return ttl
    if kind == 5:
        return {"result": ttl}
    return {"error": draw(replies)}


any_reply = plausible_replies() | replies


def check_record(record: EtcdRecord | None) -> None:
    if record is not None:
        assert record.record.session_id == SESSION and record.record.revision > 0
        assert record.record.owner and record.attempt and isinstance(record.lease_id, int)


def check_range(reply: Any) -> None:
    check_record(decode_range_reply_untrusted(reply, KEY, SESSION))


def check_kv(reply: Any) -> None:
    check_record(decode_kv_untrusted(reply, KEY, SESSION))


def check_txn(reply: Any) -> None:
    outcome = decode_txn_reply_untrusted(reply, KEY, SESSION)
    assert type(outcome.succeeded) is bool and isinstance(outcome.revision, int)
    assert not (outcome.succeeded and outcome.current is not None)
    check_record(outcome.current)


def check_grant(reply: Any) -> None:
    lease = decode_grant_reply_untrusted(reply)
    assert lease.lease_id != 0 and lease.ttl_s > 0


def check_ttl(ttl_s: int | None) -> None:
    assert ttl_s is None or (isinstance(ttl_s, int) and ttl_s > 0)


CHECKS: dict[str, Callable[[Any], None]] = {
    "range": check_range,
    "kv": check_kv,
    "txn": check_txn,
    "grant": check_grant,
    "keepalive": lambda reply: check_ttl(decode_keepalive_reply_untrusted(reply, LEASE)),
    "timetolive": lambda reply: check_ttl(decode_timetolive_reply_untrusted(reply)),
}


def decodes_or_bad_reply(check: Callable[[Any], None], reply: Any) -> bool:
    """True if ``check`` decoded the reply, False after BadReply; any other exception fails the test."""
    try:
        check(reply)
    except BadReply as exc:
        assert str(exc)
        return False
    return True


@pytest.mark.parametrize("name", sorted(CHECKS))
@FUZZ
@given(reply=any_reply)
def test_replies_decode_or_raise_bad_reply(name: str, reply: Any) -> None:
    decodes_or_bad_reply(CHECKS[name], reply)


@pytest.mark.parametrize("name", sorted(CHECKS))
@FUZZ
@given(reply=any_reply, stream=st.booleans())
def test_reply_bodies_decode_or_raise_bad_reply(name: str, reply: Any, stream: bool) -> None:
    body = json.dumps(reply).encode() + (b'\n{"result":{}}\n' if stream else b"")
    decodes_or_bad_reply(lambda b: CHECKS[name](parse_json_untrusted(b)), body)


@pytest.mark.parametrize("name", ["range", "kv", "txn", "grant", "keepalive"])
def test_the_generator_reaches_past_the_checks(name: str) -> None:
    """Else the properties above are checked on nothing: each decoder accepts some generated replies."""
    find(plausible_replies(), lambda r: decodes_or_bad_reply(CHECKS[name], r), settings=settings(database=None, max_examples=1_000))


@FUZZ
@given(value=stored_values)
def test_stored_values_round_trip(value: StoredValue) -> None:
    if value.owner and value.attempt:
        assert StoredValue.from_bytes_untrusted(value.to_bytes()) == value
    else:
        with pytest.raises(BadReply):
            StoredValue.from_bytes_untrusted(value.to_bytes())


# -- inputs that once escaped as other exceptions (found by fuzz/fuzz_etcd.py) ------------------------------


@pytest.mark.parametrize("field", ["key", "value"])
def test_non_ascii_base64_text_is_bad_reply(field: str) -> None:
    kv = {"key": b64(KEY), "value": b64(b"{}"), "mod_revision": "3", field: "\u00e9"}
    with pytest.raises(BadReply):
        decode_kv_untrusted(kv, KEY, SESSION)


@pytest.mark.parametrize("parse", [parse_json_untrusted, StoredValue.from_bytes_untrusted], ids=["body", "value"])
def test_deeply_nested_json_is_bad_reply(parse: Callable[[bytes], object]) -> None:
    with pytest.raises(BadReply):
        parse(b"[" * 100_000)
