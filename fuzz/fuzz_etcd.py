"""atheris target: the etcd reply decoders (drivers/store_etcd.py) (issue 15, "Inputs that never crash").

The first byte of an input picks a decoder, the second how the rest becomes its input:

* even: the driver's own path, raw reply bytes through ``parse_json_untrusted`` (a keepalive
  stream's first line), then the decoder;
* odd: a JSON value built from the bytes (:func:`json_value`): objects keyed by etcd's field
  names, holding the request's key in base64, stored values that parse, decimal strings, numbers,
  booleans, lists, nulls, so the fuzzer gets past the shape checks to the deeper ones.

The raw-bytes parsers (``parse_json_untrusted``, ``StoredValue.from_bytes_untrusted``) get the
bytes as they are.  The property: a decoder returns, or raises :class:`BadReply` with a message;
anything else is a crash.  What it returns keeps its promises (a record for the key and session
asked about, with a positive revision and a non-empty owner; a positive TTL or None; a stored
value that survives ``to_bytes``).

The hypothesis twins that run in CI are
tests/drivers/test_store_etcd.py and tests/properties/test_etcd_fuzz.py.  atheris is not a
dependency of the project; fuzz/README.md has the commands.
"""

from __future__ import annotations

import base64
import json
import pathlib
from collections.abc import Callable
from typing import Any

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
import httpx  # noqa: F401  (imported before instrumenting: the decoders never call the I/O half)
import trio  # noqa: F401
from fuzzing import run

with atheris.instrument_imports():
    from jvpn_trio.core.ids import SessionId
    from jvpn_trio.drivers.store_etcd import (
        DEFAULT_PREFIX,
        BadReply,
        EtcdRecord,
        GrantedLease,
        StoredValue,
        TxnOutcome,
        decode_grant_reply_untrusted,
        decode_keepalive_reply_untrusted,
        decode_kv_untrusted,
        decode_range_reply_untrusted,
        decode_timetolive_reply_untrusted,
        decode_txn_reply_untrusted,
        parse_json_untrusted,
        session_key,
    )

#: The session, key and lease every request is about.
SESSION = SessionId(bytes(range(16)))
KEY = session_key(DEFAULT_PREFIX, SESSION)
LEASE = 7_587_868_000_000_000_001
#: Field names etcd's replies use.
REPLY_FIELDS = (
    "kvs", "key", "value", "mod_revision", "create_revision", "version", "lease", "header", "revision",
    "succeeded", "responses", "response_range", "response_put", "result", "ID", "TTL", "error", "count",
)  # fmt: skip
#: Strings a reply may plausibly hold: the key, other keys, stored values good and bad, int64 text.
STRINGS = (
    base64.b64encode(KEY).decode(),
    base64.b64encode(KEY + b"x").decode(),
    base64.b64encode(StoredValue(owner="gw-a", attempt="00ff").to_bytes()).decode(),
    base64.b64encode(b'{"v":1,"owner":"","attempt":"a"}').decode(),
    base64.b64encode(b'{"v":2,"owner":"gw-a","attempt":"a"}').decode(),
    "", "0", "1", "-1", str(LEASE), "9223372036854775807", "9223372036854775808", " 5 ", "1_0", "0x10",
    "\u0661", "1e3", "=", "QQ", "QQ==",
)  # fmt: skip
#: How deep :func:`json_value` nests before it only builds scalars.
MAX_DEPTH = 6


def json_value(fdp: Any, depth: int = 0) -> Any:
    """A JSON value drawn from ``fdp`` (an ``atheris.FuzzedDataProvider``), shaped like etcd's replies."""
    kind = fdp.ConsumeIntInRange(0, 9) if depth < MAX_DEPTH else fdp.ConsumeIntInRange(0, 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-(2**70), 2**70)
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 16))
    if kind in (5, 6):
        return fdp.PickValueInList(list(STRINGS))
    if kind == 7:
        return [json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {
        fdp.PickValueInList(list(REPLY_FIELDS)): json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 5))
    }


def check_record(record: EtcdRecord | None) -> None:
    if record is None:
        return
    if record.record.session_id != SESSION or record.record.revision <= 0 or not record.record.owner:
        raise AssertionError(f"decoded an impossible record: {record!r}")
    if not isinstance(record.lease_id, int) or not record.attempt:
        raise AssertionError(f"decoded an impossible record: {record!r}")


def check_range(reply: Any) -> None:
    check_record(decode_range_reply_untrusted(reply, KEY, SESSION))


def check_kv(reply: Any) -> None:
    check_record(decode_kv_untrusted(reply, KEY, SESSION))


def check_txn(reply: Any) -> None:
    outcome = decode_txn_reply_untrusted(reply, KEY, SESSION)
    if type(outcome) is not TxnOutcome or type(outcome.succeeded) is not bool:
        raise AssertionError(f"decoded an impossible txn outcome: {outcome!r}")
    if outcome.succeeded and outcome.current is not None:
        raise AssertionError(f"a succeeded txn with a failure-branch read: {outcome!r}")
    check_record(outcome.current)


def check_grant(reply: Any) -> None:
    lease = decode_grant_reply_untrusted(reply)
    if not isinstance(lease, GrantedLease) or lease.lease_id == 0 or lease.ttl_s <= 0:
        raise AssertionError(f"decoded an impossible lease: {lease!r}")


def check_ttl(ttl_s: int | None) -> None:
    if ttl_s is not None and (not isinstance(ttl_s, int) or ttl_s <= 0):
        raise AssertionError(f"decoded an impossible TTL: {ttl_s!r}")


def check_keepalive(reply: Any) -> None:
    check_ttl(decode_keepalive_reply_untrusted(reply, LEASE))


def check_timetolive(reply: Any) -> None:
    check_ttl(decode_timetolive_reply_untrusted(reply))


REPLY_CHECKS: tuple[Callable[[Any], None], ...] = (
    check_range, check_kv, check_txn, check_grant, check_keepalive, check_timetolive,
)  # fmt: skip


def check_stored_value(body: bytes) -> None:
    value = StoredValue.from_bytes_untrusted(body)
    if not value.owner or not value.attempt or StoredValue.from_bytes_untrusted(value.to_bytes()) != value:
        raise AssertionError(f"decoded an impossible stored value: {value!r}")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    selector, mode, rest = data[0] % (len(REPLY_CHECKS) + 2), data[1], data[2:]
    try:
        if selector == len(REPLY_CHECKS):
            parse_json_untrusted(rest)
        elif selector == len(REPLY_CHECKS) + 1:
            check_stored_value(rest)
        elif mode % 2 == 0:
            REPLY_CHECKS[selector](parse_json_untrusted(rest))
        else:
            REPLY_CHECKS[selector](json_value(atheris.FuzzedDataProvider(rest)))
    except BadReply as exc:
        if not str(exc):
            raise AssertionError("BadReply without a message") from None


def write_seeds(directory: pathlib.Path) -> int:
    """The seed corpus: well-formed replies of each kind, as raw JSON behind every selector."""
    directory.mkdir(parents=True, exist_ok=True)
    kv = {"key": STRINGS[0], "value": STRINGS[2], "mod_revision": "12", "lease": str(LEASE)}
    replies: list[Any] = [
        {"header": {"revision": "12"}, "kvs": [kv], "count": "1"},
        kv,
        {"header": {"revision": "13"}, "succeeded": True, "responses": [{"response_put": {}}]},
        {"header": {"revision": "13"}, "responses": [{"response_range": {"kvs": [kv]}}]},
        {"ID": str(LEASE), "TTL": "10"},
        {"result": {"ID": str(LEASE), "TTL": "10"}},
        {"ID": str(LEASE), "TTL": "-1"},
        {"error": {"grpc_code": 14, "message": "etcdserver: request timed out"}},
    ]
    bodies = [json.dumps(reply).encode() for reply in replies] + [StoredValue(owner="gw-a", attempt="00ff").to_bytes()]
    count = 0
    for selector in range(len(REPLY_CHECKS) + 2):
        for number, body in enumerate(bodies):
            (directory / f"seed-{selector}-{number}").write_bytes(bytes([selector, 0]) + body)
            count += 1
    return count


def main() -> None:
    run(test_one_input, write_seeds)


if __name__ == "__main__":
    main()
